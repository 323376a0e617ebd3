"""A small deterministic judge: does an image show the shape its prompt asked for?

It reads one RGB image (the data set's size) with pixel statistics and plane geometry, no
learned parts. Each pixel gets a coverage ``alpha`` in [0, 1]: its RGB distance from the
plain background relative to the shape's own color, so anti-aliased or slightly blurred
edges count by how much they are covered (a hard threshold made small squares look round).

- color = the palette color nearest in hue to the median RGB of clearly covered pixels, and
  only if that median is within ``MAX_HUE_DEG`` of its hue and ``MAX_RGB_DISTANCE`` of its
  RGB: an olive or brown "red" reads as no color at all (``OFF_PALETTE``), not as the
  nearest one. The image is ``mixed`` when more than ``MAX_OTHER_HUE_FRACTION`` of its
  saturated object pixels are nearer another palette hue (two colors in one shape);
- bounding box = the columns / rows whose coverage reaches 0.5;
- shape = which ideal shape's corner profile is nearest: the mean coverage of the two top
  and of the two bottom corner boxes (a quarter of the box's width and height) is about
  (1, 1) for a square, (0.28, 0.28) for a circle inscribed in its box and (0, 0.75) for
  an upright triangle. Corners tell the shapes apart even when a generated shape's edges
  wobble (a fill-ratio reading confused rounded squares with circles);
- size = the longer side (sum of the column / row coverage maxima) against the midpoint
  of the two nominal sizes;
- position = the nominal position nearest the coverage profile's centre.

``validate`` checks it against ground truth on freshly generated data, sharp and blurred
(it scores 100% on both); ``score`` compares readings with prompts' attributes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

try:  # importable both as ``models.tiny.judge`` and as a script beside ``data.py``
    from . import data
except ImportError:  # pragma: no cover - script use
    import data  # type: ignore[no-redef]

ATTRIBUTES = ("color", "shape", "size", "position")
# Pixels this far (RGB distance) from the background are certainly part of the shape.
FOREGROUND_THRESHOLD = 60.0
# How far the object's median color may be from the palette color it is read as: hue angle
# (degrees) and RGB distance. Palette colors are 49 degrees or more apart in hue.
MAX_HUE_DEG = 20.0
MAX_RGB_DISTANCE = 80.0
# A shape is two-colored when more than this fraction of its saturated pixels are nearer in
# hue to another palette color than the one it is read as.
MAX_OTHER_HUE_FRACTION = 0.2
# Pixels at least this fraction as far from the background as the object's farthest (95th
# percentile) are its core, whose median RGB gives its color.
CORE_COVERAGE = 0.8
# Pixels less saturated than this have no reliable hue (background, grayish blends).
MIN_SATURATION = 0.25
# The color reading of an object whose color is no palette color.
OFF_PALETTE = "off-palette"
# Coverage below this is treated as noise.
MIN_ALPHA = 0.15
# (top corners, bottom corners) coverage of each ideal shape (see the module docstring).
CORNER_PROFILES = {"square": (1.0, 1.0), "circle": (0.28, 0.28), "triangle": (0.0, 0.75)}
# Corner boxes span this fraction of the bounding box's width and height.
CORNER_FRACTION = 0.25
# Longer sides below this are "small" (halfway between the two nominal sizes).
SIZE_SPLIT_PX = data.SIZES["small"] + data.SIZES["large"]


@dataclass(frozen=True)
class Reading:
    """What the judge sees in one image; ``None`` fields mean it saw no shape at all."""

    color: str | None
    shape: str | None
    size: str | None
    position: str | None
    top_corners: float = 0.0
    bottom_corners: float = 0.0
    side_px: float = 0.0
    mixed: bool = False


def hue_saturation(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hue (degrees, [0, 360)) and HSV saturation of ... x 3 RGB values."""
    rgb = rgb.astype(np.float32) / 255.0
    hi, lo = rgb.max(axis=-1), rgb.min(axis=-1)
    chroma = hi - lo
    safe = np.where(chroma > 0, chroma, 1.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hue = np.where(hi == r, ((g - b) / safe) % 6, np.where(hi == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = np.where(chroma > 0, hue * 60.0, 0.0)
    return hue, np.where(hi > 0, chroma / np.where(hi > 0, hi, 1.0), 0.0)


PALETTE_HUES = {c: float(hue_saturation(np.array(rgb))[0]) for c, rgb in data.COLORS.items()}


def hue_distance(a: np.ndarray | float, b: float) -> np.ndarray:
    d = np.abs(np.asarray(a, dtype=np.float32) - b) % 360.0
    return np.minimum(d, 360.0 - d)


def nearest_hue(hue: np.ndarray) -> np.ndarray:
    """Index into ``data.COLORS`` of the palette hue nearest each hue."""
    return np.argmin(np.stack([hue_distance(hue, h) for h in PALETTE_HUES.values()]), axis=0)


def read_color(pixels: np.ndarray) -> tuple[str, bool]:
    """The palette color of an object's pixels (K x 3) or OFF_PALETTE, and whether it mixes two."""
    med = np.median(pixels, axis=0)
    hue, sat = hue_saturation(med)
    name = list(data.COLORS)[int(nearest_hue(hue))]
    close = (
        float(hue_distance(hue, PALETTE_HUES[name])) <= MAX_HUE_DEG
        and float(np.linalg.norm(med - np.array(data.COLORS[name]))) <= MAX_RGB_DISTANCE
    )
    hues, sats = hue_saturation(pixels)
    vivid = sats >= MIN_SATURATION
    mixed = False
    if vivid.sum() >= 3:
        other = nearest_hue(hues[vivid]) != list(data.COLORS).index(name)
        mixed = float(other.mean()) > MAX_OTHER_HUE_FRACTION
    return (name if close else OFF_PALETTE), mixed


def read(image: np.ndarray) -> Reading:
    """Read color, shape, size and position off one HxWx3 uint8 image."""
    img = image.astype(np.float32)
    bg = np.array(data.BACKGROUND_RGB, dtype=np.float32)
    dist = np.linalg.norm(img - bg, axis=-1)
    solid = dist > FOREGROUND_THRESHOLD
    if solid.sum() < 3:
        return Reading(None, None, None, None)
    med = np.median(img[solid], axis=0)
    # Color from the most covered pixels: edges (and a blur) blend the color with the
    # background, which keeps its hue but moves its RGB toward gray.
    core = dist >= CORE_COVERAGE * np.percentile(dist[solid], 95)
    color, mixed = read_color(img[solid & core])
    alpha = np.clip(dist / max(float(np.linalg.norm(med - bg)), 1.0), 0.0, 1.0)
    alpha[alpha < MIN_ALPHA] = 0.0
    cols, rows = alpha.max(axis=0), alpha.max(axis=1)
    w, h = float(cols.sum()), float(rows.sum())
    xs, ys = np.nonzero(cols >= 0.5)[0], np.nonzero(rows >= 0.5)[0]
    if len(xs) == 0 or len(ys) == 0:
        return Reading(color, None, None, None, mixed=mixed)
    x0, x1, y0, y1 = int(xs[0]), int(xs[-1]) + 1, int(ys[0]), int(ys[-1]) + 1
    bw = max(1, round((x1 - x0) * CORNER_FRACTION))
    bh = max(1, round((y1 - y0) * CORNER_FRACTION))
    top = float(alpha[y0 : y0 + bh, x0 : x0 + bw].mean() + alpha[y0 : y0 + bh, x1 - bw : x1].mean()) / 2
    bottom = float(alpha[y1 - bh : y1, x0 : x0 + bw].mean() + alpha[y1 - bh : y1, x1 - bw : x1].mean()) / 2
    shape = min(
        CORNER_PROFILES,
        key=lambda k: (top - CORNER_PROFILES[k][0]) ** 2 + (bottom - CORNER_PROFILES[k][1]) ** 2,
    )
    side = max(w, h)
    size = "small" if side < SIZE_SPLIT_PX else "large"
    cx = float((cols * np.arange(len(cols))).sum() / max(w, 1e-6))
    cy = float((rows * np.arange(len(rows))).sum() / max(h, 1e-6))
    position = min(
        data.POSITIONS,
        key=lambda p: (cx - data.POSITIONS[p][0]) ** 2 + (cy - data.POSITIONS[p][1]) ** 2,
    )
    return Reading(color, shape, size, position, top, bottom, side, mixed)


def score(images: list[np.ndarray], targets: list[data.Sample]) -> dict[str, float]:
    """Fraction of images whose reading matches the target, per attribute, and the fraction
    in one color (``one_color``: not ``mixed``)."""
    hits = dict.fromkeys((*ATTRIBUTES, "one_color"), 0)
    for img, t in zip(images, targets, strict=True):
        r = read(img)
        for a in ATTRIBUTES:
            hits[a] += int(getattr(r, a) == getattr(t, a))
        hits["one_color"] += int(not r.mixed)
    return {a: n / len(images) for a, n in hits.items()}


def validate(n: int = 2000, seed: int = 12345, blur_px: float = 0.0) -> dict[str, float]:
    """The judge's accuracy on ground-truth renders (1.0 everywhere, also with blur 1 px)."""
    from PIL import Image, ImageFilter

    images, _, samples = data.make_dataset(n, seed)
    if blur_px:
        blur = ImageFilter.GaussianBlur(blur_px)
        images = np.stack([np.asarray(Image.fromarray(i).filter(blur)) for i in images])
    return score(list(images), samples)


if __name__ == "__main__":
    print("sharp:", validate())
    print("blurred 1px:", validate(blur_px=1.0))


# Style (the embedded LoRA adapters): a striped object's box has rows (almost) empty between
# covered ones; an outline has few pixels whose four neighbours are object
# too. Calibrated on renders (validate_styles): large shapes only, small ones are too few
# pixels for a 2 px stroke or stripe to show.
STRIPE_GAP = 0.25
OUTLINE_INTERIOR = 0.35


def read_style(image: np.ndarray) -> str | None:
    """ "solid", "outline" or "stripes" for a large shape in an HxWx3 image; None if no object."""
    dist = np.linalg.norm(image.astype(np.float32) - np.array(data.BACKGROUND_RGB, np.float32), axis=-1)
    obj = dist > FOREGROUND_THRESHOLD * 2
    if obj.sum() < 6:
        return None
    ys, xs = np.nonzero(obj)
    box = obj[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    rows = box.mean(axis=1)
    # Rows of the object's box with (almost) nothing in them, between covered ones: stripes.
    low = rows < STRIPE_GAP * rows.max()
    covered = np.nonzero(~low)[0]
    inner = low[covered[0] : covered[-1] + 1]  # between the first and last covered rows
    if bool(inner.any()):
        return "stripes"
    inner = obj[1:-1, 1:-1] & obj[:-2, 1:-1] & obj[2:, 1:-1] & obj[1:-1, :-2] & obj[1:-1, 2:]
    return "outline" if inner.sum() / obj.sum() < OUTLINE_INTERIOR else "solid"


def validate_styles(n: int = 300, seed: int = 99) -> dict[str, float]:
    """The style reading's accuracy on renders of large shapes in every style."""
    import random

    rng = random.Random(seed)
    out = {}
    for style in data.STYLES:
        hits = 0
        for _ in range(n):
            s = data.random_sample(rng)
            s = data.Sample(s.color, s.shape, "large", s.position, s.dx, s.dy)
            hits += read_style(np.asarray(data.render(s, style=style))) == style
        out[style] = hits / n
    return out
