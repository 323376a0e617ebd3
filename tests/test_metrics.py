"""Prometheus metrics: a real server, real generations (ok, invalid, cancelled, rejected), a real
scrape of the HTTP endpoint, and the values checked against what the clients saw."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest

from stepserve.client import ImageClient, StepserveError
from stepserve.server.config import ServerConfig

from .metrics_helpers import Samples, promtool_check, scrape
from .server_process import free_port
from .server_thread import ServerThread
from .tools import require
from .waiting import wait_for

PRICE_PER_HOUR = 36.0  # USD: makes cost_usd = accelerator_seconds / 100


@pytest.fixture
def metered(tiny_sd_dir: Path):
    """At most two images per forward (max batch 2) and one waiting request (max queue 1)."""
    cfg = ServerConfig(
        host="127.0.0.1",
        port=0,
        metrics_port=free_port(),
        models=[f"tiny={tiny_sd_dir}"],
        max_batch_size=2,
        max_queue=1,
        accelerator_cost_per_hour=PRICE_PER_HOUR,
    ).validate()
    srv = ServerThread(cfg)
    yield srv
    srv.stop()


def test_metrics_follow_ok_invalid_cancelled_and_rejected_requests(metered) -> None:
    port = metered.server.metrics_port
    before = Samples(scrape(port))
    # Warm-up generations are the server's own business: not counted as requests or steps,
    # though their forwards are real work (step durations).
    assert before.get("stepserve_requests_total", model="tiny", code="ok") == 0
    assert before.get("stepserve_steps_total", model="tiny") == 0
    assert before.get("stepserve_step_duration_seconds_count", model="tiny") > 0
    assert before.get("stepserve_queue_depth", model="tiny") == 0
    assert before.get("stepserve_max_batch_size", model="tiny") == 2

    results = []
    with ImageClient(metered.target) as c:
        # Two plain successes, one with previews every step.
        results.append(c.generate("a red circle", steps=3, seed=1))
        results.append(c.generate("a blue square", steps=4, seed=2, num_images=2, preview_every=1))
        # Invalid: bad size (known model) and an unknown model (label "unknown", never the caller's text).
        with pytest.raises(StepserveError) as bad:
            c.generate("x", width=33)
        assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(StepserveError) as missing:
            c.generate("x", model="no-such-model")
        assert missing.value.code == grpc.StatusCode.NOT_FOUND

        # A long two-image request fills the batch; a second one waits in the only queue slot;
        # a third is rejected; then the long one is cancelled and the waiting one finishes.
        long_stream = c.generate_stream("a long one", steps=150, seed=3, num_images=2)
        for event in long_stream:
            if event.WhichOneof("event") == "progress":
                break
        waiting: list = []
        queued = threading.Event()

        def run_waiting() -> None:
            with ImageClient(metered.target) as c2:
                for ev in c2.generate_stream("the waiting one", steps=2, seed=4):
                    if ev.WhichOneof("event") == "queued":
                        queued.set()
                    if ev.WhichOneof("event") == "result":
                        waiting.append(ev.result)

        t = threading.Thread(target=run_waiting)
        t.start()
        assert queued.wait(30)
        assert Samples(scrape(port)).get("stepserve_queue_depth", model="tiny") == 1
        assert Samples(scrape(port)).get("stepserve_active_requests", model="tiny") == 1
        with (
            ImageClient(metered.target, service_config={}) as no_retries,
            pytest.raises(StepserveError) as rejected,
        ):
            no_retries.generate("one too many", steps=2)
        assert rejected.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        long_stream.close()  # cancels the RPC
        t.join(60)
        assert len(waiting) == 1

    def settled() -> bool:
        s = Samples(scrape(port))
        return s.get("stepserve_requests_total", model="tiny", code="cancelled") == 1

    wait_for(settled)
    s = Samples(scrape(port))
    assert s.get("stepserve_queue_depth", model="tiny") == 0
    assert s.get("stepserve_active_requests", model="tiny") == 0
    counts = {
        code: s.get("stepserve_requests_total", model="tiny", code=code)
        for code in ("ok", "invalid", "rejected", "cancelled", "deadline", "error", "unavailable")
    }
    assert counts == {
        "ok": 3,
        "invalid": 1,
        "rejected": 1,
        "cancelled": 1,
        "deadline": 0,
        "error": 0,
        "unavailable": 0,
    }
    assert s.get("stepserve_requests_total", model="unknown", code="invalid") == 1
    assert s.get("stepserve_request_duration_seconds_count", model="tiny", code="ok") == 3
    assert s.get("stepserve_request_duration_seconds_count", model="tiny", code="cancelled") == 1
    # Admitted into the batch: 3 successes and the cancelled one.
    assert s.get("stepserve_queue_wait_seconds_count", model="tiny") == 4
    # The waiting request waited at least until the long one was cancelled.
    assert s.get("stepserve_queue_wait_seconds_sum", model="tiny") > 0
    assert s.get("stepserve_time_to_first_preview_seconds_count", model="tiny") == 1
    assert s.get("stepserve_images_total", model="tiny") == 1 + 2 + 1
    # Steps: every step of the successes, plus however far the cancelled one got (>= 1).
    ok_steps = 3 + 4 + 2

    def delta(name: str) -> float:  # since the first scrape (warm-up forwards are real work, counted)
        return s.get(name, model="tiny") - before.get(name, model="tiny")

    steps = delta("stepserve_steps_total")
    assert ok_steps + 1 <= steps < ok_steps + 150
    # No two requests ever overlapped, so forwards == steps, each with that request's images.
    cancelled_steps = steps - ok_steps
    assert delta("stepserve_step_duration_seconds_count") == steps
    assert delta("stepserve_batch_requests_sum") == steps
    assert delta("stepserve_batch_size_count") == steps
    assert delta("stepserve_batch_size_sum") == 3 * 1 + 4 * 2 + 2 * 1 + cancelled_steps * 2
    assert delta("stepserve_step_duration_seconds_sum") > 0

    # Cost: the histograms hold exactly what the Usage records said.
    accel = [r.usage.accelerator_seconds for r in results] + [waiting[0].usage.accelerator_seconds]
    costs = [r.usage.cost_usd for r in results] + [waiting[0].usage.cost_usd]
    assert all(a > 0 for a in accel)
    for a, usd in zip(accel, costs, strict=True):
        assert usd == pytest.approx(a * PRICE_PER_HOUR / 3600)
    assert s.get("stepserve_generation_accelerator_seconds_count", model="tiny") == 3
    assert s.get("stepserve_generation_accelerator_seconds_sum", model="tiny") == pytest.approx(sum(accel))
    assert s.get("stepserve_generation_cost_usd_count", model="tiny") == 3
    assert s.get("stepserve_generation_cost_usd_sum", model="tiny") == pytest.approx(sum(costs))
    # The running total also holds what the cancelled request used before it left.
    total_cost = s.get("stepserve_cost_usd_total", model="tiny")
    charged = s.get("stepserve_accelerator_charged_seconds_total", model="tiny")
    assert total_cost > sum(costs)
    assert total_cost == pytest.approx(charged * PRICE_PER_HOUR / 3600)
    # Charged work is part of busy time (warm-up is busy but charged to no one); idle is the rest.
    busy = s.get("stepserve_accelerator_busy_seconds_total")
    assert charged <= busy + 1e-9
    assert s.get("stepserve_accelerator_idle_seconds_total") > 0
    # Process basics from prometheus-client's default collectors.
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "python_info"} <= s.names()
    assert s.get("stepserve_build_info", version="0.1.0") == 1


def test_promtool_accepts_the_exposition(tiny_sd_dir: Path) -> None:
    require("promtool", "Debian package 'prometheus'; .ci/run installs it")
    cfg = ServerConfig(
        host="127.0.0.1", port=0, metrics_port=free_port(), models=[f"tiny={tiny_sd_dir}"]
    ).validate()
    srv = ServerThread(cfg)
    try:
        with ImageClient(srv.target) as c:
            c.generate("a green triangle", steps=2, preview_every=1)
        promtool_check(scrape(srv.server.metrics_port))
    finally:
        srv.stop()


CODES = ("ok", "cancelled", "error")


@pytest.mark.parametrize(
    ("target", "stage"),
    [("encode", "encoding the result images"), ("preview_image", "encoding the progress of step 1")],
)
def test_an_unexpected_failure_in_the_api_ends_the_call_with_internal_and_counts_as_error(
    metered, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, target: str, stage: str
) -> None:
    """The guard at the gRPC edge: an exception the servicer does not expect (here, encoding
    an image) ends the call with INTERNAL naming what failed, is logged with the request id,
    and is counted as code="error" (never ok, cancelled or gRPC's UNKNOWN); the server keeps
    serving and nothing is left in flight."""
    from stepserve.server.api import imaging

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("injected encoder failure")

    port = metered.server.metrics_port
    monkeypatch.setattr(imaging, target, broken)
    with (
        ImageClient(metered.target, service_config={}) as c,
        pytest.raises(StepserveError) as failed,
        caplog.at_level("ERROR", logger="stepserve.server.api.servicer"),
    ):
        c.generate("a red circle", steps=3, seed=1, preview_every=1, request_id="doomed-1")
    assert failed.value.code == grpc.StatusCode.INTERNAL
    assert failed.value.message == f"request doomed-1: {stage} failed: OSError: injected encoder failure"
    logged = [r for r in caplog.records if "doomed-1" in r.getMessage()]
    assert logged and logged[0].exc_info is not None and stage in logged[0].getMessage()
    assert getattr(logged[0], "request_id", None) == "doomed-1"
    monkeypatch.undo()

    wait_for(lambda: metered.engine.in_flight() == 0)

    # The servicer counts the call as it returns, which may be just after the client sees it
    # end; its duration is observed last.
    def counted() -> bool:
        s = Samples(scrape(port))
        return sum(s.get("stepserve_request_duration_seconds_count", model="tiny", code=c) for c in CODES) > 0

    wait_for(counted, what="the call counted")
    s = Samples(scrape(port))
    counts = {c: s.get("stepserve_requests_total", model="tiny", code=c) for c in CODES}
    assert counts == {"ok": 0, "cancelled": 0, "error": 1}
    assert s.get("stepserve_request_duration_seconds_count", model="tiny", code="error") == 1
    with ImageClient(metered.target) as c:
        assert len(c.generate("a blue square", steps=2, seed=2).images) == 1
