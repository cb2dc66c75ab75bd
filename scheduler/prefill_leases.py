"""`PrefillLeases`: the prefill half of disaggregated picks.

A disaggregated pick opens two leases: one on the decode endpoint (its id is the pick's lease
id, what the router completes) and one on the prefill endpoint, carrying the prompt's uncached
tokens there until the prefill is done. This table pairs them and closes the prefill lease at
the right moment:

- `done` (the router's `prefill_done` report, or the decode side's first token): the prefill
  finished, which also settles the prefill queued before it there (FIFO);
- `fell_back` (the prefill hop failed and the decode endpoint prefills itself): the prefill
  lease closes without settling anything there (that endpoint did no work for it), and the
  decode lease is reopened, same id and opening time, carrying the tokens the decode endpoint
  lacks, queued behind what it already has;
- `close` with the decode lease (Complete, expiry, the endpoint leaving): `done` only for a
  successful request; a failed one proves nothing about the prefills queued before it.

Cost: O(1) per report.
"""

from __future__ import annotations

from twinroute.scheduler.leases import LeaseTable


class PrefillLeases:
    def __init__(self, leases: LeaseTable) -> None:
        self._leases = leases
        # Decode lease id -> its prefill lease id.
        self._prefill_of: dict[str, str] = {}
        # Decode lease id -> the tokens the decode endpoint prefills if the hop falls back.
        self._fallback_tokens: dict[str, int] = {}

    def pair(self, decode_lease_id: str, prefill_lease_id: str, *, fallback_tokens: int) -> None:
        self._prefill_of[decode_lease_id] = prefill_lease_id
        self._fallback_tokens[decode_lease_id] = fallback_tokens

    def endpoint_of(self, decode_lease_id: str) -> str | None:
        """The endpoint of a pick's prefill lease while it is open."""
        prefill_lease_id = self._prefill_of.get(decode_lease_id)
        prefill = self._leases.get(prefill_lease_id) if prefill_lease_id is not None else None
        return prefill.endpoint_id if prefill is not None else None

    def done(self, decode_lease_id: str, *, now: float) -> bool:
        """The prefill finished; False when the pick had no open prefill hop."""
        return self.close(decode_lease_id, now=now)

    def fell_back(self, decode_lease_id: str, *, now: float) -> bool:
        """The prefill hop failed (module docstring); False when there was none open."""
        prefill_lease_id = self._prefill_of.pop(decode_lease_id, None)
        fallback_tokens = self._fallback_tokens.pop(decode_lease_id, 0)
        if prefill_lease_id is None:
            return False
        leases = self._leases
        leases.close(prefill_lease_id, now=now)
        decode = leases.get(decode_lease_id)
        if decode is None or decode.first_token_at is not None or fallback_tokens <= 0:
            return True
        leases.close(decode_lease_id, now=now)
        leases.open(
            endpoint_id=decode.endpoint_id,
            request_id=decode.request_id,
            now=decode.opened_at,
            prompt_tokens=decode.prompt_tokens,
            uncached_tokens=fallback_tokens,
            predicted_ttft_s=decode.predicted_ttft_s,
            lease_id=decode_lease_id,
        )
        return True

    def close(self, decode_lease_id: str, *, now: float, done: bool = True) -> bool:
        """Close a pick's prefill lease; `done` also settles what was queued before it there."""
        prefill_lease_id = self._prefill_of.pop(decode_lease_id, None)
        self._fallback_tokens.pop(decode_lease_id, None)
        if prefill_lease_id is None:
            return False
        if done:
            self._leases.first_token(prefill_lease_id, now=now)
        return self._leases.close(prefill_lease_id, now=now) is not None
