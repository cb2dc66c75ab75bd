"""Prefill/decode placement for disaggregated pools (engines with role prefill or decode).

A disaggregated request runs its prompt on a prefill instance, whose KV cache is then sent to
a decode instance that produces every output token. Two choices per request, made for
different reasons:

1. **Decode instance, by decode load.** A session (`RoutingRequest.session_id`) stays on the
   decode instance it used last while that instance is routable (not draining, healthy, not
   excluded): its earlier turns' KV is there, so less has to be transferred or recomputed.
   Otherwise the least loaded decode instance: first those below the KV usage high-water mark
   (`PdSettings.kv_high_watermark`, a nearly full KV cache means preemptions), then the
   smallest batch (the larger of the scheduler's own leases there and the scraped running +
   waiting requests), then the lower KV usage, then the one holding more of the prompt's
   prefix, then the endpoint id (deterministic).
2. **Decider: is the prefill hop worth it?** The decode instance can prefill the prompt itself.
   When the part of the prompt it does not hold cached is at most `min_prefill_tokens`
   (default 100 tokens, as llm-d's decider), the request goes to the decode instance alone:
   its prefill is a step or so, cheaper than a hop and a KV transfer. The threshold is
   measured on the decode instance, which would do that prefill, not on the prefill
   candidate: a prompt cached on a prefill instance but not on the decode instance would still
   need its whole KV moved, and prefilling it on the decode instance would stall every
   sequence decoding there.
3. **Prefill instance, by prefix affinity.** The configured policy (dualmap by default) runs on
   a view restricted to the prefill instances, so its rings hold only prefill instances and its
   TTFT-SLO switch weighs their prefill queues. Its reason (cache affinity, SLO switch, ...) is
   the decision's reason; its candidates are reported with roles `prefill:<role>`.

Pools without a routable prefill instance send every request to a decode instance (it
prefills); pools without a routable decode instance cannot serve a request: `NoEndpointError`
names the cause. Unified instances in a pool that also has prefill and decode instances count
as decode instances (they can do both).

Predicted TTFT of a disaggregated request = the prefill policy's prediction + the KV transfer
of the prompt's tokens (`transfer_s_per_token`, a per-token estimate of the link).

Cost: one policy pick over the prefill instances, plus O(decode instances) load reads and
prefix-index lookups for the decode choice; session lookups are O(1) (a bounded LRU map).
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass

from twinroute.scheduler.policies.base import Policy, score_endpoint
from twinroute.scheduler.types import (
    CandidateScore,
    ClusterView,
    Decision,
    Endpoint,
    LoadSnapshot,
    NoEndpointError,
    RoutingRequest,
)

from twinroute.vocabulary import DEFAULT_PD_MIN_PREFILL_TOKENS, DecisionReason

# Llama-3-8B: 128 KiB of KV per token over a 25 GB/s RDMA link (200 Gb/s NIC).
DEFAULT_TRANSFER_S_PER_TOKEN = 131_072 / 25e9


class PdMode(enum.StrEnum):
    """How a request was placed in a disaggregated pool (a metric label)."""

    DISAGGREGATED = "disaggregated"
    SKIPPED_SHORT = "skipped_short"
    NO_PREFILL = "no_prefill"


@dataclass(frozen=True, slots=True)
class PdSettings:
    # The decode instance prefills prompts whose part it does not hold is at most this long.
    min_prefill_tokens: int = DEFAULT_PD_MIN_PREFILL_TOKENS
    # Decode instances at or above this KV usage are chosen only when all are.
    kv_high_watermark: float = 0.95
    # Seconds per prompt token of KV moved from the prefill to the decode instance.
    transfer_s_per_token: float = DEFAULT_TRANSFER_S_PER_TOKEN
    # Sessions remembered for decode stickiness (least recently used forgotten first).
    max_sessions: int = 100_000

    def __post_init__(self) -> None:
        if self.min_prefill_tokens < 0:
            raise ValueError(f"min_prefill_tokens must be >= 0, got {self.min_prefill_tokens}")
        if not 0.0 < self.kv_high_watermark <= 1.0:
            raise ValueError(f"kv_high_watermark must be in (0, 1], got {self.kv_high_watermark}")
        if self.transfer_s_per_token < 0:
            raise ValueError("transfer_s_per_token must be >= 0")
        if self.max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")


@dataclass(frozen=True, slots=True)
class PdPlacement:
    """A decision (`endpoint_id` the decode instance, `prefill_endpoint_id` the prefill one or
    None) and the prefill work each instance gets, for the leases."""

    decision: Decision
    mode: PdMode
    # Tokens the prefill instance computes (0 when the hop is skipped).
    prefill_uncached_tokens: int
    # Tokens the decode instance prefills itself (0 when disaggregated).
    decode_uncached_tokens: int
    # Disaggregated: tokens the decode instance prefills itself if the prefill hop fails and
    # the router falls back to it (the decode lease then carries them); 0 otherwise.
    fallback_uncached_tokens: int = 0


def decode_batch(load: LoadSnapshot) -> int:
    """Requests on a decode instance: the scheduler's leases, or the scrape when it says more."""
    batch = load.in_flight
    if load.running is not None:
        batch = max(batch, load.running + (load.queued or 0))
    return batch


class PdPlacer:
    """Places requests in a disaggregated pool; see the module docstring."""

    def __init__(self, *, prefill_policy: Policy, settings: PdSettings | None = None) -> None:
        self.prefill_policy = prefill_policy
        self.settings = settings or PdSettings()
        self._sessions: collections.OrderedDict[str, str] = collections.OrderedDict()

    def place(
        self, request: RoutingRequest, *, prefill_view: ClusterView, decode_view: ClusterView
    ) -> PdPlacement:
        decodes = tuple(e for e in decode_view.endpoints if e.id not in request.exclude)
        if not decodes:
            raise NoEndpointError(
                "no routable decode endpoint for request "
                f"{request.request_id!r} ({len(decode_view.endpoints)} decode endpoints "
                f"routable, {len(prefill_view.endpoints)} prefill endpoints, which cannot "
                "decode)"
            )
        decode, decode_reason, decode_why = self._choose_decode(request, decodes, decode_view)
        self._remember(request, decode.id)
        cost_model = self.prefill_policy.config.cost_model
        on_decode = score_endpoint(
            request, decode_view, decode.id, cost_model=cost_model, role=f"decode:{decode_reason}"
        )
        cached_on_decode = request.keys.prefix_tokens(
            on_decode.expected_cached_blocks, prompt_tokens=request.prompt_tokens
        )
        decode_uncached = request.prompt_tokens - cached_on_decode
        threshold = self.settings.min_prefill_tokens
        prefills = [e for e in prefill_view.endpoints if e.id not in request.exclude]
        skip: PdMode | None = None
        if not prefills:
            skip = PdMode.NO_PREFILL
            why = (
                f"no routable prefill endpoint: {decode.id} prefills {decode_uncached} "
                "tokens itself"
            )
        elif decode_uncached <= threshold:
            skip = PdMode.SKIPPED_SHORT
            why = (
                f"prefill hop skipped: {decode.id} holds {cached_on_decode} of "
                f"{request.prompt_tokens} prompt tokens, prefills the {decode_uncached} "
                f"uncached (<= {threshold}) itself"
            )
        if skip is not None:
            return PdPlacement(
                decision=Decision(
                    endpoint_id=decode.id,
                    reason=decode_reason,
                    policy=f"pd/{self.prefill_policy.name}",
                    predicted_ttft_s=on_decode.predicted_ttft_s,
                    expected_cached_blocks=on_decode.expected_cached_blocks,
                    candidates=(on_decode,),
                    detail=f"{why}; decode {decode_why}",
                ),
                mode=skip,
                prefill_uncached_tokens=0,
                decode_uncached_tokens=decode_uncached,
            )
        prefill = self.prefill_policy.pick(request, prefill_view)
        prefill_cached = request.keys.prefix_tokens(
            prefill.expected_cached_blocks, prompt_tokens=request.prompt_tokens
        )
        transfer_tokens = max(0, request.prompt_tokens - cached_on_decode)
        transfer_s = transfer_tokens * self.settings.transfer_s_per_token
        candidates = tuple(
            CandidateScore(
                endpoint_id=c.endpoint_id,
                score=c.score,
                predicted_ttft_s=c.predicted_ttft_s,
                expected_cached_blocks=c.expected_cached_blocks,
                pending_prefill_tokens=c.pending_prefill_tokens,
                role=f"prefill:{c.role}" if c.role else "prefill",
            )
            for c in prefill.candidates
        )
        return PdPlacement(
            decision=Decision(
                endpoint_id=decode.id,
                reason=prefill.reason,
                policy=f"pd/{prefill.policy}",
                predicted_ttft_s=prefill.predicted_ttft_s + transfer_s,
                expected_cached_blocks=prefill.expected_cached_blocks,
                key_depth=prefill.key_depth,
                candidates=(*candidates, on_decode),
                detail=(
                    f"prefill on {prefill.endpoint_id}: {prefill.detail}; KV of "
                    f"{transfer_tokens} tokens to {decode.id} (~{transfer_s * 1e3:.1f} ms; "
                    f"it would prefill {decode_uncached} > {threshold} itself); decode "
                    f"{decode_why}"
                ),
                prefill_endpoint_id=prefill.endpoint_id,
            ),
            mode=PdMode.DISAGGREGATED,
            prefill_uncached_tokens=request.prompt_tokens - prefill_cached,
            decode_uncached_tokens=0,
            fallback_uncached_tokens=decode_uncached,
        )

    def _choose_decode(
        self, request: RoutingRequest, decodes: tuple[Endpoint, ...], view: ClusterView
    ) -> tuple[Endpoint, DecisionReason, str]:
        if request.session_id:
            sticky = self._sessions.get(request.session_id)
            if sticky is not None:
                for endpoint in decodes:
                    if endpoint.id == sticky:
                        return (
                            endpoint,
                            DecisionReason.SESSION_AFFINITY,
                            f"on {endpoint.id}: session {request.session_id!r} stays there",
                        )
        watermark = self.settings.kv_high_watermark
        index = view.prefix_index

        def order(endpoint: Endpoint) -> tuple[bool, int, float, int, str]:
            load = view.load(endpoint.id)
            usage = load.kv_usage if load.kv_usage is not None else 0.0
            cached = index.matched_blocks(endpoint.id, request.keys)
            return (usage >= watermark, decode_batch(load), usage, -cached, endpoint.id)

        best = min(decodes, key=order)
        full, batch, usage, _cached, _id = order(best)
        moved = ""
        if request.session_id and self._sessions.get(request.session_id) not in (None, best.id):
            moved = f"; session {request.session_id!r} left its unroutable decode endpoint"
        return (
            best,
            DecisionReason.LEAST_LOADED,
            f"on {best.id}: least loaded of {len(decodes)} (batch {batch}, KV {usage:.0%}"
            f"{', all over the KV high-water mark' if full else ''}){moved}",
        )

    def _remember(self, request: RoutingRequest, decode_id: str) -> None:
        if not request.session_id:
            return
        sessions = self._sessions
        sessions[request.session_id] = decode_id
        sessions.move_to_end(request.session_id)
        while len(sessions) > self.settings.max_sessions:
            sessions.popitem(last=False)
