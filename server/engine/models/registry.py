"""Find and load models: the embedded default and local diffusers directories."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from .base import ModelAdapter

DEFAULT_MODEL_NAME = "tiny-shapes"

# Pipeline classes (model_index.json "_class_name") served, with the components each needs.
_SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
PIPELINES: dict[str, tuple[str, tuple[str, ...]]] = {
    "StableDiffusionPipeline": ("StableDiffusionAdapter", _SD_COMPONENTS),
    "StableDiffusionXLPipeline": (
        "StableDiffusionXLAdapter",
        (*_SD_COMPONENTS, "text_encoder_2", "tokenizer_2"),
    ),
    "LatentConsistencyModelPipeline": ("LatentConsistencyAdapter", _SD_COMPONENTS),
    # Dedicated inpainting checkpoints (a UNet with mask and masked-image input channels).
    "StableDiffusionInpaintPipeline": ("StableDiffusionAdapter", _SD_COMPONENTS),
    "StableDiffusionXLInpaintPipeline": (
        "StableDiffusionXLAdapter",
        (*_SD_COMPONENTS, "text_encoder_2", "tokenizer_2"),
    ),
}
_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "model.safetensors",
    "pytorch_model.bin",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors",
)


class ModelLoadError(RuntimeError):
    """A model directory cannot be served; the message says why and names the file."""


def default_model_path() -> Path:
    """The embedded ``tiny-shapes`` pipeline directory shipped inside the package."""
    return Path(str(resources.files("stepserve.server.assets") / DEFAULT_MODEL_NAME))


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelLoadError(f"{str(path)!r} is missing")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{str(path)!r} does not hold a JSON object")
    return data


def inspect_model_dir(path: Path) -> str:
    """Check ``path`` is a diffusers pipeline directory stepserve serves, with every file it
    needs; return its pipeline class. Errors name the missing or mismatched file."""
    if not path.is_dir():
        raise ModelLoadError(f"model directory {str(path)!r} does not exist or is not a directory")
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{str(index)!r} is missing: not a diffusers pipeline directory")
    meta = _read_json(index)
    cls = str(meta.get("_class_name", ""))
    if cls not in PIPELINES:
        raise ModelLoadError(
            f"{str(path)!r} holds a {cls or 'unnamed'} pipeline, which stepserve does not serve "
            f"(supported: {', '.join(sorted(PIPELINES))})"
        )
    for component in PIPELINES[cls][1]:
        d = path / component
        if not d.is_dir():
            raise ModelLoadError(f"{str(d)!r} is missing ({cls} needs a {component})")
        if component.startswith("tokenizer"):
            if not any((d / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
                raise ModelLoadError(f"{str(d)!r} holds no tokenizer files (tokenizer.json or vocab.json)")
            continue
        config = "scheduler_config.json" if component == "scheduler" else "config.json"
        _read_json(d / config)
        if component != "scheduler" and not any((d / f).is_file() for f in _WEIGHTS):
            raise ModelLoadError(f"{str(d)!r} holds no weights (expected {_WEIGHTS[0]})")
    if cls in ("StableDiffusionXLPipeline", "StableDiffusionXLInpaintPipeline"):
        unet = _read_json(path / "unet" / "config.json")
        if unet.get("addition_embed_type") != "text_time":
            raise ModelLoadError(
                f"{str(path / 'unet' / 'config.json')!r}: addition_embed_type is "
                f"{unet.get('addition_embed_type')!r}, but an SDXL UNet takes 'text_time'"
            )
    if cls == "LatentConsistencyModelPipeline":
        unet = _read_json(path / "unet" / "config.json")
        if not unet.get("time_cond_proj_dim"):
            raise ModelLoadError(
                f"{str(path / 'unet' / 'config.json')!r} has no time_cond_proj_dim: not an LCM-distilled UNet"
            )
    return cls


def load_model(name: str, path: Path | str, **kwargs: Any) -> ModelAdapter:
    """Load the pipeline directory at ``path`` as model ``name`` (no network access)."""
    from . import stable_diffusion

    path = Path(path)
    cls = inspect_model_dir(path)
    adapter: type[ModelAdapter] = getattr(stable_diffusion, PIPELINES[cls][0])
    return adapter(name, path, pipeline_class=cls, **kwargs)  # type: ignore[call-arg]
