"""preble: Preble's E2 rule (exploit a long cached prefix, otherwise explore by cost).

Steps (Preble, ICLR 2025, section "E2 scheduling"):
1. The longest cached prefix: the most blocks of the prompt any eligible endpoint is believed
   to hold (`holders` of the prefix index, standing in for Preble's global radix tree).
2. Exploit when that prefix covers more prompt tokens than the rest (cached > new): among the
   endpoints holding that longest prefix, the one with the lowest load cost (EXPLOIT).
3. Explore otherwise: over all eligible endpoints, the lowest
   load cost + eviction cost + recompute cost (EXPLORE), where, on endpoint i,
   - load cost L_i: Preble sums the compute time of the requests a GPU serves in a recent
     window (prefill + decode). We take the forward-looking equivalent the scheduler knows:
     the time to clear the prefill queued there (cost-model queueing, which already slows for
     the decode tokens sharing each step) + `DECODE_WINDOW_STEPS` decode steps of the batch
     decoding there (the decode work the new prefill will be interleaved with);
   - eviction cost: Preble charges the recompute time of the cached prefixes the new request
     would evict, weighted by their hit rate. We have no per-node hit rates, so we charge the
     request's own recompute time scaled by cache pressure: the engine's KV usage when a
     fresh scrape gives it, else the queued prefill relative to what the SLO allows
     (pending / `slo_prefill_budget_tokens`, capped at 1) as a proxy for a filling cache;
   - recompute cost: the prefill time of the prompt's part not cached on i.
   Ties go to the view's order.
Not modelled: Preble's replication of hot prefixes and its post-assignment load adjustment;
its local (per-GPU) scheduler is the engine's business.

Cost: one `holders` call and O(N) arithmetic; prefill times are computed once per distinct
matched depth.
"""

from __future__ import annotations

from twinroute.scheduler.costmodel import CostModel
from twinroute.scheduler.policies.base import (
    Policy,
    cost_model_of,
    eligible_endpoints,
    slo_of,
)
from twinroute.scheduler.types import (
    ClusterView,
    Decision,
    LoadSnapshot,
    RoutingRequest,
)

from twinroute.vocabulary import DecisionReason

DECODE_WINDOW_STEPS = 16


class PreblePolicy(Policy):
    name = "preble"

    def _load_cost_s(self, load: LoadSnapshot, cost: CostModel) -> float:
        decoding = load.decoding if load.running is None else max(load.decoding, load.running)
        decode = cost.decode_step_time_s(batch_size=decoding, kv_tokens=0) * DECODE_WINDOW_STEPS
        return cost.queue_time_s(load) + decode

    def pick(self, request: RoutingRequest, view: ClusterView) -> Decision:
        eligible = eligible_endpoints(request, view)
        cost = self.config.cost_model
        holders = view.prefix_index.holders(request.keys)
        eligible_ids = {e.id for e in eligible} if request.exclude else None
        longest = 0
        for endpoint_id, matched in holders.items():
            if matched > longest and (eligible_ids is None or endpoint_id in eligible_ids):
                longest = matched
        cached = request.keys.prefix_tokens(longest, prompt_tokens=request.prompt_tokens)
        new = request.prompt_tokens - cached
        if len(eligible) == 1:
            return self._decide(
                request,
                view,
                eligible[0].id,
                DecisionReason.ONLY_CANDIDATE,
                "",
                matched_blocks=holders.get(eligible[0].id, 0),
            )
        if longest > 0 and cached > new:
            best = min(
                (
                    self._load_cost_s(view.load(e.id), cost_model_of(view, e.id, cost)),
                    order,
                    e.id,
                )
                for order, e in enumerate(eligible)
                if holders.get(e.id, 0) == longest
            )
            return self._decide(
                request,
                view,
                best[2],
                DecisionReason.EXPLOIT,
                f"cached prefix {cached} tokens > new {new}: least loaded holder "
                f"(load cost {best[0]:.3f}s)",
                matched_blocks=longest,
            )
        budget = max(1, cost.slo_prefill_budget_tokens(slo_of(request, self.config)))
        recompute_by_matched: dict[int, float] = {}
        ranked: list[tuple[float, int, str, float, float, float]] = []
        for order, endpoint in enumerate(eligible):
            matched = holders.get(endpoint.id, 0)
            here_cost = cost_model_of(view, endpoint.id, cost)
            recompute = recompute_by_matched.get(matched) if here_cost is cost else None
            if recompute is None:
                here = request.keys.prefix_tokens(matched, prompt_tokens=request.prompt_tokens)
                recompute = here_cost.prefill_time_s(
                    uncached_tokens=request.prompt_tokens - here, cached_tokens=here
                )
                if here_cost is cost:
                    recompute_by_matched[matched] = recompute
            load = view.load(endpoint.id)
            if load.kv_usage is not None:
                pressure = min(1.0, max(0.0, load.kv_usage))
            else:
                pressure = min(1.0, load.pending_prefill_tokens / budget)
            load_cost = self._load_cost_s(load, here_cost)
            eviction = pressure * recompute
            total = load_cost + eviction + recompute
            ranked.append((total, order, endpoint.id, load_cost, eviction, recompute))
        total, _order, chosen, load_cost, eviction, recompute = min(ranked)
        return self._decide(
            request,
            view,
            chosen,
            DecisionReason.EXPLORE,
            f"cached prefix {cached} tokens <= new {new}: lowest cost {total:.3f}s = load "
            f"{load_cost:.3f} + eviction {eviction:.3f} + recompute {recompute:.3f}",
            matched_blocks=holders.get(chosen, 0),
        )
