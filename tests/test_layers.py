"""Imports run one way, down the layers (docs/architecture.md): a module imports only from its own
package or from packages in a lower layer. Peers in one layer (data and models; the shared services)
import neither way. Every import counts, including the lazy ones inside functions, since they run too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (layer, the packages or modules in it), lowest first. A new top-level module must be placed here.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("package", ("pipeline",)),  # pipeline/__init__.py: the version string only
    ("config", ("pipeline.config",)),
    ("console", ("pipeline.console",)),  # what a person sees: notes, bars, tables (no pipeline imports)
    ("storage", ("pipeline.storage",)),  # local paths and URIs through one filesystem layer
    (
        "storage",
        ("pipeline.storage",),
    ),  # one filesystem for local paths and object storage, below every service using it
    (
        "services",
        (
            "pipeline.tracking",
            "pipeline.checkpoints",
            "pipeline.geometry",
            "pipeline.schedules",
            "pipeline.runtime",
            "pipeline.metrics",
        ),
    ),
    ("data, models", ("pipeline.data", "pipeline.models")),
    ("objectives", ("pipeline.objectives",)),
    ("train, ingest", ("pipeline.train", "pipeline.ingest")),
    ("eval", ("pipeline.eval",)),
    ("export", ("pipeline.export",)),  # a checkpoint's encoder out, its card reads eval results
    ("demo, study", ("pipeline.demo", "pipeline.study")),  # whole runs: ingest -> train -> eval
    ("study readouts", ("pipeline.study_curves",)),  # the curves study's trend and costs, from the study's rows
    ("cli", ("pipeline.cli",)),
]


def owner(module: str) -> tuple[int, str] | None:
    """(layer index, the table entry that owns `module`) by the longest matching entry."""
    best = None
    for index, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            # an entry holds itself and its submodules; the root package holds only itself
            inside = module == entry or (module.startswith(entry + ".") and entry != "pipeline")
            if inside and (best is None or len(entry) > len(best[1])):
                best = (index, entry)
    return best


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, name: str) -> list[tuple[int, str]]:
    """(line, absolute module) for every pipeline import in the file, relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pipeline import tracking` imports the module pipeline.tracking
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.append((node.lineno, child if owner(child) != owner(base) else base))
    return sorted({(line, mod) for line, mod in found if mod == "pipeline" or mod.startswith("pipeline.")})


def violations(root: Path = ROOT) -> list[str]:
    problems = []
    for path in sorted((root / "pipeline").rglob("*.py")):
        name = module_name(path, root)
        mine = owner(name)
        if mine is None:
            problems.append(f"{name}: not in the layer table (tests/test_layers.py LAYERS)")
            continue
        for line, target in imported_modules(path, name):
            theirs = owner(target)
            if theirs is None or theirs[1] == mine[1] or theirs[0] < mine[0]:
                continue  # unknown targets are reported as modules of their own
            how = "up" if theirs[0] > mine[0] else "sideways"
            problems.append(
                f"{path.relative_to(root)}:{line}: {name} ({LAYERS[mine[0]][0]}) imports {target} "
                f"({LAYERS[theirs[0]][0]}): {how} the layers"
            )
    return problems


def test_every_import_runs_down_the_layers():
    problems = violations()
    assert not problems, "imports against the layer order:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "package, source, expected",
    [
        ("objectives", "from pipeline.eval.job import run_eval\n", "up"),
        ("objectives", "def f():\n    from pipeline.train import loop\n", "up"),  # a lazy import counts too
        ("objectives", "import pipeline.eval.job\n", "up"),  # `import a.b`, not only `from a import b`
        ("models", "from pipeline.data.views import make_views\n", "sideways"),  # peers
        ("data", "from ..models import encoder\n", "sideways"),  # relative imports are resolved
        ("tracking_helpers", "import pipeline.checkpoints\n", "unplaced"),  # a package missing from the table
        ("objectives", "from pipeline.models.ab_model import images_to_float\nfrom pipeline import geometry\n", None),
    ],
)
def test_the_checker_catches_a_wrong_import(tmp_path, package, source, expected):
    """The checker itself, on a tree holding one planted module (a module's verdict reads only its own
    imports and the layer table, so the rest of the package need not be copied beside it)."""
    planted = tmp_path / "pipeline" / package / "planted.py"
    planted.parent.mkdir(parents=True)
    planted.write_text(source)
    found = violations(tmp_path)
    if expected is None:
        assert found == []
    elif expected == "unplaced":
        assert len(found) == 1 and "not in the layer table" in found[0], found
    else:
        assert len(found) == 1 and f": {expected} the layers" in found[0], found
