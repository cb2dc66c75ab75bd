"""The scheduler's API: the one vocabulary every front end speaks.

`Scheduler` is implemented by the in-process `SchedulerService` (the embedded router, tests,
benchmarks) and by `SchedulerClient` (the `twinroute scheduler` service over gRPC) alike, so the
router, live migration, the benchmarks and any other front end (an Envoy endpoint picker) are
written once against it and run over either. Protobuf and HTTP are converted at the edges only
(`scheduler/wire.py`, the router's OpenAI parser); everything in between uses these types
(docs/design.md, "One vocabulary from router to core").

A pick hands back a `Placement`: the answer (endpoint, lease, reason, prediction) and the one
report owed for it. `Placement.complete()` is exactly-once by construction, as KubeAI's load
balancer hands a `done()` callback out with every address: the first call claims the report,
later calls do nothing, so no path of a request can leak or double-close its lease. An
in-process scheduler makes a report when it is called and hands it back settled
(`SettledReport`): a front end need not start a task to run it.

Errors are typed; each maps to one gRPC status (and back again in the client):

| error                      | gRPC status         | meaning                                      |
|----------------------------|---------------------|----------------------------------------------|
| `InvalidPickError`         | INVALID_ARGUMENT    | the request itself is wrong (empty prompt...) |
| `UnknownModelError`        | NOT_FOUND           | no endpoint of the pool serves that model    |
| `NoEndpointError`          | UNAVAILABLE         | nothing routable left (empty pool, excluded) |
| `UnknownEndpointError`     | NOT_FOUND           | Drain named an endpoint the scheduler lacks  |
| `MigrationOffError`        | FAILED_PRECONDITION | migration orders asked of a scheduler without |
| `StaleMembershipError`     | UNAVAILABLE         | a replica behind its peers: ask another one  |
| `SchedulerUnreachableError`| (anything else)     | the scheduler could not answer: fail open    |
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, Literal, Protocol

import numpy as np
import numpy.typing as npt
from twinroute.scheduler.types import (
    DecisionRecord,
    Endpoint,
    LoadSnapshot,
    NoEndpointError,
)

from twinroute.vocabulary import DecisionReason

# How a placed request ended (the Complete report).
Outcome = Literal["success", "engine_error", "stream_error", "cancelled", "timeout"]
OUTCOMES: Final[tuple[Outcome, ...]] = (
    "success",
    "engine_error",
    "stream_error",
    "cancelled",
    "timeout",
)

# Milestones of a placed request reported between Pick and Complete (Progress): the prefill
# hop of a disaggregated request finished, or failed and the decode endpoint prefills itself;
# the first token reached the client.
ProgressEvent = Literal["prefill_done", "first_token", "prefill_fell_back"]
PROGRESS_EVENTS: Final[tuple[ProgressEvent, ...]] = (
    "prefill_done",
    "first_token",
    "prefill_fell_back",
)

DEFAULT_EXPLAIN_LIMIT: Final = 20


class InvalidPickError(ValueError):
    """The request cannot be scheduled as given (empty prompt, missing model, bad field)."""


class UnknownModelError(LookupError):
    """No endpoint of the pool serves the requested model."""


class UnknownEndpointError(LookupError):
    """The endpoint id is not one the scheduler knows."""


class MigrationOffError(RuntimeError):
    """Migration orders were asked of a scheduler that runs without migration."""


class SchedulerUnreachableError(ConnectionError):
    """The scheduler could not answer (connection, deadline, server error): the caller may
    fail open (the router's static fallback), never mistaking it for "the pool is empty"."""


class StaleMembershipError(SchedulerUnreachableError):
    """This replica's ring membership is behind a peer's (active-active replicas): it refuses
    to pick on it for a moment, so that the caller asks another replica (or fails open)."""


# -- a pick ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PickQuery:
    """One request to place. Give `token_ids` when the caller has them (exact prefix keys),
    otherwise `text` (keys over characters; `prompt_tokens` then carries the caller's count
    of model tokens, 0 = estimate from the length)."""

    request_id: str
    model: str
    token_ids: Sequence[int] | npt.NDArray[np.integer] | None = None
    text: str | None = None
    session_id: str = ""
    lora_adapter: str = ""
    cache_salt: str = ""
    # max_tokens or an estimate; 0 = unknown.
    expected_output_tokens: int = 0
    # This request's own TTFT objective, only when its client asked for one; None: the
    # scheduler's `SchedulerSettings.ttft_slo_s`.
    ttft_slo_s: float | None = None
    prompt_tokens: int = 0
    # Endpoints already tried for this request (retries); they are not picked again.
    exclude_endpoints: frozenset[str] = frozenset()
    # Unique per Pick call, so the caller can cancel this very Pick (`Scheduler.cancel`);
    # empty: not cancellable. The gRPC client fills it in.
    pick_id: str = ""
    # The caller will report the first token (Progress "first_token"): the request streams.
    reports_first_token: bool = False
    # `token_ids` are exactly what the engine will prefill (not a chat the caller rendered),
    # so they may be hashed as the engine hashes its blocks (KV-event lookups).
    exact_engine_tokens: bool = False


@dataclass(frozen=True, slots=True)
class PickAnswer:
    """Where a request goes and why: the value a Pick returns, on any transport."""

    endpoint: Endpoint
    lease_id: str
    reason: DecisionReason
    policy: str
    predicted_ttft_s: float = 0.0
    expected_cached_blocks: int = 0
    # Set in a disaggregated pool when the prompt is prefilled there first.
    prefill_endpoint: Endpoint | None = None
    # Where to try next, in order, should `endpoint` fail before answering (DualMap: the other
    # ring candidate); a gateway retries down this list (the endpoint picker's fallbacks).
    fallbacks: tuple[Endpoint, ...] = ()


class LeaseReports(Protocol):
    """Reports about a placed request, by lease id (what a `Placement` calls). Each returns the
    report to await: a coroutine over gRPC, a `SettledReport` from an in-process scheduler,
    which makes it when called."""

    def complete(
        self,
        *,
        lease_id: str,
        outcome: Outcome = "success",
        observed_ttft_s: float = 0.0,
        prompt_tokens: int = 0,
        output_tokens: int = 0,
        cached_prompt_tokens: int = 0,
    ) -> Awaitable[bool]:
        """Close a lease; False when the scheduler no longer knew it (closed or expired)."""
        ...

    def progress(self, *, lease_id: str, event: ProgressEvent) -> Awaitable[bool]:
        """A milestone of a placed request; False when the lease or event did not apply."""
        ...


class SettledReport:
    """A report already made: awaiting it gives its result, or raises the error it met, without
    suspending. A front end that reports in the background checks for one first: a task per
    report (3-5 us each, two a streamed request) is then not needed."""

    __slots__ = ("error", "result")

    def __init__(self, result: bool, error: Exception | None = None) -> None:
        self.result = result
        self.error = error

    def __await__(self) -> Generator[Any, None, bool]:
        if self.error is not None:
            raise self.error
        return self.result
        yield  # never reached: it makes this method a generator, which `await` needs

    @classmethod
    def of(cls, make: Callable[[], bool]) -> SettledReport:
        """Make the report now; an error it raises is kept for whoever awaits it."""
        try:
            return cls(make())
        except Exception as error:
            return cls(False, error)


NOTHING_TO_REPORT: Final = SettledReport(False)


class Placement:
    """One placed request: its `answer`, and the reports owed for it.

    `complete()` claims the request's one Complete when it is called, before anything is
    awaited, and returns the report to await (or to run in the background); a second call, from
    any path, returns a report that does nothing. Progress after completion is dropped. A
    placement without a lease (the router's fail-open placements) reports nothing.
    """

    __slots__ = ("_answer", "_completed", "_reports")

    def __init__(self, answer: PickAnswer, *, reports: LeaseReports | None) -> None:
        self._answer = answer
        self._reports = reports if answer.lease_id else None
        self._completed = False

    @property
    def answer(self) -> PickAnswer:
        """The placement as it stands (a prefill hop that fell back is no longer named)."""
        return self._answer

    @property
    def endpoint(self) -> Endpoint:
        return self._answer.endpoint

    @property
    def prefill_endpoint(self) -> Endpoint | None:
        return self._answer.prefill_endpoint

    @property
    def lease_id(self) -> str:
        return self._answer.lease_id

    @property
    def reason(self) -> DecisionReason:
        return self._answer.reason

    @property
    def policy(self) -> str:
        return self._answer.policy

    @property
    def predicted_ttft_s(self) -> float:
        return self._answer.predicted_ttft_s

    @property
    def expected_cached_blocks(self) -> int:
        return self._answer.expected_cached_blocks

    @property
    def done(self) -> bool:
        """True once `complete` was called."""
        return self._completed

    def complete(
        self,
        outcome: Outcome,
        *,
        observed_ttft_s: float = 0.0,
        prompt_tokens: int = 0,
        output_tokens: int = 0,
        cached_prompt_tokens: int = 0,
    ) -> Awaitable[bool]:
        """The request's Complete report, claimed now; False from every later call."""
        if self._completed or self._reports is None:
            self._completed = True
            return NOTHING_TO_REPORT
        self._completed = True
        return self._reports.complete(
            lease_id=self._answer.lease_id,
            outcome=outcome,
            observed_ttft_s=observed_ttft_s,
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens,
            cached_prompt_tokens=cached_prompt_tokens,
        )

    def progress(self, event: ProgressEvent) -> Awaitable[bool]:
        """A milestone report; nothing once the request is complete."""
        if event == "prefill_fell_back":
            self._answer = replace(self._answer, prefill_endpoint=None)
        if self._completed or self._reports is None:
            return NOTHING_TO_REPORT
        return self._reports.progress(lease_id=self._answer.lease_id, event=event)

    def __repr__(self) -> str:
        state = "done" if self._completed else "open"
        return f"Placement({self._answer.endpoint.id}, lease={self._answer.lease_id!r}, {state})"


# -- admin ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EndpointStatus:
    """One endpoint as ListEndpoints reports it."""

    endpoint: Endpoint
    routable: bool
    load: LoadSnapshot


@dataclass(frozen=True, slots=True)
class DrainResult:
    drained: bool
    remaining_in_flight: int


# -- live migration: orders to the router that holds a stream -------------------------------


class Trigger(enum.StrEnum):
    """Why a running request migrates (a metric label)."""

    DRAIN = "drain"
    IMBALANCE = "imbalance"


@dataclass(frozen=True, slots=True)
class MigrationOrder:
    """Move the stream of `lease_id` from `source` to `target` within `deadline_s`."""

    migration_id: str
    lease_id: str
    request_id: str
    source: Endpoint
    target: Endpoint
    trigger: Trigger
    deadline_s: float


@dataclass(frozen=True, slots=True)
class MigrationReport:
    """What became of an order; `produced_tokens` and `pause_s` when it committed."""

    migration_id: str
    lease_id: str
    committed: bool
    reason: str = ""
    produced_tokens: int = 0
    pause_s: float = 0.0


# A router that does not hold the lease answers with this reason; only when every watcher
# said so is the order settled as not held (several routers may watch one scheduler).
NOT_HELD_REASON: Final = "not held by this router"
# The stream ended (or is ending) before the router could move it.
STREAM_FINISHING_REASON: Final = "stream finish"


class Scheduler(LeaseReports, Protocol):
    """What a front end asks of the scheduler, in-process or over gRPC."""

    async def pick(self, query: PickQuery, *, timeout_s: float | None = None) -> Placement:
        """Choose an endpoint and open a lease; `timeout_s` bounds any hold of the answer.
        Raises `InvalidPickError`, `UnknownModelError`, `NoEndpointError` or
        `SchedulerUnreachableError`."""
        ...

    async def cancel(self, *, pick_id: str) -> bool:
        """The caller gave up on the Pick with this `pick_id` (its deadline passed, it went
        away): close the lease it opened, or refuse that Pick if it has not arrived yet.
        True when a lease was closed."""
        ...

    async def renew(self, *, lease_ids: Sequence[str]) -> int:
        """The caller still holds these leases: their time-to-live starts again. How many the
        scheduler still knew."""
        ...

    async def list_endpoints(self, *, model: str = "") -> list[EndpointStatus]: ...

    async def explain(
        self, *, limit: int = DEFAULT_EXPLAIN_LIMIT, request_id: str = ""
    ) -> list[DecisionRecord]:
        """Newest decisions first, `decided_at` in Unix seconds."""
        ...

    async def drain(self, *, endpoint_id: str, timeout_s: float = 0.0) -> DrainResult:
        """Take the endpoint out of routing; wait up to `timeout_s` for its leases to close."""
        ...

    async def undrain(self, *, endpoint_id: str) -> bool:
        """Put a draining endpoint back into routing; False when it was not draining. Raises
        `UnknownEndpointError` for an endpoint the scheduler does not know."""
        ...

    def watch_migrations(self, *, watcher: str = "") -> AsyncIterator[MigrationOrder]:
        """Migration orders as the scheduler issues them, until the caller stops iterating;
        raises `MigrationOffError` when the scheduler runs without migration."""
        ...

    async def report_migration(self, report: MigrationReport) -> bool:
        """A router's answer to an order; False when the order is unknown."""
        ...

    async def close(self) -> None: ...


__all__ = [
    "DEFAULT_EXPLAIN_LIMIT",
    "NOT_HELD_REASON",
    "OUTCOMES",
    "PROGRESS_EVENTS",
    "STREAM_FINISHING_REASON",
    "DecisionRecord",
    "DrainResult",
    "Endpoint",
    "EndpointStatus",
    "InvalidPickError",
    "LeaseReports",
    "LoadSnapshot",
    "MigrationOffError",
    "MigrationOrder",
    "MigrationReport",
    "NoEndpointError",
    "Outcome",
    "PickAnswer",
    "PickQuery",
    "Placement",
    "ProgressEvent",
    "Scheduler",
    "SchedulerUnreachableError",
    "Trigger",
    "UnknownEndpointError",
    "UnknownModelError",
]
