"""CPU of the hot path's parts, each beside what it replaced, in one process.

    .venv/bin/python tools/hot_path_parts.py [--json FILE]

- Prompt keys of a 1,405-token prompt (32- and 16-token blocks) and of 32k tokens (16- and
  64-token blocks): the XXH3 chain `scheduler/keys.py` uses, beside the vectorised splitmix64
  scheme it replaced (kept here as the reference; it gives the old scheme's pinned keys).
- A histogram observation and a labelled counter increment: prometheus-client's own against
  `twinroute/lean_metrics.py` (what the request path updates about twenty times a request).
- Tokenizing a 1,405-token prompt that repeats all but its last words (the tiny model's
  tokenizer, `.tools/tiny-llama`): the whole prompt each time, against the prefix token cache.
- vLLM's block digests of a 1,405-token prompt whose full blocks repeat (16- and 32-token
  blocks): hashed whole, through the memo, and through the memo with the routing keys as its
  names (what the scheduler does when the engine's block size is its key block).
- Parsing a busy real vLLM engine's /metrics (55 KB, `tests/fixtures/`): every line split and
  checked (what the parser did before), against the parser, which splits only what it reads.
- An idle `twinroute gateway --embedded` in front of one engine simulator: Envoy's and the
  gateway process's share of a core over 20 s (schedstat).

CPU per call from `time.process_time`, best of three rounds; one machine, one run.
`--parts` picks some of them (keys, metrics, tokenizing, digests, parsing, gateway).
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import pathlib
import signal
import sys
import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry, Counter, Histogram
from twinroute.scheduler.keys import (
    _GOLDEN,
    _MIX_2,
    _chain,
    _mix_in_place,
    keys_from_tokens,
    mix64_array,
)
from twinroute.scheduler.openai_queries import Tokenizer
from twinroute.scheduler.scrape import _split_sample, parse_vllm_metrics
from twinroute.scheduler.vllm_block_memo import MemoizedBlockHasher
from twinroute.scheduler.vllm_blocks import VllmBlockHasher

from twinroute.bench.processes import process_tree, start_announced, twinroute_argv
from twinroute.lean_metrics import LeanCounter, LeanHistogram

REPO = pathlib.Path(__file__).resolve().parent.parent
TOKENIZER = REPO / ".tools" / "tiny-llama" / "tokenizer.json"
METRICS = REPO / "tests" / "fixtures" / "vllm_metrics_real_busy.txt"
PROMPT = " ".join(f"word{i % 50} of the shared system prompt" for i in range(60))


def us_per_call(call: Callable[[int], object], calls: int = 300) -> float:
    """Best of three rounds of `calls` calls (each given its index), in microseconds."""
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        for index in range(calls):
            call(index)
        best = min(best, (time.process_time() - started) / calls)
    return round(best * 1e6, 1)


_COLUMNS: dict[int, npt.NDArray[np.uint64]] = {}


def splitmix_keys(ids: npt.NDArray[np.uint32], block_size: int, seed: int) -> object:
    """The token keys before the XXH3 chain, operation for operation: every id mixed with its
    column's constant (cached per block size) and summed per block, then the splitmix64 chain
    `scheduler/keys.py` still uses for trace keys."""
    words = ids.astype(np.uint64)
    blocks = words.shape[0] // block_size
    columns = _COLUMNS.get(block_size)
    if columns is None:
        offsets = np.arange(1, block_size + 1, dtype=np.uint64) * np.uint64(_MIX_2)
        columns = _COLUMNS[block_size] = mix64_array(offsets)
    mixed = words[: blocks * block_size].reshape(blocks, block_size) ^ columns
    mixed += np.uint64(_GOLDEN)
    _mix_in_place(mixed)
    return _chain(mixed.sum(axis=1, dtype=np.uint64), seed)


def prompt_keys() -> dict[str, dict[str, float]]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ids = np.asarray(Tokenizer(str(TOKENIZER)).encode(f"{PROMPT} question 1"), dtype=np.uint32)
    long_ids = np.resize(ids, 32_768)
    cases = {"1405_tokens_block_32": (ids, 32), "1405_tokens_block_16": (ids, 16)}
    cases["32768_tokens_block_16"] = (long_ids, 16)
    cases["32768_tokens_block_64"] = (long_ids, 64)
    results: dict[str, dict[str, float]] = {}
    for name, (tokens, size) in cases.items():

        def chain(_: int, tokens: npt.NDArray[np.uint32] = tokens, size: int = size) -> object:
            return keys_from_tokens(tokens, block_size=size, seed=3)

        def vectorised(_: int, tokens: npt.NDArray[np.uint32] = tokens, size: int = size) -> object:
            return splitmix_keys(tokens, size, 3)

        results[name] = {
            "xxh3_chain_us": us_per_call(chain, calls=200),
            "splitmix_vectorised_us": us_per_call(vectorised, calls=200),
        }
    return results


def metric_updates() -> dict[str, float]:
    buckets = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.25, 1.0)
    registry = CollectorRegistry()
    histogram = Histogram("h_seconds", "h", buckets=buckets, registry=registry)
    counter = Counter("c", "c", ["reason"], registry=registry)
    lean_histogram = LeanHistogram("l_seconds", "l", buckets=buckets, registry=registry)
    lean_counter = LeanCounter("lc", "lc", ["reason"], registry=registry)
    values = [0.0001 * (index % 50) for index in range(1000)]
    return {
        "histogram_observe_us": us_per_call(lambda i: histogram.observe(values[i]), calls=1000),
        "lean_histogram_observe_us": us_per_call(
            lambda i: lean_histogram.observe(values[i]), calls=1000
        ),
        "counter_labels_inc_us": us_per_call(
            lambda _: counter.labels("cache_affinity").inc(), calls=1000
        ),
        "lean_counter_labels_inc_us": us_per_call(
            lambda _: lean_counter.labels("cache_affinity").inc(), calls=1000
        ),
    }


def tokenizing() -> dict[str, float]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    whole = Tokenizer(str(TOKENIZER), cache_chunks=0)
    cached = Tokenizer(str(TOKENIZER))
    return {
        "whole_us": us_per_call(lambda i: whole.encode(f"{PROMPT} question {i}")),
        "prefix_cache_us": us_per_call(lambda i: cached.encode(f"{PROMPT} question {i}")),
    }


def block_digests(size: int) -> dict[str, float]:
    """The routing keys plus vLLM's digests of a prompt whose full blocks all repeat."""
    base = np.arange(1405, dtype=np.uint32) % 2000
    whole, memo, named = VllmBlockHasher(size), MemoizedBlockHasher(size), MemoizedBlockHasher(size)

    def prompt(index: int) -> npt.NDArray[np.uint32]:
        ids = base.copy()
        ids[-1] = index  # the last, partial block differs: every full block repeats
        return ids

    def keys_and_whole(index: int) -> None:
        ids = prompt(index)
        keys_from_tokens(ids, block_size=size, seed=3)  # the routing keys
        whole.block_hashes(ids)

    def keys_and_memo(index: int) -> None:
        ids = prompt(index)
        keys_from_tokens(ids, block_size=size, seed=3)
        memo.block_hashes(ids)

    def keys_and_memo_named(index: int) -> None:
        ids = prompt(index)
        named.block_hashes(ids, names=keys_from_tokens(ids, block_size=size, seed=3).block_hashes)

    return {
        "keys_and_whole_us": us_per_call(keys_and_whole),
        "keys_and_memo_us": us_per_call(keys_and_memo),
        "keys_and_memo_named_us": us_per_call(keys_and_memo_named),
    }


def parsing() -> dict[str, float]:
    text = METRICS.read_text()

    def every_line(_: int) -> None:
        for raw in text.splitlines():
            line = raw.strip()
            if line and not line.startswith("#"):
                _split_sample(line)

    return {
        "bytes": len(text),
        "split_every_line_us": us_per_call(every_line, calls=100),
        "parser_us": us_per_call(lambda _: parse_vllm_metrics(text), calls=100),
    }


def schedstat_s(pid: int) -> float:
    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(path, encoding="ascii") as handle:
                total += int(handle.read().split()[0])
        except OSError:
            continue
    return total / 1e9


async def idle_gateway(seconds: float = 20.0) -> dict[str, float]:
    engine = await start_announced(
        "engine",
        twinroute_argv("engine-sim", "--port=0", "--model=m", "--instance-id=e0"),
        timeout_s=60,
    )
    gateway = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "twinroute", "gateway", "--port=0", "--model=m", "--embedded",
        f"--endpoints=e0={engine.address}", "--access-log=",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await asyncio.sleep(10)
        tree = process_tree(gateway.pid)
        before = {pid: schedstat_s(pid) for pid in tree}
        await asyncio.sleep(seconds)
        shares = {
            name: round(100 * (schedstat_s(pid) - before[pid]) / seconds, 2)
            for pid, name in tree.items()
        }
    finally:
        gateway.send_signal(signal.SIGTERM)
        await asyncio.wait_for(gateway.wait(), 30)
        await engine.stop()
    return {
        "envoy_core_percent": sum(v for k, v in shares.items() if k == "envoy"),
        "gateway_process_core_percent": sum(v for k, v in shares.items() if k != "envoy"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=pathlib.Path)
    parser.add_argument("--parts", default="keys,metrics,tokenizing,digests,parsing,gateway")
    args = parser.parse_args()
    parts: dict[str, tuple[str, Callable[[], object]]] = {
        "keys": ("prompt_keys", prompt_keys),
        "metrics": ("metric_updates", metric_updates),
        "tokenizing": ("tokenizing_1405_tokens", tokenizing),
        "digests": (
            "vllm_block_digests_1405_tokens",
            lambda: {f"block_{n}": block_digests(n) for n in (16, 32)},
        ),
        "parsing": ("parsing_busy_vllm_metrics", parsing),
        "gateway": ("idle_gateway", lambda: asyncio.run(idle_gateway())),
    }
    results: dict[str, object] = {}
    for part in args.parts.split(","):
        if part not in parts:
            parser.error(f"unknown part {part!r}; choose from {', '.join(parts)}")
        name, measure = parts[part]
        results[name] = measure()
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
