"""Drive the simulator's vLLM-like `Instance` in real (or scaled) time behind an HTTP server.

Steps:
1. A request is tokenized by the server; here its tokens become chained block hashes (full
   blocks only, as vLLM caches only full blocks), seeded by the model and cache_salt so that
   different namespaces never share blocks.
2. It is submitted to the instance; one driver task runs `Instance.step` back to back while
   there is work. Each step's modelled duration, times `time_scale`, is slept against absolute
   deadlines (so asyncio's timer slack does not accumulate); a request that arrives during a
   step joins at the next one, as in vLLM.
3. At the end of a step, the tokens it produced are handed to each request's queue.

Scaling: each engine token stands for `token_scale` model tokens (the instance sees
`prompt_tokens * token_scale` and blocks of `block_size * token_scale` tokens), so short test
prompts can cost what long real prompts cost; `time_scale` stretches (>1) or compresses (<1)
the model's time. The instance's own counters are in model tokens; `metrics` converts them
back to engine tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import xxhash

from twinroute.simulator.instance import Instance, InstanceMetrics, SimRequest, StepResult

logger = logging.getLogger(__name__)

# If the driver falls this far behind its deadlines (an overloaded CPU), it restarts its
# schedule from now instead of running steps back to back to catch up.
_MAX_LAG_S = 0.25


@dataclass(frozen=True, slots=True)
class EngineSettings:
    block_size: int = 16
    token_scale: int = 1
    time_scale: float = 1.0


class Generation:
    """One request's progress: a queue of produced-token counts, then None when finished."""

    __slots__ = ("cached_tokens", "prompt_tokens", "queue", "request_id")

    def __init__(self, *, request_id: str, prompt_tokens: int) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = 0
        self.queue: asyncio.Queue[int | None] = asyncio.Queue()


def block_hashes(token_ids: Sequence[int], *, block_size: int, namespace: str) -> list[int]:
    """Chained hashes of the full blocks of `token_ids` (hash i stands for blocks 0..i)."""
    parent = xxhash.xxh64_intdigest(namespace.encode())
    hashes: list[int] = []
    full = len(token_ids) - len(token_ids) % block_size
    for start in range(0, full, block_size):
        block = token_ids[start : start + block_size]
        data = parent.to_bytes(8, "little") + b"".join(t.to_bytes(4, "little") for t in block)
        parent = xxhash.xxh64_intdigest(data)
        hashes.append(parent)
    return hashes


class EngineCore:
    """Owns one `Instance` and the task that steps it; see the module docstring."""

    def __init__(
        self,
        *,
        instance: Instance,
        settings: EngineSettings,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if instance.config.block_size != settings.block_size * settings.token_scale:
            raise ValueError(
                "instance block size must be block_size * token_scale "
                f"({settings.block_size} * {settings.token_scale}), "
                f"got {instance.config.block_size}"
            )
        if settings.time_scale <= 0:
            raise ValueError(f"time_scale must be > 0, got {settings.time_scale}")
        self._instance = instance
        self._settings = settings
        self._clock = clock
        self._generations: dict[str, Generation] = {}
        self._work = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lag_resets = 0

    @property
    def settings(self) -> EngineSettings:
        return self._settings

    @property
    def lag_resets(self) -> int:
        return self._lag_resets

    def max_prompt_tokens(self, *, max_tokens: int) -> int:
        """The longest prompt (engine tokens) that fits in KV memory with its output."""
        capacity = self._instance.config.kv_capacity_tokens // self._settings.token_scale
        return capacity - max_tokens

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._drive(), name="engine-core")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for generation in self._generations.values():
            generation.queue.put_nowait(None)
        self._generations.clear()

    def submit(
        self,
        *,
        request_id: str,
        token_ids: Sequence[int],
        max_tokens: int,
        namespace: str,
        kv_transferred: bool = False,
        prefill_hit_tokens: int = 0,
    ) -> Generation:
        """Queue a request; `kv_transferred`: its prompt's KV was pulled from a prefill
        instance (which had `prefill_hit_tokens` model tokens of it cached), so it needs no
        prefill compute here."""
        if request_id in self._generations:
            raise ValueError(f"request id {request_id!r} is already running")
        scale = self._settings.token_scale
        generation = Generation(request_id=request_id, prompt_tokens=len(token_ids))
        self._instance.submit(
            SimRequest(
                request_id=request_id,
                prompt_tokens=len(token_ids) * scale,
                # Each engine token generated stands for one step of the model, not `scale`:
                # decoding emits one token per sequence per step whatever the prompt scale.
                output_tokens=max_tokens,
                block_ids=block_hashes(
                    token_ids, block_size=self._settings.block_size, namespace=namespace
                ),
                kv_transferred=kv_transferred,
                prefill_hit_tokens=prefill_hit_tokens,
            )
        )
        self._generations[request_id] = generation
        self._work.set()
        return generation

    def abandon(self, request_id: str) -> None:
        """The client went away: withdraw the request if it is still queued, else abort it
        and free its KV (vLLM aborts a request whose client disconnected; a stream migrated
        elsewhere by recompute relies on that)."""
        if self._instance.withdraw(request_id) or self._instance.abort(request_id):
            self._generations.pop(request_id, None)

    def metrics(self) -> InstanceMetrics:
        return self._instance.metrics()

    # -- live migration (driven by twinroute.enginesim.migration) ---------------------------

    @property
    def instance(self) -> Instance:
        return self._instance

    def adopt(
        self,
        *,
        request_id: str,
        prompt_tokens: int,
        generated: int,
        max_tokens: int,
        reserved_tokens: int,
    ) -> Generation | None:
        """Continue a request whose KV was copied here (`prompt_tokens` in engine tokens);
        None when its KV does not fit."""
        if request_id in self._generations:
            raise ValueError(f"request id {request_id!r} is already running")
        scale = self._settings.token_scale
        adopted = self._instance.adopt(
            SimRequest(
                request_id=request_id, prompt_tokens=prompt_tokens * scale, output_tokens=max_tokens
            ),
            generated=generated,
            reserved_tokens=reserved_tokens,
        )
        if not adopted:
            return None
        generation = Generation(request_id=request_id, prompt_tokens=prompt_tokens)
        self._generations[request_id] = generation
        self._work.set()
        return generation

    def resume(self, request_id: str) -> bool:
        """Put a request suspended for migration back into the batch."""
        resumed = self._instance.resume(request_id)
        if resumed:
            self._work.set()
        return resumed

    def recompute(
        self, *, request_id: str, prompt_tokens: int, generated: int, max_tokens: int
    ) -> bool:
        """Continue a request whose stream this engine holds by recomputing it here (its
        migration target failed after commit): prompt plus what was generated, then the rest."""
        if request_id not in self._generations or generated >= max_tokens:
            return False
        self._instance.submit(
            SimRequest(
                request_id=request_id,
                prompt_tokens=prompt_tokens * self._settings.token_scale + generated,
                output_tokens=max_tokens - generated,
            )
        )
        self._work.set()
        return True

    def forward(self, request_id: str, tokens: int | None) -> None:
        """Feed a request's stream with tokens produced on another instance (it migrated
        there); None ends the stream."""
        generation = self._generations.get(request_id)
        if generation is None:
            return
        if tokens is None:
            del self._generations[request_id]
            generation.queue.put_nowait(None)
        elif tokens > 0:
            generation.queue.put_nowait(tokens)

    def _now(self, loop: asyncio.AbstractEventLoop) -> float:
        return self._clock() if self._clock is not None else loop.time()

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        time_scale = self._settings.time_scale
        instance = self._instance
        while True:
            await self._work.wait()
            step_start = self._now(loop)
            while instance.busy:
                result = instance.step(step_start)
                if result.steps == 0 or (
                    result.duration_s <= 0 and not result.emitted and not result.finished
                ):
                    # Nothing could be scheduled (e.g. KV memory exhausted by queued work);
                    # wait for the next arrival or completion rather than spin.
                    logger.warning("engine step made no progress; waiting for new work")
                    break
                deadline = step_start + result.duration_s * time_scale
                delay = deadline - self._now(loop)
                if delay > 0:
                    await asyncio.sleep(delay)
                elif delay < -_MAX_LAG_S:
                    self._lag_resets += 1
                    deadline = self._now(loop)
                self._deliver(result)
                step_start = deadline
            self._work.clear()

    def _deliver(self, result: StepResult) -> None:
        generations = self._generations
        for first in result.first_tokens:
            generation = generations.get(first.request_id)
            if generation is not None:
                generation.cached_tokens = first.cached_tokens // self._settings.token_scale
        for request_id in result.emitted:
            generation = generations.get(request_id)
            if generation is not None:
                generation.queue.put_nowait(1)
        for finished in result.finished:
            generation = generations.pop(finished.request_id, None)
            if generation is not None:
                generation.queue.put_nowait(None)
