"""Workload traces for the simulator: readers, a synthetic generator and transformations.

A trace is a stream of `TraceChunk`s, each a block of requests held as numpy arrays (arrival
time, prompt and output length, and the prompt's block ids in CSR layout), so memory stays flat
however long the trace is. Block ids follow the Mooncake convention: one id per `block_size`
prompt tokens (the last block may be partial), and an id stands for its whole prefix, so two
prompts that share the id at position i share every token up to the end of block i.

Sources:
- `read_mooncake`: Mooncake JSONL (`timestamp` ms, `input_length`, `output_length`, `hash_ids`).
- `read_azure`: Azure LLM inference CSV (`TIMESTAMP, ContextTokens, GeneratedTokens`); these
  carry no prefix information, so block ids come from `PrefixModel` (Zipf-popular shared system
  prompts, the rest unique).
- `generate_shared_prefix`: Poisson arrivals of multi-turn conversations that start from one of
  a few Zipf-popular system prompts; for tests and what-if studies.

Transformations (`scale_time`, `replicate`) are generators over chunks too. Every reader
validates as it goes and names the file and line of the first bad record.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

DEFAULT_CHUNK_REQUESTS = 4096
MOONCAKE_BLOCK_TOKENS = 512
TRACE_FORMATS = ("mooncake", "azure", "synthetic")


class TraceFormatError(ValueError):
    """A trace record is malformed; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class TraceChunk:
    """Consecutive requests of a trace, ordered by arrival.

    `block_ids[block_offsets[i]:block_offsets[i + 1]]` are request i's prompt blocks.
    """

    arrival_s: FloatArray
    prompt_tokens: IntArray
    output_tokens: IntArray
    block_offsets: IntArray
    block_ids: IntArray
    block_size: int

    def __len__(self) -> int:
        return int(self.arrival_s.shape[0])

    def blocks(self, index: int) -> IntArray:
        return self.block_ids[self.block_offsets[index] : self.block_offsets[index + 1]]


class _ChunkBuilder:
    """Accumulates requests and emits a `TraceChunk` every `chunk_requests` of them."""

    def __init__(self, *, block_size: int, chunk_requests: int) -> None:
        self._block_size = block_size
        self._chunk_requests = chunk_requests
        self._reset()

    def _reset(self) -> None:
        self._arrivals: list[float] = []
        self._prompts: list[int] = []
        self._outputs: list[int] = []
        self._offsets: list[int] = [0]
        self._blocks: list[int] = []

    def add(self, *, arrival_s: float, prompt: int, output: int, blocks: Iterable[int]) -> None:
        self._arrivals.append(arrival_s)
        self._prompts.append(prompt)
        self._outputs.append(output)
        self._blocks.extend(blocks)
        self._offsets.append(len(self._blocks))

    def full(self) -> bool:
        return len(self._arrivals) >= self._chunk_requests

    def take(self) -> TraceChunk | None:
        if not self._arrivals:
            return None
        chunk = TraceChunk(
            arrival_s=np.asarray(self._arrivals, dtype=np.float64),
            prompt_tokens=np.asarray(self._prompts, dtype=np.int64),
            output_tokens=np.asarray(self._outputs, dtype=np.int64),
            block_offsets=np.asarray(self._offsets, dtype=np.int64),
            block_ids=np.asarray(self._blocks, dtype=np.int64),
            block_size=self._block_size,
        )
        self._reset()
        return chunk


def _check_order(*, path: Path, line: int, arrival_s: float, previous_s: float) -> None:
    if arrival_s < previous_s:
        raise TraceFormatError(
            f"{path}:{line}: arrival {arrival_s:.3f}s is earlier than the previous request's "
            f"{previous_s:.3f}s (traces must be sorted by arrival)"
        )


def read_mooncake(
    path: Path,
    *,
    block_size: int = MOONCAKE_BLOCK_TOKENS,
    chunk_requests: int = DEFAULT_CHUNK_REQUESTS,
) -> Iterator[TraceChunk]:
    """Stream a Mooncake JSONL trace; arrivals are made relative to the first request."""
    builder = _ChunkBuilder(block_size=block_size, chunk_requests=chunk_requests)
    first_ms: float | None = None
    previous_s = 0.0
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                timestamp_ms = float(record["timestamp"])
                prompt = int(record["input_length"])
                output = int(record["output_length"])
                hash_ids = [int(x) for x in record["hash_ids"]]
            except (ValueError, KeyError, TypeError) as error:
                raise TraceFormatError(
                    f"{path}:{line_number}: not a Mooncake trace record "
                    f"(want timestamp, input_length, output_length, hash_ids): {error}"
                ) from error
            if prompt <= 0 or output < 0 or not math.isfinite(timestamp_ms):
                raise TraceFormatError(
                    f"{path}:{line_number}: input_length must be > 0, output_length >= 0 and "
                    f"timestamp finite (got {prompt}, {output}, {timestamp_ms})"
                )
            expected_blocks = -(-prompt // block_size)
            if len(hash_ids) != expected_blocks:
                raise TraceFormatError(
                    f"{path}:{line_number}: {len(hash_ids)} hash_ids for {prompt} tokens; "
                    f"block size {block_size} needs {expected_blocks}"
                )
            if first_ms is None:
                first_ms = timestamp_ms
            arrival_s = (timestamp_ms - first_ms) / 1000.0
            _check_order(path=path, line=line_number, arrival_s=arrival_s, previous_s=previous_s)
            previous_s = arrival_s
            builder.add(arrival_s=arrival_s, prompt=prompt, output=output, blocks=hash_ids)
            if builder.full():
                chunk = builder.take()
                assert chunk is not None
                yield chunk
    last = builder.take()
    if last is not None:
        yield last


@dataclass(frozen=True, slots=True)
class PrefixModel:
    """Synthetic prefix structure for traces that carry only lengths.

    Each request belongs to one of `groups` system prompts chosen with Zipf(`zipf_s`)
    popularity; its first `min(prefix_tokens, prompt - 1)` tokens are that group's (shared)
    blocks and the rest is unique to the request.
    """

    groups: int = 64
    prefix_tokens: int = 2048
    zipf_s: float = 1.1
    seed: int = 0


def _zipf_weights(count: int, exponent: float) -> FloatArray:
    ranks = np.arange(1, count + 1, dtype=np.float64)
    weights = ranks**-exponent
    result: FloatArray = weights / weights.sum()
    return result


class _BlockIdAllocator:
    def __init__(self, start: int = 0) -> None:
        self._next = start

    def take(self, count: int) -> list[int]:
        first = self._next
        self._next += count
        return list(range(first, first + count))


def _parse_azure_time(text: str) -> float:
    """Seconds since the epoch for `2023-11-16 18:17:03.9799600` (any fraction digits)."""
    stamp = np.datetime64(text.strip().replace(" ", "T"), "us")
    return float(stamp.astype(np.int64)) / 1e6


def read_azure(
    path: Path,
    *,
    block_size: int = MOONCAKE_BLOCK_TOKENS,
    prefix_model: PrefixModel = PrefixModel(),
    chunk_requests: int = DEFAULT_CHUNK_REQUESTS,
) -> Iterator[TraceChunk]:
    """Stream an Azure LLM inference CSV; prompt blocks come from `prefix_model`."""
    if prefix_model.groups <= 0 or prefix_model.prefix_tokens < 0:
        raise ValueError("prefix model needs groups > 0 and prefix_tokens >= 0")
    rng = np.random.default_rng(prefix_model.seed)
    weights = _zipf_weights(prefix_model.groups, prefix_model.zipf_s)
    group_blocks = prefix_model.prefix_tokens // block_size
    ids = _BlockIdAllocator()
    group_ids = [ids.take(group_blocks) for _ in range(prefix_model.groups)]
    builder = _ChunkBuilder(block_size=block_size, chunk_requests=chunk_requests)
    first_s: float | None = None
    previous_s = 0.0
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:3]] != [
            "TIMESTAMP",
            "ContextTokens",
            "GeneratedTokens",
        ]:
            raise TraceFormatError(
                f"{path}:1: want the header TIMESTAMP,ContextTokens,GeneratedTokens, got {header}"
            )
        for row in reader:
            line_number = reader.line_num
            if not row:
                continue
            try:
                if len(row) < 3:
                    raise ValueError(f"{len(row)} fields, want 3")
                stamp_s = _parse_azure_time(row[0])
                prompt = int(row[1])
                output = int(row[2])
            except ValueError as error:
                raise TraceFormatError(
                    f"{path}:{line_number}: not an Azure trace row "
                    f"(TIMESTAMP,ContextTokens,GeneratedTokens): {error}"
                ) from error
            if prompt <= 0 or output < 0:
                raise TraceFormatError(
                    f"{path}:{line_number}: ContextTokens must be > 0 and GeneratedTokens >= 0"
                )
            if first_s is None:
                first_s = stamp_s
            arrival_s = stamp_s - first_s
            _check_order(path=path, line=line_number, arrival_s=arrival_s, previous_s=previous_s)
            previous_s = arrival_s
            group = int(rng.choice(prefix_model.groups, p=weights))
            total_blocks = -(-prompt // block_size)
            shared = min(group_blocks, (prompt - 1) // block_size, total_blocks)
            blocks = group_ids[group][:shared] + ids.take(total_blocks - shared)
            builder.add(arrival_s=arrival_s, prompt=prompt, output=output, blocks=blocks)
            if builder.full():
                chunk = builder.take()
                assert chunk is not None
                yield chunk
    last = builder.take()
    if last is not None:
        yield last


@dataclass(frozen=True, slots=True)
class SharedPrefixWorkload:
    """Parameters of `generate_shared_prefix`.

    Conversations start at Poisson rate; each begins with one of `system_prompts` system prompts
    (Zipf popularity) and then has on average `mean_turns` turns; a follow-up turn's prompt is
    the whole previous prompt plus the previous answer plus a new user message, so it shares
    every full block of the previous prompt.
    """

    requests: int = 2000
    rate_rps: float = 4.0
    system_prompts: int = 8
    system_prompt_tokens: int = 4096
    zipf_s: float = 1.0
    mean_turns: float = 3.0
    user_tokens: int = 1024
    output_tokens: int = 128
    # Chance that an arrival continues an open conversation rather than starting one.
    follow_up_share: float = 0.6
    seed: int = 0


def generate_shared_prefix(
    workload: SharedPrefixWorkload,
    *,
    block_size: int = MOONCAKE_BLOCK_TOKENS,
    chunk_requests: int = DEFAULT_CHUNK_REQUESTS,
) -> Iterator[TraceChunk]:
    rng = np.random.default_rng(workload.seed)
    weights = _zipf_weights(workload.system_prompts, workload.zipf_s)
    ids = _BlockIdAllocator()
    system_blocks = workload.system_prompt_tokens // block_size
    system_ids = [ids.take(system_blocks) for _ in range(workload.system_prompts)]
    # Open conversations: (history tokens, ids of the history's full blocks, turns left).
    open_conversations: list[tuple[int, list[int], int]] = []
    builder = _ChunkBuilder(block_size=block_size, chunk_requests=chunk_requests)
    clock = 0.0
    for _ in range(workload.requests):
        clock += float(rng.exponential(1.0 / workload.rate_rps))
        if open_conversations and rng.random() < workload.follow_up_share:
            index = int(rng.integers(len(open_conversations)))
            history_tokens, history_ids, turns_left = open_conversations[index]
        else:
            group = int(rng.choice(workload.system_prompts, p=weights))
            history_tokens = system_blocks * block_size
            history_ids = list(system_ids[group])
            turns_left = max(1, int(rng.geometric(1.0 / max(workload.mean_turns, 1.0))))
            index = len(open_conversations)
            open_conversations.append((history_tokens, history_ids, turns_left))
        user = max(1, int(rng.poisson(workload.user_tokens)))
        output = max(1, int(rng.poisson(workload.output_tokens)))
        prompt = history_tokens + user
        total_blocks = -(-prompt // block_size)
        kept = len(history_ids)
        prompt_ids = history_ids + ids.take(total_blocks - kept)
        builder.add(arrival_s=clock, prompt=prompt, output=output, blocks=prompt_ids)
        turns_left -= 1
        if turns_left <= 0:
            open_conversations[index] = open_conversations[-1]
            open_conversations.pop()
        else:
            history = prompt + output
            full_in_prompt = prompt // block_size
            next_ids = prompt_ids[:full_in_prompt]
            next_ids += ids.take(history // block_size - full_in_prompt)
            open_conversations[index] = (history, next_ids, turns_left)
        if builder.full():
            chunk = builder.take()
            assert chunk is not None
            yield chunk
    last = builder.take()
    if last is not None:
        yield last


def scale_time(chunks: Iterable[TraceChunk], *, factor: float) -> Iterator[TraceChunk]:
    """Multiply arrival times by `factor` (0.5 doubles the request rate)."""
    if not factor > 0:
        raise ValueError(f"time scale must be > 0, got {factor}")
    for chunk in chunks:
        yield TraceChunk(
            arrival_s=chunk.arrival_s * factor,
            prompt_tokens=chunk.prompt_tokens,
            output_tokens=chunk.output_tokens,
            block_offsets=chunk.block_offsets,
            block_ids=chunk.block_ids,
            block_size=chunk.block_size,
        )


def _concat(parts: list[TraceChunk], *, block_size: int) -> TraceChunk:
    offsets: list[IntArray] = []
    base = 0
    for part in parts:
        offsets.append(part.block_offsets[:-1] + base)
        base += int(part.block_offsets[-1])
    offsets.append(np.asarray([base], dtype=np.int64))
    return TraceChunk(
        arrival_s=np.concatenate([p.arrival_s for p in parts]),
        prompt_tokens=np.concatenate([p.prompt_tokens for p in parts]),
        output_tokens=np.concatenate([p.output_tokens for p in parts]),
        block_offsets=np.concatenate(offsets),
        block_ids=np.concatenate([p.block_ids for p in parts]),
        block_size=block_size,
    )


def _select(chunk: TraceChunk, order: IntArray) -> TraceChunk:
    lengths = np.diff(chunk.block_offsets)[order]
    offsets = np.zeros(order.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    starts = chunk.block_offsets[:-1][order]
    if lengths.size:
        gather = np.repeat(starts - offsets[:-1], lengths) + np.arange(int(offsets[-1]))
    else:
        gather = np.zeros(0, dtype=np.int64)
    return TraceChunk(
        arrival_s=chunk.arrival_s[order],
        prompt_tokens=chunk.prompt_tokens[order],
        output_tokens=chunk.output_tokens[order],
        block_offsets=offsets,
        block_ids=chunk.block_ids[gather],
        block_size=chunk.block_size,
    )


def replicate(
    chunks: Iterable[TraceChunk], *, copies: int, id_stride: int, spacing_s: float
) -> Iterator[TraceChunk]:
    """Merge `copies` copies of a trace into one, to load a bigger pool.

    Copy k has every block id shifted by `k * id_stride` (so copies share no prefix: a
    bigger population of users, not more of the same) and every arrival delayed by
    `k * spacing_s / copies` (so copies interleave instead of arriving in bursts; pass the
    trace's mean inter-arrival gap). Output stays sorted by arrival.
    """
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    if copies == 1:
        yield from chunks
        return
    carry: TraceChunk | None = None
    block_size = MOONCAKE_BLOCK_TOKENS
    for chunk in chunks:
        block_size = chunk.block_size
        parts = [
            TraceChunk(
                arrival_s=chunk.arrival_s + k * spacing_s / copies,
                prompt_tokens=chunk.prompt_tokens,
                output_tokens=chunk.output_tokens,
                block_offsets=chunk.block_offsets,
                block_ids=chunk.block_ids + k * id_stride,
                block_size=block_size,
            )
            for k in range(copies)
        ]
        if carry is not None:
            parts.insert(0, carry)
        merged = _concat(parts, block_size=block_size)
        order = np.argsort(merged.arrival_s, kind="stable").astype(np.int64)
        ordered = _select(merged, order)
        # Copies of this chunk that arrive after its last original request may interleave
        # with the next chunk's requests: hold them back and merge them there.
        horizon = float(chunk.arrival_s[-1]) if len(chunk) else -math.inf
        cut = int(np.searchsorted(ordered.arrival_s, horizon, side="right"))
        yield _select(ordered, np.arange(cut, dtype=np.int64))
        carry = _select(ordered, np.arange(cut, len(ordered), dtype=np.int64))
    if carry is not None and len(carry):
        yield carry


def take(chunks: Iterable[TraceChunk], *, requests: int) -> Iterator[TraceChunk]:
    """The first `requests` requests of a trace."""
    if requests < 1:
        raise ValueError(f"need at least one request, got {requests}")
    left = requests
    for chunk in chunks:
        if len(chunk) >= left:
            yield _select(chunk, np.arange(left, dtype=np.int64))
            return
        left -= len(chunk)
        yield chunk


def open_trace(
    path: Path | None,
    *,
    trace_format: str,
    block_size: int = MOONCAKE_BLOCK_TOKENS,
    prefix_model: PrefixModel = PrefixModel(),
    workload: SharedPrefixWorkload = SharedPrefixWorkload(),
    chunk_requests: int = DEFAULT_CHUNK_REQUESTS,
) -> Iterator[TraceChunk]:
    """The chunk stream of a trace given by its format name (see `TRACE_FORMATS`)."""
    if trace_format == "synthetic":
        return generate_shared_prefix(
            workload, block_size=block_size, chunk_requests=chunk_requests
        )
    if path is None:
        raise ValueError(f"format {trace_format!r} needs a trace file")
    if not path.is_file():
        raise FileNotFoundError(f"trace file not found: {path}")
    if trace_format == "mooncake":
        return read_mooncake(path, block_size=block_size, chunk_requests=chunk_requests)
    if trace_format == "azure":
        return read_azure(
            path, block_size=block_size, prefix_model=prefix_model, chunk_requests=chunk_requests
        )
    raise ValueError(f"unknown trace format {trace_format!r}; choose from {TRACE_FORMATS}")


def bundled_mooncake_trace() -> Path:
    """The Mooncake synthetic trace shipped inside the package."""
    return Path(__file__).resolve().parent.parent / "data" / "mooncake_synthetic_trace.jsonl"


@dataclass(frozen=True, slots=True)
class TraceSummary:
    requests: int
    duration_s: float
    mean_prompt_tokens: float
    max_block_id: int

    @property
    def rate_rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else math.inf

    @property
    def mean_gap_s(self) -> float:
        return self.duration_s / max(self.requests - 1, 1)


def summarize(chunks: Iterable[TraceChunk]) -> TraceSummary:
    """One streaming pass: request count, span, mean prompt and the largest block id."""
    requests = 0
    prompt_sum = 0
    first: float | None = None
    last = 0.0
    max_block = -1
    for chunk in chunks:
        if not len(chunk):
            continue
        if first is None:
            first = float(chunk.arrival_s[0])
        last = float(chunk.arrival_s[-1])
        requests += len(chunk)
        prompt_sum += int(chunk.prompt_tokens.sum())
        if chunk.block_ids.size:
            max_block = max(max_block, int(chunk.block_ids.max()))
    return TraceSummary(
        requests=requests,
        duration_s=last - (first or 0.0),
        mean_prompt_tokens=prompt_sum / requests if requests else 0.0,
        max_block_id=max_block,
    )
