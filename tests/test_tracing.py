"""OpenTelemetry traces: a real server with an in-memory span exporter, real RPCs carrying a
caller's W3C traceparent, and the resulting span tree, batch links and log ids checked."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from stepserve.client import build_request
from stepserve.server.app import StepServer
from stepserve.server.config import ServerConfig
from stepserve.server.logging_setup import ContextFilter
from stepserve.server.observability.tracing import tracing_exporter_name
from stepserve.v1 import image_generation_pb2_grpc as pb_grpc

from .server_thread import ServerThread

GENERATE = "/stepserve.v1.ImageGenerationService/Generate"


class TracedServer(ServerThread):
    def __init__(self, config: ServerConfig, provider: TracerProvider) -> None:
        self.provider = provider
        super().__init__(config)

    async def _make(self, config, models):
        return StepServer(config, models, tracer_provider=self.provider)


@pytest.fixture
def traced(tiny_sd_dir: Path, request: pytest.FixtureRequest):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    step_mode = getattr(request, "param", "events")
    cfg = ServerConfig(
        host="127.0.0.1", port=0, metrics_port=0, models=[f"tiny={tiny_sd_dir}"], trace_steps=step_mode
    ).validate()
    srv = TracedServer(cfg, provider)
    srv.exporter = exporter  # type: ignore[attr-defined]
    yield srv
    srv.stop()


def traceparent(trace_id: int, span_id: int) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-01"


def generate(target: str, metadata: list[tuple[str, str]], **kw: object) -> list:
    with grpc.insecure_channel(target) as ch:
        return list(pb_grpc.ImageGenerationServiceStub(ch).Generate(build_request(**kw), metadata=metadata))


def by_name(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def finished_spans(traced, *names: str, count: int = 1, timeout: float = 10.0) -> list[ReadableSpan]:
    """The exported spans, once spans of every given name are among them (a server span ends
    just after the client has read the status, so it may lag behind the call)."""
    end = time.monotonic() + timeout
    while True:
        spans = list(traced.exporter.get_finished_spans())
        if all(len(by_name(spans, n)) >= count for n in names) or time.monotonic() > end:
            return spans
        time.sleep(0.02)


def test_span_tree_continues_the_callers_trace_and_batch_spans_link_members(traced, caplog) -> None:
    caplog.handler.addFilter(ContextFilter())
    caplog.set_level(logging.INFO)
    callers = {"a": (0xA1 << 64 | 1, 0xAA01), "b": (0xB2 << 64 | 2, 0xBB02)}
    steps = {"a": 12, "b": 9}
    threads = [
        threading.Thread(
            target=generate,
            args=(traced.target, [("traceparent", traceparent(*callers[rid]))]),
            kwargs={"prompt": f"prompt {rid}", "steps": steps[rid], "request_id": rid, "preview_every": 3},
        )
        for rid in callers
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    spans = finished_spans(traced, GENERATE, count=2)
    ids = {s.context.span_id: s for s in spans}

    denoise_of = {}
    for rid, (trace_id, parent_id) in callers.items():
        server = [s for s in by_name(spans, GENERATE) if s.context.trace_id == trace_id]
        assert len(server) == 1, f"one server span continues caller {rid}'s trace"
        root = server[0]
        assert root.kind == SpanKind.SERVER and root.parent is not None and root.parent.span_id == parent_id
        assert root.attributes["stepserve.request_id"] == rid
        assert root.attributes["stepserve.usage.cost_usd"] > 0
        children = [s for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id]
        names = Counter(s.name for s in children)
        assert names == Counter(
            [
                "stepserve.queue",
                "stepserve.encode_prompt",
                "stepserve.denoise",
                "stepserve.decode",
                "stepserve.encode_images",
            ]
        )
        for child in children:
            assert child.context.trace_id == trace_id
            assert root.start_time <= child.start_time <= child.end_time <= root.end_time
        (denoise,) = [c for c in children if c.name == "stepserve.denoise"]
        step_events = [e for e in denoise.events if e.name == "step"]
        assert [e.attributes["stepserve.step"] for e in step_events] == list(range(1, steps[rid] + 1))
        assert sum(e.name == "preview" for e in denoise.events) == steps[rid] // 3
        # Each step event names the batch span the step ran in.
        for e in step_events:
            assert ids[int(e.attributes["stepserve.batch.span_id"], 16)].name == "stepserve.denoise_batch"
        denoise_of[rid] = denoise

    batches = by_name(spans, "stepserve.denoise_batch")
    linked = Counter()
    for b in batches:
        assert b.parent is None  # its own root: the batch belongs to no single request
        assert len(b.links) == b.attributes["stepserve.batch.requests"]
        for link in b.links:
            linked[link.attributes["stepserve.request_id"]] += 1
            assert link.context.span_id == denoise_of[link.attributes["stepserve.request_id"]].context.span_id
    # One batch span per forward a request took part in, and the two shared forwards.
    assert linked == Counter(steps)
    assert any(len(b.links) == 2 for b in batches)

    # Log lines about a request carry its request id and the caller's trace id, on the asyncio
    # side (contextvars + current span) and on the engine thread (explicit extra).
    for rid, (trace_id, _) in callers.items():
        records = [r for r in caplog.records if getattr(r, "request_id", None) == rid]
        assert any("accepted" in r.getMessage() for r in records)
        assert any("done" in r.getMessage() for r in records)
        assert all(r.trace_id == f"{trace_id:032x}" for r in records)


def test_untraced_callers_get_a_new_trace_and_cancel_closes_the_spans(traced) -> None:
    with grpc.insecure_channel(traced.target) as ch:
        call = pb_grpc.ImageGenerationServiceStub(ch).Generate(
            build_request("long", steps=150, request_id="c")
        )
        for event in call:
            if event.WhichOneof("event") == "progress" and event.progress.step >= 2:
                break
        call.cancel()

    spans = finished_spans(traced, GENERATE, "stepserve.denoise")
    (root,) = by_name(spans, GENERATE)
    assert root.parent is None  # no traceparent: the server span starts the trace
    (denoise,) = by_name(spans, "stepserve.denoise")
    assert denoise.parent.span_id == root.context.span_id
    assert denoise.attributes["stepserve.finish_reason"] == "cancelled"
    assert 2 <= denoise.attributes["stepserve.steps_done"] < 150
    assert denoise.status.status_code != StatusCode.ERROR  # the caller's cancel is not a server error
    assert not by_name(spans, "stepserve.decode")


@pytest.mark.parametrize("traced", ["spans"], indirect=True)
def test_per_step_spans_link_their_batch(traced) -> None:
    generate(traced.target, [], prompt="p", steps=5, request_id="s")
    spans = finished_spans(traced, GENERATE)
    (denoise,) = by_name(spans, "stepserve.denoise")
    step_spans = by_name(spans, "stepserve.step")
    assert [s.attributes["stepserve.step"] for s in step_spans] == [1, 2, 3, 4, 5]
    batch_ids = {b.context.span_id for b in by_name(spans, "stepserve.denoise_batch")}
    for s in step_spans:
        assert s.parent.span_id == denoise.context.span_id
        assert [link.context.span_id in batch_ids for link in s.links] == [True]
    assert not [e for e in denoise.events if e.name == "step"]


def test_rejected_request_span_records_the_status(traced) -> None:
    with pytest.raises(grpc.RpcError) as e:
        generate(traced.target, [], prompt="p", width=33)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    (root,) = by_name(finished_spans(traced, GENERATE), GENERATE)
    assert root.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]


@pytest.mark.parametrize(
    ("flag", "env", "expected"),
    [
        ("auto", {}, None),
        ("auto", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, "otlp"),
        ("auto", {"OTEL_TRACES_EXPORTER": "console"}, "console"),
        ("auto", {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, None),
        ("auto", {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, None),
        ("off", {"OTEL_TRACES_EXPORTER": "otlp"}, None),
        ("otlp", {}, "otlp"),
    ],
)
def test_tracing_is_off_unless_configured(flag: str, env: dict[str, str], expected: str | None) -> None:
    assert tracing_exporter_name(flag, env) == expected
