"""Start and stop the server processes a live benchmark (or an end-to-end test) needs.

Our own servers print `... listening on [http://]HOST:PORT` once bound, so they start on port 0
and tell us their port; peer routers get a free port chosen here and are polled until a
readiness URL answers 200. Every process is stopped by its own id (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

import aiohttp

_LISTENING = re.compile(rb"listening on (?:https?://)?([\d.]+):(\d+)")


@dataclass(slots=True)
class ServerProcess:
    name: str
    process: asyncio.subprocess.Process
    address: str  # host:port
    announcement: str = ""  # the line that said where it listens (some name more addresses)

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def kill(self) -> None:
        """SIGKILL, as a crashing engine would go."""
        if self.process.returncode is None:
            self.process.kill()

    async def stop(self, *, grace_s: float = 5.0) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout=grace_s)
            except TimeoutError:
                self.kill()
                await self.process.wait()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def process_tree(pid: int) -> dict[int, str]:
    """`pid` and every process below it (Linux /proc), by pid: their command names (a gateway
    runs Envoy as its child, whose CPU counts too)."""
    tree: dict[int, str] = {}
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            with open(f"/proc/{current}/comm", encoding="utf-8") as handle:
                tree[current] = handle.read().strip()
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children", encoding="ascii") as handle:
                    pending.extend(int(child) for child in handle.read().split())
        except OSError:
            continue  # it exited meanwhile
    return tree


async def start_engine_sims(
    count: int, *, model: str, time_scale: float, logs: Path
) -> list[ServerProcess]:
    """`count` engine simulators on free ports (`engine-0`, ...), each logging to `logs`."""
    return list(
        await asyncio.gather(
            *(
                start_announced(
                    f"engine-{i}",
                    twinroute_argv(
                        "engine-sim", "--port=0", f"--model={model}",
                        f"--instance-id=engine-{i}", f"--time-scale={time_scale}",
                    ),
                    log_path=str(logs / f"engine-{i}.log"),
                )
                for i in range(count)
            )
        )
    )  # fmt: skip


def twinroute_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "twinroute", *args]


async def start_announced(
    name: str,
    argv: Sequence[str],
    *,
    timeout_s: float = 30.0,
    log_path: str | None = None,
) -> ServerProcess:
    """Start a server that prints `listening on [http://]HOST:PORT`; stderr goes to `log_path`.

    Without `log_path`, stderr is kept in an unnamed temporary file so that a server that
    exits before listening says why in the error."""
    stderr = _stderr_file(log_path)
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    except BaseException:
        stderr.close()
        raise
    assert process.stdout is not None
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                line = await process.stdout.readline()
                if not line:
                    await process.wait()
                    raise RuntimeError(
                        f"{name} exited with status {process.returncode} before listening "
                        f"(argv: {' '.join(argv)}); "
                        + (f"its stderr is in {log_path}" if log_path else _stderr_tail(stderr))
                    )
                match = _LISTENING.search(line)
                if match:
                    break
    except BaseException:
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise
    finally:
        stderr.close()
    # Nothing else is read from stdout; drain it so a chatty server never blocks on a pipe.
    asyncio.get_running_loop().create_task(_drain(process.stdout))
    address = f"{match.group(1).decode()}:{int(match.group(2))}"
    announcement = line.decode(errors="replace").strip()
    return ServerProcess(name=name, process=process, address=address, announcement=announcement)


async def start_polled(
    name: str,
    argv: Sequence[str],
    *,
    address: str,
    ready_path: str,
    timeout_s: float = 60.0,
    log_path: str | None = None,
    env: dict[str, str] | None = None,
) -> ServerProcess:
    """Start a server on a known address and poll `ready_path` until it answers 200."""
    log = _log_target(log_path)
    try:
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=log, stderr=log, env={**os.environ, **(env or {})}
        )
    finally:
        if not isinstance(log, int):
            log.close()
    server = ServerProcess(name=name, process=process, address=address)
    try:
        await wait_ready(f"http://{address}{ready_path}", timeout_s=timeout_s, process=process)
    except BaseException:
        await server.stop(grace_s=2.0)
        raise
    return server


async def wait_ready(
    url: str, *, timeout_s: float, process: asyncio.subprocess.Process | None = None
) -> None:
    timeout = aiohttp.ClientTimeout(total=2.0)
    async with aiohttp.ClientSession(timeout=timeout) as session, asyncio.timeout(timeout_s):
        while True:
            if process is not None and process.returncode is not None:
                raise RuntimeError(f"process exited ({process.returncode}) before {url} was ready")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.2)


def _stderr_file(log_path: str | None) -> IO[bytes]:
    """`log_path` to append to, or an unnamed temporary file to read back on failure."""
    return open(log_path, "ab") if log_path else tempfile.TemporaryFile()


def _stderr_tail(stderr: IO[bytes], limit: int = 4000) -> str:
    """The end of what a child wrote to `stderr` (a file of ours it shares)."""
    stderr.seek(0)
    text = stderr.read().decode(errors="replace")[-limit:].strip()
    return f"its stderr ends:\n{text}" if text else "its stderr is empty"


def _log_target(path: str | None) -> int | BinaryIO:
    """Where a child's output goes: appended to `path`, or discarded."""
    return open(path, "ab") if path else asyncio.subprocess.DEVNULL


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass
