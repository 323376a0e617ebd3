"""The result cache's shared tier against a real ``redis-server`` (Debian package
redis-server) that the test starts on a free loopback port: two replicas share entries, and
when Redis goes away mid-run the servers keep generating and count the errors."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stepserve.client import ImageClient
from stepserve.server.api.result_cache import unframe
from stepserve.v1 import image_generation_pb2 as pb

from .server_process import free_port
from .server_thread import ServerThread
from .tools import require

PROMPT = "a small red circle on the left"


class RedisServer:
    """A throwaway redis-server: no persistence, loopback only."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            + ["--dir", str(workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        import redis

        client = redis.Redis.from_url(self.url, socket_timeout=1)
        end = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert self.proc.poll() is None, "redis-server exited"
                assert time.monotonic() < end, "redis-server did not answer within 20 s"
                time.sleep(0.05)
        self.client = client

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    binary = require("redis-server", "apt-get install redis-server")
    server = RedisServer(binary, tmp_path)
    yield server
    server.stop()


def _result(target: str, seed: int) -> pb.Result:
    with ImageClient(target) as c:
        events = list(c.generate_stream(PROMPT, steps=4, seed=seed))
    assert events[-1].WhichOneof("event") == "result"
    return events[-1].result


def _key_of(redis_server: RedisServer, exclude: frozenset[str] = frozenset()) -> str:
    """The one cache key in Redis (besides ``exclude``)."""
    keys = {
        k.decode().removeprefix("stepserve:result:") for k in redis_server.client.keys("stepserve:result:*")
    }
    (key,) = keys - exclude
    return key


def _errors(srv: ServerThread) -> float:
    value = srv.server.metrics.registry.get_sample_value(
        "stepserve_result_cache_errors_total", {"store": "redis", "kind": "unavailable"}
    )
    return value or 0.0


def test_replicas_share_entries_through_redis_and_survive_it_going_away(
    tiny_sd_dir: Path, redis_server: RedisServer
) -> None:
    settings = {"result_cache": True, "result_cache_redis": redis_server.url}
    a = ServerThread.tiny(tiny_sd_dir, **settings)  # type: ignore[arg-type]
    b = ServerThread.tiny(tiny_sd_dir, **settings)  # type: ignore[arg-type]
    try:
        made = _result(a.target, seed=5)
        assert not made.usage.cached
        (shared_key,) = {_key_of(redis_server)}
        # The other replica never saw it: its memory misses, Redis has it.
        shared = _result(b.target, seed=5)
        assert shared.usage.cached and shared.images[0].data == made.images[0].data
        hits = b.server.metrics.registry.get_sample_value(
            "stepserve_result_cache_hits_total", {"model": "tiny", "store": "redis"}
        )
        assert hits == 1
        # ... and now holds it in memory too.
        assert _result(b.target, seed=5).usage.cached
        assert (
            b.server.metrics.registry.get_sample_value(
                "stepserve_result_cache_hits_total", {"model": "tiny", "store": "memory"}
            )
            == 1
        )

        # A corrupt entry in Redis (a torn write, another writer) is never served: counted,
        # regenerated, and rewritten whole.
        made = _result(a.target, seed=9)
        key = f"stepserve:result:{_key_of(redis_server, exclude=frozenset({shared_key}))}"
        good = redis_server.client.get(key)
        redis_server.client.set(key, good[: len(good) // 2])
        again = _result(b.target, seed=9)
        assert not again.usage.cached and again.images[0].data == made.images[0].data
        corrupt = b.server.metrics.registry.get_sample_value(
            "stepserve_result_cache_errors_total", {"store": "redis", "kind": "corrupt"}
        )
        assert corrupt == 1
        assert unframe(redis_server.client.get(key)) is not None

        redis_server.stop()
        for seed in (6, 7, 8):  # new generations: a lookup and a store each, Redis gone
            result = _result(b.target, seed=seed)
            assert not result.usage.cached and len(result.images) == 1
        assert _errors(b) >= 1, "Redis going away was not counted"
        # Memory still serves what this replica made while Redis was down.
        assert _result(b.target, seed=6).usage.cached
    finally:
        a.stop()
        b.stop()
