"""Write a model of this repository to a file that other tools run (TorchScript, torch.export, ONNX), checked.

    python -m utils.export OUTPUT [--model ENTRY] [--weights FILE_OR_URL] [--num-classes N] [--features-only]
    python -m utils.export OUTPUT --weights OUT/best.pth   # fine-tuned: its entry, head and size

OUTPUT's suffix picks the format (``.pt``, ``.pt2`` or ``.onnx``: the library, utils/inference/export.py,
says what each is for). Before the file takes OUTPUT's place, it is loaded back and run on the bundled
sample photos beside the eager model: the command fails, leaving what was there, if they differ.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

from models import WEIGHTS, create_model
from utils.cli import (
    CANNOT_RUN,
    NO_PRETRAINED,
    add_entry_arguments,
    describe_weights,
    error_line,
    positive,
    set_input_size,
)

# The library, also under this module's name (utils.export.export(model, path), utils.export.check(...)).
from utils.inference.export import FORMATS, ExportError, check, export, load, sample_batch  # noqa: F401, I001
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.export", description=__doc__.split("\n\n")[0],
                                     epilog=f"entries: {', '.join(WEIGHTS)}")
    parser.add_argument("output", help="the file to write: NAME.pt (TorchScript), NAME.pt2 or NAME.onnx")
    add_entry_arguments(parser)
    parser.add_argument("--num-classes", type=positive,
                        help="classes of --weights' head, for files that do not say it (default 1000)")
    parser.add_argument("--features-only", action="store_true", help="export the backbone's feature maps")
    args = parser.parse_args(argv)
    output = Path(args.output)
    if output.is_dir():
        parser.error(f"{args.output} is a directory: give a file name ending in {', '.join(FORMATS)}")
    if output.suffix not in FORMATS:
        parser.error(f"{args.output}: the name must end in {', '.join(FORMATS)}")
    weights = local_weights(args.weights)
    if weights is not None and output.exists() and output.samefile(weights):
        parser.error(f"{args.output} is the --weights file: writing there would destroy it; choose another name")

    try:
        describe_weights(args)
        model = create_model(args.model, pretrained=not args.no_pretrained, weights=args.weights,
                             num_classes=args.num_classes, features_only=args.features_only)
        set_input_size(model, args.img_size)  # the size of the check on the sample photos
        batch, errors = sample_batch(model), []
        # Checked before it replaces what is at OUTPUT: a file that fails the check never takes its place.
        path = export(model, args.output, verify=lambda written: errors.append(check(model, written, batch)))
        error = errors[0]
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
    print(f"{path} ({FORMATS[path.suffix]}, {path.stat().st_size / 2**20:.1f} MiB): outputs on the sample photos "
          f"equal the eager model's within {error:.1e} (relative){note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
