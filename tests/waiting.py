"""Polling on the real condition, for tests that wait for something to happen elsewhere (a
server thread, another process): never a fixed sleep, so the suite holds on fast and slow
machines alike."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from stepserve.server.engine.request import RequestState

if TYPE_CHECKING:
    from stepserve.server.engine.engine import Engine


def wait_for(predicate: Callable[[], object], timeout_s: float = 30.0, what: str = "condition") -> None:
    """Return once ``predicate()`` is true; fail the test after ``timeout_s``."""
    end = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < end, f"{what} not reached within {timeout_s} s"
        time.sleep(0.02)


def wait_until_idle(engine: Engine, timeout_s: float = 30.0) -> None:
    """Wait for every request to end (cancels land at the next step boundary), then check
    that nothing waits, runs or is left in flight, and that no request state is left alive."""
    wait_for(lambda: engine.in_flight() == 0, timeout_s, "no request in flight")
    assert engine.queue_depth() == 0 and engine.active_requests() == 0
    assert not engine.scheduler.has_unfinished()
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, RequestState)], "request state leaked"
