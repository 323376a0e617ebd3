"""Generate with the result cache on: a hit, a call joining an identical generation in
flight, or a flight of its own (docs/architecture.md "Result cache and coalescing").

A mixin of :class:`~.servicer.ImageGenerationServicer`: it shares the servicer's submission,
progress and result encoding, and failure mapping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from concurrent.futures import Executor
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import grpc

from stepserve.v1 import image_generation_pb2 as pb

from ..engine.request import RequestStatus
from ..engine.types import (
    EngineEvent,
    FailedEvent,
    GenerationParams,
    ProgressEvent,
    QueuedEvent,
    ResultEvent,
)
from ..observability.metrics import OUTCOME_OF_REASON, Metrics, Outcome
from .cache_key import InputDigests
from .calls import DEADLINES, Call, EngineFailure, Rejoin, StageError, guard, queued_response
from .flights import Flight, FlightBroken, FlightDone, Flights, Subscriber
from .result_cache import Hit, ResultCache

if TYPE_CHECKING:
    from ..engine.engine import Engine

# The servicer's logger: one name for everything about a Generate call (tests and log
# queries select it).
logger = logging.getLogger("stepserve.server.api.servicer")


class CachedGenerate:
    """The cached call path; the servicer provides the attributes and methods declared here."""

    cache: ResultCache | None
    flights: Flights
    engine: Engine | None
    metrics: Metrics
    pool: Executor

    if TYPE_CHECKING:

        async def _submit(
            self,
            params: GenerationParams,
            sink: Any,
            context: grpc.aio.ServicerContext,
            retry: bool,
            trace_context: Any,
        ) -> bool: ...

        def _log_accepted(
            self, params: GenerationParams, context: grpc.aio.ServicerContext, retry: bool, how: str = ""
        ) -> None: ...

        async def _progress(self, params: GenerationParams, event: ProgressEvent) -> pb.GenerateResponse: ...

        async def _result(self, params: GenerationParams, event: ResultEvent) -> pb.GenerateResponse: ...

        async def _abort_failed(
            self, context: grpc.aio.ServicerContext, rid: str, event: FailedEvent
        ) -> None: ...

    async def _generate_cached(
        self,
        params: GenerationParams,
        request: pb.GenerateRequest,
        context: grpc.aio.ServicerContext,
        retry: bool,
        trace_context: Any,
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """Generate with the cache on: a request with a seed is answered from the cache, or
        joins an identical generation in flight, or starts one others may join; a request
        without one always starts its own (its result is stored under the seed it got)."""
        assert self.cache is not None and self.engine is not None
        rid = params.request_id
        call = Call(accepted_at=time.monotonic())
        key = await self._cache_key(params, request)
        seeded = request.HasField("seed")
        if key is not None and seeded:
            hit = await self.cache.get(key)
            response = self._hit_response(params, hit, call) if hit is not None else None
            if hit is not None and response is not None:
                self.metrics.cache_lookup(params.model, "hit", hit.store)
                self._log_accepted(params, context, retry, f" (a result cache hit, {hit.store})")
                call.end(Outcome.OK)
                elapsed = time.monotonic() - call.accepted_at
                self.metrics.count_finished(params.model, Outcome.OK, elapsed, retry)
                yield response
                return
        boarded = await self._board(params, key, seeded, context, retry, trace_context, first=True)
        if boarded is None:
            return  # refused, and counted
        flight, sub = boarded
        status = RequestStatus.FINISHED_CANCELLED
        try:
            while True:
                try:
                    async with contextlib.aclosing(self._follow(params, sub, call)) as stream:
                        async for response in stream:
                            yield response
                    break
                except Rejoin:
                    # The flight's deadline (its leader's) passed before this call's own:
                    # carry on in a generation of its own (or another in flight).
                    logger.info("request %s: its flight's deadline passed; generating again", rid)
                    self.flights.leave(flight, sub, status)
                    boarded = await self._board(params, key, seeded, context, retry, trace_context)
                    if boarded is None:
                        call.end(Outcome.REJECTED)
                        return
                    flight, sub = boarded
        except EngineFailure as failure:
            await self._abort_failed(context, rid, failure.event)
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # the guard: nothing unexpected leaves as UNKNOWN
            call.end(Outcome.ERROR)
            status = RequestStatus.FINISHED_ERROR
            await guard(context, rid, e if isinstance(e, StageError) else StageError("streaming"), e)
        finally:
            if call.outcome is None:
                left = context.time_remaining()
                expired = left is not None and left <= 0
                call.end(Outcome.DEADLINE if expired else Outcome.CANCELLED)
                if expired:
                    status = RequestStatus.FINISHED_DEADLINE
            # The generation stops only when its last call has left.
            self.flights.leave(flight, sub, status)
            assert call.outcome is not None and call.ended_at is not None
            self.metrics.count_finished(params.model, call.outcome, call.ended_at - call.accepted_at, retry)

    async def _board(
        self,
        params: GenerationParams,
        key: str | None,
        seeded: bool,
        context: grpc.aio.ServicerContext,
        retry: bool,
        trace_context: Any,
        first: bool = False,
    ) -> tuple[Flight, Subscriber] | None:
        """Join the identical generation in flight that covers the call, or start one (others
        may join it when the call has a seed); None when the engine refused it (the call is
        then ended and counted). ``first``: the call's first boarding (counted as a lookup)."""
        if key is not None and seeded:
            flight = self.flights.find(key, params)
            if flight is not None:
                sub = flight.join(params)
                if first:
                    self.metrics.cache_lookup(params.model, "coalesced")
                    self._log_accepted(
                        params, context, retry, f" (coalesced with request {flight.params.request_id})"
                    )
                return flight, sub
            if first:
                self.metrics.cache_lookup(params.model, "miss")
        # Another attempt of a call runs under an id of its own (the engine's ids are unique).
        lead = params if first else replace(params, request_id=f"{params.request_id}+{uuid.uuid4().hex[:8]}")
        flight, sub = self.flights.start(key, lead, joinable=seeded)
        loop = asyncio.get_running_loop()
        events = flight.events

        def sink(event: EngineEvent) -> None:  # called on the engine thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        accepted = False
        try:
            accepted = await self._submit(lead, sink, context, retry, trace_context)
        finally:
            if not accepted:  # refused (the refusal ends the call by raising): nobody may join
                self.flights.abandon(flight)
        if not accepted:
            return None
        self.flights.run(flight)
        if first:
            self._log_accepted(params, context, retry)
        return flight, sub

    async def _cache_key(self, params: GenerationParams, request: pb.GenerateRequest) -> str | None:
        """The request's cache key (image inputs hashed in the worker pool), or None when it
        cannot be made: then the request is served without the cache, never refused."""
        assert self.cache is not None
        try:
            inputs = InputDigests()
            if request.init_image:
                inputs = await asyncio.get_running_loop().run_in_executor(
                    self.pool, InputDigests.of, request.init_image, request.mask_image
                )
            return self.cache.key(params, inputs)
        except Exception:
            logger.exception(
                "request %s: no result cache key; generating without the cache", params.request_id
            )
            return None

    def _hit_response(self, params: GenerationParams, hit: Hit, call: Call) -> pb.GenerateResponse | None:
        """The response for a cache hit: the stored Result, marked cached and charged nothing;
        None when the entry does not parse (counted like a corrupt one)."""
        result = pb.Result()
        try:
            result.ParseFromString(hit.payload)
        except Exception:
            assert self.cache is not None
            self.cache.metrics.cache_error(hit.store, "corrupt")
            return None
        result.usage.CopyFrom(
            pb.Usage(cached=True, total_ms=int((time.monotonic() - call.accepted_at) * 1000))
        )
        return pb.GenerateResponse(request_id=params.request_id, result=result)

    async def _follow(
        self, params: GenerationParams, sub: Subscriber, call: Call
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """``_stream`` for a call following a flight: its own responses for the flight's
        events (previews at its own cadence), and the flight's Result with its own usage."""
        rid = params.request_id
        every = params.preview_every
        while True:
            item = await sub.queue.get()
            if isinstance(item, QueuedEvent):
                yield queued_response(rid, item)
            elif isinstance(item, ProgressEvent):
                if item.preview is not None and not (every and item.step % every == 0):
                    item = replace(item, preview=None)
                try:
                    response = await self._progress(params, item)
                except Exception as e:
                    raise StageError(f"encoding the progress of step {item.step}") from e
                yield response
            elif isinstance(item, FlightDone):
                call.end(Outcome.OK)
                result = pb.Result()
                result.CopyFrom(item.result)
                usage = result.usage
                usage.total_ms = int((time.monotonic() - call.accepted_at) * 1000)
                usage.coalesced = not sub.leader
                if item.payer is not sub:
                    usage.accelerator_seconds = 0.0
                    usage.cost_usd = 0.0
                    usage.image_encode_seconds = 0.0
                yield pb.GenerateResponse(request_id=rid, result=result)
                return
            elif isinstance(item, FailedEvent):
                if item.reason in DEADLINES and not sub.leader and not self._past(params.deadline):
                    raise Rejoin()
                call.end(OUTCOME_OF_REASON[item.reason])
                raise EngineFailure(item)
            elif isinstance(item, FlightBroken):
                raise StageError(item.stage) from item.error

    def _past(self, deadline: float | None) -> bool:
        """Whether ``deadline`` (engine clock) has passed."""
        assert self.engine is not None
        return deadline is not None and self.engine.clock() >= deadline

    async def _encode_result(self, params: GenerationParams, event: ResultEvent) -> pb.Result:
        return (await self._result(params, event)).result

    async def _store_result(self, key: str, payload: bytes) -> None:
        if self.cache is not None:
            await self.cache.put(key, payload)

    def _cancel(self, request_id: str, status: RequestStatus) -> None:
        if self.engine is not None:
            self.engine.cancel(request_id, status)
