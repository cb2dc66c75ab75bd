"""The scheduler's request and answer shapes, shared by the in-process `SchedulerService`, the
gRPC servicer and `SchedulerClient`, so a router can switch between embedded and remote
scheduling without changing a line of its request path.

Errors are typed so that each maps to one gRPC status (and back again in the client):

| error                 | gRPC status        | meaning                                         |
|-----------------------|--------------------|-------------------------------------------------|
| `InvalidPickError`    | INVALID_ARGUMENT   | the request itself is wrong (empty prompt, ...) |
| `UnknownModelError`   | NOT_FOUND          | no endpoint of the pool serves that model       |
| `NoEndpointError`     | UNAVAILABLE        | nothing routable left (empty pool, all excluded)|
| `UnknownEndpointError`| NOT_FOUND          | Drain named an endpoint the scheduler lacks     |
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from twinroute.scheduler.types import DecisionReason, Endpoint, LoadSnapshot, NoEndpointError

Outcome = Literal["success", "engine_error", "stream_error", "cancelled", "timeout"]
OUTCOMES: tuple[Outcome, ...] = ("success", "engine_error", "stream_error", "cancelled", "timeout")

# Milestones of a placed request the router reports between Pick and Complete (`Progress`).
ProgressEvent = Literal["prefill_done", "first_token", "prefill_fell_back"]
PROGRESS_EVENTS: tuple[ProgressEvent, ...] = ("prefill_done", "first_token", "prefill_fell_back")

# Trailing metadata key naming which error a non-OK status stands for, so the client never has
# to guess from the message (UNAVAILABLE also means "cannot connect").
ERROR_KIND_METADATA = "twinroute-error"


class InvalidPickError(ValueError):
    """The request cannot be scheduled as given (empty prompt, missing model, bad field)."""


class UnknownModelError(LookupError):
    """No endpoint of the pool serves the requested model."""


class UnknownEndpointError(LookupError):
    """The endpoint id is not one the scheduler knows."""


@dataclass(frozen=True, slots=True)
class PickQuery:
    """One request to place. Give `token_ids` when the caller has them (exact prefix keys),
    otherwise `text` (keys over characters; `prompt_tokens` then carries the caller's token
    count, 0 = estimate from the length)."""

    request_id: str
    model: str
    token_ids: Sequence[int] | npt.NDArray[np.integer] | None = None
    text: str | None = None
    session_id: str = ""
    lora_adapter: str = ""
    cache_salt: str = ""
    expected_output_tokens: int = 0
    # 0 = the scheduler's default SLO.
    ttft_slo_s: float = 0.0
    prompt_tokens: int = 0
    exclude_endpoints: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class PickAnswer:
    """Where the request goes and why. Exactly one `complete(lease_id=...)` must follow."""

    endpoint: Endpoint
    lease_id: str
    reason: DecisionReason
    policy: str
    predicted_ttft_s: float = 0.0
    expected_cached_blocks: int = 0
    prefill_endpoint: Endpoint | None = None


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


__all__ = [
    "ERROR_KIND_METADATA",
    "OUTCOMES",
    "DrainResult",
    "EndpointStatus",
    "InvalidPickError",
    "NoEndpointError",
    "Outcome",
    "PickAnswer",
    "PickQuery",
    "UnknownEndpointError",
    "UnknownModelError",
]
