"""Per-request state inside the engine: one class, one explicit status enum."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Generic

from typing_extensions import TypeVar

from .types import FinishReason, GenerationParams

# A model adapter's per-request tensor state (latents, per-image samplers and generators,
# prompt embeddings): each adapter names its own type, RequestState[ItsWork]; the scheduler
# and the engine loop never look inside, so for them it stays unspecified.
WorkT = TypeVar("WorkT", default=Any)


class RequestStatus(enum.Enum):
    """Life of a request; every FINISHED_* state is terminal."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_OK = "finished_ok"
    FINISHED_CANCELLED = "finished_cancelled"
    FINISHED_DEADLINE = "finished_deadline"
    FINISHED_ERROR = "finished_error"
    FINISHED_SHUTDOWN = "finished_shutdown"
    FINISHED_REJECTED = "finished_rejected"

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> FinishReason:
        """The API-facing reason for a terminal status (the one place this mapping lives)."""
        return _FINISH_REASONS[self]


_FINISH_REASONS = {
    RequestStatus.FINISHED_OK: FinishReason.OK,
    RequestStatus.FINISHED_CANCELLED: FinishReason.CANCELLED,
    RequestStatus.FINISHED_DEADLINE: FinishReason.DEADLINE,
    RequestStatus.FINISHED_ERROR: FinishReason.ERROR,
    RequestStatus.FINISHED_SHUTDOWN: FinishReason.SHUTDOWN,
    RequestStatus.FINISHED_REJECTED: FinishReason.UNMEETABLE_DEADLINE,
}

# (model, height, width, tag): the tag is () unless the engine separates batches by something
# else (--lora-batching separate: the request's adapters).
BucketKey = tuple[str, int, int, tuple[Any, ...]]


@dataclass(eq=False)
class RequestState(Generic[WorkT]):
    """A request as the scheduler and the engine see it.

    ``work`` holds the model adapter's tensor state, set by ``ModelAdapter.prepare`` and
    dropped by ``ModelAdapter.release``; the scheduler never looks inside it.
    """

    params: GenerationParams
    arrival_time: float
    status: RequestStatus = RequestStatus.WAITING
    admitted_time: float | None = None
    finished_time: float | None = None
    steps_done: int = 0
    # Last queue position reported to the caller (None = never reported).
    reported_position: int | None = None
    # Accounting, in seconds of accelerator time attributed to this request.
    accelerator_s: float = 0.0
    # Of accelerator_s, the share of encoding its image inputs.
    image_encode_s: float = 0.0
    forwards: int = 0
    batch_images_sum: int = 0
    first_preview_time: float | None = None
    # Scheduler step counter of this request's last forward (-1 = none yet), and when it ran.
    last_step: int = -1
    last_stepped_at: float | None = None
    # Left out of its bucket's forwards by the scheduler (preempted), keeping its state; how
    # many times that happened.
    paused: bool = False
    pauses: int = 0
    # Only requests with equal tags share a forward (see BucketKey).
    batch_tag: tuple[Any, ...] = ()
    work: WorkT | None = field(default=None, repr=False)
    # The caller's trace context (an OpenTelemetry SpanContext, or None when not traced) and
    # per-request state that observers keep (open spans); the engine never looks inside.
    trace_context: Any = field(default=None, repr=False)
    telemetry: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def request_id(self) -> str:
        return self.params.request_id

    @property
    def model(self) -> str:
        return self.params.model

    @property
    def log_extra(self) -> dict[str, str]:
        """``extra`` for log records about this request (request and trace ids)."""
        out = {"request_id": self.params.request_id}
        trace_id = getattr(self.trace_context, "trace_id", 0)
        if trace_id:
            out["trace_id"] = format(trace_id, "032x")
        return out

    @property
    def bucket(self) -> BucketKey:
        """Requests with equal buckets can share one batched denoiser forward."""
        return (self.params.model, self.params.height, self.params.width, self.batch_tag)

    @property
    def total_steps(self) -> int:
        """Steps the request runs (fewer than its schedule's when an init image stands in
        for the first ones)."""
        return self.params.steps_run

    @property
    def remaining_steps(self) -> int:
        return self.params.steps_run - self.steps_done

    @property
    def steps_complete(self) -> bool:
        return self.steps_done >= self.params.steps_run

    def preview_due(self) -> bool:
        """Whether the step about to run should produce a preview."""
        every = self.params.preview_every
        return every > 0 and (self.steps_done + 1) % every == 0
