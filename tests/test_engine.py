"""The engine loop on a real (tiny, random-weight) diffusers model, driven step by step."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from stepserve.server.engine.fault_injection import NO_FAULTS, Faults
from stepserve.server.engine.inbox import EngineStoppedError, QueueFullError
from stepserve.server.engine.observer import EngineObserver
from stepserve.server.engine.types import (
    FailedEvent,
    FinishReason,
    ProgressEvent,
    QueuedEvent,
    ResultEvent,
    Sampler,
)

from .engine_helpers import Harness, Recorder, params


@pytest.fixture(params=[False, True], ids=["in-step", "run-ahead"])
def harness(request, tiny_adapter):
    """Every engine test runs both ways: settling each step before the next (the default on
    CPU), and running ahead (the default on GPUs: step k+1 is queued before step k's times,
    previews and images are read)."""
    h = Harness({"tiny": tiny_adapter}, run_ahead=request.param)
    rec = Recorder(tiny_adapter)
    h.rec = rec  # type: ignore[attr-defined]
    yield h
    rec.restore()


def test_heterogeneous_requests_share_each_forward(harness) -> None:
    reqs = [
        params("a", steps=3, sampler=Sampler.EULER, guidance_scale=7.5, seed=1),
        params("b", steps=5, sampler=Sampler.DDIM, guidance_scale=1.0, seed=2, prompt="a blue square"),
        params(
            "c", steps=4, sampler=Sampler.EULER_ANCESTRAL, guidance_scale=3.0, seed=3, negative_prompt="red"
        ),
        params("d", steps=5, sampler=Sampler.DPM_SOLVER_MULTISTEP, guidance_scale=5.0, seed=4, num_images=2),
    ]
    for p in reqs:
        harness.submit(p)
    harness.run_until_idle()
    fwd = harness.rec.forwards
    # One forward per step of the longest request; everyone shares the forwards they need.
    assert [ids for ids, _ in fwd] == [["a", "b", "c", "d"]] * 3 + [["b", "c", "d"]] + [["b", "d"]]
    # Rows: CFG requests add two per image, unguided ones one.
    assert [rows for _, rows in fwd] == [2 + 1 + 2 + 4] * 3 + [1 + 2 + 4] + [1 + 4]
    for p in reqs:
        res = harness.result(p.request_id)
        assert len(res.images) == p.num_images
        assert res.seeds == p.seeds
        assert res.images[0].shape == (32, 32, 3) and res.images[0].dtype == np.uint8
        assert res.usage.steps == p.steps
        assert res.usage.accelerator_s > 0
    assert harness.result("a").usage.mean_batch_size == pytest.approx(5.0)  # 1+1+1+2 images
    assert harness.engine.scheduler.running == {} and harness.engine.in_flight() == 0


def test_request_joins_a_running_batch_mid_flight(harness) -> None:
    harness.submit(params("long", steps=6))
    harness.step(2)
    harness.submit(params("short", steps=2, seed=9))
    harness.run_until_idle()
    fwd = [ids for ids, _ in harness.rec.forwards]
    assert fwd == [["long"], ["long"], ["long", "short"], ["long", "short"], ["long"], ["long"]]
    # The short request finished while the long one was still running.
    assert isinstance(harness.events["short"][-1], ResultEvent)


def test_event_sequence_is_queued_progress_then_one_result(harness) -> None:
    harness.submit(params("a", steps=3, preview_every=1))
    harness.run_until_idle()
    ev = harness.events["a"]
    assert isinstance(ev[0], QueuedEvent) and ev[0].position == 0
    progress = [e for e in ev if isinstance(e, ProgressEvent)]
    assert [p.step for p in progress] == [1, 2, 3]
    assert all(p.total_steps == 3 for p in progress)
    for p in progress:
        assert p.preview is not None and p.preview.dtype == np.uint8 and p.preview.shape[2] == 3
    assert isinstance(ev[-1], ResultEvent)
    assert sum(isinstance(e, ResultEvent | FailedEvent) for e in ev) == 1


def test_queue_positions_are_reported_as_they_change(tiny_adapter) -> None:
    h = Harness({"tiny": tiny_adapter})
    h.engine.scheduler.lower_capacity("tiny", 1)
    for rid in ("a", "b", "c"):
        h.submit(params(rid, steps=2))
    h.run_until_idle()
    positions = {rid: [e.position for e in h.events[rid] if isinstance(e, QueuedEvent)] for rid in "abc"}
    # All three arrive before the first step; each hears its place, then every move.
    assert positions == {"a": [0], "b": [1, 0], "c": [2, 1, 0]}
    for rid in "abc":
        assert isinstance(h.events[rid][-1], ResultEvent)


def test_cancelled_request_leaves_at_the_next_step(harness) -> None:
    harness.submit(params("stay", steps=5))
    harness.submit(params("go", steps=5, seed=5))
    harness.step(2)
    harness.engine.cancel("go")
    harness.run_until_idle()
    fwd = [ids for ids, _ in harness.rec.forwards]
    assert fwd == [["stay", "go"], ["stay", "go"], ["stay"], ["stay"], ["stay"]]
    fail = harness.failure("go")
    assert fail.reason is FinishReason.CANCELLED
    steps_seen = [e.step for e in harness.events["go"] if isinstance(e, ProgressEvent)]
    assert steps_seen == [1, 2]
    assert isinstance(harness.events["stay"][-1], ResultEvent)
    assert harness.engine.in_flight() == 0 and harness.engine.queue_depth() == 0


def test_deadline_ends_the_request_at_the_next_step(harness) -> None:
    now = harness.clock.now
    harness.submit(params("late", steps=10, deadline=now + 5))
    harness.step(3)
    harness.clock.now += 10
    harness.run_until_idle()
    assert harness.failure("late").reason is FinishReason.DEADLINE
    assert len(harness.rec.forwards) == 3


def test_unmeetable_deadline_is_refused_before_any_work(harness) -> None:
    now = harness.clock.now
    harness.submit(params("busy", steps=20))
    harness.step()
    p = params("x")
    for rows in range(1, 9):  # 0.5 s per forward of any size, as if measured many times
        for _ in range(100):
            harness.engine.scheduler.step_times.record("tiny", p.height, p.width, rows, 0.5)
    # 10 steps need about 5 s; 1 s is not enough. 30 s is.
    harness.submit(params("hopeless", steps=10, deadline=now + 1.0))
    harness.submit(params("fine", steps=10, deadline=now + 30.0))
    harness.step()
    failed = harness.failure("hopeless")
    assert failed.reason is FinishReason.UNMEETABLE_DEADLINE
    assert failed.retry_after_s == pytest.approx(5.0)
    assert "cannot be met" in failed.message
    assert not any("hopeless" in ids for ids, _ in harness.rec.forwards)
    harness.run_until_idle()
    assert isinstance(harness.events["fine"][-1], ResultEvent)


def test_full_queue_rejects_with_retry_hint(tiny_adapter) -> None:
    h = Harness({"tiny": tiny_adapter}, max_queue=2)
    # Requests that free batch slots will take at the next step do not count as waiting.
    for i in range(16):
        h.submit(params(f"fills-{i}"))
    h.submit(params("a"))
    h.submit(params("b"))
    with pytest.raises(QueueFullError) as e:
        h.submit(params("c"))
    assert e.value.retry_after_s > 0
    assert "2 requests waiting" in str(e.value)
    h.run_until_idle()
    h.submit(params("c"))  # the queue drained: accepted again
    h.run_until_idle()
    assert isinstance(h.events["c"][-1], ResultEvent)


@pytest.fixture
def faults(tiny_adapter):
    """Turn on injected faults for the tiny adapter (test-only hooks), off again afterwards."""
    yield lambda spec: setattr(tiny_adapter, "faults", Faults.parse(spec))
    tiny_adapter.faults = NO_FAULTS


def solo_images(harness, p) -> list:
    """The images ``p`` gets when it runs alone."""
    harness.submit(p)
    harness.run_until_idle()
    return harness.result(p.request_id).images


def test_a_poisoned_request_fails_alone_and_its_batchmates_are_undisturbed(harness, faults) -> None:
    a, c = params("a", steps=4, seed=1), params("c", steps=4, seed=3, guidance_scale=1.0)
    want = {"a": solo_images(harness, a), "c": solo_images(harness, c)}
    faults("request_error=POISON")
    for p in (
        replace(a, request_id="a2"),
        params("b", prompt="POISON pill", steps=4),
        replace(c, request_id="c2"),
    ):
        harness.submit(p)
    harness.run_until_idle()
    failed = harness.failure("b")
    assert failed.reason is FinishReason.ERROR and "injected failure of request b" in failed.message
    for rid in ("a", "c"):
        np.testing.assert_array_equal(harness.result(rid + "2").images[0], want[rid][0])
    # b failed in its first step, and its batchmates went on to finish.
    assert not [e for e in harness.events["b"] if isinstance(e, ProgressEvent)]
    assert harness.engine.in_flight() == 0 and not harness.engine.scheduler.has_unfinished()


def test_a_request_that_breaks_the_shared_forward_is_isolated_by_halving(harness, faults) -> None:
    ps = [params(f"r{i}", steps=3, seed=i) for i in range(4)]
    want = {p.request_id: solo_images(harness, p) for p in ps}
    faults("forward_error=BREAKS")
    for p in ps:
        harness.submit(replace(p, request_id=p.request_id + "-batched"))
    harness.submit(params("bad", prompt="this BREAKS the forward", steps=3))
    harness.run_until_idle()
    assert "injected forward failure" in harness.failure("bad").message
    for rid, images in want.items():
        np.testing.assert_array_equal(harness.result(rid + "-batched").images[0], images[0])


def test_out_of_memory_splits_the_batch_lowers_the_cap_and_keeps_serving(harness, faults) -> None:
    ps = [params(f"r{i}", steps=3, seed=10 + i) for i in range(4)]  # guided: 2 rows per image
    want = {p.request_id: solo_images(harness, p) for p in ps}
    assert harness.engine.scheduler.capacity["tiny"] == 16
    faults("oom_above_rows=2")  # the "accelerator" holds one guided image per forward
    for p in ps:
        harness.submit(replace(p, request_id=p.request_id + "-batched"))
    harness.run_until_idle()
    for rid, images in want.items():
        np.testing.assert_array_equal(harness.result(rid + "-batched").images[0], images[0])
    assert harness.engine.scheduler.capacity["tiny"] == 1
    # After the cap was lowered, every forward holds one image: no more failed attempts.
    assert all(len(ids) == 1 for ids, _ in harness.rec.forwards[-8:])
    # A request that cannot fit even alone fails with a clear message; the engine goes on.
    harness.submit(params("big", steps=2, num_images=2))
    harness.submit(params("after", steps=2))
    harness.run_until_idle()
    assert "out of accelerator memory even alone" in harness.failure("big").message
    assert isinstance(harness.events["after"][-1], ResultEvent)


def test_draining_engine_refuses_new_requests(tiny_adapter) -> None:
    h = Harness({"tiny": tiny_adapter})
    assert h.engine.drain(timeout_s=0.0)  # nothing in flight: drained at once
    with pytest.raises(EngineStoppedError):
        h.submit(params("a"))


def test_request_level_mode_lets_no_one_join_a_running_batch(tiny_adapter) -> None:
    h = Harness({"tiny": tiny_adapter}, batching="request", max_batch_delay_s=0.0)
    rec = Recorder(tiny_adapter)
    try:
        h.submit(params("first", steps=3))
        h.step(1)
        h.submit(params("second", steps=2, seed=2))
        h.run_until_idle()
    finally:
        rec.restore()
    assert [ids for ids, _ in rec.forwards] == [["first"]] * 3 + [["second"]] * 2
    assert isinstance(h.events["second"][-1], ResultEvent)


def test_accelerator_time_is_split_without_loss_or_double_counting(harness) -> None:
    """Every second of model work is charged to exactly the requests it served: the Usage
    records add up to the engine's busy time, and a request that adds twice the rows to each
    shared forward (CFG, more images) is charged more than one that adds fewer."""
    harness.submit(params("guided", steps=6, guidance_scale=7.5, preview_every=2))
    harness.submit(params("unguided", steps=6, guidance_scale=1.0))
    harness.submit(params("two-images", steps=6, num_images=2))
    harness.run_until_idle()
    usages = {rid: harness.result(rid).usage for rid in ("guided", "unguided", "two-images")}
    busy_s = harness.engine.ledger.busy_s
    assert sum(u.accelerator_s for u in usages.values()) == pytest.approx(busy_s, rel=1e-9)
    assert all(u.mean_batch_size == 4 for u in usages.values())  # 1 + 1 + 2 images in every forward
    assert (
        usages["unguided"].accelerator_s < usages["guided"].accelerator_s < usages["two-images"].accelerator_s
    )
    busy, idle = harness.engine.accelerator_seconds()
    assert busy == harness.engine.ledger.busy_s and idle >= 0


class Charges(EngineObserver):
    """Each request's charged accelerator seconds when it ended, whatever the outcome."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def request_finished(self, req, reason, now, usage) -> None:
        self.seconds[req.request_id] = req.accelerator_s


@pytest.mark.parametrize("run_ahead", [False, True], ids=["in-step", "run-ahead"])
def test_charges_add_up_to_busy_time_after_retries_and_splits(tiny_adapter, faults, run_ahead) -> None:
    """Failed attempts, halved retries, out-of-memory splits and requests that fail: every
    second of model work is still charged to exactly the requests it was spent on."""
    charges = Charges()
    h = Harness({"tiny": tiny_adapter}, observers=[charges], run_ahead=run_ahead)
    faults("oom_above_rows=6;forward_error=BREAKS;request_error=POISON")
    ids = [f"r{i}" for i in range(4)]
    for i, rid in enumerate(ids):
        h.submit(params(rid, steps=3, seed=i, preview_every=2))
    h.submit(params("breaks", prompt="this BREAKS the forward", steps=3))
    h.submit(params("poison", prompt="POISON", steps=3, guidance_scale=1.0))
    h.run_until_idle()
    assert set(charges.seconds) == {*ids, "breaks", "poison"}
    assert all(seconds > 0 for seconds in charges.seconds.values())
    assert sum(charges.seconds.values()) == pytest.approx(h.engine.ledger.busy_s, rel=1e-9)
    assert h.engine.scheduler.capacity["tiny"] < 16  # it did split for memory
    for rid in ids:
        assert h.result(rid).usage.accelerator_s == charges.seconds[rid]


def test_requests_of_equal_shape_pay_equal_shares(harness) -> None:
    """Same size, steps, guidance and images, run together: the same charge to the last bit,
    whatever their prompts and seeds (the shares split each piece of work by rows/images)."""
    for i, prompt in enumerate(["a red circle", "a blue square on the left", "x"]):
        harness.submit(params(f"p{i}", prompt=prompt, seed=i, steps=4))
    harness.submit(params("unguided", steps=4, guidance_scale=1.0))  # a different shape
    harness.run_until_idle()
    charged = {harness.result(f"p{i}").usage.accelerator_s for i in range(3)}
    assert len(charged) == 1
    assert harness.result("unguided").usage.accelerator_s < charged.pop()


def test_running_ahead_queues_the_next_step_before_reading_the_last(tiny_adapter) -> None:
    """Run-ahead: step k+1 is handed to the accelerator before step k's progress (with its
    preview) is read and sent; in-step: each step is sent before the next one starts. With
    no next step to queue, the last results go out in the same iteration."""
    orders = {}
    for run_ahead in (False, True):
        h = Harness({"tiny": tiny_adapter}, run_ahead=run_ahead)
        log: list[str] = []
        original = tiny_adapter.denoise_step

        def spy(reqs, original=original, log=log):
            log.append(f"forward {reqs[0].steps_done + 1}")
            return original(reqs)

        def sink(ev, log=log) -> None:
            if isinstance(ev, ProgressEvent):
                assert ev.preview is not None
                log.append(f"progress {ev.step}")
            elif isinstance(ev, ResultEvent):
                log.append("result")

        tiny_adapter.denoise_step = spy
        try:
            h.engine.submit(params("a", steps=3, preview_every=1), sink)
            for _ in range(3):
                h.engine.run_once()
        finally:
            tiny_adapter.denoise_step = original
        orders[run_ahead] = log
    assert orders[False] == [
        "forward 1",
        "progress 1",
        "forward 2",
        "progress 2",
        "forward 3",
        "progress 3",
        "result",
    ]
    assert orders[True] == [
        "forward 1",
        "forward 2",
        "progress 1",
        "forward 3",
        "progress 2",
        "progress 3",
        "result",
    ]


def test_running_ahead_changes_no_output(tiny_adapter) -> None:
    """The same requests, in-step and running ahead: the same images, previews, steps and
    batches; every second of model work charged once either way."""
    runs = {}
    for run_ahead in (False, True):
        h = Harness({"tiny": tiny_adapter}, run_ahead=run_ahead)
        h.submit(params("a", steps=5, preview_every=1, seed=3))
        h.submit(params("b", steps=3, preview_every=2, seed=4, guidance_scale=1.0, sampler=Sampler.DDIM))
        h.step(2)
        h.submit(params("c", steps=2, num_images=2, seed=5))
        h.run_until_idle()
        usages = [h.result(r).usage for r in "abc"]
        assert sum(u.accelerator_s for u in usages) == pytest.approx(h.engine.ledger.busy_s, rel=1e-9)
        assert h.engine.in_flight() == 0
        runs[run_ahead] = h.events
    for rid in "abc":
        ahead, in_step = runs[True][rid], runs[False][rid]
        assert [type(e) for e in ahead] == [type(e) for e in in_step]
        for x, y in zip(ahead, in_step, strict=True):
            if isinstance(x, ProgressEvent):
                assert x.step == y.step
                assert (x.preview is None) == (y.preview is None)
                if x.preview is not None:
                    np.testing.assert_array_equal(x.preview, y.preview)
            elif isinstance(x, ResultEvent):
                for a, b in zip(x.images, y.images, strict=True):
                    np.testing.assert_array_equal(a, b)
                assert x.usage.mean_batch_size == y.usage.mean_batch_size


def test_a_failed_engine_still_sends_the_results_it_finished(tiny_adapter, faults) -> None:
    """Running ahead, a finished request's images wait for the next step to be queued; if
    that step kills the engine, the finished request still gets its images and the others
    end with the engine's failure (nobody is left without an answer)."""
    h = Harness({"tiny": tiny_adapter}, run_ahead=True)
    h.engine.scheduler.lower_capacity("tiny", 2)  # the crasher waits for the short one's slot
    h.submit(params("long", steps=6))
    h.submit(params("short", steps=2, seed=2))
    h.submit(params("crasher", prompt="KILL-THE-ENGINE now", steps=2, seed=3))
    faults("crash=KILL-THE-ENGINE")
    failures: list[BaseException] = []
    h.engine.on_failure = failures.append
    h.engine.run_forever()  # the engine thread's loop, here: it ends when the crasher's step kills it
    assert len(failures) == 1 and "injected engine crash" in str(failures[0])
    assert len(h.result("short").images) == 1
    for rid in ("long", "crasher"):
        failed = h.failure(rid)
        assert failed.reason is FinishReason.ERROR and "the engine failed" in failed.message
    assert h.engine.in_flight() == 0


class LostDevice(RuntimeError):
    """What a CUDA device error looks like to the engine: raised at the next wait."""


def test_a_device_error_while_running_ahead_answers_every_request(tiny_adapter) -> None:
    """A device error surfaces when the engine waits for a mark, not in the step that caused
    it. Running ahead, a finished request's images may be behind such a mark: it cannot get
    them, and gets the engine's failure instead of silence; so does everyone else."""
    h = Harness({"tiny": tiny_adapter}, run_ahead=True)
    h.submit(params("long", steps=6))
    h.submit(params("short", steps=2, seed=2))
    lost = {"now": False}
    original = tiny_adapter.mark

    class Mark:  # the adapter's own mark, until the "device" is lost
        def __init__(self) -> None:
            self.inner = original()

        def wait(self) -> None:
            if lost["now"]:
                raise LostDevice("CUDA error: an illegal memory access was encountered")

        def seconds_since(self, start: Mark) -> float:
            self.wait()
            return self.inner.seconds_since(start.inner)

    tiny_adapter.mark = Mark
    try:
        h.step(2)  # short is finished; its images wait for step 3 to be queued
        assert h.engine.scheduler.running.keys() == {"long"}
        assert not any(isinstance(e, ResultEvent | FailedEvent) for e in h.events["short"])
        lost["now"] = True
        failures: list[BaseException] = []
        h.engine.on_failure = failures.append
        h.engine.run_forever()
    finally:
        tiny_adapter.mark = original
    assert len(failures) == 1 and isinstance(failures[0], LostDevice)
    for rid in ("short", "long"):
        failed = h.failure(rid)
        assert failed.reason is FinishReason.ERROR and "illegal memory access" in failed.message
    assert h.engine.in_flight() == 0


def test_a_completion_that_fails_partway_still_answers_its_requests(tiny_adapter) -> None:
    """A device error can also surface inside a completion, after its mark was reached (here:
    timing the decode whose images the completion was about to send). The requests whose
    results it was sending get the engine's failure, not silence, as does everyone else."""
    h = Harness({"tiny": tiny_adapter})
    h.submit(params("long", steps=6))
    h.submit(params("short", steps=2, seed=2))
    ledger = h.engine.ledger
    charge = ledger.charge

    def failing_charge(reqs, weights, start, end):  # the decode of "short": one image
        if [r.request_id for r in reqs] == ["short"] and list(weights) == [1]:
            raise LostDevice("CUDA error: an illegal memory access was encountered")
        return charge(reqs, weights, start, end)

    ledger.charge = failing_charge  # type: ignore[method-assign]
    failures: list[BaseException] = []
    h.engine.on_failure = failures.append
    h.engine.run_forever()
    assert len(failures) == 1 and isinstance(failures[0], LostDevice)
    for rid in ("short", "long"):
        failed = h.failure(rid)
        assert failed.reason is FinishReason.ERROR and "illegal memory access" in failed.message
    assert h.engine.in_flight() == 0


def test_previews_through_a_tiny_preview_decoder(tiny_sd_dir, tmp_path) -> None:
    """--model-option NAME.preview_decoder=PATH: previews decoded by diffusers' AutoencoderTiny
    (TAESD) at the image's own size instead of the linear map's latent-size sketch; the final
    images do not change."""
    from stepserve.server.engine.models import load_model
    from stepserve.server.engine.models.registry import ModelLoadError

    from .tiny_pipelines import build_tiny_preview_decoder

    decoder = build_tiny_preview_decoder(tmp_path / "taesd")
    images = {}
    for name, overrides in (("linear", {}), ("taesd", {"preview_decoder": str(decoder)})):
        adapter = load_model("tiny", tiny_sd_dir, overrides=overrides)
        assert (adapter.preview_decoder is not None) == (name == "taesd")
        h = Harness({"tiny": adapter})
        h.submit(params("a", steps=3, preview_every=1))
        h.submit(params("b", steps=3, preview_every=2, seed=5))
        h.run_until_idle()
        previews = [e.preview for e in h.events["a"] if isinstance(e, ProgressEvent)]
        expected = (32, 32, 3) if name == "taesd" else (16, 16, 3)
        assert [p.shape for p in previews] == [expected] * 3
        assert all(p.dtype == np.uint8 for p in previews)
        images[name] = h.result("a").images[0]
    np.testing.assert_array_equal(images["linear"], images["taesd"])
    with pytest.raises(ModelLoadError, match="preview decoder .* is not a diffusers AutoencoderTiny"):
        load_model("tiny", tiny_sd_dir, overrides={"preview_decoder": str(tmp_path / "nowhere")})


def test_stall_clock_restarts_with_every_iteration(tiny_adapter) -> None:
    """The liveness watchdog reads ``stalled_s``: it counts time inside one iteration only, so
    an engine that keeps stepping (however long it idled before) never reads as stalled."""
    import time

    h = Harness({"tiny": tiny_adapter})
    time.sleep(0.3)  # idle time before work arrives is not a stall
    h.submit(params("a", steps=3))
    for _ in range(3):
        h.step()
        assert h.engine.stalled_s() < 0.2
