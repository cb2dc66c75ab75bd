"""The shape the codebase keeps (docs/design.md, "Where each part lives"): checked from the
source, so a regression fails here rather than in a reader's head.

- No function of the product code (everything but tests, e2e and the benchmarks' results) is
  longer than 120 lines: a longer one is an object in disguise.
- The router restates no type of the scheduler's API: it speaks `twinroute.scheduler.api`.
- The repository carries its own design: nothing points at material outside it (`shared/`) or
  at issue numbers.
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PRODUCT = ("src/twinroute", "scheduler", "operator", "proto/twinroute/v1")
MAX_FUNCTION_LINES = 120


def product_files() -> list[pathlib.Path]:
    return sorted(
        path
        for folder in PRODUCT
        for path in (ROOT / folder).rglob("*.py")
        if not path.name.endswith(("_pb2.py", "_pb2_grpc.py"))
    )


def test_no_function_is_longer_than_120_lines() -> None:
    long = []
    for path in product_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length})")
    assert long == []


def test_the_router_restates_no_scheduler_api_type() -> None:
    from twinroute.scheduler import api

    api_names = {name for name in api.__all__ if isinstance(getattr(api, name), type)}
    # Names the router used to copy from the API one to one.
    api_names |= {"PickQuery", "Placement", "Outcome", "ProgressEvent", "NoEndpointAvailable"}
    restated = []
    for path in sorted((ROOT / "src/twinroute/router").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            names: list[str] = []
            if isinstance(node, ast.ClassDef):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names = [node.target.id]
            restated += [f"{path.name}: {n}" for n in names if n in api_names]
    assert restated == []


OUTSIDE_POINTERS = re.compile(r"shared/|REFERENCE\.md|\bissues? #?\d+\b|(?<![\w/.])#\d{1,4}\b")


@pytest.mark.parametrize("folder", [*PRODUCT, "tests", "e2e", "docs", "charts", "benchmarks"])
def test_nothing_points_outside_the_repository(folder: str) -> None:
    offenders = []
    for path in sorted((ROOT / folder).rglob("*")):
        if path.suffix not in {".py", ".md", ".yaml", ".sh", ".proto", ".tpl", ".txt"}:
            continue
        if path.name.endswith(("_pb2.py", "_pb2_grpc.py")) or path == pathlib.Path(__file__):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if OUTSIDE_POINTERS.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []
