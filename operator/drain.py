"""Tell the scheduler(s) that endpoints are leaving, over the `Drain` RPC, within a deadline.

Two steps, so that no leaving endpoint takes new picks while another is waited on:
1. **Mark.** `Drain(timeout_s=0)` for every leaving endpoint at every scheduler: each leaves
   the rings at once and the scheduler answers without waiting (it also moves the requests it
   still holds for the endpoint). An endpoint with no lease left there is done.
2. **Wait.** For every (scheduler, endpoint) still busy, one `Drain(timeout_s=left)` sent
   concurrently, all sharing the one deadline. This call is what starts the scheduler's drain
   migration (`--migration drain|on`): it moves the endpoint's running streams within its wait.

The operator waits at most `timeout_s` in all; a scheduler that cannot be reached costs a log
line, not a stuck scale-in (its discovery drops the pod anyway when the pod goes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from twinroute.v1 import scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger(__name__)

# Added to each RPC's deadline beyond the scheduler's own wait, for the answer to come back.
ANSWER_MARGIN_S = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class DrainResult:
    endpoint_id: str
    scheduler: str
    drained: bool
    remaining_in_flight: int
    error: str = ""


class Drainer:
    """Marks every leaving endpoint at every scheduler, then waits for all within one deadline."""

    def __init__(
        self,
        *,
        token: str = "",
        tls_ca: bytes | None = None,
        tls_server_name: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`tls_ca` (PEM) reaches the schedulers over TLS trusting that CA; they are addressed
        by pod IP, so their certificate must carry `tls_server_name` (checked instead of the
        IP) when given."""
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._credentials = (
            grpc.ssl_channel_credentials(root_certificates=tls_ca) if tls_ca is not None else None
        )
        self._options = (
            (("grpc.ssl_target_name_override", tls_server_name),) if tls_server_name else ()
        )
        self._clock = clock

    def _channel(self, address: str) -> grpc.Channel:
        if self._credentials is None:
            return grpc.insecure_channel(address)
        return grpc.secure_channel(address, self._credentials, options=self._options)

    def drain(
        self,
        *,
        endpoint_ids: Sequence[str],
        scheduler_addresses: Sequence[str],
        timeout_s: float,
        token: str | None = None,
    ) -> list[DrainResult]:
        """One result per scheduler and endpoint (scheduler-major order): the wait's answer,
        or the mark's when nothing was left to wait for or the mark failed. `token`, when
        given, is this pool's (instead of the one the drainer was built with)."""
        metadata = (("authorization", f"Bearer {token}"),) if token else self._metadata
        deadline = self._clock() + timeout_s
        results: list[DrainResult] = []
        channels = [self._channel(address) for address in scheduler_addresses]
        try:
            stubs = [scheduler_pb2_grpc.SchedulerStub(channel) for channel in channels]
            # Sent together and collected before any wait: an unreachable scheduler costs
            # one answer margin, not one per endpoint.
            marks = {
                key: self._answer(future, address=key[0], endpoint_id=key[1])
                for key, future in [
                    (
                        (address, endpoint_id),
                        self._send(
                            stub=stub, endpoint_id=endpoint_id, wait_s=0.0, metadata=metadata
                        ),
                    )
                    for address, stub in zip(scheduler_addresses, stubs, strict=True)
                    for endpoint_id in endpoint_ids
                ]
            }
            left = max(0.0, deadline - self._clock())
            waits = {
                (address, endpoint_id): self._send(
                    stub=stub, endpoint_id=endpoint_id, wait_s=left, metadata=metadata
                )
                for address, stub in zip(scheduler_addresses, stubs, strict=True)
                for endpoint_id in endpoint_ids
                if _needs_wait(marks[address, endpoint_id]) and left > 0
            }
            for key, mark in marks.items():
                future = waits.get(key)
                results.append(
                    mark
                    if future is None
                    else self._answer(future, address=key[0], endpoint_id=key[1])
                )
        finally:
            for channel in channels:
                channel.close()
        for result in results:
            if result.error:
                log.warning(
                    "Drain of %s at %s failed: %s",
                    result.endpoint_id,
                    result.scheduler,
                    result.error,
                )
            elif not result.drained:
                log.info(
                    "Drain of %s at %s timed out with %d request(s) in flight",
                    result.endpoint_id,
                    result.scheduler,
                    result.remaining_in_flight,
                )
        return results

    def _send(
        self,
        *,
        stub: scheduler_pb2_grpc.SchedulerStub,
        endpoint_id: str,
        wait_s: float,
        metadata: tuple[tuple[str, str], ...],
    ) -> Any:
        """A Drain in flight: the scheduler waits up to `wait_s` for the endpoint's leases; the
        RPC deadline adds a margin for the answer."""
        return stub.Drain.future(
            scheduler_pb2.DrainRequest(endpoint_id=endpoint_id, timeout_s=wait_s),
            timeout=wait_s + ANSWER_MARGIN_S,
            metadata=metadata,
        )

    def _answer(self, future: Any, *, address: str, endpoint_id: str) -> DrainResult:
        try:
            answer = future.result()
        except grpc.RpcError as error:
            return _failed(error, address=address, endpoint_id=endpoint_id)
        return DrainResult(
            endpoint_id=endpoint_id,
            scheduler=address,
            drained=answer.drained,
            remaining_in_flight=answer.remaining_in_flight,
        )


def _needs_wait(mark: DrainResult) -> bool:
    """A marked endpoint with leases left; a failed mark is not retried (it would fail again
    or, for an unknown endpoint, mean nothing)."""
    return not mark.error and not mark.drained


def _failed(error: grpc.RpcError, *, address: str, endpoint_id: str) -> DrainResult:
    code = error.code() if isinstance(error, grpc.Call) else None
    return DrainResult(
        endpoint_id=endpoint_id,
        scheduler=address,
        drained=False,
        remaining_in_flight=0,
        error=f"{code}: {error}",
    )
