"""Hardware/model profiles for simulated instances.

A profile names the step-cost model (shared with the live scheduler's TTFT estimator, see
`twinroute.scheduler.costmodel.COST_PROFILES`) and the engine limits that shape batching and
caching.

`llama3-8b-h100`: Llama-3-8B (bf16) served by vLLM on one H100 SXM 80 GB.
- KV cache per token: 2 (K and V) x 32 layers x 8 KV heads (GQA) x 128 head dim x 2 bytes
  = 131,072 bytes (128 KiB).
- Memory for KV: vLLM's default `gpu_memory_utilization=0.9` of the 79.2 GiB the driver
  reports is 71.3 GiB; minus 15.0 GiB of weights (8.03 B parameters x 2 bytes) and about
  3 GiB of activations and CUDA graphs leaves about 53 GiB, i.e. about 434k tokens. The
  default is 432,000 tokens (27,000 vLLM blocks of 16 tokens), the same order vLLM logs as
  "GPU KV cache size" for this model on this card.
- On the bundled Mooncake trace (61.2 M prompt tokens in all, 22.5 M distinct, unbounded-cache
  hit rate 65%), 8 such instances hold 3.46 M tokens: 15% of the distinct prompt tokens and
  5.6% of all request tokens. That is a tighter cache than the DualMap setup (whose notes put
  its cache at about 30% of all request tokens, with Qwen2.5-7B's smaller KV footprint), so
  affinity matters at least as much here; `--kv-capacity-tokens` sets another size.
- Batching: vLLM's V1 defaults for an OpenAI server on a large GPU, 8,192 batched tokens per
  step (chunked prefill) and at most 256 running sequences.
- KV transfer (disaggregated prefill/decode, `--pd`): the prompt's KV goes from the prefill to
  the decode instance over RDMA (vLLM's NixlConnector). 131,072 bytes per token (above) over a
  25 GB/s link, one 200 Gb/s NIC per GPU as in common H100 nodes (InfiniBand NDR or RoCE;
  400 Gb/s NICs double it): 5.2 us per token, 21 ms for a 4k-token prompt, 0.34 s for 64k.
  Plus 2 ms per transfer for the handshake and completion notice. Transfers do not contend
  for the link (each gets its full bandwidth), a simplification that flatters disaggregation
  at high rates.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from twinroute.simulator.instance import InstanceConfig


@dataclass(frozen=True, slots=True)
class InstanceProfile:
    name: str
    # Key into twinroute.scheduler.costmodel.COST_PROFILES.
    cost_profile: str
    kv_capacity_tokens: int
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    description: str = ""
    # Disaggregated serving: KV bytes per prompt token, link bandwidth and per-transfer latency.
    kv_bytes_per_token: int = 131_072
    kv_transfer_bytes_per_s: float = 25e9
    kv_transfer_latency_s: float = 0.002

    def kv_transfer_s(self, tokens: int) -> float:
        """Time to move the KV of `tokens` prompt tokens from a prefill to a decode instance."""
        if tokens <= 0:
            return 0.0
        return self.kv_transfer_latency_s + tokens * self.kv_bytes_per_token / (
            self.kv_transfer_bytes_per_s
        )

    def instance_config(self, *, block_size: int) -> InstanceConfig:
        return InstanceConfig(
            kv_capacity_tokens=self.kv_capacity_tokens,
            block_size=block_size,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_num_seqs=self.max_num_seqs,
        )

    def with_kv_capacity(self, tokens: int | None) -> InstanceProfile:
        return self if tokens is None else replace(self, kv_capacity_tokens=tokens)


INSTANCE_PROFILES: dict[str, InstanceProfile] = {
    "llama3-8b-h100": InstanceProfile(
        name="llama3-8b-h100",
        cost_profile="llama3-8b-h100",
        kv_capacity_tokens=432_000,
        description="Llama-3-8B bf16 on one H100 SXM 80 GB, vLLM V1 defaults",
    ),
}

DEFAULT_PROFILE = "llama3-8b-h100"


def get_profile(name: str) -> InstanceProfile:
    try:
        return INSTANCE_PROFILES[name]
    except KeyError:
        raise ValueError(
            f"unknown instance profile {name!r}; choose from {sorted(INSTANCE_PROFILES)}"
        ) from None
