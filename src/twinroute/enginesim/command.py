"""`twinroute engine-sim`: serve one simulated vLLM instance on 127.0.0.1.

Prints `engine-sim listening on http://HOST:PORT` once bound (with `--port 0` the line tells
callers the port the OS chose).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from typing import Any

from aiohttp import web

from twinroute.enginesim.core import EngineCore, EngineSettings
from twinroute.enginesim.server import EngineIdentity, build_app
from twinroute.simulator.instance import Instance
from twinroute.simulator.profiles import DEFAULT_PROFILE, INSTANCE_PROFILES, get_profile
from twinroute.simulator.sim_cost import cost_model_for

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 = any free port")
    parser.add_argument("--model", default="twinroute-sim", help="served model name")
    parser.add_argument(
        "--profile", default=DEFAULT_PROFILE, choices=sorted(INSTANCE_PROFILES),
        help="hardware/model profile (step costs, KV size, batching limits)",
    )  # fmt: skip
    parser.add_argument("--instance-id", default="", help="name in x-twinroute-instance")
    parser.add_argument(
        "--time-scale", type=float, default=1.0,
        help="wall seconds per modelled second (2 = twice as slow, 0.5 = twice as fast)",
    )  # fmt: skip
    parser.add_argument(
        "--kv-capacity-tokens", type=int, default=None,
        help="KV memory in model tokens (default: the profile's)",
    )  # fmt: skip
    parser.add_argument(
        "--block-size", type=int, default=16, help="prefix-cache block size in engine tokens"
    )
    parser.add_argument(
        "--token-scale", type=int, default=1,
        help="model tokens each engine token stands for (short prompts, realistic costs)",
    )  # fmt: skip
    parser.add_argument(
        "--migration-port", type=int, default=None,
        help="serve the MigrationHook (gRPC, live KV migration) on this port of --host "
        "(0 = any free port; default: off)",
    )  # fmt: skip
    parser.add_argument("--log-level", default="WARNING")


def build(args: argparse.Namespace) -> web.Application:
    if args.block_size < 1 or args.token_scale < 1:
        raise ValueError("--block-size and --token-scale must be >= 1")
    profile = get_profile(args.profile).with_kv_capacity(args.kv_capacity_tokens)
    cost = cost_model_for(profile)
    instance = Instance(
        config=profile.instance_config(block_size=args.block_size * args.token_scale),
        cost=cost,
        record_tokens=True,
    )
    core = EngineCore(
        instance=instance,
        settings=EngineSettings(
            block_size=args.block_size, token_scale=args.token_scale, time_scale=args.time_scale
        ),
    )
    identity = EngineIdentity(
        model=args.model,
        instance_id=args.instance_id or f"engine-sim-{args.port}",
        max_model_len=profile.kv_capacity_tokens // args.token_scale,
        cost_model=profile.cost_profile,
    )
    app = build_app(core=core, identity=identity)
    if args.migration_port is not None:
        app.cleanup_ctx.append(_migration_hook(core, listen=f"{args.host}:{args.migration_port}"))
    return app


def _migration_hook(core: EngineCore, *, listen: str) -> Any:
    from twinroute.enginesim.migration import EngineMigrationHook, MigrationHookServer

    async def lifecycle(app: web.Application) -> Any:
        server = MigrationHookServer(hook=EngineMigrationHook(core=core), listen=listen)
        await server.start()
        print(f"engine-sim migration hook on {server.address}", flush=True)
        yield
        await server.stop()

    return lifecycle


async def serve(app: web.Application, *, host: str, port: int) -> None:
    # Cancel a handler when its client disconnects: the router then closes the lease at
    # once, and the engine withdraws a request that is still queued.
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        handler_cancellation=True,
        shutdown_timeout=1.0,
    )
    await runner.setup()
    site = web.TCPSite(runner, host=host, port=port)
    await site.start()
    bound = runner.addresses[0][1]
    print(f"engine-sim listening on http://{host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s %(message)s")
    if args.host != "127.0.0.1" and args.host != "localhost":
        logger.warning("binding to %s; twinroute's tests and benches use 127.0.0.1 only", args.host)
    try:
        app = build(args)
    except ValueError as error:
        print(f"engine-sim: {error}", file=sys.stderr)
        return 2
    from twinroute.router.command import event_loop_runner

    event_loop_runner()(serve(app, host=args.host, port=args.port))
    return 0
