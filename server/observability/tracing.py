"""OpenTelemetry tracing: set-up from the standard ``OTEL_*`` variables, and the engine-side spans.

The span tree of one Generate call (the server span comes from opentelemetry-instrumentation-grpc's
aio interceptor and continues the caller's W3C ``traceparent``)::

    /stepserve.v1.ImageGenerationService/Generate      SERVER, one per RPC
      stepserve.queue                                   arrival -> admitted into the batch
      stepserve.encode_prompt                           text encoding (shared by requests admitted together)
      stepserve.denoise                                 first step -> last step; a "step" event per step
        stepserve.step                                  per-step child spans instead, with --trace-steps spans
      stepserve.decode                                  VAE decode
      stepserve.encode_images                           PNG/JPEG/WebP encoding (API side)

A batched forward serves many requests, so it gets its own span, ``stepserve.denoise_batch``, the
root of its own trace, with a link to the ``stepserve.denoise`` span of every traced request in it
(the OpenTelemetry way of modelling batch work); each step event names the batch span it ran in.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanKind, Status, StatusCode

from ..engine.observer import EngineObserver
from ..engine.request import RequestState
from ..engine.types import FinishReason, Usage

logger = logging.getLogger(__name__)

TRACER_NAME = "stepserve"
TRACE_STEP_MODES = ("none", "events", "spans")


def tracing_exporter_name(flag: str, environ: Mapping[str, str] | None = None) -> str | None:
    """Which exporter ``--tracing FLAG`` selects: "otlp", "console", or None (off).

    ``auto`` follows the standard variables: off when ``OTEL_SDK_DISABLED=true`` or
    ``OTEL_TRACES_EXPORTER=none``; on (OTLP unless that variable says "console") when
    ``OTEL_TRACES_EXPORTER`` or an OTLP endpoint variable is set; off otherwise.
    """
    env = os.environ if environ is None else environ
    if flag == "off":
        return None
    if flag in ("otlp", "console"):
        return flag
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return None
    if exporter == "console":
        return "console"
    if exporter or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return "otlp"
    return None


def build_tracer_provider(exporter_name: str, version: str) -> TracerProvider:
    """A TracerProvider exporting in batches; endpoint, headers, sampler and resource come from
    the standard ``OTEL_*`` variables (``service.name`` defaults to "stepserve")."""
    resource = Resource.create({SERVICE_VERSION: version})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "stepserve"}))
    provider = TracerProvider(resource=resource)
    exporter: SpanExporter
    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _parent(req: RequestState) -> otel_context.Context:
    return trace.set_span_in_context(NonRecordingSpan(req.trace_context))


def _span_id(span: Span) -> str:
    return format(span.get_span_context().span_id, "016x")


class TracingObserver(EngineObserver):
    """Creates the engine-side spans of traced requests (those that carry a trace context).

    Spans are created after the fact with explicit start and end times measured on the engine
    thread, so tracing adds no work to the step itself.
    """

    def __init__(self, tracer: trace.Tracer, step_mode: str = "events") -> None:
        if step_mode not in TRACE_STEP_MODES:
            raise ValueError(f"trace step mode {step_mode!r} not in {TRACE_STEP_MODES}")
        self.tracer = tracer
        self.step_mode = step_mode

    def _span(self, name: str, req: RequestState, start_ns: int, end_ns: int | None, **attrs: Any) -> Span:
        span = self.tracer.start_span(
            name,
            context=_parent(req),
            start_time=start_ns,
            attributes={"stepserve.request_id": req.request_id, "stepserve.model": req.model, **attrs},
        )
        if end_ns is not None:
            span.end(end_time=end_ns)
        return span

    def request_admitted(self, req: RequestState, now: float) -> None:
        if req.trace_context is None:
            return
        end = time.time_ns()
        start = end - int(max(0.0, now - req.arrival_time) * 1e9)
        self._span("stepserve.queue", req, start, end)

    def _span_each(self, name: str, reqs: Sequence[RequestState], seconds: float) -> None:
        """One span per traced request for work they shared, which just took ``seconds``."""
        end = time.time_ns()
        start = end - int(seconds * 1e9)
        for req in reqs:
            if req.trace_context is not None:
                attrs = {"stepserve.batch.requests": len(reqs), "stepserve.num_images": req.params.num_images}
                self._span(name, req, start, end, **attrs)

    def prompts_encoded(self, reqs: Sequence[RequestState], seconds: float) -> None:
        self._span_each("stepserve.encode_prompt", reqs, seconds)

    def images_encoded(self, reqs: Sequence[RequestState], seconds: float) -> None:
        self._span_each("stepserve.encode_image", reqs, seconds)

    def batch_stepped(self, batch: Sequence[RequestState], rows: int, seconds: float) -> None:
        traced = [r for r in batch if r.trace_context is not None]
        if not traced:
            return
        end = time.time_ns()
        start = end - int(seconds * 1e9)
        for req in traced:
            if "denoise" not in req.telemetry:
                p = req.params
                req.telemetry["denoise"] = self._span(
                    "stepserve.denoise",
                    req,
                    start,
                    None,
                    **{
                        "stepserve.steps": p.steps_run,
                        "stepserve.task": p.task.value,
                        "stepserve.sampler": p.sampler.value,
                        "stepserve.guidance_scale": p.guidance_scale,
                        "stepserve.num_images": p.num_images,
                        "stepserve.width_px": p.width,
                        "stepserve.height_px": p.height,
                    },
                )
        images = sum(r.params.num_images for r in batch)
        batch_span = self.tracer.start_span(
            "stepserve.denoise_batch",
            context=otel_context.Context(),  # a root: the batch belongs to no one request
            kind=SpanKind.INTERNAL,
            links=[
                Link(r.telemetry["denoise"].get_span_context(), {"stepserve.request_id": r.request_id})
                for r in traced
            ],
            start_time=start,
            attributes={
                "stepserve.model": batch[0].model,
                "stepserve.batch.requests": len(batch),
                "stepserve.batch.images": images,
                "stepserve.batch.rows": rows,
            },
        )
        batch_span.end(end_time=end)
        batch_id = _span_id(batch_span)
        for req in traced:
            denoise: Span = req.telemetry["denoise"]
            if self.step_mode == "events":
                denoise.add_event(
                    "step",
                    {
                        "stepserve.step": req.steps_done,
                        "stepserve.batch.images": images,
                        "stepserve.batch.span_id": batch_id,
                    },
                    timestamp=end,
                )
            elif self.step_mode == "spans":
                step = self.tracer.start_span(
                    "stepserve.step",
                    context=trace.set_span_in_context(denoise),
                    links=[Link(batch_span.get_span_context())],
                    start_time=start,
                    attributes={"stepserve.step": req.steps_done, "stepserve.batch.images": images},
                )
                step.end(end_time=end)
            if req.steps_complete:
                # Ended (at this time) when the request finishes, after its last preview event.
                req.telemetry["denoise_end"] = end

    def preview_made(self, req: RequestState, now: float, seconds: float) -> None:
        denoise = req.telemetry.get("denoise")
        if denoise is not None and self.step_mode != "none":
            denoise.add_event("preview", {"stepserve.step": req.steps_done})

    def images_decoded(self, reqs: Sequence[RequestState], seconds: float) -> None:
        self._span_each("stepserve.decode", reqs, seconds)

    def request_paused(self, req: RequestState, now: float) -> None:
        self._denoise_event(req, "paused")

    def request_resumed(self, req: RequestState, now: float) -> None:
        self._denoise_event(req, "resumed")

    def _denoise_event(self, req: RequestState, name: str) -> None:
        """An event on the request's denoise span (open once it has stepped)."""
        denoise = req.telemetry.get("denoise")
        if denoise is not None:
            denoise.add_event(name, {"stepserve.step": req.steps_done})

    def request_finished(
        self, req: RequestState, reason: FinishReason, now: float, usage: Usage | None
    ) -> None:
        denoise = req.telemetry.get("denoise")
        if denoise is not None and "denoise_end" in req.telemetry:
            denoise.end(end_time=req.telemetry["denoise_end"])
        elif denoise is not None:
            # Left the batch early: cancelled, past its deadline, failed or shut down. A caller's
            # cancel is not the server's error (as in the gRPC semantic conventions).
            if reason is not FinishReason.CANCELLED:
                denoise.set_status(Status(StatusCode.ERROR, reason.value))
            denoise.set_attribute("stepserve.finish_reason", reason.value)
            denoise.set_attribute("stepserve.steps_done", req.steps_done)
            denoise.end()
        req.telemetry.clear()
