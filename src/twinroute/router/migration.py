"""Recompute migration of running streams (stock vLLM cannot move KV between instances).

The scheduler decides what moves (`twinroute.scheduler.migration.Migrator`: every stream of a
draining endpoint, or a short one off an endpoint persistently more loaded than another) and
sends an order; the router holding the stream's lease carries it out:

1. The stream is relayed through a `SplicedStream`, which hands the relay complete SSE events
   only, counting the output chunks (one token each, vLLM's default) and keeping their text.
2. On an order, at an event boundary, the rest is requested from the target: completions with
   prompt + text generated so far; chat with the conversation plus the partial assistant
   message and `continue_final_message: true, add_generation_prompt: false` (vLLM's flags for
   continuing the final message); `max_tokens` = what is left of the budget, or none when the
   client set none (chat: the engine answers until the model ends the message). The source is not
   read meanwhile (its tokens wait in the socket).
3. Target answers 200: the source connection is closed (vLLM aborts a request whose client
   left, freeing its KV), and the target's events follow, rewritten to the first response's
   `id`, `created` and `model`; chat's opening role-only chunk is dropped; a usage chunk counts
   the tokens of both legs (completion tokens summed, prompt tokens the client's). `[DONE]`
   comes once, from the last leg. The target refuses or cannot be reached: the stream simply
   goes on from the source, nothing lost.
4. At the first target token the router reports to the scheduler (committed, tokens produced
   at the splice, the pause the client saw: last source token to first target token); the
   scheduler then moves the lease to the target under the same id, so the router's Complete
   closes it there and Drain sees the source empty. Orders for leases this router does not hold
   are answered "not held" (several routers may watch one scheduler).

Not migrated (the order is answered with the reason, and counted by why): token-id prompts
(no text to extend), `n` > 1, streams already finishing, and requests a continuation cannot
resume faithfully (`not_resumable`): a grammar or schema (`response_format`, `guided_*`,
`structured_outputs`, tools) would restart mid-output, a stop string could straddle the splice,
and echo, logprobs, `min_tokens`, `best_of`, `suffix` and repetition penalties depend on what
came before it. Such a stream finishes where it is. Non-streamed requests are never migrated.

Orders come from the scheduler's API (`Scheduler.watch_migrations`, answered with
`report_migration`): over gRPC (`WatchMigrations`, admin token) or, with `--embedded`, straight
from the in-process scheduler.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Histogram

from twinroute.openai_format import ParsedRequest
from twinroute.scheduler.api import (
    NOT_HELD_REASON,
    STREAM_FINISHING_REASON,
    MigrationOrder,
    MigrationReport,
    Scheduler,
)

logger = logging.getLogger(__name__)

CONTINUATION_START_TIMEOUT_S = 30.0


class _ReadsAny(Protocol):
    async def readany(self) -> bytes: ...


class EngineStream(Protocol):
    """A streamed engine answer: the router's first leg, or an aiohttp continuation."""

    @property
    def content(self) -> _ReadsAny: ...

    def close(self) -> None: ...


class RouterMigrationMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.migrations = Counter(
            "twinroute_router_migrations",
            "Migration orders answered, by trigger and result (committed, refused, not_held).",
            ["trigger", "result"],
            registry=registry,
        )
        self.refusals = Counter(
            "twinroute_router_migration_refusals",
            "Migration orders refused, by why (not_resumable, finishing, no_budget, "
            "target_unreachable, target_refused, source_mismatch).",
            ["why"],
            registry=registry,
        )
        self.pause_seconds = Histogram(
            "twinroute_router_migration_pause_seconds",
            "Pause the client saw at a splice: last source token to first target token.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=registry,
        )


# Request fields a continuation cannot honour (module docstring), with the values that mean
# "not used" (those are resumable).
_NOT_RESUMABLE: dict[str, tuple[Any, ...]] = {
    "echo": (False,),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "prompt_logprobs": (),
    "response_format": ({"type": "text"},),
    "guided_json": (),
    "guided_regex": (),
    "guided_choice": (),
    "guided_grammar": (),
    "structured_outputs": (),
    "tools": ((), []),
    "tool_choice": ("none",),
    "functions": ((), []),
    "function_call": ("none",),
    "stop": ((), [], ""),
    "stop_token_ids": ((), []),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "repetition_penalty": (1, 1.0),
    "min_tokens": (0,),
    "best_of": (1,),
    "suffix": ("",),
}


def not_resumable(parsed: ParsedRequest) -> str | None:
    """The first field of the request that a continuation cannot honour, or None."""
    body = parsed.body
    for field, unused in _NOT_RESUMABLE.items():
        value = body.get(field)
        if value is not None and value not in unused:
            return field
    return None


def continuation_body(
    parsed: ParsedRequest, *, generated: str, remaining: int | None
) -> dict[str, Any] | None:
    """The request that continues `parsed` after `generated`, or None when it cannot be;
    `remaining` None: the client set no budget, and the continuation sets none either."""
    body = dict(parsed.body)
    if body.get("n", 1) not in (1, None):
        return None
    body.pop("max_completion_tokens", None)
    if remaining is None:
        body.pop("max_tokens", None)
    else:
        body["max_tokens"] = remaining
    if not generated:
        return body
    if parsed.kind == "completions":
        if parsed.prompt_text is None:
            return None
        body["prompt"] = parsed.prompt_text + generated
        return body
    messages = [dict(m) for m in body["messages"]]
    if body.get("continue_final_message") is True and messages:
        last = messages[-1]
        content = last.get("content")
        if not isinstance(content, str):
            return None
        last["content"] = content + generated
    else:
        messages.append({"role": "assistant", "content": generated})
    body["messages"] = messages
    body["continue_final_message"] = True
    body["add_generation_prompt"] = False
    return body


class _Slot:
    """One relayed stream's mailbox for orders, and the endpoint it runs on now."""

    __slots__ = ("endpoint_id", "orders")

    def __init__(self, endpoint_id: str) -> None:
        self.endpoint_id = endpoint_id
        self.orders: asyncio.Queue[MigrationOrder] = asyncio.Queue()


class MigrationCoordinator:
    """Subscribes to migration orders and hands each to the stream holding its lease."""

    def __init__(
        self,
        *,
        scheduler: Scheduler,
        registry: CollectorRegistry,
        clock: Callable[[], float] = time.monotonic,
        retry_s: float = 1.0,
        watcher: str = "router",
    ) -> None:
        self._scheduler = scheduler
        self._watcher = watcher
        self.metrics = RouterMigrationMetrics(registry)
        self._clock = clock
        self._retry_s = retry_s
        self._streams: dict[str, _Slot] = {}
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.subscribed = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="migration-feed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def _run(self) -> None:
        delay = self._retry_s
        while True:
            try:
                orders = self._scheduler.watch_migrations(watcher=self._watcher)
                self.subscribed.set()
                async for order in orders:
                    delay = self._retry_s
                    self._dispatch(order)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the scheduler restarts, the connection drops
                logger.warning("migration orders: %s; resubscribing in %.1fs", error, delay)
            self.subscribed.clear()
            await asyncio.sleep(delay)
            # A scheduler with migration off refuses every time: back off, do not spin.
            delay = min(30.0, delay * 2)

    def _dispatch(self, order: MigrationOrder) -> None:
        slot = self._streams.get(order.lease_id)
        if slot is None:
            self.answer(order, committed=False, reason=NOT_HELD_REASON)
            return
        if order.source.id != slot.endpoint_id:
            # The lease id matches but the stream is elsewhere (an order of another scheduler,
            # or one overtaken by a move): moving it would splice the wrong stream.
            self.answer(
                order,
                committed=False,
                reason=f"source mismatch: the stream runs on {slot.endpoint_id}, "
                f"not {order.source.id}",
                why="source_mismatch",
            )
            return
        slot.orders.put_nowait(order)

    def answer(
        self,
        order: MigrationOrder,
        *,
        committed: bool,
        reason: str = "",
        why: str = "",
        produced_tokens: int = 0,
        pause_s: float = 0.0,
    ) -> None:
        """Report an order's outcome in the background (the stream does not wait for it);
        `why` is the refusal's kind, a bounded metric label."""
        result = "committed" if committed else (
            "not_held" if reason == NOT_HELD_REASON else "refused"
        )  # fmt: skip
        self.metrics.migrations.labels(order.trigger.value, result).inc()
        if committed:
            self.metrics.pause_seconds.observe(pause_s)
            logger.info("migrated lease %s from %s to %s (%d tokens, paused %.3fs)",
                        order.lease_id, order.source.id, order.target.id, produced_tokens,
                        pause_s)  # fmt: skip
        elif result == "refused":
            self.metrics.refusals.labels(why or "other").inc()
            logger.info("migration of lease %s not done: %s", order.lease_id, why or "other")
            logger.debug("migration of lease %s not done: %s", order.lease_id, reason)
        report = MigrationReport(
            migration_id=order.migration_id,
            lease_id=order.lease_id,
            committed=committed,
            reason=reason,
            produced_tokens=produced_tokens,
            pause_s=pause_s,
        )

        async def send() -> None:
            try:
                await self._scheduler.report_migration(report)
            except Exception as error:
                logger.warning("could not report migration %s: %s", order.migration_id, error)

        task = asyncio.get_running_loop().create_task(send())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def splice(
        self,
        *,
        session: aiohttp.ClientSession,
        upstream: EngineStream,
        path: str,
        parsed: ParsedRequest,
        lease_id: str,
        endpoint_id: str,
    ) -> SplicedStream:
        """The relay's content source for one streamed response (`readany()` like aiohttp's);
        `endpoint_id` is where it runs (orders must name it as their source)."""
        slot = _Slot(endpoint_id)
        if lease_id:
            self._streams[lease_id] = slot
        return SplicedStream(
            coordinator=self,
            slot=slot,
            session=session,
            upstream=upstream,
            path=path,
            parsed=parsed,
            lease_id=lease_id,
        )

    def release(self, lease_id: str, slot: _Slot) -> None:
        if self._streams.get(lease_id) is slot:
            del self._streams[lease_id]
        while not slot.orders.empty():
            order = slot.orders.get_nowait()
            self.answer(
                order, committed=False, reason=f"{STREAM_FINISHING_REASON}ed", why="finishing"
            )

    def now(self) -> float:
        return self._clock()


class SplicedStream:
    """One streamed response, possibly continued on other engines; see the module docstring."""

    def __init__(
        self,
        *,
        coordinator: MigrationCoordinator,
        slot: _Slot,
        session: aiohttp.ClientSession,
        upstream: EngineStream,
        path: str,
        parsed: ParsedRequest,
        lease_id: str,
    ) -> None:
        self._coordinator = coordinator
        self._slot = slot
        self._session = session
        self._upstream: EngineStream = upstream
        self._path = path
        self._parsed = parsed
        self._lease_id = lease_id
        self._chat = parsed.kind == "chat"
        self._buffer = b""
        self._out: collections.deque[bytes] = collections.deque()
        self._read: asyncio.Task[bytes] | None = None
        self._order: asyncio.Task[MigrationOrder] | None = None
        self._ended = False
        self._closed = False
        # What the client has been sent.
        self._identity: tuple[Any, Any, Any] | None = None
        self._produced = 0
        self._generated: list[str] = []
        self._finishing = False
        self._last_token_at = coordinator.now()
        # Current leg: 0 = the first engine (passed through byte for byte).
        self._leg = 0
        self._leg_offset = 0
        self._awaiting_first: MigrationOrder | None = None
        self._spliced_from = 0.0
        self._legs: list[aiohttp.ClientResponse] = []

    @property
    def produced(self) -> int:
        return self._produced

    async def readany(self) -> bytes:
        try:
            while not self._out:
                if self._ended:
                    self.close()
                    return b""
                await self._step()
            data = b"".join(self._out)
            self._out.clear()
            return data
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in (self._read, self._order):
            if task is not None:
                task.cancel()
        for leg in self._legs:
            leg.close()
        if self._awaiting_first is not None:
            # The target ended without a token: the move happened all the same.
            self._report_committed(self._awaiting_first)
        self._coordinator.release(self._lease_id, self._slot)

    async def _step(self) -> None:
        if self._read is None:
            self._read = asyncio.ensure_future(self._upstream.content.readany())
        waits: set[asyncio.Future[Any]] = {self._read}
        if not self._finishing:
            if self._order is None:
                self._order = asyncio.ensure_future(self._slot.orders.get())
            waits.add(self._order)
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if self._read in done:
            read, self._read = self._read, None
            data = read.result()
            if not data:
                if self._buffer.strip():
                    self._emit(self._buffer)
                self._buffer = b""
                self._ended = True
                return
            self._feed(data)
        elif self._order is not None and self._order in done:
            order_task, self._order = self._order, None
            await self._migrate(order_task.result())

    def _feed(self, data: bytes) -> None:
        buffer = self._buffer + data
        start = 0
        while (end := buffer.find(b"\n\n", start)) >= 0:
            self._emit(buffer[start : end + 2])
            start = end + 2
        self._buffer = buffer[start:]

    def _emit(self, raw: bytes) -> None:
        event = self._event(raw)
        if event:
            self._out.append(event)

    def _event(self, raw: bytes) -> bytes | None:
        line = raw.strip()
        if not line.startswith(b"data:"):
            return raw
        data = line[5:].strip()
        if data == b"[DONE]":
            self._finishing = True
            return raw
        try:
            payload = json.loads(data)
        except ValueError:
            return raw
        if not isinstance(payload, dict):
            return raw
        if "error" in payload:
            self._finishing = True
            return raw
        if self._identity is None:
            self._identity = (payload.get("id"), payload.get("created"), payload.get("model"))
        choices = payload.get("choices") or []
        text = ""
        role_only = False
        if choices and isinstance(choices[0], dict):
            choice = choices[0]
            if choice.get("finish_reason") is not None:
                self._finishing = True
            if self._chat:
                delta = choice.get("delta") or {}
                text = delta.get("content") or ""
                role_only = "role" in delta and not text and choice.get("finish_reason") is None
            else:
                text = choice.get("text") or ""
        if text:
            self._produced += 1
            self._generated.append(text)
            now = self._coordinator.now()
            if self._awaiting_first is not None:
                order, self._awaiting_first = self._awaiting_first, None
                self._report_committed(order, pause_s=now - self._spliced_from)
            self._last_token_at = now
        if self._leg == 0:
            return raw
        if role_only:
            return None
        identity = self._identity
        payload["id"], payload["created"], payload["model"] = identity
        usage = payload.get("usage")
        if isinstance(usage, dict):
            if not self._parsed.include_usage:
                if not choices:
                    return None
                payload.pop("usage")
            else:
                offset = self._leg_offset
                prompt = max(0, int(usage.get("prompt_tokens", 0)) - offset)
                completion = int(usage.get("completion_tokens", 0)) + offset
                usage.update(
                    prompt_tokens=prompt,
                    completion_tokens=completion,
                    total_tokens=prompt + completion,
                )
        return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

    def _report_committed(self, order: MigrationOrder, *, pause_s: float = 0.0) -> None:
        self._awaiting_first = None
        self._coordinator.answer(
            order, committed=True, produced_tokens=self._leg_offset, pause_s=pause_s
        )

    async def _migrate(self, order: MigrationOrder) -> None:
        coordinator = self._coordinator
        if self._finishing:
            coordinator.answer(
                order, committed=False, reason=f"{STREAM_FINISHING_REASON}ing", why="finishing"
            )
            return
        field = not_resumable(self._parsed)
        if field is not None:
            coordinator.answer(
                order, committed=False, reason=f"not resumable: the request uses {field}",
                why="not_resumable",
            )  # fmt: skip
            return
        budget = self._parsed.max_tokens
        # No budget (a chat request without max_tokens): the target, like the source, answers
        # until the model ends the message.
        remaining = None if budget is None else budget - self._produced
        if remaining is not None and remaining <= 0:
            coordinator.answer(
                order, committed=False, reason="no tokens left to produce", why="no_budget"
            )
            return
        body = continuation_body(
            self._parsed, generated="".join(self._generated), remaining=remaining
        )
        if body is None:
            coordinator.answer(
                order,
                committed=False,
                reason="cannot continue this request (token ids or n>1)",
                why="not_resumable",
            )
            return
        url = f"http://{order.target.address}{self._path}"
        try:
            # A stream's headers come before its first token: a target this slow to take it
            # is not one to move to.
            async with asyncio.timeout(CONTINUATION_START_TIMEOUT_S):
                response = await self._session.post(
                    url, data=json.dumps(body), headers={"Content-Type": "application/json"}
                )
        except (TimeoutError, aiohttp.ClientError, OSError) as error:
            coordinator.answer(
                order,
                committed=False,
                reason=f"target unreachable: {type(error).__name__}",
                why="target_unreachable",
            )
            return
        if response.status != 200:
            # What the engine said may quote the prompt: logs at DEBUG only, never in the
            # report (the scheduler logs reports at INFO).
            detail = (await response.read())[:200].decode(errors="replace")
            response.release()
            logger.debug("target %s refused a continuation: %s", order.target.id, detail)
            coordinator.answer(
                order,
                committed=False,
                reason=f"target refused: HTTP {response.status}",
                why="target_refused",
            )
            return
        # Committed: stop the source (its socket closes; the engine aborts the request).
        if self._read is not None:
            self._read.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                await self._read
            self._read = None
        self._upstream.close()
        self._upstream = response
        self._slot.endpoint_id = order.target.id
        self._legs.append(response)
        self._buffer = b""
        self._leg += 1
        self._leg_offset = self._produced
        self._spliced_from = self._last_token_at
        self._awaiting_first = order
