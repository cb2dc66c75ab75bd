"""Does Envoy 1.40 route by the picker's metadata when the ext_proc filter skips the request
headers (body BUFFERED, path/id as request attributes)? Two live engines; the picker always
names the second; 20 requests; prints which engine served each mode's requests."""

import asyncio
import collections
import pathlib
import subprocess
import sys
import tempfile

import grpc
import yaml
from aiohttp import ClientSession, web
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc
from google.protobuf import struct_pb2

from twinroute.bench.processes import free_port
from twinroute.gateway.bootstrap import GatewayConfig, Upstream, render_bootstrap
from twinroute.gateway.command import wait_for_envoy


class Picker(ext_grpc.ExternalProcessorServicer):
    def __init__(self, chosen: str) -> None:
        self.chosen = chosen

    async def Process(self, requests, context):
        async for message in requests:
            kind = message.WhichOneof("request")
            if kind == "request_headers":
                yield ext_pb.ProcessingResponse(request_headers=ext_pb.HeadersResponse())
            elif kind == "request_body":
                metadata = struct_pb2.Struct()
                lb = metadata.fields["envoy.lb"].struct_value
                lb.fields["x-gateway-destination-endpoint"].string_value = self.chosen
                header = base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(
                        key="x-gateway-destination-endpoint", raw_value=self.chosen.encode()
                    ),
                    append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                )
                yield ext_pb.ProcessingResponse(
                    request_body=ext_pb.BodyResponse(
                        response=ext_pb.CommonResponse(
                            header_mutation=ext_pb.HeaderMutation(set_headers=[header])
                        )
                    ),
                    dynamic_metadata=metadata,
                )


async def run(mode: str) -> collections.Counter:
    ports = []
    runners = []
    for name in ("first", "second"):
        app = web.Application()

        async def handle(request, name=name):
            await request.read()
            return web.json_response({"served_by": name})

        app.router.add_post("/v1/completions", handle)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ports.append(port)
        runners.append(runner)
    server = grpc.aio.server()
    picker_port = free_port()
    ext_grpc.add_ExternalProcessorServicer_to_server(Picker(f"127.0.0.1:{ports[1]}"), server)
    server.add_insecure_port(f"127.0.0.1:{picker_port}")
    await server.start()
    config = GatewayConfig(
        upstream=Upstream(addresses=tuple(f"127.0.0.1:{p}" for p in ports)),
        picker_address=f"127.0.0.1:{picker_port}",
        listen_port=free_port(),
        admin_port=free_port(),
        access_log="/dev/null",
    )
    bootstrap = render_bootstrap(config)
    manager = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    ext_proc = manager["typed_config"]["http_filters"][0]["typed_config"]
    if mode == "headers_skipped":
        ext_proc["processing_mode"]["request_header_mode"] = "SKIP"
        ext_proc["request_attributes"] = ["request.path", "request.id"]
    folder = pathlib.Path(tempfile.mkdtemp())
    (folder / "envoy.yaml").write_text(yaml.safe_dump(bootstrap))
    envoy = subprocess.Popen(  # noqa: ASYNC220 - a scratch probe; Envoy starts in the background
        [
            str(pathlib.Path(sys.executable).parent / "envoy"),
            "-c",
            str(folder / "envoy.yaml"),
            "-l",
            "error",
            "--concurrency",
            "1",
            "--admin-address-path",
            str(folder / "admin-address"),
        ]
    )
    served: collections.Counter = collections.Counter()
    try:
        await wait_for_envoy(envoy, admin_address_path=folder / "admin-address")
        async with ClientSession() as session:
            for _ in range(20):
                async with session.post(
                    f"http://127.0.0.1:{config.listen_port}/v1/completions",
                    json={"model": "m", "prompt": "hi"},
                ) as response:
                    served[(await response.json())["served_by"]] += 1
    finally:
        envoy.terminate()
        envoy.wait()
        await server.stop(0)
        for runner in runners:
            await runner.cleanup()
    return served


async def main() -> None:
    for mode in ("lean", "headers_skipped"):
        print(mode, "-> the picker named 'second' every time; served by:", dict(await run(mode)))


asyncio.run(main())
