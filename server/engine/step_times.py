"""How long one denoiser forward takes, learned per model, latent size and rows: the curve
the scheduler plans with and admission estimates against. Pure Python: no torch, no threads.

A forward's time grows with its rows (sublinearly while the accelerator has room) and with
the latent size. Each measured (model, height, width, rows) point is smoothed on its own; an
estimate for rows not measured interpolates between the nearest measured ones of that size,
and beyond the largest grows linearly (what a saturated accelerator does: conservative while
batching still helps). A size never measured borrows the closest measured size of the model,
scaled up by the pixel ratio when larger and not scaled down when smaller; a model with no
measurement at all uses a prior per row. Estimates err long: a deadline-aware admission that
guesses short accepts requests it then fails (a first 64x64 request, estimated from the
32x32 warm-up's steps, was accepted with a 5 s deadline it needed 9.4 s for).
"""

from __future__ import annotations

import bisect

# Seconds per forward row assumed before a model's first forward is measured.
PRIOR_S_PER_ROW = 0.05
# Weight of the newest measurement in a point's smoothed time.
SMOOTHING = 0.2

Shape = tuple[int, int]  # latent-space request size: (height, width) in pixels


class StepTimes:
    """Smoothed seconds per forward by (model, height, width, rows), with estimates between."""

    def __init__(self, prior_s_per_row: float = PRIOR_S_PER_ROW) -> None:
        self.prior_s_per_row = prior_s_per_row
        # model -> (height, width) -> sorted rows, and their smoothed seconds.
        self._rows: dict[str, dict[Shape, list[int]]] = {}
        self._seconds: dict[tuple[str, int, int, int], float] = {}
        self._count: dict[tuple[str, int, int, int], int] = {}

    def record(self, model: str, height: int, width: int, rows: int, seconds: float) -> None:
        """Fold one measured forward into its point's smoothed time. A point's first forward
        pays one-time costs (allocations, kernel choices: measured 2-3x a later one on this
        CPU), so its second measurement replaces it instead of being smoothed into it."""
        key = (model, height, width, rows)
        old = self._seconds.get(key)
        n = self._count.get(key, 0)
        self._count[key] = n + 1
        if old is None:
            bisect.insort(self._rows.setdefault(model, {}).setdefault((height, width), []), rows)
            self._seconds[key] = seconds
        elif n == 1:
            self._seconds[key] = seconds
        else:
            self._seconds[key] = (1 - SMOOTHING) * old + SMOOTHING * seconds

    def measured(self, model: str, height: int, width: int) -> bool:
        return (height, width) in self._rows.get(model, {})

    def estimate(self, model: str, height: int, width: int, rows: int) -> float:
        """Seconds one forward of ``rows`` rows of this size is expected to take."""
        rows = max(1, rows)
        shapes = self._rows.get(model)
        if not shapes:
            return self.prior_s_per_row * rows
        if (height, width) in shapes:
            return self._on_curve(model, (height, width), rows)
        # The measured size closest in pixels; scaled up by the pixel ratio, never down.
        pixels = height * width
        near = min(shapes, key=lambda s: (abs(s[0] * s[1] - pixels), -s[0] * s[1]))
        return self._on_curve(model, near, rows) * max(1.0, pixels / (near[0] * near[1]))

    def _on_curve(self, model: str, shape: Shape, rows: int) -> float:
        known = self._rows[model][shape]

        def at(r: int) -> float:
            return self._seconds[(model, shape[0], shape[1], r)]

        i = bisect.bisect_left(known, rows)
        if i < len(known) and known[i] == rows:
            return at(rows)
        if i == 0:  # fewer rows than any measured: no faster than the smallest measured
            return at(known[0])
        if i == len(known):  # more rows than any measured: linear from the largest
            return at(known[-1]) * rows / known[-1]
        lo, hi = known[i - 1], known[i]
        # Interpolated, and never below the smaller point (smoothing can invert neighbours).
        return max(at(lo), at(lo) + (at(hi) - at(lo)) * (rows - lo) / (hi - lo))


__all__ = ["PRIOR_S_PER_ROW", "StepTimes"]
