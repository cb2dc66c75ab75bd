"""Can a lean gateway skip the request-headers message (the headers as attributes on the body)?

Two engine simulators, Envoy 1.40 on `twinroute gateway`'s lean bootstrap with
`request_attributes` added, and a minimal ext_proc servicer that records what it receives and
answers each request's body with the pick (always the second engine: header mutation and
`envoy.lb` metadata, as twinroute's picker does). Four requests with the request headers sent
(`send`, today's lean mode) and four with them skipped (`skip`):

    .venv/bin/python benchmarks/gateway/reverted-experiments/lean-headers-skipped/probe.py send
    .venv/bin/python benchmarks/gateway/reverted-experiments/lean-headers-skipped/probe.py skip
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc
from google.protobuf import json_format, struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

import twinroute.gateway.command as gateway_command
from twinroute.bench.processes import start_announced, twinroute_argv
from twinroute.gateway.bootstrap import GatewayConfig, Upstream, render_bootstrap

ATTRIBUTES = [
    "request.path",
    "request.headers['x-request-id']",
    "request.headers['x-twinroute-ttft-slo-s']",
]


def body_answer(endpoint: str) -> ext_pb.ProcessingResponse:
    metadata = struct_pb2.Struct()
    lb = metadata.fields["envoy.lb"].struct_value
    lb.fields["x-gateway-destination-endpoint"].string_value = endpoint
    header = base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(
            key="x-gateway-destination-endpoint", raw_value=endpoint.encode()
        ),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )
    mutation = ext_pb.CommonResponse(header_mutation=ext_pb.HeaderMutation(set_headers=[header]))
    return ext_pb.ProcessingResponse(
        request_body=ext_pb.BodyResponse(response=mutation), dynamic_metadata=metadata
    )


async def probe(mode: str) -> dict[str, Any]:
    engines = [
        await start_announced(
            name,
            twinroute_argv("engine-sim", "--port=0", "--model=m", f"--instance-id={name}",
                           "--time-scale=0.0001"),
            timeout_s=60,
        )
        for name in ("e0", "e1")
    ]  # fmt: skip
    answer = body_answer(engines[1].address)
    received: list[dict[str, Any]] = []

    class Recorder(ext_grpc.ExternalProcessorServicer):  # type: ignore[misc]
        async def Process(self, messages: Any, context: Any) -> Any:
            async for message in messages:
                kind = message.WhichOneof("request")
                received.append(
                    {
                        "message": kind,
                        "attributes": {
                            key: json_format.MessageToDict(value)
                            for key, value in message.attributes.items()
                        },
                    }
                )
                if kind == "request_headers":
                    yield ext_pb.ProcessingResponse(request_headers=ext_pb.HeadersResponse())
                elif kind == "request_body":
                    yield answer

    class Logs(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
        async def StreamAccessLogs(self, messages: Any, context: Any) -> Any:
            async for _entry in messages:
                pass
            return als_pb2.StreamAccessLogsResponse()

    server = grpc.aio.server()
    ext_grpc.add_ExternalProcessorServicer_to_server(Recorder(), server)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(Logs(), server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    for name in ("", "liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor"):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    config = GatewayConfig(
        upstream=Upstream(addresses=tuple(engine.address for engine in engines)),
        picker_address=f"127.0.0.1:{port}",
        listen_host="127.0.0.1",
        listen_port=0,
        admin_port=0,
        processing="lean",
        access_log="/dev/null",
    )
    bootstrap = render_bootstrap(config)
    for listener in bootstrap["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                for http_filter in network_filter["typed_config"].get("http_filters", []):
                    if "ext_proc" in http_filter["name"]:
                        ext_proc = http_filter["typed_config"]
                        ext_proc["request_attributes"] = ATTRIBUTES
                        if mode == "skip":
                            ext_proc["processing_mode"]["request_header_mode"] = "SKIP"
    gateway_command.render_bootstrap = lambda _config: bootstrap  # type: ignore[assignment]
    served = []
    with tempfile.TemporaryDirectory() as workdir:
        process, admin_path = gateway_command.start_envoy(
            config, binary=gateway_command.envoy_binary(), concurrency=1, workdir=Path(workdir)
        )
        try:
            listen = await gateway_command.wait_for_envoy(process, admin_address_path=admin_path)
            async with aiohttp.ClientSession() as session:
                for _ in range(4):
                    async with session.post(
                        f"http://127.0.0.1:{listen}/v1/completions",
                        json={"model": "m", "prompt": "hi there", "max_tokens": 1},
                        headers={"x-twinroute-ttft-slo-s": "2.5"},
                    ) as response:
                        served.append(
                            {
                                "status": response.status,
                                "served_by": response.headers.get("x-twinroute-instance"),
                            }
                        )
        finally:
            process.terminate()
            process.wait()
    await server.stop(0)
    for engine in engines:
        await engine.stop()
    return {"mode": mode, "picked": "e1", "served": served, "received": received}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(probe(sys.argv[1])), indent=1))
