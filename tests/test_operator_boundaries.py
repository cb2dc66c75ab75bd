"""`twinroute.operator` and `twinroute.scheduler` never import each other.

import-linter declares the same contract, but its module finder (grimp) skips `operator/` and
`scheduler/` because they are namespace portions under a regular package (they carry no
`__init__.py` by design), so the boundary is checked here from the source as well.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BOUNDARIES = {
    "operator": ("operator", "twinroute.scheduler"),
    "scheduler": ("scheduler", "twinroute.operator"),
}


def imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize(("folder", "forbidden"), BOUNDARIES.values(), ids=BOUNDARIES.keys())
def test_packages_stay_independent(folder: str, forbidden: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            m for m in imported_modules(path) if m == forbidden or m.startswith(forbidden + ".")
        )
        for path in (ROOT / folder).rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_operator_reads_shared_labels_not_scheduler_constants() -> None:
    imports = set().union(*(imported_modules(p) for p in (ROOT / "operator").rglob("*.py")))
    assert "twinroute.labels" in imports or "twinroute.labels" in {
        m.rsplit(".", 1)[0] for m in imports
    }
