"""README's hand-run example does what it says: run as written, against real engine-sims.

The script is README.md's own text. Extraction rule: the first ```sh block after the heading
"## Running the pieces by hand", from its first line that runs `twinroute engine-sim` to the end
of the block. The lines before it (`simulate`, `bench goodput`) take minutes and are covered by
their own tests; everything after it is the live system a user copy-pastes: engines, scheduler
and router started with `&`, the readiness wait, the long prompt sent twice, the SLO request,
the decision log, the metrics and the closing `kill`.

The example's fixed ports (8001, 8002, 8080, 50051, 9464) are replaced by free ones, matched as
whole numbers; each must still appear in the script, so a README that changes its ports fails
here instead of running on ports other tests or services may hold.

bash runs in a session (process group) of its own, with every background job in that group;
whatever the outcome, the group is terminated (then killed) at the end.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parent.parent
SECTION = "## Running the pieces by hand"
FIXED_PORTS = ("8001", "8002", "8080", "50051", "9464")
# The script waits for readiness itself; this bounds a hang (a process that never comes up).
RUN_TIMEOUT_S = 120.0
STOP_GRACE_S = 10.0


def live_script(readme: str) -> str:
    """The live part of the section's first sh block (see the module docstring)."""
    _, found, section = readme.partition("\n" + SECTION + "\n")
    assert found, f"README.md has no section {SECTION!r}"
    section = section.split("\n## ", 1)[0]
    block = re.search(r"^```sh\n(.*?)^```$", section, re.MULTILINE | re.DOTALL)
    assert block is not None, f"no ```sh block in {SECTION!r}"
    lines = block.group(1).splitlines()
    starts = [i for i, line in enumerate(lines) if "twinroute engine-sim" in line]
    assert starts, "the block starts no `twinroute engine-sim`"
    return "\n".join(lines[starts[0] :]) + "\n"


def free_ports(count: int) -> list[int]:
    """Distinct free ports (all bound at once, then released)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def with_ports(script: str, ports: dict[str, int]) -> str:
    for fixed, port in ports.items():
        pattern = rf"(?<![0-9]){fixed}(?![0-9])"
        assert re.search(pattern, script), f"the example no longer uses port {fixed}"
        script = re.sub(pattern, str(port), script)
    return script


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to bash's whole process group (its background jobs are in it too), SIGKILL
    to whatever is still running after a grace."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline and (process.poll() is None or group_alive(process.pid)):
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=STOP_GRACE_S)


def group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs (zombies, which nobody may reap in a
    container, do not count)."""
    proc = pathlib.Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after its ")".
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


def test_readme_example_shows_cache_affinity_and_cached_tokens() -> None:
    for tool in ("bash", "curl", "seq", "grep"):
        if shutil.which(tool) is None:
            pytest.skip(f"the README example needs {tool}")
    if not (ROOT / ".venv" / "bin" / "twinroute").exists():
        pytest.skip("the README example runs .venv/bin/twinroute, which is not installed")
    script = with_ports(
        live_script((ROOT / "README.md").read_text(encoding="utf-8")),
        dict(zip(FIXED_PORTS, free_ports(len(FIXED_PORTS)), strict=True)),
    )
    env = dict(os.environ)
    # The example's `python3` one-liner: the venv's interpreter if the host has none.
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen(
            ["bash", "-c", script],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            try:
                code = process.wait(timeout=RUN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                code = None
        finally:
            stop_group(process)
        output.seek(0)
        text = output.read().decode(errors="replace")
    shown = f"\n--- script ---\n{script}\n--- output ---\n{text}"
    assert code is not None, f"the example did not finish within {RUN_TIMEOUT_S:g} s{shown}"
    assert code == 0, f"the example exited {code}{shown}"

    # What the loop's grep prints for each of the two requests, in order.
    endpoints = re.findall(r"^x-twinroute-endpoint: (\S+)$", text, re.MULTILINE)
    reasons = re.findall(r"^x-twinroute-reason: (\S+)$", text, re.MULTILINE)
    cached = [int(n) for n in re.findall(r'^"cached_tokens": *(\d+)$', text, re.MULTILINE)]
    assert len(endpoints) == len(reasons) == len(cached) == 2, shown
    assert reasons[0] != "cache_affinity", shown
    assert reasons[1] == "cache_affinity", shown
    assert endpoints[0] == endpoints[1], shown
    assert cached[0] == 0, shown
    assert cached[1] == 799, shown  # what the README promises: all but the last token
    # The decision log agrees (newest first: the SLO request, then the two long prompts).
    decisions = re.findall(r"^(e[12]) ([a-z_]+) ", text, re.MULTILINE)
    assert len(decisions) == 3, shown
    assert decisions[1] == (endpoints[1], "cache_affinity"), shown
    assert decisions[2] == (endpoints[0], reasons[0]), shown
    # The metrics line ran against the live scheduler.
    assert re.search(r"^twinroute_scheduler_", text, re.MULTILINE), shown
