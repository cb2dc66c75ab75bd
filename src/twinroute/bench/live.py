"""`twinroute bench live`: the same engines behind each router in turn, one trace, compared.

Method:
1. **Workload.** A Mooncake trace (default: the bundled synthetic one) becomes text prompts:
   each 512-token trace block becomes `--block-words` words derived from its hash id, so
   requests that share hash ids share a text prefix (and, through the engine's word-level
   tokenizer, cached KV blocks). Text is what every router accepts (sglang-router refuses
   token ids), so the routers compete on equal terms. The engines run with
   `--token-scale = 512 / block-words`: each word costs what 1/block-words of a trace block
   costs on the modelled hardware (`--profile`, default Llama-3-8B on an H100), so prompts are
   short on the wire but take realistic-relative prefill times in real time. Outputs are capped
   at `--max-output-tokens` (the router streams every token; long outputs would measure
   Python's chunk handling on this 2-core machine, not routing).
2. **Time.** `--duration` seconds of the trace's arrivals from `--trace-start-s` on,
   compressed `--speedup` times, are replayed open-loop by an async client (streaming
   requests; TTFT = first chunk).
3. **Routers**, each in front of `--engines` freshly started engine-sim processes (cold caches
   for everyone): twinroute with `dualmap` and with `round_robin`, sglang-router and
   vllm-router with `cache_aware`. Peers are pip-installed into `.tools/peers-venv` when
   missing (pinned: sglang-router 0.3.2, vllm-router 0.1.17).
4. **Measures**: client TTFT p50/p90/p99, SLO attainment (TTFT <= `--ttft-slo-s`), throughput
   (completed requests / replay wall time), engine-side prefix-cache hit rate (deltas of the
   engines' `vllm:prefix_cache_*` counters), load split (requests per engine), and router
   overhead = mean client TTFT minus mean engine-side TTFT (the engines' own histograms).

Writes `live.json` (`{"routers": {NAME: {...}}}`), `live.md` and PNG plots to `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from twinroute.bench import command_line
from twinroute.bench.pd_live import (
    PD_SUFFIX,
    engine_roles,
    parse_pd,
    pd_table,
    plot_pd,
    role_flags,
    write_endpoints,
)
from twinroute.formatting import percent, seconds

ROUTERS = ("twinroute_dualmap", "twinroute_round_robin", "sglang_cache_aware", "vllm_cache_aware")
PEERS = {"sglang": "sglang-router==0.3.2", "vllm": "vllm-router==0.1.17"}
PEERS_VENV = Path(".tools/peers-venv")
MODEL = "twinroute-sim"
# A twinroute router named with this suffix runs with --offload=off (for comparison).
INLINE_SUFFIX = "_inline"
# A twinroute router named with this suffix does not follow the engines' KV events (real
# vLLM engines only): its cache lookups are the approximate record of its own decisions.
APPROX_SUFFIX = "_approx"
# `twinroute gateway --embedded` (Envoy + the endpoint picker, dualmap); a suffix names the
# processing mode other than lean: `twinroute_envoy_full`, `twinroute_envoy_gie`.
ENVOY_PREFIX = "twinroute_envoy"
TRACE_BLOCK_TOKENS = 512
# `--admission-hold on`: the longest a scheduler holds a Pick answer.
ADMISSION_MAX_HOLD_S = 3.0


def _default_trace() -> Path:
    from importlib.resources import files

    return Path(str(files("twinroute.data") / "mooncake_synthetic_trace.jsonl"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from twinroute.simulator.profiles import INSTANCE_PROFILES

    parser.add_argument(
        "--trace", type=Path, default=None,
        help="Mooncake JSONL trace (default: the bundled synthetic one)",
    )  # fmt: skip
    parser.add_argument(
        "--engines", type=int, default=4, help="engine-sim processes, started afresh per router"
    )
    parser.add_argument(
        "--routers",
        default=",".join(ROUTERS),
        help=f"comma-separated, from {', '.join(ROUTERS)}, and {ENVOY_PREFIX}[_full|_gie] "
        "(Envoy with the endpoint picker)",
    )
    parser.add_argument(
        "--duration", type=float, default=120.0, help="seconds of replay (wall clock) per router"
    )
    parser.add_argument(
        "--speedup", type=float, default=1.0,
        help="arrival-time compression of the trace (2 = twice its request rate)",
    )  # fmt: skip
    parser.add_argument(
        "--trace-start-s", type=float, default=0.0,
        help="replay the trace from this many seconds in (trace time); later windows of a "
        "trace reuse more prefixes",
    )  # fmt: skip
    parser.add_argument("--ttft-slo-s", type=float, default=2.0, help="TTFT SLO in seconds")
    parser.add_argument(
        "--block-words", type=int, default=16,
        help="prompt words per 512-token trace block; must divide 512 (each word costs "
        "512/N model tokens)",
    )  # fmt: skip
    parser.add_argument(
        "--max-output-tokens", type=int, default=32, help="cap on each request's output tokens"
    )
    parser.add_argument(
        "--profile", default="llama3-8b-h100", choices=sorted(INSTANCE_PROFILES),
        help="engine-sim --profile: the hardware and model the engines simulate",
    )  # fmt: skip
    parser.add_argument(
        "--kv-capacity-tokens", type=int, default=None,
        help="engine KV memory in model tokens (default: the profile's)",
    )  # fmt: skip
    parser.add_argument(
        "--time-scale", type=float, default=1.0,
        help="engine-sim --time-scale: wall seconds per modelled second",
    )  # fmt: skip
    parser.add_argument(
        "--request-timeout", type=float, default=300.0,
        help="seconds a request may take before it counts as an error",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    parser.add_argument(
        "--out", type=Path, default=Path("results/live"),
        help="folder for live.json, live.md, the PNG plots and the processes' logs",
    )  # fmt: skip
    parser.add_argument(
        "--pd", default=None, metavar="P:D",
        help="also run each twinroute router as NAME+pd over P prefill and D decode engines "
        "(P + D = --engines; twinroute.bench.pd_live)",
    )  # fmt: skip
    parser.add_argument(
        "--admission-hold", choices=("on", "off"), default="off",
        help="twinroute: the scheduler (gRPC or embedded) holds hotspot requests so that "
        "rebalancing can move them (`twinroute scheduler|router --admission-hold`)",
    )  # fmt: skip
    parser.add_argument(
        "--twinroute-scheduler", choices=("grpc", "embedded"), default="embedded",
        help="twinroute: a `twinroute scheduler` process + router, or the router's --embedded",
    )  # fmt: skip


# -- workload ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Workload:
    """The replayed requests as arrays (never one Python object per request)."""

    arrival_s: npt.NDArray[np.float64]
    prompt_words: npt.NDArray[np.int64]
    output_tokens: npt.NDArray[np.int64]
    block_offsets: npt.NDArray[np.int64]
    block_ids: npt.NDArray[np.int64]
    block_words: int

    def __len__(self) -> int:
        return int(self.arrival_s.shape[0])

    def prompt(self, index: int) -> str:
        """Request `index`'s prompt text: each trace block's words derive from its hash id."""
        blocks = self.block_ids[self.block_offsets[index] : self.block_offsets[index + 1]]
        remaining = int(self.prompt_words[index])
        words: list[str] = []
        for block_id in blocks.tolist():
            take = min(self.block_words, remaining)
            words.extend(f"b{block_id}w{j}" for j in range(take))
            remaining -= take
            if remaining <= 0:
                break
        return " ".join(words)


def load_workload(
    *,
    trace: Path,
    duration_s: float,
    speedup: float,
    block_words: int,
    max_output: int,
    start_s: float = 0.0,
) -> Workload:
    """The trace's requests that arrive in [`start_s`, `start_s` + `duration_s` x `speedup`)
    of trace time, their arrivals made relative to `start_s` and divided by `speedup`."""
    from twinroute.simulator.traces import read_mooncake

    scale = TRACE_BLOCK_TOKENS // block_words
    arrivals: list[npt.NDArray[np.float64]] = []
    words: list[npt.NDArray[np.int64]] = []
    outputs: list[npt.NDArray[np.int64]] = []
    offsets: list[npt.NDArray[np.int64]] = []
    blocks: list[npt.NDArray[np.int64]] = []
    base = 0
    for chunk in read_mooncake(trace):
        arrival = (chunk.arrival_s - start_s) / speedup
        # Arrivals are sorted, so the window is one slice [first, last) of the chunk.
        first = int(np.searchsorted(arrival, 0.0, side="left"))
        last = int(np.searchsorted(arrival, duration_s, side="left"))
        if first == last:
            if last < len(chunk):
                break
            continue
        arrivals.append(arrival[first:last])
        words.append(np.maximum(1, -(-chunk.prompt_tokens[first:last] // scale)))
        outputs.append(np.clip(chunk.output_tokens[first:last], 1, max_output))
        begin, end = int(chunk.block_offsets[first]), int(chunk.block_offsets[last])
        offsets.append(chunk.block_offsets[first:last] - begin + base)
        blocks.append(chunk.block_ids[begin:end])
        base += end - begin
        if last < len(chunk):
            break
    if not arrivals:
        raise ValueError(
            f"no request of {trace.name} arrives in the window from {start_s:g} s of the trace "
            f"({duration_s:g} s x speedup {speedup:g})"
        )
    return Workload(
        arrival_s=np.concatenate(arrivals),
        prompt_words=np.concatenate(words),
        output_tokens=np.concatenate(outputs),
        block_offsets=np.concatenate([*offsets, np.asarray([base], dtype=np.int64)]),
        block_ids=np.concatenate(blocks),
        block_words=block_words,
    )


# -- replay -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Replay:
    ttft_s: npt.NDArray[np.float64]  # NaN where the request failed
    errors: int
    wall_s: float
    error_samples: list[str] = field(default_factory=list)
    # Seconds per output token after the first (NaN: failed, or one token only).
    tpot_s: npt.NDArray[np.float64] | None = None


async def replay(
    *, url: str, workload: Workload, timeout_s: float, progress_every_s: float = 15.0
) -> Replay:
    import aiohttp

    ttft = np.full(len(workload), np.nan)
    tpot = np.full(len(workload), np.nan)
    errors = 0
    samples: list[str] = []
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def send(index: int, session: aiohttp.ClientSession) -> None:
        nonlocal errors
        body = {
            "model": MODEL,
            "prompt": workload.prompt(index),
            "max_tokens": int(workload.output_tokens[index]),
            "stream": True,
        }
        started = time.monotonic()
        first: float | None = None
        tail = b""
        tokens = 0
        try:
            async with session.post(f"{url}/v1/completions", json=body) as response:
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:200]}")
                async for chunk in response.content.iter_any():
                    if first is None:
                        first = time.monotonic() - started
                    tail = (tail + chunk)[-256:]
                    tokens += chunk.count(b'"finish_reason":null')
            if b"[DONE]" not in tail or b'"error"' in tail:
                raise RuntimeError(f"stream ended without [DONE]: {tail[-120:]!r}")
            ttft[index] = first if first is not None else math.nan
            if first is not None and tokens > 1:
                tpot[index] = (time.monotonic() - started - first) / (tokens - 1)
        except Exception as error:  # every failure is counted, none is lost
            errors += 1
            if len(samples) < 5:
                samples.append(f"{type(error).__name__}: {error}")

    start = time.monotonic()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks: list[asyncio.Task[None]] = []
        next_report = progress_every_s
        for index in range(len(workload)):
            delay = start + float(workload.arrival_s[index]) - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(index, session)))
            elapsed = time.monotonic() - start
            if elapsed >= next_report:
                done = sum(t.done() for t in tasks)
                print(
                    f"    {elapsed:5.0f}s: sent {index + 1}/{len(workload)}, done {done}, "
                    f"errors {errors}",
                    flush=True,
                )
                next_report += progress_every_s
        await asyncio.gather(*tasks)
    return Replay(
        ttft_s=ttft,
        errors=errors,
        wall_s=time.monotonic() - start,
        error_samples=samples,
        tpot_s=tpot,
    )


# -- engines' metrics -------------------------------------------------------------------------


async def scrape(urls: Sequence[str]) -> list[dict[str, float]]:
    import aiohttp

    wanted = {
        "vllm:prefix_cache_queries_total": "queries",
        "vllm:prefix_cache_hits_total": "hits",
        "vllm:time_to_first_token_seconds_sum": "ttft_sum",
        "vllm:time_to_first_token_seconds_count": "ttft_count",
        # Disaggregated runs (0 on engines without a KV role).
        "twinroute_engine_kv_transfers_total": "kv_transfers",
        "twinroute_engine_kv_transfer_seconds_sum": "kv_transfer_s",
        "twinroute_engine_remote_prefills_total": "remote_prefills",
    }
    results: list[dict[str, float]] = []
    async with aiohttp.ClientSession() as session:
        for url in urls:
            async with session.get(f"{url}/metrics") as response:
                text = await response.text()
            values = {name: 0.0 for name in wanted.values()}
            for line in text.splitlines():
                name = line.split("{", 1)[0].split(" ", 1)[0]
                if name in wanted:
                    values[wanted[name]] = float(line.rsplit(" ", 1)[1])
            results.append(values)
    return results


# -- routers ----------------------------------------------------------------------------------


def ensure_peers(names: Sequence[str]) -> None:
    """Install the peer routers into their own venv when missing (pip, pinned versions)."""
    import subprocess
    import venv

    needed = {PEERS[n.partition("_")[0]] for n in names if n.partition("_")[0] in PEERS}
    missing = sorted(p for p in needed if not (PEERS_VENV / "bin" / p.split("==")[0]).exists())
    if not missing:
        return
    print(f"installing {', '.join(missing)} into {PEERS_VENV} ...", flush=True)
    if not (PEERS_VENV / "bin" / "pip").exists():
        venv.create(PEERS_VENV, with_pip=True)
    # pip's chatter only when it fails (then it says why: no network, no wheel here).
    install = subprocess.run(
        [str(PEERS_VENV / "bin" / "pip"), "install", "-q", *missing],
        capture_output=True,
        text=True,
    )
    if install.returncode != 0:
        print(install.stdout[-2000:] + install.stderr[-2000:], file=sys.stderr, flush=True)
        raise subprocess.CalledProcessError(install.returncode, install.args)


@dataclass(frozen=True, slots=True)
class TextShape:
    """How text prompts map to model tokens, so twinroute's TTFT model sees real lengths."""

    tokens_per_char: float = 0.25
    key_block_chars: int = 64


def text_shape(workload: Workload, *, token_scale: int, sample: int = 200) -> TextShape:
    """Measured on the first `sample` prompts: model tokens per character, and characters per
    engine block (a prefix-key block then spans about one engine cache block)."""
    count = min(sample, len(workload))
    chars = sum(len(workload.prompt(i)) for i in range(count))
    words = int(workload.prompt_words[:count].sum())
    return TextShape(
        tokens_per_char=words * token_scale / chars,
        key_block_chars=max(1, round(chars / words * workload.block_words)),
    )


async def start_router(
    name: str,
    *,
    engine_urls: Sequence[str],
    logs: Path,
    scheduler_mode: str,
    slo_s: float,
    shape: TextShape = TextShape(),
    admission_hold: bool = False,
    endpoints_file: Path | None = None,
    router_args: Sequence[str] = (),
) -> list[Any]:
    """Start `name` (`twinroute|sglang|vllm` + `_` + policy) in front of the engines; returns
    its processes, the router last. A twinroute name ending in `_inline` runs with
    `--offload=off` (long prompts tokenized and hashed on the event loop), for comparison;
    `router_args` go to twinroute routers as they are."""
    from twinroute.bench.processes import (
        free_port,
        start_announced,
        start_polled,
        twinroute_argv,
    )

    log = str(logs / f"{name}.log")
    if name.startswith(ENVOY_PREFIX):
        processing = name.removeprefix(ENVOY_PREFIX).removeprefix("_") or "lean"
        endpoints = ",".join(
            f"engine-{i}={u.removeprefix('http://')}" for i, u in enumerate(engine_urls)
        )
        argv = twinroute_argv(
            "gateway", "--port=0", f"--model={MODEL}", f"--endpoints={endpoints}",
            "--embedded", "--policy=dualmap", f"--processing={processing}",
            f"--ttft-slo-s={slo_s}", f"--key-block-chars={shape.key_block_chars}",
            f"--tokens-per-char={shape.tokens_per_char:.4f}", "--access-log=",
            *router_args,
        )  # fmt: skip
        return [await start_announced(name, argv, log_path=log, timeout_s=60)]
    if name.startswith("twinroute_"):
        inline = name.endswith(INLINE_SUFFIX)
        policy = (
            name.removeprefix("twinroute_")
            .removesuffix(INLINE_SUFFIX)
            .removesuffix(PD_SUFFIX)
            .removesuffix(APPROX_SUFFIX)
        )
        endpoints = ",".join(
            f"engine-{i}={u.removeprefix('http://')}" for i, u in enumerate(engine_urls)
        )
        common = [
            "--port=0",
            f"--model={MODEL}",
            f"--endpoints={endpoints}",
            f"--tokens-per-char={shape.tokens_per_char:.4f}",
            *(["--offload=off"] if inline else []),
            *router_args,
        ]
        if scheduler_mode == "embedded":
            argv = twinroute_argv(
                "router", *common, "--embedded", f"--policy={policy}",
                f"--ttft-slo-s={slo_s}", f"--key-block-chars={shape.key_block_chars}",
                f"--admission-hold={'on' if admission_hold else 'off'}",
            )  # fmt: skip
            return [await start_announced(name, argv, log_path=log)]
        scheduler = await start_announced(
            f"{name}-scheduler",
            twinroute_argv(
                "scheduler",
                "--listen=127.0.0.1:0",
                "--metrics-listen=",
                f"--policy={policy}",
                f"--model={MODEL}",
                # An endpoints file names each engine's role (`--pd`).
                f"--endpoints-file={endpoints_file}"
                if endpoints_file is not None
                else f"--static-endpoints={endpoints}",
                f"--ttft-slo-s={slo_s}",
                f"--key-block-chars={shape.key_block_chars}",
                f"--tokens-per-char={shape.tokens_per_char:.4f}",
                f"--admission-hold={'on' if admission_hold else 'off'}",
                f"--admission-max-hold-s={ADMISSION_MAX_HOLD_S}",
            ),
            log_path=str(logs / f"{name}-scheduler.log"),
        )
        # A held Pick must not outlive the router's deadline for it.
        timeout = ADMISSION_MAX_HOLD_S + 1.0 if admission_hold else 1.0
        argv = twinroute_argv(
            "router",
            *common,
            f"--scheduler={scheduler.address}",
            f"--scheduler-timeout-s={timeout}",
        )
        return [scheduler, await start_announced(name, argv, log_path=log)]
    port, metrics_port = free_port(), free_port()
    peer, _, policy = name.partition("_")
    flags = [
        "--worker-urls",
        *engine_urls,
        f"--policy={policy}",
        "--host=127.0.0.1",
        f"--port={port}",
        "--prometheus-host=127.0.0.1",
        f"--prometheus-port={metrics_port}",
    ]
    if peer == "sglang":
        argv = [str(PEERS_VENV / "bin" / "sglang-router"), "launch", *flags]
        ready = "/readiness"  # sglang answers /health before its workers are registered
    elif peer == "vllm":
        argv = [str(PEERS_VENV / "bin" / "vllm-router"), *flags]
        ready = "/health"
    else:
        raise ValueError(f"unknown router {name!r}")
    return [
        await start_polled(name, argv, address=f"127.0.0.1:{port}", ready_path=ready, log_path=log)
    ]


async def run_one(name: str, args: argparse.Namespace, workload: Workload) -> dict[str, Any]:
    from twinroute.bench.processes import start_announced, twinroute_argv

    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    scale = TRACE_BLOCK_TOKENS // args.block_words
    engine_args = [
        "--port=0",
        f"--model={MODEL}",
        f"--profile={args.profile}",
        f"--block-size={args.block_words}",
        f"--token-scale={scale}",
        f"--time-scale={args.time_scale}",
    ]
    if args.kv_capacity_tokens:
        engine_args.append(f"--kv-capacity-tokens={args.kv_capacity_tokens}")
    disaggregated = name.endswith(PD_SUFFIX)
    roles = engine_roles(parse_pd(args.pd)) if disaggregated else ["unified"] * args.engines
    engines = await asyncio.gather(
        *(
            start_announced(
                f"engine-{i}",
                twinroute_argv(
                    "engine-sim", *engine_args, f"--instance-id=engine-{i}", *role_flags(roles[i])
                ),
                log_path=str(logs / f"{name}-engine-{i}.log"),
            )
            for i in range(args.engines)
        )
    )
    processes: list[Any] = list(engines)
    try:
        urls = [e.url for e in engines]
        endpoints_file = (
            write_endpoints(logs / f"{name}-endpoints.yaml", urls=urls, roles=roles, model=MODEL)
            if disaggregated
            else None
        )
        router = await start_router(
            name,
            engine_urls=urls,
            logs=logs,
            # Roles reach the scheduler through its endpoints file (a scheduler process).
            scheduler_mode="grpc" if disaggregated else args.twinroute_scheduler,
            endpoints_file=endpoints_file,
            slo_s=args.ttft_slo_s,
            shape=text_shape(workload, token_scale=scale),
            admission_hold=args.admission_hold == "on",
        )
        processes.extend(router)
        before = await scrape(urls)
        result = await replay(url=router[-1].url, workload=workload, timeout_s=args.request_timeout)
        after = await scrape(urls)
    finally:
        await asyncio.gather(*(p.stop() for p in reversed(processes)))
    return summarize(result, before=before, after=after, slo_s=args.ttft_slo_s)


def summarize(
    result: Replay, *, before: list[dict[str, float]], after: list[dict[str, float]], slo_s: float
) -> dict[str, Any]:
    ttft = result.ttft_s
    ok = ttft[~np.isnan(ttft)]
    total = len(ttft)

    def delta(key: str) -> list[float]:
        return [a[key] - b[key] for a, b in zip(after, before, strict=True)]

    queries, hits = sum(delta("queries")), sum(delta("hits"))
    engine_ttft_count = sum(delta("ttft_count"))
    engine_ttft_mean = sum(delta("ttft_sum")) / engine_ttft_count if engine_ttft_count else 0.0
    per_engine = delta("ttft_count")

    def pct(q: float) -> float | None:
        return float(np.percentile(ok, q)) if len(ok) else None

    mean_load = sum(per_engine) / len(per_engine) if per_engine else 0.0
    return {
        "requests": total,
        "ttft_p50_s": pct(50),
        "ttft_p90_s": pct(90),
        "ttft_p99_s": pct(99),
        "ttft_mean_s": float(ok.mean()) if len(ok) else None,
        # Failed requests count as missing the SLO.
        "slo_attainment": float((ok <= slo_s).sum() / total) if total else 0.0,
        "throughput_rps": len(ok) / result.wall_s if result.wall_s else 0.0,
        # None: no engine was asked (nothing answered), not a hit rate of zero.
        "cache_hit_rate": hits / queries if queries else None,
        "errors": result.errors,
        "error_samples": result.error_samples,
        "router_overhead_ms": (float(ok.mean()) - engine_ttft_mean) * 1000 if len(ok) else None,
        "requests_per_engine": per_engine,
        "max_over_mean_load": max(per_engine) / mean_load if mean_load else None,
        "ttft_s": [round(float(x), 4) for x in ttft],
        **_tpot_and_transfers(result, delta),
    }


def _tpot_and_transfers(result: Replay, delta: Any) -> dict[str, Any]:
    """TPOT percentiles from the client's streams; KV transfer counters (`--pd`)."""
    figures: dict[str, Any] = {
        "kv_transfers": sum(delta("kv_transfers")),
        "kv_transfer_s": sum(delta("kv_transfer_s")),
        "remote_prefills": sum(delta("remote_prefills")),
    }
    tpot = result.tpot_s
    ok = tpot[~np.isnan(tpot)] if tpot is not None else np.empty(0)
    for q in (50, 90):
        figures[f"tpot_p{q}_s"] = float(np.percentile(ok, q)) if len(ok) else None
    figures["tpot_mean_s"] = float(ok.mean()) if len(ok) else None
    figures["tpot_s"] = [round(float(x), 5) for x in ok]
    return figures


# -- report -----------------------------------------------------------------------------------


# What each router is, for people: bench names are for the command line and the JSON.
LABELS = {
    "twinroute_dualmap": "twinroute router (dualmap)",
    "twinroute_round_robin": "round robin (a Kubernetes Service)",
    "twinroute_consistent_hash": "plain prefix hash",
    "twinroute_envoy": "twinroute via Envoy (endpoint picker)",
    "twinroute_envoy_full": "twinroute via Envoy (picker sees responses)",
    "twinroute_envoy_gie": "twinroute via Envoy (GIE full duplex)",
    "sglang_cache_aware": "sglang-router (cache_aware)",
    "vllm_cache_aware": "vllm-router (cache_aware)",
}
# One colour per router in every plot, so a router is the same colour everywhere.
COLOURS = {
    "twinroute_dualmap": "tab:blue",
    "twinroute_envoy": "tab:cyan",
    "twinroute_round_robin": "tab:grey",
    "sglang_cache_aware": "tab:orange",
    "vllm_cache_aware": "tab:green",
}
_SPARE_COLOURS = ("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:red")


def label(name: str) -> str:
    return LABELS.get(name, name)


def colours(names: Sequence[str]) -> dict[str, str]:
    spare = iter(_SPARE_COLOURS * (1 + len(names) // len(_SPARE_COLOURS)))
    return {name: COLOURS.get(name) or next(spare) for name in names}


def window_reuse(workload: Workload) -> float:
    """The share of prompt words that repeat an earlier request of the same window, block by
    leading block (a cache that starts empty and never evicts, as the engines' counters see
    it: the last prompt token is always computed). No router can hit more from cold caches."""
    seen: set[int] = set()
    reused = total = 0
    for index in range(len(workload)):
        blocks = workload.block_ids[
            workload.block_offsets[index] : workload.block_offsets[index + 1]
        ].tolist()
        words = int(workload.prompt_words[index])
        matched = 0
        for block in blocks:
            if block not in seen:
                break
            matched += 1
        reused += min(words - 1, matched * workload.block_words)
        total += words
        seen.update(blocks)
    return reused / total if total else 0.0


def table(results: dict[str, dict[str, Any]], *, slo_s: float) -> str:
    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [
        f"| router | TTFT p50 (s) | p90 (s) | p99 (s) | SLO {slo_s:g}s met | throughput (req/s) "
        "| cache hit rate | errors | overhead (ms) | max/mean load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {fmt(r['ttft_p50_s'], '.3f')} | {fmt(r['ttft_p90_s'], '.3f')} "
            f"| {fmt(r['ttft_p99_s'], '.3f')} | {r['slo_attainment']:.1%} "
            f"| {r['throughput_rps']:.2f} | {fmt(r['cache_hit_rate'], '.1%')} | {r['errors']} "
            f"| {fmt(r['router_overhead_ms'], '.1f')} | {fmt(r['max_over_mean_load'], '.2f')} |"
        )
    return "\n".join(lines)


def plot(
    results: dict[str, dict[str, Any]],
    *,
    out: Path,
    slo_s: float,
    reuse_in_window: float | None = None,
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    colour = colours(names)
    paths: list[Path] = []
    figure, axis = plt.subplots(figsize=(8, 4.8))
    for name, r in results.items():
        ttft = np.sort(np.asarray([x for x in r["ttft_s"] if not math.isnan(x)]))
        if len(ttft):
            share = 100 * np.arange(1, len(ttft) + 1) / r["requests"]
            axis.plot(ttft, share, label=label(name), color=colour[name], linewidth=1.8)
    axis.axvline(slo_s, color="black", linestyle="--", linewidth=1, label=f"SLO {slo_s:g} s")
    axis.set_xscale("log")
    axis.set_ylim(0, 101)
    axis.set_xlabel("time to first token, client side (s, log scale)")
    axis.set_ylabel("requests answered by then (%)")
    axis.set_title(
        "Live: share of requests whose first token came within x seconds\n"
        "(same engines, same requests; further up and left is better)",
        fontsize=10,
    )
    axis.legend(fontsize=8, loc="lower right")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    paths.append(out / "live_ttft_cdf.png")
    figure.savefig(paths[-1], dpi=120)
    plt.close(figure)

    figure, axes = plt.subplots(1, 4, figsize=(15, 4.6))
    panels: list[tuple[str, str, str, float]] = [
        ("slo_attainment", f"within the {slo_s:g} s TTFT SLO", "requests (%)", 100.0),
        ("ttft_p50_s", "median TTFT", "seconds", 1.0),
        ("cache_hit_rate", "prompt tokens found cached", "prompt tokens (%)", 100.0),
        ("max_over_mean_load", "busiest engine's share of requests", "max / mean", 1.0),
    ]
    hints = ("higher is better", "lower is better", "higher is better", "lower is better; 1 = even")
    positions = range(len(names))
    for axis, (key, title, unit, factor), hint in zip(axes, panels, hints, strict=True):
        measured = [results[n][key] for n in names]
        # A router that answered nothing has no bar and says so (a 0 would read as best).
        values = [factor * v if v is not None else 0.0 for v in measured]
        bars = axis.bar(positions, values, color=[colour[n] for n in names])
        shown = [
            "no answers" if m is None else f"{v:.1f}%" if factor == 100.0 else f"{v:.3g}"
            for m, v in zip(measured, values, strict=True)
        ]
        axis.bar_label(bars, labels=shown, fontsize=8, padding=2)
        axis.set_xticks(list(positions), [label(n) for n in names], rotation=30, ha="right",
                        fontsize=8)  # fmt: skip
        axis.set_title(f"{title}\n({hint})", fontsize=10)
        axis.set_ylabel(unit)
        axis.grid(axis="y", alpha=0.3)
        top = max(values, default=0.0)
        if factor == 100.0:
            axis.set_ylim(0, 105)
        else:
            axis.set_ylim(0, top * 1.2 if top else 1.0)
        if key == "cache_hit_rate" and reuse_in_window is not None:
            axis.axhline(
                100 * reuse_in_window, color="black", linestyle="--", linewidth=1,
                label=f"the most any router can hit\nhere: {100 * reuse_in_window:.1f}%",
            )  # fmt: skip
            axis.legend(fontsize=7, loc="upper right")
        if key == "max_over_mean_load":
            axis.axhline(1.0, color="black", linestyle=":", linewidth=1)
    figure.suptitle("Live: the same requests through each router, to the same engines", fontsize=11)
    figure.tight_layout()
    paths.append(out / "live_summary.png")
    figure.savefig(paths[-1], dpi=120)
    plt.close(figure)
    return paths


def drop_empty_logs(folder: Path) -> None:
    """Logs nobody wrote to say nothing; an empty folder goes too."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.is_file() and path.stat().st_size == 0:
            path.unlink()
    if not any(folder.iterdir()):
        folder.rmdir()


def _stop_on_sigterm() -> None:
    """SIGTERM ends the bench like Ctrl-C: asyncio cancels the replay and every started
    process is stopped by the `finally` that owns it."""
    import signal

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def run(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.routers.split(",") if n.strip()]
    envoy = {ENVOY_PREFIX, *(f"{ENVOY_PREFIX}_{mode}" for mode in ("full", "gie"))}
    unknown = [n for n in names if n not in ROUTERS and n not in envoy]
    if unknown or not names:
        print(f"bench live: unknown routers {unknown}; choose from {', '.join(ROUTERS)}")
        return 2
    if args.engines < 1 or args.duration <= 0 or args.speedup <= 0 or args.trace_start_s < 0:
        print(
            "bench live: --engines >= 1, --duration > 0, --speedup > 0 and "
            "--trace-start-s >= 0 please"
        )
        return 2
    if TRACE_BLOCK_TOKENS % args.block_words:
        print(f"bench live: --block-words must divide {TRACE_BLOCK_TOKENS}")
        return 2
    if args.pd is not None:
        try:
            parse_pd(args.pd, instances=args.engines)
        except ValueError as error:
            print(f"bench live: {error} (--engines)")
            return 2
        names = [n for name in names for n in (name, name + PD_SUFFIX)
                 if name.startswith("twinroute_") or n == name]  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    ensure_peers(names)
    trace = args.trace or _default_trace()
    workload = load_workload(
        trace=trace,
        duration_s=args.duration,
        speedup=args.speedup,
        block_words=args.block_words,
        max_output=args.max_output_tokens,
        start_s=args.trace_start_s,
    )
    print(
        f"live bench: {len(workload)} requests over {args.duration:g}s "
        f"({len(workload) / args.duration:.2f} req/s), {args.engines} engines, "
        f"routers {', '.join(names)}",
        flush=True,
    )
    reuse = window_reuse(workload)
    _stop_on_sigterm()
    results: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(names, start=1):
        print(f"  [{index}/{len(names)}] {label(name)} ({name}) ...", flush=True)
        try:
            results[name] = asyncio.run(run_one(name, args, workload))
        except Exception as error:  # one router that cannot start must not cost the others
            reason = f"{type(error).__name__}: {error} (logs in {args.out / 'logs'})"
            print(f"  [{index}/{len(names)}] {label(name)} did not run: {reason}", flush=True)
            results[name] = summarize(
                Replay(
                    ttft_s=np.full(len(workload), np.nan),
                    errors=len(workload),
                    wall_s=0.0,
                    error_samples=[reason],
                ),
                before=[],
                after=[],
                slo_s=args.ttft_slo_s,
            )
            continue
        r = results[name]
        failures = f" ({'; '.join(r['error_samples'][:2])})" if r["errors"] else ""
        print(
            f"  [{index}/{len(names)}] {label(name)}: TTFT p50 {seconds(r['ttft_p50_s'])}, "
            f"p90 {seconds(r['ttft_p90_s'])}, within SLO {r['slo_attainment']:.1%}, "
            f"cache hit {percent(r['cache_hit_rate'])} (at most {reuse:.1%}), "
            f"errors {r['errors']}{failures}",
            flush=True,
        )
    drop_empty_logs(args.out / "logs")
    # A caller that builds the arguments itself (`twinroute demo`) says how to rerun them.
    command = getattr(args, "reproduce_with", None) or command_line()
    text = table(results, slo_s=args.ttft_slo_s)
    if args.pd is not None:
        text += f"\n\nPrefill/decode ({args.pd} for the +pd runs):\n\n" + pd_table(results)
    print(text)
    document = {
        "command": command,
        "requests": len(workload),
        "engines": args.engines,
        "slo_s": args.ttft_slo_s,
        "trace": trace.name,
        "trace_start_s": args.trace_start_s,
        "duration_s": args.duration,
        "speedup": args.speedup,
        # No router can hit more than this from empty caches (`window_reuse`).
        "reuse_in_window": reuse,
        "routers": results,
    }
    (args.out / "live.json").write_text(json.dumps(document, indent=1))
    if args.json:
        args.json.write_text(json.dumps(document, indent=1))
    plots = plot(results, out=args.out, slo_s=args.ttft_slo_s, reuse_in_window=reuse)
    if args.pd is not None:
        plots.append(plot_pd(results, out=args.out, split=args.pd))
    (args.out / "live.md").write_text(
        f"Command: `{command}`\n\n{text}\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots)
    )
    print(f"wrote {args.out}/live.json, live.md, " + ", ".join(p.name for p in plots))
    return 0
