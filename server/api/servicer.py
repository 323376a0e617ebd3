"""The ``stepserve.v1.ImageGenerationService`` servicer (grpc.aio).

Runs on the event loop and never touches model code: it validates, hands the request to
the engine, and turns engine events (delivered through a per-request asyncio queue) into
stream responses. Image encoding runs in a thread pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import trace

from stepserve.v1 import image_generation_pb2 as pb
from stepserve.v1 import image_generation_pb2_grpc as pb_grpc

from ..engine.engine import Engine
from ..engine.inbox import EngineStoppedError, QueueFullError, RequestInFlightError
from ..engine.request import RequestStatus
from ..engine.types import (
    EngineEvent,
    FailedEvent,
    FinishReason,
    GenerationParams,
    ModelInfo,
    ProgressEvent,
    QueuedEvent,
    ResultEvent,
)
from ..logging_setup import request_id_var
from ..observability.metrics import OUTCOME_OF_REASON, UNKNOWN_MODEL, Metrics, Outcome
from . import image_inputs, imaging
from .cache_key import InputDigests
from .errors import ApiError, resource_exhausted, unavailable
from .flights import Flight, FlightBroken, FlightDone, Flights, Subscriber
from .registration import MalformedRequest
from .result_cache import Hit, ResultCache
from .validation import (
    FORMAT_TO_PROTO,
    PRESET_TO_PROTO,
    SAMPLER_TO_PROTO,
    TASK_TO_PROTO,
    Limits,
    validate_generate,
)

if TYPE_CHECKING:
    from ..engine.models.base import ModelAdapter

logger = logging.getLogger(__name__)

# How a request that ended without a result is reported to the caller.
FAILURE_CODES = {
    FinishReason.CANCELLED: grpc.StatusCode.CANCELLED,
    FinishReason.DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,
    FinishReason.ERROR: grpc.StatusCode.INTERNAL,
    FinishReason.SHUTDOWN: grpc.StatusCode.UNAVAILABLE,
}


def model_info_proto(info: ModelInfo, is_default: bool) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=info.name,
        family=info.family,
        default_width_px=info.default_width,
        default_height_px=info.default_height,
        default_steps=info.default_steps,
        default_guidance_scale=info.default_guidance_scale,
        default_sampler=SAMPLER_TO_PROTO[info.default_sampler],
        supported_samplers=[SAMPLER_TO_PROTO[s] for s in info.samplers],
        max_batch_size=info.max_batch_size,
        is_default=is_default,
        min_size_px=info.min_size,
        max_size_px=info.max_size,
        max_steps=info.max_steps,
        max_images_per_request=info.max_images_per_request,
        presets=[
            pb.PresetSteps(preset=PRESET_TO_PROTO[preset], steps=steps)
            for preset, steps in sorted(info.preset_steps.items(), key=lambda kv: PRESET_TO_PROTO[kv[0]])
        ],
        karras_samplers=[SAMPLER_TO_PROTO[s] for s in info.karras_samplers],
        guidance_embedded=info.guidance_embedded,
        tasks=[TASK_TO_PROTO[t] for t in info.tasks],
        loras=[pb.LoraInfo(name=x.name, rank=x.rank, components=list(x.components)) for x in info.loras],
        max_loras_per_request=info.max_loras_per_request,
    )


@dataclass
class _Call:
    """How an accepted Generate call is going: when it was accepted, and when and how it
    ended (the engine's terminal event, the API's own failure, or the caller leaving)."""

    accepted_at: float
    ended_at: float | None = None
    outcome: Outcome | None = None

    def end(self, outcome: Outcome) -> None:
        """The call ended with ``outcome``; the first ending's time is kept (a result whose
        encoding then fails ends at the result, as an error)."""
        if self.ended_at is None:
            self.ended_at = time.monotonic()
        self.outcome = outcome


# Set by the client library when it sends a stream again that a replica ended UNAVAILABLE
# before starting it (gRPC's own retries set grpc-previous-rpc-attempts).
PREVIOUS_ATTEMPTS_KEY = "stepserve-previous-attempts"


def is_retry(metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
    """Whether a call is another attempt of an earlier one (for stepserve_request_retries_total)."""
    for key, value in metadata or ():
        if key in ("grpc-previous-rpc-attempts", PREVIOUS_ATTEMPTS_KEY) and value not in ("", "0", b"", b"0"):
            return True
    return False


class _StageError(Exception):
    """A step of the API's own work for a request (``stage``) failed; the cause is chained."""

    def __init__(self, stage: str) -> None:
        super().__init__(stage)
        self.stage = stage


class _EngineFailure(Exception):
    """The engine ended the request without a result."""

    def __init__(self, event: FailedEvent) -> None:
        super().__init__(event.message)
        self.event = event


class _Rejoin(Exception):
    """The flight a call followed ended for its leader's deadline (passed, or refused as
    unmeetable), not the call's own."""


_DEADLINES = (FinishReason.DEADLINE, FinishReason.UNMEETABLE_DEADLINE)


class ImageGenerationServicer(pb_grpc.ImageGenerationServiceServicer):  # type: ignore[misc]
    """Generate and ListModels over one :class:`Engine`."""

    def __init__(
        self,
        default_model: str,
        limits: Limits,
        encode_pool: Executor,
        metrics: Metrics,
        tracer: trace.Tracer,
    ) -> None:
        self.default_model = default_model
        self.limits = limits
        self.pool = encode_pool
        self.metrics = metrics
        self.tracer = tracer
        self.engine: Engine | None = None
        self.models: dict[str, ModelAdapter] = {}
        self._infos: dict[str, ModelInfo] = {}
        self.ready = False
        # The result cache and the flights that coalesce identical requests (both off: None).
        self.cache: ResultCache | None = None
        self.flights = Flights(self._encode_result, self._store_result, self._cancel)

    def attach(self, engine: Engine, models: dict[str, ModelAdapter]) -> None:
        """Connect the loaded models and their engine (requests are refused until then)."""
        self.engine = engine
        self.models = models
        self._infos = {name: m.info for name, m in models.items()}

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        if isinstance(request, MalformedRequest):
            await _abort(context, request.to_error())
        if not self._infos:
            await _abort(context, unavailable("the server is loading its models", 1.0))
        names = sorted(self._infos, key=lambda n: (n != self.default_model, n))
        return pb.ListModelsResponse(
            models=[model_info_proto(self._infos[n], n == self.default_model) for n in names]
        )

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        label = self._model_label(getattr(request, "model", ""))
        retry = is_retry(context.invocation_metadata())
        try:
            if isinstance(request, MalformedRequest):
                raise request.to_error()
            params = self._admit(request, context)
            if request.init_image:
                params = await self._decode_inputs(params, request)
        except ApiError as e:
            refused = {
                grpc.StatusCode.UNAVAILABLE: Outcome.UNAVAILABLE,
                grpc.StatusCode.RESOURCE_EXHAUSTED: Outcome.REJECTED,  # no room for its image inputs
            }.get(e.code, Outcome.INVALID)
            logger.info("request refused from %s: %s: %s", context.peer(), e.code.name, e.message)
            self.metrics.count_refused(label, refused, retry)
            await _abort(context, e)
            return
        except Exception as e:  # the guard (see _guard), before the request has an id
            self.metrics.count_refused(label, Outcome.ERROR, retry)
            await _guard(context, "", _StageError("validating the request"), e)
            return
        rid = params.request_id
        request_id_var.set(rid)
        span = trace.get_current_span()
        span.set_attribute("stepserve.request_id", rid)
        span_context = span.get_span_context()
        trace_context = span_context if span_context.is_valid else None
        if self.cache is not None:
            async with contextlib.aclosing(
                self._generate_cached(params, request, context, retry, trace_context)
            ) as cached:
                async for response in cached:
                    yield response
            return
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[EngineEvent] = asyncio.Queue()

        def sink(event: EngineEvent) -> None:  # called on the engine thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        engine = self.engine
        assert engine is not None
        if not await self._submit(params, sink, context, retry, trace_context):
            return
        self._log_accepted(params, context, retry)
        call = _Call(accepted_at=time.monotonic())
        try:
            async with contextlib.aclosing(self._stream(params, events, call)) as stream:
                async for response in stream:
                    yield response
        except _EngineFailure as failure:
            await self._abort_failed(context, rid, failure.event)
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # the guard: nothing unexpected leaves as UNKNOWN
            call.end(Outcome.ERROR)
            engine.cancel(rid, RequestStatus.FINISHED_ERROR)  # the engine drops it at its next step
            await _guard(context, rid, e if isinstance(e, _StageError) else _StageError("streaming"), e)
        finally:
            if call.outcome is None:
                # The caller went away (cancelled, deadline) or the stream broke: stop the work.
                left = context.time_remaining()
                expired = left is not None and left <= 0
                call.end(Outcome.DEADLINE if expired else Outcome.CANCELLED)
                engine.cancel(
                    rid, RequestStatus.FINISHED_DEADLINE if expired else RequestStatus.FINISHED_CANCELLED
                )
            assert call.outcome is not None and call.ended_at is not None
            self.metrics.count_finished(params.model, call.outcome, call.ended_at - call.accepted_at, retry)

    async def _submit(
        self,
        params: GenerationParams,
        sink: Any,
        context: grpc.aio.ServicerContext,
        retry: bool,
        trace_context: Any,
    ) -> bool:
        """Hand the request to the engine; False when it refused (the call is then ended with
        the refusal's status and counted)."""
        rid = params.request_id
        engine = self.engine
        assert engine is not None
        try:
            engine.submit(params, sink, trace_context)
        except QueueFullError as e:
            logger.warning("request %s rejected: %s", rid, e)
            self.metrics.count_refused(params.model, Outcome.REJECTED, retry)
            await _abort(
                context, resource_exhausted(str(e), e.retry_after_s, time_left_s=context.time_remaining())
            )
            return False
        except EngineStoppedError as e:
            logger.info("request %s refused: %s", rid, e)
            self.metrics.count_refused(params.model, Outcome.UNAVAILABLE, retry)
            await _abort(context, unavailable(str(e), retry_after_s=1.0))
            return False
        except RequestInFlightError as e:
            logger.info("request %s refused: %s", rid, e)
            self.metrics.count_refused(params.model, Outcome.INVALID, retry)
            await _abort(context, ApiError(grpc.StatusCode.ALREADY_EXISTS, str(e)))
            return False
        return True

    def _log_accepted(
        self, params: GenerationParams, context: grpc.aio.ServicerContext, retry: bool, how: str = ""
    ) -> None:
        rid = params.request_id
        logger.info(
            "request %s accepted from %s%s%s: model=%s %s %dx%d steps=%d/%d sampler=%s images=%d",
            rid,
            context.peer(),
            " (a retry)" if retry else "",
            how,
            params.model,
            params.task.value,
            params.width,
            params.height,
            params.steps_run,
            params.steps,
            params.sampler.value,
            params.num_images,
        )

    # -- the result cache and coalescing (docs/architecture.md "Result cache") ------------
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
        call = _Call(accepted_at=time.monotonic())
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
                except _Rejoin:
                    # The flight's deadline (its leader's) passed before this call's own:
                    # carry on in a generation of its own (or another in flight).
                    logger.info("request %s: its flight's deadline passed; generating again", rid)
                    self.flights.leave(flight, sub, status)
                    boarded = await self._board(params, key, seeded, context, retry, trace_context)
                    if boarded is None:
                        call.end(Outcome.REJECTED)
                        return
                    flight, sub = boarded
        except _EngineFailure as failure:
            await self._abort_failed(context, rid, failure.event)
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # the guard: nothing unexpected leaves as UNKNOWN
            call.end(Outcome.ERROR)
            status = RequestStatus.FINISHED_ERROR
            await _guard(context, rid, e if isinstance(e, _StageError) else _StageError("streaming"), e)
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

    def _hit_response(self, params: GenerationParams, hit: Hit, call: _Call) -> pb.GenerateResponse | None:
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
        self, params: GenerationParams, sub: Subscriber, call: _Call
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """``_stream`` for a call following a flight: its own responses for the flight's
        events (previews at its own cadence), and the flight's Result with its own usage."""
        rid = params.request_id
        every = params.preview_every
        while True:
            item = await sub.queue.get()
            if isinstance(item, QueuedEvent):
                yield pb.GenerateResponse(
                    request_id=rid,
                    queued=pb.Queued(
                        position=item.position, estimated_wait_ms=int(item.estimated_wait_s * 1000)
                    ),
                )
            elif isinstance(item, ProgressEvent):
                if item.preview is not None and not (every and item.step % every == 0):
                    item = replace(item, preview=None)
                try:
                    response = await self._progress(params, item)
                except Exception as e:
                    raise _StageError(f"encoding the progress of step {item.step}") from e
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
                if item.reason in _DEADLINES and not sub.leader and not self._past(params.deadline):
                    raise _Rejoin()
                call.end(OUTCOME_OF_REASON[item.reason])
                raise _EngineFailure(item)
            elif isinstance(item, FlightBroken):
                raise _StageError(item.stage) from item.error

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

    async def _decode_inputs(self, params: GenerationParams, request: pb.GenerateRequest) -> GenerationParams:
        """``params`` with the request's image inputs decoded, in the worker pool (it takes
        milliseconds; the event loop serves other calls meanwhile). Refused first, before
        any decoding, when the queue's input budget has no room for the encoded bytes."""
        assert self.engine is not None
        try:
            self.engine.inbox.check_input_room(params.model, params.input_bytes)
        except QueueFullError as e:
            raise resource_exhausted(str(e), e.retry_after_s) from e
        return await asyncio.get_running_loop().run_in_executor(
            self.pool, image_inputs.decode_inputs, params, request.init_image, request.mask_image
        )

    async def _stream(
        self, params: GenerationParams, events: asyncio.Queue[EngineEvent], call: _Call
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """The responses for the engine's events up to the result; raises _EngineFailure
        when the engine ends the request without one, and _StageError naming the step of
        the API's own work that failed. Ends ``call`` when the engine's terminal event
        arrives."""
        rid = params.request_id
        while True:
            event = await events.get()
            if isinstance(event, QueuedEvent):
                yield pb.GenerateResponse(
                    request_id=rid,
                    queued=pb.Queued(
                        position=event.position, estimated_wait_ms=int(event.estimated_wait_s * 1000)
                    ),
                )
            elif isinstance(event, ProgressEvent):
                try:
                    response = await self._progress(params, event)
                except Exception as e:
                    raise _StageError(f"encoding the progress of step {event.step}") from e
                yield response
            elif isinstance(event, ResultEvent):
                call.end(Outcome.OK)
                try:
                    response = await self._result(params, event)
                except Exception as e:
                    raise _StageError("encoding the result images") from e
                yield response
                return
            elif isinstance(event, FailedEvent):
                call.end(OUTCOME_OF_REASON[event.reason])
                raise _EngineFailure(event)

    async def _abort_failed(self, context: grpc.aio.ServicerContext, rid: str, event: FailedEvent) -> None:
        """End the call with the status for an engine failure."""
        if event.reason is FinishReason.UNMEETABLE_DEADLINE:
            error = resource_exhausted(
                f"request {rid}: {event.message}", event.retry_after_s or 1.0, subject="deadline"
            )
            await _abort(context, error)
        else:
            await context.abort(FAILURE_CODES[event.reason], f"request {rid}: {event.message}")

    def _model_label(self, requested: str) -> str:
        """The ``model`` metric label of a refused request (never a caller-made value)."""
        name = requested or self.default_model
        return name if name in self._infos else UNKNOWN_MODEL

    def _admit(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> GenerationParams:
        if not self.ready or self.engine is None:
            raise unavailable("the server is not ready (loading models or shutting down)", retry_after_s=1.0)
        remaining = context.time_remaining()
        deadline = None if remaining is None else self.engine.clock() + remaining
        return validate_generate(
            request,
            self._infos,
            self.default_model,
            self.limits,
            lambda model, text: self.models[model].count_prompt_tokens(text),
            deadline,
        )

    async def _progress(self, params: GenerationParams, event: ProgressEvent) -> pb.GenerateResponse:
        progress = pb.Progress(
            step=event.step,
            total_steps=event.total_steps,
            elapsed_ms=int(event.elapsed_s * 1000),
            paused=event.paused,
        )
        if event.preview is not None:
            loop = asyncio.get_running_loop()
            data, w, h = await loop.run_in_executor(
                self.pool,
                imaging.preview_image,
                event.preview,
                params.width,
                params.height,
                params.preview_max_size,
            )
            progress.preview.CopyFrom(
                pb.Image(
                    data=data, format=pb.IMAGE_FORMAT_JPEG, width_px=w, height_px=h, seed=params.seeds[0]
                )
            )
        return pb.GenerateResponse(request_id=params.request_id, progress=progress)

    async def _result(self, params: GenerationParams, event: ResultEvent) -> pb.GenerateResponse:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        with self.tracer.start_as_current_span(
            "stepserve.encode_images",
            attributes={
                "stepserve.format": params.output_format.value,
                "stepserve.num_images": len(event.images),
            },
        ):
            blobs = await asyncio.gather(
                *(
                    loop.run_in_executor(
                        self.pool, imaging.encode, img, params.output_format, params.output_quality
                    )
                    for img in event.images
                )
            )
        fmt = FORMAT_TO_PROTO[params.output_format]
        u = event.usage
        trace.get_current_span().set_attributes(
            {
                "stepserve.usage.accelerator_seconds": u.accelerator_s,
                "stepserve.usage.cost_usd": u.cost_usd,
                "stepserve.usage.mean_batch_size": u.mean_batch_size,
                "stepserve.usage.queue_ms": int(u.queue_s * 1000),
            }
        )
        result = pb.Result(
            images=[
                pb.Image(data=b, format=fmt, width_px=img.shape[1], height_px=img.shape[0], seed=seed)
                for b, img, seed in zip(blobs, event.images, event.seeds, strict=True)
            ],
            usage=pb.Usage(
                steps=u.steps,
                queue_ms=int(u.queue_s * 1000),
                total_ms=int((u.total_s + time.perf_counter() - t0) * 1000),
                accelerator_seconds=u.accelerator_s,
                mean_batch_size=u.mean_batch_size,
                cost_usd=u.cost_usd,
                image_encode_seconds=u.image_encode_s,
            ),
            model=params.model,
        )
        return pb.GenerateResponse(request_id=params.request_id, result=result)


async def _guard(context: grpc.aio.ServicerContext, rid: str, stage: _StageError, error: Exception) -> None:
    """The guard at the gRPC edge: an exception the servicer did not expect ends the call
    with INTERNAL naming what failed (never gRPC's bare UNKNOWN), logged with the request id."""
    cause = error.__cause__ if isinstance(error, _StageError) and error.__cause__ is not None else error
    who = f"request {rid}" if rid else "a request"
    logger.error("%s: %s failed", who, stage.stage, exc_info=cause, extra={"request_id": rid} if rid else {})
    await context.abort(
        grpc.StatusCode.INTERNAL, f"{who}: {stage.stage} failed: {type(cause).__name__}: {cause}"
    )


async def _abort(context: grpc.aio.ServicerContext, error: ApiError) -> None:
    """End the call with ``error`` and its ``google.rpc`` details.

    Same as ``abort_with_status``, but through ``abort`` so that the OpenTelemetry interceptor's
    context wrapper records the status code on the server span.
    """
    status = error.to_status()
    await context.abort(status.code, status.details, status.trailing_metadata)
