"""Disaggregated prefill/decode in the cluster simulator (`twinroute simulate --pd P:D`).

The first P instances of the pool are prefill instances, the other D decode instances; the
router (the live `SchedulerCore`) sees their roles and places each request on a decode
instance and, unless its decider skips the hop, a prefill instance
(`twinroute.scheduler.policies.pd`).

A disaggregated request's life:
1. **Prefill instance**: queued and prefilled like any request (its own waiting queue, chunked
   prefill, prefix cache), as a request with one output token (vLLM's proxy sends it with
   `max_tokens=1`). That token is not the client's: it is dropped, and its blocks stay cached
   on the prefill instance.
2. **KV transfer**: when the prefill ends, the prompt's KV goes to the decode instance, taking
   `InstanceProfile.kv_transfer_s(tokens)` for the tokens the decode instance does not already
   hold in its prefix cache at that moment (vLLM's NixlConnector pulls only those). Transfers
   do not contend for links.
3. **Decode instance**: the request joins its waiting queue with its KV "arrived": admission
   needs KV memory for the prompt (it waits while there is none) but no prefill compute, only
   the last prompt token, in a step shared with the running decodes. The end of that step is
   the first token the client sees.

So TTFT = prefill queue + prefill + transfer + decode admission wait + the first decode step.
Requests whose prefill hop is skipped go to the decode instance alone and prefill there.

Per-role figures (`SimulationResult.pd`): utilisation of the prefill and decode instances
(busy step time over the run up to its last event), transfer times and sizes, and how many
requests went each way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from twinroute.scheduler.types import Endpoint, Role
from twinroute.simulator.instance import SimRequest, StepResult
from twinroute.simulator.kvcache import PrefixCache
from twinroute.simulator.profiles import InstanceProfile


@dataclass(frozen=True, slots=True)
class PdSplit:
    """How many prefill and decode instances a disaggregated pool has."""

    prefill: int
    decode: int

    @property
    def instances(self) -> int:
        return self.prefill + self.decode


def parse_pd(text: str, *, instances: int | None = None) -> PdSplit:
    """`"3:5"` -> 3 prefill and 5 decode instances; `instances`, when given, must match."""
    parts = text.strip().split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--pd wants PREFILL:DECODE instance counts such as 3:5, got {text!r}")
    split = PdSplit(prefill=int(parts[0]), decode=int(parts[1]))
    if split.prefill < 1 or split.decode < 1:
        raise ValueError(
            f"--pd {text}: a disaggregated pool needs at least one prefill and one decode instance"
        )
    if instances is not None and instances != split.instances:
        raise ValueError(
            f"--pd {text} makes {split.instances} instances but --instances says {instances}"
        )
    return split


def pool_endpoints(*, instances: int, prefill: int) -> tuple[Endpoint, ...]:
    """The simulated pool: the first `prefill` instances prefill, the rest decode; with
    `prefill=0` a unified pool (the ids are the same either way)."""
    return tuple(
        Endpoint(
            id=f"sim-{index:03d}",
            address=f"sim://{index}",
            role=(
                Role.UNIFIED if prefill == 0 else Role.PREFILL if index < prefill else Role.DECODE
            ),
        )
        for index in range(instances)
    )


@dataclass(frozen=True, slots=True)
class PrefillDone:
    request_id: str
    cached_tokens: int


class PdFlow:
    """The simulator's book-keeping for disaggregated requests."""

    def __init__(self, *, profile: InstanceProfile, block_size: int, split: PdSplit) -> None:
        self._profile = profile
        self._block_size = block_size
        self.split = split
        # Request id -> (decode slot, the request as the client sent it), while prefilling.
        self._prefilling: dict[str, tuple[int, SimRequest]] = {}
        # Transfer id -> (decode slot, the request with its KV arrived).
        self._in_transfer: dict[int, tuple[int, SimRequest]] = {}
        self._next_transfer = 0
        self._busy_s = [0.0] * split.instances
        self.last_event_s = 0.0
        self.transfer_s: list[float] = []
        self.transfer_tokens: list[int] = []
        self.disaggregated = 0
        self.local = 0

    def is_prefill(self, slot_index: int) -> bool:
        return slot_index < self.split.prefill

    def prefill_request(self, request: SimRequest, *, decode_index: int) -> SimRequest:
        """What the prefill instance runs for `request`: its prompt, one output token."""
        self._prefilling[request.request_id] = (decode_index, request)
        self.disaggregated += 1
        return SimRequest(
            request_id=request.request_id,
            prompt_tokens=request.prompt_tokens,
            output_tokens=1,
            block_ids=request.block_ids,
        )

    def step_ended(
        self, slot_index: int, result: StepResult, *, now: float
    ) -> tuple[StepResult, list[PrefillDone]]:
        """Account the step; on a prefill instance, take out the prefills it finished (their
        one token and completion are not the client's) and return them."""
        self._busy_s[slot_index] += result.duration_s
        self.last_event_s = max(self.last_event_s, now)
        if not self.is_prefill(slot_index) or not result.first_tokens:
            return result, []
        done = [
            PrefillDone(request_id=f.request_id, cached_tokens=f.cached_tokens)
            for f in result.first_tokens
            if f.request_id in self._prefilling
        ]
        if not done:
            return result, []
        ids = {d.request_id for d in done}
        return (
            StepResult(
                duration_s=result.duration_s,
                first_tokens=tuple(f for f in result.first_tokens if f.request_id not in ids),
                finished=tuple(f for f in result.finished if f.request_id not in ids),
                steps=result.steps,
                emitted=tuple(e for e in result.emitted if e not in ids),
            ),
            done,
        )

    def decode_index(self, request_id: str) -> int:
        return self._prefilling[request_id][0]

    def start_transfer(
        self, done: PrefillDone, *, decode_cache: PrefixCache, now: float
    ) -> tuple[int, float, int]:
        """(decode slot, arrival time, transfer id) of the KV of a finished prefill."""
        decode_index, request = self._prefilling.pop(done.request_id)
        held = decode_cache.match(request.block_ids, block_size=self._block_size)
        held_tokens = sum(decode_cache.block_tokens(b) for b in request.block_ids[:held])
        tokens = max(0, request.prompt_tokens - 1 - held_tokens)
        seconds = self._profile.kv_transfer_s(tokens)
        self.transfer_s.append(seconds)
        self.transfer_tokens.append(tokens)
        transfer_id = self._next_transfer
        self._next_transfer += 1
        self._in_transfer[transfer_id] = (
            decode_index,
            SimRequest(
                request_id=request.request_id,
                prompt_tokens=request.prompt_tokens,
                output_tokens=request.output_tokens,
                block_ids=request.block_ids,
                kv_transferred=True,
                prefill_hit_tokens=done.cached_tokens,
            ),
        )
        return decode_index, now + seconds, transfer_id

    def arrived(self, transfer_id: int) -> tuple[int, SimRequest]:
        return self._in_transfer.pop(transfer_id)

    def metrics(self) -> dict[str, object]:
        span = self.last_event_s or math.nan
        prefill_busy = self._busy_s[: self.split.prefill]
        decode_busy = self._busy_s[self.split.prefill :]
        transfers = np.asarray(self.transfer_s, dtype=np.float64)

        def pct(q: float) -> float:
            return float(np.percentile(transfers, q)) if transfers.size else math.nan

        return {
            "prefill_instances": self.split.prefill,
            "decode_instances": self.split.decode,
            "disaggregated_requests": self.disaggregated,
            "decode_only_requests": self.local,
            "prefill_utilisation": sum(prefill_busy) / (len(prefill_busy) * span),
            "decode_utilisation": sum(decode_busy) / (len(decode_busy) * span),
            "transfer_p50_s": pct(50),
            "transfer_p90_s": pct(90),
            "transfer_tokens_mean": (
                float(np.mean(self.transfer_tokens)) if self.transfer_tokens else 0.0
            ),
        }
