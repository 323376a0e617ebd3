"""What scheduling can do with a given step-time curve: replays the benchmark's mixed workload
(Poisson arrivals, steps from {4, 10, 20, 30, 50}) against a step-time curve, for step-level
continuous batching (the engine's policy: everyone running steps every forward, newcomers join
at the next step) and request-level batching (a batch runs until its last member finishes).

No model, no server: seconds of simulated time per forward come from the curve, plus the
encode and decode costs. It answers "is this latency target reachable by scheduling on this
hardware?" without hours of benchmark runs; `make bench` measures the real thing.

    python bench/simulate.py --results bench/results/<run>.json   # the curve a run measured
    python bench/simulate.py --curve 1:0.05,16:0.06                # a GPU-like, flat curve
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from loadgen import MIX_STEPS  # the benchmark's own mix and percentiles (bench/ is on the path)
from run import percentile


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


def arrivals(rate: float, duration: float, seed: int) -> list[tuple[float, int]]:
    rng = random.Random(seed)
    t, out = 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t > duration:
            return out
        out.append((t, rng.choice(MIX_STEPS)))


def simulate(policy: str, arr: list[tuple[float, int]], costs: Costs, cap: int) -> list[float]:
    """Latencies of the requests in ``arr`` under ``policy`` ("step" or "request")."""
    i, t = 0, 0.0
    queue: list[list[float]] = []  # [arrival, steps, steps done]
    running: list[list[float]] = []
    latencies = []
    while i < len(arr) or queue or running:
        while i < len(arr) and arr[i][0] <= t:
            queue.append([arr[i][0], arr[i][1], 0])
            i += 1
        if not queue and not running:
            t = arr[i][0]
            continue
        if policy == "request":
            admitted = queue[:cap] if not running else []
        else:
            admitted = queue[: max(0, cap - len(running))]
        if admitted:
            del queue[: len(admitted)]
            running += admitted
            t += costs.prepare_s
        dt, done = step_all(running, costs)
        t += dt
        latencies += [t - r[0] for r in done]
    return latencies


def step_all(running: list[list[float]], costs: Costs) -> tuple[float, list[list[float]]]:
    """One forward for every running request ([arrival, steps, steps done]), then the decode
    of those it finished (removed from ``running``): seconds taken, and the finished."""
    dt = costs.step(len(running))
    for r in running:
        r[2] += 1
    done = [r for r in running if r[2] >= r[1]]
    if done:
        dt += costs.decode(len(done))
        for r in done:
            running.remove(r)
    return dt, done


def capacity(costs: Costs, cap: int, seconds: float = 600.0) -> float:
    """Requests/s of the mix with ``cap`` closed-loop streams under step-level batching."""
    rng = random.Random(1)
    running: list[list[float]] = [[0.0, rng.choice(MIX_STEPS), 0] for _ in range(cap)]
    t, n = 0.0, 0
    while t < seconds:
        dt, done = step_all(running, costs)
        t += dt
        if done:  # each stream sends its next request at once
            t += costs.prepare_s
            running += [[t, rng.choice(MIX_STEPS), 0] for _ in done]
            n += len(done)
    return n / t


def costs_from_results(path: Path) -> Costs:
    parts = json.loads(path.read_text())["compute_parts"]

    def table(key: str) -> dict[int, float]:
        return {int(b): float(v) for b, v in parts[key].items()}

    prepare = table("prepare_s")
    return Costs(step_s=table("step_s"), prepare_s=prepare[min(prepare)], decode_s=table("decode_s"))


def costs_from_curve(text: str) -> Costs:
    pairs = [p.split(":") for p in text.split(",")]
    return Costs(step_s={int(b): float(s) for b, s in pairs})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--results", type=Path, help="a bench/run.py results JSON (its compute_parts)")
    src.add_argument("--curve", help="seconds per forward by batch size, e.g. 1:0.047,4:0.094,16:0.193")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--duration", type=float, default=40.0, help="seconds of arrivals per run (as quick)")
    ap.add_argument("--seeds", type=int, default=20, help="runs per load, averaged")
    ap.add_argument("--loads", default="0.5,0.8,1.0")
    args = ap.parse_args()
    costs = costs_from_results(args.results) if args.results else costs_from_curve(args.curve)
    cap_rps = capacity(costs, args.max_batch)
    batch1 = costs.step(1) / (costs.step(args.max_batch) / args.max_batch)
    print(f"step-level capacity for the mix: {cap_rps:.2f} req/s; batch gain x{batch1:.2f}")
    print("load  step p50/p99 (s)   request p50/p99 (s)   ratio p50  ratio p99")
    for frac in (float(x) for x in args.loads.split(",")):
        runs = {"step": ([], []), "request": ([], [])}
        for seed in range(args.seeds):
            arr = arrivals(frac * cap_rps, args.duration, seed)
            for policy, (p50s, p99s) in runs.items():
                lat = simulate(policy, arr, costs, args.max_batch)
                p50s.append(percentile(lat, 0.5))
                p99s.append(percentile(lat, 0.99))
        (s50, s99), (r50, r99) = ((statistics.fmean(a), statistics.fmean(b)) for a, b in runs.values())
        print(
            f"{frac:4.0%}  {s50:6.2f} / {s99:6.2f}     {r50:6.2f} / {r99:6.2f}"
            f"          {s50 / r50:5.2f}      {s99 / r99:5.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
