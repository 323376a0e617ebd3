"""Request coalescing: identical requests in flight at the same time run one generation.

A :class:`Flight` owns one engine request (its *leader's* parameters: request id, deadline,
priority, preview cadence) and fans its events out to every call subscribed to it, each
through its own queue, so each call streams its own Queued / Progress events and gets the
Result. The flight encodes the final images once, stores them in the result cache, and only
then hands them out (a request arriving meanwhile joins the flight instead of missing).

Leaving: the generation is cancelled only when its LAST subscriber leaves, so a cancelled
leader does not cancel the others. Failures (an engine error, shutdown, the images' encoding)
reach every subscriber.

Joining (``Flight.covers``): a call joins a flight only when the flight gives it everything
its own generation would: a priority no more urgent, and previews at its cadence (none asked
for, or a multiple of the flight's; a follower gets the flight's previews that fall on its own
cadence). Otherwise it runs its own generation with the same key (both store the same entry).
The engine request keeps its leader's deadline; a follower whose own deadline is later is not
refused for that: if the flight ends at the leader's deadline, the follower carries on in a
generation of its own (the servicer starts it again).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from stepserve.v1 import image_generation_pb2 as pb

from ..engine.request import RequestStatus
from ..engine.types import (
    EngineEvent,
    FailedEvent,
    GenerationParams,
    Priority,
    ProgressEvent,
    QueuedEvent,
    ResultEvent,
)

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Subscriber:
    """One call following a flight."""

    params: GenerationParams
    leader: bool
    queue: asyncio.Queue[FlightItem] = field(default_factory=asyncio.Queue)


@dataclass(frozen=True)
class FlightDone:
    """The generation's Result, encoded once (the usage is the generation's own), and the
    subscriber it is charged to: the earliest still following when it finished."""

    result: pb.Result
    payer: Subscriber


@dataclass(frozen=True)
class FlightBroken:
    """The API's own work for the flight (encoding the images) failed; ``stage`` names it."""

    stage: str
    error: BaseException


FlightItem = QueuedEvent | ProgressEvent | FailedEvent | FlightDone | FlightBroken


@dataclass(eq=False)
class Flight:
    """One engine request and the calls that receive its result."""

    # None: the request's key could not be made; its result is not stored.
    key: str | None
    params: GenerationParams
    subscribers: list[Subscriber] = field(default_factory=list)
    # The latest Queued and Progress events, replayed (without a preview) to a call joining late.
    last_queued: QueuedEvent | None = None
    last_progress: ProgressEvent | None = None
    finished: bool = False
    # Engine events as the sink delivers them (on the event loop).
    events: asyncio.Queue[EngineEvent] = field(default_factory=asyncio.Queue)

    def covers(self, params: GenerationParams) -> bool:
        """Whether a call with ``params`` (same key) gets all it asked for by joining."""
        mine = self.params
        if mine.priority is Priority.BATCH and params.priority is not Priority.BATCH:
            return False
        every = params.preview_every
        return every == 0 or (mine.preview_every > 0 and every % mine.preview_every == 0)

    def join(self, params: GenerationParams) -> Subscriber:
        """A follower; it is first told where the generation stands."""
        sub = Subscriber(params, leader=False)
        if self.last_progress is not None:
            p = self.last_progress
            sub.queue.put_nowait(ProgressEvent(p.step, p.total_steps, p.elapsed_s, None, p.paused))
        elif self.last_queued is not None:
            sub.queue.put_nowait(self.last_queued)
        self.subscribers.append(sub)
        return sub

    def publish(self, item: FlightItem) -> None:
        for sub in self.subscribers:
            sub.queue.put_nowait(item)


class Flights:
    """The flights in progress, by cache key, and the task that drives each."""

    def __init__(
        self,
        encode: Callable[[GenerationParams, ResultEvent], Awaitable[pb.Result]],
        store: Callable[[str, bytes], Awaitable[None]],
        cancel: Callable[[str, RequestStatus], None],
    ) -> None:
        self._encode = encode
        self._store = store
        self._cancel = cancel
        self._open: dict[str, Flight] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def find(self, key: str, params: GenerationParams) -> Flight | None:
        """The open flight a call with ``params`` can join, if any."""
        flight = self._open.get(key)
        return flight if flight is not None and flight.covers(params) else None

    def start(self, key: str | None, params: GenerationParams, joinable: bool) -> tuple[Flight, Subscriber]:
        """A new flight led by ``params`` (the caller submits it to the engine with
        ``flight.events`` as the sink's queue, then calls :meth:`run`); ``joinable``: others
        may join it (not when a flight for the key is already open: that one stays the one
        joined)."""
        flight = Flight(key, params)
        sub = Subscriber(params, leader=True)
        flight.subscribers.append(sub)
        if joinable and key is not None and key not in self._open:
            self._open[key] = flight
        return flight, sub

    def run(self, flight: Flight) -> None:
        task = asyncio.ensure_future(self._drive(flight))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def abandon(self, flight: Flight) -> None:
        """The flight's engine request was never accepted."""
        self._close(flight)

    def leave(self, flight: Flight, sub: Subscriber, status: RequestStatus) -> None:
        """``sub``'s call ended (``status``: why, for the engine); the generation is cancelled
        when it was the last one and the generation has not finished."""
        if sub in flight.subscribers:
            flight.subscribers.remove(sub)
        if not flight.subscribers and not flight.finished:
            self._close(flight)
            self._cancel(flight.params.request_id, status)

    def _close(self, flight: Flight) -> None:
        if flight.key is not None and self._open.get(flight.key) is flight:
            del self._open[flight.key]

    async def _drive(self, flight: Flight) -> None:
        """Fan the engine's events out until the terminal one; on a result, encode and store
        it before anyone receives it."""
        while True:
            event = await flight.events.get()
            if isinstance(event, QueuedEvent):
                flight.last_queued = event
                flight.publish(event)
            elif isinstance(event, ProgressEvent):
                flight.last_progress = event
                flight.publish(event)
            elif isinstance(event, FailedEvent):
                flight.finished = True
                self._close(flight)
                flight.publish(event)
                return
            elif isinstance(event, ResultEvent):
                try:
                    result = await self._encode(flight.params, event)
                except Exception as e:
                    flight.finished = True
                    self._close(flight)
                    flight.publish(FlightBroken("encoding the result images", e))
                    return
                if flight.key is not None:
                    # Stored without its usage (a hit has its own): an entry is then the same
                    # bytes whichever replica or generation wrote it.
                    entry = pb.Result()
                    entry.CopyFrom(result)
                    entry.ClearField("usage")
                    try:
                        await self._store(flight.key, entry.SerializeToString(deterministic=True))
                    except Exception:  # the cache's own failures are handled inside it
                        logger.exception("request %s: storing the result failed", flight.params.request_id)
                flight.finished = True
                self._close(flight)
                if flight.subscribers:
                    flight.publish(FlightDone(result, flight.subscribers[0]))
                return

    def open_count(self) -> int:
        return len(self._open)

    async def wait_idle(self, timeout_s: float = 5.0) -> None:
        """Until every flight task has finished (shutdown: the engine has ended every request,
        so each has its terminal event), at most ``timeout_s``."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)
