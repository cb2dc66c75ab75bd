"""Value types shared by the routing core, the live scheduler and the cluster simulator.

Everything here is immutable: a policy gets one `ClusterView` per decision and can neither
change it nor keep a reference that changes under it. Mutable routing state (hash rings, the
prefix index, leases) lives in its owners and is read through the view.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

import numpy as np
import numpy.typing as npt

from twinroute.vocabulary import DecisionReason

BlockHashes = npt.NDArray[np.uint64]


class Role(enum.StrEnum):
    UNIFIED = "unified"
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One engine instance the scheduler can route to."""

    id: str
    address: str
    role: Role = Role.UNIFIED
    model: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LoadSnapshot:
    """What the scheduler believes one endpoint carries at decision time.

    `in_flight` and `pending_prefill_tokens` come from the scheduler's own leases and are
    always known. `running`, `queued` and `kv_usage` come from scraping the engine and are
    `None` when the last scrape is missing or stale: unknown, never zero.
    """

    in_flight: int = 0
    pending_prefill_tokens: int = 0
    # Sequences the scheduler believes are decoding there (leases past their prefill).
    decoding: int = 0
    running: int | None = None
    queued: int | None = None
    kv_usage: float | None = None
    scrape_age_s: float | None = None
    # KV tokens (prompts) of the sequences counted in `decoding`: what their decode steps read.
    decoding_tokens: int = 0


EMPTY_LOAD = LoadSnapshot()


@dataclass(frozen=True, slots=True)
class PromptKeys:
    """Chained block hashes of a prompt, the unit of prefix-cache affinity.

    `block_hashes[i]` stands for the whole prefix up to and including block i (like vLLM's
    block hashes), seeded by model, LoRA adapter and cache_salt so that different namespaces
    never share a key. Only full blocks are hashed.

    Units are tokens when keys come from token ids (or a trace's block ids) and characters in
    text mode (no tokenizer); `block_size` and `total_units` share that unit, and
    `prefix_tokens` converts a matched block count into prompt tokens either way.
    """

    block_size: int
    block_hashes: BlockHashes
    total_units: int
    # The prompt's blocks as the engines hash them (vLLM's 64-bit block hashes, from its token
    # ids; `scheduler/vllm_blocks.py`), when the scheduler follows the engines' KV events; what
    # their events name, so a lookup in them is exact. Empty: not known.
    engine_hashes: tuple[int, ...] = ()
    # Tokens per engine block (those hashes' unit).
    engine_block_size: int = 0

    @property
    def num_blocks(self) -> int:
        return int(self.block_hashes.shape[0])

    def prefix_tokens(self, matched_blocks: int, *, prompt_tokens: int) -> int:
        """Prompt tokens covered by the first `matched_blocks` blocks."""
        if matched_blocks <= 0 or self.total_units <= 0:
            return 0
        covered_units = min(matched_blocks * self.block_size, self.total_units)
        return min(prompt_tokens, round(prompt_tokens * covered_units / self.total_units))


@dataclass(frozen=True, slots=True)
class RoutingRequest:
    """One request as the routing core sees it."""

    request_id: str
    keys: PromptKeys
    prompt_tokens: int
    session_id: str = ""
    expected_output_tokens: int = 0
    # None: the policy's configured default SLO.
    ttft_slo_s: float | None = None
    # Endpoint ids that must not be chosen (the router already failed there).
    exclude: frozenset[str] = frozenset()
    # Its first token will be reported (it streams); the lease queue may wait for the report.
    reports_first_token: bool = False


class PrefixIndexView(Protocol):
    """Read side of the scheduler's approximate record of what each endpoint has cached."""

    def matched_blocks(self, endpoint_id: str, keys: PromptKeys) -> int:
        """Number of leading blocks of `keys` believed cached on the endpoint."""
        ...

    def holders(self, keys: PromptKeys) -> Mapping[str, int]:
        """Every endpoint believed to hold a prefix of `keys`, with its matched block count."""
        ...


@dataclass(frozen=True, slots=True)
class ClusterView:
    """Immutable input to one routing decision."""

    endpoints: tuple[Endpoint, ...]
    loads: Mapping[str, LoadSnapshot]
    prefix_index: PrefixIndexView
    now: float
    # Endpoints whose cost model was fitted to what they really do (`scheduler/calibration.py`);
    # the others are predicted with the policy's configured profile. The values are
    # `CostModel`s, read through `policies.base.cost_model_of` (the cost model module imports
    # this one, so it cannot be named here).
    cost_models: Mapping[str, object] = field(default_factory=lambda: _NO_COST_MODELS)

    def load(self, endpoint_id: str) -> LoadSnapshot:
        return self.loads.get(endpoint_id, EMPTY_LOAD)

    def ids(self) -> tuple[str, ...]:
        return tuple(e.id for e in self.endpoints)


@dataclass(frozen=True, slots=True)
class CandidateScore:
    endpoint_id: str
    score: float
    predicted_ttft_s: float
    expected_cached_blocks: int
    pending_prefill_tokens: int
    role: str = ""


@dataclass(frozen=True, slots=True)
class Decision:
    """A policy's answer, with enough context to explain it later."""

    endpoint_id: str
    reason: DecisionReason
    policy: str
    predicted_ttft_s: float = 0.0
    expected_cached_blocks: int = 0
    key_depth: int = 0
    candidates: tuple[CandidateScore, ...] = ()
    detail: str = ""
    prefill_endpoint_id: str | None = None


class NoEndpointError(LookupError):
    """No routable endpoint is left for the request (empty pool, or all excluded)."""


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """One past decision, as Explain reports it (`decided_at` on the recorder's clock)."""

    request_id: str
    lease_id: str
    decided_at: float
    prompt_blocks: int
    prompt_tokens: int
    decision: Decision


_NO_COST_MODELS: Mapping[str, object] = MappingProxyType({})
