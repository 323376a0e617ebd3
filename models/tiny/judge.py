"""A small deterministic judge: does an image show the shape its prompt asked for?

It reads one RGB image (the data set's size) with pixel statistics and plane geometry, no learned parts:

- foreground = pixels far from the plain background color;
- color = the palette color nearest the foreground's median RGB;
- shape = how much of its bounding box the foreground fills (square ~1.0, circle ~0.79,
  triangle ~0.5);
- size = the bounding box's longer side, against the midpoint of the two sizes;
- position = the nominal position nearest the bounding box's centre.

``validate`` checks it against ground truth on freshly generated data (it scores 100%
there); ``score`` compares a generated image's reading with its prompt's attributes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

try:  # importable both as ``models.tiny.judge`` and as a script beside ``data.py``
    from . import data
except ImportError:  # pragma: no cover - script use
    import data  # type: ignore[no-redef]

ATTRIBUTES = ("color", "shape", "size", "position")
# A pixel is foreground when its RGB distance from the background exceeds this.
FOREGROUND_THRESHOLD = 60.0
# Bounding-box sides below this are "small" (halfway between the two nominal sizes).
SIZE_SPLIT_PX = data.SIZES["small"] + data.SIZES["large"]


@dataclass(frozen=True)
class Reading:
    """What the judge sees in one image; ``None`` fields mean it saw no shape at all."""

    color: str | None
    shape: str | None
    size: str | None
    position: str | None
    foreground_px: int


def read(image: np.ndarray) -> Reading:
    """Read color, shape, size and position off one HxWx3 uint8 image."""
    img = image.astype(np.float32)
    bg = np.array(data.BACKGROUND_RGB, dtype=np.float32)
    mask = np.linalg.norm(img - bg, axis=-1) > FOREGROUND_THRESHOLD
    n = int(mask.sum())
    if n < 6:
        return Reading(None, None, None, None, n)
    med = np.median(img[mask], axis=0)
    color = min(data.COLORS, key=lambda c: float(np.linalg.norm(med - np.array(data.COLORS[c]))))
    ys, xs = np.nonzero(mask)
    # Robust extent: ignore a few stray pixels at the edges.
    x0, x1 = np.percentile(xs, [1, 99])
    y0, y1 = np.percentile(ys, [1, 99])
    w, h = x1 - x0 + 1, y1 - y0 + 1
    fill = n / float(w * h)
    shape = "square" if fill > 0.9 else "circle" if fill > 0.64 else "triangle"
    side = max(w, h)
    size = "small" if side < SIZE_SPLIT_PX else "large"
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    position = min(
        data.POSITIONS,
        key=lambda p: (cx - data.POSITIONS[p][0]) ** 2 + (cy - data.POSITIONS[p][1]) ** 2,
    )
    return Reading(color, shape, size, position, n)


def score(images: list[np.ndarray], targets: list[data.Sample]) -> dict[str, float]:
    """Fraction of images whose reading matches the target, per attribute."""
    hits = dict.fromkeys(ATTRIBUTES, 0)
    for img, t in zip(images, targets, strict=True):
        r = read(img)
        for a in ATTRIBUTES:
            hits[a] += int(getattr(r, a) == getattr(t, a))
    return {a: hits[a] / len(images) for a in ATTRIBUTES}


def validate(n: int = 2000, seed: int = 12345) -> dict[str, float]:
    """The judge's accuracy on ground-truth renders (should be 1.0 everywhere)."""
    images, _, samples = data.make_dataset(n, seed)
    return score(list(images), samples)


if __name__ == "__main__":
    print(validate())
