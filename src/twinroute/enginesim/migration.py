"""The engine simulator's `twinroute.v1.MigrationHook`: Llumnix-style live migration of a running
request's KV between two engine-sim processes.

Stages, as the scheduler (`twinroute.scheduler.migration.Migrator`) drives them:
1. PreAllocate on the destination reserves KV for the request's blocks (refused, with the
   reason, when not enough is free).
2. Transfer on the source, stage by stage: each stage sends the blocks the request holds and
   the destination has not got yet, in the instance profile's modelled link time for the
   stage's tokens (`InstanceProfile.kv_transfer_s`, as prefill/decode transfers use; times the
   engine's time scale; the sleep is injected). The request keeps decoding during the early
   stages; the last stage takes it out of the batch (its KV stays held on the source), sends
   the rest, and returns its state.
3. Commit on the destination adopts the request into its batch with the reserved KV and the
   tokens generated so far; it decodes the rest there.
Abort on either side cleans that side: the destination frees its reservation, the source puts
the request back into its batch. After a commit it is too late to abort.

The client's stream: the HTTP connection stays with the source engine, whose handler keeps
reading the request's token queue. After the last stage the source follows the destination
(the `Follow` stream): if the destination committed, the source frees its KV and forwards every
token the destination produces into that queue, so the client sees one uninterrupted response;
if it aborted, or cannot be reached before committing, the request resumes on the source. If
the destination dies after committing, the source recomputes the rest locally (prompt plus
what was generated), so the client's stream still completes.

A destination that never sees Commit (the scheduler died) gives up after `commit_timeout_s`,
freeing its reservation; the source then resumes the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from twinroute.enginesim.core import EngineCore, Generation
from twinroute.simulator.profiles import DEFAULT_PROFILE, get_profile
from twinroute.v1 import scheduler_pb2 as pb
from twinroute.v1 import scheduler_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)


# A destination that never sees Commit frees its reservation after this long.
COMMIT_TIMEOUT_S = 30.0


@dataclass(slots=True)
class _Incoming:
    """Destination side of one migration."""

    request_id: str
    reserved_tokens: int
    decided: asyncio.Event
    state: str = "reserved"  # reserved | committed | aborted
    generation: Generation | None = None


@dataclass(slots=True)
class _Outgoing:
    """Source side of one migration."""

    request_id: str
    sent_blocks: int = 0
    suspended: bool = False
    committed: bool = False
    done: bool = False
    prompt_tokens: int = 0
    generated: int = 0
    max_tokens: int = 0
    follow: asyncio.Task[None] | None = None


class EngineMigrationHook(pb_grpc.MigrationHookServicer):
    """MigrationHook over one `EngineCore`; both roles (source and destination) at once."""

    def __init__(
        self,
        *,
        core: EngineCore,
        transfer_s: Callable[[int], float] | None = None,
        commit_timeout_s: float = COMMIT_TIMEOUT_S,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        channel_factory: Callable[[str], grpc.aio.Channel] = grpc.aio.insecure_channel,
    ) -> None:
        """`transfer_s(tokens)`: modelled seconds to copy that many tokens of KV, per stage
        (the instance profile's link, `InstanceProfile.kv_transfer_s`, as prefill/decode
        transfers use; the default profile's when not given)."""
        self._core = core
        self._transfer_s = transfer_s or get_profile(DEFAULT_PROFILE).kv_transfer_s
        self._commit_timeout_s = commit_timeout_s
        self._sleep = sleep
        self._channel_factory = channel_factory
        self._incoming: dict[str, _Incoming] = {}
        self._outgoing: dict[str, _Outgoing] = {}

    @property
    def _block_tokens(self) -> int:
        return self._core.instance.config.block_size

    def _blocks(self, tokens: int) -> int:
        return math.ceil(tokens / self._block_tokens)

    def _wall(self, modelled_s: float) -> float:
        return modelled_s * self._core.settings.time_scale

    @property
    def reservations(self) -> int:
        """KV tokens reserved for migrations that have not committed or aborted."""
        return sum(i.reserved_tokens for i in self._incoming.values() if i.state == "reserved")

    # -- listing ------------------------------------------------------------------------------

    async def ListRequests(
        self, request: pb.ListRequestsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListRequestsResponse:
        instance = self._core.instance
        scale = self._core.settings.token_scale
        block = self._block_tokens
        cache = instance.cache
        return pb.ListRequestsResponse(
            requests=[
                pb.EngineRequestState(
                    request_id=request_id,
                    waiting=waiting,
                    prompt_tokens=prompt // scale,
                    output_tokens=generated,
                    kv_blocks=self._blocks(kv_tokens),
                )
                for request_id, waiting, prompt, generated, kv_tokens in instance.listing()
            ],
            free_kv_blocks=cache.free_tokens // block,
            total_kv_blocks=cache.capacity_tokens // block,
        )

    # -- destination --------------------------------------------------------------------------

    async def PreAllocate(
        self, request: pb.PreAllocateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.PreAllocateResponse:
        if not request.migration_id or not request.request_id or request.kv_blocks <= 0:
            return pb.PreAllocateResponse(
                accepted=False, reason="migration_id, request_id and kv_blocks > 0 are required"
            )
        if request.migration_id in self._incoming:
            return pb.PreAllocateResponse(accepted=False, reason="migration id already in use")
        tokens = request.kv_blocks * self._block_tokens
        cache = self._core.instance.cache
        if not cache.reserve(tokens):
            return pb.PreAllocateResponse(
                accepted=False,
                reason=(
                    f"insufficient free blocks: need {request.kv_blocks}, "
                    f"free {cache.free_tokens // self._block_tokens}"
                ),
            )
        self._incoming[request.migration_id] = _Incoming(
            request_id=request.request_id, reserved_tokens=tokens, decided=asyncio.Event()
        )
        return pb.PreAllocateResponse(accepted=True)

    async def Commit(
        self, request: pb.CommitRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CommitResponse:
        incoming = self._incoming.get(request.migration_id)
        if incoming is None or incoming.request_id != request.request_id:
            return pb.CommitResponse(committed=False, reason="unknown migration")
        if incoming.state != "reserved":
            return pb.CommitResponse(committed=False, reason=f"migration is {incoming.state}")
        try:
            generation = self._core.adopt(
                request_id=request.request_id,
                prompt_tokens=request.prompt_tokens,
                generated=request.output_tokens,
                max_tokens=request.max_tokens,
                reserved_tokens=incoming.reserved_tokens,
            )
        except ValueError as error:
            return pb.CommitResponse(committed=False, reason=str(error))
        if generation is None:
            return pb.CommitResponse(
                committed=False, reason="insufficient free blocks for the request's KV at commit"
            )
        incoming.state = "committed"
        incoming.generation = generation
        incoming.decided.set()
        return pb.CommitResponse(committed=True)

    async def Follow(
        self, request: pb.FollowRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.FollowEvent]:
        incoming = self._incoming.get(request.migration_id)
        if incoming is None:
            yield pb.FollowEvent(committed=False, reason="unknown migration")
            return
        try:
            await asyncio.wait_for(incoming.decided.wait(), timeout=self._commit_timeout_s)
        except TimeoutError:
            self._abort_incoming(request.migration_id, incoming)
            yield pb.FollowEvent(committed=False, reason="no commit in time")
            return
        generation = incoming.generation
        if incoming.state != "committed" or generation is None:
            self._incoming.pop(request.migration_id, None)
            yield pb.FollowEvent(committed=False, reason=f"migration {incoming.state}")
            return
        yield pb.FollowEvent(committed=True)
        try:
            while (count := await generation.queue.get()) is not None:
                yield pb.FollowEvent(tokens=count)
            yield pb.FollowEvent(finished=True)
        finally:
            self._incoming.pop(request.migration_id, None)

    def _abort_incoming(self, migration_id: str, incoming: _Incoming) -> bool:
        if incoming.state != "reserved":
            return False
        self._core.instance.cache.free(incoming.reserved_tokens)
        incoming.state = "aborted"
        incoming.decided.set()
        return True

    # -- source -------------------------------------------------------------------------------

    async def Transfer(
        self, request: pb.TransferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.TransferResponse:
        instance = self._core.instance
        outgoing = self._outgoing.get(request.migration_id)
        if outgoing is not None and (outgoing.suspended or outgoing.done):
            return pb.TransferResponse(refused_reason="the last stage already ran")
        state = instance.decoding_state(request.request_id)
        if state is None:
            self._outgoing.pop(request.migration_id, None)
            return pb.TransferResponse(
                refused_reason="request not running here (finished, queued or unknown)"
            )
        if outgoing is None:
            outgoing = self._outgoing[request.migration_id] = _Outgoing(
                request_id=request.request_id
            )
        kv_tokens, generated, max_tokens = state
        blocks = self._blocks(kv_tokens)
        send = max(0, blocks - outgoing.sent_blocks)
        if request.last_stage:
            instance.suspend(request.request_id)
            outgoing.suspended = True
            outgoing.prompt_tokens = (kv_tokens - generated) // self._core.settings.token_scale
            outgoing.generated = generated
            outgoing.max_tokens = max_tokens
        seconds = self._transfer_s(send * self._block_tokens)
        await self._sleep(self._wall(seconds))
        outgoing.sent_blocks += send
        if request.last_stage:
            outgoing.follow = asyncio.get_running_loop().create_task(
                self._follow(request.migration_id, outgoing, request.destination_address),
                name=f"follow-{request.migration_id}",
            )
            return pb.TransferResponse(
                blocks_sent=send,
                blocks_remaining=0,
                transfer_s=seconds,
                prompt_tokens=outgoing.prompt_tokens,
                output_tokens=generated,
                max_tokens=max_tokens,
            )
        now = instance.decoding_state(request.request_id)
        remaining = 0 if now is None else max(0, self._blocks(now[0]) - outgoing.sent_blocks)
        return pb.TransferResponse(blocks_sent=send, blocks_remaining=remaining, transfer_s=seconds)

    async def _follow(self, migration_id: str, outgoing: _Outgoing, destination: str) -> None:
        core = self._core
        request_id = outgoing.request_id
        forwarded = 0
        channel = self._channel_factory(destination)
        try:
            stub = pb_grpc.MigrationHookStub(channel)
            stream = stub.Follow(pb.FollowRequest(migration_id=migration_id))
            async for event in stream:
                kind = event.WhichOneof("event")
                if kind == "committed":
                    if not event.committed:
                        self._resume(outgoing)
                        return
                    core.instance.release_suspended(request_id)
                    outgoing.committed = True
                    outgoing.suspended = False
                elif kind == "tokens":
                    forwarded += event.tokens
                    core.forward(request_id, event.tokens)
                elif kind == "finished":
                    core.forward(request_id, None)
                    return
            raise ConnectionError("the destination ended the stream early")
        except (grpc.aio.AioRpcError, ConnectionError) as error:
            if not outgoing.committed:
                logger.warning("migration %s: destination lost before commit (%s); resuming",
                               migration_id, error)  # fmt: skip
                self._resume(outgoing)
            else:
                logger.warning("migration %s: destination lost after commit (%s); recomputing "
                               "the rest here", migration_id, error)  # fmt: skip
                if not core.recompute(
                    request_id=request_id,
                    prompt_tokens=outgoing.prompt_tokens,
                    generated=outgoing.generated + forwarded,
                    max_tokens=outgoing.max_tokens,
                ):
                    core.forward(request_id, None)
        finally:
            outgoing.done = True
            self._outgoing.pop(migration_id, None)
            await channel.close()

    def _resume(self, outgoing: _Outgoing) -> bool:
        if not outgoing.suspended:
            return False
        outgoing.suspended = False
        return self._core.resume(outgoing.request_id)

    # -- either side --------------------------------------------------------------------------

    async def Abort(
        self, request: pb.AbortRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.AbortResponse:
        aborted = False
        incoming = self._incoming.get(request.migration_id)
        if incoming is not None:
            aborted = self._abort_incoming(request.migration_id, incoming)
            if incoming.state == "aborted":
                self._incoming.pop(request.migration_id, None)
        outgoing = self._outgoing.get(request.migration_id)
        if outgoing is not None and not outgoing.committed:
            if outgoing.follow is not None:
                outgoing.follow.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await outgoing.follow
            aborted = self._resume(outgoing) or aborted or not outgoing.suspended
            self._outgoing.pop(request.migration_id, None)
        if aborted:
            logger.info("migration %s aborted: %s", request.migration_id, request.reason)
        return pb.AbortResponse(aborted=aborted)


class MigrationHookServer:
    """The hook on its own grpc.aio server (the engine's HTTP port stays aiohttp's)."""

    def __init__(self, *, hook: EngineMigrationHook, listen: str) -> None:
        self.server = grpc.aio.server(options=(("grpc.so_reuseport", 0),))
        pb_grpc.add_MigrationHookServicer_to_server(hook, self.server)
        port = self.server.add_insecure_port(listen)
        if port == 0:
            raise OSError(f"cannot listen on {listen}")
        self.address = f"{listen.rpartition(':')[0]}:{port}"

    async def start(self) -> None:
        await self.server.start()

    async def stop(self, *, grace_s: float = 1.0) -> None:
        await self.server.stop(grace_s)
