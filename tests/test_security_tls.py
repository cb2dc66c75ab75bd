"""TLS and the admin token across real processes on 127.0.0.1.

`twinroute scheduler` serves gRPC over TLS with an admin token read from a file (as the chart
mounts it from a Secret); `twinroute router` serves HTTPS and reaches the scheduler over TLS
with the token; the operator's `Drainer` calls Drain over TLS. The certificate is a throwaway
self-signed one made here with the openssl binary, for the name `twinroute-scheduler` (what
the clients check, since they reach the scheduler by IP) and 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest
from twinroute.operator.drain import Drainer

from twinroute.bench.processes import ServerProcess, start_announced, twinroute_argv

MODEL = "sim-model"
SERVER_NAME = "twinroute-scheduler"
TOKEN = "s3cret-admin-token"

pytestmark = pytest.mark.slow


@dataclass(frozen=True, slots=True)
class Certificate:
    cert: Path
    key: Path


def make_certificate(directory: Path, *, names: str) -> Certificate:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("the openssl binary is needed to make a test certificate")
    cert, key = directory / "tls.crt", directory / "tls.key"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", f"/CN={SERVER_NAME}", "-addext", f"subjectAltName={names}",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return Certificate(cert=cert, key=key)


@dataclass(frozen=True, slots=True)
class Stack:
    certificate: Certificate
    engine: ServerProcess
    scheduler: ServerProcess
    router: ServerProcess


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    certificate = make_certificate(tmp_path, names=f"DNS:{SERVER_NAME},DNS:localhost,IP:127.0.0.1")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    started: list[ServerProcess] = []
    try:
        engine = await start_announced(
            "engine",
            twinroute_argv("engine-sim", "--port=0", f"--model={MODEL}", "--instance-id=e0",
                           "--time-scale=0.02"),
            timeout_s=60,
        )  # fmt: skip
        started.append(engine)
        scheduler = await start_announced(
            "scheduler",
            twinroute_argv(
                "scheduler", "--listen=127.0.0.1:0", "--metrics-listen=",
                f"--model={MODEL}", f"--static-endpoints=e0={engine.address}",
                "--scrape-interval-s=0", f"--tls-cert={certificate.cert}",
                f"--tls-key={certificate.key}", f"--admin-token-file={token_file}",
            ),
            timeout_s=60,
        )  # fmt: skip
        started.append(scheduler)
        router = await start_announced(
            "router",
            twinroute_argv(
                "router", "--port=0", f"--model={MODEL}", f"--scheduler={scheduler.address}",
                f"--scheduler-ca={certificate.cert}", f"--scheduler-server-name={SERVER_NAME}",
                f"--scheduler-token-file={token_file}", f"--tls-cert={certificate.cert}",
                f"--tls-key={certificate.key}",
            ),
            timeout_s=60,
        )  # fmt: skip
        started.append(router)
        yield Stack(certificate=certificate, engine=engine, scheduler=scheduler, router=router)
    finally:
        for server in reversed(started):
            await server.stop()


def trusting(certificate: Certificate) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certificate.cert))


async def test_https_router_places_through_the_tls_scheduler(stack: Stack) -> None:
    body = {"model": MODEL, "prompt": "hello over tls", "max_tokens": 2}
    https = f"https://{stack.router.address}/v1/completions"
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.post(https, json=body, ssl=trusting(stack.certificate)) as answer:
                assert answer.status == 200, await answer.text()
                # Placed by the scheduler over its TLS channel (there is no fallback here).
                assert answer.headers["x-twinroute-reason"] != "fallback"
                assert answer.headers["x-twinroute-endpoint"] == "e0"
        # A client that does not trust the certificate is refused in the handshake.
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            async with session.post(https, json=body, ssl=ssl.create_default_context()):
                pass
        # Plain HTTP to the TLS port gets no answer.
        with pytest.raises(aiohttp.ClientError):
            async with session.post(f"http://{stack.router.address}/v1/completions", json=body):
                pass


@pytest.mark.parametrize(
    ("token", "tls", "expected"),
    [
        ("", True, grpc.StatusCode.UNAUTHENTICATED),
        ("wrong-token", True, grpc.StatusCode.PERMISSION_DENIED),
        (TOKEN, False, grpc.StatusCode.UNAVAILABLE),
        (TOKEN, True, None),
    ],
    ids=["no-token", "wrong-token", "plaintext-to-tls", "right-token"],
)
async def test_drain_needs_tls_and_the_right_token(
    stack: Stack, token: str, tls: bool, expected: grpc.StatusCode | None
) -> None:
    drainer = Drainer(
        token=token,
        tls_ca=stack.certificate.cert.read_bytes() if tls else None,
        tls_server_name=SERVER_NAME,
    )
    (result,) = await asyncio.to_thread(
        drainer.drain,
        endpoint_ids=["e0"],
        scheduler_addresses=[stack.scheduler.address],
        timeout_s=2.0,
    )
    if expected is None:
        assert result.error == "" and result.drained
        return
    assert not result.drained
    assert result.error.startswith(str(expected)), result.error
    # A refused Drain leaves the endpoint in routing.
    body = {"model": MODEL, "prompt": "still routed", "max_tokens": 1}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"https://{stack.router.address}/v1/completions",
            json=body,
            ssl=trusting(stack.certificate),
        ) as answer,
    ):
        assert answer.status == 200
        assert answer.headers["x-twinroute-reason"] != "fallback"


async def test_wrong_certificate_name_is_refused(stack: Stack) -> None:
    drainer = Drainer(
        token=TOKEN,
        tls_ca=stack.certificate.cert.read_bytes(),
        tls_server_name="someone-else",
    )
    (result,) = await asyncio.to_thread(
        drainer.drain,
        endpoint_ids=["e0"],
        scheduler_addresses=[stack.scheduler.address],
        timeout_s=1.0,
    )
    assert not result.drained and str(grpc.StatusCode.UNAVAILABLE) in result.error
