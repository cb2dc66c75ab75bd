"""What a request costs an instance, in seconds: the one model the TTFT estimator, the cluster
simulator's instances and the engine simulator share.

Prefill of `u` new tokens after `c` cached ones:

    step_overhead_s + u / linear_tokens_per_s + attention_s_per_token_pair * (u * c + u * u / 2)

The first term is the fixed cost of a forward pass, the second the dense layers (cost per token,
independent of context), the third attention over the context each new token sees (it grows
with both the cached prefix and the new part, so long prompts prefill more slowly per token).

A decode step over `batch_size` sequences holding `kv_tokens` tokens of KV in total:

    decode_overhead_s + per_sequence_s * batch_size + kv_read_s_per_token * kv_tokens

(reading the weights once per step, a little compute per sequence, and reading every
sequence's KV cache, which dominates at long contexts).

Predicted TTFT on an instance = time to clear the prefill already queued there (pending
prefill tokens at the dense rate, slowed by the decode tokens that share each step's token
budget) + the prefill of the request's uncached part.
"""

from __future__ import annotations

from dataclasses import dataclass

from twinroute.scheduler.types import LoadSnapshot


@dataclass(frozen=True, slots=True)
class CostModel:
    """Per-instance costs of one model on one accelerator. All times in seconds."""

    name: str
    # Dense-layer prefill throughput at short context, tokens per second.
    linear_tokens_per_s: float
    # Attention cost per (new token x context token) pair.
    attention_s_per_token_pair: float
    # Fixed cost of one forward pass (scheduling, kernel launches, sampling).
    step_overhead_s: float
    # Decode step: weights read once, per-sequence compute, KV read per context token.
    decode_overhead_s: float
    per_sequence_s: float
    kv_read_s_per_token: float
    # Tokens one step may carry (vLLM's max_num_batched_tokens with chunked prefill).
    step_token_budget: int = 8192

    def prefill_time_s(self, *, uncached_tokens: int, cached_tokens: int) -> float:
        if uncached_tokens <= 0:
            return self.step_overhead_s
        new = float(uncached_tokens)
        attention = self.attention_s_per_token_pair * (new * cached_tokens + new * new / 2.0)
        return self.step_overhead_s + new / self.linear_tokens_per_s + attention

    def decode_step_time_s(self, *, batch_size: int, kv_tokens: int) -> float:
        if batch_size <= 0:
            return 0.0
        return (
            self.decode_overhead_s
            + self.per_sequence_s * batch_size
            + self.kv_read_s_per_token * kv_tokens
        )

    def prefill_share(self, *, decoding: int) -> float:
        """Share of each step's token budget left to prefill while `decoding` sequences run."""
        budget = float(self.step_token_budget)
        return max(0.05, (budget - decoding) / budget)

    def queue_time_s(self, load: LoadSnapshot) -> float:
        """Time until an instance has cleared the prefill already queued on it."""
        decoding = load.decoding
        if load.running is not None:
            decoding = max(decoding, load.running)
        return load.pending_prefill_tokens / (
            self.linear_tokens_per_s * self.prefill_share(decoding=decoding)
        )

    def estimate_ttft_s(
        self,
        *,
        uncached_tokens: int,
        cached_tokens: int,
        load: LoadSnapshot,
        expected_queue_s: float | None = None,
    ) -> float:
        """Predicted TTFT of a request on an instance carrying `load`."""
        queue = self.queue_time_s(load) if expected_queue_s is None else expected_queue_s
        return queue + self.prefill_time_s(
            uncached_tokens=uncached_tokens, cached_tokens=cached_tokens
        )

    def slo_prefill_budget_tokens(self, slo_s: float) -> int:
        """Pending prefill tokens an idle-decoding instance clears within `slo_s`."""
        return int(max(0.0, slo_s) * self.linear_tokens_per_s)


# Llama-3-8B (bf16) on one H100 SXM, as vLLM runs it.
# - Dense prefill: ~2 x 8e9 FLOPs per token; at ~40% of the H100's ~990 TFLOPs dense bf16 peak
#   that is ~25k tokens/s, and vLLM's published prefill throughput for 7-8B models on H100 sits
#   around 15-25k tokens/s at short contexts: we take 20k.
# - Attention: ~4 x layers x hidden = 4 x 32 x 4096 FLOPs per (token, context token) pair,
#   ~5.2e5 FLOPs, at ~50% of peak -> ~1.05e-9 s per pair (a 16k-token prompt spends ~0.13 s in
#   attention on top of ~0.8 s of dense layers, about 1 s in all, in line with reported TTFTs).
# - Decode: reading 16 GB of weights at ~3.35 TB/s is ~5 ms; with overheads ~6 ms per step.
#   KV per token (32 layers x 8 KV heads x 128 dims x K and V x 2 bytes) is 128 KiB, read at
#   ~3.35 TB/s -> ~3.9e-8 s per context token per step.
LLAMA3_8B_H100 = CostModel(
    name="llama3-8b-h100",
    linear_tokens_per_s=20_000.0,
    attention_s_per_token_pair=1.05e-9,
    step_overhead_s=0.004,
    decode_overhead_s=0.006,
    per_sequence_s=3.0e-5,
    kv_read_s_per_token=3.9e-8,
    step_token_budget=8192,
)

# Qwen2.5-7B on one A100 80GB (DualMap's setup class): roughly half the H100's dense compute
# and ~2 TB/s of memory bandwidth; KV per token is 28 layers x 4 KV heads x 128 x 2 x 2 bytes
# = 56 KiB -> ~2.9e-8 s per context token per step.
QWEN25_7B_A100 = CostModel(
    name="qwen2.5-7b-a100",
    linear_tokens_per_s=10_000.0,
    attention_s_per_token_pair=2.0e-9,
    step_overhead_s=0.005,
    decode_overhead_s=0.009,
    per_sequence_s=4.0e-5,
    kv_read_s_per_token=2.9e-8,
    step_token_budget=8192,
)

COST_PROFILES: dict[str, CostModel] = {
    model.name: model for model in (LLAMA3_8B_H100, QWEN25_7B_A100)
}
DEFAULT_COST_PROFILE = LLAMA3_8B_H100.name
