"""What scheduling can do with a given step-time curve: replays the benchmark's workloads
against a step-time curve with the engine's own scheduler classes (``make_scheduler``: the
request-level batcher, step-level ``fifo`` and ``slo``), on a simulated clock.

No model, no server: seconds per forward come from the curve, plus the encode and decode
costs; the scheduler is the one the server runs, so what it decides here is what it decides
there. It answers "is this latency target reachable by scheduling on this hardware?" without
hours of benchmark runs; `make bench` measures the real thing.

Workloads:
- **mix**: Poisson arrivals, steps from {4, 10, 20, 30, 50}; p50/p99 latency per policy.
- **slo**: the mix with each request's objective = k x its lone latency (k = 2 and 4) as its
  deadline (a request past it is dropped, as a gRPC deadline does): SLO attainment (share of
  arrivals finished within their objective) and goodput (those per second), at 50-120% load.
- **flood**: as many closed-loop batch-class 50-step streams as the batch holds, plus Poisson
  interactive 10-step requests among them whose objective is 2x their lone latency
  (``--interactive-slo-s``): the interactive requests' latency and time to first preview, and
  the batch streams' throughput.

    python bench/simulate.py --results bench/results/<run>.json   # the curve a run measured
    python bench/simulate.py --curve 1:0.05,16:0.06                # a GPU-like, flat curve
    python bench/simulate.py --results ... --json out.json         # the tables as JSON too
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import random
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadgen import MIX_STEPS  # the benchmark's own mix and percentiles (bench/ is on the path)
from run import percentile

from stepserve.server.engine.request import RequestState, RequestStatus
from stepserve.server.engine.scheduler import BaseScheduler, make_scheduler
from stepserve.server.engine.step_times import StepTimes
from stepserve.server.engine.types import GenerationParams, Priority, Sampler

MODEL = "m"
SIZE = 64
POLICIES = ("request", "fifo", "slo")
# Request-level batching's longest wait for a batch to fill (the server's default).
REQUEST_DELAY_S = 0.05
FLOOD_STEPS = 50
INTERACTIVE_STEPS = 10


@dataclass
class Costs:
    """Seconds per forward by batch size (interpolated), per encode, per decode of n images."""

    step_s: dict[int, float]
    prepare_s: float = 0.01
    decode_s: dict[int, float] = field(default_factory=lambda: {1: 0.02})

    def _interp(self, table: dict[int, float], b: int) -> float:
        ks = sorted(table)
        if b <= ks[0]:
            return table[ks[0]]
        for lo, hi in zip(ks, ks[1:], strict=False):
            if b <= hi:
                return table[lo] + (table[hi] - table[lo]) * (b - lo) / (hi - lo)
        return table[ks[-1]] * b / ks[-1]

    def step(self, b: int) -> float:
        return self._interp(self.step_s, b)

    def decode(self, n: int) -> float:
        return self._interp(self.decode_s, n)

    def lone(self, steps: int) -> float:
        """Latency of a request alone: encode, its steps at batch 1, decode."""
        return self.prepare_s + steps * self.step(1) + self.decode(1)


@dataclass(frozen=True)
class Arrival:
    t: float
    steps: int
    priority: Priority = Priority.INTERACTIVE
    # Seconds after arrival by which it should be done, as its deadline (dropped after it).
    deadline_s: float | None = None
    # A closed-loop stream's request: the stream sends its next one when this one ends.
    stream: int | None = None


@dataclass
class Outcome:
    arrival: Arrival
    latency: float | None  # None: did not finish (dropped at its deadline, refused)
    first_step: float | None  # seconds from arrival to its first step's end (first preview)
    objective: float | None  # seconds after arrival it should be done by

    @property
    def met(self) -> bool:
        return self.latency is not None and (self.objective is None or self.latency <= self.objective)


def arrivals(
    rate: float,
    duration: float,
    seed: int,
    *,
    k: float | None = None,
    costs: Costs | None = None,
    steps: tuple[int, ...] = MIX_STEPS,
    priority: Priority = Priority.INTERACTIVE,
) -> list[Arrival]:
    """Poisson arrivals at ``rate`` for ``duration`` s, steps drawn from ``steps``; with ``k``,
    each with the deadline k x its lone latency on ``costs``."""
    rng = random.Random(seed)
    t, out = 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t > duration:
            return out
        s = rng.choice(steps)
        deadline = None if k is None or costs is None else k * costs.lone(s)
        out.append(Arrival(t, s, priority, deadline))


def scheduler_for(policy: str, costs: Costs, cap: int, interactive_slo_s: float | None) -> BaseScheduler:
    """The engine's scheduler for ``policy``, its step-time curve learned as a warmed-up
    server's would be (every batch size measured once)."""
    times = StepTimes()
    for b in range(1, cap + 1):
        times.record(MODEL, SIZE, SIZE, 2 * b, costs.step(b))  # one CFG image = 2 rows
    return make_scheduler(
        "request" if policy == "request" else "step",
        {MODEL: cap},
        REQUEST_DELAY_S,
        policy="slo" if policy == "slo" else "fifo",
        step_times=times,
        interactive_slo_s=interactive_slo_s,
    )


def _params(i: int, a: Arrival, now: float) -> GenerationParams:
    return GenerationParams(
        request_id=str(i),
        model=MODEL,
        prompt="",
        negative_prompt="",
        width=SIZE,
        height=SIZE,
        steps=a.steps,
        guidance_scale=7.5,
        seed=i,
        sampler=Sampler.EULER,
        cfg=True,
        deadline=None if a.deadline_s is None else now + a.deadline_s,
        priority=a.priority,
    )


def simulate(
    policy: str,
    arr: list[Arrival],
    costs: Costs,
    cap: int,
    *,
    streams: list[Arrival] = (),  # type: ignore[assignment]
    until: float | None = None,
    interactive_slo_s: float | None = None,
    reject_unmeetable: bool = True,
    redraw: random.Random | None = None,
) -> list[Outcome]:
    """Every request of ``arr`` (and of closed-loop ``streams``, each sending its next
    request when one ends, until ``until``: with the same steps, or steps drawn from the mix
    with ``redraw``) served by ``policy``'s scheduler: one outcome per request."""
    sched = scheduler_for(policy, costs, cap, interactive_slo_s)
    seq = itertools.count()
    pending: list[tuple[float, int, Arrival]] = [(a.t, next(seq), a) for a in [*arr, *streams]]
    heapq.heapify(pending)
    arrival_of: dict[str, Arrival] = {}
    first_step: dict[str, float] = {}
    outcomes: list[Outcome] = []
    t = 0.0

    def objective(req: RequestState) -> float | None:
        a = arrival_of[req.request_id]
        if a.deadline_s is not None:
            return a.deadline_s
        if interactive_slo_s is not None and a.priority is Priority.INTERACTIVE:
            return interactive_slo_s
        return None

    def ended(req: RequestState, now: float, ok: bool) -> None:
        a = arrival_of.pop(req.request_id)
        fs = first_step.pop(req.request_id, None)
        outcomes.append(
            Outcome(a, now - req.arrival_time if ok else None, fs, objective_of.pop(req.request_id))
        )
        if a.stream is not None and (until is None or now < until):
            steps = a.steps if redraw is None else redraw.choice(MIX_STEPS)
            again = Arrival(now, steps, a.priority, a.deadline_s, a.stream)
            heapq.heappush(pending, (now, next(seq), again))

    objective_of: dict[str, float | None] = {}
    while pending or sched.has_unfinished():
        while pending and pending[0][0] <= t:
            _, i, a = heapq.heappop(pending)
            req = RequestState(params=_params(i, a, a.t), arrival_time=a.t)
            arrival_of[req.request_id] = a
            objective_of[req.request_id] = objective(req)
            sched.add(req)
            deadline = req.params.deadline
            # The engine's deadline-aware admission (Engine._refuse_if_unmeetable).
            if (
                reject_unmeetable
                and deadline is not None
                and t + sched.estimate_finish_s(req, t, 20) > deadline
            ):
                sched.finish(req, RequestStatus.FINISHED_REJECTED, t)
                ended(req, t, ok=False)
        plan = sched.schedule(t)
        for req in plan.aborted:
            ended(req, t, ok=False)
        if plan.admitted:
            t += costs.prepare_s
        if plan.batch:
            t += costs.step(sum(r.params.num_images for r in plan.batch))
            for req in plan.batch:
                first_step.setdefault(req.request_id, t - req.arrival_time)
            done = sched.update(plan.batch)
            if done:
                t += costs.decode(len(done))
                for req in done:
                    sched.finish(req, RequestStatus.FINISHED_OK, t)
                    ended(req, t, ok=True)
        elif not plan.admitted:
            nxt = [x for x in (pending[0][0] if pending else None, plan.wake_at) if x is not None]
            if not nxt:
                if sched.has_unfinished():
                    raise RuntimeError("the scheduler holds requests but plans nothing")
                break
            t = max(t, min(nxt))
    return outcomes


def capacity(costs: Costs, cap: int, seconds: float = 600.0, policy: str = "fifo") -> float:
    """Requests/s of the mix with ``cap`` closed-loop streams (each request's steps drawn
    from the mix, seeded)."""
    rng = random.Random(1)
    streams = [Arrival(0.0, rng.choice(MIX_STEPS), stream=i) for i in range(cap)]
    out = simulate(policy, [], costs, cap, streams=streams, until=seconds, redraw=rng)
    return len(out) / max(o.arrival.t + (o.latency or 0.0) for o in out)


def latencies(outcomes: list[Outcome]) -> list[float]:
    return [o.latency for o in outcomes if o.latency is not None]


def costs_from_results(path: Path) -> Costs:
    parts = json.loads(path.read_text())["compute_parts"]

    def table(key: str) -> dict[int, float]:
        return {int(b): float(v) for b, v in parts[key].items()}

    prepare = table("prepare_s")
    return Costs(step_s=table("step_s"), prepare_s=prepare[min(prepare)], decode_s=table("decode_s"))


def costs_from_curve(text: str) -> Costs:
    pairs = [p.split(":") for p in text.split(",")]
    return Costs(step_s={int(b): float(s) for b, s in pairs})


def slo_table(
    costs: Costs, cap: int, cap_rps: float, loads: list[float], ks: list[float], duration: float, seeds: int
) -> dict[str, Any]:
    """SLO attainment and goodput per k, load and policy (means over seeds)."""
    out: dict[str, Any] = {}
    for k in ks:
        for frac in loads:
            row: dict[str, Any] = {}
            for policy in POLICIES:
                att, good = [], []
                for seed in range(seeds):
                    arr = arrivals(frac * cap_rps, duration, seed, k=k, costs=costs)
                    res = simulate(policy, arr, costs, cap)
                    att.append(sum(o.met for o in res) / max(1, len(res)))
                    good.append(sum(o.met for o in res) / duration)
                row[policy] = {"attainment": statistics.fmean(att), "goodput_rps": statistics.fmean(good)}
            out[f"k{k:g}_load{frac:g}"] = row
    return out


def flood(costs: Costs, cap: int, rate: float, duration: float, seeds: int) -> dict[str, Any]:
    """``cap`` batch-class 50-step streams and interactive 10-step arrivals at ``rate``/s with
    objective 2x their lone latency, per step-level policy."""
    slo_s = 2 * costs.lone(INTERACTIVE_STEPS)
    full_step = costs.step(cap)
    out: dict[str, Any] = {
        "interactive_lone_s": costs.lone(INTERACTIVE_STEPS),
        "interactive_objective_s": slo_s,
        "full_batch_step_s": full_step,
    }
    for policy in ("fifo", "slo"):
        lat, ttfp, batch_done, met = [], [], 0, []
        for seed in range(seeds):
            arr = arrivals(rate, duration, 100 + seed, steps=(INTERACTIVE_STEPS,))
            streams = [Arrival(0.0, FLOOD_STEPS, Priority.BATCH, stream=i) for i in range(cap)]
            res = simulate(policy, arr, costs, cap, streams=streams, until=duration, interactive_slo_s=slo_s)
            inter = [o for o in res if o.arrival.priority is Priority.INTERACTIVE]
            lat += latencies(inter)
            ttfp += [o.first_step for o in inter if o.first_step is not None]
            met += [o.met for o in inter]
            batch_done += sum(
                1 for o in res if o.arrival.priority is Priority.BATCH and o.latency is not None
            )
        out[policy] = {
            "interactive_p50_s": percentile(lat, 0.5),
            "interactive_p99_s": percentile(lat, 0.99),
            "interactive_p99_vs_lone": percentile(lat, 0.99) / costs.lone(INTERACTIVE_STEPS),
            "interactive_attainment": statistics.fmean(met) if met else None,
            "ttfp_p99_s": percentile(ttfp, 0.99),
            "ttfp_p99_full_steps": percentile(ttfp, 0.99) / full_step,
            "batch_requests_per_s": batch_done / (seeds * duration),
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--results", type=Path, help="a bench/run.py results JSON (its compute_parts)")
    src.add_argument("--curve", help="seconds per forward by batch size, e.g. 1:0.047,4:0.094,16:0.193")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--duration", type=float, default=40.0, help="seconds of arrivals per run (as quick)")
    ap.add_argument("--seeds", type=int, default=20, help="runs per load, averaged")
    ap.add_argument("--loads", default="0.5,0.8,1.0,1.2")
    ap.add_argument("--ks", default="2,4", help="objectives: k x each request's lone latency")
    ap.add_argument(
        "--flood-rate", type=float, default=1.0, help="interactive arrivals per second in the flood"
    )
    ap.add_argument("--json", type=Path, help="write every table here too")
    args = ap.parse_args()
    costs = costs_from_results(args.results) if args.results else costs_from_curve(args.curve)
    cap = args.max_batch
    loads = [float(x) for x in args.loads.split(",")]
    cap_rps = capacity(costs, cap)
    batch1 = costs.step(1) / (costs.step(cap) / cap)
    report: dict[str, Any] = {"capacity_rps": cap_rps, "batch_gain": batch1, "mix": {}}
    print(f"step-level capacity for the mix: {cap_rps:.2f} req/s; batch gain x{batch1:.2f}")
    print("load  fifo p50/p99 (s)   request p50/p99 (s)   ratio p50  ratio p99   slo p99")
    for frac in loads:
        stats: dict[str, tuple[list[float], list[float]]] = {p: ([], []) for p in POLICIES}
        for seed in range(args.seeds):
            arr = arrivals(frac * cap_rps, args.duration, seed)
            for policy, (p50s, p99s) in stats.items():
                lat = latencies(simulate(policy, arr, costs, cap))
                p50s.append(percentile(lat, 0.5))
                p99s.append(percentile(lat, 0.99))
        m = {p: (statistics.fmean(a), statistics.fmean(b)) for p, (a, b) in stats.items()}
        report["mix"][f"{frac:g}"] = {p: {"p50_s": v[0], "p99_s": v[1]} for p, v in m.items()}
        (s50, s99), (r50, r99) = m["fifo"], m["request"]
        print(
            f"{frac:4.0%}  {s50:6.2f} / {s99:6.2f}     {r50:6.2f} / {r99:6.2f}"
            f"          {s50 / r50:5.2f}      {s99 / r99:5.2f}      {m['slo'][1]:6.2f}"
        )
    ks = [float(x) for x in args.ks.split(",")]
    report["slo"] = slo_table(costs, cap, cap_rps, loads, ks, args.duration, args.seeds)
    print("\nSLO attainment (goodput req/s), objective = k x lone latency as the deadline")
    print("k  load    request          fifo             slo            slo/request  slo/fifo")
    for key, row in report["slo"].items():
        k, load = key.removeprefix("k").split("_load")
        a = {p: row[p]["attainment"] for p in POLICIES}
        g = {p: row[p]["goodput_rps"] for p in POLICIES}
        cells = "  ".join(f"{a[p]:5.1%} ({g[p]:5.2f})" for p in POLICIES)
        print(
            f"{k:>2} {float(load):5.0%}  {cells}   {a['slo'] / max(a['request'], 1e-9):5.2f}x"
            f"      {a['slo'] / max(a['fifo'], 1e-9):5.2f}x"
        )
    sat = {p: capacity(costs, cap, policy=p) for p in ("fifo", "slo")}
    report["saturation_rps"] = sat
    print(
        f"\nsaturation (mix, {cap} closed-loop streams): fifo {sat['fifo']:.2f} req/s, "
        f"slo {sat['slo']:.2f} (x{sat['slo'] / sat['fifo']:.3f})"
    )
    report["flood"] = fl = flood(costs, cap, args.flood_rate, args.duration, max(1, args.seeds // 2))
    print(
        f"\nflood: {cap} batch 50-step streams + interactive 10-step at {args.flood_rate:g}/s "
        f"(lone {fl['interactive_lone_s']:.2f} s, objective {fl['interactive_objective_s']:.2f} s)"
    )
    for policy in ("fifo", "slo"):
        r = fl[policy]
        print(
            f"  {policy}: interactive p50 {r['interactive_p50_s']:.2f} s, p99 {r['interactive_p99_s']:.2f} s "
            f"({r['interactive_p99_vs_lone']:.1f}x lone), met {r['interactive_attainment']:.1%}, "
            f"first preview p99 {r['ttfp_p99_s']:.2f} s ({r['ttfp_p99_full_steps']:.1f} full-batch steps); "
            f"batch {r['batch_requests_per_s']:.2f} req/s"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
