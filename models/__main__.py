"""python -m models [ENTRY]: the README's table of the twelve models, or one entry's help, offline."""
import argparse
import sys

from models.registry import WEIGHTS, markdown_table

parser = argparse.ArgumentParser(prog="python -m models", description=__doc__.split(": ", 1)[1],
                                 epilog=f"entries: {', '.join(WEIGHTS)}")
parser.add_argument("entry", nargs="?", choices=list(WEIGHTS), metavar="ENTRY",
                    help="print this entry's help, as torch.hub.help gives it")
args = parser.parse_args()
print(WEIGHTS[args.entry].docstring() if args.entry else markdown_table())
sys.exit(0)
