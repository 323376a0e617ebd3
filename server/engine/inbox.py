"""What the API's threads and the engine thread share: the inbox of messages, the sinks of
the requests in flight, and the admission counts. Everything here is behind one lock.

The API threads put :class:`Submit` and :class:`Cancel` messages in and wait for a drain;
the engine thread takes the messages out between steps and publishes the scheduler's
:class:`~.scheduler.Load` (a snapshot) whenever it changes who waits or runs, so admission
checks and metrics read counts without touching the scheduler, which belongs to the engine
thread alone.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from .request import RequestState, RequestStatus
from .types import EngineEvent, GenerationParams

if TYPE_CHECKING:
    from .scheduler import Load

EventSink = Callable[[EngineEvent], None]
"""Where a request's events go; called on the engine thread, so it must not block."""


class EngineError(Exception):
    """Base class of the reasons the engine refuses a request."""


class QueueFullError(EngineError):
    """The waiting queue is at ``max_queue``; the caller should retry later."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineStoppedError(EngineError):
    """The engine is draining, stopped, or has failed."""


class RequestInFlightError(ValueError):
    """A request with this id is already in flight."""


@dataclass(frozen=True)
class Submit:
    """A new request for the scheduler. Its :class:`RequestState` is made on the engine
    thread (a refused submission leaves nothing behind)."""

    params: GenerationParams
    arrival_time: float
    # The caller's OpenTelemetry span context, or None.
    trace_context: Any = None

    def to_request(self) -> RequestState:
        return RequestState(self.params, arrival_time=self.arrival_time, trace_context=self.trace_context)


@dataclass(frozen=True)
class Cancel:
    """End a request at the next step boundary with ``status`` (cancelled, deadline)."""

    request_id: str
    status: RequestStatus


Message = Submit | Cancel


class Inbox:
    """The engine's door: messages in, the sink of every request in flight, closing state."""

    def __init__(self, max_queue: int, load: Load, max_queued_input_bytes: int | None = None) -> None:
        self.max_queue = max_queue
        self.max_queued_input_bytes = max_queued_input_bytes
        self._cv = threading.Condition()
        self._messages: deque[Message] = deque()
        self._sinks: dict[str, EventSink] = {}
        self._load = load
        self._draining = False
        self._stopping = False
        self.failure: BaseException | None = None

    # -- API threads ----------------------------------------------------------------------
    def submit(self, submission: Submit, sink: EventSink) -> None:
        """Take a request in, or raise :class:`EngineError` (or ValueError for a duplicate id).

        The queue bound counts requests submitted but not yet running, minus the batch slots
        (images) that are free: requests that will fill them at the next step boundary are
        not waiting. A refusal says when to retry: when the model's next slot frees."""
        with self._cv:
            if self.failure is not None:
                raise EngineStoppedError(f"the engine has failed: {self.failure}")
            if self._draining:
                raise EngineStoppedError("the server is shutting down")
            rid = submission.params.request_id
            if rid in self._sinks:
                raise RequestInFlightError(f"request id {rid!r} is already in flight")
            load = self.load()
            depth = sum(load.waiting.values()) - sum(load.free_images.values())
            if depth >= self.max_queue:
                raise QueueFullError(
                    f"the queue is full ({depth} requests waiting, limit {self.max_queue})",
                    retry_after_s=load.next_slot_s[submission.params.model],
                )
            self._check_input_bytes(load, submission.params.model, submission.params.input_bytes)
            self._sinks[rid] = sink
            self._messages.append(submission)
            self._cv.notify_all()

    def check_input_room(self, model: str, nbytes: int) -> None:
        """Raise :class:`QueueFullError` if image inputs of ``nbytes`` would not fit in the
        queue's input budget now (checked again at submission; the API asks first, before
        it spends time decoding them)."""
        with self._cv:
            self._check_input_bytes(self.load(), model, nbytes)

    def _check_input_bytes(self, load: Load, model: str, nbytes: int) -> None:
        limit = self.max_queued_input_bytes
        if nbytes and limit is not None and load.waiting_input_bytes + nbytes > limit:
            raise QueueFullError(
                f"waiting requests' image inputs hold {load.waiting_input_bytes / 2**20:.1f} MiB; this "
                f"one's {nbytes / 2**20:.1f} MiB would pass the limit of {limit / 2**20:.1f} MiB "
                "(--max-queued-input-bytes)",
                retry_after_s=load.next_slot_s[model],
            )

    def cancel(self, request_id: str, status: RequestStatus) -> None:
        """Ask for a request to end at the next step boundary (no-op if it already ended)."""
        with self._cv:
            if request_id in self._sinks:
                self._messages.append(Cancel(request_id, status))
                self._cv.notify_all()

    def wait_until_empty(self, timeout_s: float) -> bool:
        """Refuse new requests from now on and wait up to ``timeout_s`` for every request in
        flight to end (or the engine to fail). Returns True if none is left."""
        end = time.monotonic() + timeout_s
        with self._cv:
            self._draining = True
            while self._sinks and self.failure is None:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.1))
            return True

    def close(self) -> None:
        """Refuse new requests and tell the engine thread to stop at its next step boundary."""
        with self._cv:
            self._draining = True
            self._stopping = True
            self._cv.notify_all()

    # -- counts (any thread) -----------------------------------------------------------------
    def load(self) -> Load:
        """The scheduler's counts as the engine thread last published them, with the
        submissions still in the inbox counted as waiting: one consistent snapshot."""
        with self._cv:
            waiting = dict(self._load.waiting)
            input_bytes = self._load.waiting_input_bytes
            for m in self._messages:
                if isinstance(m, Submit):
                    waiting[m.params.model] = waiting.get(m.params.model, 0) + 1
                    input_bytes += m.params.input_bytes
            return replace(self._load, waiting=MappingProxyType(waiting), waiting_input_bytes=input_bytes)

    def in_flight(self) -> int:
        """Accepted requests that have not yet had their terminal event."""
        with self._cv:
            return len(self._sinks)

    # -- the engine thread -----------------------------------------------------------------
    def take(
        self,
        wait: bool,
        wake_at: float | None,
        clock: Callable[[], float],
        deliver: Callable[[list[Message]], Load],
    ) -> bool:
        """Hand every message to ``deliver`` (which moves them into the scheduler and returns
        its new load), atomically with publishing that load, so a request is always counted
        in one place. With ``wait``, first sleep until a message arrives or the clock reaches
        ``wake_at``. Returns False, delivering nothing, once the engine should stop."""
        with self._cv:
            while wait and not self._stopping and not self._messages:
                timeout = None if wake_at is None else wake_at - clock()
                if timeout is not None and timeout <= 0:
                    break
                self._cv.wait(timeout)
            if self._stopping:
                return False
            messages = list(self._messages)
            self._messages.clear()
            if messages:
                self._load = deliver(messages)
            return True

    def take_submissions(self) -> list[Submit]:
        """Remove and return the submissions still in the inbox (the engine is ending them)."""
        with self._cv:
            out = [m for m in self._messages if isinstance(m, Submit)]
            self._messages.clear()
            return out

    def publish(self, load: Load) -> None:
        """Record the scheduler's counts after the engine changed who waits or runs."""
        with self._cv:
            self._load = load

    def sink(self, request_id: str) -> EventSink | None:
        with self._cv:
            return self._sinks.get(request_id)

    def forget(self, request_id: str, load: Load) -> None:
        """The request had its terminal event: drop its sink, publish ``load`` (which no
        longer counts it), and wake a drain waiting for the last one."""
        with self._cv:
            self._sinks.pop(request_id, None)
            self._load = load
            self._cv.notify_all()

    def fail(self, exc: BaseException) -> None:
        """The engine thread died: refuse everything from now on, release drain waiters."""
        with self._cv:
            self.failure = exc
            self._cv.notify_all()
