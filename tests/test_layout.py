"""The layout: commands over the library, imports that only go down the layers, no import circle, and one
way to import the repository's own modules. Every import counts, also those inside functions."""
import ast
import re
from pathlib import Path

import pytest

from .conftest import REPO

# Top first. A module may import from its own group and from any lower layer; groups that share a layer
# are independent of each other. A module belongs to the longest group name that prefixes its name.
LAYERS = (
    ("utils",),  # re-exports utils.optimize_for_inference
    ("utils.classify", "utils.evaluate", "utils.finetune", "utils.benchmark", "utils.export", "utils.cache",
     "utils.embed", "utils.probe"),
    ("utils.cli", "utils.training", "utils.features"),  # what the commands share; fine-tuning; frozen features
    ("models",),  # architectures, the registry, building a model, loading its weights and saving them for others
    ("utils.inference",),  # fast inference and export of any ResNet of torchvision's layout
    ("utils.system",),  # the machine and its processes: native precisions, timing, torchrun, accuracy counts
    ("utils.images", "utils.weights"),  # images in, tensors out; fetching and verifying checkpoints
    ("utils.pickling", "utils.replace", "utils.text"),  # crossing processes; whole files; listing in messages
)
PACKAGES = ("models", "utils")


def modules(root: Path = REPO) -> dict[str, str]:
    """The repository's modules by dotted name, with their source."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path.read_text(encoding="utf-8")
    return found


def imports(sources: dict[str, str]) -> tuple[dict[str, set[str]], list[str]]:
    """Each module's imports of the repository's modules, and the imports written any other way than
    ``from models... import`` / ``from utils... import``."""
    edges, other_ways = {name: set() for name in sources}, []
    for name, source in sources.items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Try) and any(_imports_ours(n) for n in node.body):
                other_ways.append(f"{name}, line {node.lineno}: an import inside try (the old pair of spellings)")
            if isinstance(node, ast.ImportFrom) and node.level:
                other_ways.append(f"{name}, line {node.lineno}: a relative import")
            elif isinstance(node, ast.Import) and any(a.name.split(".")[0] in PACKAGES for a in node.names):
                other_ways.append(f"{name}, line {node.lineno}: 'import {node.names[0].name}' (use from ... import)")
            elif isinstance(node, ast.ImportFrom) and node.module.split(".")[0] in PACKAGES:
                for alias in node.names:  # `from utils.weights import cache` imports the module utils.weights.cache
                    submodule = f"{node.module}.{alias.name}"
                    edges[name].add(submodule if submodule in sources else node.module)
    return edges, other_ways


def _imports_ours(node: ast.AST) -> bool:
    return (isinstance(node, ast.ImportFrom) and (node.level or node.module.split(".")[0] in PACKAGES)) or (
        isinstance(node, ast.Import) and any(a.name.split(".")[0] in PACKAGES for a in node.names))


def group_of(module: str) -> str:
    groups = [g for layer in LAYERS for g in layer if module == g or module.startswith(g + ".")]
    return max(groups, key=len)


def layer_of(group: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if group in layer)


def violations(edges: dict[str, set[str]]) -> list[str]:
    """Imports that go up a layer, or across to another group of the same layer."""
    found = []
    for module, targets in edges.items():
        for target in sorted(targets):
            here, there = group_of(module), group_of(target)
            if layer_of(there) < layer_of(here) or (layer_of(there) == layer_of(here) and there != here):
                found.append(f"{module} ({here}) imports {target} ({there})")
    return found


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected groups of modules (Tarjan), and modules importing themselves."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges.get(v, ()):
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_module_is_in_a_layer():
    unplaced = [m for m in modules() if group_of(m) == "utils" and m != "utils"]
    assert not unplaced, f"add these modules' package to LAYERS (and the README's layout section): {unplaced}"


def test_imports_only_go_down_the_layers():
    edges, _ = imports(modules())
    found = violations(edges)
    assert not found, "imports against the layers (LAYERS, top first):\n" + "\n".join(found)


def with_packages(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """``edges`` plus what importing a module also runs: the ``__init__`` of each package above it (of other
    packages than the importer's own)."""
    return {module: {parent for t in targets for parent in _parents(t) if not module.startswith(parent + ".")
                     and parent != module and parent in edges} for module, targets in edges.items()}


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def test_there_is_no_import_circle():
    """Counting the imports inside functions, and the package __init__ that each import runs."""
    edges, _ = imports(modules())
    found = circles(with_packages(edges))
    assert not found, "import circles (the modules of each):\n" + "\n".join(", ".join(c) for c in found)


def test_the_repository_imports_its_modules_one_way():
    """By their names in the clone, which hubconf.py maps onto its private package (relative imports and
    try/except pairs are what this replaces)."""
    _, other_ways = imports(modules())
    assert not other_ways, "\n".join(other_ways)


@pytest.mark.parametrize(("module", "line", "expected"), [
    ("models.resnet", "from utils.cli import positive", "models.resnet (models) imports utils.cli (utils.cli)"),
    ("utils.weights.cache", "from models.registry import WEIGHTS", "imports models.registry (models)"),
    ("utils.training.data", "from utils.cli import count", "imports utils.cli (utils.cli)"),
    ("utils.inference.fused", "def f():\n    from models.resnet import ResNet", "imports models.resnet (models)"),
])
def test_an_upward_or_sideways_import_is_caught(module, line, expected):
    sources = modules()
    sources[module] += "\n" + line + "\n"
    edges, _ = imports(sources)
    assert any(expected in v for v in violations(edges)), violations(edges)


def test_a_circle_is_caught():
    sources = modules()
    sources["utils.weights.download"] += "\ndef f():\n    from utils.weights.checkpoint import fetch\n"
    found = circles(with_packages(imports(sources)[0]))
    assert any({"utils.weights.checkpoint", "utils.weights.download"} <= set(c) for c in found)


def test_a_circle_through_a_package_init_is_caught():
    """utils/__init__.py imports utils.inference.optimize (on first use), and importing any utils module runs
    it: an import of models from utils/inference would close a circle through it."""
    sources = modules()
    sources["utils.inference.fold"] += "\nfrom models import WEIGHTS\n"
    found = circles(with_packages(imports(sources)[0]))
    assert any({"models", "utils", "utils.inference.fold"} <= set(c) for c in found)


def test_the_other_ways_to_import_are_caught():
    sources = modules()
    sources["utils.images.decode"] += ("\nfrom . import preprocess\nimport utils.weights\n"
                                       "try:\n    from ..models import WEIGHTS\nexcept ImportError:\n    pass\n")
    assert len(imports(sources)[1]) == 4  # relative twice (the second inside the try), import, try


def test_the_readme_names_every_layer_and_only_files_that_exist():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    named = [g for layer in LAYERS for g in layer]
    folders = {g: g.replace(".", "/") + ("/" if (REPO / g.replace(".", "/")).is_dir() else ".py") for g in named}
    folders["utils"] = "utils/__init__.py"
    missing = [folders[g] for g in named if f"`{folders[g]}`" not in readme]
    assert not missing, f"name each layer in the README's layout section: {missing}"
    # Every repository path the README gives in backquotes is a file or folder of the checkout.
    paths = set(re.findall(r"`((?:models|utils|tests|benchmarks|\.ci)/[\w./-]*)`", readme))
    assert paths and not [p for p in paths if not (REPO / p).exists()], [p for p in paths if not (REPO / p).exists()]
