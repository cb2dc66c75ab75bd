"""Tell the scheduler(s) that endpoints are leaving, over the `Drain` RPC, within a deadline.

The scheduler takes a drained endpoint out of its rings at once and answers when its leases
finish or its wait runs out. The operator waits at most `timeout_s` in all; a scheduler that
cannot be reached costs a log line, not a stuck scale-in (its discovery drops the pod anyway
when the pod goes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from twinroute.v1 import scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class DrainResult:
    endpoint_id: str
    scheduler: str
    drained: bool
    remaining_in_flight: int
    error: str = ""


class Drainer:
    """Calls `Drain` on every scheduler for every leaving endpoint, sharing one deadline."""

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
        self, *, endpoint_ids: Sequence[str], scheduler_addresses: Sequence[str], timeout_s: float
    ) -> list[DrainResult]:
        deadline = self._clock() + timeout_s
        results: list[DrainResult] = []
        for address in scheduler_addresses:
            with self._channel(address) as channel:
                stub = scheduler_pb2_grpc.SchedulerStub(channel)
                for endpoint_id in endpoint_ids:
                    results.append(
                        self._drain_one(
                            stub=stub, address=address, endpoint_id=endpoint_id, deadline=deadline
                        )
                    )
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

    def _drain_one(
        self,
        *,
        stub: scheduler_pb2_grpc.SchedulerStub,
        address: str,
        endpoint_id: str,
        deadline: float,
    ) -> DrainResult:
        left = max(0.0, deadline - self._clock())
        try:
            # The scheduler waits up to `left`; the RPC deadline adds a second for the answer.
            answer = stub.Drain(
                scheduler_pb2.DrainRequest(endpoint_id=endpoint_id, timeout_s=left),
                timeout=left + 1.0,
                metadata=self._metadata,
            )
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else None
            return DrainResult(
                endpoint_id=endpoint_id,
                scheduler=address,
                drained=False,
                remaining_in_flight=0,
                error=f"{code}: {error}",
            )
        return DrainResult(
            endpoint_id=endpoint_id,
            scheduler=address,
            drained=answer.drained,
            remaining_in_flight=answer.remaining_in_flight,
        )
