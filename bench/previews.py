"""Previews of the embedded model: what each costs per step and how soon it shows the image.

For each preview path (the linear latent -> RGB map, and the model's tiny preview decoder,
diffusers' ``AutoencoderTiny``), the card's 48 prompts (seeds 0-47, 20 steps, the model's default guidance)
run through stepserve's engine in process with a preview after every step. Per step k:

- ``mean_abs_diff``: mean absolute difference (0-255) between the step-k preview and the
  final image (reduced to the preview's size: the linear map's previews have the latent
  size, 16x16; the decoder's the image size);
- ``judged``: the fraction of step-k previews the model's judge (``models/tiny/judge.py``)
  reads as the prompt's color and shape (the linear map's previews are enlarged to the image
  size for the judge).

Cost: the same 48 requests, 16 at a time, run with a preview every step and without
previews, alternately, ``--rounds`` times; the difference per preview in milliseconds (the
median of the rounds).

    python bench/previews.py [--rounds 3] [--out bench/results]

Writes bench/results/<date>-<host>-previews.json and prints a summary.
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.tiny import data, judge, served  # noqa: E402
from stepserve.server.engine.models import ModelAdapter  # noqa: E402
from stepserve.server.engine.types import EngineEvent, GenerationParams, ProgressEvent  # noqa: E402

STEPS = 20


def requests(adapter: ModelAdapter, preview_every: int) -> list[GenerationParams]:
    prompts, seeds = data.eval_sets()["eval_48"]
    pairs = enumerate(zip(prompts, seeds, strict=True))
    return [
        served.request(adapter, f"r{i}", p, seed, steps=STEPS, preview_every=preview_every)
        for i, ((p, _), seed) in pairs
    ]


def timed(adapter: ModelAdapter, reqs: list[GenerationParams]) -> tuple[dict[str, list[EngineEvent]], float]:
    t0 = time.perf_counter()
    events = served.serve(adapter, reqs)
    return events, time.perf_counter() - t0


def closeness(events: dict[str, list[EngineEvent]]) -> list[dict[str, float]]:
    """Per step: mean |preview - final| (0-255) and the judge's color and shape reading rate."""
    targets = [s for _, s in data.eval_prompts()]
    per_step: list[dict[str, list[float]]] = [{"diff": [], "judged": []} for _ in range(STEPS)]
    for i, target in enumerate(targets):
        evs = events[f"r{i}"]
        image = served.final_image(evs)
        for e in evs:
            if not isinstance(e, ProgressEvent) or e.preview is None:
                continue
            p = e.preview
            ref = np.asarray(Image.fromarray(image).resize(p.shape[1::-1], Image.Resampling.BOX))
            seen = np.asarray(Image.fromarray(p).resize(image.shape[1::-1], Image.Resampling.NEAREST))
            r = judge.read(seen)
            row = per_step[e.step - 1]
            row["diff"].append(float(np.abs(p.astype(float) - ref.astype(float)).mean()))
            row["judged"].append(float(r.color == target.color and r.shape == target.shape))
    return [
        {
            "step": k + 1,
            "mean_abs_diff": round(statistics.mean(v["diff"]), 2),
            "judged": statistics.mean(v["judged"]),
        }
        for k, v in enumerate(per_step)
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    adapters = {"linear": served.load(preview_decoder=""), "decoder": served.load()}
    assert adapters["decoder"].preview_decoder is not None, "the embedded model ships no preview decoder"
    results: dict[str, Any] = {}
    for name, adapter in adapters.items():
        timed(adapter, requests(adapter, 1)[:16])  # warm-up
        events, _ = timed(adapter, requests(adapter, 1))
        results[name] = {"per_step": closeness(events), "cost_ms_per_preview": []}
    for _ in range(args.rounds):
        for name, adapter in adapters.items():
            _, plain = timed(adapter, requests(adapter, 0))
            _, previewed = timed(adapter, requests(adapter, 1))
            results[name]["cost_ms_per_preview"].append(1000 * (previewed - plain) / (48 * STEPS))
    for name, r in results.items():
        r["cost_ms_per_preview_median"] = round(statistics.median(r["cost_ms_per_preview"]), 3)
        judged = {s["step"]: s["judged"] for s in r["per_step"]}
        diff = {s["step"]: s["mean_abs_diff"] for s in r["per_step"]}
        print(
            f"{name:8s} cost {r['cost_ms_per_preview_median']:.2f} ms/preview; "
            "judged right at steps 5/10/15/20: " + " ".join(f"{judged[k]:.2f}" for k in (5, 10, 15, 20)),
            "; mean |preview - final|: " + " ".join(f"{diff[k]:.1f}" for k in (5, 10, 15, 20)),
        )
    out = {
        "command": "python bench/previews.py " + " ".join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "host": socket.gethostname(),
        "threads": args.threads,
        "torch": torch.__version__,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    dest = args.out / f"{out['date']}-{socket.gethostname()}-previews.json"
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print("wrote", dest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
