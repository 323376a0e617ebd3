"""Hooks through which metrics and tracing watch the engine, without the engine knowing them.

The engine calls every hook on its own thread, right after the thing happened; times are
the engine clock's (``now``) and measured wall durations in seconds. Implementations must be
quick; an exception in one is logged and swallowed (observability never fails a request).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .request import RequestState
    from .types import FinishReason, Usage

logger = logging.getLogger(__name__)


class EngineObserver:
    """Base class with no-op hooks; override the ones you need."""

    def request_admitted(self, req: RequestState, now: float) -> None:
        """``req`` left the queue and joined the running set (``now - req.arrival_time`` waited)."""

    def prompts_encoded(self, reqs: Sequence[RequestState], seconds: float) -> None:
        """The admitted ``reqs`` (one model) had their prompts encoded together in ``seconds``."""

    def images_encoded(self, reqs: Sequence[RequestState], seconds: float) -> None:
        """The admitted ``reqs`` (one model) had their init images (and masks) encoded
        together in ``seconds``."""

    def batch_stepped(self, batch: Sequence[RequestState], rows: int, seconds: float) -> None:
        """One batched denoiser forward (plus sampler steps) for ``batch`` took ``seconds``;
        each request's ``steps_done`` already counts it."""

    def preview_made(self, req: RequestState, now: float, seconds: float) -> None:
        """A preview of ``req`` was computed in ``seconds`` and is about to be sent."""

    def request_paused(self, req: RequestState, now: float) -> None:
        """The scheduler left running ``req`` out of its bucket's forward (preempted)."""

    def request_resumed(self, req: RequestState, now: float) -> None:
        """Paused ``req`` steps again."""

    def images_decoded(self, reqs: Sequence[RequestState], seconds: float) -> None:
        """The finished ``reqs`` (one model) were decoded together in ``seconds``."""

    def request_finished(
        self, req: RequestState, reason: FinishReason, now: float, usage: Usage | None
    ) -> None:
        """``req`` ended (its one terminal event is being sent); ``usage`` is set for results."""


class ObserverGroup(EngineObserver):
    """Fans each hook out to several observers, isolating their failures."""

    def __init__(self, observers: Sequence[EngineObserver] = ()) -> None:
        self.observers = list(observers)

    def _call(self, hook: str, *args: Any) -> None:
        for obs in self.observers:
            try:
                getattr(obs, hook)(*args)
            except Exception:
                logger.exception("observer %s.%s failed", type(obs).__name__, hook)

    def request_admitted(self, req: RequestState, now: float) -> None:
        self._call("request_admitted", req, now)

    def prompts_encoded(self, reqs: Sequence[RequestState], seconds: float) -> None:
        self._call("prompts_encoded", reqs, seconds)

    def images_encoded(self, reqs: Sequence[RequestState], seconds: float) -> None:
        self._call("images_encoded", reqs, seconds)

    def batch_stepped(self, batch: Sequence[RequestState], rows: int, seconds: float) -> None:
        self._call("batch_stepped", batch, rows, seconds)

    def preview_made(self, req: RequestState, now: float, seconds: float) -> None:
        self._call("preview_made", req, now, seconds)

    def images_decoded(self, reqs: Sequence[RequestState], seconds: float) -> None:
        self._call("images_decoded", reqs, seconds)

    def request_paused(self, req: RequestState, now: float) -> None:
        self._call("request_paused", req, now)

    def request_resumed(self, req: RequestState, now: float) -> None:
        self._call("request_resumed", req, now)

    def request_finished(
        self, req: RequestState, reason: FinishReason, now: float, usage: Usage | None
    ) -> None:
        self._call("request_finished", req, reason, now, usage)
