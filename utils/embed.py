"""Embed a collection of images with one of the twelve models: the pooled features, one row per image.

    python -m utils.embed IMAGES... --output FEATS [--model ENTRY] [--weights FILE_OR_URL] [--float16]
    torchrun --nproc_per_node 8 -m utils.embed /data/imagenet/train --output feats/train ...

IMAGES are files, folders (searched recursively) or glob patterns, as classify takes them. FEATS gets
features.npy (float32 rows, or float16 with --float16; numpy.load(..., mmap_mode="r") reads it),
index.csv (path,label: each row's image relative to the folder given, and its class folder where the
folder is an ImageFolder layout) and meta.json (the entry, the weights and their SHA-256, the
transform, the backend and precision). Run again into the same FEATS, it continues with what is
missing: a stop at any moment loses at most the chunk each process was on, and a run with another
model, weights, transform or image list is refused. Under torchrun each process embeds its share of
the chunks, on one machine or several (FEATS on a shared file system); the rows are the one-process
rows. The model runs on the fastest faithful backend installed (--backend auto), and images decode in
--workers processes. Unreadable images are listed (FEATS/unreadable.csv) and get no row: the exit
status is then 1 (a later run into the finished folder does not retry them: embed them, once repaired,
into a folder of their own); 2 if nothing could be run.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from models import WEIGHTS
from models.factory import weights_file
from utils.cli import (
    CANNOT_RUN,
    DTYPE_NAMES,
    Parser,
    add_model_arguments,
    check_dtype,
    describe_weights,
    eager_model,
    error_line,
    input_config,
    pick_device,
)
from utils.features.embedding import embed_chunks
from utils.features.folder import (
    FORMAT,
    RANDOM_WEIGHTS_SEED,
    FeatureFolder,
    FeaturesError,
    Row,
    find_rows,
    images_identity,
)
from utils.inference.optimize import optimize_for_inference
from utils.system.distributed import Context, Stopped, check_together, give_up, start
from utils.text import first
from utils.weights.cache import sha256
from utils.weights.download import is_url


def make_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m utils.embed", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", metavar="IMAGES", help="image files, folders or glob patterns")
    parser.add_argument("--output", type=Path, required=True, metavar="FEATS", help="the features folder")
    parser.add_argument("--float16", action="store_true", help="store the features in float16: half the file")
    add_model_arguments(parser, batch_size=64, backend="auto")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.backend is None and args.dtype != "int8":
        args.backend = "auto"
    try:
        return embed(args)
    except Stopped as e:  # another process failed, and said why
        return e.code
    except (*CANNOT_RUN, FeaturesError) as e:
        return give_up(2, error_line(e))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def embed(args: argparse.Namespace) -> int:
    device = pick_device(args.device, args.backend, args.dtype)
    check_dtype(args, device)
    description = describe_weights(args)
    rows, problems = find_rows(args.paths)
    for pattern, reason in problems:
        print(f"{pattern}: {reason}", file=sys.stderr)
    if not rows:
        raise FileNotFoundError(f"no images in {' '.join(args.paths)}")
    ctx = start(device)
    folder = FeatureFolder(args.output, len(rows))
    try:
        meta = None
        if ctx.main:  # the weights fetched, and the folder checked, before any model is built
            meta = folder.prepare(identity(args, rows, folder.chunk, description))
        check_together()
        complete = (meta or folder.meta()).get("complete")
        if not complete:
            meta = run(args, ctx, folder, rows, meta)
        return report(args, meta, already=complete) if ctx.main else 0
    finally:
        folder.close()


def run(args: argparse.Namespace, ctx: Context, folder: FeatureFolder, rows: list[Row], meta: dict | None) -> dict:
    """This process's share of the missing chunks; the first process then assembles the folder."""
    torch.manual_seed(RANDOM_WEIGHTS_SEED)
    eager = eager_model(args.model, args.weights, ctx.device, num_classes=0, pretrained=not args.no_pretrained,
                        img_size=args.img_size)
    def optimized(backend: str | None) -> torch.nn.Module:
        return optimize_for_inference(eager, backend=backend, dtype=DTYPE_NAMES[args.dtype],
                                      calibration=args.calibration)

    # "auto" starts on the torch backend, and races the runtimes only where the job is long enough to repay it.
    start_on = "torch" if args.backend == "auto" else args.backend
    starts = folder.pending(len(rows), eager.num_features, file_dtype(args))
    count, seconds, model = embed_chunks(
        optimized(start_on), folder, rows, starts[ctx.rank::ctx.world], batch_size=args.batch_size,
        workers=args.workers, device=ctx.device, size=eager.num_features, file_dtype=file_dtype(args), show=ctx.main,
        later=(lambda: optimized("auto")) if start_on != args.backend else None)
    check_together()  # every process has written its chunks
    if not ctx.main:
        return {}
    meta["runtime"] = {"processes": ctx.world, "images_per_second": round(count * ctx.world / seconds, 1)
                       if seconds else None, "backend_choices": describe_choices(model, args.backend)}
    return folder.assemble(rows, meta)


def file_dtype(args: argparse.Namespace) -> str:
    return "float16" if args.float16 else "float32"


def identity(args: argparse.Namespace, rows: list[Row], chunk: int, description: dict | None) -> dict:
    """meta.json: what makes the rows, and what must agree for a run to continue them."""
    cfg = input_config(description or WEIGHTS[args.model].config(), args.img_size)
    if args.no_pretrained:
        weights, source = {"pretrained": False, "seed": RANDOM_WEIGHTS_SEED}, None
    else:
        path, _ = weights_file(args.model, args.weights, progress=False)
        weights = {"pretrained": True, "sha256": sha256(path)}
        source = args.weights  # None: the published weights, wherever they were fetched from
        if source and not is_url(source):
            source = os.path.abspath(os.path.expanduser(source))
    transform = {k: list(v) if isinstance(v, tuple) else v
                 for k, v in cfg.items() if k in ("input_size", "resize_size", "crop_pct", "mean", "std",
                                                  "interpolation")}
    return {"format": FORMAT, "entry": args.model, "weights": weights, "weights_source": source,
            "transform": transform, "feature_size": WEIGHTS[args.model].arch.num_features,
            "backend": args.backend or "int8",
            "dtype": args.dtype, "file_dtype": file_dtype(args), "images": images_identity(rows), "chunk": chunk}


def describe_choices(model: torch.nn.Module, backend: str | None) -> dict:
    """Which backend ran each input shape (N x H x W) under "auto", else the one backend."""
    choices = getattr(model, "choices", None)
    if choices is None:
        return {"all": "torch" if backend == "auto" else backend or "int8"}
    return {"x".join(map(str, shape)): name for shape, name in choices.items()}


def report(args: argparse.Namespace, meta: dict, already: bool = False) -> int:
    """The summary line (or JSON object), ``already`` for a folder that an earlier run completed; exit
    status 1 if some images could not be read."""
    unreadable = []
    if meta["unreadable"]:
        with open(args.output / "unreadable.csv", newline="", encoding="utf-8") as f:
            unreadable = [path for path, _ in list(csv.reader(f))[1:]]
    if args.json:
        print(json.dumps({"output": str(args.output), "model": meta["entry"], "rows": meta["rows"],
                          "feature_size": meta["feature_size"], "dtype": meta["file_dtype"],
                          "unreadable": meta["unreadable"], "already_complete": bool(already),
                          **meta.get("runtime", {})}))
    else:
        speed = meta.get("runtime", {}).get("images_per_second")
        done = "were embedded by an earlier run into" if already else "embedded into"
        print(f"{meta['entry']}: {meta['rows']} images {done} {args.output}/features.npy "
              f"({meta['rows']} x {meta['feature_size']}, {meta['file_dtype']}"
              + (f", {speed} images/s)" if speed else ")"))
    if unreadable:
        print(f"{len(unreadable)} image(s) could not be read and have no row ({first(unreadable)}): see "
              f"{args.output}/unreadable.csv", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
