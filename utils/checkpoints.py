"""``python -m utils.checkpoints``: the earlier name of ``python -m utils.cache``, which it runs."""
import sys

from utils.cache import main

if __name__ == "__main__":
    sys.exit(main())
