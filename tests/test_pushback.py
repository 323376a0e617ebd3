"""The server steers gRPC's own retries with the standard grpc-retry-pushback-ms trailer, and
the default client honours it: a refusal that retrying cannot fix reaches the caller at once,
with the server's status and RetryInfo, instead of a DEADLINE_EXCEEDED after futile retries;
a full queue is retried after the server's delay; retries are counted apart in the metrics.

Every forward is slowed by an injected delay, so the server's step-time estimate (and with it
the retry delays) does not depend on the hardware."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest

from stepserve.client import ImageClient, StepserveError

from .metrics_helpers import Samples, scrape
from .server_process import free_port
from .server_thread import ServerThread


@pytest.fixture
def slow_server(tiny_sd_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """One image per forward, nobody waits beyond it (max queue 0), 50 ms per step at least."""
    monkeypatch.setenv("STEPSERVE_FAULTS", "step_delay_s=0.05")
    srv = ServerThread.tiny(tiny_sd_dir, max_batch_size=1, max_queue=0, metrics_port=free_port())
    yield srv
    srv.stop()


def counts(srv: ServerThread, code: str) -> tuple[float, float]:
    """(calls, of which retries) that ended with ``code``."""
    s = Samples(scrape(srv.server.metrics_port))
    return (
        s.get("stepserve_requests_total", model="tiny", code=code),
        s.get("stepserve_request_retries_total", model="tiny", code=code),
    )


def test_an_unmeetable_deadline_is_refused_at_once_and_not_retried(slow_server) -> None:
    with ImageClient(slow_server.target) as c, pytest.raises(StepserveError) as e:  # retries on
        c.generate("a red circle", steps=100, timeout_s=1.0)
    # The server's own answer (not DEADLINE_EXCEEDED after retries ran out the deadline),
    # from the one attempt the server saw.
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "cannot be met" in e.value.message
    assert e.value.retry_after_s is not None and e.value.retry_after_s > 1.0
    assert counts(slow_server, "rejected") == (1, 0)  # one attempt, no retries


def fill_the_batch(srv: ServerThread, steps: int) -> tuple[threading.Thread, dict]:
    """A call that holds the only batch slot for ``steps`` steps; returns once it runs."""
    out: dict = {}
    running = threading.Event()

    def run() -> None:
        with ImageClient(srv.target, service_config={}) as c:
            for ev in c.generate_stream("a red circle", steps=steps, seed=1):
                if ev.WhichOneof("event") == "progress":
                    running.set()
                elif ev.WhichOneof("event") == "result":
                    out["result"] = ev.result

    t = threading.Thread(target=run)
    t.start()
    assert running.wait(60)
    return t, out


def test_a_full_queue_with_too_little_time_left_answers_at_once(slow_server) -> None:
    t, out = fill_the_batch(slow_server, steps=40)  # its slot frees in 2 s at best
    with ImageClient(slow_server.target) as c, pytest.raises(StepserveError) as e:
        c.generate("a blue square", steps=2, timeout_s=1.0)
    t.join(60)
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in e.value.message
    assert e.value.retry_after_s is not None and e.value.retry_after_s >= 1.0
    assert counts(slow_server, "rejected") == (1, 0)  # answered at once: not retried
    assert "result" in out


def test_a_full_queue_is_retried_after_the_servers_delay_and_counted_as_a_retry(slow_server) -> None:
    t, out = fill_the_batch(slow_server, steps=10)
    with ImageClient(slow_server.target) as c:  # no deadline: the retry policy's 4 attempts
        result = c.generate("a blue square", steps=2, seed=2)
    t.join(60)
    assert len(result.images) == 1 and "result" in out
    rejected, rejected_retries = counts(slow_server, "rejected")
    ok, ok_retries = counts(slow_server, "ok")
    assert rejected >= 1 and ok == 2
    assert ok_retries == 1  # the attempt that succeeded was a retry of a refused one
    assert rejected_retries == rejected - 1  # only the first refusal was a first attempt
