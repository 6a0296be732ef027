"""How the repository's objects cross into another process: pickling, ``torch.save`` of a whole model,
multiprocessing and DataLoader workers under the "spawn" start method (macOS's and Windows' default).

Loaded through torch.hub, the repository's modules live under a private package name (hubconf.py)
that exists only in the process that imported hubconf.py. A class whose metaclass is ``Portable`` is
pickled there as a call that finds it again through ``torch.hub.load`` of the same checkout, which
builds that package in the new process. In a clone, where the modules have their plain names, classes
are pickled by name, as usual.
"""
from __future__ import annotations

import copyreg
import functools
import sys

import torch

PRIVATE_PACKAGE = "_semi_supervised_hub_"  # how hubconf.py's package names start


class Portable(type):
    """The metaclass of the classes whose instances reach users: the models, their blocks, preprocess."""


def _reduce(cls: type):
    root, _, module = cls.__module__.partition(".")
    if not root.startswith(PRIVATE_PACKAGE):
        return cls.__qualname__  # by name, as pickle does for any class
    checkout = sys.modules[root].__path__[0]
    return functools.partial(torch.hub.load, checkout, "_class", source="local"), (module, cls.__qualname__)


copyreg.pickle(Portable, _reduce)
