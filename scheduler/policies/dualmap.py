"""dualmap: two hash-ring candidates per prefix; cache affinity until the SLO is at risk.

Steps (DualMap, arXiv 2602.06502; the algorithm and its thresholds: docs/design.md):
1. Key depth d from the prefix hotness tree (`scheduler/hotness.py`): start at
   `min_key_depth` blocks, lengthen past prefixes whose share of the last `hotness_window`
   requests exceeds 2/n, shorten below 1/n. A system prompt that every request carries is hot,
   so its requests are keyed deeper and spread over many pairs instead of pinning one.
2. Candidates: the dual hash ring maps the key (block hash d - 1, which stands for the whole
   d-block prefix) to (ring-1, ring-2), two distinct endpoints. The rings follow the view's
   endpoint set lazily (re-synced when the set changes). Excluded endpoints are skipped as if
   absent: the excluded candidate falls to the next distinct endpoint on its ring's clockwise
   walk, so other keys keep their pairs.
3. Expected reuse on each candidate = blocks of the whole prompt the prefix index believes it
   holds; predicted TTFT = queueing of its pending prefill + prefill of the uncached part.
4. Default = affinity: the candidate with more expected reuse (CACHE_AFFINITY); equal reuse
   (e.g. a new prefix) -> the lower score, then fewer pending prefill tokens, then ring-1
   (TIE_LESS_LOADED). The score is the predicted TTFT; with `phase_aware` the TTFT counts the
   decode steps interleaved with the prefill and the score adds the weighted delay the request
   would inflict on the sequences decoding there (`scheduler/costmodel.py`); with
   `charge_eviction` (default) it adds the eviction the endpoint's KV memory pressure implies
   (`score_endpoint`), so long prompts do not pile onto an instance whose memory is full.
5. SLO check: if the default's predicted TTFT exceeds the request's TTFT SLO and the other
   candidate's meets it, take the other (SLO_SWITCH). If both exceed it the default stays,
   and the detail says both were over: a switch that cannot meet the SLO only gives the
   cache away, and past the pool's capacity, where every candidate is over, chasing the lower
   prediction spends compute on prefill the cached candidate would have skipped (in the
   simulator at 8 instances, paired over 16 seeds just past the goodput cliff, keeping the
   default met the SLO for 5-6 points more requests than taking the lower). Keeping affinity
   until the SLO is at risk, rather than taking the per-request minimum TTFT, avoids
   oscillating between the cached and the idle instance.

6. Cold prompts and where they went (`cold_placement`, default `least_loaded`). When the pair
   does not hold the keyed prefix, the prefix index is asked who does: an endpoint holding the
   whole keyed prefix replaces the pair's weaker member (it is where an earlier turn of this
   conversation was placed; blocks above the key depth, a shared system prompt, do not count).
   A keyed prefix cached nowhere goes to the pool's best-scoring endpoint (predicted TTFT:
   load and what it holds of the prompt) when that beats both candidates, again replacing the
   weaker, and the index remembers where it went, so the conversation's next turn follows.
   Two ring candidates alone make a fresh prefix wait behind whatever the pair is busy with
   while other instances idle: in the simulator (8 instances, bundled trace) this placement
   lifted dualmap from 0.90x to 1.00x of `preble`'s goodput at 32 instances (0.93x to 0.97x
   at 8). `pair` keeps the published rule.

Prompts shorter than one block have no key (vLLM caches only full blocks, so there is nothing
to reuse; `PromptKeys` carries no partial content): they are keyed on a hash of the session id
when there is one (the conversation's next, longer turn will share this prompt's prefix, so
keeping a session on one pair helps it), else of the request id (a spread over pairs, i.e. the
power of two choices); both candidates then have equal (zero) reuse and the less loaded wins.

Hotspot rebalancing (moving requests still queued on an overloaded instance to their other
candidate, in descending TTFT benefit) is DualMap's too; it is planned by
`MovePlanner.rebalance` (`scheduler/moves.py`) from the candidates recorded on each decision.
This policy opts in (`rebalances_hotspots`).

Cost: hotness O(max_key_depth) dictionary updates, two ring bisects, two prefix-index binary
searches (O(log blocks)), two TTFT estimates: independent of the pool size for a prompt its
pair holds. A prompt the pair does not hold adds a holders lookup (a binary search per
endpoint holding its first block) and, when it is cached nowhere, a TTFT estimate per
endpoint (O(pool size): about 3 us each).
"""

from __future__ import annotations

from twinroute.scheduler.hotness import HotnessTree
from twinroute.scheduler.policies.base import (
    COLD_LEAST_LOADED,
    Policy,
    PolicyConfig,
    eligible_endpoints,
    score_endpoint,
    slo_of,
)
from twinroute.scheduler.policies.ring_keys import describe_key, prefix_key
from twinroute.scheduler.ring import DEFAULT_SEEDS, DualHashRing
from twinroute.scheduler.types import (
    CandidateScore,
    ClusterView,
    Decision,
    Endpoint,
    RoutingRequest,
)

from twinroute.vocabulary import DecisionReason


class DualMapPolicy(Policy):
    name = "dualmap"
    rebalances_hotspots = True

    def __init__(self, *, config: PolicyConfig) -> None:
        super().__init__(config=config)
        self._rings = DualHashRing(
            virtual_nodes=config.virtual_nodes,
            seeds=(
                DEFAULT_SEEDS[0] ^ config.seed,
                DEFAULT_SEEDS[1] ^ config.seed,
            ),
        )
        self._hotness = HotnessTree(
            window=config.hotness_window,
            min_depth=config.min_key_depth,
            max_depth=config.max_key_depth,
        )
        self._synced_endpoints: tuple[Endpoint, ...] | None = None

    @property
    def hotness(self) -> HotnessTree:
        return self._hotness

    @property
    def rings(self) -> DualHashRing:
        return self._rings

    def _sync(self, view: ClusterView) -> None:
        # The core hands out the same endpoint tuple until membership changes: an identity
        # check keeps the common case O(1).
        if view.endpoints is not self._synced_endpoints:
            self._rings.sync(e.id for e in view.endpoints)
            self._synced_endpoints = view.endpoints

    def pick(self, request: RoutingRequest, view: ClusterView) -> Decision:
        # Without exclusions every endpoint is eligible: skip the O(N) filter on the hot path.
        eligible_count = (
            len(eligible_endpoints(request, view))
            if request.exclude or not view.endpoints
            else len(view.endpoints)
        )
        self._sync(view)
        depth = self._hotness.observe(request.keys, endpoints=len(view.endpoints))
        key, depth = prefix_key(request, blocks=depth)
        key_text = describe_key(request, depth)
        first_id, second_id = self._rings.candidates(key, exclude=request.exclude)
        config = self.config
        first = score_endpoint(
            request,
            view,
            first_id,
            cost_model=config.cost_model,
            role="ring-1",
            phase_aware=config.phase_aware,
            interference_weight=config.phase_interference_weight,
            charge_eviction=config.charge_eviction,
        )
        if eligible_count == 1 or second_id == first_id:
            return Decision(
                endpoint_id=first.endpoint_id,
                reason=DecisionReason.ONLY_CANDIDATE,
                policy=self.name,
                predicted_ttft_s=first.predicted_ttft_s,
                expected_cached_blocks=first.expected_cached_blocks,
                key_depth=depth,
                candidates=(first,),
                detail=f"key {key_text}; one eligible endpoint",
            )
        second = score_endpoint(
            request,
            view,
            second_id,
            cost_model=config.cost_model,
            role="ring-2",
            phase_aware=config.phase_aware,
            interference_weight=config.phase_interference_weight,
            charge_eviction=config.charge_eviction,
        )
        if config.cold_placement == COLD_LEAST_LOADED:
            first, second = self._widen(request, view, first, second, depth=depth)
        return self._choose(request, first, second, depth=depth, key_text=key_text)

    def _widen(
        self,
        request: RoutingRequest,
        view: ClusterView,
        first: CandidateScore,
        second: CandidateScore,
        *,
        depth: int,
    ) -> tuple[CandidateScore, CandidateScore]:
        """Let the pair's weaker member be replaced, when the pair does not hold the keyed
        prefix: by an endpoint that holds it (where an earlier cold placement put it), else,
        the keyed prefix being cached nowhere, by the pool's best-scoring endpoint if it beats
        both (module docstring, step 6)."""
        held = max(first.expected_cached_blocks, second.expected_cached_blocks)
        if held >= depth:
            return first, second
        weaker_is_second = _load_order(first) <= _load_order(second)
        outside: CandidateScore | None = None
        pair = (first.endpoint_id, second.endpoint_id)
        # Only a holder of the whole keyed prefix counts: the blocks before the key depth may
        # be a system prompt that many endpoints hold, and following those would pin the
        # traffic the hotness tree spreads.
        holders = {
            endpoint_id: matched
            for endpoint_id, matched in view.prefix_index.holders(request.keys).items()
            if matched >= depth and endpoint_id not in request.exclude and endpoint_id not in pair
        }
        if holders:
            # The record also knows endpoints that left routing (draining, failing).
            holders = {e.id: holders[e.id] for e in view.endpoints if e.id in holders}
        holder = max(((matched, e) for e, matched in holders.items()), default=None)
        if holder is not None:
            outside = self._score(request, view, holder[1], role="holder")
        else:
            # By load alone (the prompt priced as uncached everywhere): what an endpoint holds
            # of it here is at most the shared part above the key depth, and preferring its
            # holders would pin that shared prefix's traffic again. Ties stay on the pair.
            def load_only(endpoint_id: str) -> tuple[float, int]:
                return _load_order(self._score(request, view, endpoint_id, role="", matched=0))

            least = min(
                (
                    (load_only(endpoint.id), endpoint.id)
                    for endpoint in view.endpoints
                    if endpoint.id not in request.exclude and endpoint.id not in pair
                ),
                default=None,
            )
            if least is not None and least[0] < min(
                load_only(first.endpoint_id), load_only(second.endpoint_id)
            ):
                outside = self._score(request, view, least[1], role="least-loaded")
        if outside is None:
            return first, second
        return (first, outside) if weaker_is_second else (outside, second)

    def _score(
        self,
        request: RoutingRequest,
        view: ClusterView,
        endpoint_id: str,
        *,
        role: str,
        matched: int | None = None,
    ) -> CandidateScore:
        config = self.config
        return score_endpoint(
            request,
            view,
            endpoint_id,
            cost_model=config.cost_model,
            role=role,
            matched_blocks=matched,
            phase_aware=config.phase_aware,
            interference_weight=config.phase_interference_weight,
            charge_eviction=config.charge_eviction,
        )

    def _choose(
        self,
        request: RoutingRequest,
        first: CandidateScore,
        second: CandidateScore,
        *,
        depth: int,
        key_text: str,
    ) -> Decision:
        if first.expected_cached_blocks != second.expected_cached_blocks:
            if first.expected_cached_blocks > second.expected_cached_blocks:
                default, other = first, second
            else:
                default, other = second, first
            reason = DecisionReason.CACHE_AFFINITY
            why = (
                f"{default.endpoint_id} ({default.role}) holds {default.expected_cached_blocks}"
                f" cached blocks vs {other.expected_cached_blocks}"
            )
        else:
            if _load_order(first) <= _load_order(second):
                default, other = first, second
            else:
                default, other = second, first
            reason = DecisionReason.TIE_LESS_LOADED
            why = (
                f"equal reuse ({default.expected_cached_blocks} blocks): {default.endpoint_id} "
                f"({default.role}) is less loaded"
            )
        slo = slo_of(request, self.config)
        chosen = default
        if default.predicted_ttft_s > slo:
            if other.predicted_ttft_s <= slo:
                chosen = other
                reason = DecisionReason.SLO_SWITCH
                why = (
                    f"{default.endpoint_id} would break the {slo:g}s SLO "
                    f"({default.predicted_ttft_s:.3f}s): switched to {other.endpoint_id} "
                    f"({other.role}, {other.predicted_ttft_s:.3f}s)"
                )
            else:
                # A switch that cannot meet the SLO would only give the cache away (step 5).
                why += (
                    f"; both candidates over the {slo:g}s SLO ({default.endpoint_id} "
                    f"{default.predicted_ttft_s:.3f}s, {other.endpoint_id} "
                    f"{other.predicted_ttft_s:.3f}s): kept {default.endpoint_id}"
                )
        return Decision(
            endpoint_id=chosen.endpoint_id,
            reason=reason,
            policy=self.name,
            predicted_ttft_s=chosen.predicted_ttft_s,
            expected_cached_blocks=chosen.expected_cached_blocks,
            key_depth=depth,
            candidates=(first, second),
            detail=f"key {key_text}; {why}",
        )


def _load_order(score: CandidateScore) -> tuple[float, int]:
    # Phase-blind the score is the predicted TTFT; phase-aware it adds the decode interference.
    return (score.score, score.pending_prefill_tokens)
