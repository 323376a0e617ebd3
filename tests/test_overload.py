"""Overload and cancellation on a live server: a burst of 10x the batch capacity, and many
cancellations at random points while other requests run."""

from __future__ import annotations

import io
import random
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from stepserve.client import ImageClient, StepserveError

from .server_thread import ServerThread
from .waiting import wait_until_idle


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def assert_idle_without_leaks(srv: ServerThread) -> None:
    wait_until_idle(srv.engine)


@pytest.fixture
def small_server(tiny_sd_dir: Path):
    srv = ServerThread.tiny(tiny_sd_dir, max_batch_size=2, max_queue=4)
    yield srv
    srv.stop()


def burst(target: str, n: int, steps: int) -> list[dict]:
    """n concurrent streams, released together; each records its events and outcome."""
    outcomes: list[dict] = [{} for _ in range(n)]
    gate = threading.Barrier(n)

    def one(i: int) -> None:
        out = outcomes[i]
        out["events"] = 0
        with ImageClient(target, service_config={}) as c:  # no client retries: see every rejection
            gate.wait()
            try:
                for ev in c.generate_stream(f"shape {i}", steps=steps, seed=i):
                    out["events"] += 1
                    if ev.WhichOneof("event") == "result":
                        out["result"] = ev.result
            except StepserveError as e:
                out["error"] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return outcomes


def test_burst_of_ten_times_capacity(small_server) -> None:
    capacity = 2 + 4  # batch + queue
    n = 10 * 2
    burst(small_server.target, n, steps=30)  # warm the allocator and caches
    assert_idle_without_leaks(small_server)
    baseline = rss_bytes()

    outcomes = burst(small_server.target, n, steps=30)
    accepted = [o for o in outcomes if "error" not in o]
    rejected = [o for o in outcomes if "error" in o]
    assert len(accepted) + len(rejected) == n
    assert len(accepted) >= capacity and rejected
    # Every accepted request completed; nothing accepted was lost.
    assert all("result" in o and len(o["result"].images) == 1 for o in accepted)
    for o in rejected:
        err = o["error"]
        assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.retry_after_s is not None and err.retry_after_s > 0
        assert o["events"] == 0  # refused at the door, not after waiting in line
    assert_idle_without_leaks(small_server)
    assert rss_bytes() - baseline < 64 << 20, "memory did not return to its baseline"


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def test_random_cancellations_do_not_disturb_the_others(server) -> None:
    rng = random.Random(1234)
    specs = [
        {"seed": i, "steps": rng.choice([4, 6, 9]), "guidance_scale": rng.choice([1.0, 7.5])}
        for i in range(12)
    ]
    cancel_at = {i: rng.randint(1, specs[i]["steps"] - 1) for i in rng.sample(range(12), 6)}
    survivors = [i for i in range(12) if i not in cancel_at]
    with ImageClient(server.target) as c:
        alone = {i: decode(c.generate(f"shape {i}", **specs[i]).images[0].data) for i in survivors}

    results: dict[int, np.ndarray] = {}
    cancelled_after: dict[int, int] = {}
    gate = threading.Barrier(12)

    def run(i: int) -> None:
        with ImageClient(server.target) as c:
            gate.wait()
            stream = c.generate_stream(f"shape {i}", **specs[i])
            for ev in stream:
                kind = ev.WhichOneof("event")
                if kind == "progress" and i in cancel_at and ev.progress.step >= cancel_at[i]:
                    stream.close()  # cancels the RPC mid-generation
                    cancelled_after[i] = ev.progress.step
                    return
                if kind == "result":
                    results[i] = decode(ev.result.images[0].data)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert set(cancelled_after) == set(cancel_at)
    assert set(results) == set(survivors)
    for i in survivors:  # bit-identical to running alone: batchmates leaving changed nothing
        np.testing.assert_array_equal(results[i], alone[i])
    assert_idle_without_leaks(server)


def test_unmeetable_deadline_is_refused_at_once_with_retry_info(server) -> None:
    with ImageClient(server.target, service_config={}) as c:
        with pytest.raises(StepserveError) as e:
            c.generate("a red circle", steps=150, timeout_s=0.3)
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value
        assert "cannot be met" in e.value.message and e.value.retry_after_s > 0.3
        # A deadline that leaves room is served.
        assert len(c.generate("a red circle", steps=2, timeout_s=60).images) == 1


def test_interactive_requests_overtake_waiting_batch_requests(small_server) -> None:
    """Over the API: a batch request waiting for the only slot is overtaken by an interactive
    one that arrives after it, and the queue positions each caller sees say so. (Two images
    each: only one of them fits the batch at a time.)"""
    positions: dict[str, list[int]] = {"batch": [], "interactive": []}
    order: list[str] = []
    queued = {k: threading.Event() for k in positions}

    def run(kind: str) -> None:
        with ImageClient(small_server.target) as c:
            for ev in c.generate_stream("p", steps=3, num_images=2, priority=kind, request_id=kind):
                if ev.WhichOneof("event") == "queued":
                    positions[kind].append(ev.queued.position)
                    queued[kind].set()
                if ev.WhichOneof("event") == "progress" and kind not in order:
                    order.append(kind)

    with ImageClient(small_server.target) as c:
        blocker = c.generate_stream("blocker", steps=150, num_images=2)  # fills the batch (cap 2)
        for ev in blocker:
            if ev.WhichOneof("event") == "progress":
                break
        tb = threading.Thread(target=run, args=("batch",))
        tb.start()
        assert queued["batch"].wait(30)
        ti = threading.Thread(target=run, args=("interactive",))
        ti.start()
        assert queued["interactive"].wait(30)
        blocker.close()
        tb.join(60)
        ti.join(60)
    assert positions["interactive"][0] == 0  # went straight to the front
    assert positions["batch"][:2] == [0, 1]  # moved back when the interactive one arrived
    assert order == ["interactive", "batch"]
