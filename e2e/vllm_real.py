"""Real vLLM (CPU build) for end-to-end tests: install, a tiny local model, servers, KV events.

The harness itself (install, tiny model, `VllmServer`, metrics parsing) lives in the package,
`twinroute.bench.vllm_engines`, so `twinroute bench vllm` uses the same code; this module
re-exports it under the names the tests use and adds what only the tests need:

- `KvEventsRecorder`: a ZMQ subscriber (`record_kv_events.py`, run with the vLLM venv's
  python) that records the KV events a server publishes.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import subprocess
import sys
from types import TracebackType

import pytest

from twinroute.bench.vllm_engines import (
    BUILD_SCRIPT,
    INSTALL_SCRIPT,
    REQUIRED_METRICS,
    TINY_LLAMA_DIR,
    VLLM_VENV,
    MetricKey,
    TinyLlamaSpec,
    VllmHarnessError,
    VllmServer,
    VllmServerConfig,
    ensure_tiny_llama,
    ensure_vllm_installed,
    file_tail,
    free_port,
    metric_names,
    metric_total,
    parse_vllm_metrics,
    real_vllm_enabled,
    stop_process_group,
    vllm_installed,
    vllm_python,
)

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

__all__ = [
    "BUILD_SCRIPT",
    "INSTALL_SCRIPT",
    "REAL_VLLM_MARKS",
    "REPO_ROOT",
    "REQUIRED_METRICS",
    "TINY_LLAMA_DIR",
    "VLLM_VENV",
    "KvEventsRecorder",
    "MetricKey",
    "TinyLlamaSpec",
    "VllmHarnessError",
    "VllmServer",
    "VllmServerConfig",
    "ensure_tiny_llama",
    "ensure_vllm_installed",
    "free_port",
    "metric_names",
    "metric_total",
    "parse_vllm_metrics",
    "real_vllm_enabled",
    "vllm_installed",
    "vllm_python",
]


# What every real-vLLM test module sets as its `pytestmark`.
REAL_VLLM_MARKS = [
    pytest.mark.slow,
    pytest.mark.skipif(not real_vllm_enabled(), reason="real vLLM: set TWINROUTE_E2E_VLLM=1"),
]


class KvEventsRecorder:
    """Binds a ZMQ SUB socket on 127.0.0.1 (vLLM connects to it) and records KV events.

    Runs `record_kv_events.py` with the vLLM venv's python (pyzmq and msgspec live there), so
    the project needs neither. Start it before the server; `events()` reads what has arrived.
    """

    def __init__(
        self, *, out_path: pathlib.Path, port: int = 0, venv: pathlib.Path = VLLM_VENV
    ) -> None:
        self.port = port or free_port()
        self.out_path = out_path
        self._python = vllm_python(venv=venv)
        self._process: asyncio.subprocess.Process | None = None
        self._log_path = out_path.with_suffix(".log")

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    async def start(self, *, timeout_s: float = 30.0) -> None:
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        with self._log_path.open("wb") as log:
            self._process = await asyncio.create_subprocess_exec(
                str(self._python),
                str(REPO_ROOT / "e2e" / "record_kv_events.py"),
                f"--bind={self.endpoint}",
                f"--out={self.out_path}",
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )
        assert self._process.stdout is not None
        try:
            first_line = await asyncio.wait_for(self._process.stdout.readline(), timeout_s)
        except TimeoutError:
            first_line = b""
        if not first_line.startswith(b"bound"):
            await self.stop()
            raise VllmHarnessError(
                f"KV event recorder did not bind {self.endpoint}: {first_line!r}\n"
                + file_tail(self._log_path)
            )

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            await stop_process_group(process, grace_s=5.0)

    def batches(self) -> list[dict[str, object]]:
        """Every batch recorded so far: {topic, seq, ts, dp_rank, events}."""
        if not self.out_path.is_file():
            return []
        lines = self.out_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]

    async def __aenter__(self) -> KvEventsRecorder:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()


if __name__ == "__main__":
    # `python e2e/vllm_real.py` installs and builds; handy before a test run.
    ensure_vllm_installed(log_path=REPO_ROOT / ".tools" / "vllm-install.log")
    print(ensure_tiny_llama())
    sys.exit(0)
