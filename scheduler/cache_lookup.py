"""How many of a prompt's blocks each endpoint holds: from the engine's own KV events when they
can be trusted, from the scheduler's approximate record otherwise.

`CacheLookup` is the `PrefixIndexView` every decision reads (`ClusterView.prefix_index`) once a
scheduler subscribes to the engines' KV events (`scheduler/kv_events.py`). For a prompt whose
vLLM block hashes are known (`PromptKeys.engine_hashes`: the caller sent token ids and the
scheduler hashed them as the engines do, `scheduler/vllm_blocks.py`) and an endpoint whose
event stream is live, the answer is exact: the leading blocks the engine holds, converted from
engine blocks to key blocks (floor: a key block counts only when all its tokens are held). For
any other prompt (text, or a chat the engine renders with a template we do not) or endpoint
(events unknown, a silent publisher) it is the approximate prefix index's guess, exactly as
without events. An engine whose stream has a gap (the usual case for a scheduler that starts,
or restarts, beside engines already running: it hears them mid-stream) answers in part: the
blocks its events since then show it holding are held; the next block is absent if its events
said so (evicted); otherwise older history is unknown and the approximate guess, if deeper,
stands ("partial"). As the engine's cache turns over, more of every answer comes from events.
Every answer for one endpoint is counted by kind (`lookups`), so the metrics say how much
routing ran on facts.

Cost: one binary search over the prompt's engine hashes per (request, endpoint) on top of the
approximate lookup it replaces; `holders` checks every endpoint with events (O(endpoints x
log blocks)), which only the policies that consult all endpoints call.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping

from twinroute.scheduler.kv_events import KvEventIndex
from twinroute.scheduler.prefix_index import PrefixIndex
from twinroute.scheduler.types import PromptKeys

PRECISE = "precise"
PARTIAL = "partial"
APPROXIMATE = "approximate"


class CacheLookup:
    """Implements `PrefixIndexView` over the KV-event index with the approximate fallback."""

    def __init__(self, *, approximate: PrefixIndex, events: KvEventIndex) -> None:
        self.approximate = approximate
        self.events = events
        self.lookups: collections.Counter[str] = collections.Counter()
        # How the approximate record compared with the engine's own answer on the endpoint
        # each request went to (`compare`): how wrong routing would have been without events.
        self.agreement: collections.Counter[str] = collections.Counter()
        self.disagreement_tokens = 0

    def compare(self, endpoint_id: str, keys: PromptKeys, *, prompt_tokens: int) -> None:
        """Count how the approximate record's guess for `endpoint_id` compares with the
        engine's events ("same", "over": it believed more cached, "under": less); nothing when
        the engine cannot say."""
        precise = self.precise_blocks(endpoint_id, keys)
        if precise is None:
            return
        guessed = self.approximate.matched_blocks(endpoint_id, keys)
        verdict = "same" if guessed == precise else ("over" if guessed > precise else "under")
        self.agreement[verdict] += 1
        self.disagreement_tokens += abs(
            keys.prefix_tokens(guessed, prompt_tokens=prompt_tokens)
            - keys.prefix_tokens(precise, prompt_tokens=prompt_tokens)
        )

    def precise_blocks(self, endpoint_id: str, keys: PromptKeys) -> int | None:
        """Key blocks the endpoint's engine says it holds, or None when it cannot say."""
        hashes = keys.engine_hashes
        if not hashes:
            return None
        held = self.events.precise_matched_blocks(endpoint_id, hashes)
        if held is None:
            return None
        return min(keys.num_blocks, held * keys.engine_block_size // keys.block_size)

    def matched_blocks(self, endpoint_id: str, keys: PromptKeys) -> int:
        precise = self.precise_blocks(endpoint_id, keys)
        if precise is not None:
            self.lookups[PRECISE] += 1
            return precise
        partial = self.partial_blocks(endpoint_id, keys)
        if partial is not None:
            self.lookups[PARTIAL] += 1
            return partial
        self.lookups[APPROXIMATE] += 1
        return self.approximate.matched_blocks(endpoint_id, keys)

    def partial_blocks(self, endpoint_id: str, keys: PromptKeys) -> int | None:
        """The answer for an engine whose events have a gap (module docstring), or None."""
        hashes = keys.engine_hashes
        if not hashes:
            return None
        answer = self.events.partial_answer(endpoint_id, hashes)
        if answer is None:
            return None
        held, next_absent = answer
        known = min(keys.num_blocks, held * keys.engine_block_size // keys.block_size)
        if next_absent:
            return known
        return max(known, self.approximate.matched_blocks(endpoint_id, keys))

    def holders(self, keys: PromptKeys) -> Mapping[str, int]:
        guessed = dict(self.approximate.holders(keys))
        if not keys.engine_hashes:
            return guessed
        for endpoint_id in self.events.endpoints():
            precise = self.precise_blocks(endpoint_id, keys)
            if precise is None:
                precise = self.partial_blocks(endpoint_id, keys)
            if precise is None:
                continue
            if precise > 0:
                guessed[endpoint_id] = precise
            else:
                guessed.pop(endpoint_id, None)
        return guessed
