"""One vLLM-like engine instance: what decides time to first token.

The model follows vLLM's V1 scheduler closely enough that routing decisions have the same
consequences:
- **Waiting queue** (FCFS) and a **running** list; at most `max_num_seqs` running.
- **Continuous batching with chunked prefill.** Each step has a budget of
  `max_num_batched_tokens`: running requests go first (one token per decoding request, the next
  chunk of a prefilling one), then waiting requests are admitted while budget, sequence slots
  and KV memory last, each with as large a prefill chunk as the budget allows.
- **Paged KV cache with automatic prefix caching** (`PrefixCache`): on admission a request
  reuses the longest cached run of its leading blocks (at least its last token is always
  computed, as in vLLM); the blocks it computes become cached as they complete.
- **Preemption by recompute** when a running request cannot get KV memory: the latest
  admitted request is evicted back to the head of the queue (its blocks stay cached, so the
  recompute mostly hits).
- **Step time** from the shared `CostModel`: each prefill chunk costs
  `prefill_time_s(uncached_tokens=chunk, cached_tokens=context before it)`, less the fixed
  per-pass cost (`prefill_time_s(0, 0)`) for every chunk after the first since a step is one
  forward pass, and the decoding requests together cost one
  `decode_step_time_s(batch_size, kv_tokens)`.
- The first token of a request is emitted at the end of the step that completes its prefill;
  it finishes when it has produced `output_tokens` tokens.

Time is injected: `step(now)` plans and applies one step and returns its duration; the caller
(the cluster simulator or a real-time engine simulator) decides when that step ends.
`plan_decode_run` / `apply_decode_run` let a discrete-event driver jump over a stretch of pure
decode steps in one event; `apply_decode_run(steps=k)` leaves the instance exactly as `k` calls
of `step` would.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, cast

import numpy as np
import numpy.typing as npt

from twinroute.simulator.kvcache import PrefixCache


class StepCostModel(Protocol):
    """The part of `twinroute.scheduler.costmodel.CostModel` an instance needs."""

    def prefill_time_s(self, *, uncached_tokens: int, cached_tokens: int) -> float: ...

    def decode_step_time_s(self, *, batch_size: int, kv_tokens: int) -> float: ...


@dataclass(frozen=True, slots=True)
class InstanceConfig:
    kv_capacity_tokens: int
    block_size: int = 512
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256


@dataclass(frozen=True, slots=True)
class SimRequest:
    request_id: str
    prompt_tokens: int
    output_tokens: int
    # Trace block ids of the prompt (one per `block_size` tokens, the last may be partial).
    block_ids: list[int] = field(default_factory=list)
    # Disaggregated serving: the prompt's KV arrives from a prefill instance, so admission
    # needs KV memory but no prefill compute; the first token reports the prefill's hit.
    kv_transferred: bool = False
    prefill_hit_tokens: int = 0


@dataclass(frozen=True, slots=True)
class FirstToken:
    request_id: str
    cached_tokens: int


@dataclass(frozen=True, slots=True)
class Finished:
    request_id: str
    output_tokens: int


@dataclass(frozen=True, slots=True)
class StepResult:
    """What one step (or one run of decode steps) produced, at its end."""

    duration_s: float
    first_tokens: tuple[FirstToken, ...] = ()
    finished: tuple[Finished, ...] = ()
    steps: int = 1
    # Requests that produced a token in this step (only with `record_tokens=True`).
    emitted: tuple[str, ...] = ()


IDLE = StepResult(duration_s=0.0, steps=0)


@dataclass(frozen=True, slots=True)
class InstanceMetrics:
    """What vLLM exposes on /metrics, plus a few counters the simulator reports."""

    running: int
    waiting: int
    kv_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    pending_prefill_tokens: int
    preemptions: int
    evicted_blocks: int
    steps: int


@dataclass(frozen=True, slots=True)
class DecodeRun:
    """A planned stretch of `steps` pure decode steps; `ends_s[j]` is the end of step j,
    relative to the start of the run."""

    steps: int
    ends_s: npt.NDArray[np.float64]


class _Sequence:
    __slots__ = (
        "admitted",
        "base_generated",
        "block_ids",
        "computed",
        "first_done",
        "generated",
        "held",
        "hit",
        "output_tokens",
        "private",
        "prompt_tokens",
        "request_id",
        "target",
        "transferred",
    )

    def __init__(self, request: SimRequest) -> None:
        self.request_id = request.request_id
        self.prompt_tokens = request.prompt_tokens
        self.output_tokens = max(1, request.output_tokens)
        self.block_ids = request.block_ids
        # Tokens to prefill before the next token can be sampled (prompt, plus the tokens
        # generated before a preemption).
        self.target = request.prompt_tokens
        self.base_generated = 0
        self.computed = 0
        self.held = 0
        self.hit = 0
        self.private = 0
        self.generated = 0
        self.first_done = False
        self.admitted = False
        self.transferred = request.kv_transferred
        if request.kv_transferred:
            self.hit = request.prefill_hit_tokens


class Instance:
    """A simulated engine; see the module docstring for the model."""

    def __init__(
        self, *, config: InstanceConfig, cost: StepCostModel, record_tokens: bool = False
    ) -> None:
        self.config = config
        self._cost = cost
        self._cache = PrefixCache(capacity_tokens=config.kv_capacity_tokens)
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._record_tokens = record_tokens
        self._pass_overhead_s = cost.prefill_time_s(uncached_tokens=0, cached_tokens=0)
        # Whether decode_step_time_s accepts an array of KV sizes (checked on first use).
        self._vector_cost = True
        self._queries = 0
        self._hits = 0
        self._preemptions = 0
        self._steps = 0
        # Requests taken out of the batch for a live migration, still holding their KV.
        self._suspended: dict[str, _Sequence] = {}

    # -- inputs ------------------------------------------------------------------------------

    def submit(self, request: SimRequest) -> None:
        if request.prompt_tokens <= 0:
            raise ValueError(f"request {request.request_id}: prompt must have tokens")
        self._waiting.append(_Sequence(request))

    def withdraw(self, request_id: str) -> bool:
        """Take back a request that has not been admitted yet (for rebalancing)."""
        for index, seq in enumerate(self._waiting):
            if seq.request_id == request_id:
                if seq.admitted:
                    return False
                del self._waiting[index]
                return True
        return False

    # -- state -------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return bool(self._running or self._waiting)

    @property
    def load(self) -> int:
        return len(self._running) + len(self._waiting)

    @property
    def cache(self) -> PrefixCache:
        return self._cache

    def scrape(self) -> tuple[int, int, float]:
        """(running, waiting, kv usage): the gauges a metrics scrape returns, in O(1)."""
        return len(self._running), len(self._waiting), self._cache.usage

    def metrics(self) -> InstanceMetrics:
        pending = sum(s.target - s.computed for s in self._running)
        pending += sum(s.target - s.computed for s in self._waiting)
        return InstanceMetrics(
            running=len(self._running),
            waiting=len(self._waiting),
            kv_usage=self._cache.usage,
            prefix_cache_queries=self._queries,
            prefix_cache_hits=self._hits,
            pending_prefill_tokens=pending,
            preemptions=self._preemptions,
            evicted_blocks=self._cache.evicted_blocks,
            steps=self._steps,
        )

    # -- one step ----------------------------------------------------------------------------

    def step(self, now: float) -> StepResult:
        """Schedule and execute one engine step starting at `now`; IDLE if nothing to do."""
        del now  # the model is time-invariant; kept for API symmetry with real engines
        if not self._running and not self._waiting:
            return IDLE
        cache = self._cache
        budget = self.config.max_num_batched_tokens
        running = self._running
        chunks: list[tuple[_Sequence, int]] = []
        decodes: list[_Sequence] = []
        preempted = False
        index = 0
        while index < len(running) and budget > 0:
            seq = running[index]
            tokens = min(seq.target - seq.computed, budget) if seq.computed < seq.target else 1
            if not cache.reserve(tokens):
                # vLLM frees memory by preempting the most recently admitted request.
                while running[-1] is not seq:
                    self._preempt(running.pop())
                    preempted = True
                    if cache.reserve(tokens):
                        break
                else:
                    self._preempt(running.pop())
                    preempted = True
                    continue
            seq.private += tokens
            budget -= tokens
            if seq.computed < seq.target:
                chunks.append((seq, tokens))
            else:
                decodes.append(seq)
            index += 1
        if not preempted:
            self._admit(budget=budget, chunks=chunks)
        return self._execute(chunks=chunks, decodes=decodes)

    def _admit(self, *, budget: int, chunks: list[tuple[_Sequence, int]]) -> None:
        cache = self._cache
        waiting = self._waiting
        running = self._running
        block_size = self.config.block_size
        max_seqs = self.config.max_num_seqs
        while waiting and budget > 0 and len(running) < max_seqs:
            seq = waiting[0]
            matched = cache.match(seq.block_ids, block_size=block_size)
            held = seq.block_ids[:matched]
            cache.acquire(held)
            hit = sum(cache.block_tokens(b) for b in held)
            if seq.transferred:
                # The KV of all but the last prompt token arrived (what is not cached here
                # takes memory); the last token is computed, as vLLM's decode side does.
                computed = seq.target - 1
                tokens = 1
                allocate = tokens + computed - min(hit, computed)
            else:
                computed = min(hit, seq.target - 1)
                tokens = min(seq.target - computed, budget)
                allocate = tokens
            if not cache.reserve(allocate):
                cache.release(held)
                break
            waiting.popleft()
            if not seq.admitted:
                seq.admitted = True
                if not seq.transferred:
                    self._queries += seq.prompt_tokens
                    seq.hit = computed
                    self._hits += seq.hit
            seq.held = matched
            seq.computed = computed
            seq.private += allocate
            running.append(seq)
            chunks.append((seq, tokens))
            budget -= tokens

    def _execute(
        self, *, chunks: list[tuple[_Sequence, int]], decodes: list[_Sequence]
    ) -> StepResult:
        cost = self._cost
        duration = 0.0
        for seq, tokens in chunks:
            duration += cost.prefill_time_s(uncached_tokens=tokens, cached_tokens=seq.computed)
        if len(chunks) > 1:
            # One forward pass per step: its fixed cost is paid once, not once per request.
            duration -= (len(chunks) - 1) * self._pass_overhead_s
        if decodes:
            kv_tokens = sum(s.prompt_tokens + s.generated for s in decodes)
            duration += cost.decode_step_time_s(batch_size=len(decodes), kv_tokens=kv_tokens)
        first_tokens: list[FirstToken] = []
        finished: list[Finished] = []
        emitted: list[str] = []
        for seq, tokens in chunks:
            seq.computed += tokens
            self._commit_blocks(seq)
            if seq.computed >= seq.target:
                seq.generated += 1
                if not seq.first_done:
                    seq.first_done = True
                    first_tokens.append(
                        FirstToken(request_id=seq.request_id, cached_tokens=seq.hit)
                    )
                if self._record_tokens:
                    emitted.append(seq.request_id)
                if seq.generated >= seq.output_tokens:
                    finished.append(self._finish(seq))
        for seq in decodes:
            seq.generated += 1
            if self._record_tokens:
                emitted.append(seq.request_id)
            if seq.generated >= seq.output_tokens:
                finished.append(self._finish(seq))
        if finished:
            self._running = [s for s in self._running if s.generated < s.output_tokens]
        self._steps += 1
        return StepResult(
            duration_s=duration,
            first_tokens=tuple(first_tokens),
            finished=tuple(finished),
            emitted=tuple(emitted),
        )

    def _commit_blocks(self, seq: _Sequence) -> None:
        block_ids = seq.block_ids
        block_size = self.config.block_size
        if seq.computed >= seq.prompt_tokens:
            covered = len(block_ids)
        else:
            covered = min(seq.computed // block_size, len(block_ids))
        cache = self._cache
        for index in range(seq.held, covered):
            tokens = min(block_size, seq.prompt_tokens - index * block_size)
            cache.commit(block_ids[index], tokens)
            seq.private -= tokens
        if covered > seq.held:
            seq.held = covered

    def _finish(self, seq: _Sequence) -> Finished:
        cache = self._cache
        cache.release(seq.block_ids[: seq.held])
        cache.free(seq.private)
        seq.held = 0
        seq.private = 0
        return Finished(request_id=seq.request_id, output_tokens=seq.generated)

    def _preempt(self, seq: _Sequence) -> None:
        cache = self._cache
        cache.release(seq.block_ids[: seq.held])
        cache.free(seq.private)
        seq.held = 0
        seq.private = 0
        seq.computed = 0
        # Transferred KV is gone with the preemption: the recompute is a real prefill.
        seq.transferred = False
        if seq.first_done:
            # Recompute the prompt and what was generated, then continue decoding.
            seq.base_generated = seq.generated
            seq.target = seq.prompt_tokens + seq.generated
        self._preemptions += 1
        self._waiting.appendleft(seq)

    # -- live migration (twinroute.enginesim.migration) ---------------------------------------

    def abort(self, request_id: str) -> bool:
        """Drop a request that was admitted (running, or preempted back into the queue) and
        free its KV, as vLLM does when the client goes away. False when not found here."""
        for index, seq in enumerate(self._running):
            if seq.request_id == request_id:
                del self._running[index]
                self._finish(seq)
                return True
        for index, seq in enumerate(self._waiting):
            if seq.request_id == request_id:
                del self._waiting[index]
                self._finish(seq)
                return True
        return False

    def listing(self) -> list[tuple[str, bool, int, int, int]]:
        """(request id, waiting, prompt tokens, generated, KV tokens held or needed) of every
        request, running first; what a migration policy chooses from."""
        rows = [
            (s.request_id, False, s.prompt_tokens, s.generated, s.prompt_tokens + s.generated)
            for s in self._running
        ]
        rows.extend(
            (s.request_id, True, s.prompt_tokens, s.generated, s.target) for s in self._waiting
        )
        return rows

    def decoding_state(self, request_id: str) -> tuple[int, int, int] | None:
        """(KV tokens, tokens generated, output tokens in all) of a running request that is
        past its prefill; None otherwise (queued, prefilling, finished, unknown)."""
        for seq in self._running:
            if seq.request_id == request_id:
                if seq.computed < seq.target or not seq.first_done:
                    return None
                return seq.prompt_tokens + seq.generated, seq.generated, seq.output_tokens
        return None

    def suspend(self, request_id: str) -> bool:
        """Take a decoding request out of the batch, keeping its KV (the last migration stage)."""
        for index, seq in enumerate(self._running):
            if seq.request_id == request_id and seq.computed >= seq.target and seq.first_done:
                del self._running[index]
                self._suspended[request_id] = seq
                return True
        return False

    def resume(self, request_id: str) -> bool:
        """Put a suspended request back into the batch (the migration was aborted)."""
        seq = self._suspended.pop(request_id, None)
        if seq is None:
            return False
        self._running.append(seq)
        return True

    def release_suspended(self, request_id: str) -> bool:
        """Free a suspended request's KV (the destination committed)."""
        seq = self._suspended.pop(request_id, None)
        if seq is None:
            return False
        self._finish(seq)
        return True

    def adopt(self, request: SimRequest, *, generated: int, reserved_tokens: int) -> bool:
        """Start decoding a request whose KV was copied here into `reserved_tokens` tokens
        reserved beforehand; False (reservation untouched) when more KV is needed and none is
        free. The copied KV is private to the request (not registered as prefix cache)."""
        needed = request.prompt_tokens + generated
        if needed > reserved_tokens and not self._cache.reserve(needed - reserved_tokens):
            return False
        if reserved_tokens > needed:
            self._cache.free(reserved_tokens - needed)
        seq = _Sequence(request)
        seq.computed = seq.target
        seq.generated = generated
        seq.first_done = True
        seq.admitted = True
        seq.private = needed
        self._running.append(seq)
        return True

    # -- runs of decode steps ----------------------------------------------------------------

    def plan_decode_run(self) -> DecodeRun | None:
        """The longest stretch of pure decode steps with nothing else happening: no request
        waiting or prefilling, no request finishing before its last step, KV memory for all
        of it. None when the next step is not such a step (use `step`)."""
        running = self._running
        if self._waiting or len(running) == 0:
            return None
        steps = 1 << 30
        kv_tokens = 0
        for seq in running:
            if seq.computed < seq.target:
                return None
            left = seq.output_tokens - seq.generated
            if left < steps:
                steps = left
            kv_tokens += seq.prompt_tokens + seq.generated
        batch = len(running)
        steps = min(steps, self._cache.free_tokens // batch)
        if steps < 2:
            return None
        return DecodeRun(steps=steps, ends_s=np.cumsum(self._decode_times(batch, kv_tokens, steps)))

    def _decode_times(self, batch: int, kv_tokens: int, steps: int) -> npt.NDArray[np.float64]:
        """Durations of `steps` decode steps whose KV grows by `batch` tokens a step."""
        decode = self._cost.decode_step_time_s
        kv = kv_tokens + batch * np.arange(steps, dtype=np.int64)
        if self._vector_cost:
            try:
                # The protocol says int; a numpy-friendly formula takes arrays too.
                array_decode = cast(Callable[..., object], decode)
                vector = np.asarray(array_decode(batch_size=batch, kv_tokens=kv), dtype=np.float64)
            except (TypeError, ValueError):
                vector = None
            if vector is not None and vector.shape == (steps,):
                # Spot-check against scalar calls: vectorising must not change the model.
                for j in (0, steps - 1):
                    if not math.isclose(
                        float(vector[j]),
                        decode(batch_size=batch, kv_tokens=int(kv[j])),
                        rel_tol=1e-9,
                    ):
                        break
                else:
                    return vector
            self._vector_cost = False
        return np.fromiter(
            (decode(batch_size=batch, kv_tokens=int(k)) for k in kv),
            dtype=np.float64,
            count=steps,
        )

    def apply_decode_run(self, run: DecodeRun, *, steps: int) -> StepResult:
        """Execute the first `steps` steps of `run` (planned on the current state)."""
        if not 1 <= steps <= run.steps:
            raise ValueError(f"steps must be within 1..{run.steps}, got {steps}")
        running = self._running
        if not self._cache.reserve(steps * len(running)):
            raise RuntimeError("decode run no longer fits in KV memory (state changed?)")
        finished: list[Finished] = []
        for seq in running:
            seq.private += steps
            seq.generated += steps
            if seq.generated >= seq.output_tokens:
                finished.append(self._finish(seq))
        if finished:
            self._running = [s for s in running if s.generated < s.output_tokens]
        self._steps += steps
        return StepResult(
            duration_s=float(run.ends_s[steps - 1]), finished=tuple(finished), steps=steps
        )
