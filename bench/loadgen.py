"""Load generator: drives one target over real gRPC (asyncio, one process) and writes one
record per request as JSON. Run by bench/run.py as a separate process from the server.

Two shapes of load:
- closed loop: ``--streams N --duration S``: N callers, each sending its next request as soon
  as the previous one finished (all with ``--steps``, or each drawn from the mix with ``--mix``);
- open loop: ``--rate R --duration S``: Poisson arrivals at R requests/s (fixed seed), each
  request drawn from the mix (steps, sampler), sent whether or not earlier ones finished.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from typing import Any

import grpc

from stepserve.client import build_request
from stepserve.v1 import image_generation_pb2_grpc as pb_grpc

MIX_STEPS = (4, 10, 20, 30, 50)
MIX_SAMPLERS = ("euler", "euler_ancestral", "ddim", "dpm_solver_multistep")
PROMPTS = (
    "a small red circle on the left",
    "a large blue square at the top",
    "a green triangle in the middle",
    "a small yellow circle at the bottom",
    "a large red triangle on the right",
)


async def one(
    stub: pb_grpc.ImageGenerationServiceStub, i: int, steps: int, sampler: str, preview: bool, t0: float
) -> dict[str, Any]:
    req = build_request(
        PROMPTS[i % len(PROMPTS)], steps=steps, seed=i, sampler=sampler, preview_every=1 if preview else 0
    )
    rec: dict[str, Any] = {"i": i, "steps": steps, "sampler": sampler, "start": time.perf_counter() - t0}
    try:
        async for ev in stub.Generate(req, timeout=900):
            now = time.perf_counter() - t0
            kind = ev.WhichOneof("event")
            if kind == "progress":
                rec.setdefault("first_progress", now)
                if ev.progress.HasField("preview"):
                    rec.setdefault("first_preview", now)
            elif kind == "result":
                rec["end"] = now
                rec["queue_s"] = ev.result.usage.queue_ms / 1000
                rec["accelerator_s"] = ev.result.usage.accelerator_seconds
                rec["mean_batch"] = ev.result.usage.mean_batch_size
                rec["ok"] = True
    except grpc.aio.AioRpcError as e:
        rec["error"] = e.code().name
        rec["end"] = time.perf_counter() - t0
    return rec


async def closed_loop(
    target: str, streams: int, duration: float, steps: int, preview: bool, mix_seed: int | None = None
) -> list[dict[str, Any]]:
    """``mix_seed`` set: each request's steps and sampler are drawn from the mix (seeded)."""
    records: list[dict[str, Any]] = []
    rng = random.Random(mix_seed)
    t0 = time.perf_counter()
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.ImageGenerationServiceStub(ch)
        counter = iter(range(10**9))

        async def caller() -> None:  # at least one request each, then until the duration is up
            while True:
                if mix_seed is None:
                    s, sampler = steps, "euler"
                else:
                    s, sampler = rng.choice(MIX_STEPS), rng.choice(MIX_SAMPLERS)
                records.append(await one(stub, next(counter), s, sampler, preview, t0))
                if time.perf_counter() - t0 >= duration:
                    break

        await asyncio.gather(*(caller() for _ in range(streams)))
    return records


async def open_loop(
    target: str, rate: float, duration: float, seed: int, preview: bool, steps: int | None
) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    t0 = time.perf_counter()
    tasks = []
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.ImageGenerationServiceStub(ch)
        t, i = 0.0, 0
        while True:
            t += rng.expovariate(rate)
            if t > duration:
                break
            delay = t - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            s = steps or rng.choice(MIX_STEPS)
            tasks.append(asyncio.create_task(one(stub, i, s, rng.choice(MIX_SAMPLERS), preview, t0)))
            i += 1
        return list(await asyncio.gather(*tasks))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--target", required=True)
    ap.add_argument("--streams", type=int, default=0)
    ap.add_argument("--rate", type=float, default=0.0)
    ap.add_argument("--duration", type=float, required=True)
    ap.add_argument("--steps", type=int, default=0, help="closed loop: steps of every request (default 20)")
    ap.add_argument("--preview", action="store_true", help="ask for a preview every step")
    ap.add_argument("--mix", action="store_true", help="closed loop: draw steps and samplers from the mix")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.streams:
        records = asyncio.run(
            closed_loop(
                args.target,
                args.streams,
                args.duration,
                args.steps or 20,
                args.preview,
                args.seed if args.mix else None,
            )
        )
    else:
        records = asyncio.run(
            open_loop(args.target, args.rate, args.duration, args.seed, args.preview, args.steps)
        )
    json.dump(records, sys.stdout)


if __name__ == "__main__":
    main()
