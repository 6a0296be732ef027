"""torch.hub entry points for the semi-supervised (ssl) and semi-weakly supervised (swsl) ImageNet-1k
ResNet and ResNeXt models of Yalniz et al., "Billion-scale semi-supervised learning for image
classification" (arXiv:1905.00546). ``torch.hub.help(repo, name)`` describes each one.
"""
import ast as _ast
import gc as _gc
import hashlib as _hashlib
import importlib as _importlib
import importlib.machinery as _machinery
import importlib.util as _importlib_util
import sys as _sys
from pathlib import Path as _Path

dependencies = ["torch"]

_PACKAGES = ("models", "utils")  # this checkout's top-level packages, as its own modules import them


def _package() -> str:
    # torch.hub runs every repository's hubconf in one sys.modules, and other hub repositories and
    # users' scripts have top-level `models` and `utils` too. So this checkout's packages are
    # imported under a package name of their own, which nothing else can take or be taken by.
    # The name also changes when the checkout is written anew (force_reload=True), so that a
    # long-running session picks up the new code instead of the copy it imported before.
    hubconf = _Path(__file__).resolve()
    key = f"{hubconf.parent}:{hubconf.stat().st_mtime_ns}"
    name = "_semi_supervised_hub_" + _hashlib.sha256(key.encode()).hexdigest()[:12]
    if name not in _sys.modules:
        spec = _importlib_util.spec_from_loader(name, loader=None, is_package=True)
        spec.submodule_search_locations.append(str(hubconf.parent))
        _sys.meta_path.insert(0, _CheckoutFinder(name))
        _sys.modules[name] = _importlib_util.module_from_spec(spec)
    return name


def _class(module: str, qualname: str) -> type:
    """A class of this checkout, for what was pickled in another process (utils/pickling.py)."""
    found = _importlib.import_module(f"{_PACKAGE}.{module}")
    for name in qualname.split("."):
        found = getattr(found, name)
    return found


class _CheckoutFinder:
    """Finds the modules under the private name ``root``, and loads them with ``_CheckoutLoader``."""

    def __init__(self, root: str):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(self.root + "."):
            return None
        spec = _machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            spec.loader = _CheckoutLoader(fullname, spec.origin, self.root)
        return spec


class _CheckoutLoader(_machinery.SourceFileLoader):
    """The repository's modules import each other by their names in a clone (``from utils.weights import
    checkpoint``). Under the private name those imports are compiled as imports of ``<root>.utils.weights``,
    so that they reach this checkout's modules and never another ``utils``; nothing else changes, and line
    numbers stay those of the file."""

    def __init__(self, fullname: str, path: str, root: str):
        super().__init__(fullname, path)
        self.root = root

    def get_code(self, fullname):  # no bytecode cache: the clone's own .pyc holds the plain imports
        # The syntax tree's many short-lived objects would set off full garbage collections over all of
        # torch's objects: 100 ms of the import, for nothing. The tree is freed by reference counting.
        collecting = _gc.isenabled()
        _gc.disable()
        try:
            tree = _ast.parse(self.get_data(self.path), self.path)
            for node in _ast.walk(tree):
                if isinstance(node, _ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] in _PACKAGES:
                    node.module = f"{self.root}.{node.module}"
                elif isinstance(node, _ast.Import) and any(a.name.split(".")[0] in _PACKAGES for a in node.names):
                    raise ImportError(f"{self.path}, line {node.lineno}: import the repository's modules with "
                                      "'from ... import ...', which hubconf.py maps onto its private package")
            return compile(tree, self.path, "exec", dont_inherit=True)
        finally:
            if collecting:
                _gc.enable()


_PACKAGE = _package()
_entry = _importlib.import_module(_PACKAGE + ".models").entry

resnet18_ssl = _entry("resnet18_ssl")
resnet50_ssl = _entry("resnet50_ssl")
resnext50_32x4d_ssl = _entry("resnext50_32x4d_ssl")
resnext101_32x4d_ssl = _entry("resnext101_32x4d_ssl")
resnext101_32x8d_ssl = _entry("resnext101_32x8d_ssl")
resnext101_32x16d_ssl = _entry("resnext101_32x16d_ssl")
resnet18_swsl = _entry("resnet18_swsl")
resnet50_swsl = _entry("resnet50_swsl")
resnext50_32x4d_swsl = _entry("resnext50_32x4d_swsl")
resnext101_32x4d_swsl = _entry("resnext101_32x4d_swsl")
resnext101_32x8d_swsl = _entry("resnext101_32x8d_swsl")
resnext101_32x16d_swsl = _entry("resnext101_32x16d_swsl")
