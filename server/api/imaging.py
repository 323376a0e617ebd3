"""Image encoding (PNG/JPEG/WebP) and preview resizing; runs in a worker pool, never on
the engine thread or the event loop."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from PIL import Image

from ..engine.types import ImageFormat

if TYPE_CHECKING:
    from ..engine.types import RGBArray

_PIL_FORMATS = {ImageFormat.PNG: "PNG", ImageFormat.JPEG: "JPEG", ImageFormat.WEBP: "WEBP"}


def encode(arr: RGBArray, fmt: ImageFormat, quality: int = 90) -> bytes:
    """Encode an HxWx3 uint8 array."""
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    if fmt is ImageFormat.PNG:
        img.save(buf, format="PNG", compress_level=4)
    else:
        img.save(buf, format=_PIL_FORMATS[fmt], quality=quality)
    return buf.getvalue()


def preview_image(arr: RGBArray, width: int, height: int, max_size: int) -> tuple[bytes, int, int]:
    """Resize a latent-resolution preview to the image's aspect, longest side ``max_size``;
    returns JPEG bytes and the preview's size."""
    scale = max_size / max(width, height)
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    img = Image.fromarray(arr).resize((w, h), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return buf.getvalue(), w, h
