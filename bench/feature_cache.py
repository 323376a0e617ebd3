"""Feature caching (DeepCache inside step-level batches): what it saves and what it costs.

    python bench/feature_cache.py                 # this machine, about 3 minutes on 2 cores
    python bench/random_sd.py /tmp/sd15-random && \\
      python bench/feature_cache.py --model /tmp/sd15-random --device cuda   # a GPU (not yet run)

Three parts, written to bench/results/<date>-<host>-feature-cache.json:

1. Full-size architectures (SD 1.5 at 512 px, SDXL at 1024 px), on PyTorch's meta device (no
   weights, no compute): the FLOPs of a row that reuses its deep feature as a share of a full
   row, and the per-request speed-up that share allows at interval N if time follows FLOPs
   (N steps cost 1 + (N - 1) x share full steps).
2. The embedded model (tiny-shapes) served through the engine, the model card's 48 prompts
   batched as a busy server batches them, at N = off, 2, 3, 5: wall time per request, one
   forward of 32 rows all computing vs all reusing (the per-step speed-up), the judge's
   scores, and the pixel difference from the same requests without caching.
3. The tiny random SD, SDXL and LCM pipelines the tests use (32 px): the same timings and
   pixel differences (their weights are random: the differences say how far the images move,
   not whether they still look right); with ``--model``, a pipeline directory of your own
   (full-size SD 1.5 at random weights from bench/random_sd.py on a GPU: real step times).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.tiny import data, judge, served
from stepserve.server.engine.feature_cache import cached_forward
from stepserve.server.engine.models import load_model
from stepserve.server.engine.types import GenerationParams
from tests import tiny_pipelines

INTERVALS = (0, 2, 3, 5)


def _no_plan(rows: Any) -> contextlib.nullcontext[None]:
    return contextlib.nullcontext()


def _share(shallow: float, middle: float) -> float:
    return shallow / (shallow + middle)


def _ideal_speedup(share: float, n: int) -> float:
    """Steps per full-step time at interval ``n``, if time follows FLOPs."""
    return n / (1 + (n - 1) * share) if n > 1 else 1.0


def full_size_flops() -> dict[str, Any]:
    """FLOP shares of SD 1.5 and SDXL UNets on the meta device."""
    import random_sd  # bench/, beside this file
    from diffusers import UNet2DConditionModel

    configs: dict[str, tuple[dict[str, Any], int, int, dict[str, Any]]] = {
        "sd15_512px": (
            dict(random_sd.SD15_UNET),
            64,
            768,
            {},
        ),
        "sdxl_1024px": (
            dict(
                sample_size=128,
                block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                layers_per_block=2,
                transformer_layers_per_block=(1, 2, 10),
                cross_attention_dim=2048,
                attention_head_dim=(5, 10, 20),
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816,
            ),
            128,
            2048,
            {"text_embeds": (1280,), "time_ids": (6,)},
        ),
    }
    out: dict[str, Any] = {}
    for name, (cfg, latent, ctx_dim, added) in configs.items():
        with torch.device("meta"):
            unet = UNet2DConditionModel(**cfg)
            x = torch.empty(2, 4, latent, latent)
            t = torch.empty(2)
            ctx = torch.empty(2, 77, ctx_dim)
            kw: dict[str, Any] = {}
            if added:
                kw["added_cond_kwargs"] = {k: torch.empty(2, *shape) for k, shape in added.items()}
            res = cached_forward(
                unet, x, t, ctx, reuse=[None, None], plan_for=_no_plan, count_flops=True, **kw
            )
        assert res.flops is not None
        shallow, middle = res.flops
        share = _share(shallow, middle)
        out[name] = {
            "gflops_full_row": round((shallow + middle) / 1e9, 1),
            "gflops_cached_row": round(shallow / 1e9, 1),
            "cached_row_share": round(share, 3),
            "ideal_request_speedup": {str(n): round(_ideal_speedup(share, n), 2) for n in INTERVALS[1:]},
        }
    return out


def _sync(adapter: Any) -> None:
    if adapter.device.type == "cuda":
        torch.cuda.synchronize(adapter.device)


def _forward_times(adapter: Any, reqs: list[GenerationParams], repeats: int) -> dict[str, float]:
    """Median seconds of one forward of ``reqs``' rows, all computing their deep features vs
    all reusing them (the rows of the first step, then the same inputs again)."""
    from stepserve.server.engine.engine import Engine, EngineConfig

    engine = Engine({reqs[0].model: adapter}, EngineConfig())
    for r in reqs:
        engine.submit(replace(r, cache_interval=2), lambda e: None)
    engine.run_once()  # admitted, prepared, first (computing) step: every image has its feature
    states = list(engine.scheduler.running.values())
    rows = [row for s in states for row in adapter._step_inputs(s)]
    x = torch.cat([r.x for r in rows])
    t = torch.stack([r.t.to(torch.float32) for r in rows])
    ctx = torch.cat([r.context for r in rows])
    extras = {k: torch.cat([r.extras[k] for r in rows]) for k in rows[0].extras}
    tc = extras.pop("timestep_cond", None)
    features = [f for s in states for im in s.work.images for f in im.deep.split(1)]
    times: dict[str, list[float]] = {"compute": [], "reuse": []}
    with torch.inference_mode():
        for _ in range(repeats):
            for mode, reuse in (("compute", [None] * len(rows)), ("reuse", features)):
                _sync(adapter)
                t0 = time.perf_counter()
                cached_forward(
                    adapter.unet,
                    x,
                    t,
                    ctx,
                    reuse=reuse,
                    timestep_cond=tc,
                    added_cond_kwargs=extras or None,
                    plan_for=_no_plan,
                    pad_single=adapter.batch_invariant,
                )
                _sync(adapter)
                times[mode].append(time.perf_counter() - t0)
    for s in states:
        engine.cancel(s.request_id)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "rows": len(rows),
        "forward_s_compute": round(med["compute"], 4),
        "forward_s_reuse": round(med["reuse"], 4),
        "step_speedup": round(med["compute"] / med["reuse"], 2),
        "flop_share": round(adapter._shallow_share.get((reqs[0].height, reqs[0].width), float("nan")), 3),
    }


def _serve_timed(adapter: Any, reqs: list[GenerationParams]) -> tuple[list[np.ndarray], float]:
    t0 = time.perf_counter()
    events = served.serve(adapter, reqs)
    wall = time.perf_counter() - t0
    return [img for r in reqs for img in events[r.request_id][-1].images], wall  # type: ignore[union-attr]


def _quality(images: list[np.ndarray], base: list[np.ndarray]) -> dict[str, float]:
    diffs = [np.abs(a.astype(np.int16) - b.astype(np.int16)) for a, b in zip(images, base, strict=True)]
    return {
        "max_pixel_diff": int(max(d.max() for d in diffs)),
        "mean_pixel_diff": round(float(np.mean([d.mean() for d in diffs])), 2),
    }


def _sweep(
    adapter: Any, reqs: list[GenerationParams], targets: list[data.Sample] | None, rounds: int
) -> dict[str, Any]:
    """Each interval's wall time (median of ``rounds``, the intervals interleaved so that
    they share the machine's moods), pixel change from no caching, and judge scores."""
    walls: dict[int, list[float]] = {n: [] for n in INTERVALS}
    images: dict[int, list[np.ndarray]] = {}
    for _ in range(rounds):
        for n in INTERVALS:
            images[n], wall = _serve_timed(adapter, [replace(r, cache_interval=n) for r in reqs])
            walls[n].append(wall)
    base_wall = statistics.median(walls[0])
    out: dict[str, Any] = {}
    for n in INTERVALS:
        wall = statistics.median(walls[n])
        row: dict[str, Any] = {"wall_s": round(wall, 2), "request_speedup": round(base_wall / wall, 2)}
        row.update(_quality(images[n], images[0]))
        if targets is not None:
            row["judge"] = {k: round(v, 3) for k, v in judge.score(images[n], targets).items()}
        out["off" if n == 0 else str(n)] = row
    return out


def embedded(repeats: int, rounds: int) -> dict[str, Any]:
    adapter = served.load(max_batch_size=32)
    prompts, seeds = data.eval_sets()["eval_48"]
    reqs = [
        served.request(adapter, f"r{i}", p, s)
        for i, ((p, _), s) in enumerate(zip(prompts, seeds, strict=True))
    ]
    _serve_timed(adapter, reqs[:4])  # warm-up
    return {
        "requests": len(reqs),
        "steps": reqs[0].steps,
        "size_px": reqs[0].width,
        "forward": _forward_times(adapter, reqs[:16], repeats),
        "intervals": _sweep(adapter, reqs, [t for _, t in prompts], rounds),
    }


def tiny_requests(adapter: Any, n: int, steps: int) -> list[GenerationParams]:
    """``n`` requests of ``steps`` at the model's own size and defaults, four prompts in turn."""
    words = ["a red circle", "a blue square on the left", "a large green triangle", "a yellow circle"]
    info = adapter.info
    return [
        GenerationParams(
            request_id=f"r{i}",
            model=served.MODEL,
            prompt=words[i % len(words)],
            negative_prompt="",
            width=info.default_width,
            height=info.default_height,
            steps=steps,
            guidance_scale=info.default_guidance_scale,
            seed=i,
            sampler=info.default_sampler,
            cfg=info.runs_cfg(info.default_guidance_scale),
        )
        for i in range(n)
    ]


def _family(adapter: Any, steps: int, n: int, repeats: int, rounds: int) -> dict[str, Any]:
    """Timings and pixel changes of ``n`` requests of ``steps`` at the model's own size."""
    reqs = tiny_requests(adapter, n, steps)
    _serve_timed(adapter, reqs[:2])  # warm-up
    return {
        "steps": steps,
        "size_px": adapter.info.default_width,
        "forward": _forward_times(adapter, reqs, repeats),
        "intervals": _sweep(adapter, reqs, None, rounds),
    }


def tiny_families(repeats: int, rounds: int) -> dict[str, Any]:
    builders = {
        "sd": tiny_pipelines.build_tiny_sd,
        "sdxl": tiny_pipelines.build_tiny_sdxl,
        "lcm": tiny_pipelines.build_tiny_lcm,
    }
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family, build in builders.items():
            # Served by models/tiny/served.py's engine, under the name it serves.
            adapter = load_model(served.MODEL, build(Path(tmp) / family), max_batch_size=32)
            out[family] = _family(adapter, 4 if family == "lcm" else 20, 16, repeats, rounds)
    return out


def draft_quality(model_path: Path, device: str, interval: int, prompts: int = 48) -> dict[str, Any]:
    """The quality cost of feature caching at the draft preset's steps (bench/run.py's draft
    workload): the first ``prompts`` of the model card's 48 served with and without caching
    at ``interval``; the judge's scores when the model is the embedded one."""
    from stepserve.server.engine.models import default_model_path
    from stepserve.server.engine.types import Preset

    adapter = load_model(served.MODEL, model_path, device=device, max_batch_size=32)
    steps = adapter.info.preset_steps[Preset.DRAFT]
    pairs, seeds = data.eval_sets()["eval_48"]
    pairs, seeds = pairs[:prompts], seeds[:prompts]
    reqs = [
        served.request(adapter, f"r{i}", p, s, steps=steps)
        for i, ((p, _), s) in enumerate(zip(pairs, seeds, strict=True))
    ]
    plain, _ = _serve_timed(adapter, reqs)
    cached, _ = _serve_timed(adapter, [replace(r, cache_interval=interval) for r in reqs])
    out: dict[str, Any] = {"steps": steps, "prompts": len(reqs), **_quality(cached, plain)}
    if Path(model_path).resolve() == default_model_path().resolve():
        targets = [t for _, t in pairs]
        out["judge_without_caching"] = {k: round(v, 3) for k, v in judge.score(plain, targets).items()}
        out["judge_with_caching"] = {k: round(v, 3) for k, v in judge.score(cached, targets).items()}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--repeats", type=int, default=7, help="forward timings per mode (median)")
    ap.add_argument("--rounds", type=int, default=3, help="serving runs per interval (median wall time)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--skip-tiny", action="store_true", help="only the full-size FLOPs and the embedded model"
    )
    ap.add_argument(
        "--model", type=Path, help="also a pipeline directory (e.g. from bench/random_sd.py), at its own size"
    )
    ap.add_argument("--device", default="cpu", help="device for --model (cuda: float16)")
    ap.add_argument("--requests", type=int, default=8, help="requests served together for --model")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    command = "python bench/feature_cache.py" + (" --skip-tiny" if args.skip_tiny else "")
    if args.model:
        command += f" --model {args.model} --device {args.device} --requests {args.requests}"
    result: dict[str, Any] = {
        "command": command,
        "host": platform.node(),
        "cpu_threads": args.threads,
        "torch": torch.__version__,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "full_size_flops": full_size_flops(),
    }
    print(json.dumps(result["full_size_flops"], indent=1), flush=True)
    result["embedded"] = embedded(args.repeats, args.rounds)
    print(json.dumps(result["embedded"], indent=1), flush=True)
    if not args.skip_tiny:
        result["tiny_random"] = tiny_families(args.repeats, args.rounds)
        print(json.dumps(result["tiny_random"], indent=1), flush=True)
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.model:
        adapter = load_model(served.MODEL, args.model, device=args.device, max_batch_size=2 * args.requests)
        result["model"] = {"path": str(args.model), "device": args.device}
        result["model"].update(
            _family(adapter, adapter.info.default_steps, args.requests, args.repeats, args.rounds)
        )
        print(json.dumps(result["model"], indent=1), flush=True)
    write_results(result, args.out, args.device, "feature-cache")
    return 0


def write_results(result: dict[str, Any], out: Path, device: str, name: str) -> Path:
    """``result`` as bench/results/<date>-<host>-<name>.json (host "vm" on this CPU)."""
    out.mkdir(parents=True, exist_ok=True)
    host = "vm" if device == "cpu" else device
    path = out / f"{date.today().isoformat()}-{host}-{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    raise SystemExit(main())
