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

Predicted TTFT on an instance, phase-blind (the default before `phase_aware`): time to clear
the prefill already queued there (pending prefill tokens at the dense rate, slowed by the decode
tokens that share each step's token budget) + the prefill of the request's uncached part.

Phase-aware (`estimate_ttft_s(phase_aware=True)`), as vLLM's chunked prefill runs it: every
step carries one token per decoding sequence and fills the rest of the `step_token_budget`
with prefill, so clearing the queued prefill P and the request's own uncached part u takes
`ceil((P + u) / (budget - d))` steps, each of which also pays one decode step over the d
decoding sequences and their KV:

    TTFT = P / linear_tokens_per_s + prefill(u, c)
           + ceil((P + u) / (budget - d)) * decode_step_time_s(d, kv_tokens)

`interference_s` is the other side of the mix, the time the request costs the sequences already
decoding there: each of the d waits for the request's prefill chunks, and then for its own
decode work (one more sequence in every step, reading its growing KV) for as many steps as it
is expected to produce output. Placement adds it, weighted, to the score it ranks candidates
by; the TTFT it compares with the SLO stays the request's own.

`OutputLengthEstimator` supplies the expected output when a request does not bring one (no
max_tokens): a running mean of the output lengths completed per prefix group.
"""

from __future__ import annotations

import math
from collections import OrderedDict
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

    def calibrated(self, *, time_scale: float, overhead_s: float) -> CostModel:
        """This model on hardware `time_scale` times slower, with a fixed overhead per request
        of `overhead_s` (`scheduler/calibration.py`): every prediction becomes
        overhead_s + time_scale * (this model's prediction - its step_overhead_s)."""
        if time_scale <= 0 or overhead_s < 0:
            raise ValueError(
                f"need time_scale > 0 and overhead_s >= 0, got {time_scale} and {overhead_s}"
            )
        # Every field named (not `dataclasses.replace`, four times the cost): the calibration
        # rebuilds two models per reported first token.
        return CostModel(
            name=self.name,
            linear_tokens_per_s=self.linear_tokens_per_s / time_scale,
            attention_s_per_token_pair=self.attention_s_per_token_pair * time_scale,
            step_overhead_s=overhead_s,
            decode_overhead_s=self.decode_overhead_s * time_scale,
            per_sequence_s=self.per_sequence_s * time_scale,
            kv_read_s_per_token=self.kv_read_s_per_token * time_scale,
            step_token_budget=self.step_token_budget,
        )

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
        phase_aware: bool = False,
    ) -> float:
        """Predicted TTFT of a request on an instance carrying `load`.

        `phase_aware`: count the decode steps interleaved with the prefill (module docstring)
        instead of shrinking the prefill rate by the decode tokens' share of the budget.
        """
        prefill = self.prefill_time_s(uncached_tokens=uncached_tokens, cached_tokens=cached_tokens)
        if not phase_aware:
            queue = self.queue_time_s(load) if expected_queue_s is None else expected_queue_s
            return queue + prefill
        decoding, kv_tokens = decode_load(load)
        pending = load.pending_prefill_tokens
        queue = pending / self.linear_tokens_per_s if expected_queue_s is None else expected_queue_s
        if decoding == 0:
            return queue + prefill
        steps = math.ceil(
            (pending + max(0, uncached_tokens)) / self._prefill_tokens_per_step(decoding)
        )
        per_step = self.decode_step_time_s(batch_size=decoding, kv_tokens=kv_tokens)
        return queue + prefill + max(1, steps) * per_step

    def _prefill_tokens_per_step(self, decoding: int) -> float:
        budget = float(self.step_token_budget)
        return max(0.05 * budget, budget - decoding)

    def interference_s(
        self,
        *,
        uncached_tokens: int,
        cached_tokens: int,
        prompt_tokens: int,
        expected_output_tokens: int,
        load: LoadSnapshot,
    ) -> float:
        """Delay the request inflicts on the sequences decoding on an instance carrying `load`,
        summed over them (sequence-seconds): its prefill chunks ride in their steps, then its
        own decode adds a sequence and its KV to each of `expected_output_tokens` steps."""
        decoding, _kv_tokens = decode_load(load)
        if decoding == 0:
            return 0.0
        prefill = self.prefill_time_s(
            uncached_tokens=uncached_tokens, cached_tokens=cached_tokens
        ) - self.prefill_time_s(uncached_tokens=0, cached_tokens=0)
        output = max(0, expected_output_tokens)
        per_step = self.per_sequence_s + self.kv_read_s_per_token * (prompt_tokens + output / 2.0)
        return decoding * (max(0.0, prefill) + output * per_step)

    def slo_prefill_budget_tokens(self, slo_s: float) -> int:
        """Pending prefill tokens an idle-decoding instance clears within `slo_s`."""
        return int(max(0.0, slo_s) * self.linear_tokens_per_s)


def decode_load(load: LoadSnapshot) -> tuple[int, int]:
    """(sequences decoding, their KV tokens) on an instance: the scheduler's own leases, raised
    to a fresh scrape's running count when the engine runs more than the leases know of (the
    unknown sequences are assumed to hold as much KV as the known ones on average)."""
    decoding = load.decoding
    kv_tokens = load.decoding_tokens
    if load.running is not None and load.running > decoding:
        if decoding > 0:
            kv_tokens = round(kv_tokens * load.running / decoding)
        decoding = load.running
    return decoding, kv_tokens


class OutputLengthEstimator:
    """Expected output tokens of a request that did not say (no max_tokens), per prefix group.

    A group is the prompt's first key block (the system prompt or task template that shapes
    how long answers run). Each group keeps an exponentially weighted mean of the output
    lengths completed in it; unseen groups get the mean over all groups, or `prior_tokens`
    before any completion. Memory is bounded: at most `max_groups` groups, least recently used
    dropped first. O(1) per observation and estimate.
    """

    def __init__(
        self, *, max_groups: int = 4096, weight: float = 0.2, prior_tokens: int = 256
    ) -> None:
        if max_groups < 1 or not 0.0 < weight <= 1.0 or prior_tokens < 0:
            raise ValueError(
                f"need max_groups >= 1, 0 < weight <= 1, prior >= 0; got {max_groups}, "
                f"{weight}, {prior_tokens}"
            )
        self._max_groups = max_groups
        self._weight = weight
        self._groups: OrderedDict[int, float] = OrderedDict()
        self._overall = float(prior_tokens)

    def __len__(self) -> int:
        return len(self._groups)

    def estimate(self, group: int | None) -> int:
        if group is None or group not in self._groups:
            return round(self._overall)
        self._groups.move_to_end(group)
        return round(self._groups[group])

    def observe(self, group: int | None, output_tokens: int) -> None:
        if output_tokens <= 0:
            return
        self._overall += self._weight * (output_tokens - self._overall)
        if group is None:
            return
        mean = self._groups.pop(group, None)
        self._groups[group] = (
            float(output_tokens) if mean is None else mean + self._weight * (output_tokens - mean)
        )
        while len(self._groups) > self._max_groups:
            self._groups.popitem(last=False)


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
