"""`twinroute operator`: run the ModelPool operator (kopf) with its liveness endpoint."""

from __future__ import annotations

import argparse
import logging
import threading
from collections.abc import Callable, Sequence

import kopf
from kubernetes import client, config
from twinroute.operator.apply import DrainBudget, KubeApi
from twinroute.operator.drain import Drainer
from twinroute.operator.handlers import OperatorConfig, Reconciler, build_registry
from twinroute.operator.pool_token_key import PoolTokenKeyError, ensure_pool_token_key
from twinroute.operator.render import RenderSettings, derive_pool_token

from twinroute.runtime import LOG_LEVELS

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        dest="namespaces",
        help="watch this namespace (repeatable; exact names)",
    )
    scope.add_argument(
        "--all-namespaces", "-A", action="store_true", help="watch ModelPools in every namespace"
    )
    parser.add_argument(
        "--kubeconfig", default=None, help="kubeconfig file (default: in-cluster, then $KUBECONFIG)"
    )
    parser.add_argument(
        "--liveness-host",
        default="0.0.0.0",
        help="address of the liveness endpoint (default: %(default)s)",
    )
    parser.add_argument(
        "--liveness-port",
        type=int,
        default=8081,
        help="port of GET /healthz; 0 disables it (default: %(default)s)",
    )
    parser.add_argument(
        "--scheduler-image",
        required=True,
        help="image of the scheduler/router pods (usually this operator's)",
    )
    parser.add_argument(
        "--scheduler-cluster-role",
        default="twinroute-scheduler",
        help="ClusterRole each pool's scheduler is bound to (pods read-only)",
    )
    parser.add_argument(
        "--image-pull-policy", default="IfNotPresent", choices=("Always", "IfNotPresent", "Never"),
        help="pull policy of the pods the operator renders",
    )  # fmt: skip
    parser.add_argument(
        "--resync-s",
        type=float,
        default=30.0,
        help="how often every pool is reconciled and its status refreshed",
    )
    parser.add_argument(
        "--drain-timeout-s",
        type=float,
        default=30.0,
        help="longest wait for the scheduler to drain pods on scale-in",
    )
    parser.add_argument(
        "--drain-token-file",
        default=None,
        help="file with the bearer token the scheduler's Drain RPC requires",
    )
    security = parser.add_argument_group("scheduler TLS and tokens")
    security.add_argument(
        "--pool-token-key-secret",
        default="",
        help="NAMESPACE/NAME of the Secret holding the operator's key (made on first start): "
        "every pool gets a token of its own derived from it, in a Secret its scheduler and "
        "router mount",
    )
    security.add_argument(
        "--pool-token-key-file",
        default=None,
        help="instead: a file with that key (at least 32 bytes), managed elsewhere",
    )
    security.add_argument(
        "--scheduler-admin-token-secret",
        default="",
        help="instead: one Secret (key `token`, in each pool's namespace) every pool's scheduler "
        "mounts as its token; use the same token in --drain-token-file",
    )
    security.add_argument(
        "--scheduler-tls-secret",
        default="",
        help="kubernetes.io/tls Secret (tls.crt, tls.key, ca.crt; in each pool's namespace): "
        "the scheduler serves gRPC over TLS with it",
    )
    security.add_argument(
        "--scheduler-tls-server-name",
        default="twinroute-scheduler",
        help="name that certificate carries (checked instead of the pod IP)",
    )
    security.add_argument(
        "--router-tls",
        action="store_true",
        help="with --scheduler-tls-secret: routers serve HTTPS with the same certificate",
    )
    security.add_argument(
        "--scheduler-ca-file",
        default=None,
        help="CA bundle (PEM) the operator trusts when it calls Drain over TLS",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=LOG_LEVELS, type=str.upper, help="log threshold"
    )


def load_client_configuration(kubeconfig: str | None) -> client.Configuration:
    """In-cluster service account first, then a kubeconfig (reading $KUBECONFIG now, not at
    import time)."""
    configuration = client.Configuration()
    if kubeconfig is None:
        try:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            return configuration
        except config.ConfigException:
            pass
    config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=kubeconfig, client_configuration=configuration
    )
    return configuration


def connection_info(configuration: client.Configuration) -> kopf.ConnectionInfo:
    """The same credentials for kopf as for the operator's own client."""
    if configuration.refresh_api_key_hook is not None:
        configuration.refresh_api_key_hook(configuration)
    authorization = str((configuration.api_key or {}).get("authorization", ""))
    scheme, _, token = authorization.partition(" ")
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert or None,
        insecure=not configuration.verify_ssl,
        scheme=scheme or None,
        token=token or None,
        certificate_path=configuration.cert_file or None,
        private_key_path=configuration.key_file or None,
    )


def build_operator(
    *,
    configuration: client.Configuration,
    render: RenderSettings,
    resync_interval_s: float,
    drain_timeout_s: float,
    drain_token: str = "",
    drain_tls_ca: bytes | None = None,
) -> tuple[kopf.OperatorRegistry, Reconciler]:
    """Everything the operator needs, built here and passed in (also used by tests)."""
    api = KubeApi(
        api_client=client.ApiClient(configuration),
        drainer=Drainer(
            token=drain_token,
            tls_ca=drain_tls_ca,
            tls_server_name=render.tls_server_name if drain_tls_ca is not None else None,
        ),
        drain_budget=DrainBudget(timeout_s=drain_timeout_s),
        pool_token=_pool_tokens(render),
    )
    operator_config = OperatorConfig(render=render, resync_interval_s=resync_interval_s)
    reconciler = Reconciler(api=api, config=operator_config)
    login: Callable[[], kopf.ConnectionInfo] = lambda: connection_info(configuration)  # noqa: E731
    registry = build_registry(reconciler=reconciler, config=operator_config, login=login)
    return registry, reconciler


def _pool_tokens(render: RenderSettings) -> Callable[[str, str], str] | None:
    """Each pool's own token, when pools have their own (not one shared Secret)."""
    key = render.pool_token_key
    if render.admin_token_secret or not key:
        return None
    return lambda namespace, pool: derive_pool_token(key, namespace=namespace, pool=pool)


def render_settings(args: argparse.Namespace, *, pool_token_key: bytes = b"") -> RenderSettings:
    """What the operator's flags say about the children it renders; `pool_token_key` is the
    content of --pool-token-key-file (read by the caller)."""
    return RenderSettings(
        scheduler_image=args.scheduler_image,
        scheduler_cluster_role=args.scheduler_cluster_role,
        image_pull_policy=args.image_pull_policy,
        admin_token_secret=args.scheduler_admin_token_secret,
        pool_token_key=pool_token_key,
        tls_secret=args.scheduler_tls_secret,
        tls_server_name=args.scheduler_tls_server_name,
        router_tls=args.router_tls and bool(args.scheduler_tls_secret),
    )


def _pool_token_key(args: argparse.Namespace, configuration: client.Configuration) -> bytes:
    if args.pool_token_key_file:
        with open(args.pool_token_key_file, "rb") as handle:
            key = handle.read().strip()
        if len(key) < 32:
            raise ValueError("--pool-token-key-file: at least 32 bytes of key, please")
        return key
    if args.pool_token_key_secret:
        namespace, _, name = args.pool_token_key_secret.partition("/")
        if not namespace or not name:
            raise ValueError("--pool-token-key-secret is NAMESPACE/NAME")
        return ensure_pool_token_key(
            client.ApiClient(configuration), namespace=namespace, name=name
        )
    return b""


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    try:
        configuration = load_client_configuration(args.kubeconfig)
    except config.ConfigException as error:
        log.error("No Kubernetes configuration: %s", error)
        return 2
    token = ""
    if args.drain_token_file:
        with open(args.drain_token_file, encoding="utf-8") as handle:
            token = handle.read().strip()
    if bool(args.scheduler_tls_secret) != bool(args.scheduler_ca_file):
        log.error("--scheduler-tls-secret and --scheduler-ca-file go together")
        return 2
    if bool(args.scheduler_admin_token_secret) != bool(token):
        log.error("--scheduler-admin-token-secret and --drain-token-file go together")
        return 2
    try:
        render = render_settings(args, pool_token_key=_pool_token_key(args, configuration))
    except (OSError, ValueError, PoolTokenKeyError) as error:
        log.error("%s", error)
        return 2
    if not render.admin_token_secret and not render.pool_token_key:
        log.warning(
            "No --pool-token-key-file or --scheduler-admin-token-secret: pools' schedulers run "
            "without a token (anyone in the cluster can Drain them or close their leases)"
        )
    tls_ca = None
    if args.scheduler_ca_file:
        with open(args.scheduler_ca_file, "rb") as handle:
            tls_ca = handle.read()
    registry, _ = build_operator(
        configuration=configuration,
        render=render,
        resync_interval_s=args.resync_s,
        drain_timeout_s=args.drain_timeout_s,
        drain_token=token,
        drain_tls_ca=tls_ca,
    )
    liveness = (
        f"http://{args.liveness_host}:{args.liveness_port}/healthz" if args.liveness_port else None
    )
    kopf.run(
        registry=registry,
        standalone=True,
        clusterwide=args.all_namespaces,
        namespaces=_namespaces(args.namespaces, all_namespaces=args.all_namespaces),
        liveness_endpoint=liveness,
    )
    return 0


def _namespaces(namespaces: Sequence[str], *, all_namespaces: bool) -> list[str]:
    if all_namespaces:
        return []
    return list(namespaces) or ["default"]


def run_in_thread(
    *,
    registry: kopf.OperatorRegistry,
    namespaces: Sequence[str],
    liveness_endpoint: str | None,
    stop: threading.Event,
    ready: threading.Event,
) -> threading.Thread:
    """Run the operator on its own thread and event loop (tests, the local cluster stand-in)."""

    def main() -> None:
        kopf.run(
            registry=registry,
            standalone=True,
            namespaces=list(namespaces),
            liveness_endpoint=liveness_endpoint,
            stop_flag=stop,
            ready_flag=ready,
        )

    thread = threading.Thread(target=main, name="twinroute-operator", daemon=True)
    thread.start()
    return thread
