"""ModelPool spec: parsed once into frozen values, with the meaning checks the schema cannot do.

The CRD's OpenAPI schema rejects most bad input at admission; this parser applies the same
defaults (so a pool created without them, e.g. against a test API server, means the same thing)
and raises `SpecError` for what is syntactically valid but meaningless: such a pool gets a
`Degraded` condition and an Event, never a retry loop.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

# Policy names, migration modes and the routing defaults are the shared vocabulary's (the CRD's
# enums and defaults say the same; tests check them against these).
from twinroute.vocabulary import (
    DEFAULT_KEY_BLOCK_TOKENS,
    DEFAULT_PD_MIN_PREFILL_TOKENS,
    DEFAULT_POLICY,
    DEFAULT_SCRAPE_INTERVAL_S,
    DEFAULT_TTFT_SLO_S,
    DEFAULT_VIRTUAL_NODES,
    HUB_REPOSITORY_ID,
    MIGRATION_MODES,
    POLICY_NAMES,
)

SERVICE_TYPES: Final = ("ClusterIP", "NodePort", "LoadBalancer")
KV_CONNECTORS: Final = ("NixlConnector", "P2pNcclConnector", "LMCacheConnectorV1")
# "vllm": a vLLM server (`vllm serve` flags). "simulator": `twinroute engine-sim`, which serves
# vLLM's API and metrics from a timing model (tests, demos, end-to-end runs without GPUs).
ENGINE_KINDS: Final = ("vllm", "simulator")
DEFAULT_SIMULATOR_COMMAND: Final = ("twinroute", "engine-sim")

DEFAULT_ENGINE_IMAGE: Final = "vllm/vllm-openai:v0.11.0"
DEFAULT_ENGINE_COMMAND: Final = ("vllm", "serve")
DEFAULT_ENGINE_PORT: Final = 8000
DEFAULT_PREFIX_BLOCK_SIZE: Final = DEFAULT_KEY_BLOCK_TOKENS
DEFAULT_SCHEDULER_REPLICAS: Final = 2
# Active-active replicas share their load and placements (`twinroute scheduler --peers`); each
# streams to every other, so the exchange grows with the square of the count: a handful is
# plenty (one replica serves about a thousand picks a second per core).
MAX_SCHEDULER_REPLICAS: Final = 5
DEFAULT_KV_CONNECTOR: Final = "NixlConnector"
MAX_PD_MIN_PREFILL_TOKENS: Final = 10_000_000
# A managed pool migrates on drain by default, unlike a bare `twinroute scheduler` (off): the
# operator renders the router that carries the orders out, so scale-in then costs no streaming
# request (docs/operator.md).
DEFAULT_MIGRATION: Final = "drain"
DEFAULT_ADMISSION_HOLD: Final = False
DEFAULT_PHASE_AWARE: Final = True
DEFAULT_KV_EVENTS: Final = True

# What fronts the pool: "router" (twinroute's Python router beside the scheduler, the simplest
# path), "envoy" (an Envoy Deployment the operator runs, asking the scheduler's endpoint
# picker), "inferencePool" (an InferencePool for an existing Gateway API Inference Extension
# gateway, whose endpoint picker is the scheduler).
GATEWAY_KINDS: Final = ("router", "envoy", "inferencePool")
DEFAULT_GATEWAY_KIND: Final = "router"
PICKER_FAILURE_MODES: Final = ("FailOpen", "FailClose")
GATEWAY_PROCESSING: Final = ("lean", "full", "gie")
# Pinned: the bootstrap is rendered for (and tested with) this Envoy.
DEFAULT_ENVOY_IMAGE: Final = "envoyproxy/envoy:v1.40.0"
MAX_GATEWAY_REPLICAS: Final = 64

# Engine flags that would blind the scheduler: it needs prefix caching and the metrics.
FORBIDDEN_ENGINE_ARGS: Final = (
    "--no-enable-prefix-caching",
    "--disable-log-stats",
    "--served-model-name",
    "--port",
    "--kv-transfer-config",
)
# Same bounds as the CRD (they keep its CEL rule within the API server's cost budget).
MAX_ENGINE_ARGS: Final = 128
MAX_ENGINE_ARG_LENGTH: Final = 4096
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# Longest child suffix is "-scheduler" (10) and Deployment pod names add ~17 characters.
MAX_POOL_NAME_LENGTH: Final = 40


class Role(enum.StrEnum):
    UNIFIED = "unified"
    PREFILL = "prefill"
    DECODE = "decode"


class SpecError(ValueError):
    """The spec is well-formed but cannot mean anything; `field` names the culprit."""

    def __init__(self, *, field: str, message: str) -> None:
        super().__init__(f"spec.{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class KvTransfer:
    connector: str = DEFAULT_KV_CONNECTOR
    extra_config: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EngineSpec:
    kind: str = "vllm"
    image: str = DEFAULT_ENGINE_IMAGE
    command: tuple[str, ...] = DEFAULT_ENGINE_COMMAND
    port: int = DEFAULT_ENGINE_PORT
    args: tuple[str, ...] = ()
    env: tuple[Mapping[str, Any], ...] = ()
    resources: Mapping[str, Any] = field(default_factory=dict)
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    kv_transfer: KvTransfer = field(default_factory=KvTransfer)


@dataclass(frozen=True, slots=True)
class SecretKey:
    name: str
    key: str


@dataclass(frozen=True, slots=True)
class TokenizerSpec:
    """Where the front end (router or picker) gets the model's tokenizer, for token-id prefix
    keys, the only keys the engines' KV events can be matched against.

    Without `volume`: `source` is a Hugging Face hub repository (default: the model's source),
    fetched once per pod start, `hub_token` for a gated one. With `volume` (a Kubernetes volume
    source, e.g. the engines' model PVC): mounted read-only, and `source` is the path of the
    tokenizer.json, or of the folder holding it, inside that volume ("" = its root).
    """

    source: str = ""
    revision: str = ""
    hub_token: SecretKey | None = None
    volume: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class RoutingSpec:
    policy: str = DEFAULT_POLICY
    ttft_slo_s: float = DEFAULT_TTFT_SLO_S
    prefix_block_size: int = DEFAULT_PREFIX_BLOCK_SIZE
    virtual_nodes: int = DEFAULT_VIRTUAL_NODES
    rebalancing: bool = True
    scrape_interval_s: float = DEFAULT_SCRAPE_INTERVAL_S
    pd_min_prefill_tokens: int = DEFAULT_PD_MIN_PREFILL_TOKENS
    migration: str = DEFAULT_MIGRATION
    admission_hold: bool = DEFAULT_ADMISSION_HOLD
    phase_aware: bool = DEFAULT_PHASE_AWARE
    # vLLM engines publish KV-cache events and the scheduler follows them.
    kv_events: bool = DEFAULT_KV_EVENTS
    # None: text prompts are keyed by characters (no tokenizer on the front end).
    tokenizer: TokenizerSpec | None = None


@dataclass(frozen=True, slots=True)
class EngineTimeouts:
    """The router's waits on engines, per attempt (a miss before the client saw a byte is
    retried on another engine); a stream that keeps sending has no length limit."""

    connect_s: float = 2.0
    first_byte_s: float = 60.0
    response_s: float = 600.0
    idle_s: float = 60.0


# (CRD key, field, low, high) of `scheduler.timeouts`, in seconds.
TIMEOUT_FIELDS: Final = (
    ("connectSeconds", "connect_s", 0.1, 60.0),
    ("firstByteSeconds", "first_byte_s", 1.0, 3600.0),
    ("responseSeconds", "response_s", 1.0, 86400.0),
    ("idleSeconds", "idle_s", 1.0, 3600.0),
)


@dataclass(frozen=True, slots=True)
class SchedulerSpec:
    replicas: int = DEFAULT_SCHEDULER_REPLICAS
    # Empty: the operator's default (the image the operator itself runs).
    image: str = ""
    service_type: str = "ClusterIP"
    timeouts: EngineTimeouts = field(default_factory=EngineTimeouts)


@dataclass(frozen=True, slots=True)
class GatewaySpec:
    kind: str = DEFAULT_GATEWAY_KIND
    # Envoy and InferencePool gateways: what the gateway does while the picker is down.
    failure_mode: str = "FailClose"
    # Envoy only: what Envoy sends the picker (twinroute.gateway.bootstrap).
    processing: str = "lean"
    envoy_image: str = DEFAULT_ENVOY_IMAGE
    replicas: int = 1

    @property
    def uses_picker(self) -> bool:
        return self.kind != "router"


@dataclass(frozen=True, slots=True)
class PoolSpec:
    name: str
    namespace: str
    model_name: str
    model_source: str
    replicas: Mapping[Role, int]
    engine: EngineSpec = field(default_factory=EngineSpec)
    routing: RoutingSpec = field(default_factory=RoutingSpec)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    gateway: GatewaySpec = field(default_factory=GatewaySpec)

    @property
    def disaggregated(self) -> bool:
        return Role.UNIFIED not in self.replicas

    @property
    def roles(self) -> tuple[Role, ...]:
        return tuple(role for role in Role if role in self.replicas)


def parse_pool(*, name: str, namespace: str, spec: Mapping[str, Any]) -> PoolSpec:
    """Parse a ModelPool's metadata name, namespace and spec; raise `SpecError` when invalid."""
    if len(name) > MAX_POOL_NAME_LENGTH or not _DNS_LABEL.match(name):
        raise SpecError(
            field="metadata.name",
            message=f"{name!r} must be a DNS label of at most {MAX_POOL_NAME_LENGTH} characters",
        )
    model = _mapping(spec, "model", required=True)
    model_name = _string(model, "name", path="model.name", required=True)
    model_source = _string(model, "source", path="model.source", default=model_name)
    replicas = _parse_roles(_mapping(spec, "roles", required=True))
    gateway = _parse_gateway(_mapping(spec, "gateway"))
    scheduler = _parse_scheduler(_mapping(spec, "scheduler"))
    if gateway.uses_picker and set(replicas) != {Role.UNIFIED}:
        raise SpecError(
            field="gateway.kind",
            message=f"{gateway.kind!r} serves unified pools only: a prefill/decode pool needs "
            "the router, which makes the prefill hop (gateway.kind: router)",
        )
    return PoolSpec(
        name=name,
        namespace=namespace,
        model_name=model_name,
        model_source=model_source,
        replicas=replicas,
        engine=_parse_engine(_mapping(spec, "engine")),
        routing=_parse_routing(_mapping(spec, "routing"), model_source=model_source),
        scheduler=scheduler,
        gateway=gateway,
    )


def _parse_gateway(gateway: Mapping[str, Any]) -> GatewaySpec:
    kind = _string(gateway, "kind", path="gateway.kind", default=DEFAULT_GATEWAY_KIND)
    failure_mode = _string(gateway, "failureMode", path="gateway.failureMode", default="FailClose")
    processing = _string(gateway, "processing", path="gateway.processing", default="lean")
    for field_name, value, allowed in (
        ("gateway.kind", kind, GATEWAY_KINDS),
        ("gateway.failureMode", failure_mode, PICKER_FAILURE_MODES),
        ("gateway.processing", processing, GATEWAY_PROCESSING),
    ):
        if value not in allowed:
            raise SpecError(field=field_name, message=f"{value!r} is not one of {list(allowed)}")
    return GatewaySpec(
        kind=kind,
        failure_mode=failure_mode,
        processing=processing,
        envoy_image=_string(
            gateway, "envoyImage", path="gateway.envoyImage", default=DEFAULT_ENVOY_IMAGE
        ),
        replicas=_integer(
            gateway, "replicas", path="gateway.replicas", default=1, low=1,
            high=MAX_GATEWAY_REPLICAS,
        ),
    )  # fmt: skip


def _parse_roles(roles: Mapping[str, Any]) -> dict[Role, int]:
    present = {role: _mapping(roles, role.value) for role in Role if role.value in roles}
    unknown = sorted(set(roles) - {role.value for role in Role})
    if unknown:
        raise SpecError(field="roles", message=f"unknown roles {unknown}")
    if Role.UNIFIED in present and (Role.PREFILL in present or Role.DECODE in present):
        raise SpecError(
            field="roles", message="set either unified, or prefill and decode, not both"
        )
    if Role.UNIFIED not in present and not (Role.PREFILL in present and Role.DECODE in present):
        raise SpecError(field="roles", message="set either unified, or both prefill and decode")
    return {
        role: _integer(
            body, "replicas", path=f"roles.{role.value}.replicas", default=1, low=0, high=1000
        )
        for role, body in present.items()
    }


def _parse_engine(engine: Mapping[str, Any]) -> EngineSpec:
    args = tuple(_strings(engine, "args", path="engine.args"))
    if len(args) > MAX_ENGINE_ARGS or any(len(arg) > MAX_ENGINE_ARG_LENGTH for arg in args):
        raise SpecError(
            field="engine.args",
            message=f"at most {MAX_ENGINE_ARGS} args of at most {MAX_ENGINE_ARG_LENGTH} characters",
        )
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in FORBIDDEN_ENGINE_ARGS:
            raise SpecError(
                field="engine.args",
                message=f"{flag} is managed by the operator (routing needs prefix caching, "
                "the metrics, the served model name and the port)",
            )
    kind = _string(engine, "kind", path="engine.kind", default="vllm")
    if kind not in ENGINE_KINDS:
        raise SpecError(field="engine.kind", message=f"{kind!r} is not one of {list(ENGINE_KINDS)}")
    default_command = DEFAULT_ENGINE_COMMAND if kind == "vllm" else DEFAULT_SIMULATOR_COMMAND
    command = tuple(_strings(engine, "command", path="engine.command")) or default_command
    kv = _mapping(engine, "kvTransfer")
    connector = _string(
        kv, "connector", path="engine.kvTransfer.connector", default=DEFAULT_KV_CONNECTOR
    )
    if connector not in KV_CONNECTORS:
        raise SpecError(
            field="engine.kvTransfer.connector",
            message=f"{connector!r} is not one of {list(KV_CONNECTORS)}",
        )
    extra = _mapping(kv, "extraConfig")
    return EngineSpec(
        kind=kind,
        image=_string(engine, "image", path="engine.image", default=DEFAULT_ENGINE_IMAGE),
        command=command,
        port=_integer(
            engine, "port", path="engine.port", default=DEFAULT_ENGINE_PORT, low=1, high=65535
        ),
        args=args,
        env=tuple(_mappings(engine, "env", path="engine.env")),
        resources=dict(_mapping(engine, "resources")),
        node_selector={str(k): str(v) for k, v in _mapping(engine, "nodeSelector").items()},
        tolerations=tuple(_mappings(engine, "tolerations", path="engine.tolerations")),
        kv_transfer=KvTransfer(
            connector=connector, extra_config={str(k): str(v) for k, v in extra.items()}
        ),
    )


def _parse_tokenizer(routing: Mapping[str, Any], *, model_source: str) -> TokenizerSpec | None:
    if routing.get("tokenizer") is None:
        return None
    tokenizer = _mapping(routing, "tokenizer")
    path = "routing.tokenizer"
    volume = _mapping(tokenizer, "volume") or None
    if volume is not None and len(volume) != 1:
        raise SpecError(
            field=f"{path}.volume",
            message="must name exactly one volume source (e.g. persistentVolumeClaim), "
            f"not {sorted(volume)}",
        )
    hub_token = None
    if tokenizer.get("hubTokenSecret") is not None:
        secret = _mapping(tokenizer, "hubTokenSecret")
        hub_token = SecretKey(
            name=_string(secret, "name", path=f"{path}.hubTokenSecret.name", required=True),
            key=_string(secret, "key", path=f"{path}.hubTokenSecret.key", default="token"),
        )
    revision = _string(tokenizer, "revision", path=f"{path}.revision")
    if volume is not None:
        source = _string(tokenizer, "source", path=f"{path}.source")
        if source.startswith("/") or ".." in source.split("/"):
            raise SpecError(
                field=f"{path}.source",
                message=f"{source!r}: with a volume, a path inside it (relative, no '..')",
            )
        if revision or hub_token is not None:
            raise SpecError(
                field=path,
                message="revision and hubTokenSecret apply to a hub repository, not a volume",
            )
        return TokenizerSpec(source=source, volume=dict(volume))
    source = _string(tokenizer, "source", path=f"{path}.source", default=model_source)
    if not HUB_REPOSITORY_ID.fullmatch(source):
        raise SpecError(
            field=f"{path}.source",
            message=f"{source!r} is not a Hugging Face hub repository id (owner/name); for "
            f"a tokenizer on a volume, give {path}.volume and the path inside it",
        )
    return TokenizerSpec(source=source, revision=revision, hub_token=hub_token)


def _parse_routing(routing: Mapping[str, Any], *, model_source: str) -> RoutingSpec:
    policy = _string(routing, "policy", path="routing.policy", default=DEFAULT_POLICY)
    if policy not in POLICY_NAMES:
        raise SpecError(
            field="routing.policy", message=f"{policy!r} is not one of {list(POLICY_NAMES)}"
        )
    migration = _string(routing, "migration", path="routing.migration", default=DEFAULT_MIGRATION)
    if migration not in MIGRATION_MODES:
        raise SpecError(
            field="routing.migration",
            message=f"{migration!r} is not one of {list(MIGRATION_MODES)}",
        )
    return RoutingSpec(
        policy=policy,
        ttft_slo_s=_number(
            routing,
            "ttftSloSeconds",
            path="routing.ttftSloSeconds",
            default=DEFAULT_TTFT_SLO_S,
            low=0.01,
            high=600.0,
        ),
        prefix_block_size=_integer(
            routing,
            "prefixBlockSize",
            path="routing.prefixBlockSize",
            default=DEFAULT_PREFIX_BLOCK_SIZE,
            low=1,
            high=65536,
        ),
        virtual_nodes=_integer(
            routing,
            "virtualNodes",
            path="routing.virtualNodes",
            default=DEFAULT_VIRTUAL_NODES,
            low=1,
            high=4096,
        ),
        rebalancing=_boolean(routing, "rebalancing", path="routing.rebalancing", default=True),
        scrape_interval_s=_number(
            routing,
            "scrapeIntervalSeconds",
            path="routing.scrapeIntervalSeconds",
            default=DEFAULT_SCRAPE_INTERVAL_S,
            low=0.1,
            high=300.0,
        ),
        pd_min_prefill_tokens=_integer(
            routing,
            "pdMinPrefillTokens",
            path="routing.pdMinPrefillTokens",
            default=DEFAULT_PD_MIN_PREFILL_TOKENS,
            low=0,
            high=MAX_PD_MIN_PREFILL_TOKENS,
        ),
        migration=migration,
        admission_hold=_boolean(
            routing, "admissionHold", path="routing.admissionHold", default=DEFAULT_ADMISSION_HOLD
        ),
        phase_aware=_boolean(
            routing, "phaseAware", path="routing.phaseAware", default=DEFAULT_PHASE_AWARE
        ),
        kv_events=_boolean(routing, "kvEvents", path="routing.kvEvents", default=DEFAULT_KV_EVENTS),
        tokenizer=_parse_tokenizer(routing, model_source=model_source),
    )


def _parse_scheduler(scheduler: Mapping[str, Any]) -> SchedulerSpec:
    service_type = _string(
        scheduler, "serviceType", path="scheduler.serviceType", default="ClusterIP"
    )
    if service_type not in SERVICE_TYPES:
        raise SpecError(
            field="scheduler.serviceType",
            message=f"{service_type!r} is not one of {list(SERVICE_TYPES)}",
        )
    return SchedulerSpec(
        replicas=_integer(
            scheduler,
            "replicas",
            path="scheduler.replicas",
            default=DEFAULT_SCHEDULER_REPLICAS,
            low=1,
            high=MAX_SCHEDULER_REPLICAS,
        ),
        image=_string(scheduler, "image", path="scheduler.image", default=""),
        service_type=service_type,
        timeouts=_parse_timeouts(_mapping(scheduler, "timeouts")),
    )


def _parse_timeouts(timeouts: Mapping[str, Any]) -> EngineTimeouts:
    defaults = EngineTimeouts()
    return EngineTimeouts(
        **{
            name: _number(
                timeouts,
                key,
                path=f"scheduler.timeouts.{key}",
                default=getattr(defaults, name),
                low=low,
                high=high,
            )
            for key, name, low, high in TIMEOUT_FIELDS
        }
    )


def _mapping(parent: Mapping[str, Any], key: str, *, required: bool = False) -> Mapping[str, Any]:
    value = parent.get(key)
    if value is None:
        if required:
            raise SpecError(field=key, message="is required")
        return {}
    if not isinstance(value, Mapping):
        raise SpecError(field=key, message=f"must be an object, not {type(value).__name__}")
    return value


def _string(
    parent: Mapping[str, Any], key: str, *, path: str, required: bool = False, default: str = ""
) -> str:
    value = parent.get(key)
    if value is None or value == "":
        if required:
            raise SpecError(field=path, message="is required")
        return default
    if not isinstance(value, str):
        raise SpecError(field=path, message=f"must be a string, not {type(value).__name__}")
    return value


def _integer(
    parent: Mapping[str, Any], key: str, *, path: str, default: int, low: int, high: int
) -> int:
    value = parent.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(field=path, message=f"must be an integer, not {value!r}")
    if not low <= value <= high:
        raise SpecError(field=path, message=f"{value} is outside [{low}, {high}]")
    return value


def _boolean(parent: Mapping[str, Any], key: str, *, path: str, default: bool) -> bool:
    value = parent.get(key, default)
    if not isinstance(value, bool):
        raise SpecError(field=path, message=f"must be true or false, not {value!r}")
    return value


def _number(
    parent: Mapping[str, Any], key: str, *, path: str, default: float, low: float, high: float
) -> float:
    value = parent.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecError(field=path, message=f"must be a number, not {value!r}")
    if not low <= value <= high:
        raise SpecError(field=path, message=f"{value} is outside [{low}, {high}]")
    return float(value)


def _strings(parent: Mapping[str, Any], key: str, *, path: str) -> Sequence[str]:
    value = parent.get(key) or []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise SpecError(field=path, message="must be a list of strings")
    return value


def _mappings(parent: Mapping[str, Any], key: str, *, path: str) -> Sequence[Mapping[str, Any]]:
    value = parent.get(key) or []
    if not isinstance(value, list) or not all(isinstance(item, Mapping) for item in value):
        raise SpecError(field=path, message="must be a list of objects")
    return [dict(item) for item in value]
