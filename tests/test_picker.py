"""The endpoint picker over gRPC, message by message, as a gateway speaks to it.

Envoy itself drives the picker in tests/test_gateway.py; here each protocol case is sent
directly (full duplex and buffered bodies, subsets, refusals, the served endpoint after a
retry, the lease's close when the stream ends, health), so a failure names the message."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from twinroute.scheduler import picker as picker_module
from twinroute.scheduler.build import build_service
from twinroute.scheduler.picker import EndpointPicker, PickerServer, PickerSettings
from twinroute.scheduler.service import SchedulerService
from twinroute.scheduler.settings import SchedulerSettings
from twinroute.scheduler.types import Endpoint

MODEL = "m"
ADDRESSES = {f"e{i}": f"10.0.0.{i + 1}:8000" for i in range(4)}
Mode = processing_mode_pb2.ProcessingMode


@dataclass
class Picker:
    service: SchedulerService
    server: PickerServer
    channel: grpc.aio.Channel
    registry: CollectorRegistry

    def stub(self) -> Any:
        return ext_grpc.ExternalProcessorStub(self.channel)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.registry.get_sample_value(name, labels or {}) or 0.0


async def start_picker(*, max_in_flight: int = 0, max_body_bytes: int = 1 << 20) -> Picker:
    registry = CollectorRegistry()
    service = build_service(
        SchedulerSettings(policy="dualmap", served_models=(MODEL,)), registry=registry
    )
    service.set_endpoints([Endpoint(id=k, address=v) for k, v in ADDRESSES.items()])
    picker = EndpointPicker(
        scheduler=service,
        settings=PickerSettings(
            models=(MODEL,), max_in_flight=max_in_flight, max_body_bytes=max_body_bytes
        ),
        registry=registry,
    )
    server = PickerServer(picker=picker, listen="127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(server.address)
    return Picker(service=service, server=server, channel=channel, registry=registry)


@pytest.fixture
async def picker() -> AsyncIterator[Picker]:
    started = await start_picker()
    await started.server.mark_synced()
    yield started
    await started.channel.close()
    await started.server.stop(grace_s=0.1)


def headers_message(
    *,
    path: str = "/v1/completions",
    request_body_mode: int = Mode.FULL_DUPLEX_STREAMED,
    response_body_mode: int = Mode.NONE,
    end_of_stream: bool = False,
    extra: dict[str, str] | None = None,
    subset: list[str] | None = None,
) -> ext_pb.ProcessingRequest:
    values = {":path": path, ":method": "POST", "content-type": "application/json"}
    values.update(extra or {})
    message = ext_pb.ProcessingRequest(
        request_headers=ext_pb.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[
                    base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in values.items()
                ]
            ),
            end_of_stream=end_of_stream,
        ),
        protocol_config=ext_pb.ProtocolConfiguration(
            request_body_mode=request_body_mode, response_body_mode=response_body_mode
        ),
    )
    if subset is not None:
        hint = struct_pb2.Struct()
        hint.update({"x-gateway-destination-endpoint-subset": subset})
        message.metadata_context.filter_metadata["envoy.lb.subset_hint"].CopyFrom(hint)
    return message


def body_message(body: bytes, *, end_of_stream: bool = True) -> ext_pb.ProcessingRequest:
    return ext_pb.ProcessingRequest(
        request_body=ext_pb.HttpBody(body=body, end_of_stream=end_of_stream)
    )


def response_headers(status: int, served: str | None = None) -> ext_pb.ProcessingRequest:
    message = ext_pb.ProcessingRequest(
        response_headers=ext_pb.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[base_pb2.HeaderValue(key=":status", raw_value=str(status).encode())]
            )
        )
    )
    if served is not None:
        served_at = struct_pb2.Struct()
        served_at.update({"x-gateway-destination-endpoint-served": served})
        message.metadata_context.filter_metadata["envoy.lb"].CopyFrom(served_at)
    return message


def completion(prompt: str, **extra: Any) -> bytes:
    return json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 4, **extra}).encode()


def destination(response: ext_pb.ProcessingResponse, *, phase: str) -> tuple[str, str]:
    """(header value, envoy.lb metadata value) of a pick's answer."""
    common = getattr(response, phase).response
    (header,) = [
        option.header
        for option in common.header_mutation.set_headers
        if option.header.key == "x-gateway-destination-endpoint"
    ]
    metadata = response.dynamic_metadata.fields["envoy.lb"].struct_value
    return header.raw_value.decode(), metadata.fields["x-gateway-destination-endpoint"].string_value


def immediate(response: ext_pb.ProcessingResponse) -> tuple[int, dict[str, Any]]:
    answer = response.immediate_response
    return int(answer.status.code), json.loads(answer.body)


async def test_full_duplex_pick_names_primary_then_the_other_candidate(picker: Picker) -> None:
    call = picker.stub().Process()
    await call.write(headers_message())
    body = completion("word " * 200)
    await call.write(body_message(body[:100], end_of_stream=False))
    await call.write(body_message(body[100:]))
    headers_answer = await call.read()
    body_answer = await call.read()
    header, metadata = destination(headers_answer, phase="request_headers")
    assert header == metadata, "the protocol forbids different values in header and metadata"
    primary, fallback = header.split(",")
    assert {primary, fallback} <= set(ADDRESSES.values()) and primary != fallback
    (record,) = await picker.service.explain(limit=1)
    candidates = {ADDRESSES[c.endpoint_id] for c in record.decision.candidates}
    assert candidates == {primary, fallback}, "the fallback is DualMap's other ring candidate"
    # The picker holds a full-duplex body and hands it back whole.
    streamed = body_answer.request_body.response.body_mutation.streamed_response
    assert streamed.body == body and streamed.end_of_stream
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF


async def test_buffered_body_carries_the_pick_and_headers_just_continue(picker: Picker) -> None:
    call = picker.stub().Process()
    await call.write(headers_message(request_body_mode=Mode.BUFFERED))
    first = await call.read()
    assert first.WhichOneof("response") == "request_headers"
    assert not first.request_headers.response.header_mutation.set_headers
    await call.write(body_message(completion("hello " * 100)))
    answer = await call.read()
    header, metadata = destination(answer, phase="request_body")
    assert header == metadata and len(header.split(",")) == 2
    await call.done_writing()


async def test_buffered_answers_built_once_still_name_each_pick(
    picker: Picker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Answers are kept and handed out again (few distinct ones in a pool); each request's
    still names its own pick, and the number kept stays bounded."""
    monkeypatch.setattr(picker_module, "_MAX_KEPT_ANSWERS", 3)
    kept: list[int] = []
    for index in range(24):
        call = picker.stub().Process()
        await call.write(headers_message(request_body_mode=Mode.BUFFERED))
        await call.read()
        await call.write(body_message(completion(f"conversation {index} " * 40)))
        answer = await call.read()
        await call.done_writing()
        header, metadata = destination(answer, phase="request_body")
        (record,) = await picker.service.explain(limit=1)
        picked = [
            option.header.raw_value.decode()
            for option in answer.request_body.response.header_mutation.set_headers
            if option.header.key in ("x-twinroute-endpoint", "x-twinroute-reason")
        ]
        assert picked == [record.decision.endpoint_id, record.decision.reason.value]
        assert header == metadata and header.split(",")[0] == ADDRESSES[picked[0]]
        kept.append(len(picker.server.picker._answers))
    assert max(kept) <= 3 and len(set(kept)) > 1


async def test_stream_end_closes_the_lease_and_response_names_the_endpoint(
    picker: Picker,
) -> None:
    call = picker.stub().Process()
    await call.write(headers_message(request_body_mode=Mode.BUFFERED))
    await call.read()
    await call.write(body_message(completion("abc " * 100)))
    answer = await call.read()
    primary = destination(answer, phase="request_body")[0].split(",")[0]
    (primary_id,) = [k for k, v in ADDRESSES.items() if v == primary]
    assert picker.service.core.in_flight(primary_id) == 1
    await call.write(response_headers(200))
    shown = await call.read()
    names = {
        o.header.key: o.header.raw_value.decode()
        for o in shown.response_headers.response.header_mutation.set_headers
    }
    assert names["x-twinroute-endpoint"] == primary_id
    assert names["x-twinroute-reason"]
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF
    for _ in range(50):
        if picker.service.core.in_flight(primary_id) == 0:
            break
        await asyncio.sleep(0.01)
    assert picker.service.core.in_flight(primary_id) == 0, "the lease closed with the stream"


async def test_lease_follows_the_fallback_that_served(picker: Picker) -> None:
    call = picker.stub().Process()
    await call.write(headers_message())
    await call.write(body_message(completion("retry me " * 80)))
    answer = await call.read()
    await call.read()
    primary, fallback = destination(answer, phase="request_headers")[0].split(",")
    ids = {v: k for k, v in ADDRESSES.items()}
    await call.write(response_headers(200, served=fallback))
    shown = await call.read()
    names = {
        o.header.key: o.header.raw_value.decode()
        for o in shown.response_headers.response.header_mutation.set_headers
    }
    assert names["x-twinroute-endpoint"] == ids[fallback]
    assert picker.service.core.in_flight(ids[fallback]) == 1
    assert picker.service.core.in_flight(ids[primary]) == 0
    assert picker.metric("twinroute_picker_fallbacks_served_total") == 1
    (record,) = await picker.service.explain(limit=1)
    assert record.decision.endpoint_id == ids[fallback]
    assert "served by fallback" in record.decision.detail
    await call.done_writing()


async def test_response_body_gives_first_token_and_usage(picker: Picker) -> None:
    call = picker.stub().Process()
    await call.write(
        headers_message(request_body_mode=Mode.BUFFERED, response_body_mode=Mode.STREAMED)
    )
    await call.read()
    await call.write(body_message(completion("stream me " * 80, stream=True)))
    answer = await call.read()
    primary_id = {v: k for k, v in ADDRESSES.items()}[
        destination(answer, phase="request_body")[0].split(",")[0]
    ]
    lease = next(iter(picker.service.core.leases.leases_on(primary_id)))
    assert lease.reports_first_token, "the picker sees the body: it reports the first token"
    await call.write(response_headers(200))
    await call.read()
    chunk = b'data: {"choices":[{"text":"a","finish_reason":null}]}\n\n'
    await call.write(ext_pb.ProcessingRequest(response_body=ext_pb.HttpBody(body=chunk)))
    await call.read()
    assert lease.first_token_at is not None
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}\n\n'
    await call.write(
        ext_pb.ProcessingRequest(
            response_body=ext_pb.HttpBody(body=usage + b"data: [DONE]\n\n", end_of_stream=True)
        )
    )
    await call.read()
    for _ in range(50):
        if picker.service.core.in_flight(primary_id) == 0:
            break
        await asyncio.sleep(0.01)
    assert picker.service.core.in_flight(primary_id) == 0
    await call.done_writing()


async def test_lean_mode_never_waits_for_a_first_token(picker: Picker) -> None:
    call = picker.stub().Process()
    await call.write(headers_message(request_body_mode=Mode.BUFFERED))
    await call.read()
    await call.write(body_message(completion("lean " * 80, stream=True)))
    answer = await call.read()
    primary_id = {v: k for k, v in ADDRESSES.items()}[
        destination(answer, phase="request_body")[0].split(",")[0]
    ]
    (lease,) = picker.service.core.leases.leases_on(primary_id)
    assert not lease.reports_first_token, "no response body reaches the picker"
    await call.done_writing()


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, None),
        (json.dumps({"model": MODEL}).encode(), 400, None),
        (json.dumps({"model": "other", "prompt": "x"}).encode(), 404, "model_not_found"),
    ],
)
async def test_bad_requests_get_an_openai_error(
    picker: Picker, body: bytes, status: int, code: str | None
) -> None:
    call = picker.stub().Process()
    await call.write(headers_message())
    await call.write(body_message(body))
    got_status, answer = immediate(await call.read())
    assert got_status == status
    assert answer["error"]["message"]
    if code:
        assert answer["error"]["code"] == code
    assert picker.metric("twinroute_picker_requests_total", {"answer": str(status)}) == 1


async def test_no_body_and_unknown_path_are_refused(picker: Picker) -> None:
    call = picker.stub().Process()
    await call.write(headers_message(end_of_stream=True))
    assert immediate(await call.read())[0] == 400
    call = picker.stub().Process()
    await call.write(headers_message(path="/v1/embeddings"))
    await call.write(body_message(completion("x")))
    assert immediate(await call.read())[0] == 404


async def test_body_over_the_limit_is_413() -> None:
    picker = await start_picker(max_body_bytes=1000)
    await picker.server.mark_synced()
    try:
        call = picker.stub().Process()
        await call.write(headers_message(extra={"content-length": "5000"}))
        status, answer = immediate(await call.read())
        assert status == 413 and "limit" in answer["error"]["message"]
        call = picker.stub().Process()
        await call.write(headers_message())
        await call.write(body_message(b"x" * 600, end_of_stream=False))
        await call.write(body_message(b"x" * 600))
        assert immediate(await call.read())[0] == 413
    finally:
        await picker.channel.close()
        await picker.server.stop(grace_s=0.1)


async def test_subset_hint_is_honoured_and_an_empty_one_is_503(picker: Picker) -> None:
    only = ADDRESSES["e2"]
    for _ in range(5):
        call = picker.stub().Process()
        await call.write(headers_message(subset=[only]))
        await call.write(body_message(completion("subset " * 90)))
        header, _ = destination(await call.read(), phase="request_headers")
        assert header == only, "a subset of one leaves no fallback outside it"
        await call.done_writing()
    for subset in ([], ["192.168.9.9:1"]):
        call = picker.stub().Process()
        await call.write(headers_message(subset=subset))
        await call.write(body_message(completion("subset")))
        status, answer = immediate(await call.read())
        assert status == 503 and answer["error"]["code"] == "no_endpoint"


async def test_no_endpoint_is_503(picker: Picker) -> None:
    picker.service.set_endpoints([])
    call = picker.stub().Process()
    await call.write(headers_message())
    await call.write(body_message(completion("nowhere")))
    status, answer = immediate(await call.read())
    assert status == 503 and answer["error"]["type"] == "service_unavailable"


async def test_requests_beyond_max_in_flight_are_shed_with_429() -> None:
    picker = await start_picker(max_in_flight=1)
    await picker.server.mark_synced()
    try:
        held = picker.stub().Process()
        await held.write(headers_message())
        await held.write(body_message(completion("first")))
        await held.read()  # picked; the stream stays open (the request is running)
        call = picker.stub().Process()
        await call.write(headers_message())
        await call.write(body_message(completion("second")))
        status, answer = immediate(await call.read())
        assert status == 429 and answer["error"]["code"] == "shed"
        await held.done_writing()
    finally:
        await picker.channel.close()
        await picker.server.stop(grace_s=0.1)


async def test_readiness_waits_for_discovery() -> None:
    picker = await start_picker()
    try:
        health = health_pb2_grpc.HealthStub(picker.channel)

        async def status(service: str) -> int:
            answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
            return int(answer.status)

        serving = health_pb2.HealthCheckResponse.SERVING
        assert await status("liveness") == serving
        assert await status("readiness") != serving
        assert await status("envoy.service.ext_proc.v3.ExternalProcessor") != serving
        await picker.server.mark_synced()
        assert await status("readiness") == serving
        assert await status("envoy.service.ext_proc.v3.ExternalProcessor") == serving
    finally:
        await picker.channel.close()
        await picker.server.stop(grace_s=0.1)


async def test_access_log_entry_closes_the_lease_where_it_was_served(picker: Picker) -> None:
    """Lean gateways send no response phase: the request's entry in Envoy's gRPC access log
    names the endpoint that served and closes the lease."""
    from envoy.data.accesslog.v3 import accesslog_pb2
    from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

    # As a lean Envoy does: it says so on the stream, and opens its access-log stream only
    # when the first request ends (after this one was picked).
    call = picker.stub().Process(metadata=(("x-twinroute-request-ends", "access-log"),))
    await call.write(
        headers_message(request_body_mode=Mode.BUFFERED, extra={"x-request-id": "req-1"})
    )
    await call.read()
    await call.write(body_message(completion("logged " * 90)))
    answer = await call.read()
    primary, fallback = destination(answer, phase="request_body")[0].split(",")
    ids = {v: k for k, v in ADDRESSES.items()}
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF
    await asyncio.sleep(0.05)
    assert picker.service.core.in_flight(ids[primary]) == 1, "the stream's end is not the end"
    logs = als_pb2_grpc.AccessLogServiceStub(picker.channel).StreamAccessLogs()
    host, port = fallback.split(":")
    entry = accesslog_pb2.HTTPAccessLogEntry()
    entry.request.request_id = "req-1"
    entry.response.response_code.value = 200
    address = entry.common_properties.upstream_remote_address.socket_address
    address.address, address.port_value = host, int(port)
    message = als_pb2.StreamAccessLogsMessage()
    message.http_logs.log_entry.append(entry)
    await logs.write(message)
    for _ in range(50):
        if picker.metric("twinroute_picker_fallbacks_served_total") == 1:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    assert picker.metric("twinroute_picker_fallbacks_served_total") == 1
    assert picker.service.core.in_flight(ids[primary]) == 0
    assert picker.service.core.in_flight(ids[fallback]) == 0, "closed where it was served"
    (record,) = await picker.service.explain(limit=1)
    assert record.decision.endpoint_id == ids[fallback]
    await logs.done_writing()


async def test_without_the_access_log_a_streams_end_closes_its_lease(picker: Picker) -> None:
    """A gateway that does not say its request ends come in the access log (any GIE gateway)
    and sends no response phase: the stream's end is the request's, and the lease closes."""
    call = picker.stub().Process()
    await call.write(headers_message(request_body_mode=Mode.BUFFERED, extra={"x-request-id": "r"}))
    await call.read()
    await call.write(body_message(completion("gie " * 90)))
    primary = destination(await call.read(), phase="request_body")[0].split(",")[0]
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF
    primary_id = {v: k for k, v in ADDRESSES.items()}[primary]
    for _ in range(50):
        if picker.service.core.in_flight(primary_id) == 0:
            break
        await asyncio.sleep(0.01)
    assert picker.service.core.in_flight(primary_id) == 0


async def test_a_lean_gateways_log_reaching_another_replica_closes_the_lease_here() -> None:
    """Envoy streams its whole access log to one replica: an entry for a request another
    replica picked goes on to it with the peers' load share, and closes the lease there."""
    from envoy.data.accesslog.v3 import accesslog_pb2
    from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
    from twinroute.scheduler.peers import PeerExchange, enable_replicas
    from twinroute.scheduler.server import GrpcServer

    settings = SchedulerSettings(policy="dualmap", served_models=(MODEL,))
    replicas = []
    for _ in range(2):
        registry = CollectorRegistry()
        service = build_service(settings, registry=registry)
        service.set_endpoints([Endpoint(id=k, address=v) for k, v in ADDRESSES.items()])
        replica_id = enable_replicas(service, stale_after_s=5.0, grace_s=5.0)
        grpc_server = GrpcServer(service=service, listen="127.0.0.1:0")
        await grpc_server.start()
        picker = EndpointPicker(
            scheduler=service, settings=PickerSettings(models=(MODEL,)), registry=registry
        )
        picker_server = PickerServer(picker=picker, listen="127.0.0.1:0")
        await picker_server.start()
        await picker_server.mark_synced()
        replicas.append((service, grpc_server, picker_server, replica_id, registry))
    addresses = [grpc_server.address for _, grpc_server, *_ in replicas]
    tasks = []
    for service, grpc_server, picker_server, replica_id, _ in replicas:
        exchange = PeerExchange(
            service=service, replica_id=replica_id, targets=addresses,
            own_addresses=[grpc_server.address], interval_s=0.01,
        )  # fmt: skip
        picker_server.picker.forward_log = exchange.forward_gateway_log
        grpc_server.peers.on_gateway_log = picker_server.picker.take_peer_log
        tasks.append(asyncio.create_task(exchange.run()))
    (a_service, _, a_picker, _, a_registry), (_, _, b_picker, _, b_registry) = replicas
    a_channel = grpc.aio.insecure_channel(a_picker.address)
    b_channel = grpc.aio.insecure_channel(b_picker.address)
    try:
        call = ext_grpc.ExternalProcessorStub(a_channel).Process(
            metadata=(("x-twinroute-request-ends", "access-log"),)
        )
        await call.write(
            headers_message(request_body_mode=Mode.BUFFERED, extra={"x-request-id": "req-a"})
        )
        await call.read()
        await call.write(body_message(completion("picked on a " * 40)))
        primary = destination(await call.read(), phase="request_body")[0].split(",")[0]
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
        primary_id = {v: k for k, v in ADDRESSES.items()}[primary]
        assert a_service.core.in_flight(primary_id) == 1

        logs = als_pb2_grpc.AccessLogServiceStub(b_channel).StreamAccessLogs()
        message = als_pb2.StreamAccessLogsMessage()
        for request_id in ("req-a", "nobody-picked-this"):
            entry = accesslog_pb2.HTTPAccessLogEntry()
            entry.request.request_id = request_id
            entry.response.response_code.value = 200
            host, port = primary.split(":")
            address = entry.common_properties.upstream_remote_address.socket_address
            address.address, address.port_value = host, int(port)
            message.http_logs.log_entry.append(entry)
        await logs.write(message)
        for _ in range(300):
            if a_service.core.in_flight(primary_id) == 0:
                break
            await asyncio.sleep(0.01)
        assert a_service.core.in_flight(primary_id) == 0

        def handled(registry: CollectorRegistry, how: str) -> float:
            value = registry.get_sample_value(
                "twinroute_picker_access_log_entries_total", {"handled": how}
            )
            return value or 0.0

        assert handled(b_registry, "forwarded") == 2
        assert handled(a_registry, "from_peer") == 1
        # Forwarded once, never on again: what no replica picked ends unmatched.
        for _ in range(50):
            if handled(a_registry, "unmatched") == 1:
                break
            await asyncio.sleep(0.01)
        assert handled(a_registry, "unmatched") == 1
        assert handled(b_registry, "from_peer") == 0
        await logs.done_writing()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await a_channel.close()
        await b_channel.close()
        for _, grpc_server, picker_server, *_ in replicas:
            await picker_server.stop(grace_s=0.1)
            await grpc_server.stop(grace_s=0.1)


def test_the_gateway_forwards_exactly_the_headers_the_picker_reads() -> None:
    """`twinroute gateway` has Envoy send the picker only these (fewer fields to write and
    parse per request): a header the picker starts reading must be added there too."""
    from twinroute.gateway.bootstrap import PICKER_READS_HEADERS

    read = picker_module._REQUEST_HEADERS | picker_module._RESPONSE_HEADERS
    assert read == set(PICKER_READS_HEADERS)
