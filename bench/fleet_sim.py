"""Routing a fleet of stepserve replicas: round robin vs least-request vs bounded-load affinity,
on a simulated clock (no model, no server; bench/simulate.py's step-time curve).

Each replica is a step-level batcher (fifo): waiting requests join its running batch at step
boundaries up to its capacity, a step takes the curve's time for the batch's size, and a
request leaves after its steps (the benchmark's mix: 4, 10, 20, 30 or 50) plus a decode. Each replica keeps

- its LoRA adapters resident LRU (``--resident``): a request whose adapter is not resident
  loads it when it joins, stalling that replica's step by ``--load-s``;
- an exact result cache LRU (``--cache-entries``): a seeded request whose key the replica
  holds is answered at once; one whose key is in flight there waits for it (coalescing).

Requests arrive Poisson at a share of the fleet's capacity; each is seeded (cacheable) with
probability ``--seeded``, its prompt drawn Zipf over ``--prompts``, and carries an adapter
with probability ``--lora-share``, drawn Zipf over ``--adapters``. Routers, as Envoy runs
them (deploy/k8s/components/envoy/):

- ``round_robin``: the client library's default today (round_robin over a headless Service);
- ``least_request``: Envoy's LEAST_REQUEST, power of two choices on active requests;
- ``affinity``: Envoy's RING_HASH on the request's ``x-stepserve-lora`` header, else its
  ``x-stepserve-cache-key`` (seeded requests), with ``hash_balance_factor`` (bounded load: a
  replica above factor x the mean load passes the key on along the ring); neither header:
  least-request.

    python bench/fleet_sim.py                               # 4, 16, 64 replicas, a flat curve
    python bench/fleet_sim.py --curve 1:0.5,16:3.9 --json out.json
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import heapq
import itertools
import json
import math
import random
import statistics
import sys
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import MIX_STEPS  # bench/, beside this file
from simulate import Costs, costs_from_curve

ROUTERS = ("round_robin", "least_request", "affinity")
# A cache hit's latency: the encoded images sent back (no model work).
HIT_S = 0.005


@dataclass(frozen=True)
class Request:
    t: float
    steps: int
    lora: str | None
    key: str | None  # the cache key (seeded requests only)


@dataclass
class Running:
    req: Request
    left: int
    followers: list[Request] = field(default_factory=list)


class Replica:
    def __init__(self, costs: Costs, cap: int, resident: int, cache_entries: int, load_s: float) -> None:
        self.costs, self.cap, self.resident_max, self.load_s = costs, cap, resident, load_s
        self.waiting: deque[Running] = deque()
        self.running: list[Running] = []
        self.resident: OrderedDict[str, None] = OrderedDict()
        self.cache: OrderedDict[str, None] = OrderedDict()
        self.cache_max = cache_entries
        self.inflight: dict[str, Running] = {}
        self.busy_until: float | None = None  # end of the step in progress (None: idle)
        self.loads = 0

    @property
    def active(self) -> int:
        """Requests it holds (what Envoy's least-request counts: open streams)."""
        return len(self.waiting) + len(self.running) + sum(len(r.followers) for r in self.inflight.values())

    def offer(self, req: Request, now: float, done: list[tuple[Request, float]]) -> None:
        if req.key is not None:
            if req.key in self.cache:
                self.cache.move_to_end(req.key)
                done.append((req, now + HIT_S))
                return
            leader = self.inflight.get(req.key)
            if leader is not None:
                leader.followers.append(req)
                return
        r = Running(req, req.steps)
        if req.key is not None:
            self.inflight[req.key] = r
        self.waiting.append(r)

    def step(self, now: float, done: list[tuple[Request, float]]) -> float | None:
        """Admit, then run one step from ``now``: its end (None when there is nothing to run)."""
        stall = 0.0
        while self.waiting and len(self.running) < self.cap:
            r = self.waiting.popleft()
            lora = r.req.lora
            if lora is not None:
                if lora in self.resident:
                    self.resident.move_to_end(lora)
                else:
                    self.loads += 1
                    stall += self.load_s
                    self.resident[lora] = None
                    if len(self.resident) > self.resident_max:
                        self.resident.popitem(last=False)
            self.running.append(r)
        if not self.running:
            self.busy_until = None
            return None
        end = now + stall + self.costs.step(len(self.running))
        still = []
        finished = []
        for r in self.running:
            r.left -= 1
            (still if r.left else finished).append(r)
        self.running = still
        if finished:
            end += self.costs.decode(len(finished))
        for r in finished:
            done.append((r.req, end))
            for f in r.followers:
                done.append((f, end))
            key = r.req.key
            if key is not None:
                self.inflight.pop(key, None)
                self.cache[key] = None
                if len(self.cache) > self.cache_max:
                    self.cache.popitem(last=False)
        self.busy_until = end
        return end


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class Ring:
    """Envoy's RING_HASH with bounded load (hash_balance_factor, percent)."""

    def __init__(self, n: int, vnodes: int = 100) -> None:
        points = sorted((_hash(f"replica-{i}-{v}"), i) for i in range(n) for v in range(vnodes))
        self.keys = [p for p, _ in points]
        self.owners = [i for _, i in points]
        self.n = n

    def pick(self, key: str, load: list[int], factor: float) -> int:
        bound = math.ceil((sum(load) + 1) / self.n * factor)
        start = bisect.bisect(self.keys, _hash(key)) % len(self.keys)
        seen: set[int] = set()
        for j in itertools.chain(range(start, len(self.keys)), range(start)):
            owner = self.owners[j]
            if owner in seen:
                continue
            if load[owner] + 1 <= bound:
                return owner
            seen.add(owner)
            if len(seen) == self.n:
                break
        return self.owners[start]


def zipf_sampler(n: int, s: float, rng: random.Random) -> Any:
    weights = [1 / (k**s) for k in range(1, n + 1)]
    cum = list(itertools.accumulate(weights))
    total = cum[-1]
    return lambda: bisect.bisect(cum, rng.random() * total)


def workload(rate: float, duration: float, args: argparse.Namespace, seed: int) -> list[Request]:
    rng = random.Random(seed)
    prompt = zipf_sampler(args.prompts, args.zipf, rng)
    adapter = zipf_sampler(args.adapters, args.zipf, rng)
    out, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t > duration:
            return out
        lora = f"lora-{adapter()}" if rng.random() < args.lora_share else None
        key = None
        if rng.random() < args.seeded:
            key = f"p{prompt()}|{lora}"  # what changes pixels here: the prompt, the adapter
        out.append(Request(t, rng.choice(MIX_STEPS), lora, key))


def simulate(
    router: str, n: int, reqs: list[Request], costs: Costs, args: argparse.Namespace, seed: int
) -> dict[str, Any]:
    replicas = [Replica(costs, args.cap, args.resident, args.cache_entries, args.load_s) for _ in range(n)]
    ring = Ring(n)
    rng = random.Random(seed + 1)
    events: list[tuple[float, int, int]] = []  # (time, order, replica) step ends
    order = itertools.count()
    done: list[tuple[Request, float]] = []
    rr = itertools.count()

    def least() -> int:
        """Envoy's LEAST_REQUEST: the less busy of two replicas drawn at random."""
        a, b = rng.randrange(n), rng.randrange(n)
        return a if replicas[a].active <= replicas[b].active else b

    def route(req: Request) -> int:
        if router == "round_robin":
            return next(rr) % n
        if router == "least_request":
            return least()
        key = req.lora or req.key
        if key is None:
            return least()
        return ring.pick(key, [r.active for r in replicas], args.balance_factor)

    def kick(i: int, now: float) -> None:
        if replicas[i].busy_until is None:
            end = replicas[i].step(now, done)
            if end is not None:
                heapq.heappush(events, (end, next(order), i))

    for req in reqs:
        while events and events[0][0] <= req.t:
            t, _, i = heapq.heappop(events)
            end = replicas[i].step(t, done)
            if end is not None:
                heapq.heappush(events, (end, next(order), i))
        i = route(req)
        replicas[i].offer(req, req.t, done)
        kick(i, req.t)
    while events:
        t, _, i = heapq.heappop(events)
        end = replicas[i].step(t, done)
        if end is not None:
            heapq.heappush(events, (end, next(order), i))
    latency = sorted(end - req.t for req, end in done)
    duration = reqs[-1].t
    seeded = [req for req in reqs if req.key is not None]
    hits = sum(1 for req, end in done if req.key is not None and end - req.t <= HIT_S + 1e-9)
    computed = sum(r.loads for r in replicas)
    return {
        "requests": len(reqs),
        "p50_s": latency[len(latency) // 2],
        "p99_s": latency[int(0.99 * (len(latency) - 1))],
        "cache_hit_rate": hits / max(1, len(seeded)),
        "adapter_loads_per_min": 60 * computed / duration,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", default="4,16,64")
    ap.add_argument(
        "--curve", default="1:0.05,16:0.06", help="BATCH:SECONDS per step (default: a flat, GPU-like curve)"
    )
    ap.add_argument("--cap", type=int, default=16, help="images per replica's batch")
    ap.add_argument("--load", type=float, default=0.8, help="arrivals as a share of the fleet's capacity")
    ap.add_argument("--duration", type=float, default=300.0)
    ap.add_argument("--adapters", type=int, default=200)
    ap.add_argument("--lora-share", type=float, default=0.5)
    ap.add_argument("--resident", type=int, default=16, help="adapters each replica keeps loaded")
    ap.add_argument("--load-s", type=float, default=0.05, help="seconds an adapter load stalls a replica")
    ap.add_argument("--prompts", type=int, default=20000)
    ap.add_argument("--seeded", type=float, default=0.5, help="share of requests with a seed (cacheable)")
    ap.add_argument("--cache-entries", type=int, default=2000, help="results each replica keeps")
    ap.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of prompts and adapters")
    ap.add_argument("--balance-factor", type=float, default=1.5, help="hash_balance_factor / 100")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    costs = costs_from_curve(args.curve)
    mean_steps = statistics.fmean(MIX_STEPS)
    per_replica = args.cap / (mean_steps * costs.step(args.cap) + costs.decode(args.cap))
    out: dict[str, Any] = {"args": vars(args) | {"json": None}, "per_replica_capacity_rps": per_replica}
    print(f"one replica: {per_replica:.1f} requests/s at a full batch; load {args.load:.0%} of the fleet's")
    print(f"{'replicas':>8} {'router':>14} {'p50 s':>7} {'p99 s':>7} {'hit rate':>8} {'loads/min':>9}")
    for n in (int(x) for x in args.replicas.split(",")):
        for router in ROUTERS:
            runs = []
            for seed in range(args.seeds):
                reqs = workload(args.load * n * per_replica, args.duration, args, seed)
                runs.append(simulate(router, n, reqs, costs, args, seed))
            row = {k: statistics.fmean(r[k] for r in runs) for k in runs[0]}
            out.setdefault(str(n), {})[router] = row
            print(
                f"{n:>8} {router:>14} {row['p50_s']:>7.2f} {row['p99_s']:>7.2f} "
                f"{row['cache_hit_rate']:>8.1%} {row['adapter_loads_per_min']:>9.0f}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
