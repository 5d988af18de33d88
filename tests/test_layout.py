"""The package's shape: modules in one order along the data flow, each importing only modules before it (no
circle), and no file or function grown past what a reader takes in at once. docs/architecture.md explains it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "patchnet"

# Lowest first: a module may import only modules listed before it (a package after its own modules).
ORDER = [
    "patches",
    "features",
    "head",
    "training",
    "evaluation",
    "studies",
    "outputs",
    "errors",
    "threads",
    "files",
    "models",
    "checkpoint",
    "backbones.regions",
    "backbones.spec",
    "backbones.weights",
    "backbones.backbone",
    "backbones.lite",
    "backbones.quantize",
    "backbones.torchvision",
    "backbones.timm",
    "backbones",
    "recipe_detector",
    "recipe",
    "store.codec",
    "data.augment",
    "data.demo",
    "data.images",
    "data.records",
    "data.voc",
    "data.coco",
    "data.lists",
    "data.loader",
    "data.detect",
    "data",
    "patches.grid",
    "patches.labels",
    "patches.regions",
    "dist",
    "features.extract",
    "store.integrity",
    "store.readers",
    "store.chunks",
    "store.rows",
    "store.folder",
    "store.build",
    "store.verify",
    "store",
    "features.build",
    "training.unlock",
    "head.layers",
    "head.pooling",
    "evaluation.metrics",
    "head.calibration",
    "head.losses",
    "head.fusion",
    "head.mil",
    "outputs.figures",
    "studies.linear",
    "evaluation.scoring",
    "evaluation.maps",
    "evaluation.localize",
    "evaluation.predictor",
    "training.splits",
    "training.state",
    "outputs.heatmaps",
    "outputs.draw",
    "training.hooks",
    "training.detector",
    "training.trainer",
    "training.setup",
    "api",
    "outputs.results",
    "export",
    "studies.receptive",
    "features.stages",
    "studies.layers",
    "studies.units",
    "studies.retrieve",
    "cli.common",
    "cli.run",
    "cli.data",
    "cli.study",
    "cli.deploy",
    "cli",
    "cli.__main__",  # python -m patchnet.cli: runs the package
]
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name:
            out[name] = path
    return out


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(name: str, path: Path) -> set[str]:
    """The patchnet modules ``name`` imports, at module level or inside functions (not for type checking)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found, stack = set(), [ast.parse(path.read_text())]
    while stack:
        node = stack.pop()
        if _type_checking(node):
            continue
        stack.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] + ([node.module] if node.module else [])
            elif node.module and node.module.split(".")[0] == "patchnet":
                base = node.module.split(".")[1:]
            else:
                continue
            target = ".".join(p for part in base for p in part.split("."))
            modules = _modules()
            for alias in node.names:  # `from . import lite` names a module; `from .x import f` a member of x
                sub = f"{target}.{alias.name}" if target else alias.name
                found.add(sub if sub in modules else target)
    return {f for f in found if f and f != name}


def test_every_module_is_placed_in_the_order():
    assert sorted(_modules()) == sorted(ORDER)


@pytest.mark.parametrize("name", ORDER)
def test_a_module_imports_only_modules_below_it(name):
    path = _modules()[name]
    higher = sorted(m for m in imports(name, path) if ORDER.index(m) > ORDER.index(name))
    assert not higher, f"patchnet.{name} imports {', '.join(higher)}, listed after it"


@pytest.mark.parametrize("name", [m for m in ORDER if m == "store" or m.startswith("store.")])
def test_the_store_stores_and_never_runs_a_model(name):
    assert not imports(name, _modules()[name]) & {
        "model",
        "trainer",
        "unlock",
        "extract",
        "backbones",
        "features",
        "stages",
    }


def test_no_file_or_function_is_too_long_to_read():
    long = []
    for name, path in _modules().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_FILE_LINES:
            long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert not long, long
