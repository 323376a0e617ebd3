"""The ``stepserve.v1.ImageGenerationService`` servicer (grpc.aio).

Runs on the event loop and never touches model code: it validates, hands the request to
the engine, and turns engine events (delivered through a per-request asyncio queue) into
stream responses. Image encoding runs in a thread pool.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from google.protobuf.message import DecodeError, Message
from opentelemetry import trace

from stepserve.v1 import image_generation_pb2 as pb
from stepserve.v1 import image_generation_pb2_grpc as pb_grpc

from ..engine.request import RequestStatus
from ..engine.engine import Engine
from ..engine.inbox import EngineStoppedError, QueueFullError
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
from ..observability.metrics import UNKNOWN_MODEL, Metrics, Outcome
from . import imaging
from .errors import ApiError, resource_exhausted, unavailable
from .validation import FORMAT_TO_PROTO, PRESET_TO_PROTO, SAMPLER_TO_PROTO, Limits, validate_generate

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


@dataclass(frozen=True)
class MalformedRequest:
    """What the deserializer hands the servicer for bytes that are not a valid request
    message (so the caller gets INVALID_ARGUMENT, not grpc's UNKNOWN)."""

    type_name: str
    error: str

    def to_error(self) -> ApiError:
        return ApiError(
            grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {self.type_name}: {self.error}"
        )


def _lenient(cls: type[Message]) -> Callable[[bytes], Message | MalformedRequest]:
    def deserialize(data: bytes) -> Message | MalformedRequest:
        try:
            return cls.FromString(data)
        except DecodeError as e:
            return MalformedRequest(cls.DESCRIPTOR.full_name, str(e))

    return deserialize


def add_to_server(servicer: ImageGenerationServicer, server: grpc.aio.Server) -> None:
    """Register every method of the service, like the generated ``add_..._to_server``, but
    with deserializers that turn malformed bytes into :class:`MalformedRequest`."""
    service = pb.DESCRIPTOR.services_by_name["ImageGenerationService"]
    handlers = {}
    for method in service.methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=_lenient(request_cls),
            response_serializer=response_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


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
    )


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
        try:
            if isinstance(request, MalformedRequest):
                raise request.to_error()
            params = self._admit(request, context)
        except ApiError as e:
            outcome = Outcome.UNAVAILABLE if e.code == grpc.StatusCode.UNAVAILABLE else Outcome.INVALID
            logger.info("request refused from %s: %s: %s", context.peer(), e.code.name, e.message)
            self.metrics.count_refused(self._model_label(getattr(request, "model", "")), outcome)
            await _abort(context, e)
            return
        rid = params.request_id
        request_id_var.set(rid)
        span = trace.get_current_span()
        span.set_attribute("stepserve.request_id", rid)
        span_context = span.get_span_context()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[EngineEvent] = asyncio.Queue()

        def sink(event: EngineEvent) -> None:  # called on the engine thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        engine = self.engine
        assert engine is not None
        try:
            engine.submit(params, sink, span_context if span_context.is_valid else None)
        except QueueFullError as e:
            logger.warning("request %s rejected: %s", rid, e)
            self.metrics.count_refused(params.model, Outcome.REJECTED)
            await _abort(context, resource_exhausted(str(e), e.retry_after_s))
            return
        except EngineStoppedError as e:
            logger.info("request %s refused: %s", rid, e)
            self.metrics.count_refused(params.model, Outcome.UNAVAILABLE)
            await _abort(context, unavailable(str(e), retry_after_s=1.0))
            return
        logger.info(
            "request %s accepted from %s: model=%s %dx%d steps=%d sampler=%s images=%d",
            rid,
            context.peer(),
            params.model,
            params.width,
            params.height,
            params.steps,
            params.sampler.value,
            params.num_images,
        )
        done = False
        try:
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
                    yield await self._progress(params, event)
                elif isinstance(event, ResultEvent):
                    done = True
                    yield await self._result(params, event)
                    return
                elif isinstance(event, FailedEvent):
                    done = True
                    if event.reason is FinishReason.UNMEETABLE_DEADLINE:
                        error = resource_exhausted(
                            f"request {rid}: {event.message}", event.retry_after_s or 1.0, subject="deadline"
                        )
                        await _abort(context, error)
                    else:
                        await context.abort(FAILURE_CODES[event.reason], f"request {rid}: {event.message}")
                    return
        finally:
            if not done:
                # The caller went away (cancelled, deadline) or the stream broke: stop the work.
                left = context.time_remaining()
                expired = left is not None and left <= 0
                engine.cancel(
                    rid, RequestStatus.FINISHED_DEADLINE if expired else RequestStatus.FINISHED_CANCELLED
                )

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
            step=event.step, total_steps=event.total_steps, elapsed_ms=int(event.elapsed_s * 1000)
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
            ),
            model=params.model,
        )
        return pb.GenerateResponse(request_id=params.request_id, result=result)


async def _abort(context: grpc.aio.ServicerContext, error: ApiError) -> None:
    """End the call with ``error`` and its ``google.rpc`` details.

    Same as ``abort_with_status``, but through ``abort`` so that the OpenTelemetry interceptor's
    context wrapper records the status code on the server span.
    """
    status = error.to_status()
    await context.abort(status.code, status.details, status.trailing_metadata)
