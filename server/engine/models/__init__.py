"""Model adapters: turn a diffusers pipeline directory into engine operations."""

from .base import ModelAdapter
from .registry import DEFAULT_MODEL_NAME, default_model_path, load_model

__all__ = ["DEFAULT_MODEL_NAME", "ModelAdapter", "default_model_path", "load_model"]
