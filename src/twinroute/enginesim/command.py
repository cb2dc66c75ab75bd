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
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from twinroute.enginesim.core import EngineCore, EngineSettings
from twinroute.enginesim.kv_transfer import (
    DEFAULT_PIN_TIMEOUT_S,
    ROLE_SHORTHAND,
    KvTransferAgent,
    KvTransferConfig,
    parse_kv_transfer_config,
)
from twinroute.enginesim.server import EngineIdentity, build_app
from twinroute.runtime import LOG_LEVELS
from twinroute.simulator.instance import Instance
from twinroute.simulator.profiles import (
    DEFAULT_PROFILE,
    INSTANCE_PROFILES,
    InstanceProfile,
    get_profile,
)
from twinroute.simulator.sim_cost import cost_model_for

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address the engine listens on")
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
        "--natural-output-tokens", type=int, default=16,
        help="answer length of requests that set no max_tokens (chat), where a real model "
        "would end its message",
    )  # fmt: skip
    parser.add_argument(
        "--token-scale", type=int, default=1,
        help="model tokens each engine token stands for (short prompts, realistic costs)",
    )  # fmt: skip
    parser.add_argument(
        "--migration-port", type=int, default=None,
        help="serve the MigrationHook (gRPC, live KV migration) on this port of --host "
        "(0 = any free port; default: off)",
    )  # fmt: skip
    kv = parser.add_mutually_exclusive_group()
    kv.add_argument(
        "--kv-transfer-config", default=None,
        help="vLLM's KV transfer config (JSON with kv_role kv_producer|kv_consumer|kv_both): "
        "serve disaggregated prefill/decode (kv_transfer_params); default: off",
    )  # fmt: skip
    kv.add_argument(
        "--kv-role", choices=sorted(ROLE_SHORTHAND), default=None,
        help="shorthand for --kv-transfer-config: prefill (kv_producer), decode (kv_consumer), "
        "both (kv_both)",
    )  # fmt: skip
    parser.add_argument(
        "--kv-side-channel-host", default="",
        help="host decode instances pull KV from (remote_host); default: the address the "
        "prefill request came in on",
    )  # fmt: skip
    parser.add_argument(
        "--kv-pin-timeout", type=float, default=DEFAULT_PIN_TIMEOUT_S,
        help="seconds prefilled KV stays pinned for a decode instance to pull it",
    )  # fmt: skip
    parser.add_argument(
        "--log-level", default="WARNING", choices=LOG_LEVELS, type=str.upper, help="log threshold"
    )


def build(args: argparse.Namespace) -> web.Application:
    if args.block_size < 1 or args.token_scale < 1 or args.natural_output_tokens < 1:
        raise ValueError("--block-size, --token-scale and --natural-output-tokens must be >= 1")
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
        natural_output_tokens=args.natural_output_tokens,
    )
    app = build_app(
        core=core,
        identity=identity,
        kv=_kv_agent(args, core=core, engine_id=identity.instance_id, profile=profile),
    )
    if args.migration_port is not None:
        app.cleanup_ctx.append(
            _migration_hook(
                core, listen=f"{args.host}:{args.migration_port}", transfer_s=profile.kv_transfer_s
            )
        )
    return app


def _kv_agent(
    args: argparse.Namespace, *, core: EngineCore, engine_id: str, profile: InstanceProfile
) -> Callable[[CollectorRegistry], KvTransferAgent] | None:
    """The KV transfer agent's factory when a role was given (the profile prices the link)."""
    config: KvTransferConfig | None = None
    if args.kv_transfer_config is not None:
        config = parse_kv_transfer_config(args.kv_transfer_config)
    elif args.kv_role is not None:
        config = KvTransferConfig(role=ROLE_SHORTHAND[args.kv_role])
    if config is None:
        return None
    if args.kv_pin_timeout <= 0:
        raise ValueError("--kv-pin-timeout must be > 0")
    kv_config = config

    def agent(registry: CollectorRegistry) -> KvTransferAgent:
        return KvTransferAgent(
            core=core,
            config=kv_config,
            engine_id=engine_id,
            transfer_s=profile.kv_transfer_s,
            registry=registry,
            side_channel_host=args.kv_side_channel_host,
            pin_timeout_s=args.kv_pin_timeout,
        )

    return agent


def _migration_hook(core: EngineCore, *, listen: str, transfer_s: Callable[[int], float]) -> Any:
    from twinroute.enginesim.migration import EngineMigrationHook, MigrationHookServer

    async def lifecycle(app: web.Application) -> Any:
        hook = EngineMigrationHook(core=core, transfer_s=transfer_s)
        server = MigrationHookServer(hook=hook, listen=listen)
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
    from twinroute.runtime import event_loop_runner

    event_loop_runner()(serve(app, host=args.host, port=args.port))
    return 0
