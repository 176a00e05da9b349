"""The package's folders are its layers: every import of one jaxad module by another points down."""

import ast
from pathlib import Path

import jaxad

PACKAGE = Path(jaxad.__file__).parent

# lower rank = lower layer; a module may import from a lower rank or from inside its own layer
RANKS = {
    "errors": 0, "runtime": 0, "deploy": 0,
    "config": 1,
    "checkpoint": 2,
    "data": 2, "backbones": 2, "features": 2,
    "distances": 3, "nets": 3, "postprocess": 3, "eval": 3,
    "train": 4,
    "methods": 5,
    "pipeline": 6, "cli": 6,
    "bench": 7, "export": 7,
}


def _layer(module: str) -> str:
    """'jaxad.methods.cpr.train' -> 'methods'."""
    return module.split(".")[1]


def _jaxad_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxad."):
            names.add(node.module)  # and each name, which may be a module: from jaxad.runtime import parallel
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module == "jaxad":
            names.update(f"jaxad.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("jaxad."))
    return names


def test_every_top_level_name_has_a_layer():
    top = {p.stem for p in PACKAGE.iterdir() if (p.suffix == ".py" or (p / "__init__.py").exists())}
    assert top - {"__init__"} == set(RANKS)


def test_no_import_points_up_or_across_layers():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts == ("__init__",):
            continue
        here = parts[0]
        for imported in _jaxad_imports(path):
            there = _layer(imported)
            if there != here and RANKS[there] >= RANKS[here]:
                upward.append(f"{path.relative_to(PACKAGE)} imports {imported}")
    assert not upward, "\n".join(upward)


def test_backbones_import_no_training_or_parallel_code():
    for path in (PACKAGE / "backbones").glob("*.py"):
        imported = _jaxad_imports(path)
        assert not {m for m in imported if m.startswith(("jaxad.train", "jaxad.runtime.parallel"))}, path
