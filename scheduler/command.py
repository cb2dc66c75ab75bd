"""`twinroute scheduler`: the gRPC scheduler service.

Builds every object here and passes it in (no singletons): the policy and cost model, the
core, one Prometheus registry, the service, discovery (static list, YAML file or Kubernetes),
the scraper and the servers. Prints `scheduler listening on HOST:PORT` once the gRPC port is
bound. SIGTERM or SIGINT stops gracefully: health NOT_SERVING, in-flight RPCs finish within
`--grace`, then the background tasks stop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry
from twinroute.scheduler.admission import AdmissionMetrics, AdmissionQueue, AdmissionSettings
from twinroute.scheduler.core import SchedulerCore
from twinroute.scheduler.costmodel import COST_PROFILES, DEFAULT_COST_PROFILE
from twinroute.scheduler.discovery import (
    EndpointSource,
    KubernetesSource,
    StaticSource,
    WatchedFileSource,
    parse_endpoint_list,
    run_discovery,
)
from twinroute.scheduler.migration import MigrationMetrics, Migrator, MigratorSettings, parse_hooks
from twinroute.scheduler.policies import POLICY_NAMES, PolicyConfig, make_policy
from twinroute.scheduler.policies.pd import PdSettings
from twinroute.scheduler.prefix_index import DEFAULT_CAPACITY_BLOCKS
from twinroute.scheduler.scrape import ScrapeListener, Scraper, ScrapeSettings
from twinroute.scheduler.service import GrpcServer, KeySettings, SchedulerService, TlsFiles
from twinroute.scheduler.telemetry import SchedulerTelemetry, build_metrics_app

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", default="127.0.0.1:50051", help="gRPC HOST:PORT (port 0 = any)")
    parser.add_argument(
        "--metrics-listen", default="127.0.0.1:9464",
        help="HOST:PORT for /metrics and /debug/decisions ('' = off)",
    )  # fmt: skip
    parser.add_argument("--policy", default="dualmap", choices=POLICY_NAMES)
    parser.add_argument("--ttft-slo", type=float, default=5.0, help="default TTFT SLO, seconds")
    parser.add_argument(
        "--pd-min-prefill-tokens",
        type=int,
        default=100,
        help="prefill/decode pools: a decode endpoint prefills prompts itself when at most "
        "this many of their tokens are not cached there (skips the prefill hop)",
    )
    parser.add_argument(
        "--block-size", type=int, default=64,
        help="prefix-key block, tokens (a multiple of the engine block size; 64 keeps the "
        "prefix record cheap at long prompts, see benchmarks/scheduler_pick.md)",
    )  # fmt: skip
    parser.add_argument(
        "--block-chars", type=int, default=0,
        help="prefix-key block for text prompts, characters (0 = 4 x --block-size)",
    )  # fmt: skip
    parser.add_argument("--tokens-per-char", type=float, default=0.25)
    parser.add_argument(
        "--model", action="append", default=[],
        help="served model name (repeatable); endpoints without a model serve these",
    )  # fmt: skip
    parser.add_argument(
        "--config", help="the pool's scheduler.yaml (as the operator renders it); its values "
        "take precedence over the flags they correspond to",
    )  # fmt: skip
    parser.add_argument("--host", help="with --grpc-port/--metrics-port: listen on this host")
    parser.add_argument("--grpc-port", type=int, help="gRPC port on --host")
    parser.add_argument("--metrics-port", type=int, help="metrics port on --host")
    parser.add_argument("--virtual-nodes", type=int, default=256, help="ring points per endpoint")
    parser.add_argument(
        "--prefix-capacity-tokens", type=int, default=0,
        help="tokens each engine's prefix cache holds, to size the scheduler's record of it "
        "(0 = the core's default)",
    )  # fmt: skip
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--static-endpoints", help="comma-separated [ID=]HOST:PORT")
    source.add_argument(
        "--endpoints-file", help="YAML file with an 'endpoints' list (re-read when it changes)"
    )
    source.add_argument("--kube-selector", help="label selector of the pool's engine pods")
    parser.add_argument("--namespace", default="default", help="namespace of the pods")
    parser.add_argument("--kubeconfig", help="kubeconfig path (default: in-cluster, then ~)")
    parser.add_argument("--engine-port", type=int, default=8000, help="pods' default port")
    parser.add_argument("--scrape-interval", type=float, default=1.0, help="seconds; 0 = off")
    parser.add_argument("--scrape-timeout", type=float, default=0.8)
    parser.add_argument("--lease-ttl", type=float, default=600.0, help="seconds")
    parser.add_argument("--admin-token", help="bearer token Drain requires (default: none)")
    parser.add_argument(
        "--admin-token-file",
        help="file holding the admin token (a mounted Secret; keeps it off the command line)",
    )
    parser.add_argument("--tls-cert", help="PEM certificate for gRPC TLS")
    parser.add_argument("--tls-key", help="PEM private key for gRPC TLS")
    parser.add_argument(
        "--profile", default=DEFAULT_COST_PROFILE, choices=sorted(COST_PROFILES),
        help="cost model for TTFT predictions",
    )  # fmt: skip
    parser.add_argument(
        "--admission-hold", choices=("on", "off"), default="off",
        help="hold the answers of requests routed to a hotspot so that hotspot rebalancing can "
        "still move them (policies that rebalance; docs/bench/rebalance.md)",
    )  # fmt: skip
    parser.add_argument(
        "--admission-max-hold", type=float, default=3.0,
        help="seconds a Pick answer may be held at most (never past the caller's deadline)",
    )  # fmt: skip
    parser.add_argument(
        "--phase-aware", choices=("on", "off"), default="on",
        help="placement counts the endpoints' decode load and the request's expected output "
        "(policies that use the TTFT estimator; docs/bench/phase_aware.md)",
    )  # fmt: skip
    parser.add_argument("--grace", type=float, default=5.0, help="shutdown grace, seconds")
    migration = parser.add_argument_group("live migration of running requests")
    migration.add_argument(
        "--migration", default="off", choices=("off", "drain", "on"),
        help="drain: Drain migrates what runs on the endpoint (engine hooks, or routers "
        "watching for orders); on: also Llumnix-style rebalancing of persistent imbalance",
    )  # fmt: skip
    migration.add_argument(
        "--migration-interval", type=float, default=1.0, help="seconds between rebalancing rounds"
    )
    migration.add_argument(
        "--migration-hooks", default="",
        help="engines' MigrationHook addresses, ENDPOINT_ID=HOST:PORT,... (KV migration "
        "between two listed engines; routers migrate the rest by recompute)",
    )  # fmt: skip
    parser.add_argument("--log-level", default="INFO")


def apply_config(args: argparse.Namespace, text: str) -> None:
    """Fold the operator-rendered scheduler.yaml into `args` (see operator/render.py)."""
    config = yaml.safe_load(text) or {}
    if not isinstance(config, dict):
        raise ValueError("the scheduler config must be a YAML mapping")
    if config.get("model"):
        args.model = [str(config["model"])]
    args.policy = str(config.get("policy", args.policy))
    if args.policy not in POLICY_NAMES:
        raise ValueError(f"unknown policy {args.policy!r} in the config")
    args.ttft_slo = float(config.get("ttftSloSeconds", args.ttft_slo))
    args.pd_min_prefill_tokens = int(config.get("pdMinPrefillTokens", args.pd_min_prefill_tokens))
    args.block_size = int(config.get("prefixBlockSize", args.block_size))
    args.virtual_nodes = int(config.get("virtualNodes", args.virtual_nodes))
    args.scrape_interval = float(config.get("scrapeIntervalSeconds", args.scrape_interval))
    discovery = config.get("discovery") or {}
    if discovery.get("kind", "kubernetes") != "kubernetes":
        raise ValueError(f"unsupported discovery kind {discovery.get('kind')!r}")
    if discovery:
        args.static_endpoints = args.endpoints_file = None
        args.kube_selector = str(discovery["labelSelector"])
        args.namespace = str(discovery.get("namespace", args.namespace))
        args.engine_port = int(discovery.get("defaultPort", args.engine_port))
    ports = config.get("ports") or {}
    if args.grpc_port is None and "grpc" in ports:
        args.grpc_port = int(ports["grpc"])
    if args.metrics_port is None and "metrics" in ports:
        args.metrics_port = int(ports["metrics"])


def resolve_arguments(args: argparse.Namespace) -> None:
    """Apply --config and --host/--*-port, then check that exactly one source is named."""
    if args.config:
        with open(args.config, encoding="utf-8") as handle:
            apply_config(args, handle.read())
    if args.pd_min_prefill_tokens < 0:
        raise ValueError("--pd-min-prefill-tokens must be >= 0")
    host = args.host or "127.0.0.1"
    if args.grpc_port is not None:
        args.listen = f"{host}:{args.grpc_port}"
    if args.metrics_port is not None:
        args.metrics_listen = f"{host}:{args.metrics_port}"
    sources = [args.static_endpoints, args.endpoints_file, args.kube_selector]
    if sum(1 for source in sources if source) != 1:
        raise ValueError(
            "name exactly one endpoint source: --static-endpoints, --endpoints-file, "
            "--kube-selector, or a --config with a discovery block"
        )


def _split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{listen!r} is not HOST:PORT")
    return host, int(port)


def build_source(args: argparse.Namespace) -> EndpointSource:
    model = args.model[0] if len(args.model) == 1 else ""
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


def build_service(
    args: argparse.Namespace, *, clock: Callable[[], float] = time.monotonic
) -> SchedulerService:
    cost_model = COST_PROFILES[args.profile]
    config = PolicyConfig(
        cost_model=cost_model,
        ttft_slo_s=args.ttft_slo,
        virtual_nodes=args.virtual_nodes,
        phase_aware=getattr(args, "phase_aware", "on") == "on",
    )
    capacity_blocks = (
        max(1, args.prefix_capacity_tokens // args.block_size)
        if args.prefix_capacity_tokens > 0
        else DEFAULT_CAPACITY_BLOCKS
    )
    core = SchedulerCore(
        policy=make_policy(args.policy, config=config),
        cost_model=cost_model,
        prefix_capacity_blocks=capacity_blocks,
        lease_ttl_s=args.lease_ttl,
        scrape_staleness_s=max(2.0, 3 * args.scrape_interval),
        pd=PdSettings(min_prefill_tokens=args.pd_min_prefill_tokens),
    )
    telemetry = SchedulerTelemetry(
        registry=CollectorRegistry(), core=core, clock=clock, virtual_nodes=config.virtual_nodes
    )
    keys = KeySettings(
        block_tokens=args.block_size,
        block_chars=args.block_chars or 4 * args.block_size,
        tokens_per_char=args.tokens_per_char,
    )
    admission = None
    if getattr(args, "admission_hold", "off") == "on":
        admission = AdmissionQueue(
            core=core,
            settings=AdmissionSettings(max_hold_s=args.admission_max_hold),
            clock=clock,
            metrics=AdmissionMetrics(registry=telemetry.registry),
        )
    return SchedulerService(
        core=core,
        keys=keys,
        telemetry=telemetry,
        clock=clock,
        served_models=args.model,
        admission=admission,
    )


def read_secret_file(path: str, *, flag: str) -> str:
    """A token from a file (surrounding whitespace dropped); empty is refused, not "no token"."""
    with open(path, encoding="utf-8") as handle:
        token = handle.read().strip()
    if not token:
        raise ValueError(f"{flag} {path} is empty")
    return token


def build_migrator(args: argparse.Namespace, service: SchedulerService) -> Migrator | None:
    """`--migration`: a Migrator attached to the service, its metrics on the service's registry."""
    if args.migration == "off":
        return None
    capacity = args.prefix_capacity_tokens or MigratorSettings().capacity_tokens
    migrator = Migrator(
        core=service.core,
        settings=MigratorSettings(
            rebalance=args.migration == "on",
            interval_s=args.migration_interval,
            capacity_tokens=capacity,
        ),
        hooks=parse_hooks(args.migration_hooks),
        metrics=(
            MigrationMetrics(service.telemetry.registry) if service.telemetry is not None else None
        ),
    )
    service.attach_migrator(migrator)
    return migrator


async def serve(args: argparse.Namespace) -> int:
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    if args.admin_token_file:
        args.admin_token = read_secret_file(args.admin_token_file, flag="--admin-token-file")
    service = build_service(args)
    migrator = build_migrator(args, service)
    source = build_source(args)
    tls = TlsFiles(cert_path=args.tls_cert, key_path=args.tls_key) if args.tls_cert else None
    server = GrpcServer(service=service, listen=args.listen, admin_token=args.admin_token, tls=tls)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    runner: web.AppRunner | None = None
    metrics_url = "off"
    if args.metrics_listen and service.telemetry is not None:
        host, port = _split_listen(args.metrics_listen)
        app = build_metrics_app(
            telemetry=service.telemetry,
            decisions=lambda limit, request_id: service.explain(
                limit=limit, request_id=request_id or ""
            ),
        )
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0]
        metrics_url = f"http://{host}:{bound[1]}"

    session = aiohttp.ClientSession()
    tasks = [
        asyncio.create_task(run_discovery(source, apply=service.set_endpoints), name="discovery"),
        asyncio.create_task(service.run_expiry(), name="lease-expiry"),
    ]
    if args.scrape_interval > 0:
        scraper = Scraper(
            core=service.core,
            session=session,
            clock=time.monotonic,
            settings=ScrapeSettings(interval_s=args.scrape_interval, timeout_s=args.scrape_timeout),
            listener=service.telemetry if service.telemetry is not None else ScrapeListener(),
        )
        tasks.append(asyncio.create_task(scraper.run(), name="scraper"))
    if migrator is not None and migrator.settings.rebalance:
        tasks.append(asyncio.create_task(migrator.run(), name="migration"))
    try:
        await server.start()
        print(
            f"scheduler listening on {server.address} "
            f"(policy {args.policy}, metrics {metrics_url})",
            flush=True,
        )
        await stop.wait()
        logger.info("stopping: health NOT_SERVING, %.1fs grace for in-flight RPCs", args.grace)
        await server.stop(grace_s=args.grace)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await session.close()
        if runner is not None:
            await runner.cleanup()
    return 0


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        resolve_arguments(args)
        return asyncio.run(serve(args))
    except (ValueError, OSError) as error:
        print(f"twinroute scheduler: {error}", file=sys.stderr)
        return 2
