"""Scaling out: three real server processes behind one client (client-side round_robin and the
default retry policy). All three serve; stopping one mid-run (SIGTERM, drain) loses no accepted
request, and the calls it refuses while draining are retried on the others."""

from __future__ import annotations

import itertools
import re
import signal
import threading
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stepserve.client import ImageClient

from .server_process import start_server
from .waiting import wait_for


def accepted(log: Path) -> int:
    return len(re.findall(r"request \S+ accepted from", log.read_text()))


def refused_unavailable(log: Path) -> int:
    return len(re.findall(r"request refused from \S+: UNAVAILABLE", log.read_text()))


def not_ready(target: str) -> bool:
    """Whether the server's readiness (the overall health service) says NOT_SERVING."""
    with grpc.insecure_channel(target) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    return bool(status == health_pb2.HealthCheckResponse.NOT_SERVING)


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
        # The injected step delay keeps the long requests in flight for seconds on any hardware.
        servers[i] = start_server(
            tiny_sd_dir,
            logs[i],
            "--threads",
            "1",
            "--drain-timeout-s",
            "60",
            env={"STEPSERVE_FAULTS": "step_delay_s=0.02"},
        )

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
            rounds = itertools.count()

            def all_serve() -> bool:
                """A round of three calls; true once every replica has accepted some. (The
                client's round_robin spreads calls over the connections that are up, and a
                replica's connection may come up a little after the others.)"""
                for t in run_load(client, 3, 4, f"warm{next(rounds)}", results):
                    t.join(120)
                return all(accepted(log) > 0 for log in logs)

            wait_for(all_serve, timeout_s=120, what="every replica serving")
            assert all(not isinstance(r, Exception) for r in results.values()), results
            warm = sum(accepted(log) for log in logs)
            assert warm == len(results)

            # Long requests in flight everywhere, then replica 1 is told to stop.
            results.clear()
            started = threading.Event()
            before = run_load(client, 9, 40, "before", results, started)
            assert started.wait(60)
            wait_for(lambda: sum(accepted(log) for log in logs) == warm + 9)  # all 9 are in flight
            procs[1].send_signal(signal.SIGTERM)
            wait_for(lambda: not_ready(servers[1][1]))  # replica 1 is draining
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
