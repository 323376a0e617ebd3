"""Scaling out: three real server processes behind one client (client-side round_robin and the
default retry policy). All three serve; stopping one mid-run (SIGTERM, drain) loses no accepted
request, and the calls it refuses while draining are retried on the others."""

from __future__ import annotations

import itertools
import re
import signal
import subprocess
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


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every server still running, and wait for each to exit."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait(60)


def warm_until_every_replica_serves(client: ImageClient, logs: list[Path], results: dict, steps: int) -> None:
    """Rounds of one call per replica until every replica has accepted some. (The client's
    round_robin spreads calls over the connections that are up, and a replica's connection
    may come up a little after the others.)"""
    rounds = itertools.count()

    def all_serve() -> bool:
        for t in run_load(client, len(logs), steps, f"warm{next(rounds)}", results):
            t.join(120)
        return all(accepted(log) > 0 for log in logs)

    wait_for(all_serve, timeout_s=120, what="every replica serving")


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
            warm_until_every_replica_serves(client, logs, results, steps=4)
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
        stop_all(procs)


def test_requests_queued_on_a_replica_that_shuts_down_finish_on_another(
    tiny_sd_dir: Path, tmp_path: Path
) -> None:
    """Two replicas, one image per forward each, every step slowed to 50 ms. Replica 0 is
    stopped with a drain timeout too short for its queue: the requests it had only queued
    (Queued events, no work) end UNAVAILABLE there, and the client library sends each again,
    once, to replica 1, where it finishes. The one it was running is cut (work was lost:
    not resent)."""
    logs = [tmp_path / f"server-{i}.log" for i in range(2)]
    slow = {"STEPSERVE_FAULTS": "step_delay_s=0.05"}
    servers = [
        start_server(tiny_sd_dir, log, "--max-batch-size", "1", "--drain-timeout-s", "0.3", env=slow)
        for log in logs
    ]
    procs = [p for p, _ in servers]
    try:
        with ImageClient([target for _, target in servers]) as client:
            results: dict = {}
            warm_until_every_replica_serves(client, logs, results, steps=1)
            warm = [accepted(log) for log in logs]
            results.clear()
            progress: dict[str, int] = {}

            def one(i: int) -> None:
                rid = f"q-{i}"
                progress[rid] = 0
                try:
                    for ev in client.generate_stream(f"shape {i}", steps=20, seed=i, request_id=rid):
                        if ev.WhichOneof("event") == "progress":
                            progress[rid] += 1
                        elif ev.WhichOneof("event") == "result":
                            results[rid] = ev.result
                except Exception as e:  # recorded, and checked below
                    results[rid] = e

            threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
            for t in threads:
                t.start()
            # Every call is in: one running and two queued on each replica.
            wait_for(lambda: sum(accepted(log) for log in logs) == sum(warm) + 6)
            on_0 = accepted(logs[0]) - warm[0]
            procs[0].send_signal(signal.SIGTERM)
            for t in threads:
                t.join(120)
            assert procs[0].wait(60) == 0, logs[0].read_text()[-3000:]
        failed = {rid: r for rid, r in results.items() if isinstance(r, Exception)}
        # Only the request replica 0 had started was lost; it had made progress.
        assert len(failed) == 1, failed
        ((rid, err),) = failed.items()
        assert err.code == grpc.StatusCode.UNAVAILABLE and progress[rid] > 0
        assert len(results) == 6
        # Replica 0's queued requests were sent again and served by replica 1.
        resent = len(re.findall(r"accepted from \S+ \(a retry\)", logs[1].read_text()))
        assert resent == on_0 - 1 >= 1
    finally:
        stop_all(procs)
