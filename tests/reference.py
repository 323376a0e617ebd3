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
from stepserve.server.engine.types import GenerationParams, Task

# The pipeline each family's image-to-image and inpainting requests are compared with: the
# one diffusers offers for that kind of request (LCM has no inpainting pipeline of its own;
# the SD one runs its UNet and sampler, guidance as an embedding, as diffusers intends).
_TASK_PIPELINES = {
    Task.IMAGE_TO_IMAGE: {
        "StableDiffusionPipeline": "StableDiffusionImg2ImgPipeline",
        "StableDiffusionXLPipeline": "StableDiffusionXLImg2ImgPipeline",
        "LatentConsistencyModelPipeline": "LatentConsistencyModelImg2ImgPipeline",
    },
    Task.INPAINTING: {
        "StableDiffusionPipeline": "StableDiffusionInpaintPipeline",
        "StableDiffusionXLPipeline": "StableDiffusionXLInpaintPipeline",
        "LatentConsistencyModelPipeline": "StableDiffusionInpaintPipeline",
        "StableDiffusionInpaintPipeline": "StableDiffusionInpaintPipeline",
        "StableDiffusionXLInpaintPipeline": "StableDiffusionXLInpaintPipeline",
    },
}


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
    if p.task is not Task.TEXT_TO_IMAGE:
        task_cls = getattr(diffusers, _TASK_PIPELINES[p.task][cls_name])
        parts = inspect.signature(task_cls.__init__).parameters
        pipe = task_cls(**{k: v for k, v in pipe.components.items() if k in parts})
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
    if p.init_image is not None:
        from PIL import Image

        call["image"] = Image.fromarray(p.init_image)
        call["strength"] = p.strength
        if p.mask is not None:
            call["mask_image"] = Image.fromarray(p.mask)
    out = pipe(p.prompt, **call).images
    return [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in out]
