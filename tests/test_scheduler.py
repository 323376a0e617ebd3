"""The step planner alone: explicit clock and arrivals, no torch, no threads."""

from __future__ import annotations

import pytest

from stepserve.server.engine.request import RequestState, RequestStatus
from stepserve.server.engine.scheduler import RequestLevelScheduler, StepLevelScheduler, make_scheduler
from stepserve.server.engine.types import GenerationParams, Priority, Sampler


def req(
    rid: str,
    t: float = 0.0,
    *,
    steps: int = 3,
    images: int = 1,
    model: str = "m",
    size: int = 64,
    deadline: float | None = None,
    priority: Priority = Priority.INTERACTIVE,
) -> RequestState:
    p = GenerationParams(
        request_id=rid,
        model=model,
        prompt="p",
        negative_prompt="",
        width=size,
        height=size,
        steps=steps,
        guidance_scale=7.5,
        seed=0,
        sampler=Sampler.EULER,
        cfg=True,
        num_images=images,
        deadline=deadline,
        priority=priority,
    )
    return RequestState(params=p, arrival_time=t)


def run_step(s, now: float):
    """One planner iteration with a fake runner: every request in the batch advances one step."""
    plan = s.schedule(now)
    for r in s.update(plan.batch):
        s.finish(r, RequestStatus.FINISHED_OK, now)
    return plan


def ids(rs: list[RequestState]) -> list[str]:
    return [r.request_id for r in rs]


def test_admits_up_to_capacity_in_images_and_keeps_fifo() -> None:
    s = StepLevelScheduler({"m": 4})
    for r in (req("a", images=2), req("b", images=3), req("c", images=1)):
        s.add(r)
    plan = s.schedule(0.0)
    # b does not fit after a; c would, but must not overtake b.
    assert ids(plan.admitted) == ["a"]
    assert ids(plan.batch) == ["a"]
    assert ids(s.waiting) == ["b", "c"]


def test_requests_join_and_leave_between_steps() -> None:
    s = StepLevelScheduler({"m": 8})
    a = req("a", steps=4)
    s.add(a)
    assert ids(run_step(s, 0.0).batch) == ["a"]
    s.add(req("b", t=0.5, steps=2))
    plan = run_step(s, 1.0)
    assert ids(plan.admitted) == ["b"]
    assert ids(plan.batch) == ["a", "b"]  # b joined a running batch
    assert ids(run_step(s, 2.0).batch) == ["a", "b"]  # b's second and last step
    assert "b" not in s.running and a.steps_done == 3
    assert ids(run_step(s, 3.0).batch) == ["a"]  # b left, a goes on
    assert not s.running and a.status is RequestStatus.FINISHED_OK


def test_freed_capacity_admits_waiting_request_at_next_step() -> None:
    s = StepLevelScheduler({"m": 1})
    s.add(req("a", steps=2))
    s.add(req("b", steps=2))
    assert ids(run_step(s, 0).batch) == ["a"]
    assert s.queue_positions() == {"b": 0}
    assert ids(run_step(s, 1).batch) == ["a"]
    plan = run_step(s, 2)
    assert ids(plan.admitted) == ["b"] and ids(plan.batch) == ["b"]


def test_buckets_take_turns() -> None:
    s = StepLevelScheduler({"m": 8})
    s.add(req("small1", size=64, steps=10))
    s.add(req("small2", size=64, steps=10))
    s.add(req("big", t=0.1, size=128, steps=10))
    batches = [ids(run_step(s, float(i)).batch) for i in range(4)]
    assert batches == [["small1", "small2"], ["big"], ["small1", "small2"], ["big"]]


def test_cancel_and_deadline_take_effect_at_the_next_boundary() -> None:
    s = StepLevelScheduler({"m": 8})
    s.add(req("a", steps=5))
    s.add(req("b", steps=5, deadline=2.5))
    s.add(req("c", steps=5))
    run_step(s, 0)
    s.abort("a", RequestStatus.FINISHED_CANCELLED)
    plan = run_step(s, 1)
    assert ids(plan.aborted) == ["a"] and ids(plan.batch) == ["b", "c"]
    plan = run_step(s, 3)
    assert ids(plan.aborted) == ["b"] and plan.aborted[0].status is RequestStatus.FINISHED_DEADLINE
    assert ids(plan.batch) == ["c"]
    # An abort for a request that already ended is forgotten, not applied to a newcomer.
    s.abort("a", RequestStatus.FINISHED_CANCELLED)
    run_step(s, 4)
    s.add(req("a", t=5, steps=1))
    assert ids(run_step(s, 5).batch) == ["c", "a"]


def test_waiting_request_past_deadline_leaves_the_queue() -> None:
    s = StepLevelScheduler({"m": 1})
    s.add(req("a", steps=5))
    s.add(req("b", steps=5, deadline=1.0))
    run_step(s, 0)
    plan = run_step(s, 1.5)
    assert ids(plan.aborted) == ["b"] and not s.waiting


def test_models_have_separate_capacity() -> None:
    s = StepLevelScheduler({"m": 1, "n": 1})
    s.add(req("a", model="m"))
    s.add(req("b", model="m"))
    s.add(req("c", model="n"))
    plan = s.schedule(0)
    assert ids(plan.admitted) == ["a", "c"]
    assert s.queue_positions() == {"b": 0}


def test_request_level_batch_runs_to_completion_before_next_forms() -> None:
    s = RequestLevelScheduler({"m": 2}, max_delay_s=1.0)
    s.add(req("a", t=0.0, steps=3))
    plan = s.schedule(0.2)
    assert not plan.batch and plan.wake_at == pytest.approx(1.0)  # waiting for the batch to fill
    s.add(req("b", t=0.3, steps=1))
    assert ids(run_step(s, 0.4).batch) == ["a", "b"]  # full: starts before the delay
    s.add(req("c", t=0.5, steps=1))
    assert ids(run_step(s, 0.6).batch) == ["a"]  # b finished, c may not join
    assert ids(run_step(s, 0.7).batch) == ["a"]
    plan = run_step(s, 2.0)  # batch done; c waited past the delay: starts alone
    assert ids(plan.batch) == ["c"]


def test_estimated_wait_grows_with_position() -> None:
    s = StepLevelScheduler({"m": 1})
    s.add(req("a", steps=10))
    s.add(req("b", steps=10))
    s.add(req("c", steps=10))
    run_step(s, 0)
    w0 = s.estimated_wait(0, "m", 0.1, 10)
    w1 = s.estimated_wait(1, "m", 0.1, 10)
    assert w0 == pytest.approx(0.9)  # a has 9 steps left
    assert w1 > w0


def test_too_many_images_for_the_model_is_refused() -> None:
    s = StepLevelScheduler({"m": 2})
    with pytest.raises(ValueError, match="more than model"):
        s.check_admissible(req("a", images=3).params)
    s.check_admissible(req("b", images=2).params)


def test_make_scheduler_rejects_unknown_mode() -> None:
    assert isinstance(make_scheduler("step", {"m": 1}, 0), StepLevelScheduler)
    with pytest.raises(ValueError, match="unknown batching mode"):
        make_scheduler("static", {"m": 1}, 0)


def test_interactive_requests_go_before_waiting_batch_requests() -> None:
    s = StepLevelScheduler({"m": 1}, {Priority.INTERACTIVE: 0.0, Priority.BATCH: 60.0})
    s.add(req("running", 0.0, steps=100))
    run_step(s, 0.0)
    s.add(req("batch-1", 1.0, priority=Priority.BATCH))
    s.add(req("batch-2", 2.0, priority=Priority.BATCH))
    s.add(req("inter-1", 3.0))
    s.add(req("inter-2", 50.0))
    # Interactive first (in arrival order), batch after (in arrival order).
    assert ids(s.waiting) == ["inter-1", "inter-2", "batch-1", "batch-2"]
    assert s.queue_positions() == {"inter-1": 0, "inter-2": 1, "batch-1": 2, "batch-2": 3}


def test_batch_requests_age_so_interactive_traffic_cannot_starve_them() -> None:
    """A batch request that arrived at t is overtaken only by interactive requests that arrive
    before t + delay: under an endless interactive stream it still gets served."""
    s = StepLevelScheduler({"m": 1}, {Priority.INTERACTIVE: 0.0, Priority.BATCH: 10.0})
    s.add(req("batch", 0.0, steps=1, priority=Priority.BATCH))
    served: list[str] = []
    t = 0.0
    i = 0
    while "batch" not in served:
        assert t < 100, "the batch request starved"
        s.add(req(f"i{i}", t, steps=1))  # a new interactive request every step
        i += 1
        plan = run_step(s, t)
        served += ids(plan.batch)
        t += 1.0
    # It waited behind exactly the interactive requests that arrived before its 10 s delay ran
    # out (i0..i9 at t = 0..9); i10, arriving at t = 10, ties and queues behind the older one.
    assert served.index("batch") == 10
    assert served[:10] == [f"i{k}" for k in range(10)]


def test_equal_keys_keep_arrival_order_across_classes() -> None:
    s = StepLevelScheduler({"m": 1}, {Priority.INTERACTIVE: 0.0, Priority.BATCH: 5.0})
    s.add(req("running", 0.0, steps=100))
    run_step(s, 0.0)
    s.add(req("b", 0.0, priority=Priority.BATCH))  # key 5.0
    s.add(req("i", 5.0))  # key 5.0, arrived later
    assert ids(s.waiting) == ["b", "i"]


def test_models_share_the_accelerator_in_turns() -> None:
    """Two busy models alternate forwards (each bucket in turn), each with its own capacity:
    a model with a long queue does not starve the other."""
    s = StepLevelScheduler({"xl": 2, "lcm": 4})
    for i in range(6):
        s.add(req(f"xl{i}", t=0.0, model="xl", steps=5))
    s.add(req("lcm0", t=0.5, model="lcm", steps=2))
    models = [run_step(s, float(i)).batch[0].model for i in range(6)]
    assert models[:4] == ["xl", "lcm", "xl", "lcm"]  # lcm0's 2 steps interleave with xl's
    assert models[4:] == ["xl", "xl"]
    assert ids(s.waiting)[:1] == ["xl2"]  # xl's own capacity (2) bounds its batch
