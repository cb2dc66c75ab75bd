"""Bad input tried systematically (hypothesis), beyond the hand-written corpora in
`test_router.py` (one case per rule) and `test_chart.py` (invalid ModelPool specs):

- the router as a user runs it (`twinroute router --embedded` in front of an engine-sim
  process) gets arbitrary bytes, invalid UTF-8, arbitrary JSON documents and well-formed
  requests with wrong field types, absurd numbers and huge prompts: every answer is either a
  success or a 4xx in OpenAI's error format whose message says something, never a 5xx, and the
  process is still healthy afterwards;
- the same router gets 10,000 requests to random paths: 404/405, and not one new metric
  series (requests are labelled by the route that matched);
- a `twinroute scheduler` process with a token gets every data-plane and admin RPC with no
  token and with a wrong one: all refused, nothing placed, no lease closed;
- the ModelPool parser gets specs with one field replaced by an arbitrary JSON value: it
  accepts (and the children render) or raises `SpecError` naming a field, nothing else.

Chat requests without `max_tokens` across a drain (the answer is whole, not cut at a default)
are in `test_router_migration.py`, with the migration machinery they need.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import json
import pathlib
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twinroute.operator.render import Owner, RenderSettings, render_children
from twinroute.operator.spec import SpecError, parse_pool
from twinroute.scheduler.api import PickQuery
from twinroute.scheduler.client import SchedulerClient
from twinroute.v1 import scheduler_pb2 as pb
from twinroute.v1 import scheduler_pb2_grpc

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = "sim-model"
MAX_BODY = 64 * 1024
EXAMPLES = 60

pytestmark = pytest.mark.slow


def _announced(process: subprocess.Popen[bytes], *, timeout_s: float = 60.0) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline().decode()
        if "listening on http://" in line:
            return line.split("listening on ")[1].strip()
        if not line and process.poll() is not None:
            break
    raise AssertionError(f"process exited or never listened: {process.args!r}")


@pytest.fixture(scope="module")
def router() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    base = [sys.executable, "-m", "twinroute"]
    engine = subprocess.Popen(
        [*base, "engine-sim", "--port=0", f"--model={MODEL}", "--time-scale=0.01"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    router_process: subprocess.Popen[bytes] | None = None
    try:
        engine_url = _announced(engine)
        router_process = subprocess.Popen(
            [
                *base,
                "router",
                "--port=0",
                f"--model={MODEL}",
                "--embedded",
                f"--endpoints=e0={engine_url.removeprefix('http://')}",
                f"--max-body-bytes={MAX_BODY}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        yield _announced(router_process), router_process
    finally:
        for process in (router_process, engine):
            if process is not None:
                process.terminate()
                process.wait(timeout=10)


def post(url: str, raw: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(
        url, data=raw, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def check_answer(status: int, body: bytes) -> None:
    assert status < 500, (status, body[:300])
    if status >= 400:
        error = json.loads(body)["error"]
        assert isinstance(error["message"], str) and error["message"].strip()
        assert set(error) >= {"message", "type", "param", "code"}


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=50),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)

WEIRD_NUMBERS = st.sampled_from([0, -1, 2**31, 2**63, 10**30, 1.5, -0.0, 1e308, True, "16", None])

completion_requests = st.fixed_dictionaries(
    {"model": st.one_of(st.just(MODEL), json_values)},
    optional={
        "prompt": st.one_of(
            st.text(max_size=200),
            st.lists(st.integers(min_value=-5, max_value=2**40), max_size=20),
            json_values,
        ),
        "max_tokens": st.one_of(WEIRD_NUMBERS, st.integers(min_value=1, max_value=8)),
        "stream": st.one_of(st.booleans(), json_values),
        "temperature": st.one_of(st.floats(allow_nan=False), json_values),
        "n": WEIRD_NUMBERS,
        "unknown_field": json_values,
    },
)

chat_requests = st.fixed_dictionaries(
    {"model": st.one_of(st.just(MODEL), json_values)},
    optional={
        "messages": st.one_of(
            st.lists(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "role": st.one_of(st.sampled_from(["user", "system", "x"]), json_values),
                        "content": st.one_of(st.text(max_size=100), json_values),
                    },
                ),
                max_size=4,
            ),
            json_values,
        ),
        "max_tokens": WEIRD_NUMBERS,
        "stream": st.one_of(st.booleans(), json_values),
    },
)

HYPOTHESIS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@HYPOTHESIS
@given(raw=st.binary(max_size=512))
def test_arbitrary_bytes_get_a_4xx_with_a_reason(
    router: tuple[str, subprocess.Popen[bytes]], raw: bytes
) -> None:
    url, _ = router
    for path in ("/v1/completions", "/v1/chat/completions"):
        status, body = post(url + path, raw)
        check_answer(status, body)


@HYPOTHESIS
@given(request=completion_requests)
def test_completion_requests_of_any_shape(
    router: tuple[str, subprocess.Popen[bytes]], request: dict[str, Any]
) -> None:
    url, _ = router
    check_answer(*post(url + "/v1/completions", json.dumps(request).encode()))


@HYPOTHESIS
@given(request=chat_requests)
def test_chat_requests_of_any_shape(
    router: tuple[str, subprocess.Popen[bytes]], request: dict[str, Any]
) -> None:
    url, _ = router
    check_answer(*post(url + "/v1/chat/completions", json.dumps(request).encode()))


EDGE_CASES = {
    "invalid-utf8-in-string": b'{"model": "sim-model", "prompt": "\xff\xfe\xc3"}',
    "lone-surrogate-escape": b'{"model": "sim-model", "prompt": "\\ud800"}',
    "deeply-nested": b'{"model": "sim-model", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    "huge-number": b'{"model": "sim-model", "prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}",
    "nan-literal": b'{"model": "sim-model", "prompt": "hi", "max_tokens": NaN}',
    "duplicate-keys": b'{"model": "nope", "model": "sim-model", "prompt": "hi", "max_tokens": 2}',
    "oversized-body": json.dumps({"model": MODEL, "prompt": "x" * (2 * MAX_BODY)}).encode(),
    "huge-prompt-under-the-limit": json.dumps(
        {"model": MODEL, "prompt": "word " * (MAX_BODY // 6), "max_tokens": 2}
    ).encode(),
    "huge-token-prompt": json.dumps(
        {"model": MODEL, "prompt": list(range(9000)), "max_tokens": 2}
    ).encode(),
    "empty-body": b"",
    "null": b"null",
}


@pytest.mark.parametrize("raw", EDGE_CASES.values(), ids=EDGE_CASES.keys())
def test_edge_cases_get_an_answer_that_says_what_was_wrong(
    router: tuple[str, subprocess.Popen[bytes]], raw: bytes
) -> None:
    url, _ = router
    check_answer(*post(url + "/v1/completions", raw))


def test_ten_thousand_random_paths_add_no_metric_series(
    router: tuple[str, subprocess.Popen[bytes]],
) -> None:
    url, _ = router

    def series() -> set[str]:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as answer:
            text = answer.read().decode()
        return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and line[0] != "#"}

    before = series()
    rng = random.Random(7)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789/._-~%"
    paths: set[str] = set()
    while len(paths) < 10_000:
        paths.add("/" + "".join(rng.choices(alphabet, k=rng.randint(1, 40))))

    async def hammer() -> list[int]:
        limit = asyncio.Semaphore(32)
        async with aiohttp.ClientSession() as session:

            async def one(path: str) -> int:
                async with limit:
                    method = session.get if len(path) % 2 else session.post
                    async with method(url + path) as answer:
                        await answer.read()
                        return answer.status

            return await asyncio.gather(*(one(path) for path in sorted(paths)))

    statuses = asyncio.run(hammer())
    assert len(statuses) == 10_000
    assert set(statuses) <= {400, 404, 405}, collections.Counter(statuses)
    after = series()
    # Counts change, series do not: at most the "other" route's own series appear.
    new = {name for name in after - before if "twinroute_router_requests" not in name}
    assert not new, sorted(new)[:10]
    routes = {name for name in after if name.startswith("twinroute_router_requests_total")}
    assert len(routes) <= 12, sorted(routes)


def test_unauthenticated_scheduler_calls_are_refused() -> None:
    """Every call of a scheduler with a token, without it and with a wrong one: refused, and
    the lease a pool's own router opened stays open."""
    token = "pool-token-" + "x" * 40
    port = _free_port()
    with tempfile.NamedTemporaryFile("w", suffix=".token", delete=False) as handle:
        handle.write(token)
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "twinroute", "scheduler", f"--listen=127.0.0.1:{port}",
         "--metrics-listen=", f"--model={MODEL}", "--static-endpoints=e0=127.0.0.1:1",
         "--scrape-interval-s=0", f"--admin-token-file={handle.name}"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert scheduler.stdout is not None
        assert "scheduler listening" in scheduler.stdout.readline().decode()
        asyncio.run(_refused_calls(f"127.0.0.1:{port}", token))
    finally:
        scheduler.terminate()
        scheduler.wait(timeout=10)
        pathlib.Path(handle.name).unlink()


async def _refused_calls(target: str, token: str) -> None:
    own = SchedulerClient(target=target, admin_token=token, timeout_s=5)
    try:
        placed = await own.pick(PickQuery(request_id="own", model=MODEL, text="hello " * 20))
        async with grpc.aio.insecure_channel(target) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            lease = placed.lease_id
            calls = {
                "Pick": lambda md: stub.Pick(
                    pb.PickRequest(request_id="x", model=MODEL, prompt=pb.Prompt(text="hi")),
                    metadata=md,
                ),
                "Complete": lambda md: stub.Complete(
                    pb.CompleteRequest(lease_id=lease), metadata=md
                ),
                "Progress": lambda md: stub.Progress(
                    pb.ProgressRequest(lease_id=lease, event=pb.PROGRESS_EVENT_FIRST_TOKEN),
                    metadata=md,
                ),
                "Cancel": lambda md: stub.Cancel(pb.CancelRequest(pick_id="p"), metadata=md),
                "Renew": lambda md: stub.Renew(pb.RenewRequest(lease_ids=[lease]), metadata=md),
                "ListEndpoints": lambda md: stub.ListEndpoints(
                    pb.ListEndpointsRequest(), metadata=md
                ),
                "Explain": lambda md: stub.Explain(pb.ExplainRequest(), metadata=md),
                "Drain": lambda md: stub.Drain(pb.DrainRequest(endpoint_id="e0"), metadata=md),
                "Undrain": lambda md: stub.Undrain(
                    pb.UndrainRequest(endpoint_id="e0"), metadata=md
                ),
            }
            for name, call in calls.items():
                for metadata, code in (
                    (None, grpc.StatusCode.UNAUTHENTICATED),
                    (
                        (("authorization", f"Bearer {token[::-1]}"),),
                        grpc.StatusCode.PERMISSION_DENIED,
                    ),
                    ((("authorization", token),), grpc.StatusCode.PERMISSION_DENIED),
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await call(metadata)
                    assert caught.value.code() == code, name
        statuses = {s.endpoint.id: s for s in await own.list_endpoints()}
        assert statuses["e0"].routable and statuses["e0"].load.in_flight == 1
        assert await own.complete(lease_id=placed.lease_id)  # still open: closed only now
    finally:
        await own.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_router_is_healthy_after_all_of_it(router: tuple[str, subprocess.Popen[bytes]]) -> None:
    url, process = router
    assert process.poll() is None
    with urllib.request.urlopen(url + "/health", timeout=10) as answer:
        assert answer.status == 200
    status, body = post(
        url + "/v1/completions",
        json.dumps({"model": MODEL, "prompt": "still here", "max_tokens": 2}).encode(),
    )
    assert status == 200, body[:300]


# -- ModelPool specs ------------------------------------------------------------------------

SAMPLE_SPEC = yaml.safe_load(
    (ROOT / "manifests" / "samples" / "modelpool-unified.yaml").read_text()
)["spec"]


def _leaf_paths(node: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(node, dict) and node:
        return [p for key, child in node.items() for p in _leaf_paths(child, (*prefix, key))]
    return [prefix]


LEAF_PATHS = [
    *_leaf_paths(SAMPLE_SPEC),
    ("routing", "policy"),
    ("routing", "ttftSloSeconds"),
    ("routing", "prefixBlockSize"),
    ("routing", "virtualNodes"),
    ("roles",),
    ("model",),
    ("engine",),
]


@settings(max_examples=300, deadline=None)
@given(path=st.sampled_from(LEAF_PATHS), value=json_values)
def test_any_one_field_wrong_is_accepted_or_named(path: tuple[str, ...], value: Any) -> None:
    spec = copy.deepcopy(SAMPLE_SPEC)
    node = spec
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(node.get(key), dict) else node
    node[path[-1]] = value
    try:
        pool = parse_pool(name="p", namespace="default", spec=spec)
    except SpecError as error:
        assert str(error).startswith("spec."), error
        return
    children = render_children(
        pool,
        owner=Owner(name="p", uid="0f4c9a1e-1111-2222-3333-444455556666"),
        settings=RenderSettings(scheduler_image="ghcr.io/twinroute/twinroute:0.1.0"),
    )
    assert children
