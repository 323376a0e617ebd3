"""The reference a served image is compared with: the family's own diffusers pipeline,
called the ordinary way with the same prompt, seed(s), sampler, steps and guidance."""

from __future__ import annotations

import inspect
from pathlib import Path

import diffusers
import numpy as np
import torch

from stepserve.server.engine.models.registry import PIPELINES
from stepserve.server.engine.samplers import SAMPLER_CLASSES
from stepserve.server.engine.types import GenerationParams


def reference_images(path: Path, p: GenerationParams) -> list[np.ndarray]:
    """uint8 images of ``p`` (all its seeds) from the pipeline class ``model_index.json`` names."""
    import json

    cls_name = json.loads((path / "model_index.json").read_text())["_class_name"]
    assert cls_name in PIPELINES
    cls = getattr(diffusers, cls_name)
    kwargs = {}
    if "safety_checker" in cls._optional_components:
        kwargs = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    pipe = cls.from_pretrained(str(path), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    extra = {"use_karras_sigmas": True} if p.karras else {}
    pipe.scheduler = SAMPLER_CLASSES[p.sampler].from_config(pipe.scheduler.config, **extra)
    call = {
        "num_inference_steps": p.steps,
        "guidance_scale": p.guidance_scale,
        "height": p.height,
        "width": p.width,
        "num_images_per_prompt": p.num_images,
        "generator": [torch.Generator().manual_seed(s) for s in p.seeds],
        "output_type": "np",
    }
    if "negative_prompt" in inspect.signature(pipe.__call__).parameters:
        call["negative_prompt"] = p.negative_prompt or None
    out = pipe(p.prompt, **call).images
    return [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in out]
