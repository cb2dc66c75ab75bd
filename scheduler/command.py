"""`twinroute scheduler`: the gRPC scheduler service.

Reads its flags and the config file into one `SchedulerSettings`, then builds every object
here and passes it in (no singletons): the service (`twinroute.scheduler.build`), one Prometheus
registry, discovery (static list, YAML file or Kubernetes), the scraper and the servers. Prints
`scheduler listening on HOST:PORT` once the gRPC port is bound. SIGTERM or SIGINT stops
gracefully: health NOT_SERVING, in-flight RPCs finish within `--grace-s`, then the background
tasks stop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry
from twinroute.scheduler.build import KvEventFollower, build_service
from twinroute.scheduler.costmodel import COST_PROFILES
from twinroute.scheduler.discovery import (
    EndpointSource,
    KubernetesSource,
    StaticSource,
    WatchedFileSource,
    parse_endpoint_list,
    run_discovery,
)
from twinroute.scheduler.migration import parse_hooks
from twinroute.scheduler.openai_queries import (
    TOKENIZER_HELP,
    add_tokenizer_arguments,
    tokenizer_from_arguments,
)
from twinroute.scheduler.peer_loads import DEFAULT_MEMBERSHIP_GRACE_S, DEFAULT_PEER_STALE_S
from twinroute.scheduler.peers import DEFAULT_SHARE_INTERVAL_S, PeerExchange, enable_replicas
from twinroute.scheduler.picker import EndpointPicker, PickerServer, PickerSettings
from twinroute.scheduler.policies.base import COLD_PLACEMENTS
from twinroute.scheduler.scrape import ScrapeListener, Scraper, ScrapeSettings
from twinroute.scheduler.server import GrpcServer, TlsFiles
from twinroute.scheduler.service import SchedulerService
from twinroute.scheduler.settings import SchedulerSettings, parse_config, parse_kv_event_endpoints
from twinroute.scheduler.telemetry import build_metrics_app
from twinroute.scheduler.tokens import TokenGuard
from twinroute.scheduler.types import Endpoint

from twinroute.runtime import LOG_LEVELS, event_loop_runner, settle_heap_for_serving
from twinroute.vocabulary import MIGRATION_MODES, POLICY_NAMES

logger = logging.getLogger(__name__)


def _add_replica_arguments(parser: argparse.ArgumentParser) -> None:
    replicas = parser.add_argument_group(
        "active-active replicas",
        "several schedulers for one pool, each serving Pick; they share the load they placed",
    )
    replicas.add_argument(
        "--peers", default="",
        help="comma-separated HOST:PORT of the pool's scheduler replicas (this one may be "
        "among them); a name that resolves to several addresses, such as a headless Service, "
        "stands for all of them ('' = a lone scheduler)",
    )  # fmt: skip
    replicas.add_argument(
        "--peer-interval-ms", type=float, default=1000 * DEFAULT_SHARE_INTERVAL_S,
        help="how often this replica sends its load to each peer",
    )  # fmt: skip
    replicas.add_argument(
        "--peer-stale-s", type=float, default=DEFAULT_PEER_STALE_S,
        help="a peer's load stops counting this long after its last share (a dead replica)",
    )  # fmt: skip
    replicas.add_argument(
        "--peer-ca",
        help="PEM CA the peers' TLS certificates are signed by (with --tls-cert: required, "
        "peers are dialled over TLS)",
    )
    replicas.add_argument(
        "--peer-server-name",
        help="the name the peers' certificates carry (peers are dialled by IP)",
    )
    replicas.add_argument(
        "--membership-grace-s", type=float, default=DEFAULT_MEMBERSHIP_GRACE_S,
        help="while a peer has newer ring membership, refuse picks (routers ask another "
        "replica) for at most this long, then route on what this replica has",
    )  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SchedulerSettings()
    parser.add_argument("--listen", default="127.0.0.1:50051", help="gRPC HOST:PORT (port 0 = any)")
    parser.add_argument(
        "--metrics-listen", default="127.0.0.1:9464",
        help="HOST:PORT for /metrics and /debug/decisions ('' = off)",
    )  # fmt: skip
    parser.add_argument("--host", help="with --grpc-port/--metrics-port: listen on this host")
    parser.add_argument("--grpc-port", type=int, help="gRPC port on --host")
    parser.add_argument("--metrics-port", type=int, help="metrics port on --host")
    _add_picker_arguments(parser)
    _add_replica_arguments(parser)
    parser.add_argument(
        "--config", help="the pool's scheduler.yaml (as the operator renders it); its values "
        "take precedence over the flags they correspond to, and an unknown key is an error",
    )  # fmt: skip
    routing = parser.add_argument_group("routing")
    routing.add_argument(
        "--policy", default=defaults.policy, choices=POLICY_NAMES, help="routing policy"
    )
    routing.add_argument(
        "--ttft-slo-s", type=float, default=defaults.ttft_slo_s,
        help="TTFT objective of requests that bring none (seconds)",
    )  # fmt: skip
    routing.add_argument(
        "--virtual-nodes", type=int, default=defaults.virtual_nodes, help="ring points per endpoint"
    )
    routing.add_argument(
        "--profile", default=defaults.cost_profile, choices=sorted(COST_PROFILES),
        help="cost model for TTFT predictions: the prior when calibration is on",
    )  # fmt: skip
    routing.add_argument(
        "--cold-placement", choices=COLD_PLACEMENTS, default=defaults.cold_placement,
        help="dualmap: a prompt its ring pair does not hold goes to the pool's least loaded "
        "endpoint when that beats both, or stays on the pair (default: %(default)s)",
    )  # fmt: skip
    routing.add_argument(
        "--cost-calibration", choices=("on", "off"), default=_on_off(defaults.cost_calibration),
        help="fit each endpoint's cost model online from the first tokens it reports, "
        "the profile as the prior (default: %(default)s)",
    )  # fmt: skip
    routing.add_argument(
        "--phase-aware", choices=("on", "off"), default=_on_off(defaults.phase_aware),
        help="placement counts the endpoints' decode load and the request's expected output "
        "(policies that use the TTFT estimator; benchmarks/phase_aware.md)",
    )  # fmt: skip
    routing.add_argument(
        "--pd-min-prefill-tokens", type=int, default=defaults.pd_min_prefill_tokens,
        help="prefill/decode pools: a decode endpoint prefills prompts itself when at most "
        "this many of their tokens are not cached there (skips the prefill hop)",
    )  # fmt: skip
    routing.add_argument(
        "--key-block-tokens", type=int, default=defaults.key_block_tokens,
        help="prefix-key block, tokens (a multiple of the engine block size; 64 keeps the "
        "prefix record cheap at long prompts, see benchmarks/scheduler_pick.md)",
    )  # fmt: skip
    routing.add_argument(
        "--key-block-chars", type=int, default=defaults.key_block_chars,
        help="prefix-key block for text prompts, characters",
    )  # fmt: skip
    routing.add_argument(
        "--tokens-per-char", type=float, default=defaults.tokens_per_char,
        help="model tokens per character, to estimate text prompts' length",
    )  # fmt: skip
    routing.add_argument(
        "--prefix-capacity-tokens", type=int, default=None,
        help="tokens each engine's prefix cache holds, to size the scheduler's record of it "
        "(default: the prefix index's own size)",
    )  # fmt: skip
    routing.add_argument(
        "--model", action="append", default=[],
        help="served model name (repeatable); endpoints without a model serve these",
    )  # fmt: skip
    _add_cache_arguments(parser)
    _add_load_arguments(parser, defaults)
    source = parser.add_argument_group("where the engines are (exactly one)")
    sources = source.add_mutually_exclusive_group()
    sources.add_argument("--static-endpoints", help="comma-separated [ID=]HOST:PORT")
    sources.add_argument(
        "--endpoints-file", help="YAML file with an 'endpoints' list (re-read when it changes)"
    )
    sources.add_argument("--kube-selector", help="label selector of the pool's engine pods")
    source.add_argument("--namespace", default="default", help="namespace of the pods")
    source.add_argument("--kubeconfig", help="kubeconfig path (default: in-cluster, then ~)")
    source.add_argument("--engine-port", type=int, default=8000, help="pods' default port")
    _add_security_arguments(parser)
    migration = parser.add_argument_group("live migration of running requests")
    migration.add_argument(
        "--migration", default=defaults.migration, choices=MIGRATION_MODES,
        help="drain: Drain migrates what runs on the endpoint (engine hooks, or routers "
        "watching for orders); on: also Llumnix-style rebalancing of persistent imbalance",
    )  # fmt: skip
    migration.add_argument(
        "--migration-interval-s", type=float, default=defaults.migration_interval_s,
        help="seconds between rebalancing rounds",
    )  # fmt: skip
    migration.add_argument(
        "--migration-hooks", default="",
        help="engines' MigrationHook addresses, ENDPOINT_ID=HOST:PORT,... (KV migration "
        "between two listed engines; routers migrate the rest by recompute)",
    )  # fmt: skip
    parser.add_argument("--grace-s", type=float, default=5.0, help="shutdown grace, seconds")
    parser.add_argument(
        "--log-level", default="INFO", choices=LOG_LEVELS, type=str.upper, help="log threshold"
    )


def _add_load_arguments(parser: argparse.ArgumentParser, defaults: SchedulerSettings) -> None:
    load = parser.add_argument_group("load and leases")
    load.add_argument(
        "--scrape-interval-s", type=float, default=defaults.scrape_interval_s,
        help="seconds between engine metric scrapes; 0 = off",
    )  # fmt: skip
    load.add_argument(
        "--scrape-timeout-s", type=float, default=defaults.scrape_timeout_s,
        help="an engine's /metrics that takes longer counts as not scraped",
    )  # fmt: skip
    load.add_argument(
        "--lease-ttl-s", type=float, default=defaults.lease_ttl_s,
        help="a lease whose Complete never came closes after this many seconds",
    )  # fmt: skip
    load.add_argument(
        "--admission-hold", choices=("on", "off"), default=_on_off(defaults.admission_hold),
        help="hold the answers of requests routed to a hotspot so that hotspot rebalancing can "
        "still move them (policies that rebalance; benchmarks/rebalance.md)",
    )  # fmt: skip
    load.add_argument(
        "--admission-max-hold-s", type=float, default=defaults.admission_max_hold_s,
        help="seconds a Pick answer may be held at most (never past the caller's deadline)",
    )  # fmt: skip


def _add_picker_arguments(parser: argparse.ArgumentParser) -> None:
    picker = parser.add_argument_group(
        "endpoint picker (Envoy external processing: the Gateway API Inference Extension's "
        "protocol, for `twinroute gateway` or any GIE gateway)"
    )
    picker.add_argument("--picker-listen", default="", help="HOST:PORT ('' = no picker)")
    picker.add_argument("--picker-port", type=int, help="the picker's port on --host")
    add_tokenizer_arguments(
        picker, help="the picker's tokenizer, for prefix keys: " + TOKENIZER_HELP
    )
    picker.add_argument(
        "--picker-max-in-flight", type=int, default=0,
        help="requests in flight through the picker at most; more are shed with 429 (0 = no "
        "limit)",
    )  # fmt: skip
    picker.add_argument(
        "--picker-max-body-bytes", type=int, default=16 * 1024 * 1024,
        help="request bodies larger than this are refused with 413",
    )  # fmt: skip


def _add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    caches = parser.add_argument_group("what the engines cache (vLLM KV-cache events)")
    caches.add_argument(
        "--kv-events-port", type=int, default=None,
        help="follow every engine's KV events at tcp://ENGINE_HOST:PORT (engines run vLLM "
        "with --kv-events-config endpoint tcp://*:PORT); default: off",
    )  # fmt: skip
    caches.add_argument(
        "--kv-events-endpoints", default="",
        help="comma-separated ID=tcp://HOST:PORT: each engine's KV-event publisher (overrides "
        "--kv-events-port for those ids)",
    )  # fmt: skip
    caches.add_argument(
        "--kv-events-replay-port", type=int, default=None,
        help="ask every engine for missed KV-event batches at tcp://ENGINE_HOST:PORT (vLLM's "
        "kv-events-config replay_endpoint tcp://*:PORT); default: gaps are not replayed",
    )  # fmt: skip
    caches.add_argument(
        "--kv-events-replay-endpoints", default="",
        help="comma-separated ID=tcp://HOST:PORT: each engine's KV-event replay socket "
        "(overrides --kv-events-replay-port for those ids)",
    )  # fmt: skip
    caches.add_argument(
        "--engine-block-size", type=int, default=None,
        help="the engines' KV block size in tokens, to hash prompts as they do (default: "
        "--key-block-tokens)",
    )  # fmt: skip
    caches.add_argument(
        "--engine-hash-seed", default=None,
        help="the engines' PYTHONHASHSEED, when they run with one (vLLM seeds its block "
        "hashes with it)",
    )  # fmt: skip


def _add_security_arguments(parser: argparse.ArgumentParser) -> None:
    security = parser.add_argument_group("TLS and tokens")
    security.add_argument(
        "--admin-token",
        help="bearer token every call but health checks requires: the data plane's (Pick, "
        "Complete, ...) and the admin RPCs (Drain, Undrain, migration), and /debug/decisions",
    )
    security.add_argument(
        "--admin-token-file",
        help="file holding the token (a mounted Secret; keeps it off the command line)",
    )
    security.add_argument(
        "--allow-unauthenticated", action="store_true",
        help="serve without a token on an address other than loopback (anyone who reaches "
        "the port can then close leases and Drain the pool)",
    )  # fmt: skip
    security.add_argument("--tls-cert", help="PEM certificate for gRPC TLS")
    security.add_argument("--tls-key", help="PEM private key for gRPC TLS")


def _on_off(value: bool) -> str:
    return "on" if value else "off"


def settings_from_arguments(args: argparse.Namespace) -> SchedulerSettings:
    """The settings the flags give (the config file is applied over them)."""
    return SchedulerSettings(
        policy=args.policy,
        ttft_slo_s=args.ttft_slo_s,
        virtual_nodes=args.virtual_nodes,
        cost_profile=args.profile,
        cost_calibration=args.cost_calibration == "on",
        cold_placement=args.cold_placement,
        phase_aware=args.phase_aware == "on",
        key_block_tokens=args.key_block_tokens,
        key_block_chars=args.key_block_chars,
        tokens_per_char=args.tokens_per_char,
        prefix_capacity_tokens=args.prefix_capacity_tokens,
        lease_ttl_s=args.lease_ttl_s,
        scrape_interval_s=args.scrape_interval_s,
        scrape_timeout_s=args.scrape_timeout_s,
        pd_min_prefill_tokens=args.pd_min_prefill_tokens,
        admission_hold=args.admission_hold == "on",
        admission_max_hold_s=args.admission_max_hold_s,
        migration=args.migration,
        migration_interval_s=args.migration_interval_s,
        migration_hooks=tuple(parse_hooks(args.migration_hooks).items()),
        kv_events_port=args.kv_events_port,
        kv_events_endpoints=parse_kv_event_endpoints(args.kv_events_endpoints),
        kv_events_replay_port=args.kv_events_replay_port,
        kv_events_replay_endpoints=parse_kv_event_endpoints(args.kv_events_replay_endpoints),
        engine_block_size=args.engine_block_size,
        engine_hash_seed=args.engine_hash_seed,
        served_models=tuple(args.model),
    )


def resolve_arguments(args: argparse.Namespace) -> SchedulerSettings:
    """The settings (flags, then --config over them); --config's discovery and ports and
    --host/--*-port folded into `args`; exactly one endpoint source checked."""
    settings = settings_from_arguments(args)
    if args.config:
        with open(args.config, encoding="utf-8") as handle:
            config = parse_config(yaml.safe_load(handle.read()), source=args.config)
        settings = config.apply(settings)
        if config.discovery is not None:
            args.static_endpoints = args.endpoints_file = None
            args.kube_selector = config.discovery.label_selector
            args.namespace = config.discovery.namespace
            args.engine_port = config.discovery.default_port
        if args.grpc_port is None and config.grpc_port is not None:
            args.grpc_port = config.grpc_port
        if args.metrics_port is None and config.metrics_port is not None:
            args.metrics_port = config.metrics_port
        if args.picker_port is None and config.picker_port is not None:
            args.picker_port = config.picker_port
    host = args.host or "127.0.0.1"
    if args.grpc_port is not None:
        args.listen = f"{host}:{args.grpc_port}"
    if args.metrics_port is not None:
        args.metrics_listen = f"{host}:{args.metrics_port}"
    if args.picker_port is not None:
        args.picker_listen = f"{host}:{args.picker_port}"
    sources = [args.static_endpoints, args.endpoints_file, args.kube_selector]
    if sum(1 for source in sources if source) != 1:
        raise ValueError(
            "name exactly one endpoint source: --static-endpoints, --endpoints-file, "
            "--kube-selector, or a --config with a discovery block"
        )
    return settings


def _split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{listen!r} is not HOST:PORT")
    return host, int(port)


def build_source(args: argparse.Namespace, settings: SchedulerSettings) -> EndpointSource:
    models = settings.served_models
    model = models[0] if len(models) == 1 else ""
    if args.static_endpoints:
        return StaticSource(endpoints=parse_endpoint_list(args.static_endpoints, model=model))
    if args.endpoints_file:
        return WatchedFileSource(path=args.endpoints_file, model=model)
    # Imported here: the client reads KUBECONFIG when loaded, only wanted on this path.
    from kubernetes import client as k8s
    from kubernetes import config as k8s_config_module

    k8s_config: Any = k8s_config_module

    configuration = k8s.Configuration()
    if args.kubeconfig:
        k8s_config.load_kube_config(config_file=args.kubeconfig, client_configuration=configuration)
    else:
        try:
            k8s_config.load_incluster_config(client_configuration=configuration)
        except k8s_config.ConfigException:
            k8s_config.load_kube_config(client_configuration=configuration)
    return KubernetesSource(
        api_client=k8s.ApiClient(configuration),
        namespace=args.namespace,
        label_selector=args.kube_selector,
        default_port=args.engine_port,
    )


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _refuse_open_network_listen(args: argparse.Namespace) -> None:
    """Without a token only local processes may reach the scheduler, unless the operator of
    this process says otherwise in so many words."""
    if args.admin_token:
        return
    exposed = [
        listen
        for listen in (args.listen, args.metrics_listen)
        if listen and not _is_loopback(_split_listen(listen)[0])
    ]
    if not exposed:
        logger.warning("no --admin-token: Drain and every other call are open to local processes")
        return
    if not args.allow_unauthenticated:
        raise ValueError(
            f"{', '.join(exposed)} is reachable from the network and no --admin-token(-file) "
            "is set: anyone could Drain the pool or close leases; set a token, listen on "
            "loopback, or pass --allow-unauthenticated"
        )
    logger.warning("--allow-unauthenticated on %s: every call is open", ", ".join(exposed))


def read_secret_file(path: str, *, flag: str) -> str:
    """A token from a file (surrounding whitespace dropped); empty is refused, not "no token"."""
    with open(path, encoding="utf-8") as handle:
        token = handle.read().strip()
    if not token:
        raise ValueError(f"{flag} {path} is empty")
    return token


async def serve(args: argparse.Namespace, settings: SchedulerSettings) -> int:
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    if args.admin_token_file:
        args.admin_token = read_secret_file(args.admin_token_file, flag="--admin-token-file")
    _refuse_open_network_listen(args)
    service = build_service(settings, registry=CollectorRegistry())
    source = build_source(args, settings)
    tls = TlsFiles(cert_path=args.tls_cert, key_path=args.tls_key) if args.tls_cert else None
    replica_id = None
    if args.peers:
        if args.peer_interval_ms <= 0 or args.peer_stale_s <= 0 or args.membership_grace_s < 0:
            raise ValueError(
                "--peer-interval-ms > 0, --peer-stale-s > 0 and --membership-grace-s >= 0"
            )
        if args.tls_cert and not args.peer_ca:
            raise ValueError(
                "--peers with --tls-cert needs --peer-ca: the peers serve TLS too, and their "
                "load shares carry the pool token"
            )
        replica_id = enable_replicas(
            service, stale_after_s=args.peer_stale_s, grace_s=args.membership_grace_s
        )
    server = GrpcServer(service=service, listen=args.listen, admin_token=args.admin_token, tls=tls)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # First what can refuse the flags (the picker's tokenizer): nothing is open yet to leak.
    picker = _picker_server(args, service)
    metrics, metrics_url = await serve_metrics(args.metrics_listen, service, token=args.admin_token)
    session = aiohttp.ClientSession()
    tasks = _background_tasks(
        service, source=source, session=session, synced=picker.mark_synced if picker else None
    )
    try:
        await server.start()
        if replica_id is not None:
            exchange = PeerExchange(
                service=service,
                replica_id=replica_id,
                targets=[t.strip() for t in args.peers.split(",") if t.strip()],
                own_addresses=_own_addresses(server.address),
                interval_s=args.peer_interval_ms / 1000,
                admin_token=args.admin_token,
                root_certificates=_read_file(args.peer_ca) if args.peer_ca else None,
                tls_server_name=args.peer_server_name,
            )
            tasks.append(asyncio.create_task(exchange.run(), name="peer-exchange"))
            server.servicer.explain_elsewhere = exchange.explain
            if picker is not None:
                # A lean gateway's access log reaches one replica: each request's end goes on
                # to the replica that picked it.
                picker.picker.forward_log = exchange.forward_gateway_log
                server.peers.on_gateway_log = picker.picker.take_peer_log
        if picker is not None:
            await picker.start()
        picker_note = f", picker {picker.address}" if picker is not None else ""
        if replica_id is not None:
            picker_note += f", replica {replica_id} with peers {args.peers}"
        print(
            f"scheduler listening on {server.address} "
            f"(policy {settings.policy}, metrics {metrics_url}{picker_note})",
            flush=True,
        )
        settle_heap_for_serving()
        await stop.wait()
        logger.info("stopping: health NOT_SERVING, %.1fs grace for in-flight RPCs", args.grace_s)
        if picker is not None:
            await picker.stop(grace_s=args.grace_s)
        await server.stop(grace_s=args.grace_s)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await session.close()
        if metrics is not None:
            await metrics.cleanup()
    return 0


async def serve_metrics(
    listen: str, service: SchedulerService, *, token: str | None
) -> tuple[web.AppRunner | None, str]:
    """/metrics and /debug/decisions on their own port; (runner, URL), or (None, "off")."""
    if not listen or service.telemetry is None:
        return None, "off"
    host, port = _split_listen(listen)
    app = build_metrics_app(
        telemetry=service.telemetry,
        decisions=lambda limit, request_id: service.recent_decisions(
            limit=limit, request_id=request_id or ""
        ),
        guard=TokenGuard(token, count=service.telemetry.refused_calls_counter()),
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner, f"http://{host}:{runner.addresses[0][1]}"


def _picker_server(args: argparse.Namespace, service: SchedulerService) -> PickerServer | None:
    """The endpoint picker on its own port, when asked for (`--picker-listen/--picker-port`)."""
    if not args.picker_listen:
        return None
    settings = service.settings
    picker = EndpointPicker(
        scheduler=service,
        settings=PickerSettings(
            models=settings.served_models,
            max_body_bytes=args.picker_max_body_bytes,
            tokens_per_char=settings.tokens_per_char,
            max_in_flight=args.picker_max_in_flight,
            offload=settings.offload_long_prompts,
        ),
        registry=service.telemetry.registry if service.telemetry is not None else None,
        tokenizer=tokenizer_from_arguments(args),
    )
    return PickerServer(picker=picker, listen=args.picker_listen)


def _own_addresses(listen_address: str) -> list[str]:
    """The addresses peers may know this replica by, so it does not stream to itself: its
    listen address, and its pod IP on the same port (`POD_IP`, from the downward API)."""
    port = listen_address.rpartition(":")[2]
    addresses = [listen_address, f"127.0.0.1:{port}", f"[::1]:{port}"]
    pod_ip = os.environ.get("POD_IP", "")
    if pod_ip:
        # As `resolve_targets` writes addresses: IPv6 in brackets.
        addresses.append(f"[{pod_ip}]:{port}" if ":" in pod_ip else f"{pod_ip}:{port}")
    return addresses


def _read_file(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def _background_tasks(
    service: SchedulerService,
    *,
    source: EndpointSource,
    session: aiohttp.ClientSession,
    synced: Callable[[], Coroutine[Any, Any, None]] | None = None,
) -> list[asyncio.Task[None]]:
    """Discovery, lease expiry, engine scrapes and migration rounds, as the settings ask;
    `synced` is awaited after discovery's first snapshot is applied (picker readiness)."""
    settings = service.settings
    tasks = []
    follower = KvEventFollower.of(service)
    loop = asyncio.get_running_loop()
    first_snapshot = True

    def apply(endpoints: Sequence[Endpoint]) -> object:
        nonlocal first_snapshot
        change = service.set_endpoints(endpoints)
        if follower is not None:
            follower.set_endpoints(endpoints)
        if synced is not None and first_snapshot:
            tasks.append(loop.create_task(synced(), name="picker-ready"))
        first_snapshot = False
        return change

    if follower is not None:
        tasks.append(asyncio.create_task(follower.run(), name="kv-events"))
    tasks += [
        asyncio.create_task(run_discovery(source, apply=apply), name="discovery"),
        asyncio.create_task(service.run_expiry(), name="lease-expiry"),
    ]
    if settings.scrape_interval_s > 0:
        scraper = Scraper(
            core=service.core,
            session=session,
            clock=time.monotonic,
            settings=ScrapeSettings(
                interval_s=settings.scrape_interval_s, timeout_s=settings.scrape_timeout_s
            ),
            listener=service.telemetry if service.telemetry is not None else ScrapeListener(),
        )
        tasks.append(asyncio.create_task(scraper.run(), name="scraper"))
    migrator = service.migrator
    if migrator is not None and migrator.settings.rebalance:
        tasks.append(asyncio.create_task(migrator.run(), name="migration"))
    return tasks


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = resolve_arguments(args)
        code: int = event_loop_runner()(serve(args, settings))
        return code
    except (ValueError, OSError) as error:
        print(f"twinroute scheduler: {error}", file=sys.stderr)
        return 2
