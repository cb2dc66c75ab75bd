"""`SchedulerService`: the scheduler's API (`scheduler/api.py`) in-process, over one
`SchedulerCore`.

It is what the embedded router and the gRPC servicer (`scheduler/server.py`) both call, so both
paths behave the same: a Pick turns the query into prompt keys and a `RoutingRequest`, expires
stale leases now and then, asks the core, and may hold the answer (admission hold) before it
returns a `Placement`; Complete and Progress report on leases by id; Drain takes an endpoint out
of routing, moves what it can still withdraw and waits for the rest. All time comes from the
injected `clock` (monotonic seconds, the core's time) and `wall_clock` (Unix seconds, only for
reporting when a decision was made).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from twinroute.scheduler.admission import AdmissionQueue
from twinroute.scheduler.api import (
    DEFAULT_EXPLAIN_LIMIT,
    OUTCOMES,
    PROGRESS_EVENTS,
    DrainResult,
    EndpointStatus,
    InvalidPickError,
    MigrationOffError,
    MigrationOrder,
    MigrationReport,
    Outcome,
    PickAnswer,
    PickQuery,
    Placement,
    ProgressEvent,
    SettledReport,
    StaleMembershipError,
    UnknownEndpointError,
    UnknownModelError,
)
from twinroute.scheduler.core import MembershipChange, SchedulerCore
from twinroute.scheduler.keys import keys_from_text, keys_from_tokens, namespace_seed
from twinroute.scheduler.migration import Migrator
from twinroute.scheduler.settings import SchedulerSettings
from twinroute.scheduler.telemetry import SchedulerTelemetry
from twinroute.scheduler.types import (
    Decision,
    DecisionRecord,
    Endpoint,
    NoEndpointError,
    PromptKeys,
    RoutingRequest,
)
from twinroute.scheduler.vllm_block_memo import MemoizedBlockHasher

logger = logging.getLogger(__name__)

# Prompts of at least this many key blocks are hashed on a worker thread.
OFFLOAD_BLOCKS = 256
# Fallbacks a Pick names at most: DualMap's other candidate; more would spread one prefix's
# retries over the pool, where nothing of it is cached.
MAX_FALLBACKS = 1


class SchedulerService:
    """The `Scheduler` API over one `SchedulerCore` (module docstring).

    `settings` gives the prompt keys and the served models; the core was built from the same
    settings (`twinroute.scheduler.build`), so its policy holds the default SLO."""

    def __init__(
        self,
        *,
        core: SchedulerCore,
        settings: SchedulerSettings | None = None,
        telemetry: SchedulerTelemetry | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        expiry_interval_s: float = 1.0,
        admission: AdmissionQueue | None = None,
    ) -> None:
        self.core = core
        self.settings = settings if settings is not None else SchedulerSettings()
        self.telemetry = telemetry
        self._clock = clock
        self._wall_clock = wall_clock
        self._served_models = frozenset(self.settings.served_models)
        # With the engines' KV events followed: their own block hashes of each token-id
        # prompt, so the core can look the prompt up in what the engines say they hold.
        self.engine_hasher = (
            MemoizedBlockHasher(
                self.settings.engine_block_size or self.settings.key_block_tokens,
                seed=self.settings.engine_hash_seed,
            )
            if self.settings.follows_kv_events
            else None
        )
        self._expiry_interval_s = expiry_interval_s
        self._next_expiry = 0.0
        self._seeds: dict[tuple[str, str, str], int] = {}
        # Endpoints of other models, per model; rebuilt when the endpoint set changes.
        self._membership: dict[str, Endpoint] | None = None
        self._other_models: dict[str, frozenset[str]] = {}
        self._known_models: frozenset[str] = frozenset()
        self._with_model: frozenset[str] = frozenset()
        self._drain_waiters: dict[str, list[asyncio.Event]] = {}
        # Hotspot requests' answers held so they can still be moved (`scheduler/admission.py`).
        self.admission = admission
        # Drain's way to take back a request still queued on a leaving endpoint:
        # (lease_id, target) -> True when the request had not been sent to the engine yet and
        # will now go to `target` (an admission hold answers its Pick there). None: every
        # request is sent at Pick, so queued ones finish where they are.
        self.withdraw_queued: Callable[[str, str], bool] | None = None
        # Live migration of running requests (`scheduler/migration.py`); None = off.
        self.migrator: Migrator | None = None
        # The lease each recent Pick opened, by pick_id, and the Picks cancelled before they
        # came: what `cancel` needs. Bounded: a cancel comes within a Pick deadline or so.
        self._leases_of_picks: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._cancelled_picks: collections.OrderedDict[str, None] = collections.OrderedDict()

    def now(self) -> float:
        """The clock leases and loads are kept on (monotonic seconds)."""
        return self._clock()

    # -- membership (discovery feeds this) ------------------------------------------------

    def set_endpoints(self, endpoints: Sequence[Endpoint]) -> MembershipChange:
        change = self.core.set_endpoints(endpoints, now=self._clock())
        if self.core.replica is not None:
            self.core.replica.observe(self.core.endpoints.values(), wall_now=self._wall_clock())
        if change:
            logger.info(
                "membership: +%s -%s (%d endpoints)",
                sorted(change.added), sorted(change.removed), len(endpoints),
            )  # fmt: skip
            if self.telemetry is not None:
                self.telemetry.membership_changed(endpoints)
            for endpoint_id in change.removed:
                self._wake_drainers(endpoint_id)
        return change

    def _model_filter(self, model: str) -> frozenset[str]:
        """Ids of endpoints that do not serve `model`; raises UnknownModelError."""
        if self._membership is not self.core.endpoints:
            self._membership = self.core.endpoints
            by_model: dict[str, set[str]] = {}
            for endpoint in self._membership.values():
                by_model.setdefault(endpoint.model, set()).add(endpoint.id)
            # Endpoints that name no model serve whatever the pool serves.
            with_model = frozenset(e.id for e in self._membership.values() if e.model)
            self._with_model = with_model
            self._other_models = {m: with_model - ids for m, ids in by_model.items() if m}
            self._known_models = frozenset(self._other_models) | self._served_models
        if model in self._other_models:
            return self._other_models[model]
        if model in self._known_models or not self._known_models:
            return self._with_model
        raise UnknownModelError(
            f"model {model!r} is not served by this pool; known: {sorted(self._known_models)}"
        )

    # -- requests ---------------------------------------------------------------------------

    def _routing_request(
        self, query: PickQuery, *, prompt: tuple[PromptKeys, int] | None = None
    ) -> RoutingRequest:
        """`prompt`: the prompt's keys and length when already computed (`_prompt_keys`)."""
        keys, prompt_tokens = prompt if prompt is not None else self._prompt_keys(query)
        if query.ttft_slo_s is not None and query.ttft_slo_s <= 0:
            raise InvalidPickError("ttft_slo_s must be positive when given")
        if query.expected_output_tokens < 0:
            raise InvalidPickError("expected_output_tokens must not be negative")
        exclude = query.exclude_endpoints | self._model_filter(query.model)
        return RoutingRequest(
            request_id=query.request_id,
            keys=keys,
            prompt_tokens=prompt_tokens,
            session_id=query.session_id,
            expected_output_tokens=query.expected_output_tokens,
            ttft_slo_s=query.ttft_slo_s,
            exclude=exclude,
            reports_first_token=query.reports_first_token,
        )

    def _is_long(self, query: PickQuery) -> bool:
        """Long enough that hashing its keys costs more than a hop to a worker thread (about
        a millisecond: 256 blocks)."""
        if query.token_ids is not None:
            return len(query.token_ids) >= OFFLOAD_BLOCKS * self.settings.key_block_tokens
        return len(query.text or "") >= OFFLOAD_BLOCKS * self.settings.key_block_chars

    def _seed(self, query: PickQuery) -> int:
        seed_key = (query.model, query.lora_adapter, query.cache_salt)
        seed = self._seeds.get(seed_key)
        if seed is None:
            if len(self._seeds) > 4096:
                self._seeds.clear()
            seed = self._seeds[seed_key] = namespace_seed(
                model=query.model, lora_adapter=query.lora_adapter, cache_salt=query.cache_salt
            )
        return seed

    def _prompt_keys(self, query: PickQuery, *, seed: int | None = None) -> tuple[PromptKeys, int]:
        """The prompt's prefix keys and its length in tokens; raises `InvalidPickError`. Pure
        CPU work on its arguments (safe on a worker thread when `seed` is given)."""
        if not query.model:
            raise InvalidPickError("model is required")
        if seed is None:
            seed = self._seed(query)
        if query.token_ids is not None:
            prompt_tokens = len(query.token_ids)
            if prompt_tokens == 0:
                raise InvalidPickError("the prompt is empty (no token ids)")
            try:
                keys = keys_from_tokens(
                    query.token_ids, block_size=self.settings.key_block_tokens, seed=seed
                )
                hasher = self.engine_hasher
                # A LoRA adapter's blocks are keyed by its path on the engine: not computable;
                # nor are a chat's, whose tokens the engine makes with its own template.
                if hasher is not None and query.exact_engine_tokens and not query.lora_adapter:
                    salt = query.cache_salt or None
                    # The routing keys name the same prefixes when their blocks are the
                    # engine's: the hasher's memo looks them up rather than keying again.
                    names = keys.block_hashes if keys.block_size == hasher.block_size else None
                    hashes = hasher.block_hashes(query.token_ids, cache_salt=salt, names=names)
                    keys = dataclasses.replace(
                        keys, engine_hashes=tuple(hashes), engine_block_size=hasher.block_size
                    )
            except (TypeError, ValueError) as error:
                raise InvalidPickError(f"bad token ids: {error}") from None
        elif query.text:
            keys = keys_from_text(query.text, block_chars=self.settings.key_block_chars, seed=seed)
            prompt_tokens = query.prompt_tokens or max(
                1, round(len(query.text) * self.settings.tokens_per_char)
            )
        else:
            raise InvalidPickError("the prompt is empty (give token ids or text)")
        return keys, prompt_tokens

    def pick_now(
        self,
        query: PickQuery,
        *,
        prompt: tuple[PromptKeys, int] | None = None,
        behind_ok: bool = False,
    ) -> PickAnswer:
        """The decision of `pick`, synchronous (CPU work only), before any admission hold.
        `behind_ok`: a replica behind its peers' membership answers anyway (a caller that
        cannot ask another replica, such as Envoy through the picker)."""
        started = time.perf_counter()
        if query.pick_id and query.pick_id in self._cancelled_picks:
            self._refused("cancelled")
            raise InvalidPickError("this Pick was cancelled by its caller before it came")
        if self.core.replica is not None and not behind_ok:
            peer = self.core.replica.behind(now=self._clock())
            if peer is not None:
                self._refused("stale_membership")
                raise StaleMembershipError(
                    f"this replica's endpoint set is behind replica {peer.replica_id}'s; ask "
                    "another replica"
                )
        try:
            request = self._routing_request(query, prompt=prompt)
            now = self._clock()
            if now >= self._next_expiry:
                self.expire(now=now)
                self._next_expiry = now + self._expiry_interval_s
            result = self.core.pick(request, now=now)
        except InvalidPickError:
            self._refused("invalid")
            raise
        except UnknownModelError:
            self._refused("unknown_model")
            raise
        except NoEndpointError:
            self._refused("no_endpoint")
            raise
        decision = result.decision
        answer = PickAnswer(
            endpoint=result.endpoint,
            lease_id=result.lease_id,
            reason=decision.reason,
            policy=decision.policy,
            predicted_ttft_s=decision.predicted_ttft_s,
            expected_cached_blocks=decision.expected_cached_blocks,
            prefill_endpoint=result.prefill_endpoint,
            fallbacks=self._fallbacks(decision, exclude=request.exclude),
        )
        if query.pick_id:
            _remember(self._leases_of_picks, query.pick_id, answer.lease_id)
        if self.telemetry is not None:
            self.telemetry.observe_pick(time.perf_counter() - started)
        return answer

    def _fallbacks(self, decision: Decision, *, exclude: frozenset[str]) -> tuple[Endpoint, ...]:
        """The decision's other candidates that can still serve, best first, at most
        `MAX_FALLBACKS` (a disaggregated pick has none: its prefill hop is the router's)."""
        if decision.prefill_endpoint_id:
            return ()
        core = self.core
        fallbacks: list[Endpoint] = []
        for candidate in decision.candidates:
            if len(fallbacks) >= MAX_FALLBACKS:
                break
            endpoint_id = candidate.endpoint_id
            if endpoint_id == decision.endpoint_id or endpoint_id in exclude:
                continue
            endpoint = core.endpoints.get(endpoint_id)
            if endpoint is None or not core.is_routable(endpoint_id) or endpoint in fallbacks:
                continue
            fallbacks.append(endpoint)
        return tuple(fallbacks)

    async def pick(
        self, query: PickQuery, *, timeout_s: float | None = None, behind_ok: bool = False
    ) -> Placement:
        """Choose an endpoint and open a lease; raises the errors of `twinroute.scheduler.api`.

        With an admission queue, the answer of a request routed to a hotspot may be held
        (and moved) before it is returned, never past `timeout_s` (the caller's deadline).
        A long prompt's keys are hashed on a worker thread first (`offload_long_prompts`)."""
        prompt = None
        if self.settings.offload_long_prompts and query.model and self._is_long(query):
            try:
                prompt = await asyncio.to_thread(self._prompt_keys, query, seed=self._seed(query))
            except InvalidPickError:
                self._refused("invalid")
                raise
        answer = self.pick_now(query, prompt=prompt, behind_ok=behind_ok)
        if self.admission is not None:
            slo = query.ttft_slo_s or self.core.policy.config.ttft_slo_s
            deadline = None if timeout_s is None else self._clock() + timeout_s
            answer = await self.admission.admit(answer, slo_s=slo, deadline=deadline)
        return Placement(answer, reports=self)

    def _refused(self, kind: str) -> None:
        if self.telemetry is not None:
            self.telemetry.pick_refused(kind)

    def complete(
        self,
        *,
        lease_id: str,
        outcome: Outcome = "success",
        observed_ttft_s: float = 0.0,
        prompt_tokens: int = 0,
        output_tokens: int = 0,
        cached_prompt_tokens: int = 0,
    ) -> SettledReport:
        """Close a lease; False when it was unknown (already closed or expired). Made now, in
        this process: what comes back is settled (an error it met is raised when awaited)."""
        return SettledReport.of(
            lambda: self._close_lease(lease_id, outcome, observed_ttft_s, output_tokens)
        )

    def _close_lease(
        self, lease_id: str, outcome: Outcome, observed_ttft_s: float, output_tokens: int
    ) -> bool:
        if not lease_id:
            raise InvalidPickError("lease_id is required")
        if outcome not in OUTCOMES:
            raise InvalidPickError(f"unknown outcome {outcome!r}; choose from {OUTCOMES}")
        now = self._clock()
        observed = observed_ttft_s if observed_ttft_s > 0 else None
        lease = self.core.complete(
            lease_id,
            now=now,
            success=outcome == "success",
            observed_ttft_s=observed,
            output_tokens=output_tokens,
        )
        if self.telemetry is not None:
            self.telemetry.observe_complete(
                lease,
                outcome=outcome,
                observed_ttft_s=observed,
                foreign=lease is None and not self.core.leases.issued_here(lease_id),
            )
        if lease is not None:
            self._wake_drainers(lease.endpoint_id)
        return lease is not None

    def routable_endpoints(self) -> tuple[Endpoint, ...]:
        """The endpoints a Pick may choose now (known, healthy, not draining)."""
        return self.core.routable()

    def follow_fallback(self, *, lease_id: str, endpoint_id: str) -> bool:
        """A gateway served the request on `endpoint_id`, one of the pick's fallbacks, after
        its primary failed before answering: the lease follows, so load, the prefix record and
        Explain name the endpoint that really runs it. False when the lease is unknown, already
        past its first token, or the endpoint not routable."""
        if not lease_id:
            raise InvalidPickError("lease_id is required")
        return self.core.move(lease_id, target=endpoint_id, now=self._clock(), cause="fallback")

    async def cancel(self, *, pick_id: str) -> bool:
        """The caller gave up on a Pick: close the lease it opened (True), or, when it has
        not come yet, refuse it when it does (False)."""
        if not pick_id:
            raise InvalidPickError("pick_id is required")
        lease_id = self._leases_of_picks.pop(pick_id, None)
        closed = False
        if lease_id is None:
            _remember(self._cancelled_picks, pick_id, None)
        else:
            closed = await self.complete(lease_id=lease_id, outcome="cancelled")
            logger.info(
                "lease %s closed: its Pick %s was given up by its caller", lease_id, pick_id
            )
        if self.telemetry is not None:
            self.telemetry.observe_cancel(closed=closed)
        return closed

    def progress(self, *, lease_id: str, event: ProgressEvent) -> SettledReport:
        """A placed request reached a milestone (`_note_progress`), made now and settled."""
        return SettledReport.of(lambda: self._note_progress(lease_id, event))

    def _note_progress(self, lease_id: str, event: ProgressEvent) -> bool:
        """A placed request reached a milestone; False when the lease or event did not apply.

        `prefill_done` closes a disaggregated pick's prefill lease (the prefill instance's
        queue no longer holds it); `first_token` marks the request prefilled where it runs, so
        the queue ahead of later requests there, and the hotspot rebalancing that reads it,
        follow the engine instead of the lease model until Complete; `prefill_fell_back`
        (the prefill hop failed, the decode endpoint prefills itself) closes the prefill lease
        without crediting that instance and moves the prompt's prefill onto the decode lease.
        A Drain waiting on the prefill instance wakes when its share closes."""
        if not lease_id:
            raise InvalidPickError("lease_id is required")
        if event not in PROGRESS_EVENTS:
            raise InvalidPickError(f"unknown event {event!r}; choose from {PROGRESS_EVENTS}")
        now = self._clock()
        prefill_leases = self.core.prefill_leases
        prefill_endpoint = prefill_leases.endpoint_of(lease_id)
        if event == "prefill_done":
            known = prefill_leases.done(lease_id, now=now)
        elif event == "prefill_fell_back":
            known = prefill_leases.fell_back(lease_id, now=now)
        else:
            known = self.core.first_token(lease_id, now=now)
        if known and prefill_endpoint is not None:
            self._wake_drainers(prefill_endpoint)
        if self.telemetry is not None:
            self.telemetry.observe_progress(event, known=known)
        return known

    def expire(self, *, now: float | None = None) -> int:
        """Close leases past their TTL; returns how many."""
        expired = self.core.expire(self._clock() if now is None else now)
        for endpoint_id in {lease.endpoint_id for lease in expired}:
            self._wake_drainers(endpoint_id)
        if expired:
            logger.warning("%d lease(s) expired without Complete", len(expired))
        return len(expired)

    async def renew(self, *, lease_ids: Sequence[str]) -> int:
        return self.core.renew(lease_ids, now=self._clock())

    async def run_expiry(self) -> None:
        """Expire leases even while no Pick arrives; cancel to stop."""
        while True:
            self.expire()
            await asyncio.sleep(self._expiry_interval_s)

    # -- admin ------------------------------------------------------------------------------

    async def list_endpoints(self, *, model: str = "") -> list[EndpointStatus]:
        now = self._clock()
        routable = {endpoint.id for endpoint in self.core.routable()}
        return [
            EndpointStatus(
                endpoint=endpoint,
                routable=endpoint.id in routable,
                load=self.core.load(endpoint.id, now=now),
            )
            for endpoint_id, endpoint in sorted(self.core.endpoints.items())
            if not model or endpoint.model in (model, "")
        ]

    async def explain(
        self, *, limit: int = DEFAULT_EXPLAIN_LIMIT, request_id: str = ""
    ) -> list[DecisionRecord]:
        """Newest decisions first, `decided_at` in Unix seconds."""
        return self.recent_decisions(limit=limit, request_id=request_id)

    def recent_decisions(
        self, *, limit: int = DEFAULT_EXPLAIN_LIMIT, request_id: str = ""
    ) -> list[DecisionRecord]:
        """`explain`, synchronous (the metrics port's debug page reads it)."""
        offset = self._wall_clock() - self._clock()
        return [
            dataclasses.replace(record, decided_at=record.decided_at + offset)
            for record in self.core.history.recent(max(1, limit), request_id=request_id or None)
        ]

    async def drain(self, *, endpoint_id: str, timeout_s: float = 0.0) -> DrainResult:
        """Take the endpoint out of routing; wait up to `timeout_s` for its leases to close."""
        if not self.core.drain(endpoint_id):
            raise UnknownEndpointError(f"endpoint {endpoint_id!r} is not known to the scheduler")
        moved = self.move_queued_off(endpoint_id)
        if self.migrator is not None:
            self.migrator.start_drain(endpoint_id, timeout_s=timeout_s)
        logger.info(
            "draining %s (wait up to %.1fs); %d queued request(s) moved to their other candidate",
            endpoint_id, timeout_s, moved,
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout_s)
        while (remaining := self.core.in_flight(endpoint_id)) > 0:
            if endpoint_id not in self.core.draining:
                break  # undrained meanwhile: nothing to wait for
            left = deadline - loop.time()
            if left <= 0:
                break
            event = asyncio.Event()
            waiters = self._drain_waiters.setdefault(endpoint_id, [])
            waiters.append(event)
            try:
                await asyncio.wait_for(event.wait(), timeout=left)
            except TimeoutError:
                pass
            finally:
                if event in waiters:
                    waiters.remove(event)
        remaining = self.core.in_flight(endpoint_id)
        return DrainResult(drained=remaining == 0, remaining_in_flight=remaining)

    async def undrain(self, *, endpoint_id: str) -> bool:
        """Back into routing; a Drain waiting on it answers now (not drained)."""
        if endpoint_id not in self.core.endpoints:
            raise UnknownEndpointError(f"endpoint {endpoint_id!r} is not known to the scheduler")
        was_draining = endpoint_id in self.core.draining
        self.core.undrain(endpoint_id)
        if was_draining:
            logger.info("undrained %s: back in routing", endpoint_id)
            self._wake_drainers(endpoint_id)
        return was_draining

    def move_queued_off(self, endpoint_id: str) -> int:
        """Move the requests still queued on a draining endpoint that this scheduler can still
        withdraw (held by the admission hold, or taken back by `withdraw_queued`) to their
        other candidate; returns how many moved. Those already sent run there: running ones
        finish within the drain's wait (or a migration moves them)."""
        admission, withdraw = self.admission, self.withdraw_queued
        if admission is None and withdraw is None:
            return 0
        now = self._clock()
        moved = 0
        for move in self.core.moves.drain(endpoint_id, now=now):
            if admission is not None and admission.holds(move.lease_id):
                if self.core.move(
                    move.lease_id, target=move.target, now=now, cause="drain"
                ) and admission.answer_moved(move.lease_id, now=now):
                    moved += 1
            elif (
                withdraw is not None
                and withdraw(move.lease_id, move.target)
                and self.core.move(move.lease_id, target=move.target, now=now, cause="drain")
            ):
                moved += 1
        if moved:
            self._wake_drainers(endpoint_id)
        return moved

    # -- live migration ----------------------------------------------------------------------

    def attach_migrator(self, migrator: Migrator) -> None:
        """Turn on migration: Drain then migrates what runs on the endpoint within its wait,
        and routers can watch for orders (`WatchMigrations`)."""
        self.migrator = migrator
        migrator.on_lease_moved = self._wake_drainers

    async def watch_migrations(self, *, watcher: str = "") -> AsyncIterator[MigrationOrder]:
        """Migration orders as they are issued, until the caller stops iterating."""
        if self.migrator is None:
            raise MigrationOffError("migration is off in this scheduler (--migration)")
        logger.info("migration watcher %r subscribed", watcher or "?")
        async for order in self.migrator.orders.watch():
            yield order

    async def report_migration(self, report: MigrationReport) -> bool:
        """A router's answer to an order; False when the order is unknown (or migration off)."""
        if self.migrator is None:
            return False
        return self.migrator.orders.report(report)

    async def close(self) -> None:
        """Release held answers (the embedded router's shutdown; the gRPC server does the same
        at its graceful stop)."""
        if self.admission is not None:
            await self.admission.close()

    def _wake_drainers(self, endpoint_id: str) -> None:
        for event in self._drain_waiters.get(endpoint_id, ()):
            event.set()


_REMEMBERED_PICKS = 65_536


def _remember(table: collections.OrderedDict[str, Any], key: str, value: Any) -> None:
    """Add to a bounded table, forgetting the oldest entries first."""
    table[key] = value
    while len(table) > _REMEMBERED_PICKS:
        table.popitem(last=False)
