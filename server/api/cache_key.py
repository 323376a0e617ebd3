"""The result cache's key: what decides a generation's final bytes, hashed.

A generation is a deterministic function of the model (its files, the dtype and device it runs
in, the library versions), every request field that changes pixels or bytes, the adapters and
the image inputs. :func:`result_key` hashes a canonical, versioned encoding of exactly those.
``KEY_FIELDS`` and ``EXCLUDED_FIELDS`` between them name every ``GenerationParams`` field
(tests/test_result_cache.py fails when a new one is in neither).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..engine.types import GenerationParams, ImageFormat

# Bumped whenever the key's encoding or an entry's meaning changes: old entries then miss.
KEY_VERSION = 2

# GenerationParams fields that change pixels or bytes: every one is in the key.
KEY_FIELDS = frozenset(
    {
        "model",
        "prompt",
        "negative_prompt",
        "width",
        "height",
        "steps",
        "guidance_scale",
        "seed",
        "sampler",
        "cfg",
        "num_images",
        "output_format",
        "output_quality",  # only for lossy formats: PNG ignores it (see result_key)
        "karras",
        "init_image",  # as the sha256 of the encoded bytes received (see InputDigests)
        "mask",  # likewise
        "strength",
        "first_step",
        "preserve_unmasked",
        "mask_feather",
        "loras",  # names and scales, plus each adapter file's digest (ModelFingerprint.loras)
        "cache_interval",  # feature caching changes the pixels
    }
)
# GenerationParams fields deliberately left out: they change when or how a request runs, or
# what it streams, never its final images.
EXCLUDED_FIELDS = frozenset(
    {
        "request_id",
        "priority",
        "deadline",
        "preview_every",  # previews are not cached; see Flight for what a follower gets
        "preview_max_size",
        "internal",  # warm-up requests never pass through the API
        "encoded_input_bytes",  # the inputs' digests stand for them
    }
)


@dataclass(frozen=True)
class ModelFingerprint:
    """What, besides a request's fields, decides one model's pixels on this server.

    ``files``: sha256 over the model directory's files (weights, configs, tokenizer: all of
    them, as relative path, size and content). ``runtime``: dtype, device type and the
    versions of stepserve, torch and diffusers (kernels differ across them, so a replica on
    another build must not serve this one's images). ``loras``: each registered adapter's file
    digest by name. ``options``: serving options that change pixels (``quantization``).
    """

    files: str
    runtime: str
    loras: Mapping[str, str]
    # Serving options that change pixels: the UNet's weight quantization.
    options: Mapping[str, str]


@dataclass(frozen=True)
class InputDigests:
    """sha256 of a request's image inputs as received (empty: none)."""

    init_image: str = ""
    mask_image: str = ""

    @classmethod
    def of(cls, init_image: bytes, mask_image: bytes) -> InputDigests:
        """Digests of encoded image inputs (hashing megabytes: run it off the event loop)."""

        def digest(data: bytes) -> str:
            return hashlib.sha256(data).hexdigest() if data else ""

        return cls(digest(init_image), digest(mask_image))


def result_key(params: GenerationParams, model: ModelFingerprint, inputs: InputDigests) -> str:
    """The cache key of a generation: sha256 of a canonical JSON encoding (sorted keys, no
    whitespace, floats by their shortest round-trip repr) of ``KEY_FIELDS``."""
    lossy = params.output_format is not ImageFormat.PNG
    doc: dict[str, Any] = {
        "v": KEY_VERSION,
        "model": {
            "name": params.model,
            "files": model.files,
            "runtime": model.runtime,
            "options": dict(model.options),
        },
        "params": {
            "prompt": params.prompt,
            "negative_prompt": params.negative_prompt,
            "width": params.width,
            "height": params.height,
            "steps": params.steps,
            "guidance_scale": params.guidance_scale,
            "seed": params.seed,
            "sampler": params.sampler.value,
            "cfg": params.cfg,
            "num_images": params.num_images,
            "output_format": params.output_format.value,
            "output_quality": params.output_quality if lossy else None,
            "karras": params.karras,
            "init_image": inputs.init_image,
            "mask": inputs.mask_image,
            "strength": params.strength,
            "first_step": params.first_step,
            "preserve_unmasked": params.preserve_unmasked,
            "mask_feather": params.mask_feather,
            "loras": [[name, scale, model.loras.get(name, "")] for name, scale in params.loras],
            "cache_interval": params.cache_interval,
        },
    }
    encoded = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(encoded.encode()).hexdigest()
