"""Image inputs of a request (``init_image``, ``mask_image``): checked, decoded and resized at
the API edge, never on the engine thread.

Two stages, because decoding costs milliseconds and the event loop must not pay them:
:func:`probe` reads only an image's header (format and size, a few hundred bytes), so the
pixel limit is checked before anything is decompressed (decompression bombs) and validation
can size the output from it; :func:`decode_inputs` then decodes and resizes in a worker
thread, and a corrupt or truncated file is still the caller's ``INVALID_ARGUMENT``.

Resizing is what diffusers' ``VaeImageProcessor`` does to a PIL image (Lanczos to the target
size; the mask to grayscale first), so the engine hands the same pixels to the VAE as the
reference pipeline would.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .errors import FieldViolation, invalid_argument

if TYPE_CHECKING:
    from ..engine.types import GenerationParams

# The encodings accepted, as PIL names them.
FORMATS = ("PNG", "JPEG", "WEBP")


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says: its format and size."""

    format: str
    width: int
    height: int


def probe(data: bytes, field: str, max_pixels: int) -> ImageHeader | FieldViolation:
    """The header of ``data``, or the violation naming ``field``: not an accepted format, or
    more pixels than ``max_pixels`` (read from the header; nothing is decoded)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:
        return FieldViolation(
            field,
            f"claims more pixels than can be opened; the server's limit is {max_pixels} (--max-image-pixels)",
        )
    except Exception:  # UnidentifiedImageError, OSError, SyntaxError, struct.error...
        return FieldViolation(field, "is not a PNG, JPEG or WebP image (or its header is corrupt)")
    with img:
        w, h = img.size
        fmt = str(img.format)
    if w < 1 or h < 1:
        return FieldViolation(field, f"has no pixels ({w}x{h})")
    if w * h > max_pixels:
        return FieldViolation(
            field, f"is {w}x{h} = {w * h} pixels; the server's limit is {max_pixels} (--max-image-pixels)"
        )
    return ImageHeader(fmt, w, h)


def _decode(data: bytes, field: str, mode: str, size: tuple[int, int]) -> np.ndarray:
    """``data`` decoded, converted to ``mode`` and resized to ``size`` (width, height) as
    diffusers' image processor resizes (Lanczos; none when the size already matches)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as opened:
                opened.load()
                img: Image.Image = opened.convert(mode)  # alpha, palettes, 16 bits: dropped
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad data
        raise invalid_argument([FieldViolation(field, f"could not be decoded: {e}")]) from e
    if img.size != size:
        img = img.resize(size, resample=Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.uint8).copy()


def decode_inputs(params: GenerationParams, init_image: bytes, mask_image: bytes) -> GenerationParams:
    """``params`` with its image inputs decoded at the request's size (runs in a worker
    thread; the headers were checked by validation). Raises ``ApiError`` (INVALID_ARGUMENT)
    naming the field whose bytes do not decode."""
    if not init_image:
        return params
    size = (params.width, params.height)
    init = _decode(init_image, "init_image", "RGB", size)
    mask = _decode(mask_image, "mask_image", "L", size) if mask_image else None
    return replace(params, init_image=init, mask=mask)
