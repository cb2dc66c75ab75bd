"""The scheduler's bearer-token check, shared by its gRPC edge and its HTTP debug page.

A pool's scheduler, router and operator share one token (a mounted Secret). With it set, every
call but health checks must carry `authorization: Bearer <token>`; a refusal is counted and
logged, at most one line per call and reason a minute, so a flood of refused calls cannot flood
the log. Comparison is constant-time.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

REFUSAL_LOG_INTERVAL_S = 60.0

Refusal = str  # "missing_token" or "wrong_token"


class TokenGuard:
    def __init__(
        self,
        token: str | None,
        *,
        count: Callable[[str, Refusal], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._token = token.encode() if token else b""
        self._count = count
        self._clock = clock
        self._logged: dict[tuple[str, Refusal], float] = {}

    @property
    def required(self) -> bool:
        return bool(self._token)

    def refusal(self, header: str) -> Refusal | None:
        """None when `header` (an `authorization` value) carries the token, else why not."""
        if not self._token:
            return None
        if not header:
            return "missing_token"
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self._token
        ):
            return "wrong_token"
        return None

    def refused(self, call: str, why: Refusal, *, peer: str) -> None:
        """Count and (rate-limited) log one refused call."""
        if self._count is not None:
            self._count(call, why)
        now = self._clock()
        last = self._logged.get((call, why))
        if last is None or now - last >= REFUSAL_LOG_INTERVAL_S:
            self._logged[(call, why)] = now
            logger.warning("refused %s from %s: %s", call, peer, why.replace("_", " "))
