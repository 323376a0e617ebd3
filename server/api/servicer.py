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
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from concurrent.futures import Executor
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
from .cached_generate import CachedGenerate
from .calls import Call, EngineFailure, StageError, abort, guard, queued_response
from .errors import ApiError, resource_exhausted, unavailable
from .flights import Flights
from .registration import MalformedRequest
from .result_cache import ResultCache
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
            pb.PresetSteps(
                preset=PRESET_TO_PROTO[preset],
                steps=steps,
                cache_interval=info.preset_cache_intervals.get(preset, 0),
            )
            for preset, steps in sorted(info.preset_steps.items(), key=lambda kv: PRESET_TO_PROTO[kv[0]])
        ],
        karras_samplers=[SAMPLER_TO_PROTO[s] for s in info.karras_samplers],
        guidance_embedded=info.guidance_embedded,
        tasks=[TASK_TO_PROTO[t] for t in info.tasks],
        loras=[pb.LoraInfo(name=x.name, rank=x.rank, components=list(x.components)) for x in info.loras],
        max_loras_per_request=info.max_loras_per_request,
        max_cache_interval=info.max_cache_interval,
        quantization=info.quantization,
    )


# Set by the client library when it sends a stream again that a replica ended UNAVAILABLE
# before starting it (gRPC's own retries set grpc-previous-rpc-attempts).
PREVIOUS_ATTEMPTS_KEY = "stepserve-previous-attempts"


def is_retry(metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
    """Whether a call is another attempt of an earlier one (for stepserve_request_retries_total)."""
    for key, value in metadata or ():
        if key in ("grpc-previous-rpc-attempts", PREVIOUS_ATTEMPTS_KEY) and value not in ("", "0", b"", b"0"):
            return True
    return False


class ImageGenerationServicer(CachedGenerate, pb_grpc.ImageGenerationServiceServicer):  # type: ignore[misc]
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
            await abort(context, request.to_error())
        if not self._infos:
            await abort(context, unavailable("the server is loading its models", 1.0))
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
            await abort(context, e)
            return
        except Exception as e:  # the guard (see _guard), before the request has an id
            self.metrics.count_refused(label, Outcome.ERROR, retry)
            await guard(context, "", StageError("validating the request"), e)
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
        call = Call(accepted_at=time.monotonic())
        try:
            async with contextlib.aclosing(self._stream(params, events, call)) as stream:
                async for response in stream:
                    yield response
        except EngineFailure as failure:
            await self._abort_failed(context, rid, failure.event)
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # the guard: nothing unexpected leaves as UNKNOWN
            call.end(Outcome.ERROR)
            engine.cancel(rid, RequestStatus.FINISHED_ERROR)  # the engine drops it at its next step
            await guard(context, rid, e if isinstance(e, StageError) else StageError("streaming"), e)
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
            await abort(
                context, resource_exhausted(str(e), e.retry_after_s, time_left_s=context.time_remaining())
            )
            return False
        except EngineStoppedError as e:
            logger.info("request %s refused: %s", rid, e)
            self.metrics.count_refused(params.model, Outcome.UNAVAILABLE, retry)
            await abort(context, unavailable(str(e), retry_after_s=1.0))
            return False
        except RequestInFlightError as e:
            logger.info("request %s refused: %s", rid, e)
            self.metrics.count_refused(params.model, Outcome.INVALID, retry)
            await abort(context, ApiError(grpc.StatusCode.ALREADY_EXISTS, str(e)))
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
        self, params: GenerationParams, events: asyncio.Queue[EngineEvent], call: Call
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """The responses for the engine's events up to the result; raises EngineFailure
        when the engine ends the request without one, and StageError naming the step of
        the API's own work that failed. Ends ``call`` when the engine's terminal event
        arrives."""
        rid = params.request_id
        while True:
            event = await events.get()
            if isinstance(event, QueuedEvent):
                yield queued_response(rid, event)
            elif isinstance(event, ProgressEvent):
                try:
                    response = await self._progress(params, event)
                except Exception as e:
                    raise StageError(f"encoding the progress of step {event.step}") from e
                yield response
            elif isinstance(event, ResultEvent):
                call.end(Outcome.OK)
                try:
                    response = await self._result(params, event)
                except Exception as e:
                    raise StageError("encoding the result images") from e
                yield response
                return
            elif isinstance(event, FailedEvent):
                call.end(OUTCOME_OF_REASON[event.reason])
                raise EngineFailure(event)

    async def _abort_failed(self, context: grpc.aio.ServicerContext, rid: str, event: FailedEvent) -> None:
        """End the call with the status for an engine failure."""
        if event.reason is FinishReason.UNMEETABLE_DEADLINE:
            error = resource_exhausted(
                f"request {rid}: {event.message}", event.retry_after_s or 1.0, subject="deadline"
            )
            await abort(context, error)
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
