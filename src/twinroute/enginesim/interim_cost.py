"""INTERIM step costs, used only while `twinroute.scheduler.costmodel` is not in the tree.

The engine simulator is meant to run the shared `CostModel` (see `twinroute.simulator.sim_cost`),
so that the live benchmark and the cluster simulator price a step the same way. Until that
module lands, `twinroute engine-sim` falls back to this first-order roofline for Llama-3-8B
(bf16) on one H100 SXM, logs a warning saying so, and names it in `/v1/models`.

- Prefill: 2 x 8.03e9 FLOPs per new token, plus attention over the context (4 x 32 layers x
  4096 x context FLOPs per token), at 400 TFLOP/s effective (about 40% of dense peak), plus
  2 ms of fixed overhead per prefill chunk.
- Decode step: reading 16 GB of weights and the batch's KV (128 KiB per token) at 3 TB/s,
  plus 1 ms of step overhead and 20 us per sequence of sampling and scheduling.
"""

from __future__ import annotations

from typing import Any

INTERIM_NAME = "interim-roofline-llama3-8b-h100"

_PARAMS_FLOPS_PER_TOKEN = 2 * 8.03e9
_ATTENTION_FLOPS_PER_TOKEN_PER_CONTEXT = 4 * 32 * 4096
_EFFECTIVE_FLOPS = 400e12
_STEP_OVERHEAD_S = 0.002
_WEIGHT_BYTES = 16.06e9
_KV_BYTES_PER_TOKEN = 131_072
_MEMORY_BANDWIDTH = 3.0e12
_PER_SEQUENCE_S = 20e-6


class InterimRooflineCost:
    def prefill_time_s(self, *, uncached_tokens: int, cached_tokens: int) -> float:
        mean_context = cached_tokens + uncached_tokens / 2
        flops = uncached_tokens * (
            _PARAMS_FLOPS_PER_TOKEN + _ATTENTION_FLOPS_PER_TOKEN_PER_CONTEXT * mean_context
        )
        return _STEP_OVERHEAD_S + flops / _EFFECTIVE_FLOPS

    def decode_step_time_s(self, *, batch_size: int, kv_tokens: Any) -> Any:
        # `kv_tokens` may be an array (the instance vectorises runs of decode steps).
        memory = (_WEIGHT_BYTES + kv_tokens * _KV_BYTES_PER_TOKEN) / _MEMORY_BANDWIDTH
        return _STEP_OVERHEAD_S / 2 + memory + batch_size * _PER_SEQUENCE_S
