"""The wheel must carry every subpackage: setuptools only ships what `packages` lists, and
operator/ and scheduler/ are mapped folders without `__init__.py`, so a forgotten entry would
install fine in development and break for users."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDER_TO_PACKAGE = {
    ROOT / "src" / "twinroute": "twinroute",
    ROOT / "scheduler": "twinroute.scheduler",
    ROOT / "operator": "twinroute.operator",
    ROOT / "proto" / "twinroute" / "v1": "twinroute.v1",
}


def source_packages() -> set[str]:
    packages = set()
    for folder, package in FOLDER_TO_PACKAGE.items():
        for module in folder.rglob("*.py"):
            if "__pycache__" in module.parts:
                continue
            relative = module.parent.relative_to(folder)
            packages.add(".".join([package, *relative.parts]))
    return packages


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("twinroute-*.whl")
    return zipfile.ZipFile(built)


@pytest.mark.slow
def test_wheel_contains_every_subpackage(wheel: zipfile.ZipFile) -> None:
    shipped = {
        str(Path(name).parent).replace("/", ".")
        for name in wheel.namelist()
        if name.endswith(".py")
    }
    missing = source_packages() - shipped
    assert not missing, f"add these to [tool.setuptools] packages: {sorted(missing)}"


@pytest.mark.slow
def test_wheel_never_ships_top_level_operator_or_scheduler(wheel: zipfile.ZipFile) -> None:
    top_level = {name.split("/")[0] for name in wheel.namelist()}
    assert "operator" not in top_level
    assert "scheduler" not in top_level
    assert "twinroute" in top_level


@pytest.mark.slow
def test_wheel_ships_the_bundled_trace_and_its_licence(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    assert "twinroute/data/mooncake_synthetic_trace.jsonl" in names
    assert "twinroute/data/LICENSE-mooncake-APACHE" in names
    assert "twinroute/v1/scheduler.proto" in names


def test_mapped_folders_have_no_init() -> None:
    # An __init__.py here would make `import operator` pick our folder from the repo root.
    assert not (ROOT / "operator" / "__init__.py").exists()
    assert not (ROOT / "scheduler" / "__init__.py").exists()


def test_stdlib_operator_still_wins_from_the_repo_root() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import operator; print(operator.__file__)"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    assert str(ROOT) not in result.stdout
