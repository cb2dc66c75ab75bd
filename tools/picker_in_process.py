"""The endpoint picker's own CPU per request, in one process and without gRPC.

    .venv/bin/python tools/picker_in_process.py [--requests 3000] [--prompt-chars 20] [--json F]

`tools/picker_profile.py` measures the picker behind a real Envoy, where grpc.aio's work per
stream is most of the cost; this one leaves gRPC out. It builds the embedded scheduler (two
endpoints, dualmap) and an `EndpointPicker` the way `twinroute gateway --embedded` does, and
for each request feeds `Process` the messages a lean Envoy sends (the request headers it
forwards, then the buffered body; each parsed from its wire bytes, as gRPC would hand it over)
and serialises every answer, then sends the picker's access-log service the request's entry,
one message each (which closes the lease; `open_leases` in the output says none was left).
Prompts are `--prompt-chars` characters, each its own (no shared prefix). On the event loop
twinroute's servers run on; after a warm-up it times six slices of the requests with the
process clock and prints the median and the best, in microseconds per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.accesslog.v3 import als_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_pb
from twinroute.scheduler.build import embedded_service
from twinroute.scheduler.picker import EndpointPicker, PickerSettings
from twinroute.scheduler.settings import SchedulerSettings
from twinroute.scheduler.types import Endpoint

from twinroute.runtime import event_loop_runner

ENDPOINTS = (Endpoint(id="e0", address="127.0.0.1:18101"),
             Endpoint(id="e1", address="127.0.0.1:18102"))  # fmt: skip
SLICES = 6


class _Context:
    """What `Process` reads of its gRPC context: the lean gateway's stream metadata."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-twinroute-request-ends", "access-log"),)


def wire_messages(index: int, prompt_chars: int) -> tuple[list[bytes], str]:
    """The request headers and buffered body a lean Envoy sends, as wire bytes; the request id."""
    words = f"request {index} " + "hello " * prompt_chars
    prompt = words[:prompt_chars]
    body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": 1}).encode()
    request_id = f"req-{index}"
    headers = {":path": "/v1/completions", "content-length": str(len(body)),
               "x-request-id": request_id}  # fmt: skip
    first = ext_pb.ProcessingRequest(
        request_headers=ext_pb.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[
                    base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()
                ]
            )
        ),
        protocol_config=ext_pb.ProtocolConfiguration(
            request_body_mode=processing_mode_pb2.ProcessingMode.BUFFERED,
            response_body_mode=processing_mode_pb2.ProcessingMode.NONE,
        ),
    )
    second = ext_pb.ProcessingRequest(request_body=ext_pb.HttpBody(body=body, end_of_stream=True))
    return [first.SerializeToString(), second.SerializeToString()], request_id


async def logged(request_id: str, served: str) -> AsyncIterator[als_pb2.StreamAccessLogsMessage]:
    """One access-log message with the request's entry (Envoy batches several: the dearest
    case), parsed from its wire bytes."""
    message = als_pb2.StreamAccessLogsMessage()
    entry = message.http_logs.log_entry.add()
    entry.request.request_id = request_id
    entry.response.response_code.value = 200
    host, port = served.rsplit(":", 1)
    address = entry.common_properties.upstream_remote_address.socket_address
    address.address, address.port_value = host, int(port)
    entry.common_properties.time_to_first_upstream_rx_byte.nanos = 800_000
    yield als_pb2.StreamAccessLogsMessage.FromString(message.SerializeToString())


async def measure(requests: int, prompt_chars: int) -> dict[str, Any]:
    service, _work = embedded_service(SchedulerSettings(), list(ENDPOINTS))
    telemetry = service.telemetry
    picker = EndpointPicker(
        scheduler=service,
        settings=PickerSettings(models=("m",)),
        registry=telemetry.registry if telemetry is not None else None,
    )
    warm_up = max(300, requests // 10)
    requests_wire = [wire_messages(i, prompt_chars) for i in range(warm_up + requests)]
    context: Any = _Context()  # stands in for grpc.aio's ServicerContext

    async def one(index: int) -> None:
        messages, request_id = requests_wire[index]

        async def arriving() -> AsyncIterator[ext_pb.ProcessingRequest]:
            for message in messages:
                yield ext_pb.ProcessingRequest.FromString(message)

        served = ""
        async for answer in picker.Process(arriving(), context):
            answer.SerializeToString()
            if answer.HasField("request_body"):
                options = answer.request_body.response.header_mutation.set_headers
                served = options[0].header.raw_value.decode().split(",")[0]
        await picker.StreamAccessLogs(logged(request_id, served), context)
        # One turn of the loop per request, as a server's has: what the picker left to run
        # in the background (a report in a task) runs here and is counted.
        await asyncio.sleep(0)

    for index in range(warm_up):
        await one(index)
    per_slice = requests // SLICES
    times: list[float] = []
    for slice_number in range(SLICES):
        start = warm_up + slice_number * per_slice
        began = time.process_time()
        for index in range(start, start + per_slice):
            await one(index)
        times.append((time.process_time() - began) / per_slice * 1e6)
    return {
        "requests": per_slice * SLICES,
        "prompt_chars": prompt_chars,
        "us_per_request_median": round(statistics.median(times), 1),
        "us_per_request_best": round(min(times), 1),
        "open_leases": sum(service.core.in_flight(e.id) for e in ENDPOINTS),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--prompt-chars", type=int, default=20)
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args()
    result = event_loop_runner()(measure(args.requests, args.prompt_chars))
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
