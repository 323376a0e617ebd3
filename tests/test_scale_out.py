"""Scaling out: three real server processes behind one client (client-side round_robin and the
default retry policy). All three serve; stopping one mid-run (SIGTERM, drain) loses no accepted
request, and the calls it refuses while draining are retried on the others."""

from __future__ import annotations

import re
import signal
import threading
import time
from pathlib import Path

from stepserve.client import ImageClient

from .server_process import start_server


def accepted(log: Path) -> int:
    return len(re.findall(r"request \S+ accepted from", log.read_text()))


def refused_unavailable(log: Path) -> int:
    return len(re.findall(r"request refused from \S+: UNAVAILABLE", log.read_text()))


def run_load(
    client: ImageClient, n: int, steps: int, tag: str, results: dict, started: threading.Event | None = None
) -> list[threading.Thread]:
    def one(i: int) -> None:
        try:
            for ev in client.generate_stream(f"shape {i}", steps=steps, seed=i, request_id=f"{tag}-{i}"):
                if started is not None and ev.WhichOneof("event") == "progress":
                    started.set()
                if ev.WhichOneof("event") == "result":
                    results[f"{tag}-{i}"] = ev.result
        except Exception as e:  # recorded, and the test fails on it
            results[f"{tag}-{i}"] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads


def test_three_replicas_share_the_load_and_one_drains_without_losing_requests(
    tiny_sd_dir: Path, tmp_path: Path
) -> None:
    logs = [tmp_path / f"server-{i}.log" for i in range(3)]
    servers: list = [None] * 3

    def start(i: int) -> None:
        servers[i] = start_server(tiny_sd_dir, logs[i], "--threads", "1", "--drain-timeout-s", "60")

    starters = [threading.Thread(target=start, args=(i,)) for i in range(3)]
    for t in starters:
        t.start()
    for t in starters:
        t.join(180)
    assert all(servers), "a server did not start"
    procs = [p for p, _ in servers]
    try:
        with ImageClient([target for _, target in servers]) as client:
            results: dict = {}
            for t in run_load(client, 12, 4, "warm", results):
                t.join(120)
            assert all(not isinstance(r, Exception) for r in results.values()), results
            assert len(results) == 12
            assert all(accepted(log) > 0 for log in logs), [accepted(log) for log in logs]

            # Long requests in flight everywhere, then replica 1 is told to stop.
            results.clear()
            started = threading.Event()
            before = run_load(client, 9, 40, "before", results, started)
            assert started.wait(60)
            time.sleep(0.5)
            procs[1].send_signal(signal.SIGTERM)
            time.sleep(0.3)
            after = run_load(client, 12, 4, "after", results)
            for t in before + after:
                t.join(300)
            errors = {k: v for k, v in results.items() if isinstance(v, Exception)}
            assert not errors, errors
            assert len(results) == 21  # every request, including those replica 1 had accepted
            assert procs[1].wait(120) == 0, logs[1].read_text()
            # Replica 1 refused new calls while it drained; the client retried them elsewhere.
            assert refused_unavailable(logs[1]) > 0, logs[1].read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(60)
