"""One batched denoiser step with the fault policy: faults stay with the requests that cause
them.

- A request whose own part of the step fails (its guidance or sampler update) fails alone;
  the adapter reports it with :class:`~.models.base.RequestStepFailures` after advancing
  the others.
- A failure of the shared forward is retried in two halves, down to single requests, so only
  a request that breaks the forward by itself fails (log2(n) extra forwards per poisoned
  request). The adapter's ``denoise_step`` is transactional per request, so a failed forward
  leaves everyone as they were.
- Running out of accelerator memory does the same and reports the smallest batch (in
  images) that ran out, so the scheduler can cap the model's batches below it.

Every attempt, failed or not, is reported with its marks: its time is charged to the
requests in it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .models.base import Mark, ModelAdapter, RequestStepFailures
from .request import RequestState

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Attempt:
    """One forward attempted, failed or not: its time is spent on ``requests``."""

    requests: list[RequestState]
    start: Mark
    end: Mark
    # Each request's share of the attempt: the work its rows added (ModelAdapter.row_costs).
    weights: list[float]


@dataclass(frozen=True)
class Forward:
    """A forward that ran: the requests it advanced, its rows and the images in it (those of
    requests that failed their own update included)."""

    requests: list[RequestState]
    rows: int
    images: int
    start: Mark
    end: Mark


@dataclass
class StepOutcome:
    """What one batched step did, in the order it happened."""

    # Requests that advanced one step (in batch order).
    stepped: list[RequestState] = field(default_factory=list)
    forwards: list[Forward] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    # Requests that failed, with the message they end with.
    failed: list[tuple[RequestState, str]] = field(default_factory=list)
    # The fewest images in a forward that ran out of accelerator memory, and its error
    # (None: none did).
    out_of_memory: tuple[int, BaseException] | None = None


def denoise_with_retries(adapter: ModelAdapter, batch: list[RequestState]) -> StepOutcome:
    """Run one step for ``batch`` (one bucket) under the fault policy above."""
    outcome = StepOutcome()
    outcome.stepped = _attempt(adapter, batch, outcome)
    return outcome


def _attempt(adapter: ModelAdapter, batch: list[RequestState], outcome: StepOutcome) -> list[RequestState]:
    """One forward for ``batch``; on a shared failure, retried in halves. Returns the requests
    that advanced."""
    weights = adapter.row_costs(batch)  # before the step moves the requests on
    start = adapter.mark()
    rows = 0
    failures: dict[str, BaseException] = {}
    error: Exception | None = None
    try:
        rows = adapter.denoise_step(batch)
    except RequestStepFailures as e:
        rows, failures = e.rows, e.failures
    except Exception as e:
        error = e
    end = adapter.mark()
    outcome.attempts.append(Attempt(batch, start, end, weights))
    if error is not None:
        return _retry_in_halves(adapter, batch, error, outcome)
    for req in batch:
        err = failures.get(req.request_id)
        if err is not None:
            logger.error("step of request %s failed: %s", req.request_id, err, extra=req.log_extra)
            outcome.failed.append((req, f"the denoising step failed: {type(err).__name__}: {err}"))
    stepped = [r for r in batch if r.request_id not in failures]
    if rows and stepped:
        images = sum(r.params.num_images for r in batch)
        outcome.forwards.append(Forward(stepped, rows, images, start, end))
    return stepped


def _retry_in_halves(
    adapter: ModelAdapter, batch: list[RequestState], error: Exception, outcome: StepOutcome
) -> list[RequestState]:
    """A shared forward failed: fail a lone request, else retry the batch in two halves."""
    oom = adapter.is_out_of_memory(error)
    if oom:
        adapter.recover_from_oom()
        images = sum(r.params.num_images for r in batch)
        if outcome.out_of_memory is None or images < outcome.out_of_memory[0]:
            outcome.out_of_memory = (images, error)
    if len(batch) == 1:
        what = "ran out of accelerator memory even alone" if oom else f"failed: {error}"
        logger.error("denoising step of request %s %s", batch[0].request_id, what, exc_info=error)
        outcome.failed.append((batch[0], f"the denoising step {what}"))
        return []
    logger.warning(
        "batched step of %d requests of %s failed (%s: %s); retrying in halves",
        len(batch),
        batch[0].model,
        type(error).__name__,
        error,
    )
    half = len(batch) // 2
    return _attempt(adapter, batch[:half], outcome) + _attempt(adapter, batch[half:], outcome)
