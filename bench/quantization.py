"""Weight quantization (torchao, --model-option NAME.quantization): what it saves and costs.

    python bench/quantization.py                  # this machine (about 3 minutes on 2 cores)
    python bench/random_sd.py /tmp/sd15-random && \\
      python bench/quantization.py --model /tmp/sd15-random --device cuda --modes none,int8wo,int8dq,fp8dq

Per model (the embedded tiny-shapes, the tiny random SD and SDXL pipelines of the tests, or
--model) and quantization: the UNet forward's time at batch 1, 8 and 16 (median of
--repeats), the bytes of its weights (and of the layers quantization converts), and the
quality cost against float weights: the pixel change of the same requests' images, and the
judge's scores for the embedded model (its 48 card prompts). Written to
bench/results/<date>-<host>-quantization.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from feature_cache import _quality, _serve_timed, _sync, tiny_requests, write_results  # bench/

from models.tiny import data, judge, served
from stepserve.server.engine.models import default_model_path, load_model
from stepserve.server.engine.quantization import quantized_layer, weight_bytes
from stepserve.server.engine.types import GenerationParams
from tests import tiny_pipelines

BATCHES = (1, 8, 16)


def _forward_ms(adapter: Any, repeats: int) -> dict[str, float]:
    unet = adapter.unet
    g = torch.Generator().manual_seed(0)
    h = w = int(unet.config.sample_size)
    out: dict[str, float] = {}
    for b in BATCHES:
        x = torch.randn(b, int(unet.config.in_channels), h, w, generator=g).to(adapter.device, adapter.dtype)
        t = torch.full((b,), 500.0, device=adapter.device)
        ctx = torch.randn(b, 77, int(unet.config.cross_attention_dim), generator=g).to(
            adapter.device, adapter.dtype
        )
        kw: dict[str, Any] = {}
        if unet.config.get("addition_embed_type") == "text_time":
            text_dim = int(unet.config.projection_class_embeddings_input_dim) - 6 * int(
                unet.config.addition_time_embed_dim
            )
            kw["added_cond_kwargs"] = {
                "text_embeds": torch.randn(b, text_dim, generator=g).to(adapter.device, adapter.dtype),
                "time_ids": torch.tensor([[h * 8.0, w * 8.0, 0, 0, h * 8.0, w * 8.0]] * b).to(
                    adapter.device, adapter.dtype
                ),
            }
        times = []
        with torch.inference_mode():
            for i in range(repeats + 1):
                _sync(adapter)
                t0 = time.perf_counter()
                unet(x, t, encoder_hidden_states=ctx, **kw)
                _sync(adapter)
                if i:  # the first is a warm-up
                    times.append(time.perf_counter() - t0)
        out[str(b)] = round(1000 * statistics.median(times), 2)
    return out


def _weights(adapter: Any) -> dict[str, int]:
    converted = [m for fqn, m in adapter.unet.named_modules() if quantized_layer(m, fqn)]
    return {
        "unet_weight_bytes": weight_bytes(adapter.unet),
        "quantized_layers_bytes": sum(weight_bytes(m) for m in converted),
    }


def _requests(adapter: Any, embedded: bool) -> tuple[list[GenerationParams], list[data.Sample] | None]:
    if embedded:
        prompts, seeds = data.eval_sets()["eval_48"]
        reqs = [
            served.request(adapter, f"r{i}", p, s)
            for i, ((p, _), s) in enumerate(zip(prompts, seeds, strict=True))
        ]
        return reqs, [t for _, t in prompts]
    reqs = tiny_requests(adapter, 16, 20)
    return reqs, None


def measure(path: Path, modes: list[str], device: str, repeats: int, embedded: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    base: list[Any] = []
    for mode in modes:
        adapter = load_model(
            served.MODEL, path, device=device, max_batch_size=32, overrides={"quantization": mode}
        )
        reqs, targets = _requests(adapter, embedded)
        images, wall = _serve_timed(adapter, reqs)
        if not base:
            base = images
        row: dict[str, Any] = {
            "forward_ms": _forward_ms(adapter, repeats),
            **_weights(adapter),
            "serve_s": round(wall, 2),
        }
        row.update(_quality(images, base))
        if targets is not None:
            row["judge"] = {k: round(v, 3) for k, v in judge.score(images, targets).items()}
        out[adapter.info.quantization] = row
        print(mode, json.dumps(row), flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="none,int8wo,int8dq")
    ap.add_argument("--model", type=Path, help="a pipeline directory instead of the built-in set")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    modes = args.modes.split(",")
    result: dict[str, Any] = {
        "command": "python bench/quantization.py"
        + (f" --model {args.model} --device {args.device}" if args.model else "")
        + (f" --modes {args.modes}" if args.modes != "none,int8wo,int8dq" else ""),
        "host": platform.node(),
        "torch": torch.__version__,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "models": {},
    }
    if args.model:
        result["models"][str(args.model)] = measure(args.model, modes, args.device, args.repeats, False)
    else:
        result["models"]["tiny-shapes"] = measure(default_model_path(), modes, "cpu", args.repeats, True)
        with tempfile.TemporaryDirectory() as tmp:
            for family, build in (
                ("sd", tiny_pipelines.build_tiny_sd),
                ("sdxl", tiny_pipelines.build_tiny_sdxl),
            ):
                result["models"][f"tiny random {family}"] = measure(
                    build(Path(tmp) / family), modes, "cpu", args.repeats, False
                )
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_results(result, args.out, args.device, "quantization")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
