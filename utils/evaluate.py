"""Top-1 and top-5 accuracy on an ImageFolder-layout dataset, on one process or many (torchrun).

    python -m utils.evaluate DIR [--model ENTRY] [--weights FILE_OR_URL] [--limit N] [--json]
    python -m utils.evaluate DIR --weights OUT/best.pth   # fine-tuned: its entry, classes and size
    python -m utils.evaluate DIR --dtype int8 --calibration IMAGES   # INT8 beside float32, same images
    torchrun --nproc_per_node 8 -m utils.evaluate DIR ...

DIR holds one folder per class, named by its ImageNet-1k WordNet id (DIR/n01440764/*.JPEG, ...),
as the validation set is usually laid out. A model fine-tuned by python -m utils.finetune knows its
classes: --weights OUT/best.pth alone, with folders named by its classes. For other weights with a
head of their own, pass --num-classes N: the sorted folders are then its classes 0..N-1. Under
torchrun every process takes every WORLD_SIZE-th image, so none is counted twice or left out, and
the counts are summed: the result is the single-process result. --data-only measures the decoding
pipeline without the model. With --dtype int8, the float32 model runs beside the INT8 one on the same
images, and both top-1 figures are reported: what quantization costs, measured.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch.distributed as dist

from models import WEIGHTS
from utils.cli import (
    CANNOT_RUN,
    DTYPE_NAMES,
    NO_PRETRAINED,
    Parser,
    add_model_arguments,
    check_dtype,
    contradiction,
    describe_weights,
    eager_model,
    error_line,
    input_config,
    pick_device,
    positive,
    wordnet_ids,
)
from utils.images.decode import IMAGE_SUFFIXES, ImageError
from utils.images.files import class_dirs
from utils.images.preprocess import Preprocess
from utils.inference.optimize import optimize_for_inference
from utils.system.accuracy import count_correct
from utils.system.distributed import Stopped, check_together, give_up, start
from utils.text import first


def image_folder(root: Path, num_classes: int | None, classes: list[str] | None = None) -> list[tuple[Path, int]]:
    """(file, label) for every image under ``root``/<class folder>/, in sorted order. Folders are named by
    the model's ``classes`` where it has its own names, else by ImageNet-1k WordNet id, or are its
    classes 0..N-1 in sorted order with ``num_classes``."""
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory")
    folders = class_dirs(root)
    if not folders:
        raise ValueError(f"{root} has no class folders: lay the images out as {root}/<class>/<image>")
    if classes is not None:
        index = {name: i for i, name in enumerate(classes)}
        unknown = [d.name for d in folders if d.name not in index]
        if unknown:
            raise ValueError(f"{root}: {len(unknown)} folder(s) are not classes of --weights "
                             f"({first(unknown)}); its classes are {first(classes, 8)}")
        labels = [index[d.name] for d in folders]
    elif num_classes is None:
        index = {wnid: i for i, wnid in enumerate(wordnet_ids())}
        unknown = [d.name for d in folders if d.name not in index]
        if unknown:
            raise ValueError(f"{root}: {len(unknown)} folder(s) are not ImageNet-1k WordNet ids ({first(unknown)}). "
                             "Name each class folder by its WordNet id "
                             "(e.g. n01440764), or pass --num-classes N and --weights for a model of your own classes")
        labels = [index[d.name] for d in folders]
    else:
        if len(folders) > num_classes:
            raise ValueError(f"{root} has {len(folders)} class folders, more than --num-classes {num_classes}")
        labels = list(range(len(folders)))
    samples = [(p, label) for d, label in zip(folders, labels)
               for p in sorted(d.rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not samples:
        raise ValueError(f"{root} has no image files ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    return samples


def evenly(samples: list, limit: int | None) -> list:
    """At most ``limit`` samples, spread evenly over the sorted list so that every class is represented."""
    if limit is None or limit >= len(samples):
        return samples
    return [samples[i * len(samples) // limit] for i in range(limit)]


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m utils.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, metavar="DIR", help="one folder of images per class")
    parser.add_argument("--limit", type=positive, help="evaluate N images, spread evenly over the classes")
    parser.add_argument("--num-classes", type=positive, help="the model's own number of classes (with --weights)")
    parser.add_argument("--data-only", action="store_true", help="decode and preprocess only: the pipeline's speed")
    add_model_arguments(parser, batch_size=64)
    args = parser.parse_args(argv)
    try:
        return evaluate(args)
    except Stopped as e:  # another process failed, and said why
        return e.code
    except ImageError as e:
        return give_up(1, f"error: {e}; accuracy needs every image: remove or replace it")
    except CANNOT_RUN as e:
        return give_up(2, error_line(e))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def evaluate(args: argparse.Namespace) -> int:
    if args.num_classes and not (args.weights or args.no_pretrained):
        raise ValueError("--num-classes needs --weights (or --no-pretrained): the published weights classify the "
                         "1000 ImageNet classes")
    device = pick_device(args.device, args.backend, args.dtype)
    check_dtype(args, device)
    description = describe_weights(args)
    if description and args.num_classes not in (None, description["num_classes"]):
        raise contradiction(f"--num-classes {args.num_classes}", args.weights, description)
    classes = description["classes"] if description else None
    num_classes = description["num_classes"] if description else args.num_classes or 1000
    samples = evenly(image_folder(args.root, args.num_classes, classes), args.limit)
    ctx = start(device)  # under torchrun: one process per device
    rank, world, device = ctx.rank, ctx.world, ctx.device

    if args.data_only:
        models = []
        preprocess = Preprocess.from_config(input_config(description or WEIGHTS[args.model].config(), args.img_size))
    else:
        if not ctx.main:
            check_together()  # the first process loads (and downloads) first; the others read the cache
        eager = eager_model(args.model, args.weights, device, num_classes=args.num_classes,
                            pretrained=not args.no_pretrained, img_size=args.img_size)
        model = optimize_for_inference(eager, backend=args.backend, dtype=DTYPE_NAMES[args.dtype],
                                       calibration=args.calibration)
        # INT8 is reported beside float32 on the same images, both made from the one loaded model.
        models = [model, optimize_for_inference(eager)] if args.dtype == "int8" else [model]
        del eager
        if model.pretrained_cfg["head"] != "pretrained" and not args.no_pretrained:
            raise ValueError(f"{args.weights} has no trained {num_classes}-class head to evaluate")
        if ctx.main:
            check_together()  # the others' turn
        check_together()  # every process has its model
        preprocess = model.preprocess

    hits, images, seconds = count_correct(models, samples[rank::world], preprocess, batch_size=args.batch_size,
                                          workers=args.workers, device=device, world=world)
    if rank == 0:
        report(args, hits, images, seconds, world, num_classes, getattr(models[0], "int8_fidelity", None)
               if models else None)
    return 0


def report(args: argparse.Namespace, hits: list[list[int]], images: int, seconds: float, world: int,
           num_classes: int, fidelity: dict | None = None) -> None:
    result = {"model": args.model, "weights": args.weights, "pretrained": not args.no_pretrained,
              "dataset": str(args.root), "images": images,
              "images_per_second": round(images / seconds, 1), "processes": world, "workers": args.workers,
              "dtype": args.dtype, "backend": args.backend or ("torch" if args.dtype != "int8" else "fastest int8")}
    for (top1, top5), prefix in zip(hits, ("", "float32_")):
        result.update({f"{prefix}top1": 100 * top1 / images, f"{prefix}top1_correct": top1})
        if num_classes > 5:  # with 5 classes or fewer, top-5 always holds the label: not a measure
            result.update({f"{prefix}top5": 100 * top5 / images, f"{prefix}top5_correct": top5})
    if fidelity:  # INT8's agreement with float32 on the held-out calibration images, per runtime
        result["int8_fidelity"] = {name: asdict(f) for name, f in fidelity.items()}
    if args.json:
        print(json.dumps(result))
    elif args.data_only:
        print(f"decoding and preprocessing only: {images} images, {result['images_per_second']} images/s "
              f"({world} process(es), {args.workers} workers each)")
    else:
        top5 = f"  top-5 {result['top5']:.3f}%" if "top5" in result else ""
        random = f" ({NO_PRETRAINED.replace('classes', 'accuracies')})" if args.no_pretrained else ""
        print(f"{args.model}{random} on {args.root}: top-1 {result['top1']:.3f}%{top5}  "
              f"({images} images, {result['images_per_second']} images/s, {world} process(es))")
        if "float32_top1" in result:
            top5 = f"  top-5 {result['float32_top5']:.3f}%" if "float32_top5" in result else ""
            print(f"  int8 against float32 on the same images: top-1 {result['top1']:.3f}% against "
                  f"{result['float32_top1']:.3f}%{top5} in float32 "
                  f"({result['top1'] - result['float32_top1']:+.3f} points)")


if __name__ == "__main__":
    sys.exit(main())
