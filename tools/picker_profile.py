"""Where the endpoint picker's CPU goes per request, and a profile of its Python part.

    .venv/bin/python tools/picker_profile.py [--requests 3000] [--json FILE] [--profile] [--bare]

Starts two near-instant engine simulators and `twinroute gateway --embedded` (Envoy, the
scheduler and its picker) in front of them, sends `--requests` non-streamed completions (16 at
a time) after 300 warm-up requests, and reads from /proc, before and after, the CPU of Envoy
and of every thread of the picker's process (the event loop, which runs the picker and the
scheduler, and gRPC's own threads). It does this twice: with `--policy dualmap`, and with
`--policy round_robin`, whose pick costs next to nothing, so the difference is the pick and
the rest is the gRPC stack's and the picker's own share. With `--bare`, the floor under both:
the same Envoy (`twinroute gateway --picker`) in front of a bare grpc.aio ext_proc servicer
that answers the headers and names one engine on the body's answer, nothing else (no parsing,
no pick, no lease, no metrics), once on the event loop twinroute's servers run on (uvloop when
installed) and once on plain asyncio. With `--profile` a last, dualmap run goes under cProfile
and the functions with the most own time are printed (cProfile inflates every figure and sees
no C; read its shares).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import pstats
import signal
import sys
import tempfile
from typing import Any

import aiohttp

from twinroute.bench.processes import process_tree, start_announced, twinroute_argv
from twinroute.runtime import event_loop_runner

REPO = pathlib.Path(__file__).resolve().parent.parent
BARE_LOOPS = ("shared_runner", "asyncio")


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds per thread name of a process (threads of one name summed)."""
    ticks = os.sysconf("SC_CLK_TCK")
    by_name: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm", encoding="utf-8") as handle:
                name = handle.read().strip()
            with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = "event loop" if tid == str(pid) else name
        by_name[name] = by_name.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return by_name


def process_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(url: str, count: int, *, concurrency: int = 16) -> int:
    done = 0
    gate = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(index: int) -> None:
            nonlocal done
            body = {"model": "m", "prompt": f"request {index} says hello", "max_tokens": 1}
            async with gate, session.post(f"{url}/v1/completions", json=body) as response:
                await response.read()
                done += response.status == 200

        await asyncio.gather(*(one(i) for i in range(count)))
    return done


async def measure(
    *, policy: str, requests: int, profile: pathlib.Path | None, bare_loop: str | None = None
) -> dict[str, Any]:
    """One run; with `bare_loop`, the bare servicer on that loop in place of twinroute's."""
    engines = [
        await start_announced(
            f"e{i}",
            twinroute_argv("engine-sim", "--port=0", "--model=m", f"--instance-id=e{i}",
                           "--time-scale=0.0001"),
            timeout_s=60,
        )
        for i in range(2)
    ]  # fmt: skip
    endpoints = ",".join(f"e{i}={e.address}" for i, e in enumerate(engines))
    bare = None
    if bare_loop is not None:
        bare = await start_announced(
            "bare picker",
            [sys.executable, __file__, "--serve-bare-picker", bare_loop, engines[0].address],
            timeout_s=60,
        )
        args = ["gateway", "--port=0", "--model=m", f"--picker={bare.address}",
                f"--endpoints={endpoints}", "--access-log="]  # fmt: skip
    else:
        args = ["gateway", "--port=0", "--model=m", "--embedded", f"--policy={policy}",
                f"--endpoints={endpoints}", "--access-log="]  # fmt: skip
    argv = (
        [sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "twinroute", *args]
        if profile is not None
        else twinroute_argv(*args)
    )
    gateway = await start_announced("gateway", argv, timeout_s=60)
    # The process that answers Envoy's ext_proc streams: the gateway's own, or the bare one.
    picker_pid = bare.process.pid if bare is not None else gateway.process.pid
    try:
        tree = process_tree(gateway.process.pid)
        envoy = next(pid for pid, name in tree.items() if name == "envoy")
        await load(gateway.url, 300)
        threads_before = thread_cpu_s(picker_pid)
        envoy_before = process_cpu_s(envoy)
        served = await load(gateway.url, requests)
        threads = {
            name: (used - threads_before.get(name, 0.0)) * 1000 / requests
            for name, used in thread_cpu_s(picker_pid).items()
        }
        envoy_ms = (process_cpu_s(envoy) - envoy_before) * 1000 / requests
    finally:
        gateway.process.send_signal(signal.SIGINT)
        await gateway.process.wait()
        if bare is not None:
            await bare.stop()
        for engine in engines:
            await engine.stop()
    threads = {name: round(ms, 4) for name, ms in sorted(threads.items()) if ms > 0}
    return {
        "policy": policy if bare_loop is None else f"bare_grpc_aio_on_{bare_loop}",
        "requests": requests,
        "served": served,
        "envoy_cpu_ms_per_request": round(envoy_ms, 4),
        "picker_process_cpu_ms_per_request": round(sum(threads.values()), 4),
        "picker_process_threads_ms_per_request": threads,
        "load_average_1m": os.getloadavg()[0],
    }


def serve_bare_picker(loop: str, endpoint: str) -> None:
    """A bare ext_proc servicer (module docstring) on `loop`, with the gRPC health and
    access-log services Envoy's bootstrap expects; prints its address."""
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
    from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_pb
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc
    from google.protobuf import struct_pb2
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_health.v1._async import HealthServicer

    def header(key: str, value: str) -> base_pb2.HeaderValueOption:
        return base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=key, raw_value=value.encode()),
            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
        )

    metadata = struct_pb2.Struct()
    metadata.fields["envoy.lb"].struct_value.fields[
        "x-gateway-destination-endpoint"
    ].string_value = endpoint
    headers_answer = ext_pb.ProcessingResponse(request_headers=ext_pb.HeadersResponse())
    body_answer = ext_pb.ProcessingResponse(
        request_body=ext_pb.BodyResponse(
            response=ext_pb.CommonResponse(
                header_mutation=ext_pb.HeaderMutation(
                    set_headers=[header("x-gateway-destination-endpoint", endpoint)]
                )
            )
        ),
        dynamic_metadata=metadata,
    )

    class Bare(ext_grpc.ExternalProcessorServicer):  # type: ignore[misc]
        async def Process(self, messages: Any, context: Any) -> Any:
            async for message in messages:
                kind = message.WhichOneof("request")
                if kind == "request_headers":
                    yield headers_answer
                elif kind == "request_body":
                    yield body_answer

    class Logs(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
        async def StreamAccessLogs(self, messages: Any, context: Any) -> Any:
            async for _message in messages:
                pass
            return als_pb2.StreamAccessLogsResponse()

    async def serve() -> None:
        server = grpc.aio.server()
        ext_grpc.add_ExternalProcessorServicer_to_server(Bare(), server)
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(Logs(), server)
        health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        for name in ("", "liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor"):
            await health.set(name, health_pb2.HealthCheckResponse.SERVING)
        print(f"bare picker listening on 127.0.0.1:{port}", flush=True)
        await server.wait_for_termination()

    (event_loop_runner() if loop == "shared_runner" else asyncio.run)(serve())


def main() -> int:
    if sys.argv[1:2] == ["--serve-bare-picker"]:
        serve_bare_picker(sys.argv[2], sys.argv[3])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--json", type=pathlib.Path)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--bare", action="store_true", help="also measure the bare floor")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        profile = pathlib.Path(scratch) / "picker.prof" if args.profile else None
        runs = [
            asyncio.run(measure(policy="dualmap", requests=args.requests, profile=None)),
            asyncio.run(measure(policy="round_robin", requests=args.requests, profile=None)),
        ]
        if args.bare:
            runs += [
                asyncio.run(
                    measure(policy="", requests=args.requests, profile=None, bare_loop=loop)
                )
                for loop in BARE_LOOPS
            ]
        top: list[dict[str, Any]] = []
        if profile is not None:
            # A third run, under cProfile, for the shares only (its CPU figures are inflated).
            asyncio.run(measure(policy="dualmap", requests=args.requests, profile=profile))
            stats = pstats.Stats(str(profile))
            total = sum(entry[2] for entry in stats.stats.values())  # type: ignore[attr-defined]
            rows = sorted(stats.stats.items(), key=lambda item: -item[1][2])  # type: ignore[attr-defined]
            for (path, line, function), (_, calls, own, _cumulative, _) in rows[:25]:
                where = pathlib.Path(path).name if path != "~" else "(C)"
                top.append({"function": f"{where}:{line} {function}", "calls": calls,
                            "own_share": round(own / total, 4)})  # fmt: skip
    for run in runs:
        print(json.dumps(run))
    for row in top:
        print(f"{row['own_share']:6.1%}  {row['calls']:8d}  {row['function']}")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "profile_own_time_top": top}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
