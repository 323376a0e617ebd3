"""`make bench`: stepserve against what users would run instead, side by side, one run, one
machine, one model (the embedded tiny-shapes), same requests and seeds. Reports ratios.

Modes:
  reference  a plain diffusers pipeline behind gRPC, one request at a time (bench/reference_server.py)
  request    stepserve --batching request (classic dynamic batching)
  step       stepserve (step-level continuous batching, the default)
  compute    the same adapter's batched forwards, decodes and text encodes in a tight loop, no
             server, at the batch sizes the server reached (how close to the hardware we are)

Workloads, from real gRPC clients in a separate process (bench/loadgen.py):
  lone        one request at a time (20 steps): end-to-end latency, the cost of the service
  saturation  N closed-loop streams (N = 1, 4, 16, 32), 20 steps: images/s
  mixed       Poisson arrivals (fixed seed), steps from {4, 10, 20, 30, 50}, samplers mixed, at
              50/80/100% of step-level capacity for that mix (measured first: 16 closed-loop
              streams of mixed requests), previews every step: p50/p95/p99 latency, time to
              first preview, throughput
  edit        Poisson arrivals, steps, samplers and previews as mixed (same seed), but a third
              of the requests text-to-image, a third image-to-image at strength 0.5 from an
              init image, a third inpainting at strength 1.0 of an init image under a mask
              (images drawn by bench/loadgen.py at the model's default size), at 80% of
              step-level capacity for that mix (measured first the same way; the smoke
              profile takes the mixed workload's): p50/p95/p99 latency overall and per task,
              throughput
  lora        8 random rank-8 LoRAs (bench/random_loras.py) registered with two more stepserve
              servers, --lora-batching mixed (the default: different adapters in one forward)
              and separate (each adapter stack batched on its own, as servers without per-row
              adapters must, vLLM-Omni among them); 16 closed-loop streams, 20 steps, each
              request one of the 8 adapters or none (equally likely, seeded): images/s of the
              mixed server without adapters, of the mixed server with them, of the separate
              server with them, and the batch sizes each reached
  draft       two more step-level servers, the draft preset without and with feature
              caching (every 2 steps): closed-loop PRESET_DRAFT streams (lora_streams of
              them, sat_s each, twice each alternately), images/s and latency, beside the
              quality cost measured in process afterwards (pixel change of the same
              requests' images; the judge's scores on the embedded model)
  slo         four more stepserve servers: --batching request, step with --scheduling fifo,
              step with --scheduling slo, and another slo one with --interactive-slo-s for
              the flood (a class objective would apply to the mix's requests too). The mix
              (Poisson, steps from {4, 10, 20, 30, 50}) with each request's gRPC deadline k x
              its lone latency (k = 2, 4; lone latency
              measured per step count first, on the fifo server), at 50/80/100/120% of the
              fifo server's capacity for the mix: SLO attainment (share of requests finished
              within their deadline; refused and expired ones count as misses) and goodput;
              saturation (16 closed-loop mixed streams) of fifo and slo; and the flood: 16
              closed-loop PRIORITY_BATCH 50-step streams with Poisson interactive 10-step
              requests (previews every step) among them, the second slo server started
              with --interactive-slo-s 2 x their lone latency: interactive latency and time to first
              preview, batch throughput

  cache       repeated prompts, as users of one prompt box send them: two more stepserve servers,
              the result cache off (--result-cache-bytes 0) and on (256 MiB in memory); the
              same closed loop against each (cache_streams streams, cache_s seconds, 20 steps),
              each request one of CACHE_ITEMS (prompt, seed) generations drawn Zipf-like
              (weight 1/(j+1)^CACHE_ZIPF_S, seeded): effective images/s (requests answered per
              second, by Little's law) of each, the hit and coalesced shares, and the quality
              cost: the share of generations whose bytes are identical with the cache on and off

    python bench/run.py [--profile full|quick|brief|smoke] [--out bench/results]
                        [--model PATH --device cuda] [--run-ahead auto|on|off]
                        [--only lora|slo|draft|cache]

On a GPU: build a full-size SD 1.5 architecture at random weights with bench/random_sd.py and
pass it with --model. The brief profile took about 10 minutes on this 2-core CPU before the edit
workload (which adds two 20 s capacity runs and two 20 s open loops, with their drains); the
reference's open loops, which only drain an overloaded queue, are skipped there. The lora
workload adds three closed-loop runs (sat_s each) and two server start-ups; ``--only lora`` runs
it alone (results in <date>-<host>-<profile>-lora.json, no chart). The slo workload runs only
with ``--only slo`` (27 open loops of mixed_s, two floods of 2 x mixed_s, four capacity runs:
about 15 minutes on the brief profile; bench/simulate.py replays it in seconds).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# Seconds per closed-loop run, per open-loop run; stream counts; load fractions; lone requests
# per mode, after unmeasured warm-up rounds.
FULL: dict[str, Any] = {
    "sat_s": 40,
    "mixed_s": 90,
    "streams": [1, 4, 16, 32],
    "loads": [0.5, 0.8, 1.0],
    "edit_loads": [0.8],
    "lone": 15,
    "lone_warmup": 2,
    "lora_streams": 16,  # the lora workload's closed loops run sat_s each
}
PROFILES: dict[str, dict[str, Any]] = {
    "full": FULL,
    "quick": {**FULL, "sat_s": 20, "mixed_s": 40, "lone": 9},
    # The lora workload's ratio targets are within a few percent: 10 s windows hold about 5
    # requests per stream, too few to tell 0.82 from 0.85, so brief runs it for 40 s.
    "brief": {**FULL, "sat_s": 10, "mixed_s": 20, "lone": 5, "reference_mixed": False, "lora_s": 40},
    # CI: every mode and workload once, briefly (about a minute of load plus start-ups).
    "smoke": {
        "sat_s": 3,
        "mixed_s": 4,
        "streams": [1, 4],
        "loads": [0.8],
        "edit_loads": [0.8],
        "edit_s": 2,
        "edit_capacity_of": [],  # the open loops run at a fraction of the mixed capacity
        "lone": 1,
        "lone_warmup": 0,
        "pipeline_runs": 2,
        "lora_streams": 4,
        "lora_s": 2,
        "draft_prompts": 4,
        "cache_streams": 4,
        "cache_s": 3,
        "cache_rounds": 1,
        "slo_loads": [1.0],
        "slo_ks": [2],
    },
}
MODES = ("step", "request", "reference")
EDIT_KINDS = ("text", "img2img", "inpaint")
# The lora workload: adapters registered (all drawn by bench/random_loras.py), the two
# --lora-batching modes it compares, and the runs: (name, server, with adapters).
LORA_COUNT = 8
LORA_MODES = ("mixed", "separate")
LORA_RUNS = (("no_adapters", "mixed", False), ("mixed", "mixed", True), ("separate", "separate", True))
# The cache workload: distinct generations repeated, and the Zipf exponent of their draw.
CACHE_ITEMS = 64
CACHE_ZIPF_S = 1.1


@dataclass(frozen=True)
class Setup:
    """What every mode serves: the model directory (None: the embedded one), the torch device
    (resolved: cpu, cuda, ...), and stepserve's --run-ahead."""

    model: Path | None
    device: str
    run_ahead: str

    def model_path(self) -> Path:
        from stepserve.server.engine.models import default_model_path

        return self.model or default_model_path()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class Server:
    """A server process for ``mode``: the reference, or stepserve (``executable``, by
    default this install's) with that batching mode and ``extra`` flags. Ready when built,
    unless ``wait`` is false (then call wait_ready: servers can start side by side)."""

    def __init__(
        self,
        mode: str,
        log: Path,
        setup: Setup,
        executable: Path | None = None,
        extra: Sequence[str] = (),
        wait: bool = True,
    ) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        if mode == "reference":
            cmd = [
                sys.executable,
                str(ROOT / "bench/reference_server.py"),
                "--port",
                str(self.port),
                "--model",
                str(setup.model_path()),
                "--device",
                setup.device,
            ]
        else:
            cmd = [
                str(executable or BIN / "stepserve"),
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--metrics-port",
                "0",
                "--batching",
                mode,
                "--max-queue",
                "100000",
                "--log-level",
                "WARNING",
                "--device",
                setup.device,
                "--run-ahead",
                setup.run_ahead,
                # Off unless a workload's extra flags turn it on (the cache workload): the
                # others measure the engine, and their repeated seeds would hit.
                "--result-cache-bytes",
                "0",
            ]
            if setup.model is not None:
                cmd += ["--model", f"bench={setup.model}"]
            cmd += extra
        self.log = log.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        end = time.monotonic() + 300
        while time.monotonic() < end:
            assert self.proc.poll() is None, "server exited during start-up"
            records = loadgen(
                self.target, ["--streams", "1", "--duration", "0.01", "--steps", "2"], quiet=True
            )
            if records and records[0].get("ok"):
                return
            time.sleep(1)
        raise RuntimeError("server did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(120)
        self.log.close()


def loadgen(target: str, args: list[str], quiet: bool = False) -> list[dict[str, Any]]:
    """The records of one bench/loadgen.py run (``quiet``: none if it failed, e.g. a server
    not up yet)."""
    return loadgen_together([(target, args)], quiet)[0]


def loadgen_together(runs: list[tuple[str, list[str]]], quiet: bool = False) -> list[list[dict[str, Any]]]:
    """Several bench/loadgen.py processes at once (one workload's parts), each one's records."""
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "bench/loadgen.py"), "--target", t, *a],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for t, a in runs
    ]
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            if not quiet:
                raise RuntimeError(stderr[-2000:])
            out.append([])
            continue
        out.append(list(json.loads(stdout)))
    return out


def closed_loop_rate(records: list[dict[str, Any]], streams: int, lo: float, hi: float) -> float | None:
    """Requests per second of ``streams`` closed-loop callers, by Little's law: each caller has
    one request in flight at a time, so throughput = streams / mean time per request, taken
    over the requests that started in [lo, hi) (after warm-up, before the callers stop).

    Counting completions in a fixed window instead is biased: streams that start together
    finish in waves (16 equal requests end in one step), and a window counts a whole wave in
    or out, up to 20% of a 20 s run.
    """
    times = [r["end"] - r["start"] for r in records if r.get("ok") and lo <= r["start"] < hi]
    if not times:
        return None
    return streams / statistics.fmean(times)


def summarize(
    records: list[dict[str, Any]], closed_loop: tuple[int, float, float] | None = None, by_kind: bool = False
) -> dict[str, Any]:
    """Latency, batch and preview figures; throughput from ``closed_loop`` = (streams, lo, hi)
    (see closed_loop_rate) when given, else completions over the whole run; ``by_kind``: the
    latency of each task of the edit workload too."""
    ok = [r for r in records if r.get("ok")]
    out: dict[str, Any] = {
        "requests": len(records),
        **_latency(records),
        "mean_batch": statistics.fmean(r["mean_batch"] for r in ok) if ok else None,
    }
    ttfp = [r["first_preview"] - r["start"] for r in ok if "first_preview" in r]
    out["ttfp_p50_s"] = percentile(ttfp, 0.5)
    out["ttfp_p95_s"] = percentile(ttfp, 0.95)
    # Time to first preview after leaving the queue, in units of that request's own step time.
    rel = []
    for r in ok:
        if "first_preview" in r:
            run = r["end"] - r["start"] - r["queue_s"]
            steps = r.get("steps_run") or r["steps"]  # edits run int(steps * strength)
            if run > 0:
                rel.append((r["first_preview"] - r["start"] - r["queue_s"]) / (run / steps))
    out["ttfp_after_queue_steps_p50"] = percentile(rel, 0.5)
    out["ttfp_after_queue_steps_p95"] = percentile(rel, 0.95)
    rate = closed_loop_rate(records, *closed_loop) if closed_loop is not None else None
    if rate is not None:
        out["images_per_s"] = rate
    else:  # open loop, or a run too short for any request to start after warm-up (smoke)
        span = max((r["end"] for r in ok), default=0) - min((r["start"] for r in records), default=0)
        out["images_per_s"] = len(ok) / span if span > 0 else None
    if by_kind:
        out["by_kind"] = {k: _kind_summary([r for r in records if r.get("kind") == k]) for k in EDIT_KINDS}
    errors = sorted({f"{r['error']}: {r.get('error_details', '')}" for r in records if not r.get("ok")})
    if errors:
        out["error_messages"] = errors[:5]
    return out


def _latency(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Successes, errors and latency percentiles of ``records``."""
    ok = [r for r in records if r.get("ok")]
    lat = [r["end"] - r["start"] for r in ok]
    return {
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "latency_p50_s": percentile(lat, 0.5),
        "latency_p95_s": percentile(lat, 0.95),
        "latency_p99_s": percentile(lat, 0.99),
    }


def _kind_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Latency of one task's requests in a mixed run; image encode time is stepserve's own."""
    ok = [r for r in records if r.get("ok")]
    return {
        **_latency(records),
        "mean_steps_run": statistics.fmean(r["steps_run"] for r in ok) if ok else None,
        "mean_image_encode_s": statistics.fmean(r.get("image_encode_s", 0.0) for r in ok) if ok else None,
    }


def compute_limit(
    batch_sizes: list[int], setup: Setup, steps: int = 20, parts: dict[str, Any] | None = None
) -> dict[str, float]:
    """Images/s of the adapter's own batched work in a tight loop: text encode, `steps` batched
    forwards (with sampler steps), decode, for B requests at once; no server, no gRPC.

    ``parts``, if given, receives the seconds of each part at each batch size (the step-time
    curve that bench/simulate.py replays): {"prepare_s": {B: s}, "step_s": ..., "decode_s": ...}.
    """
    import torch

    from stepserve.server.engine.models import load_model
    from stepserve.server.engine.request import RequestState
    from stepserve.server.engine.types import GenerationParams, Sampler

    adapter = load_model("bench", setup.model_path(), device=setup.device, max_batch_size=max(batch_sizes))
    info = adapter.info

    def now() -> float:  # once the accelerator has done what was queued
        adapter.mark().wait()
        return time.perf_counter()

    out = {}
    for b in batch_sizes:
        best = float("inf")
        best_parts = (0.0, 0.0, 0.0)
        for rep in range(3):
            reqs = [
                RequestState(
                    GenerationParams(
                        request_id=f"{rep}-{i}",
                        model="bench",
                        prompt=f"a small red circle {i}",  # distinct prompts: real encodes
                        negative_prompt="",
                        width=info.default_width,
                        height=info.default_height,
                        steps=steps,
                        guidance_scale=7.5,
                        seed=i,
                        sampler=Sampler.EULER,
                        cfg=info.runs_cfg(7.5),
                    ),
                    arrival_time=0.0,
                )
                for i in range(b)
            ]
            adapter._embed_cache.clear()
            t0 = now()
            with torch.inference_mode():
                adapter.prepare(reqs)
                t1 = now()
                for s in range(steps):
                    adapter.denoise_step(reqs)
                    for r in reqs:
                        r.steps_done = s + 1
                t2 = now()
                adapter.decode(reqs)
            t3 = now()
            if t3 - t0 < best:
                best, best_parts = t3 - t0, (t1 - t0, (t2 - t1) / steps, t3 - t2)
        out[str(b)] = b / best
        if parts is not None:
            for key, v in zip(("prepare_s", "step_s", "decode_s"), best_parts, strict=True):
                parts.setdefault(key, {})[str(b)] = v
    return out


def run(profile: str, out_dir: Path, setup: Setup, only: str | None = None) -> dict[str, Any]:
    p = PROFILES[profile]
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if only == "lora":
        return {"profile": profile, "only": "lora", "lora": lora_workload(p, setup, logs)}
    if only == "slo":
        return {"profile": profile, "only": "slo", "slo": slo_workload(p, setup, logs)}
    if only == "draft":
        return {"profile": profile, "only": "draft", "draft": draft_workload(p, setup, logs)}
    if only == "cache":
        return {"profile": profile, "only": "cache", "cache": cache_workload(p, setup, logs)}
    results: dict[str, Any] = {"profile": profile, "modes": {m: {} for m in MODES}}
    servers: dict[str, Server] = {}
    try:
        for mode in MODES:  # started side by side (nothing is measured until all are up)
            servers[mode] = Server(mode, logs / f"{mode}.log", setup, wait=False)
        for srv in servers.values():
            srv.wait_ready()
        results["edit_workload"] = edit_workload(servers["step"].target, p)
        # Lone requests, interleaved across the three servers (all up, idle but one): this
        # machine's speed drifts by tens of percent over minutes, and interleaving puts each
        # round's three samples in the same conditions. The first rounds warm caches up.
        lone: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
        for rnd in range(p["lone_warmup"] + p["lone"]):
            for mode in MODES:
                rec = loadgen(
                    servers[mode].target, ["--streams", "1", "--duration", "0.001", "--steps", "20"]
                )
                if rnd >= p["lone_warmup"]:
                    lone[mode].append(rec[0])
        for mode in MODES:
            results["modes"][mode]["lone"] = summarize(lone[mode])
            print(f"{mode} lone p50 {results['modes'][mode]['lone']['latency_p50_s']:.3f}s", flush=True)
        for mode in MODES:
            _load_tests(mode, servers[mode], p, results)
    finally:
        for srv in servers.values():
            srv.stop()
    results["lora"] = lora_workload(p, setup, logs, results["modes"]["step"]["saturation"])
    results["draft"] = draft_workload(p, setup, logs)
    results["cache"] = cache_workload(p, setup, logs)
    reached = sorted(
        {max(1, round(v["mean_batch"] or 1)) for v in results["modes"]["step"]["saturation"].values()}
    )
    # The step-time curve at more sizes than the server reached, for bench/simulate.py.
    sizes = sorted({*reached, 1, 2, 4, 8, 12, 16})
    print(f"== compute limit at batch sizes {sizes}", flush=True)
    parts: dict[str, Any] = {}
    limit = compute_limit(sizes, setup, parts=parts)
    results["compute_images_per_s"] = {str(b): limit[str(b)] for b in reached}
    results["compute_parts"] = parts
    print("== plain diffusers pipeline, in process", flush=True)
    results["pipeline_images_per_s"] = pipeline_rate(
        setup, runs=p.get("pipeline_runs", 7), warmup=p["lone_warmup"]
    )
    return results


def lora_workload(
    p: dict[str, Any], setup: Setup, logs: Path, step_saturation: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The lora workload (see the module's docstring): LORA_COUNT random adapters for the
    served model, two stepserve servers with all of them registered (--lora-batching mixed and
    separate, started side by side, both up throughout), then the closed-loop runs of LORA_RUNS
    one after the other, the two ratios' terms adjacent. ``step_saturation``: the step server's
    saturation figures of this run, whose one at the same stream count is recorded beside
    (not used: that server has no adapters registered and ran minutes earlier)."""
    import random_loras  # bench/, beside this file

    t0 = time.monotonic()
    n, d = p["lora_streams"], p.get("lora_s", p["sat_s"])
    out: dict[str, Any] = {
        "adapters": f"{LORA_COUNT} random rank-8 LoRAs of the UNet's {', '.join(random_loras.TARGETS)} "
        "(bench/random_loras.py: std 0.1, alpha 8, seeds 0-7), diffusers/PEFT keys",
        "draw": f"each request one of the {LORA_COUNT} or none, equally likely (seeded per request), "
        "scale 1.0",
        "streams": n,
        "seconds": d,
        "steps": 20,
        "sampler": "euler",
        "servers": "two stepserve servers with all the adapters registered: --lora-batching mixed "
        "(runs no_adapters and mixed) and separate (run separate), started side by side, "
        "measured one after the other",
        "no_adapters_basis": "measured here: the same closed loop without adapters against the "
        "--lora-batching mixed server (adapters registered, none used), just before its mixed run",
    }
    with tempfile.TemporaryDirectory(prefix="stepserve-bench-loras-") as tmp:
        paths = random_loras.build(Path(tmp), setup.model_path(), count=LORA_COUNT)
        flags = [arg for name, path in paths.items() for arg in ("--lora", f"{name}={path}")]
        servers: dict[str, Server] = {}
        try:
            for mode in LORA_MODES:
                extra = [*flags, "--lora-batching", mode]
                servers[mode] = Server("step", logs / f"lora-{mode}.log", setup, extra=extra, wait=False)
            for srv in servers.values():
                srv.wait_ready()
            print(f"== lora: {n} streams, {LORA_COUNT} adapters or none", flush=True)
            for name, mode, with_loras in LORA_RUNS:
                args = ["--streams", str(n), "--duration", str(d), "--steps", "20"]
                if with_loras:
                    args += ["--loras", ",".join(paths)]
                recs = loadgen(servers[mode].target, args)
                res = out[name] = summarize(recs, closed_loop=(n, 0.25 * d, d))
                res["without_adapter"] = sum(1 for r in recs if r.get("ok") and not r.get("lora"))
                print(
                    f"  {name}: {_s(res['images_per_s'])} img/s, mean batch {_s(res['mean_batch'])}"
                    f"{' errors ' + str(res['errors']) if res['errors'] else ''}",
                    flush=True,
                )
        finally:
            for srv in servers.values():
                srv.stop()
    out["wall_s"] = round(time.monotonic() - t0, 1)  # with the start-ups and drains
    same = (step_saturation or {}).get(str(n))
    if same is not None:
        out["step_server_saturation_images_per_s"] = same["images_per_s"]
    return out


# The draft workload: the interval the draft preset turns on in its cached run.
DRAFT_CACHE_INTERVAL = 2


def draft_workload(p: dict[str, Any], setup: Setup, logs: Path) -> dict[str, Any]:
    """The draft workload (see the module's docstring): PRESET_DRAFT requests in closed loops
    against two step-level servers, the draft preset without feature caching and with it
    (--model-option NAME.cache_intervals.draft=DRAFT_CACHE_INTERVAL), measured alternately
    (twice each); then, in this process once they are gone, the quality cost: the same
    requests' images with and without caching (pixel change; the judge's scores for the
    embedded model)."""
    import feature_cache  # bench/, beside this file

    t0 = time.monotonic()
    n, d = p["lora_streams"], p.get("draft_s", p["sat_s"])
    name = "bench" if setup.model is not None else "tiny-shapes"
    option = f"{name}.cache_intervals.draft={DRAFT_CACHE_INTERVAL}"
    out: dict[str, Any] = {"streams": n, "seconds": d, "cache_interval": DRAFT_CACHE_INTERVAL}
    servers: dict[str, Server] = {}
    try:
        servers["without_caching"] = Server("step", logs / "draft-plain.log", setup, wait=False)
        servers["with_caching"] = Server(
            "step", logs / "draft-cached.log", setup, extra=["--model-option", option], wait=False
        )
        for srv in servers.values():
            srv.wait_ready()
        print(f"== draft: {n} streams, PRESET_DRAFT, feature caching off / every {DRAFT_CACHE_INTERVAL}")
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in servers}
        for _ in range(2):  # alternately: this machine's speed drifts over minutes
            for key, srv in servers.items():
                args = ["--streams", str(n), "--duration", str(d), "--preset", "draft"]
                runs[key].append(summarize(loadgen(srv.target, args), closed_loop=(n, 0.25 * d, d)))
        for key, rs in runs.items():
            out[key] = {
                "images_per_s": statistics.median(x["images_per_s"] for x in rs),
                "latency_p50_s": statistics.median(x["latency_p50_s"] for x in rs),
                "runs": rs,
            }
            print(f"  {key}: {_s(out[key]['images_per_s'])} img/s", flush=True)
    finally:
        for srv in servers.values():
            srv.stop()
    out["quality"] = feature_cache.draft_quality(
        setup.model_path(), setup.device, DRAFT_CACHE_INTERVAL, p.get("draft_prompts", 48)
    )
    out["wall_s"] = round(time.monotonic() - t0, 1)
    return out


def cache_workload(p: dict[str, Any], setup: Setup, logs: Path) -> dict[str, Any]:
    """The cache workload (see the module's docstring): the same seeded closed loop against a
    server without the result cache and one with it (started side by side, measured one after
    the other, each from an empty cache)."""
    t0 = time.monotonic()
    n, d = p.get("cache_streams", 8), p.get("cache_s", p["sat_s"])
    rounds = p.get("cache_rounds", 2)
    out: dict[str, Any] = {
        "streams": n,
        "seconds": d,
        "rounds": f"{rounds} alternating windows of {d / rounds:g} s per server, draw seeded by round",
        "steps": 20,
        "draw": f"each request one of {CACHE_ITEMS} (prompt, seed) generations, item j with weight "
        f"1/(j+1)^{CACHE_ZIPF_S} (seeded per request)",
        "servers": "two stepserve servers: --result-cache-bytes 0 (off) and 268435456 (on, memory only)",
    }
    flags = {"off": ["--result-cache-bytes", "0"], "on": ["--result-cache-bytes", str(256 << 20)]}
    servers: dict[str, Server] = {}
    records: dict[str, list[dict[str, Any]]] = {}
    try:
        for name, extra in flags.items():
            servers[name] = Server("step", logs / f"cache-{name}.log", setup, extra=extra, wait=False)
        for srv in servers.values():
            srv.wait_ready()
        print(f"== cache: {n} streams, {CACHE_ITEMS} repeated generations", flush=True)
        # Alternating windows (off, on, off, on, ...; each round's draw seeded anew): this
        # machine is shared and its speed drifts, so each figure's windows sit beside the other's.
        window = d / rounds
        for rnd in range(rounds):
            for name, srv in servers.items():
                args = ["--streams", str(n), "--duration", str(window), "--steps", "20"]
                args += ["--zipf", f"{CACHE_ITEMS}:{CACHE_ZIPF_S}", "--seed", str(rnd)]
                records.setdefault(name, []).extend(loadgen(srv.target, args))
        for name, recs in records.items():
            res = out[name] = summarize(recs, closed_loop=(n, 0.25 * window, window))
            ok = [r for r in recs if r.get("ok")]
            res["distinct_items"] = len({r["item"] for r in ok})
            res["hit_rate"] = sum(1 for r in ok if r.get("cached")) / len(ok) if ok else None
            res["coalesced_rate"] = sum(1 for r in ok if r.get("coalesced")) / len(ok) if ok else None
            res["generations"] = sum(1 for r in ok if not r.get("cached") and not r.get("coalesced"))
            print(
                f"  {name}: {_s(res['images_per_s'])} img/s, hits {_s(res['hit_rate'])}, "
                f"coalesced {_s(res['coalesced_rate'])}, p50 {_s(res['latency_p50_s'])} s",
                flush=True,
            )
    finally:
        for srv in servers.values():
            srv.stop()
    # The quality cost: every item served by both servers, its bytes compared (and within a run,
    # every answer for one item must be the same bytes).
    digests = {
        name: {(r["item"], r["sha256"]) for r in recs if r.get("ok")} for name, recs in records.items()
    }
    by_item = {name: dict(pairs) for name, pairs in digests.items()}
    both = set(by_item["off"]) & set(by_item["on"])
    out["quality"] = {
        "items_compared": len(both),
        "bytes_identical_share": sum(1 for j in both if by_item["off"][j] == by_item["on"][j]) / len(both)
        if both
        else None,
        "one_answer_per_item": all(len(pairs) == len(by_item[name]) for name, pairs in digests.items()),
    }
    out["wall_s"] = round(time.monotonic() - t0, 1)
    return out


def cache_ratios(cache: dict[str, Any]) -> tuple[dict[str, Any], dict[str, bool]]:
    """The cache workload's figures beside their quality cost (issue 20: an exact cache costs
    no quality: bytes identical)."""
    out = {
        "cache_effective_images_per_s_on_vs_off": _ratio(
            cache["on"]["images_per_s"], cache["off"]["images_per_s"]
        ),
        "cache_hit_rate": cache["on"]["hit_rate"],
        "cache_coalesced_rate": cache["on"]["coalesced_rate"],
        "cache_bytes_identical_share": cache["quality"]["bytes_identical_share"],
    }
    targets = {
        "cache bytes identical to fresh generations": cache["quality"]["bytes_identical_share"] == 1.0
        and cache["quality"]["one_answer_per_item"],
    }
    return out, targets


SLO_POLICIES = ("request", "fifo", "slo")
SLO_KS = (2, 4)
SLO_LOADS = (0.5, 0.8, 1.0, 1.2)
FLOOD_STREAMS, FLOOD_STEPS, FLOOD_INTERACTIVE_STEPS, FLOOD_RATE = 16, 50, 10, 0.5


def slo_workload(p: dict[str, Any], setup: Setup, logs: Path) -> dict[str, Any]:
    """The slo workload (see the module's docstring)."""
    from loadgen import MIX_STEPS

    t0 = time.monotonic()
    d = p["mixed_s"]
    loads, ks = p.get("slo_loads", SLO_LOADS), p.get("slo_ks", SLO_KS)
    out: dict[str, Any] = {"loads": list(loads), "ks": list(ks), "seconds": d}
    servers: dict[str, Server] = {}
    try:
        # Started one at a time: a server learns its step times from its warm-up, and warm-ups
        # side by side on this 2-core machine ran slow; the request-level server then refused
        # every deadline of the mix from those estimates and, running nothing, never learned
        # better (0% attainment in two runs).
        servers["request"] = Server("request", logs / "slo-request.log", setup)
        servers["fifo"] = Server("step", logs / "slo-fifo.log", setup, extra=["--scheduling", "fifo"])
        # Lone latency per step count (the objectives' unit), median of 3 after a warm-up.
        lone: dict[int, float] = {}
        for steps in MIX_STEPS:
            args = ["--streams", "1", "--duration", "0.001", "--steps", str(steps)]
            loadgen(servers["fifo"].target, args)  # warm-up
            times = [r["end"] - r["start"] for _ in range(3) for r in loadgen(servers["fifo"].target, args)]
            lone[steps] = statistics.median(times)
        out["lone_s"] = {str(k): v for k, v in lone.items()}
        # Two slo servers: the mix's objectives are its deadlines alone; the flood's interactive
        # requests have the class objective (a class objective would apply to the mix too).
        slo_s = 2 * lone[FLOOD_INTERACTIVE_STEPS]
        servers["slo"] = Server("step", logs / "slo-slo.log", setup, extra=["--scheduling", "slo"])
        extra = ["--scheduling", "slo", "--interactive-slo-s", f"{slo_s:.4f}"]
        servers["slo-flood"] = Server("step", logs / "slo-slo-flood.log", setup, extra=extra)
        print(f"== slo: lone {', '.join(f'{k}: {v:.3f}s' for k, v in lone.items())}", flush=True)
        # Saturation of fifo and slo, interleaved (two rounds each, alternating who goes
        # first): this machine drifts by tens of percent over minutes.
        n, sat_d = 16, p["sat_s"]
        rates: dict[str, list[float]] = {"fifo": [], "slo": []}
        for rnd in range(2):
            for policy in ("fifo", "slo") if rnd == 0 else ("slo", "fifo"):
                recs = loadgen(
                    servers[policy].target,
                    ["--streams", str(n), "--duration", str(sat_d), "--mix", "--seed", str(7 + rnd)],
                )
                rates[policy].append(summarize(recs, closed_loop=(n, 0.25 * sat_d, sat_d))["images_per_s"])
        sat = {policy: statistics.fmean(r) for policy, r in rates.items()}
        for policy in sat:
            print(f"  {policy} saturation (mix): {_s(sat[policy])} req/s ({rates[policy]})", flush=True)
        out["saturation_rps"] = sat
        cap = sat["fifo"]
        out["attainment"] = {}
        for k in ks:
            deadlines = ",".join(f"{s}:{k * lone[s]:.4f}" for s in MIX_STEPS)
            for frac in loads:
                row = out["attainment"][f"k{k}_load{frac:g}"] = {}
                for policy in SLO_POLICIES:
                    args = [
                        "--rate",
                        f"{frac * cap:.4f}",
                        "--duration",
                        str(d),
                        "--seed",
                        "11",
                        "--deadlines",
                        deadlines,
                    ]
                    recs = loadgen(servers[policy].target, args)
                    met = [r for r in recs if r.get("ok") and r["end"] - r["start"] <= r["deadline_s"]]
                    errors: dict[str, int] = {}
                    for r in recs:
                        if not r.get("ok"):
                            errors[r["error"]] = errors.get(r["error"], 0) + 1
                    row[policy] = {
                        "requests": len(recs),
                        "attainment": len(met) / max(1, len(recs)),
                        "goodput_rps": len(met) / d,
                        "errors": errors,
                    }
                a = {pol: row[pol]["attainment"] for pol in SLO_POLICIES}
                print(
                    f"  k={k} load {frac:.0%}: attainment request {a['request']:.1%}, fifo {a['fifo']:.1%}, "
                    f"slo {a['slo']:.1%}",
                    flush=True,
                )
        # Issue 8's figure again: the mix at 80% without deadlines (no objectives: slo decides
        # as fifo does, so this is the p99 ratio the new policy keeps).
        out["mix80_no_deadlines"] = {}
        for policy in SLO_POLICIES:
            args = ["--rate", f"{0.8 * cap:.4f}", "--duration", str(d), "--seed", "11", "--preview"]
            out["mix80_no_deadlines"][policy] = _latency(loadgen(servers[policy].target, args))
        m80 = out["mix80_no_deadlines"]
        print(
            "  mix 80%, no deadlines, p99: "
            + ", ".join(f"{pol} {_s(m80[pol]['latency_p99_s'])} s" for pol in SLO_POLICIES),
            flush=True,
        )
        out["flood"] = {"interactive_rate": FLOOD_RATE, "interactive_objective_s": slo_s, "seconds": 2 * d}
        for policy in ("fifo", "slo"):
            target = servers["slo-flood" if policy == "slo" else "fifo"].target
            batch, inter = loadgen_together(
                [
                    (
                        target,
                        [
                            "--streams",
                            str(FLOOD_STREAMS),
                            "--duration",
                            str(2 * d),
                            "--steps",
                            str(FLOOD_STEPS),
                            "--priority",
                            "batch",
                        ],
                    ),
                    (
                        target,
                        [
                            "--rate",
                            str(FLOOD_RATE),
                            "--duration",
                            str(2 * d),
                            "--steps",
                            str(FLOOD_INTERACTIVE_STEPS),
                            "--preview",
                            "--seed",
                            "5",
                        ],
                    ),
                ]
            )
            ok = [r for r in inter if r.get("ok")]
            lat = [r["end"] - r["start"] for r in ok]
            ttfp = [r["first_preview"] - r["start"] for r in ok if "first_preview" in r]
            batch_ok = [r for r in batch if r.get("ok")]
            out["flood"][policy] = {
                "interactive_requests": len(inter),
                "interactive_ok": len(ok),
                "interactive_p50_s": percentile(lat, 0.5),
                "interactive_p99_s": percentile(lat, 0.99),
                "interactive_p99_vs_lone": _ratio(percentile(lat, 0.99), lone[FLOOD_INTERACTIVE_STEPS]),
                "ttfp_p50_s": percentile(ttfp, 0.5),
                "ttfp_p99_s": percentile(ttfp, 0.99),
                # A step of the full batch: the batch streams' time per step under fifo (where
                # they are never paused), the unit of the time-to-first-preview target.
                "batch_requests_per_s": summarize(batch, closed_loop=(FLOOD_STREAMS, 0.25 * 2 * d, 2 * d))[
                    "images_per_s"
                ],
                "batch_step_s_p50": percentile(
                    [(r["end"] - r["start"]) / FLOOD_STEPS for r in batch_ok], 0.5
                ),
            }
            f = out["flood"][policy]
            print(
                f"  flood {policy}: interactive p99 {_s(f['interactive_p99_s'])} s "
                f"({_s(f['interactive_p99_vs_lone'])}x lone), first preview p99 {_s(f['ttfp_p99_s'])} s, "
                f"batch {_s(f['batch_requests_per_s'])} req/s",
                flush=True,
            )
        full_step = out["flood"]["fifo"]["batch_step_s_p50"]
        for policy in ("fifo", "slo"):
            out["flood"][policy]["ttfp_p99_full_steps"] = _ratio(
                out["flood"][policy]["ttfp_p99_s"], full_step
            )
    finally:
        for srv in servers.values():
            srv.stop()
    out["wall_s"] = round(time.monotonic() - t0, 1)
    return out


def slo_ratios(slo: dict[str, Any]) -> tuple[dict[str, Any], dict[str, bool]]:
    """Issue 19's targets on this run: at 100% load slo attainment >= 1.3x request-level and
    >= 1.15x fifo (each k); in the flood interactive p99 <= 2x lone and first preview p99 <= 2
    full-batch steps; saturation within 5% of fifo."""
    out: dict[str, Any] = {}
    targets: dict[str, bool] = {}
    for k in slo["ks"]:
        row = slo["attainment"][f"k{k}_load1"]
        a = {pol: row[pol]["attainment"] for pol in SLO_POLICIES}
        out[f"slo_k{k}_vs_request"] = _ratio(a["slo"], a["request"])
        out[f"slo_k{k}_vs_fifo"] = _ratio(a["slo"], a["fifo"])
        targets[f"k={k}, 100% load: slo attainment >= 1.3x request-level"] = (
            out[f"slo_k{k}_vs_request"] or 0
        ) >= 1.3
        targets[f"k={k}, 100% load: slo attainment >= 1.15x fifo"] = (out[f"slo_k{k}_vs_fifo"] or 0) >= 1.15
    fl = slo["flood"]["slo"]
    out["flood_interactive_p99_vs_lone"] = fl["interactive_p99_vs_lone"]
    out["flood_ttfp_p99_full_steps"] = fl["ttfp_p99_full_steps"]
    out["saturation_slo_vs_fifo"] = _ratio(slo["saturation_rps"]["slo"], slo["saturation_rps"]["fifo"])
    if "mix80_no_deadlines" in slo:
        m80 = slo["mix80_no_deadlines"]
        for pol in ("fifo", "slo"):
            out[f"mix80_p99_{pol}_vs_request"] = _ratio(
                m80[pol]["latency_p99_s"], m80["request"]["latency_p99_s"]
            )
    targets["flood: interactive p99 <= 2x lone"] = (fl["interactive_p99_vs_lone"] or 99) <= 2
    targets["flood: first preview p99 <= 2 full-batch steps"] = (fl["ttfp_p99_full_steps"] or 99) <= 2
    targets["saturation: slo within 5% of fifo"] = (out["saturation_slo_vs_fifo"] or 0) >= 0.95
    return out, targets


def pipeline_rate(setup: Setup, steps: int = 20, runs: int = 7, warmup: int = 2) -> float:
    """Images/s of the plain diffusers pipeline called in a loop in this process, one image at
    a time: what a user's own script gets, with no server in the way (the second baseline)."""
    import torch
    from reference_server import load_pipeline

    pipe = load_pipeline(str(setup.model_path()), setup.device)
    times = []
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        pipe(
            f"a small red circle {i}",
            num_inference_steps=steps,
            guidance_scale=7.5,
            generator=torch.Generator().manual_seed(i),
        )
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    del pipe
    return 1.0 / statistics.median(times)


def edit_workload(target: str, p: dict[str, Any]) -> dict[str, Any]:
    """What the edit workload sends (for the results), at the default model's size; with
    "skipped" saying why, where it does not run."""
    import grpc

    from stepserve.v1 import image_generation_pb2 as pb
    from stepserve.v1 import image_generation_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.ImageGenerationServiceStub(ch)
        model = stub.ListModels(pb.ListModelsRequest(), timeout=60).models[0]
    out: dict[str, Any] = {
        "tasks": "text-to-image, img2img at strength 0.5, inpainting at strength 1.0: a third each "
        "(seeded draw)",
        "steps": "drawn from {4, 10, 20, 30, 50} and samplers mixed, as the mixed workload (same seed); "
        "img2img runs int(steps * 0.5) of them",
        "image_size": [model.default_width_px, model.default_height_px],
        "init_images": "4 flat shapes on a light background, PNG (bench/loadgen.py)",
        "masks": "the right half or a centred square, white = repaint; preserve_unmasked off",
        "reference": "diffusers StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline "
        "(from_pipe), one request at a time"
        if p.get("reference_mixed", True)
        else "skipped in this profile (an open loop over its capacity only drains a queue)",
    }
    out["rate_basis"] = (
        "step-level capacity for this mix (edit_capacity_rps)"
        if "step" in p.get("edit_capacity_of", ("step", "request"))
        else "step-level capacity for the mixed workload (capacity_rps): not measured for this mix "
        "in this profile"
    )
    missing = {pb.TASK_TEXT_TO_IMAGE, pb.TASK_IMAGE_TO_IMAGE, pb.TASK_INPAINTING} - set(model.tasks)
    if missing:
        names = ", ".join(sorted(pb.Task.Name(t) for t in missing))
        out["skipped"] = f"model {model.name!r} does not serve {names}"
    return out


def _load_tests(mode: str, srv: Server, p: dict[str, Any], results: dict[str, Any]) -> None:
    """Saturation, the mix's capacity (not for the reference) and the open loops of one mode,
    then the same for the edit workload. The open loops' rates are fractions of step-level's
    capacity for their mix (step runs first)."""
    print(f"== {mode}", flush=True)
    res = results["modes"][mode]
    res["saturation"] = {}
    for n in p["streams"]:
        d = p["sat_s"]
        recs = loadgen(srv.target, ["--streams", str(n), "--duration", str(d), "--steps", "20"])
        res["saturation"][str(n)] = summarize(recs, closed_loop=(n, 0.25 * d, d))
        print(f"  {n} streams: {res['saturation'][str(n)]['images_per_s']:.2f} img/s", flush=True)
    if mode != "reference":
        # Capacity for the mix itself: closed-loop streams sending mixed requests (steps,
        # samplers, previews every step), by Little's law (closed_loop_rate). Measured,
        # not scaled from the 20-step figure: per-request work (encode, decode, previews)
        # and the samplers' own costs make steps/s over mean steps only an estimate.
        n = max(n for n in p["streams"] if n <= 16)
        d = p["mixed_s"]
        recs = loadgen(
            srv.target,
            ["--streams", str(n), "--duration", str(d), "--mix", "--preview", "--seed", "7"],
        )
        res["mixed_capacity"] = summarize(recs, closed_loop=(n, 0.25 * d, d))
        print(f"  mix capacity: {res['mixed_capacity']['images_per_s']:.2f} req/s", flush=True)
        if mode == "step":
            results["capacity_rps"] = res["mixed_capacity"]["images_per_s"]
    res["mixed"], res["edit"] = {}, {}
    if mode == "reference" and not p.get("reference_mixed", True):
        return
    _mixed(srv, p, results["capacity_rps"], res)
    _edit(mode, srv, p, results)


def _mixed(srv: Server, p: dict[str, Any], capacity_rps: float, res: dict[str, Any]) -> None:
    """The mixed workload's open loops, at fractions of ``capacity_rps``."""
    for frac in p["loads"]:
        recs = loadgen(
            srv.target,
            [
                "--rate",
                str(frac * capacity_rps),
                "--duration",
                str(p["mixed_s"]),
                "--preview",
                "--seed",
                "7",
            ],
        )
        res["mixed"][str(frac)] = summarize(recs)
        m = res["mixed"][str(frac)]
        print(
            f"  mixed {frac:.0%}: p50 {_s(m['latency_p50_s'])}s p99 {_s(m['latency_p99_s'])}s",
            flush=True,
        )


def _edit(mode: str, srv: Server, p: dict[str, Any], results: dict[str, Any]) -> None:
    """The edit workload (text-to-image, img2img, inpainting): its capacity (step and request
    level, measured as the mix's), then open loops at fractions of step-level's capacity for it
    (in the smoke profile, of the mixed workload's: see edit_workload)."""
    res, work = results["modes"][mode], results["edit_workload"]
    res["edit"] = {}
    if "skipped" in work:
        return
    d = p.get("edit_s", p["mixed_s"])
    w, h = work["image_size"]
    args = ["--edit", "--image-size", f"{w}x{h}", "--preview", "--seed", "7"]
    if mode in p.get("edit_capacity_of", ("step", "request")):
        n = max(n for n in p["streams"] if n <= 16)
        recs = loadgen(srv.target, ["--streams", str(n), "--duration", str(d), "--mix", *args])
        res["edit_capacity"] = summarize(recs, closed_loop=(n, 0.25 * d, d), by_kind=True)
        print(f"  edit capacity: {_s(res['edit_capacity']['images_per_s'])} req/s", flush=True)
        if mode == "step":
            results["edit_capacity_rps"] = res["edit_capacity"]["images_per_s"]
    capacity_rps = results.get("edit_capacity_rps") or results["capacity_rps"]
    for frac in p["edit_loads"]:
        recs = loadgen(srv.target, ["--rate", str(frac * capacity_rps), "--duration", str(d), *args])
        m = res["edit"][str(frac)] = summarize(recs, by_kind=True)
        kinds = ", ".join(
            f"{k} {_s(v['latency_p50_s'])}/{_s(v['latency_p99_s'])}" for k, v in m["by_kind"].items()
        )
        print(
            f"  edit {frac:.0%}: p50 {_s(m['latency_p50_s'])}s p99 {_s(m['latency_p99_s'])}s "
            f"({kinds} s p50/p99){' errors ' + str(m['errors']) if m['errors'] else ''}",
            flush=True,
        )


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(r: dict[str, Any]) -> dict[str, Any]:
    """The ratios of the results ``r`` and whether each target is met (``targets_met``): the
    modes' where they ran, the lora workload's where it ran."""
    out: dict[str, Any] = _mode_ratios(r) if "modes" in r else {}
    targets = out.pop("targets_met", {})
    if "lora" in r:
        lora_out, lora_targets = lora_ratios(r["lora"])
        out.update(lora_out)
        targets.update(lora_targets)
    if "cache" in r:
        cache_out, cache_targets = cache_ratios(r["cache"])
        out.update(cache_out)
        targets.update(cache_targets)
    if "slo" in r:
        slo_out, slo_targets = slo_ratios(r["slo"])
        out.update(slo_out)
        targets.update(slo_targets)
    if "draft" in r:
        dr = r["draft"]
        out["draft_cached_vs_plain"] = _ratio(
            dr["with_caching"]["images_per_s"], dr["without_caching"]["images_per_s"]
        )
        out["draft_cached_mean_pixel_diff"] = dr["quality"]["mean_pixel_diff"]
    out["targets_met"] = targets
    return out


def lora_ratios(lora: dict[str, Any]) -> tuple[dict[str, Any], dict[str, bool]]:
    """The lora workload's ratios (issue 18: mixed adapters at >= 0.85x the load without them
    and >= 2x batching each adapter separately) and their verdicts."""
    mixed = lora["mixed"]["images_per_s"]
    out = {
        "lora_mixed_vs_no_adapters": _ratio(mixed, lora["no_adapters"]["images_per_s"]),
        "lora_mixed_vs_separate": _ratio(mixed, lora["separate"]["images_per_s"]),
    }
    targets = {
        "lora_mixed_vs_no_adapters >= 0.85": (out["lora_mixed_vs_no_adapters"] or 0) >= 0.85,
        "lora_mixed_vs_separate >= 2.0": (out["lora_mixed_vs_separate"] or 0) >= 2.0,
    }
    return out, targets


def _mode_ratios(r: dict[str, Any]) -> dict[str, Any]:
    step, req, ref = (r["modes"][m] for m in ("step", "request", "reference"))
    sat16 = step["saturation"].get("16") or step["saturation"][max(step["saturation"], key=int)]
    b16 = str(max(1, round(sat16["mean_batch"])))
    limit = r["compute_images_per_s"].get(b16)
    ref_tp = ref["saturation"]["1"]["images_per_s"]
    hw_gain = max(r["compute_images_per_s"].values()) / r["compute_images_per_s"].get(
        "1", min(r["compute_images_per_s"].values())
    )
    out: dict[str, Any] = {
        "saturated_vs_compute_limit": sat16["images_per_s"] / limit if limit else None,
        "saturated_vs_sequential_reference": sat16["images_per_s"] / ref_tp,
        "saturated_vs_in_process_pipeline": sat16["images_per_s"] / r["pipeline_images_per_s"]
        if r.get("pipeline_images_per_s")
        else None,
        "reference_vs_in_process_pipeline": ref_tp / r["pipeline_images_per_s"]
        if r.get("pipeline_images_per_s")
        else None,
        "hardware_batch_gain": hw_gain,
        "lone_latency_vs_reference": step["lone"]["latency_p50_s"] / ref["lone"]["latency_p50_s"],
    }
    if "mixed_capacity" in req:
        out["mix_capacity_request_vs_step"] = (
            req["mixed_capacity"]["images_per_s"] / step["mixed_capacity"]["images_per_s"]
        )
    if "0.8" in step["mixed"]:
        for q in ("p50", "p99"):
            out[f"mixed80_{q}_step_vs_request"] = (
                step["mixed"]["0.8"][f"latency_{q}_s"] / req["mixed"]["0.8"][f"latency_{q}_s"]
            )
        out["ttfp_after_queue_steps_p50"] = step["mixed"]["0.8"]["ttfp_after_queue_steps_p50"]
    if "edit_capacity" in req and "edit_capacity" in step:
        out["edit_capacity_request_vs_step"] = _ratio(
            req["edit_capacity"]["images_per_s"], step["edit_capacity"]["images_per_s"]
        )
    s_edit, r_edit = step.get("edit", {}).get("0.8"), req.get("edit", {}).get("0.8")
    if s_edit and r_edit:
        for q in ("p50", "p99"):
            out[f"edit80_{q}_step_vs_request"] = _ratio(s_edit[f"latency_{q}_s"], r_edit[f"latency_{q}_s"])
        out["edit80_by_kind_step_vs_request"] = {
            k: {
                q: _ratio(s_edit["by_kind"][k][f"latency_{q}_s"], r_edit["by_kind"][k][f"latency_{q}_s"])
                for q in ("p50", "p99")
            }
            for k in EDIT_KINDS
        }
    targets = {
        "saturated_vs_compute_limit >= 0.90": (out["saturated_vs_compute_limit"] or 0) >= 0.90,
        "saturated_vs_reference >= hardware_batch_gain": out["saturated_vs_sequential_reference"] >= hw_gain,
        "lone_latency_vs_reference <= 1.05": out["lone_latency_vs_reference"] <= 1.05,
    }
    if "mixed80_p50_step_vs_request" in out:
        targets["mixed80 p50 and p99 step <= 0.6 x request"] = (
            out["mixed80_p50_step_vs_request"] <= 0.6 and out["mixed80_p99_step_vs_request"] <= 0.6
        )
        targets["ttfp after queue <= 2 steps (p50)"] = (out["ttfp_after_queue_steps_p50"] or 99) <= 2
    out["targets_met"] = targets
    return out


def chart(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"step": "tab:blue", "request": "tab:orange", "reference": "tab:gray"}
    for mode in MODES:
        m, c = r["modes"][mode], colors[mode]
        loads = sorted(m["mixed"], key=float)
        xs = [float(x) * 100 for x in loads]
        a.plot(xs, [m["mixed"][x]["latency_p50_s"] for x in loads], "o-", color=c, label=f"{mode} p50")
        a.plot(xs, [m["mixed"][x]["latency_p99_s"] for x in loads], "x--", color=c, label=f"{mode} p99")
        edit = sorted(m.get("edit", {}), key=float)
        for q, marker in (("p50", "s"), ("p99", "^")):
            a.plot(
                [float(x) * 100 + 1.5 for x in edit],  # beside the mixed points
                [m["edit"][x][f"latency_{q}_s"] for x in edit],
                marker,
                color=c,
                fillstyle="none",
                label=f"{mode} edit {q}" if edit else None,
            )
        ns = sorted(m["saturation"], key=int)
        b.plot(
            [int(n) for n in ns], [m["saturation"][n]["images_per_s"] for n in ns], "o-", color=c, label=mode
        )
    limit = r["compute_images_per_s"]
    b.axhline(
        max(limit.values()),
        color="gray",
        linestyle=":",
        label=f"compute limit (batch {max(limit, key=limit.get)})",
    )
    a.set(
        xlabel="offered load (% of step-level capacity)",
        ylabel="latency (s)",
        title="mixed (and edit: open markers) workload latency",
        yscale="log",
    )
    b.set(
        xlabel="concurrent streams", ylabel="images/s", title="saturated throughput (20 steps)", xscale="log"
    )
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="full")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results")
    ap.add_argument("--chart", type=Path, help="only redraw the chart of this results JSON")
    ap.add_argument(
        "--model", type=Path, help="a diffusers SD pipeline directory (default: the embedded one)"
    )
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    ap.add_argument(
        "--run-ahead", choices=("auto", "on", "off"), default="auto", help="stepserve's --run-ahead"
    )
    ap.add_argument(
        "--only", choices=("lora", "slo", "draft", "cache"), help="run only this workload (no chart)"
    )
    args = ap.parse_args()
    if args.chart:
        chart(json.loads(args.chart.read_text()), args.chart.with_suffix(".png"))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    t0 = time.time()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    setup = Setup(args.model, device, args.run_ahead)
    r = run(args.profile, args.out, setup, args.only)
    r["ratios"] = ratios(r)
    r["environment"] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": _device_name(setup.device),
        "model": f"{setup.model or 'tiny-shapes (embedded)'}, its default size, guidance 7.5",
        "run_ahead": args.run_ahead,
        "wall_s": round(time.time() - t0),
        "command": _command(args),
    }
    stem = f"{datetime.date.today().isoformat()}-{socket.gethostname()}-{args.profile}"
    if args.only:
        stem += f"-{args.only}"
    (args.out / f"{stem}.json").write_text(json.dumps(r, indent=2) + "\n")
    try:
        if not args.only:
            chart(r, args.out / f"{stem}.png")
    except ImportError:
        print("matplotlib not installed: no chart", flush=True)
    print(json.dumps(r["ratios"], indent=2))
    print(f"wrote {args.out / stem}.json")
    return 0


def _command(args: argparse.Namespace) -> str:
    """The command that reproduces these figures (options that change them only)."""
    cmd = f"python bench/run.py --profile {args.profile}"
    if args.model:
        cmd += f" --model {args.model}"
    if args.device != "auto":
        cmd += f" --device {args.device}"
    if args.run_ahead != "auto":
        cmd += f" --run-ahead {args.run_ahead}"
    if args.only:
        cmd += f" --only {args.only}"
    return cmd


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


if __name__ == "__main__":
    sys.exit(main())
