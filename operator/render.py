"""Render the children of a ModelPool: pure functions from a parsed spec to Kubernetes objects.

Children (all in the pool's namespace, labelled with pool/role/model and owned by the pool):
- per engine role: a Deployment `<pool>-<role>` running vLLM (or anything that speaks its
  flags, such as `twinroute engine-sim`) and a headless Service of the same name;
- the scheduler/router: a ConfigMap `<pool>-scheduler` with every routing setting (the
  scheduler's only source of them), a
  ServiceAccount and RoleBinding (read-only pod discovery, bound to the chart's ClusterRole),
  a Deployment `<pool>-scheduler` (containers `scheduler` and `router`), a Service `<pool>`
  that is the pool's OpenAI endpoint (the router's HTTP port only: it may be a LoadBalancer)
  and a ClusterIP Service `<pool>-scheduler` for the scheduler's gRPC and metrics ports, which
  never leave the cluster;
- the pool's token: a Secret `<pool>-scheduler-token` the scheduler and router mount (every
  scheduler call needs it), derived from the operator's key so the operator can Drain without
  reading Secrets back. A shared Secret named in the settings replaces it; with neither, the
  scheduler is told in so many words to serve without one.

Every object carries `twinroute.io/render-hash`, a digest of its rendered content, so the
planner patches exactly the objects whose rendering changed and never fights server defaults.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import yaml
from twinroute.operator.spec import PoolSpec, Role, TokenizerSpec

from twinroute import labels
from twinroute.gateway.bootstrap import GatewayConfig, Upstream, render_bootstrap

RENDER_HASH_ANNOTATION: Final = "twinroute.io/render-hash"
CONFIG_HASH_ANNOTATION: Final = "twinroute.io/config-hash"
CONFIG_FILE: Final = "scheduler.yaml"
CONFIG_DIR: Final = "/etc/twinroute"
ADMIN_TOKEN_DIR: Final = "/etc/twinroute-admin"
TLS_DIR: Final = "/etc/twinroute-tls"
# `routing.tokenizer`: its volume, mounted read-only, or the hub cache the front end fetches
# the tokenizer into (an emptyDir: the root filesystem is read-only).
TOKENIZER_DIR: Final = "/var/lib/twinroute/tokenizer"
HUB_CACHE_DIR: Final = "/var/cache/twinroute/huggingface"
# Writable places under a read-only root: vLLM, Hugging Face, Triton and torch write caches
# under $HOME and /tmp.
ENGINE_HOME: Final = "/home/engine"
# The unprivileged user every pod runs as (the image's files are world-readable).
POD_USER: Final = 10001
# With the admission hold, the scheduler may keep a Pick answer this long; the router's Pick
# deadline must outlast it (plus a margin for the answer), or held requests fall back.
ADMISSION_MAX_HOLD_S: Final = 3.0
ROUTER_PICK_TIMEOUT_S: Final = 1.0
# Routers renew their running requests' leases every LEASE_RENEW_EVERY_S, so the scheduler can
# expire those of a lost router after LEASE_TTL_S (four missed renewals) without ever cutting
# a healthy stream short, however long it runs.
LEASE_TTL_S: Final = 120.0
LEASE_RENEW_EVERY_S: Final = 30.0
HELD_PICK_MARGIN_S: Final = 1.0

Obj = dict[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class RenderSettings:
    """What the operator knows that a pool's spec does not: set from its command line."""

    scheduler_image: str
    # The chart's read-only ClusterRole for discovery; each pool's scheduler is bound to it.
    scheduler_cluster_role: str = "twinroute-scheduler"
    grpc_port: int = 50051
    metrics_port: int = 9090
    router_port: int = 8080
    # The scheduler's endpoint picker: GIE's default port for it.
    picker_port: int = 9002
    image_pull_policy: str = "IfNotPresent"
    # Secret in each pool's namespace holding one token shared by every pool's scheduler
    # (under `token`); empty: each pool gets a token of its own from `pool_token_key`.
    admin_token_secret: str = ""
    # The operator's key: each pool's token is derived from it and the pool's name. Empty (and
    # no shared Secret): schedulers run without a token, which they must be told explicitly.
    pool_token_key: bytes = field(default=b"", repr=False)
    # kubernetes.io/tls Secret in each pool's namespace (`tls.crt`, `tls.key`, `ca.crt`): the
    # scheduler serves gRPC over TLS with it; empty: plaintext.
    tls_secret: str = ""
    # The name in that certificate; clients reach the scheduler by IP and check this instead.
    tls_server_name: str = "twinroute-scheduler"
    # With `tls_secret`, the router serves its OpenAI API over HTTPS with the same certificate.
    router_tls: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Owner:
    """The ModelPool that owns the children (for owner references)."""

    name: str
    uid: str
    api_version: str = f"{labels.API_GROUP}/{labels.API_VERSION}"
    kind: str = labels.MODELPOOL_KIND


def pool_token_secret_name(*, pool: str) -> str:
    return f"{pool}-scheduler-token"


def derive_pool_token(key: bytes, *, namespace: str, pool: str) -> str:
    """A pool's token: the operator's key and the pool's identity, so the operator knows every
    pool's token without storing or reading any (HMAC-SHA256; pools cannot derive each other's)."""
    return hmac.new(
        key, f"twinroute-pool-token/v1\0{namespace}/{pool}".encode(), "sha256"
    ).hexdigest()


def token_secret(settings: RenderSettings, *, pool: str) -> str:
    """The Secret the pool's scheduler and router read their token from ('' = no token)."""
    if settings.admin_token_secret:
        return settings.admin_token_secret
    if settings.pool_token_key:
        return pool_token_secret_name(pool=pool)
    return ""


def engine_name(*, pool: str, role: Role) -> str:
    return f"{pool}-{role.value}"


def scheduler_peers_name(*, pool: str) -> str:
    """The headless Service that names every scheduler replica (peers and routers resolve it)."""
    return f"{scheduler_name(pool=pool)}-peers"


def scheduler_name(*, pool: str) -> str:
    return f"{pool}-scheduler"


def pool_labels(pool: PoolSpec, *, role: str) -> dict[str, str]:
    return {
        labels.POOL_LABEL: pool.name,
        labels.ROLE_LABEL: role,
        labels.MODEL_LABEL: labels.model_label_value(pool.model_name),
        labels.MANAGED_BY_LABEL: labels.MANAGED_BY_VALUE,
    }


def selector_labels(pool: PoolSpec, *, role: str) -> dict[str, str]:
    """Immutable Deployment selectors: pool and role only (the model may be renamed)."""
    return {labels.POOL_LABEL: pool.name, labels.ROLE_LABEL: role}


# Where vLLM engines publish their KV-cache events (a ZMQ PUB socket bound on every address).
KV_EVENTS_PORT = 5557
KV_EVENTS_PORT_NAME = "kv-events"
# Where they answer requests for batches a subscriber missed (a gap, or a scheduler that
# started after them), from vLLM's buffer of recent batches.
KV_EVENTS_REPLAY_PORT = 5558
KV_EVENTS_REPLAY_PORT_NAME = "kv-replay"
# vLLM's default KV block size on GPUs, when the engine's args do not set --block-size.
VLLM_DEFAULT_BLOCK_SIZE = 16


def publishes_kv_events(pool: PoolSpec) -> bool:
    return pool.engine.kind != "simulator" and pool.routing.kv_events


def engine_block_size(pool: PoolSpec) -> int:
    """The engine's KV block size, as its args set it (`--block-size N` or `--block-size=N`)."""
    args = list(pool.engine.args)
    for index, arg in enumerate(args):
        value = None
        if arg == "--block-size" and index + 1 < len(args):
            value = args[index + 1]
        elif arg.startswith("--block-size="):
            value = arg.partition("=")[2]
        if value is not None and value.isdigit() and int(value) > 0:
            return int(value)
    return VLLM_DEFAULT_BLOCK_SIZE


def engine_args(pool: PoolSpec, *, role: Role) -> list[str]:
    """The engine's flags: what routing depends on first, then the user's extra args."""
    if pool.engine.kind == "simulator":
        return [
            "--host", "0.0.0.0",
            "--port", str(pool.engine.port),
            "--model", pool.model_name,
            # Kubernetes expands $(POD_NAME) from the container's env.
            "--instance-id", "$(POD_NAME)",
            # The simulator speaks vLLM's disaggregated protocol too (engine-sim --help).
            *_kv_transfer_args(pool, role=role),
            *pool.engine.args,
        ]  # fmt: skip
    args = [
        pool.model_source,
        "--served-model-name",
        pool.model_name,
        "--host",
        "0.0.0.0",
        "--port",
        str(pool.engine.port),
        # The scheduler's affinity is worthless without the engine's prefix cache.
        "--enable-prefix-caching",
    ]
    if publishes_kv_events(pool):
        # The scheduler subscribes to tcp://POD_IP:5557 (topic "": every batch) and asks
        # tcp://POD_IP:5558 for what it missed.
        events = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://*:{KV_EVENTS_PORT}",
            "replay_endpoint": f"tcp://*:{KV_EVENTS_REPLAY_PORT}",
        }
        args += ["--kv-events-config", json.dumps(events, sort_keys=True)]
    return args + _kv_transfer_args(pool, role=role) + list(pool.engine.args)


def _kv_transfer_args(pool: PoolSpec, *, role: Role) -> list[str]:
    """vLLM's `--kv-transfer-config` for prefill and decode engines; none for unified ones."""
    if role is Role.UNIFIED:
        return []
    connector = pool.engine.kv_transfer.connector
    kv_role = (
        "kv_both"
        if connector == "NixlConnector"
        else ("kv_producer" if role is Role.PREFILL else "kv_consumer")
    )
    config: dict[str, Any] = {"kv_connector": connector, "kv_role": kv_role}
    if pool.engine.kv_transfer.extra_config:
        config["kv_connector_extra_config"] = dict(pool.engine.kv_transfer.extra_config)
    return ["--kv-transfer-config", json.dumps(config, sort_keys=True)]


def scheduler_config(pool: PoolSpec, *, settings: RenderSettings) -> dict[str, Any]:
    """Every routing setting of the pool, as the scheduler reads it from
    `CONFIG_DIR/CONFIG_FILE` (`twinroute.scheduler.settings.parse_config`, which refuses a key
    it does not know): the scheduler gets the pool's routing from this file alone."""
    routing = pool.routing
    config: dict[str, Any] = {
        "model": pool.model_name,
        "policy": routing.policy,
        "ttftSloSeconds": routing.ttft_slo_s,
        "prefixBlockSize": routing.prefix_block_size,
        "virtualNodes": routing.virtual_nodes,
        "rebalancing": routing.rebalancing,
        "scrapeIntervalSeconds": routing.scrape_interval_s,
        "pdMinPrefillTokens": routing.pd_min_prefill_tokens,
        "phaseAware": routing.phase_aware,
        "admissionHold": admission_hold_on(pool),
        "migration": routing.migration,
        "leaseTtlSeconds": LEASE_TTL_S,
        "discovery": {
            "kind": "kubernetes",
            "namespace": pool.namespace,
            "labelSelector": f"{labels.POOL_LABEL}={pool.name},"
            f"{labels.ROLE_LABEL} in ({','.join(r.value for r in pool.roles)})",
            "defaultPort": pool.engine.port,
        },
        "ports": {
            "grpc": settings.grpc_port,
            "metrics": settings.metrics_port,
            **({"picker": settings.picker_port} if pool.gateway.uses_picker else {}),
        },
    }
    if admission_hold_on(pool):
        config["admissionMaxHoldSeconds"] = ADMISSION_MAX_HOLD_S
    if publishes_kv_events(pool):
        config["kvEventsPort"] = KV_EVENTS_PORT
        config["kvEventsReplayPort"] = KV_EVENTS_REPLAY_PORT
        config["engineBlockSize"] = engine_block_size(pool)
    return config


def admission_hold_on(pool: PoolSpec) -> bool:
    """The live scheduler rebalances hotspots over the requests it holds, so the hold is what
    `rebalancing` switches in a running pool: without rebalancing a hold only delays."""
    return pool.routing.admission_hold and pool.routing.rebalancing


def router_routing_args(pool: PoolSpec) -> list[str]:
    """The router's flags: it carries out the scheduler's migration orders (recompute), waits
    for a held Pick as long as the scheduler may hold it, and waits on engines as the pool says."""
    pick_timeout = (
        ADMISSION_MAX_HOLD_S + HELD_PICK_MARGIN_S
        if admission_hold_on(pool)
        else ROUTER_PICK_TIMEOUT_S
    )
    timeouts = pool.scheduler.timeouts
    return [
        "--migration", pool.routing.migration,
        "--scheduler-timeout-s", str(pick_timeout),
        "--connect-timeout-s", f"{timeouts.connect_s:g}",
        "--first-byte-timeout-s", f"{timeouts.first_byte_s:g}",
        "--response-timeout-s", f"{timeouts.response_s:g}",
        "--idle-timeout-s", f"{timeouts.idle_s:g}",
        "--lease-renew-every-s", f"{LEASE_RENEW_EVERY_S:g}",
    ]  # fmt: skip


def render_children(pool: PoolSpec, *, owner: Owner, settings: RenderSettings) -> list[Obj]:
    """Every object the pool should own, in creation order (config before its consumers)."""
    children: list[Obj] = []
    config_map = _scheduler_config_map(pool, settings=settings)
    children += [
        config_map,
        _scheduler_service_account(pool),
        _scheduler_role_binding(pool, settings=settings),
        _scheduler_deployment(
            pool,
            settings=settings,
            config_hash=_digest([config_map["data"], _token_digest(pool, settings)]),
        ),
        _scheduler_service(pool, settings=settings),
    ]
    if pool.scheduler.replicas > 1:
        children += [
            _scheduler_peers_service(pool, settings=settings),
            _scheduler_disruption_budget(pool),
        ]
    if pool.gateway.kind == "envoy":
        gateway_config = _gateway_config_map(pool, settings=settings)
        children += [
            gateway_config,
            _gateway_deployment(
                pool, settings=settings, config_hash=_digest([gateway_config["data"]])
            ),
        ]
    if pool.gateway.kind == "inferencePool":
        # The user's GIE gateway is the pool's endpoint; the InferencePool points it here.
        children.append(_inference_pool(pool, settings=settings))
    else:
        children.append(_pool_service(pool, settings=settings))
    if not settings.admin_token_secret and settings.pool_token_key:
        children.insert(0, _pool_token_secret(pool, key=settings.pool_token_key))
    for role in pool.roles:
        children += [_engine_deployment(pool, role=role), _engine_service(pool, role=role)]
    for child in children:
        metadata = child["metadata"]
        metadata["namespace"] = pool.namespace
        metadata["ownerReferences"] = [
            {
                "apiVersion": owner.api_version,
                "kind": owner.kind,
                "name": owner.name,
                "uid": owner.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        metadata.setdefault("annotations", {})[RENDER_HASH_ANNOTATION] = _digest(child)
    return children


# -- gateways in front of the pool ---------------------------------------------------------

GATEWAY_CONFIG_FILE: Final = "envoy.yaml"
GATEWAY_CONFIG_DIR: Final = "/etc/envoy"
GATEWAY_HTTP_PORT: Final = 8080
GATEWAY_ADMIN_PORT: Final = 9901
INFERENCE_POOL_API: Final = "inference.networking.k8s.io/v1"


def gateway_name(*, pool: str) -> str:
    return f"{pool}-gateway"


def gateway_bootstrap(pool: PoolSpec, *, settings: RenderSettings) -> dict[str, Any]:
    """The pool's Envoy, from the renderer `twinroute gateway` runs (the same file): the
    engines from their headless Service by DNS, the picker at the scheduler's Service."""
    domain = f"{pool.namespace}.svc.cluster.local"
    timeouts = pool.scheduler.timeouts
    return render_bootstrap(
        GatewayConfig(
            upstream=Upstream(
                dns_name=f"{engine_name(pool=pool.name, role=Role.UNIFIED)}.{domain}",
                dns_port=pool.engine.port,
            ),
            picker_address=f"{scheduler_name(pool=pool.name)}.{domain}:{settings.picker_port}",
            listen_host="0.0.0.0",
            listen_port=GATEWAY_HTTP_PORT,
            admin_port=GATEWAY_ADMIN_PORT,
            processing=pool.gateway.processing,  # type: ignore[arg-type]
            failure_mode=pool.gateway.failure_mode,  # type: ignore[arg-type]
            connect_timeout_s=timeouts.connect_s,
            first_byte_timeout_s=timeouts.first_byte_s,
            idle_timeout_s=timeouts.idle_s,
        )
    )


def _gateway_config_map(pool: PoolSpec, *, settings: RenderSettings) -> Obj:
    text = yaml.safe_dump(gateway_bootstrap(pool, settings=settings), sort_keys=False)
    return _config_map(
        gateway_name(pool=pool.name), pool_labels(pool, role=labels.GATEWAY_ROLE),
        {GATEWAY_CONFIG_FILE: text},
    )  # fmt: skip


def _gateway_deployment(pool: PoolSpec, *, settings: RenderSettings, config_hash: str) -> Obj:
    name = gateway_name(pool=pool.name)
    object_labels = pool_labels(pool, role=labels.GATEWAY_ROLE)
    http = {"tcpSocket": {"port": labels.ROUTER_HTTP_PORT_NAME}}
    container: Obj = {
        "name": "envoy",
        "image": pool.gateway.envoy_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["envoy"],
        "args": [
            "-c",
            f"{GATEWAY_CONFIG_DIR}/{GATEWAY_CONFIG_FILE}",
            "--log-level",
            "warn",
            # One process per pod: no shared memory for hot restarts (read-only root).
            "--disable-hot-restart",
        ],
        "ports": [
            {
                "name": labels.ROUTER_HTTP_PORT_NAME,
                "containerPort": GATEWAY_HTTP_PORT,
                "protocol": "TCP",
            }
        ],
        # Envoy's admin listens on loopback only: the kubelet checks the listener itself.
        "readinessProbe": {**http, "periodSeconds": 5},
        "livenessProbe": {**http, "periodSeconds": 10, "failureThreshold": 6},
        "resources": {"requests": {"cpu": "250m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}},
        "securityContext": _restricted_security_context(read_only_root=True),
        "volumeMounts": [{"name": "config", "mountPath": GATEWAY_CONFIG_DIR, "readOnly": True}],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(name, object_labels),
        "spec": {
            "replicas": pool.gateway.replicas,
            "selector": {"matchLabels": selector_labels(pool, role=labels.GATEWAY_ROLE)},
            "template": {
                "metadata": {
                    "labels": object_labels,
                    # Envoy reads its bootstrap once: a new one rolls the pods.
                    "annotations": {CONFIG_HASH_ANNOTATION: config_hash},
                },
                "spec": {
                    "enableServiceLinks": False,
                    "automountServiceAccountToken": False,
                    "securityContext": _restricted_pod_security_context(),
                    "containers": [container],
                    "volumes": [{"name": "config", "configMap": {"name": name}}],
                },
            },
        },
    }


def _inference_pool(pool: PoolSpec, *, settings: RenderSettings) -> Obj:
    """The pool's engines as a GIE InferencePool whose endpoint picker is the scheduler: an
    existing Gateway API Inference Extension gateway routes through twinroute."""
    return {
        "apiVersion": INFERENCE_POOL_API,
        "kind": "InferencePool",
        "metadata": _meta(pool.name, pool_labels(pool, role=labels.SCHEDULER_ROLE)),
        "spec": {
            "selector": {"matchLabels": selector_labels(pool, role=Role.UNIFIED.value)},
            "targetPorts": [{"number": pool.engine.port}],
            "endpointPickerRef": {
                "group": "",
                "kind": "Service",
                "name": scheduler_name(pool=pool.name),
                "port": {"number": settings.picker_port},
                "failureMode": pool.gateway.failure_mode,
            },
        },
    }


def _token_digest(pool: PoolSpec, settings: RenderSettings) -> str:
    """Changes when the pool's own token does (a new operator key), revealing nothing of it."""
    if settings.admin_token_secret or not settings.pool_token_key:
        return ""
    token = derive_pool_token(settings.pool_token_key, namespace=pool.namespace, pool=pool.name)
    return hashlib.sha256(f"twinroute-token-digest\0{token}".encode()).hexdigest()[:8]


def _digest(value: Any) -> str:
    encoded = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]


def _meta(name: str, object_labels: Mapping[str, str]) -> Obj:
    return {"name": name, "labels": dict(object_labels)}


def _restricted_security_context(*, read_only_root: bool) -> Obj:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": read_only_root,
        "capabilities": {"drop": ["ALL"]},
    }


def _restricted_pod_security_context() -> Obj:
    return {
        "runAsNonRoot": True,
        "runAsUser": POD_USER,
        "runAsGroup": POD_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _engine_deployment(pool: PoolSpec, *, role: Role) -> Obj:
    engine = pool.engine
    object_labels = pool_labels(pool, role=role.value)
    container: Obj = {
        "name": "engine",
        "image": engine.image,
        "command": list(engine.command),
        "args": engine_args(pool, role=role),
        "ports": [
            {"name": labels.ENGINE_PORT_NAME, "containerPort": engine.port, "protocol": "TCP"},
            *(
                [
                    {"name": name, "containerPort": port, "protocol": "TCP"}
                    for name, port in (
                        (KV_EVENTS_PORT_NAME, KV_EVENTS_PORT),
                        (KV_EVENTS_REPLAY_PORT_NAME, KV_EVENTS_REPLAY_PORT),
                    )
                ]
                if publishes_kv_events(pool)
                else []
            ),
        ],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "HOME", "value": ENGINE_HOME},
            *(dict(item) for item in engine.env),
        ],
        "resources": dict(engine.resources),
        "securityContext": _restricted_security_context(read_only_root=True),
        # Loading weights can take many minutes; the startup probe covers it so the liveness
        # probe can stay strict afterwards.
        "startupProbe": {
            "httpGet": {"path": "/health", "port": labels.ENGINE_PORT_NAME},
            "periodSeconds": 10,
            "failureThreshold": 180,
        },
        "readinessProbe": {
            "httpGet": {"path": "/health", "port": labels.ENGINE_PORT_NAME},
            "periodSeconds": 5,
            "failureThreshold": 2,
        },
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": labels.ENGINE_PORT_NAME},
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
        "volumeMounts": [
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "home", "mountPath": ENGINE_HOME},
        ],
    }
    pod_spec: Obj = {
        "securityContext": _restricted_pod_security_context(),
        "containers": [container],
        "volumes": [
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
            {"name": "tmp", "emptyDir": {}},
            # Model downloads and compile caches: sized by the node's ephemeral storage.
            {"name": "home", "emptyDir": {}},
        ],
        "nodeSelector": dict(engine.node_selector),
        "tolerations": [dict(item) for item in engine.tolerations],
        "enableServiceLinks": False,
        # The scheduler drains an endpoint before scale-in; this is the grace for what remains.
        "terminationGracePeriodSeconds": 60,
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(engine_name(pool=pool.name, role=role), object_labels),
        "spec": {
            "replicas": pool.replicas[role],
            "selector": {"matchLabels": selector_labels(pool, role=role.value)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {
                "metadata": {
                    "labels": object_labels,
                    "annotations": {
                        labels.ENGINE_PORT_ANNOTATION: str(engine.port),
                        labels.SERVED_MODEL_ANNOTATION: pool.model_name,
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(engine.port),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": pod_spec,
            },
        },
    }


def _engine_service(pool: PoolSpec, *, role: Role) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(
            engine_name(pool=pool.name, role=role), pool_labels(pool, role=role.value)
        ),
        "spec": {
            "clusterIP": "None",
            "selector": selector_labels(pool, role=role.value),
            "ports": [
                {
                    "name": labels.ENGINE_PORT_NAME,
                    "port": pool.engine.port,
                    "targetPort": labels.ENGINE_PORT_NAME,
                    "protocol": "TCP",
                }
            ],
        },
    }


def _scheduler_config_map(pool: PoolSpec, *, settings: RenderSettings) -> Obj:
    text = yaml.safe_dump(scheduler_config(pool, settings=settings), sort_keys=True)
    return _config_map(
        scheduler_name(pool=pool.name), pool_labels(pool, role=labels.SCHEDULER_ROLE),
        {CONFIG_FILE: text},
    )  # fmt: skip


def _config_map(name: str, object_labels: dict[str, str], data: dict[str, str]) -> Obj:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(name, object_labels),
            "data": data}  # fmt: skip


def _scheduler_service_account(pool: PoolSpec) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(
            scheduler_name(pool=pool.name), pool_labels(pool, role=labels.SCHEDULER_ROLE)
        ),
        "automountServiceAccountToken": True,
    }


def _scheduler_role_binding(pool: PoolSpec, *, settings: RenderSettings) -> Obj:
    name = scheduler_name(pool=pool.name)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(name, pool_labels(pool, role=labels.SCHEDULER_ROLE)),
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": settings.scheduler_cluster_role,
        },
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": pool.namespace}],
    }


def _scheduler_containers(pool: PoolSpec, *, settings: RenderSettings) -> Sequence[Obj]:
    image = pool.scheduler.image or settings.scheduler_image
    config_path = f"{CONFIG_DIR}/{CONFIG_FILE}"
    common: Obj = {
        "image": image,
        "imagePullPolicy": settings.image_pull_policy,
        "securityContext": _restricted_security_context(read_only_root=True),
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
    }
    scheduler: Obj = {
        "name": "scheduler",
        "command": ["twinroute", "scheduler"],
        "args": [
            "--config",
            config_path,
            "--host",
            "0.0.0.0",
            "--grpc-port",
            str(settings.grpc_port),
            "--metrics-port",
            str(settings.metrics_port),
        ],
        "ports": [
            {
                "name": labels.SCHEDULER_GRPC_PORT_NAME,
                "containerPort": settings.grpc_port,
                "protocol": "TCP",
            },
            {
                "name": labels.SCHEDULER_METRICS_PORT_NAME,
                "containerPort": settings.metrics_port,
                "protocol": "TCP",
            },
        ],
        "readinessProbe": {"grpc": {"port": settings.grpc_port}, "periodSeconds": 5},
        "livenessProbe": {
            "grpc": {"port": settings.grpc_port},
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}],
        **common,
    }
    router: Obj = {
        "name": "router",
        "command": ["twinroute", "router"],
        "args": [
            "--host",
            "0.0.0.0",
            "--port",
            str(settings.router_port),
            "--model",
            pool.model_name,
            "--scheduler",
            f"127.0.0.1:{settings.grpc_port}",
            *router_routing_args(pool),
        ],
        "ports": [
            {
                "name": labels.ROUTER_HTTP_PORT_NAME,
                "containerPort": settings.router_port,
                "protocol": "TCP",
            }
        ],
        "readinessProbe": {
            "httpGet": {"path": "/health", "port": labels.ROUTER_HTTP_PORT_NAME},
            "periodSeconds": 5,
        },
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": labels.ROUTER_HTTP_PORT_NAME},
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
        **common,
    }
    if pool.scheduler.replicas > 1:
        # Active-active: each replica shares its load with the others (found through the
        # headless Service), and each router spreads its picks over all of them.
        replicas_address = (
            f"{scheduler_peers_name(pool=pool.name)}.{pool.namespace}.svc:{settings.grpc_port}"
        )
        scheduler["args"] += ["--peers", replicas_address]
        scheduler["env"] = [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
        ]
        router["args"][router["args"].index("--scheduler") + 1] = replicas_address
        router["args"].append("--scheduler-replicas")
    if pool.gateway.uses_picker:
        scheduler["ports"].append(
            {
                "name": labels.SCHEDULER_PICKER_PORT_NAME,
                "containerPort": settings.picker_port,
                "protocol": "TCP",
            }
        )
    if pool.routing.tokenizer is not None:
        # The front end makes the prompt keys: the picker in the scheduler, else the router.
        _give_tokenizer(
            scheduler if pool.gateway.uses_picker else router, tokenizer=pool.routing.tokenizer
        )
    _secure_scheduler_containers(pool, scheduler=scheduler, router=router, settings=settings)
    if pool.gateway.kind != "router":
        return [scheduler]
    return [scheduler, router]


def _give_tokenizer(container: Obj, *, tokenizer: TokenizerSpec) -> None:
    """`--tokenizer` for the front end: a path in the mounted volume, or a hub repository
    fetched at start into an emptyDir (with the hub token from its Secret, when given)."""
    mounts = container.setdefault("volumeMounts", [])
    if tokenizer.volume is not None:
        path = f"{TOKENIZER_DIR}/{tokenizer.source}".rstrip("/")
        container["args"] += ["--tokenizer", path]
        mounts.append({"name": "tokenizer", "mountPath": TOKENIZER_DIR, "readOnly": True})
        return
    container["args"] += ["--tokenizer", tokenizer.source]
    if tokenizer.revision:
        container["args"] += ["--tokenizer-revision", tokenizer.revision]
    mounts.append({"name": "hub-cache", "mountPath": HUB_CACHE_DIR})
    env = container.setdefault("env", [])
    env.append({"name": "HF_HOME", "value": HUB_CACHE_DIR})
    if tokenizer.hub_token is not None:
        secret = tokenizer.hub_token
        env.append(
            {
                "name": "HF_TOKEN",
                # Optional: a public repository needs none, and a gated one then fails to
                # fetch with the hub's own reason in the log, not a pod stuck creating.
                "valueFrom": {
                    "secretKeyRef": {"name": secret.name, "key": secret.key, "optional": True}
                },
            }
        )


def _secure_scheduler_containers(
    pool: PoolSpec, *, scheduler: Obj, router: Obj, settings: RenderSettings
) -> None:
    """Mount the token and TLS Secrets and point both containers' flags at them."""
    if not token_secret(settings, pool=pool.name):
        # Listening beyond loopback without a token: the scheduler refuses unless told.
        scheduler["args"] += ["--allow-unauthenticated"]
    else:
        mount = {"name": "admin-token", "mountPath": ADMIN_TOKEN_DIR, "readOnly": True}
        token_file = f"{ADMIN_TOKEN_DIR}/token"
        scheduler["args"] += ["--admin-token-file", token_file]
        router["args"] += ["--scheduler-token-file", token_file]
        for container in (scheduler, router):
            container.setdefault("volumeMounts", []).append(dict(mount))
    if settings.tls_secret:
        mount = {"name": "tls", "mountPath": TLS_DIR, "readOnly": True}
        scheduler["args"] += ["--tls-cert", f"{TLS_DIR}/tls.crt", "--tls-key", f"{TLS_DIR}/tls.key"]
        router["args"] += [
            "--scheduler-ca", f"{TLS_DIR}/ca.crt",
            "--scheduler-server-name", settings.tls_server_name,
        ]  # fmt: skip
        if pool.scheduler.replicas > 1:
            # The replicas dial each other by pod IP over the same TLS as the routers.
            scheduler["args"] += [
                "--peer-ca", f"{TLS_DIR}/ca.crt",
                "--peer-server-name", settings.tls_server_name,
            ]  # fmt: skip
        # The kubelet's gRPC probe cannot speak TLS: an open port is what it can check.
        for probe in ("readinessProbe", "livenessProbe"):
            scheduler[probe] = {
                **{k: v for k, v in scheduler[probe].items() if k != "grpc"},
                "tcpSocket": {"port": settings.grpc_port},
            }
        if settings.router_tls:
            router["args"] += [
                "--tls-cert",
                f"{TLS_DIR}/tls.crt",
                "--tls-key",
                f"{TLS_DIR}/tls.key",
            ]
            for probe in ("readinessProbe", "livenessProbe"):
                router[probe]["httpGet"]["scheme"] = "HTTPS"
        for container in (scheduler, router):
            container.setdefault("volumeMounts", []).append(dict(mount))


def _scheduler_volumes(pool: PoolSpec, *, settings: RenderSettings) -> list[Obj]:
    volumes: list[Obj] = [{"name": "config", "configMap": {"name": scheduler_name(pool=pool.name)}}]
    secret = token_secret(settings, pool=pool.name)
    if secret:
        volumes.append(
            {
                "name": "admin-token",
                "secret": {
                    "secretName": secret,
                    "items": [{"key": "token", "path": "token"}],
                    "defaultMode": 0o440,
                },
            }
        )
    if settings.tls_secret:
        volumes.append(
            {"name": "tls", "secret": {"secretName": settings.tls_secret, "defaultMode": 0o440}}
        )
    tokenizer = pool.routing.tokenizer
    if tokenizer is not None:
        if tokenizer.volume is not None:
            volumes.append({"name": "tokenizer", **tokenizer.volume})
        else:
            # A tokenizer.json is 2-20 MB; the limit only keeps a bad source from filling
            # the node's disk.
            volumes.append({"name": "hub-cache", "emptyDir": {"sizeLimit": "256Mi"}})
    return volumes


def _scheduler_deployment(pool: PoolSpec, *, settings: RenderSettings, config_hash: str) -> Obj:
    name = scheduler_name(pool=pool.name)
    object_labels = pool_labels(pool, role=labels.SCHEDULER_ROLE)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(name, object_labels),
        "spec": {
            "replicas": pool.scheduler.replicas,
            "selector": {"matchLabels": selector_labels(pool, role=labels.SCHEDULER_ROLE)},
            "template": {
                "metadata": {
                    "labels": object_labels,
                    # A changed routing config (or token) rolls the scheduler pods: both are
                    # read once, at start.
                    "annotations": {CONFIG_HASH_ANNOTATION: config_hash},
                },
                "spec": {
                    "serviceAccountName": name,
                    "enableServiceLinks": False,
                    "securityContext": {
                        **_restricted_pod_security_context(),
                        # Lets the non-root user read the mounted Secrets (mode 0440).
                        "fsGroup": POD_USER,
                    },
                    "containers": list(_scheduler_containers(pool, settings=settings)),
                    "volumes": _scheduler_volumes(pool, settings=settings),
                },
            },
        },
    }


def _pool_token_secret(pool: PoolSpec, *, key: bytes) -> Obj:
    token = derive_pool_token(key, namespace=pool.namespace, pool=pool.name)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(
            pool_token_secret_name(pool=pool.name), pool_labels(pool, role=labels.SCHEDULER_ROLE)
        ),
        "type": "Opaque",
        "data": {"token": base64.b64encode(token.encode()).decode()},
    }


def _pool_service(pool: PoolSpec, *, settings: RenderSettings) -> Obj:
    """The pool's OpenAI endpoint: the router's (or the pool's Envoy's) HTTP port and nothing
    else, whatever its type."""
    front = labels.GATEWAY_ROLE if pool.gateway.kind == "envoy" else labels.SCHEDULER_ROLE
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(pool.name, pool_labels(pool, role=front)),
        "spec": {
            "type": pool.scheduler.service_type,
            "selector": selector_labels(pool, role=front),
            "ports": [
                {
                    "name": labels.ROUTER_HTTP_PORT_NAME,
                    "port": settings.router_port,
                    "targetPort": labels.ROUTER_HTTP_PORT_NAME,
                    "protocol": "TCP",
                }
            ],
        },
    }


def _scheduler_peers_service(pool: PoolSpec, *, settings: RenderSettings) -> Obj:
    """Headless: its name resolves to every scheduler replica's pod IP, ready or not (a peer
    shares its load from its first second; routers skip a replica that does not answer)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(
            scheduler_peers_name(pool=pool.name), pool_labels(pool, role=labels.SCHEDULER_ROLE)
        ),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": selector_labels(pool, role=labels.SCHEDULER_ROLE),
            "ports": [
                {
                    "name": labels.SCHEDULER_GRPC_PORT_NAME,
                    "port": settings.grpc_port,
                    "targetPort": labels.SCHEDULER_GRPC_PORT_NAME,
                    "protocol": "TCP",
                }
            ],
        },
    }


def _scheduler_disruption_budget(pool: PoolSpec) -> Obj:
    """A voluntary disruption (node drain, rollout) leaves one replica at least."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(
            scheduler_name(pool=pool.name), pool_labels(pool, role=labels.SCHEDULER_ROLE)
        ),
        "spec": {
            "minAvailable": 1,
            "selector": {"matchLabels": selector_labels(pool, role=labels.SCHEDULER_ROLE)},
        },
    }


def _scheduler_service(pool: PoolSpec, *, settings: RenderSettings) -> Obj:
    """The scheduler's gRPC and metrics ports, for the cluster only (ClusterIP, always)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(
            scheduler_name(pool=pool.name), pool_labels(pool, role=labels.SCHEDULER_ROLE)
        ),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(pool, role=labels.SCHEDULER_ROLE),
            "ports": [
                {
                    "name": labels.SCHEDULER_GRPC_PORT_NAME,
                    "port": settings.grpc_port,
                    "targetPort": labels.SCHEDULER_GRPC_PORT_NAME,
                    "protocol": "TCP",
                },
                {
                    "name": labels.SCHEDULER_METRICS_PORT_NAME,
                    "port": settings.metrics_port,
                    "targetPort": labels.SCHEDULER_METRICS_PORT_NAME,
                    "protocol": "TCP",
                },
                *(
                    [
                        {
                            "name": labels.SCHEDULER_PICKER_PORT_NAME,
                            # The InferencePool names it by number (GIE's default: 9002).
                            "port": settings.picker_port,
                            "targetPort": labels.SCHEDULER_PICKER_PORT_NAME,
                            "protocol": "TCP",
                        }
                    ]
                    if pool.gateway.uses_picker
                    else []
                ),
            ],
        },
    }
