"""Events out of the engine: each goes to its request's sink after everything the engine
queued before it (through the completion queue), and a request's terminal event is sent
from one place, :meth:`Outbox.end`, so observers count each ending exactly once."""

from __future__ import annotations

import logging
from collections.abc import Callable

from .completions import CompletionQueue
from .inbox import Inbox
from .observer import EngineObserver
from .request import RequestState
from .scheduler import Load
from .types import EngineEvent, FailedEvent, FinishReason, Usage

logger = logging.getLogger(__name__)


class Outbox:
    """Sends a request's events in order and ends it once."""

    def __init__(
        self,
        inbox: Inbox,
        completions: CompletionQueue,
        observer: EngineObserver,
        clock: Callable[[], float],
        load: Callable[[], Load],
    ) -> None:
        self._inbox = inbox
        self._completions = completions
        self._observer = observer
        self._clock = clock
        # The scheduler's counts now: published as each request ends.
        self._load = load

    def send(self, req: RequestState, event: EngineEvent) -> None:
        """Send ``event`` now (from a completion, which keeps the order)."""
        sink = self._inbox.sink(req.request_id)
        if sink is None:
            return
        try:
            sink(event)
        except Exception:  # a broken sink must not stop the batch
            logger.exception("event sink for request %s failed", req.request_id, extra=req.log_extra)

    def send_later(self, req: RequestState, event: EngineEvent) -> None:
        """Send ``event`` after everything queued before it."""
        self._completions.defer(None, lambda: self.send(req, event))

    def end(self, req: RequestState, event: EngineEvent, usage: Usage | None = None) -> None:
        """Send the request's one terminal event and forget the request. The scheduler has
        already let it go, so the load published here no longer counts it."""
        if not req.params.internal:
            reason = event.reason if isinstance(event, FailedEvent) else FinishReason.OK
            self._observer.request_finished(req, reason, self._clock(), usage)
        self.send(req, event)
        self._inbox.forget(req.request_id, self._load())

    def end_later(self, req: RequestState, event: FailedEvent) -> None:
        """End the request with ``event`` after everything queued before it."""
        self._completions.defer(None, lambda: self.end(req, event), finals=(req,))

    def lost(self, message: str) -> Callable[[RequestState], None]:
        """For a request whose queued result could not be read after the engine failed: end
        it with ``message`` unless it already ended."""

        def end_with_error(req: RequestState) -> None:
            if self._inbox.sink(req.request_id) is not None:
                self.end(req, FailedEvent(FinishReason.ERROR, message))

        return end_with_error
