"""Batch speed-up of the embedded model on this machine (figures for the model card).

Measures, with the plain diffusers pipeline and no server:
- one UNet forward at batch 1 and at batch 16 (latent 16x16x4, text 32 tokens);
- full 20-step generations with guidance, one at a time vs 16 at once (images/s).

Run: ``.venv/bin/python models/tiny/speed.py`` (timings here vary by ~30% run to run).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import torch
from diffusers import StableDiffusionPipeline

from stepserve.server.engine.models import default_model_path


def best_of(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


@torch.inference_mode()
def main() -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    pipe = StableDiffusionPipeline.from_pretrained(str(default_model_path()))
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet
    out: dict[str, float] = {}
    for b in (1, 16):
        x = torch.randn(b, 4, 16, 16)
        c = torch.randn(b, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim)
        t = torch.full((b,), 500.0)
        out[f"unet_forward_ms_batch{b}"] = 1000 * best_of(lambda x=x, c=c, t=t: unet(x, t, c), 20)
    prompt = "a small red circle on the left"

    def one() -> None:
        pipe(prompt, num_inference_steps=20, generator=torch.Generator().manual_seed(0))

    def sixteen() -> None:
        gens = [torch.Generator().manual_seed(i) for i in range(16)]
        pipe([prompt] * 16, num_inference_steps=20, generator=gens)

    out["images_per_s_one_at_a_time"] = 1 / best_of(one, 5)
    out["images_per_s_16_at_once"] = 16 / best_of(sixteen, 3)
    out["throughput_gain"] = out["images_per_s_16_at_once"] / out["images_per_s_one_at_a_time"]
    out["unet_forward_gain"] = 16 * out["unet_forward_ms_batch1"] / out["unet_forward_ms_batch16"]
    out["torch"] = torch.__version__  # type: ignore[assignment]
    out["threads"] = torch.get_num_threads()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
