"""The import-linter contracts in pyproject.toml bite: the tree as it is passes, and a
temporary violating import of each kind makes `lint-imports` fail, naming the contract.

The tree is copied into a scratch folder in the installed layout (`twinroute/`, with
`scheduler/`, `operator/` and `v1/` inside, the first two without `__init__.py` as installed),
so the violations never touch the checkout and the real contracts are read from pyproject.toml.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LINT_IMPORTS = pathlib.Path(sys.executable).parent / "lint-imports"

# contract name -> (file in the installed layout, the import that breaks it)
VIOLATIONS = {
    "operator and scheduler never import each other": (
        "operator/plan.py",
        "import twinroute.scheduler.types",
    ),
    "the routing core imports no transport, metrics, config or generated code": (
        "scheduler/ring.py",
        "import grpc",
    ),
    "the engine simulator does not import the router": (
        "enginesim/core.py",
        "import twinroute.router.server",
    ),
    "the router reaches the scheduler only through its API, client and builder": (
        "router/server.py",
        "import twinroute.scheduler.core",
    ),
    "no import cycles": ("bench/elastic_report.py", "import twinroute.bench.elastic"),
}


def installed_layout(into: pathlib.Path) -> pathlib.Path:
    package = into / "twinroute"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "src" / "twinroute", package, ignore=ignore)
    shutil.copytree(ROOT / "scheduler", package / "scheduler", ignore=ignore)
    shutil.copytree(ROOT / "operator", package / "operator", ignore=ignore)
    shutil.copytree(ROOT / "proto" / "twinroute" / "v1", package / "v1", ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", into / "pyproject.toml")
    return package


def lint_imports(tree: pathlib.Path) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo"],
        cwd=tree,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("imports")
    installed_layout(root)
    return root


def test_the_tree_keeps_every_contract(tree: pathlib.Path) -> None:
    result = lint_imports(tree)
    assert result.returncode == 0, result.stdout + result.stderr
    for contract in VIOLATIONS:
        assert f"{contract} KEPT" in result.stdout
    # The mapped packages are analysed, not skipped: the scheduler's modules are in the graph.
    assert f"Contracts: {len(VIOLATIONS)} kept, 0 broken." in result.stdout


@pytest.mark.parametrize(("contract", "violation"), VIOLATIONS.items(), ids=list(VIOLATIONS))
def test_a_violating_import_fails_the_build(
    tmp_path: pathlib.Path, contract: str, violation: tuple[str, str]
) -> None:
    path, statement = violation
    package = installed_layout(tmp_path)
    target = package / path
    target.write_text(target.read_text(encoding="utf-8") + f"\n{statement}  # probe\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert f"{contract} BROKEN" in result.stdout, result.stdout
    assert f"Contracts: {len(VIOLATIONS) - 1} kept, 1 broken." in result.stdout
