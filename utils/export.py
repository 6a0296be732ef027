"""Write a model of this repository to a file or folder that other tools take, checked.

    python -m utils.export OUTPUT [--model ENTRY] [--weights FILE_OR_URL] [--num-classes N] [--features-only]
    python -m utils.export OUTPUT --weights OUT/best.pth   # fine-tuned: its entry, head and size
    python -m utils.export OUT_DIR --format hf [--model ENTRY] [--weights FILE]   # a Hugging Face / timm folder

OUTPUT's suffix picks the format, unless --format names it: ``.pt`` (TorchScript), ``.pt2``
(torch.export) or ``.onnx`` (utils/inference/export.py says what each is for), ``.safetensors`` (the
weights and what they are, which ``weights=`` loads), or ``hf``: a folder with ``config.json``,
``model.safetensors`` and a model card, as timm and the Hugging Face Hub take it (models/sharing.py).
Every file carries the weights' license. Before anything takes OUTPUT's place, it is loaded back and
run on the bundled sample photos beside the eager model: the command fails, leaving what was there, if
they differ.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

from models import WEIGHTS, create_model, sharing

# The library, also under this module's name: utils.export.export(model, path), utils.export.save_folder(...)
from models.sharing import save_folder, save_safetensors  # noqa: F401
from utils.cli import (
    CANNOT_RUN,
    NO_PRETRAINED,
    add_entry_arguments,
    describe_weights,
    error_line,
    positive,
    set_input_size,
)
from utils.inference.export import (  # noqa: F401
    FORMATS,
    TOLERANCE,
    ExportError,
    check,
    export,
    load,
    sample_batch,
)
from utils.weights import download


def local_weights(weights: str | None) -> Path | None:
    """The local file that --weights names, however it is spelt (a path with ~, a file:// URL); None for
    none or a download. Comparing files, not spellings, also catches symbolic and hard links."""
    if not weights:
        return None
    if not download.is_url(weights):
        return Path(weights).expanduser()
    parsed = urlsplit(weights)
    return Path(url2pathname(parsed.path)) if parsed.scheme == "file" else None


SUFFIXES = {".pt": "torchscript", ".pt2": "torch.export", ".onnx": "onnx", ".safetensors": "safetensors"}
FOLDER = "hf"  # the one format that is a folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.export", description=__doc__.split("\n\n")[0],
                                     epilog=f"entries: {', '.join(WEIGHTS)}")
    parser.add_argument("output", help="the file to write: NAME.pt (TorchScript), NAME.pt2, NAME.onnx or "
                                       "NAME.safetensors; with --format hf, the folder to write")
    parser.add_argument("--format", choices=[*SUFFIXES.values(), FOLDER],
                        help="default: by OUTPUT's suffix; hf: a Hugging Face / timm model folder")
    add_entry_arguments(parser)
    parser.add_argument("--num-classes", type=positive,
                        help="classes of --weights' head, for files that do not say it (default 1000)")
    parser.add_argument("--features-only", action="store_true", help="export the backbone's feature maps")
    args = parser.parse_args(argv)
    output = Path(args.output)
    kind = _format(parser, args, output)
    _refuse_writing_over_weights(parser, args, output, kind)

    try:
        describe_weights(args)
        model = create_model(args.model, pretrained=not args.no_pretrained, weights=args.weights,
                             num_classes=args.num_classes, features_only=args.features_only)
        set_input_size(model, args.img_size)  # the size of the check on the sample photos
        if kind in (FOLDER, "safetensors"):
            path = (sharing.save_folder if kind == FOLDER else sharing.save_safetensors)(model, output)
            checked = f"within {TOLERANCE:.0e}, loaded back with weights=OUTPUT, which holds the same weights exactly"
        else:
            batch, errors = sample_batch(model), []
            # Checked before it replaces what is at OUTPUT: a file that fails the check never takes its place.
            path = export(model, output, verify=lambda written: errors.append(check(model, written, batch)))
            checked = f"within {errors[0]:.1e} (relative)"
    except CANNOT_RUN as e:
        print(error_line(e), file=sys.stderr)
        return 2
    except OSError as e:  # the folder cannot be written: nothing was written, nothing was changed
        print(f"error: cannot write {args.output} ({e.strerror or e}): choose a folder you can write to",
              file=sys.stderr)
        return 2
    except ExportError as e:
        print(error_line(e), file=sys.stderr)
        return 1
    note = f"; {NO_PRETRAINED}" if args.no_pretrained else ""
    size = sum(f.stat().st_size for f in ([path / n for n in sharing.FOLDER_FILES] if kind == FOLDER else [path]))
    print(f"{path} ({kind}, {size / 2**20:.1f} MiB): outputs on the sample photos equal the eager model's "
          f"{checked}{note}")
    return 0


def _format(parser: argparse.ArgumentParser, args: argparse.Namespace, output: Path) -> str:
    """The format to write: --format, else OUTPUT's suffix; a parser error where they disagree or OUTPUT cannot
    take it."""
    by_suffix = SUFFIXES.get(output.suffix)
    kind = args.format or by_suffix
    if kind != FOLDER and output.is_dir():
        parser.error(f"{args.output} is a directory: give a file name ending in {', '.join(SUFFIXES)}, "
                     "or --format hf to write a model folder there")
    if kind is None:
        parser.error(f"{args.output}: the name must end in {', '.join(SUFFIXES)}, or give --format hf for a folder")
    if by_suffix and kind != by_suffix:
        parser.error(f"{args.output}: the suffix {output.suffix} says {by_suffix}, --format says {kind}: make "
                     "them agree")
    if kind == FOLDER and output.exists() and not output.is_dir():
        parser.error(f"{args.output} is a file: --format hf writes a folder; give a folder's name")
    return kind


def _refuse_writing_over_weights(parser: argparse.ArgumentParser, args: argparse.Namespace, output: Path,
                                 kind: str) -> None:
    weights = local_weights(args.weights)
    if weights is None or not weights.exists():
        return
    if kind == FOLDER:
        written = [output / name for name in sharing.FOLDER_FILES]
        if weights.is_dir() and output.exists() and weights.samefile(output):
            parser.error(f"{args.output} is the --weights folder: writing there would replace its files; "
                         "choose another folder")
    else:
        written = [output]
    if any(w.exists() and w.samefile(weights) for w in written):
        parser.error(f"{args.output} is the --weights file: writing there would destroy it; choose another name")


if __name__ == "__main__":
    sys.exit(main())
