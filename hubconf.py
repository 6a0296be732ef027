"""torch.hub entry points for the semi-supervised (ssl) and semi-weakly supervised (swsl) ImageNet-1k
ResNet and ResNeXt models of Yalniz et al., "Billion-scale semi-supervised learning for image
classification" (arXiv:1905.00546). ``torch.hub.help(repo, name)`` describes each one.
"""
import hashlib as _hashlib
import importlib as _importlib
import importlib.util as _importlib_util
import sys as _sys
from pathlib import Path as _Path

dependencies = ["torch"]


def _models():
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
        _sys.modules[name] = _importlib_util.module_from_spec(spec)
    return _importlib.import_module(name + ".models")


_entry = _models().entry

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
