"""Where the accelerator's time goes: each piece of model work, timed between two marks, is
split among the requests it served; the rest of the wall time is idle. Also the running
estimate of each model's step time, which queue-wait estimates and deadline checks use.

Because every timed piece is split into shares that add up to it, the seconds charged to
all requests equal :attr:`Ledger.busy_s` (see docs/architecture.md, "Cost accounting").
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from .models.base import Mark
from .request import RequestState

# Seconds per denoiser forward assumed for a model before its first step is measured.
STEP_TIME_PRIOR_S = 0.05
# Weight of the newest measurement in the smoothed step time.
STEP_TIME_SMOOTHING = 0.2


class Ledger:
    """Accelerator seconds: busy (model work) and idle, and each request's share."""

    def __init__(self, models: Iterable[str]) -> None:
        self.busy_s = 0.0
        self._started_at = time.perf_counter()
        # Seconds per batched denoiser forward, smoothed, per model.
        self.step_time_s: dict[str, float] = dict.fromkeys(models, STEP_TIME_PRIOR_S)
        # Batched forwards run, and the rows of the last one.
        self.forwards = 0
        self.last_batch_rows = 0

    def start(self) -> None:
        """Idle time counts from now (the engine thread starts)."""
        self._started_at = time.perf_counter()

    def charge(self, reqs: Sequence[RequestState], weights: Sequence[float], start: Mark, end: Mark) -> float:
        """Account the accelerator time from ``start`` to ``end`` as spent on ``reqs``, split
        by ``weights`` (the rows or images each added), so the shares add up to the whole.
        Returns the time."""
        seconds = end.seconds_since(start)
        self.busy_s += seconds
        total = sum(weights)
        for req, w in zip(reqs, weights, strict=True):
            req.accelerator_s += seconds * w / total
        return seconds

    def record_forward(self, rows: int) -> None:
        self.forwards += 1
        self.last_batch_rows = rows

    def record_step_time(self, model: str, seconds: float) -> None:
        """Fold one measured forward of ``model`` into its smoothed step time."""
        old = self.step_time_s[model]
        self.step_time_s[model] = (1 - STEP_TIME_SMOOTHING) * old + STEP_TIME_SMOOTHING * seconds

    def accelerator_seconds(self) -> tuple[float, float]:
        """(busy, idle) seconds since start: busy is time in model work, idle the rest."""
        busy = self.busy_s
        return busy, max(0.0, time.perf_counter() - self._started_at - busy)
