"""`twinroute router`: the OpenAI-compatible front end on 127.0.0.1.

Either `--scheduler HOST:PORT` (the `twinroute scheduler` gRPC service, through
`SchedulerClient`) or `--embedded` (the same scheduler in this process, over `--endpoints`,
built from the same `SchedulerSettings` by `twinroute.scheduler.build`); the request path
speaks the scheduler's API either way. With `--scheduler` and `--endpoints` together, the
endpoints are also the fail-open fallback: when the scheduler cannot be reached, requests go
round robin and are labelled `fallback`.

Prints `router listening on http://HOST:PORT` once bound.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import ssl
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

from twinroute.router.failopen import DEFAULT_LEARN_EVERY_S, FailOpenScheduler
from twinroute.router.server import RouterSettings, build_app
from twinroute.runtime import LOG_LEVELS, event_loop_runner, settle_heap_for_serving
from twinroute.scheduler.api import Endpoint, Scheduler
from twinroute.scheduler.client import (
    ReplicatedSchedulerClient,
    SchedulerClient,
    resolve_targets,
)
from twinroute.scheduler.openai_queries import (
    TOKENIZER_HELP,
    add_tokenizer_arguments,
    tokenizer_from_arguments,
)
from twinroute.scheduler.settings import SchedulerSettings, parse_kv_event_endpoints
from twinroute.vocabulary import MIGRATION_MODES, POLICY_NAMES

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    embedded = SchedulerSettings()
    parser.add_argument("--host", default="127.0.0.1", help="address the router listens on")
    parser.add_argument("--port", type=int, default=8080, help="0 = any free port")
    parser.add_argument(
        "--model", action="append", required=True, help="served model name (repeatable)"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--scheduler",
        help="gRPC HOST:PORT of `twinroute scheduler`; several, comma-separated (or a name that "
        "resolves to several, a headless Service) for active-active replicas: picks rotate "
        "over them and fail over within the deadline",
    )
    parser.add_argument(
        "--scheduler-replicas", action="store_true",
        help="--scheduler names active-active replicas (a headless Service): spread picks over "
        "whatever it resolves to, even while that is one address or none",
    )  # fmt: skip
    source.add_argument("--embedded", action="store_true", help="run the scheduler in this process")
    parser.add_argument(
        "--endpoints", default="",
        help="static engines, comma-separated [ID=]HOST:PORT (embedded: the pool; "
        "with --scheduler: the fallback when it is unreachable)",
    )  # fmt: skip
    parser.add_argument(
        "--fail-open-learn-every-s", type=float, default=DEFAULT_LEARN_EVERY_S,
        help="with --scheduler and no --endpoints: how often the fallback list is learnt "
        "from the scheduler's endpoint list (0 = no fail-open: 503 while it is away)",
    )  # fmt: skip
    add_tokenizer_arguments(parser, help=TOKENIZER_HELP)
    parser.add_argument("--retries", type=int, default=2, help="other endpoints to try")
    parser.add_argument(
        "--migration", default="off", choices=MIGRATION_MODES,
        help="migrate running streams by recompute on the scheduler's orders (--scheduler: "
        "it decides; --embedded: drain = on drain only, on = also on persistent imbalance)",
    )  # fmt: skip
    parser.add_argument(
        "--max-body-bytes", type=int, default=16 * 1024 * 1024,
        help="request bodies larger than this are refused with 413",
    )  # fmt: skip
    parser.add_argument(
        "--offload", choices=("on", "off"), default="on",
        help="tokenize (and, embedded, hash) long prompts on worker threads, off the event "
        "loop; off: inline (for comparison)",
    )  # fmt: skip
    parser.add_argument(
        "--scheduler-timeout-s", type=float, default=1.0,
        help="seconds a Pick or Complete to --scheduler may take (a scheduler that holds "
        "hotspot requests, `--admission-hold on`, needs its max hold plus a margin)",
    )  # fmt: skip
    parser.add_argument(
        "--tokens-per-char", type=float, default=embedded.tokens_per_char,
        help="model tokens per prompt character, to estimate text prompts' length",
    )  # fmt: skip
    _add_timeout_arguments(parser)
    scheduler = parser.add_argument_group(
        "embedded scheduler (--embedded only; with --scheduler, set these on the scheduler)"
    )
    add_embedded_scheduler_arguments(scheduler, admission_hold=True)
    security = parser.add_argument_group("TLS and tokens")
    security.add_argument("--tls-cert", help="PEM certificate: serve HTTPS instead of HTTP")
    security.add_argument("--tls-key", help="PEM private key of --tls-cert")
    security.add_argument(
        "--scheduler-ca", help="PEM CA bundle: reach --scheduler over TLS, trusting this CA"
    )
    security.add_argument(
        "--scheduler-server-name",
        help="name the scheduler's certificate carries, when not --scheduler's host",
    )
    security.add_argument(
        "--scheduler-token-file", help="file with the scheduler's admin token (a mounted Secret)"
    )
    parser.add_argument(
        "--log-level", default="WARNING", choices=LOG_LEVELS, type=str.upper, help="log threshold"
    )


def add_embedded_scheduler_arguments(
    group: argparse._ArgumentGroup, *, admission_hold: bool
) -> None:
    """The embedded scheduler's flags, named as its settings fields (`EMBEDDED_FLAGS`; None =
    not given, the settings' default applies): the router's and the gateway's alike."""
    embedded = SchedulerSettings()
    scheduler = group
    scheduler.add_argument(
        "--policy", choices=POLICY_NAMES, help=f"routing policy (default {embedded.policy})"
    )
    scheduler.add_argument(
        "--ttft-slo-s", type=float,
        help=f"TTFT objective of requests that bring none (default {embedded.ttft_slo_s:g}; "
        "a client sets its own with the x-twinroute-ttft-slo-s header)",
    )  # fmt: skip
    if admission_hold:
        scheduler.add_argument(
            "--admission-hold", choices=("on", "off"),
            help="hold hotspot requests so hotspot rebalancing can move them (default off)",
        )  # fmt: skip
    scheduler.add_argument(
        "--key-block-tokens", type=int,
        help=f"prefix-key block, tokens (default {embedded.key_block_tokens})",
    )  # fmt: skip
    scheduler.add_argument(
        "--key-block-chars", type=int,
        help=f"prefix-key block for text prompts, characters (default {embedded.key_block_chars})",
    )  # fmt: skip
    scheduler.add_argument(
        "--kv-events-endpoints",
        help="comma-separated ID=tcp://HOST:PORT: each engine's vLLM KV-event publisher, "
        "followed so cache lookups of token-id prompts are exact (needs --tokenizer)",
    )  # fmt: skip
    scheduler.add_argument(
        "--kv-events-replay-endpoints",
        help="comma-separated ID=tcp://HOST:PORT: each engine's KV-event replay socket, asked "
        "for the batches missed in a gap or before the router started",
    )  # fmt: skip
    scheduler.add_argument(
        "--engine-block-size", type=int,
        help="the engines' KV block size in tokens (default: --key-block-tokens)",
    )  # fmt: skip


def _add_timeout_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = RouterSettings(models=())
    timeouts = parser.add_argument_group(
        "engine timeouts (per attempt; a miss before the client saw a byte is retried elsewhere)"
    )
    timeouts.add_argument(
        "--connect-timeout-s", type=float, default=defaults.connect_timeout_s,
        help="to open a connection to an engine",
    )  # fmt: skip
    timeouts.add_argument(
        "--first-byte-timeout-s", type=float, default=defaults.first_byte_timeout_s,
        help="for a stream's first chunk (its time to first token, queueing included) and a "
        "prefill hop",
    )  # fmt: skip
    timeouts.add_argument(
        "--response-timeout-s", type=float, default=defaults.response_timeout_s,
        help="for a non-streamed answer, which arrives whole",
    )  # fmt: skip
    timeouts.add_argument(
        "--idle-timeout-s", type=float, default=defaults.idle_timeout_s,
        help="longest silence of a started stream; a stream that keeps sending has no limit",
    )  # fmt: skip
    timeouts.add_argument(
        "--lease-renew-every-s", type=float, default=defaults.lease_renew_every_s,
        help="renew running requests' leases at the scheduler this often (a fraction of its "
        "--lease-ttl-s; 0 = never)",
    )  # fmt: skip


def parse_endpoints(spec: str) -> list[tuple[str, str]]:
    """`a=127.0.0.1:8001,127.0.0.1:8002` -> [("a", "127.0.0.1:8001"), ("127.0.0.1:8002", ...)]."""
    endpoints: list[tuple[str, str]] = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        endpoint_id, _, address = item.rpartition("=")
        address = address.removeprefix("http://").rstrip("/")
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"endpoint {item!r} is not [ID=]HOST:PORT")
        endpoints.append((endpoint_id or address, address))
    return endpoints


# Flags of the embedded scheduler named as its settings fields (None = not given).
EMBEDDED_FLAGS = (
    "policy",
    "ttft_slo_s",
    "key_block_tokens",
    "key_block_chars",
    "kv_events_endpoints",
    "kv_events_replay_endpoints",
    "engine_block_size",
)


def embedded_settings(args: argparse.Namespace) -> SchedulerSettings:
    """The in-process scheduler's settings (`--embedded`): the defaults, and what was given."""
    given = {
        flag: getattr(args, flag) for flag in EMBEDDED_FLAGS if getattr(args, flag) is not None
    }
    for flag in ("kv_events_endpoints", "kv_events_replay_endpoints"):
        if flag in given:
            given[flag] = parse_kv_event_endpoints(given[flag])
    return SchedulerSettings(
        tokens_per_char=args.tokens_per_char,
        admission_hold=args.admission_hold == "on",
        migration=args.migration,
        offload_long_prompts=args.offload == "on",
        served_models=tuple(args.model),
        **given,
    )


BackgroundWork = Callable[[], Coroutine[Any, Any, None]]


def build_scheduler(
    args: argparse.Namespace,
) -> tuple[Scheduler, list[BackgroundWork], Callable[[], bytes] | None]:
    """The scheduler the request path asks (in-process, over gRPC, or over gRPC failing open
    to `--endpoints`), and the work to run beside the app (embedded `--migration on`: the
    imbalance rounds), and the embedded scheduler's metrics exposition (None over gRPC: the
    scheduler serves its own)."""
    endpoints = [
        Endpoint(id=eid, address=address) for eid, address in parse_endpoints(args.endpoints)
    ]
    if args.embedded:
        if not endpoints:
            raise ValueError("--embedded needs --endpoints")
        from twinroute.scheduler.build import embedded_service

        service, embedded_rounds = embedded_service(embedded_settings(args), endpoints)
        telemetry = service.telemetry
        return service, embedded_rounds, telemetry.exposition if telemetry is not None else None
    given = [
        "--" + flag.replace("_", "-")
        for flag in (*EMBEDDED_FLAGS, "admission_hold")
        if getattr(args, flag) is not None
    ]
    if given:
        raise ValueError(
            f"{', '.join(given)} set the embedded scheduler; with --scheduler, set them on "
            "`twinroute scheduler` (a client sends its own SLO in the x-twinroute-ttft-slo-s "
            "header)"
        )
    names = [name.strip() for name in args.scheduler.split(",") if name.strip()]
    addresses = resolve_targets(names)
    connection: dict[str, Any] = {
        "timeout_s": args.scheduler_timeout_s,
        "admin_token": _read_token(args.scheduler_token_file),
        "root_certificates": _read_bytes(args.scheduler_ca),
        "tls_server_name": args.scheduler_server_name,
    }
    primary: Scheduler
    rounds: list[BackgroundWork] = []
    if args.scheduler_replicas or len(names) > 1 or len(addresses) > 1:
        # Active-active replicas: spread picks over them, fail over within the deadline.
        replicated = ReplicatedSchedulerClient(targets=addresses, names=names, **connection)
        rounds.append(replicated.keep_resolved)
        primary = replicated
    else:
        primary = SchedulerClient(target=args.scheduler, **connection)
    if endpoints:
        return FailOpenScheduler(primary=primary, endpoints=endpoints), rounds, None
    if args.fail_open_learn_every_s <= 0:
        return primary, rounds, None
    # No list given (an operator-managed pool): fail open to what the scheduler last listed.
    fail_open = FailOpenScheduler(primary=primary, learn_every_s=args.fail_open_learn_every_s)
    return fail_open, [*rounds, fail_open.learn_endpoints], None


def _read_bytes(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as handle:
        return handle.read()


def _read_token(path: str | None) -> str | None:
    data = _read_bytes(path)
    if data is None:
        return None
    token = data.decode().strip()
    if not token:
        raise ValueError(f"--scheduler-token-file {path} is empty")
    return token


def server_tls(*, cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """The HTTPS context for `--tls-cert/--tls-key` (TLS 1.2 at least), or None for HTTP."""
    if not cert and not key:
        return None
    if not (cert and key):
        raise ValueError("--tls-cert and --tls-key go together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=cert, keyfile=key)
    return context


async def serve(
    app: web.Application, *, host: str, port: int, tls: ssl.SSLContext | None = None
) -> None:
    # Cancel a handler when its client disconnects: the router then closes the lease at
    # once, and the engine withdraws a request that is still queued.
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        handler_cancellation=True,
        shutdown_timeout=10.0,
    )
    await runner.setup()
    site = web.TCPSite(runner, host=host, port=port, backlog=1024, ssl_context=tls)
    await site.start()
    scheme = "https" if tls is not None else "http"
    print(f"router listening on {scheme}://{host}:{runner.addresses[0][1]}", flush=True)
    settle_heap_for_serving()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def run_in_background(work: Callable[[], Coroutine[Any, Any, None]]) -> Any:
    """An aiohttp cleanup context that runs `work` while the app runs."""

    async def lifecycle(app: web.Application) -> Any:
        task = asyncio.get_running_loop().create_task(work())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return lifecycle


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s %(message)s")

    async def main() -> None:
        tls = server_tls(cert=args.tls_cert, key=args.tls_key)
        scheduler, background, scheduler_metrics = build_scheduler(args)
        tokenizer = tokenizer_from_arguments(args)
        settings = RouterSettings(
            models=tuple(args.model),
            retries=args.retries,
            max_body_bytes=args.max_body_bytes,
            tokens_per_char=args.tokens_per_char,
            connect_timeout_s=args.connect_timeout_s,
            first_byte_timeout_s=args.first_byte_timeout_s,
            response_timeout_s=args.response_timeout_s,
            idle_timeout_s=args.idle_timeout_s,
            lease_renew_every_s=args.lease_renew_every_s,
            offload=args.offload == "on",
        )
        app = build_app(
            scheduler=scheduler,
            settings=settings,
            tokenizer=tokenizer,
            migrate_streams=args.migration != "off",
            scheduler_metrics=scheduler_metrics,
        )
        for work in background:
            app.cleanup_ctx.append(run_in_background(work))
        await serve(app, host=args.host, port=args.port, tls=tls)

    try:
        event_loop_runner()(main())
    except (ValueError, OSError, ImportError) as error:
        print(f"router: {error}", file=sys.stderr)
        return 2
    return 0
