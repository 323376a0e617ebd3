"""The SLO policy and the step-time curve alone: driven clock, no torch, no threads."""

from __future__ import annotations

import pytest

from stepserve.server.engine.request import RequestStatus
from stepserve.server.engine.scheduler import SloScheduler, StepLevelScheduler, make_scheduler
from stepserve.server.engine.step_times import PRIOR_S_PER_ROW, StepTimes
from stepserve.server.engine.types import Priority

from .test_scheduler import ids, req

B = Priority.BATCH


def curve(points: dict[int, float], size: int = 64, model: str = "m") -> StepTimes:
    st = StepTimes()
    for rows, s in points.items():
        st.record(model, size, size, rows, s)
    return st


# rows -> seconds: 0.1 s alone (one CFG image = 2 rows), 1 s for 4 images.
FLAT_THEN_LINEAR = {2: 0.1, 4: 0.25, 6: 0.5, 8: 1.0}


def slo(cap: int = 4, st: StepTimes | None = None, **kw) -> SloScheduler:
    return SloScheduler({"m": cap}, step_times=st or curve(FLAT_THEN_LINEAR), **kw)


def step(s, now: float):
    """One iteration with a fake runner: the batch advances one step; the finished leave."""
    plan = s.schedule(now)
    for r in s.update(plan.batch):
        s.finish(r, RequestStatus.FINISHED_OK, now)
    return plan


def test_the_step_time_curve_interpolates_extrapolates_and_errs_long() -> None:
    st = curve({2: 0.1, 8: 0.4})
    assert st.estimate("m", 64, 64, 2) == 0.1
    assert st.estimate("m", 64, 64, 4) == pytest.approx(0.2)  # between measured points
    assert st.estimate("m", 64, 64, 16) == pytest.approx(0.8)  # linear beyond the largest
    assert st.estimate("m", 64, 64, 1) == 0.1  # never faster than the smallest measured
    # A size never run: the nearest measured one, scaled up by pixels, never down.
    assert st.estimate("m", 128, 128, 2) == pytest.approx(0.4)
    assert st.estimate("m", 32, 32, 2) == 0.1
    assert st.estimate("other", 64, 64, 3) == pytest.approx(3 * PRIOR_S_PER_ROW)
    st.record("m", 64, 64, 2, 0.12)  # the second replaces the first (one-time costs)...
    assert st.estimate("m", 64, 64, 2) == 0.12
    st.record("m", 64, 64, 2, 0.2)  # ...later ones are smoothed in
    assert 0.12 < st.estimate("m", 64, 64, 2) < 0.2


def test_admission_estimate_knows_the_requests_size() -> None:
    """Issue 19's case: the step time measured on 32x32 forwards; a first 64x64 request of
    150 steps is estimated at 4x the 32x32 step, not at the recent step time."""
    st = curve({2: 0.0157}, size=32)
    s = StepLevelScheduler({"m": 4}, step_times=st)
    big = req("big", steps=150, size=64)
    s.add(big)
    assert s.estimate_finish_s(big, 0.0, 20) == pytest.approx(150 * 4 * 0.0157)  # 9.4 s, not 2.4


def test_interactive_first_then_least_slack() -> None:
    """Three batch-class requests with deadlines and an interactive one, capacity lowered to
    two: the interactive steps, then the batch request with the least slack."""
    s = slo(cap=4)
    for r in (
        req("far", 0.0, steps=10, priority=B, deadline=100.0),
        req("near", 0.1, steps=10, priority=B, deadline=20.0),
        req("mid", 0.2, steps=10, priority=B, deadline=50.0),
        req("inter", 0.3, steps=10),
    ):
        s.add(r)
    step(s, 1.0)
    s.lower_capacity("m", 2)
    plan = step(s, 2.0)
    assert sorted(ids(plan.batch)) == ["inter", "near"]
    assert sorted(ids(plan.paused)) == ["far", "mid"]


def test_a_smaller_forward_when_it_lets_an_urgent_request_meet_its_objective() -> None:
    """Three batch requests run; an interactive one with a 2 s objective arrives. With all four
    a step takes 1 s (10 steps: 10 s); alone 0.1 s (1 s): the batch requests pause until it is
    done, then resume where they stopped."""
    s = slo(cap=4)
    for i in range(3):
        s.add(req(f"b{i}", 0.0, steps=30, priority=B))
    stepped = {f"b{i}": 0 for i in range(3)}

    def count(plan):
        for r in plan.batch:
            stepped[r.request_id] = stepped.get(r.request_id, 0) + 1
        return plan

    for t in range(3):
        count(step(s, float(t)))
    s.add(req("urgent", 3.0, steps=10, deadline=5.0))
    plan = count(step(s, 3.0))
    assert ids(plan.admitted) == ["urgent"]
    assert ids(plan.batch) == ["urgent"]
    assert sorted(ids(plan.paused)) == ["b0", "b1", "b2"]
    assert s.load({"m": 0.1}).paused["m"] == 3
    # Each step takes what the curve says for its rows; batch requests rejoin only as far as
    # the urgent one still makes it.
    t = 3.0 + s.step_estimate(plan.batch)
    while "urgent" in s.running:
        plan = count(step(s, t))
        assert "urgent" in ids(plan.batch)
        t += s.step_estimate(plan.batch)
    assert t <= 5.0
    while len(plan.batch) < 3:
        plan = count(step(s, t))
        t += s.step_estimate(plan.batch)
    # Each resumed where it stopped: as many steps done as forwards it was in.
    assert all(r.pauses == 1 and not r.paused for r in s.running.values())
    assert {r.request_id: r.steps_done for r in s.running.values()} == {
        b: stepped[b] for b in ("b0", "b1", "b2")
    }


def test_no_smaller_forward_for_a_request_that_cannot_make_it_anyway() -> None:
    s = slo(cap=4)
    for i in range(3):
        s.add(req(f"b{i}", 0.0, steps=30, priority=B))
    s.add(req("hopeless", 0.0, steps=50, deadline=1.0))  # 50 steps alone: 5 s
    plan = step(s, 0.0)
    assert len(plan.batch) == 4 and not plan.paused


def test_no_smaller_forward_without_objectives_fifo_throughput() -> None:
    s = slo(cap=4)
    for i in range(4):
        s.add(req(f"r{i}", 0.0, steps=5))
    for t in range(5):
        assert len(step(s, float(t)).batch) == 4


def test_interactive_arrival_preempts_batch_requests_within_the_paused_cap() -> None:
    s = slo(cap=2, max_paused_images=1)
    s.add(req("b0", 0.0, steps=20, priority=B))
    s.add(req("b1", 0.0, steps=20, priority=B))
    step(s, 0.0)
    s.add(req("i0", 1.0, steps=5))
    s.add(req("i1", 1.0, steps=5))
    plan = step(s, 1.0)
    # One displaced (the paused cap is 1 image); i1 waits for a slot.
    assert ids(plan.admitted) == ["i0"] and ids(s.waiting) == ["i1"]
    assert sorted(ids(plan.batch)) == ["b0", "i0"] and ids(plan.paused) == ["b1"]
    # fifo never preempts: the interactive requests wait.
    f = make_scheduler("step", {"m": 2}, 0.0, policy="fifo")
    f.add(req("b0", 0.0, steps=20, priority=B))
    f.add(req("b1", 0.0, steps=20, priority=B))
    step(f, 0.0)
    f.add(req("i0", 1.0, steps=5))
    assert not step(f, 1.0).admitted


def test_a_permanent_interactive_flood_cannot_starve_batch_requests() -> None:
    """One slot, a new interactive request (objective 2 s) arriving every step forever: a
    running batch request is left out at most max_pause_s at a time, and a waiting one is
    admitted by aging; both finish."""
    s = slo(cap=1, max_paused_images=1, interactive_slo_s=2.0, max_pause_s=5.0)
    s.add(req("running-batch", 0.0, steps=6, priority=B))
    step(s, 0.0)
    s.add(req("waiting-batch", 0.5, steps=3, priority=B))
    last_step: dict[str, float] = {}
    longest_gap = 0.0
    t, i = 1.0, 0
    while any(r.params.priority is B for r in [*s.running.values(), *s.waiting]):
        assert t < 200, "a batch request starved"
        s.add(req(f"i{i}", t, steps=2))
        i += 1
        plan = step(s, t)
        for r in plan.batch:
            if r.params.priority is B:
                longest_gap = max(longest_gap, t - last_step.get(r.request_id, r.admitted_time or t))
                last_step[r.request_id] = t
        t += 1.0
    assert set(last_step) == {"running-batch", "waiting-batch"}
    assert longest_gap <= 5.0 + 1.0 + 1.0  # the bound, plus a step, plus the step it waited for


def test_make_scheduler_rejects_an_unknown_policy() -> None:
    with pytest.raises(ValueError, match="scheduling policy"):
        make_scheduler("step", {"m": 1}, 0.0, policy="edf")


def test_waiting_requests_with_objectives_are_served_by_latest_start() -> None:
    s = slo(cap=1)
    s.add(req("running", 0.0, steps=50))
    step(s, 0.0)
    s.add(req("loose", 0.1, steps=10, deadline=100.0))  # latest start 100 - 10 x 0.1 = 99
    s.add(req("tight", 0.2, steps=10, deadline=5.0))  # 4
    s.add(req("none", 0.3, steps=10))  # no objective: its arrival, 0.3
    s.add(req("batch", 0.0, steps=1, priority=B))  # 0 + 60 s class delay
    assert ids(s.waiting) == ["none", "tight", "batch", "loose"]


@pytest.mark.parametrize(("others", "shrinks"), [(Priority.INTERACTIVE, False), (B, True)])
@pytest.mark.parametrize("points", [{2: 0.1, 8: 0.4}, {2: 0.1, 8: 0.13}])  # linear (CPU), flat (GPU)
def test_only_batch_class_requests_step_aside_for_an_urgent_one(
    points: dict[int, float], others: Priority, shrinks: bool
) -> None:
    """One urgent interactive request (10 steps due in 1.15 s: at most 0.105 s per step, so
    it needs a forward of one) and three with more time (deadline 8 s). Batch-class ones
    step aside for it; interactive ones with objectives of their own do not (bench/simulate.py
    and the real server both measured that as a loss), whatever the curve."""
    s = slo(cap=4, st=curve(points))
    s.add(req("urgent", 0.0, steps=10, deadline=1.15))
    for i in range(3):
        s.add(req(f"r{i}", 0.0, steps=10, deadline=8.0, priority=others))
    plan = step(s, 0.0)
    assert ids(plan.batch) == (["urgent"] if shrinks else ["urgent", "r0", "r1", "r2"])


def test_a_generous_deadline_does_not_turn_the_class_objective_off() -> None:
    s = slo(interactive_slo_s=2.0)
    assert s.objective(req("safety-net", 1.0, deadline=600.0)) == 3.0
    assert s.objective(req("tight", 1.0, deadline=2.5)) == 2.5
    assert s.objective(req("batch", 1.0, deadline=600.0, priority=B)) == 600.0
    assert s.objective(req("none", 1.0, priority=B)) is None


def test_request_level_estimates_wait_for_the_running_batch() -> None:
    """Nobody joins a running batch: a newcomer's estimate counts the running batch's last
    member's steps, where the step-level one starts at once."""
    from stepserve.server.engine.scheduler import RequestLevelScheduler

    st = curve(FLAT_THEN_LINEAR)
    r = RequestLevelScheduler({"m": 4}, 0.0, step_times=st)
    r.add(req("running", 0.0, steps=20))
    step(r, 0.0)
    r.add(new := req("new", 1.0, steps=10))
    # 19 steps of the running one alone (0.1 s), then its own 10 steps alone.
    assert r.estimate_finish_s(new, 1.0, 20) == pytest.approx(19 * 0.1 + 10 * 0.1)
    f = StepLevelScheduler({"m": 4}, step_times=st)
    f.add(req("running", 0.0, steps=20))
    step(f, 0.0)
    f.add(new := req("new", 1.0, steps=10))
    assert f.estimate_finish_s(new, 1.0, 20) == pytest.approx(10 * 0.25)  # with it, 2 images


def test_admission_estimates_an_interactive_request_that_would_preempt_as_the_policy_runs_it() -> None:
    """A full batch of batch-class requests: an interactive request with a 2 s deadline would
    wait for a slot under fifo (8 steps of the shortest at 1 s, then its 10 with the others:
    refused), but under slo it displaces them and runs alone (10 x 0.1 s)."""
    fifo = StepLevelScheduler({"m": 4}, step_times=curve(FLAT_THEN_LINEAR))
    for scheduler, expect in ((fifo, 18.0), (slo(), 1.0)):
        for i in range(4):
            scheduler.add(req(f"b{i}", 0.0, steps=10 + i, priority=B))
        step(scheduler, 0.0)
        step(scheduler, 1.0)
        scheduler.add(urgent := req("urgent", 2.0, steps=10, deadline=4.0))
        assert scheduler.estimate_finish_s(urgent, 2.0, 20) == pytest.approx(expect)


def test_interactive_requests_that_cannot_all_make_it_still_run_in_a_small_forward() -> None:
    """Two interactive requests, each able to meet its objective alone but not together, and
    batch requests filling the batch: the forward is the two of them (late, but fast), not the
    full batch (the real flood's slowest requests ran at the full batch's pace)."""
    s = slo(cap=6)
    for i in range(4):
        s.add(req(f"b{i}", 0.0, steps=50, priority=B))
    step(s, 0.0)
    s.add(req("i0", 1.0, steps=10, deadline=2.2))  # alone: 11 x 0.1 = 1.1 s; together 2.75 s
    s.add(req("i1", 1.0, steps=10, deadline=2.2))
    plan = step(s, 1.0)
    assert sorted(ids(plan.batch)) == ["i0", "i1"]
