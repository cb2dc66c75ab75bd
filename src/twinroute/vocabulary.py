"""The words every part of twinroute shares, each defined once: policy names, migration modes,
decision reasons, and the defaults of the routing settings a ModelPool and the scheduler share.

They live here, outside both `twinroute.scheduler` and `twinroute.operator`, because the
operator validates and defaults a ModelPool with them and the two packages never import each
other. The scheduler's policy registry and settings, the router's metric labels, the CLI
choices and the CRD's enums and defaults all read these (tests check the CRD and the protobuf
enum against them).
"""

from __future__ import annotations

import enum
import re
from typing import Final, Literal

# Routing policies, in the order tables and plots list them; "dualmap" is the default, the
# others are the baselines it is measured against (docs/design.md).
POLICY_NAMES: Final = (
    "dualmap",
    "round_robin",
    "least_loaded",
    "consistent_hash",
    "chwbl",
    "cache_aware",
    "min_ttft",
    "preble",
)
DEFAULT_POLICY: Final = "dualmap"
BASELINE_POLICY_NAMES: Final = tuple(name for name in POLICY_NAMES if name != DEFAULT_POLICY)

# Live migration of running requests: off; drain (a leaving engine's streams move before it
# goes); on (drain, and Llumnix-style moves off persistently overloaded engines).
MigrationMode = Literal["off", "drain", "on"]
MIGRATION_MODES: Final[tuple[MigrationMode, ...]] = ("off", "drain", "on")


# Defaults of the routing settings (`twinroute.scheduler.settings.SchedulerSettings`, the
# ModelPool's `spec.routing`, the CRD). Why each value: docs/design.md.
DEFAULT_TTFT_SLO_S: Final = 5.0
DEFAULT_VIRTUAL_NODES: Final = 256
# Prefix keys hash token blocks of this size (a multiple of vLLM's 16-token block; 64 keeps
# the prefix record cheap at long prompts) and text prompts in blocks of this many characters.
DEFAULT_KEY_BLOCK_TOKENS: Final = 64
DEFAULT_KEY_BLOCK_CHARS: Final = 256
DEFAULT_SCRAPE_INTERVAL_S: Final = 1.0
# Prefill/decode pools: a decode engine prefills a prompt itself when at most this many of its
# tokens are uncached there (llm-d's decider threshold).
DEFAULT_PD_MIN_PREFILL_TOKENS: Final = 100


class DecisionReason(enum.StrEnum):
    """Why an endpoint was chosen; the value is the `reason` metric label and the router's
    `x-twinroute-reason` header.

    Mirrors `twinroute.v1.DecisionReason` (DECISION_REASON_<NAME> <-> NAME.lower()).
    """

    CACHE_AFFINITY = "cache_affinity"
    SLO_SWITCH = "slo_switch"
    TIE_LESS_LOADED = "tie_less_loaded"
    LEAST_LOADED = "least_loaded"
    ROUND_ROBIN = "round_robin"
    HASH = "hash"
    HASH_BOUNDED = "hash_bounded"
    MIN_TTFT = "min_ttft"
    EXPLOIT = "exploit"
    EXPLORE = "explore"
    ONLY_CANDIDATE = "only_candidate"
    SESSION_AFFINITY = "session_affinity"
    # A queued request moved off a hotspot to its other candidate (DualMap's rebalancing).
    REBALANCED = "rebalanced"
    # The router placed the request itself because the scheduler could not be reached.
    FALLBACK = "fallback"
    # A queued request moved off an endpoint that is leaving the pool (scale-in).
    DRAINED = "drained"
    # A reason this side of the contract does not know (a newer peer's): the placement
    # stands, only its label is unknown.
    UNSPECIFIED = "unspecified"


__all__ = [
    "BASELINE_POLICY_NAMES",
    "DEFAULT_KEY_BLOCK_CHARS",
    "DEFAULT_KEY_BLOCK_TOKENS",
    "DEFAULT_PD_MIN_PREFILL_TOKENS",
    "DEFAULT_POLICY",
    "DEFAULT_SCRAPE_INTERVAL_S",
    "DEFAULT_TTFT_SLO_S",
    "DEFAULT_VIRTUAL_NODES",
    "MIGRATION_MODES",
    "POLICY_NAMES",
    "DecisionReason",
    "MigrationMode",
]

# A Hugging Face hub repository id (`name` or `owner/name`): what the front ends' `--tokenizer`
# fetches when it is not a local path, and what a ModelPool's `routing.tokenizer.source` must be
# when no volume is mounted for it.
HUB_REPOSITORY_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
