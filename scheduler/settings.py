"""`SchedulerSettings`: every setting of the scheduler, in one frozen, validated object.

One object, one default per setting (the shared ones from `twinroute.vocabulary`), units in the
names, and one "not given" (`None`). `twinroute scheduler` builds it from its flags and its
config file, the embedded router from its flags, the simulator and the benchmarks from their
runs; `twinroute.scheduler.build` turns it into a core and a service, the only place that does.

The config file (`scheduler.yaml`, rendered by the operator from a ModelPool) has a schema:
`parse_config` reads every key it knows into the settings and refuses an unknown key by name,
so a key the operator writes and nobody reads is an error, not a silent no-op.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, get_args

from twinroute.scheduler.costmodel import COST_PROFILES, DEFAULT_COST_PROFILE
from twinroute.scheduler.policies.base import (
    COLD_LEAST_LOADED,
    COLD_PLACEMENTS,
    DEFAULT_PHASE_INTERFERENCE_WEIGHT,
)
from twinroute.scheduler.policies.pd import DEFAULT_TRANSFER_S_PER_TOKEN

from twinroute.vocabulary import (
    DEFAULT_KEY_BLOCK_CHARS,
    DEFAULT_KEY_BLOCK_TOKENS,
    DEFAULT_PD_MIN_PREFILL_TOKENS,
    DEFAULT_POLICY,
    DEFAULT_SCRAPE_INTERVAL_S,
    DEFAULT_TTFT_SLO_S,
    DEFAULT_VIRTUAL_NODES,
    MIGRATION_MODES,
    POLICY_NAMES,
    MigrationMode,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerSettings:
    """How one scheduler routes; see docs/design.md for what each setting does and why."""

    # -- placement ---------------------------------------------------------------------------
    policy: str = DEFAULT_POLICY
    # The TTFT objective of requests that bring none of their own.
    ttft_slo_s: float = DEFAULT_TTFT_SLO_S
    # Points per endpoint on each hash ring.
    virtual_nodes: int = DEFAULT_VIRTUAL_NODES
    # Seed of the policy's own random choices (rings, exploration); the simulator varies it.
    policy_seed: int = 0
    # The TTFT estimator's cost model (`twinroute.scheduler.costmodel.COST_PROFILES`).
    cost_profile: str = DEFAULT_COST_PROFILE
    # Fit each endpoint's cost model from its reported first tokens, the profile as the prior
    # (`scheduler/calibration.py`); off: predict with the profile as it is.
    cost_calibration: bool = True
    # Placement counts decode load and the request's expected output (phase-aware), and how
    # much the delay inflicted on decoding sequences weighs against the request's own TTFT.
    phase_aware: bool = True
    # dualmap: where a prompt its ring pair does not hold may go (`policies.base.COLD_PLACEMENTS`).
    cold_placement: str = COLD_LEAST_LOADED
    phase_interference_weight: float = DEFAULT_PHASE_INTERFERENCE_WEIGHT
    # DualMap's hotspot rebalancing of queued requests (policies that use it).
    rebalance: bool = True
    # -- prompt keys -------------------------------------------------------------------------
    key_block_tokens: int = DEFAULT_KEY_BLOCK_TOKENS
    key_block_chars: int = DEFAULT_KEY_BLOCK_CHARS
    # Model tokens per character, to estimate a text prompt's length when the caller did not.
    tokens_per_char: float = 0.25
    # Tokens each engine's prefix cache holds, to size the scheduler's record of it; None: the
    # prefix index's default size.
    prefix_capacity_tokens: int | None = None
    # The engines' KV-cache events (vLLM --kv-events-config, ZMQ): each engine publishes on
    # tcp://*:PORT, and the scheduler subscribes at tcp://ENGINE_HOST:PORT (None: off), or at
    # the addresses given per endpoint ((endpoint id, tcp://HOST:PORT) pairs).
    kv_events_port: int | None = None
    kv_events_endpoints: tuple[tuple[str, str], ...] = ()
    # Where the engines answer requests for missed batches (vLLM's kv-events-config
    # `replay_endpoint`): a gap in a stream, or a scheduler that joins one mid-way, is caught
    # up from there when the engine still holds the batches (None / absent: gaps stay partial).
    kv_events_replay_port: int | None = None
    kv_events_replay_endpoints: tuple[tuple[str, str], ...] = ()
    # How the engines hash blocks, to compute the same hashes from a request's token ids:
    # tokens per block (None: `key_block_tokens`) and their PYTHONHASHSEED (None: unset).
    engine_block_size: int | None = None
    engine_hash_seed: str | None = None
    # Hash long prompts' prefix keys on a worker thread (numpy releases the GIL), so one huge
    # prompt does not stall every other request on the event loop; off: inline, always.
    offload_long_prompts: bool = True
    # -- load --------------------------------------------------------------------------------
    # A lease whose Complete never came closes after this long.
    lease_ttl_s: float = 600.0
    # Engine metric scrapes (0 = off) and how long one may take.
    scrape_interval_s: float = DEFAULT_SCRAPE_INTERVAL_S
    scrape_timeout_s: float = 0.8
    # -- prefill/decode pools ----------------------------------------------------------------
    pd_min_prefill_tokens: int = DEFAULT_PD_MIN_PREFILL_TOKENS
    # Seconds per prompt token of KV moved from a prefill to a decode instance.
    pd_transfer_s_per_token: float = DEFAULT_TRANSFER_S_PER_TOKEN
    # -- holding and moving requests ---------------------------------------------------------
    # Hold the answers of requests routed to a hotspot so rebalancing can still move them.
    admission_hold: bool = False
    admission_max_hold_s: float = 3.0
    migration: MigrationMode = "off"
    migration_interval_s: float = 1.0
    # Engines' MigrationHook addresses: (endpoint id, HOST:PORT) pairs.
    migration_hooks: tuple[tuple[str, str], ...] = ()
    # -- models ------------------------------------------------------------------------------
    # Model names the pool serves; endpoints that name no model serve these.
    served_models: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.policy not in POLICY_NAMES:
            raise ValueError(
                f"unknown policy {self.policy!r}; choose from {', '.join(POLICY_NAMES)}"
            )
        if self.migration not in MIGRATION_MODES:
            modes = ", ".join(MIGRATION_MODES)
            raise ValueError(f"unknown migration mode {self.migration!r}; choose from {modes}")
        if self.cold_placement not in COLD_PLACEMENTS:
            raise ValueError(
                f"unknown cold placement {self.cold_placement!r}; choose from "
                f"{', '.join(COLD_PLACEMENTS)}"
            )
        if self.cost_profile not in COST_PROFILES:
            raise ValueError(
                f"unknown cost profile {self.cost_profile!r}; choose from {sorted(COST_PROFILES)}"
            )
        positive = {
            "ttft_slo_s": self.ttft_slo_s,
            "virtual_nodes": self.virtual_nodes,
            "key_block_tokens": self.key_block_tokens,
            "key_block_chars": self.key_block_chars,
            "tokens_per_char": self.tokens_per_char,
            "lease_ttl_s": self.lease_ttl_s,
            "scrape_timeout_s": self.scrape_timeout_s,
            "admission_max_hold_s": self.admission_max_hold_s,
            "migration_interval_s": self.migration_interval_s,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        not_negative = {
            "scrape_interval_s": self.scrape_interval_s,
            "pd_min_prefill_tokens": self.pd_min_prefill_tokens,
            "pd_transfer_s_per_token": self.pd_transfer_s_per_token,
            "phase_interference_weight": self.phase_interference_weight,
        }
        for name, value in not_negative.items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        for name in ("kv_events_port", "kv_events_replay_port"):
            port = getattr(self, name)
            if port is not None and not 0 < port < 65536:
                raise ValueError(f"{name} must be a TCP port, got {port}")
        if self.engine_block_size is not None and self.engine_block_size <= 0:
            raise ValueError(f"engine_block_size must be positive, got {self.engine_block_size}")
        for endpoint_id, address in (*self.kv_events_endpoints, *self.kv_events_replay_endpoints):
            if not address.startswith("tcp://"):
                raise ValueError(
                    f"KV events address of {endpoint_id!r} must be tcp://HOST:PORT, got {address!r}"
                )
        if self.prefix_capacity_tokens is not None and self.prefix_capacity_tokens <= 0:
            raise ValueError(
                f"prefix_capacity_tokens must be positive, got {self.prefix_capacity_tokens}"
            )

    @property
    def follows_kv_events(self) -> bool:
        return self.kv_events_port is not None or bool(self.kv_events_endpoints)

    @property
    def scrape_staleness_s(self) -> float:
        """A scrape older than this means the engine stopped answering: its figures are then
        unknown (never zero). A few intervals, and never under 2 s."""
        return max(2.0, 3 * self.scrape_interval_s)

    def replace(self, **changes: Any) -> SchedulerSettings:
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)


# -- the config file ------------------------------------------------------------------------

# scheduler.yaml key -> SchedulerSettings field, for the scalar routing settings.
CONFIG_SETTINGS: Final[Mapping[str, str]] = {
    "model": "served_models",
    "policy": "policy",
    "ttftSloSeconds": "ttft_slo_s",
    "prefixBlockSize": "key_block_tokens",
    "virtualNodes": "virtual_nodes",
    "scrapeIntervalSeconds": "scrape_interval_s",
    "pdMinPrefillTokens": "pd_min_prefill_tokens",
    "rebalancing": "rebalance",
    "phaseAware": "phase_aware",
    "costCalibration": "cost_calibration",
    "coldPlacement": "cold_placement",
    "admissionHold": "admission_hold",
    "admissionMaxHoldSeconds": "admission_max_hold_s",
    "migration": "migration",
    "leaseTtlSeconds": "lease_ttl_s",
    "kvEventsPort": "kv_events_port",
    "kvEventsReplayPort": "kv_events_replay_port",
    "engineBlockSize": "engine_block_size",
    "engineHashSeed": "engine_hash_seed",
}
DISCOVERY_KEYS: Final = ("kind", "namespace", "labelSelector", "defaultPort")
PORT_KEYS: Final = ("grpc", "metrics", "picker")


@dataclass(frozen=True, slots=True)
class KubernetesDiscovery:
    """Engine pods found by label selector (the config file's `discovery` block)."""

    label_selector: str
    namespace: str = "default"
    default_port: int = 8000


@dataclass(frozen=True, slots=True)
class ConfigFile:
    """What a scheduler.yaml says: settings changes, where the engines are, where to listen."""

    settings: Mapping[str, Any]
    discovery: KubernetesDiscovery | None = None
    grpc_port: int | None = None
    metrics_port: int | None = None
    # The endpoint picker's port (Envoy's ext_proc, the GIE protocol); None: no picker.
    picker_port: int | None = None

    def apply(self, settings: SchedulerSettings) -> SchedulerSettings:
        return settings.replace(**self.settings) if self.settings else settings


def parse_config(config: Any, *, source: str = "scheduler.yaml") -> ConfigFile:
    """Read a parsed scheduler.yaml; ValueError naming the key for anything it does not know
    or cannot use (the file has no free-form part)."""
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise ValueError(f"{source}: must be a YAML mapping")
    _refuse_unknown(config, (*CONFIG_SETTINGS, "discovery", "ports"), where=source)
    changes: dict[str, Any] = {}
    for key, field_name in CONFIG_SETTINGS.items():
        if key in config:
            changes[field_name] = _typed(field_name, config[key], where=f"{source}: {key}")
    discovery = None
    if "discovery" in config:
        block = _mapping(config["discovery"], where=f"{source}: discovery")
        _refuse_unknown(block, DISCOVERY_KEYS, where=f"{source}: discovery")
        if block.get("kind", "kubernetes") != "kubernetes":
            raise ValueError(f"{source}: discovery.kind {block.get('kind')!r} is not supported")
        if not block.get("labelSelector"):
            raise ValueError(f"{source}: discovery.labelSelector is required")
        discovery = KubernetesDiscovery(
            label_selector=str(block["labelSelector"]),
            namespace=str(block.get("namespace", "default")),
            default_port=_integer(block.get("defaultPort", 8000), where="discovery.defaultPort"),
        )
    ports = _mapping(config.get("ports") or {}, where=f"{source}: ports")
    _refuse_unknown(ports, PORT_KEYS, where=f"{source}: ports")
    return ConfigFile(
        settings=changes,
        discovery=discovery,
        grpc_port=_integer(ports["grpc"], where="ports.grpc") if "grpc" in ports else None,
        metrics_port=(
            _integer(ports["metrics"], where="ports.metrics") if "metrics" in ports else None
        ),
        picker_port=(
            _integer(ports["picker"], where="ports.picker") if "picker" in ports else None
        ),
    )


def _refuse_unknown(block: Mapping[str, Any], known: tuple[str, ...], *, where: str) -> None:
    unknown = sorted(str(key) for key in block if key not in known)
    if unknown:
        raise ValueError(
            f"{where}: unknown key {unknown[0]!r}"
            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            + f"; known keys: {', '.join(known)}"
        )


def _mapping(value: Any, *, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: must be a mapping")
    return value


def _integer(value: Any, *, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: {value!r} is not an integer")
    return value


_FIELD_TYPES: Final = {field.name: field.type for field in dataclasses.fields(SchedulerSettings)}


def _typed(field_name: str, value: Any, *, where: str) -> Any:
    """`value` as the settings field wants it; ValueError naming the key otherwise."""
    kind = str(_FIELD_TYPES[field_name]).removesuffix(" | None")
    if field_name == "served_models":
        if not isinstance(value, str) or not value:
            raise ValueError(f"{where}: {value!r} is not a model name")
        return (value,)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{where}: {value!r} is not true or false")
        return value
    if kind == "int":
        return _integer(value, where=where)
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where}: {value!r} is not a number")
        return float(value)
    if kind == "str" or kind == "MigrationMode":
        allowed = get_args(MigrationMode) if kind == "MigrationMode" else None
        if not isinstance(value, str) or (allowed is not None and value not in allowed):
            raise ValueError(f"{where}: {value!r} is not one of {allowed or 'the known names'}")
        return value
    raise AssertionError(f"no config conversion for {field_name} ({kind})")


def parse_kv_event_endpoints(spec: str) -> tuple[tuple[str, str], ...]:
    """`a=tcp://10.0.0.1:5557,b=...` -> (("a", "tcp://10.0.0.1:5557"), ...)."""
    pairs: list[tuple[str, str]] = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        endpoint_id, sep, address = item.partition("=")
        _host, _, port = address.removeprefix("tcp://").rpartition(":")
        if not sep or not endpoint_id or not address.startswith("tcp://") or not port.isdigit():
            raise ValueError(f"KV events endpoint {item!r} is not ENDPOINT_ID=tcp://HOST:PORT")
        pairs.append((endpoint_id, address))
    return tuple(pairs)
