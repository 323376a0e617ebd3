"""Find and load models: the embedded default and local diffusers directories."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from .base import ModelAdapter

DEFAULT_MODEL_NAME = "tiny-shapes"

# Pipeline classes (model_index.json "_class_name") each adapter serves.
_ADAPTERS = {
    "StableDiffusionPipeline": "stable_diffusion",
}


class ModelLoadError(RuntimeError):
    """A model directory cannot be served; the message says why and names the file."""


def default_model_path() -> Path:
    """The embedded ``tiny-shapes`` pipeline directory shipped inside the package."""
    return Path(str(resources.files("stepserve.server.assets") / DEFAULT_MODEL_NAME))


def inspect_model_dir(path: Path) -> str:
    """Check ``path`` looks like a diffusers pipeline directory; return its pipeline class."""
    if not path.is_dir():
        raise ModelLoadError(f"model directory {str(path)!r} does not exist or is not a directory")
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{str(index)!r} is missing: not a diffusers pipeline directory")
    try:
        meta = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{str(index)!r} is not valid JSON: {e}") from e
    cls = str(meta.get("_class_name", ""))
    if cls not in _ADAPTERS:
        raise ModelLoadError(
            f"{str(path)!r} holds a {cls or 'unnamed'} pipeline, which stepserve does not serve "
            f"(supported: {', '.join(sorted(_ADAPTERS))})"
        )
    for component in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (path / component).is_dir():
            raise ModelLoadError(f"{str(path / component)!r} is missing ({cls} needs a {component})")
    return cls


def load_model(name: str, path: Path | str, **kwargs: Any) -> ModelAdapter:
    """Load the pipeline directory at ``path`` as model ``name`` (no network access)."""
    path = Path(path)
    cls = inspect_model_dir(path)
    if _ADAPTERS[cls] == "stable_diffusion":
        from .stable_diffusion import StableDiffusionAdapter

        return StableDiffusionAdapter(name, path, **kwargs)
    raise AssertionError(cls)  # pragma: no cover - _ADAPTERS and this switch agree
