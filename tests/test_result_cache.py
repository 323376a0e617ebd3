"""The exact result cache and request coalescing (server/api/result_cache.py, flights.py):
the key, the stores, and real servers on the tiny random model answering real gRPC calls."""

from __future__ import annotations

import threading
from dataclasses import fields, replace
from pathlib import Path

import grpc
import pytest

from stepserve.client import ImageClient, build_request
from stepserve.server.api.cache_key import (
    EXCLUDED_FIELDS,
    KEY_FIELDS,
    InputDigests,
    ModelFingerprint,
    result_key,
)
from stepserve.server.api.result_cache import DiskStore, MemoryStore, frame, unframe
from stepserve.server.config import ConfigError, ServerConfig
from stepserve.server.engine.types import GenerationParams, ImageFormat, Priority, Sampler
from stepserve.v1 import image_generation_pb2 as pb
from stepserve.v1 import image_generation_pb2_grpc as pb_grpc

from .server_thread import ServerThread

PROMPT = "a small red circle on the left"
# Steps of the requests that overlap in flight: at the cached server's 0.1 s per step, room
# for the others to join on a busy machine.
STEPS = 12
FP = ModelFingerprint(files="f" * 64, runtime="float32|cpu", loras={"a": "1" * 64, "b": "2" * 64}, options={})


def _params(**kw: object) -> GenerationParams:
    base = GenerationParams(
        request_id="r",
        model="tiny",
        prompt=PROMPT,
        negative_prompt="",
        width=32,
        height=32,
        steps=4,
        guidance_scale=5.0,
        seed=7,
        sampler=Sampler.EULER,
        cfg=True,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


# -- the key ----------------------------------------------------------------------------------
def test_every_generation_param_is_keyed_or_deliberately_left_out() -> None:
    """A GenerationParams field added later must be put in the key or in the exclusion list
    (with a reason): this fails until it is."""
    names = {f.name for f in fields(GenerationParams)}
    assert not KEY_FIELDS & EXCLUDED_FIELDS
    assert names - KEY_FIELDS - EXCLUDED_FIELDS == set(), "add the new field to the cache key or exclude it"
    assert (KEY_FIELDS | EXCLUDED_FIELDS) - names == set(), "the key names a field GenerationParams lost"


# Another value for each keyed field (the image inputs are keyed by their digests, below).
CHANGED = {
    "model": "other",
    "prompt": "a blue square",
    "negative_prompt": "blurry",
    "width": 40,
    "height": 40,
    "steps": 5,
    "guidance_scale": 5.5,
    "seed": 8,
    "sampler": Sampler.DDIM,
    "cfg": False,
    "num_images": 2,
    "output_format": ImageFormat.WEBP,
    "karras": True,
    "strength": 0.5,
    "first_step": 1,
    "preserve_unmasked": True,
    "mask_feather": 3,
    "loras": (("a", 1.0),),
    "cache_interval": 3,
}
LEFT_OUT = {
    "request_id": "other",
    "priority": Priority.BATCH,
    "deadline": 123.0,
    "preview_every": 2,
    "preview_max_size": 64,
    "internal": True,
    "encoded_input_bytes": 99,
}


def test_each_keyed_field_changes_the_key_and_no_other_does() -> None:
    base = result_key(_params(), FP, InputDigests())
    assert base == result_key(_params(), FP, InputDigests()), "the key is not deterministic"
    for name, value in CHANGED.items():
        assert result_key(_params(**{name: value}), FP, InputDigests()) != base, name
    for name, value in LEFT_OUT.items():
        assert result_key(_params(**{name: value}), FP, InputDigests()) == base, name
    assert set(CHANGED) | {"init_image", "mask", "output_quality"} == set(KEY_FIELDS)
    assert set(LEFT_OUT) == set(EXCLUDED_FIELDS)
    # Image inputs by digest; output quality only where the format uses it.
    assert result_key(_params(), FP, InputDigests("ab", "")) != base
    assert result_key(_params(), FP, InputDigests("ab", "cd")) != result_key(
        _params(), FP, InputDigests("ab", "")
    )
    assert result_key(_params(output_quality=50), FP, InputDigests()) == base  # PNG ignores it
    jpeg = _params(output_format=ImageFormat.JPEG)
    assert result_key(replace(jpeg, output_quality=50), FP, InputDigests()) != result_key(
        jpeg, FP, InputDigests()
    )
    # The model's files, runtime and options, and an adapter's file, change it too.
    for other in (
        replace(FP, files="0" * 64),
        replace(FP, runtime="float16|cuda"),
        replace(FP, options={"quantization": "int8"}),
    ):
        assert result_key(_params(), other, InputDigests()) != base
    with_a = _params(loras=(("a", 1.0),))
    assert result_key(with_a, replace(FP, loras={"a": "9" * 64}), InputDigests()) != result_key(
        with_a, FP, InputDigests()
    )
    assert result_key(_params(loras=(("a", 0.5),)), FP, InputDigests()) != result_key(
        with_a, FP, InputDigests()
    )


# -- the stores ---------------------------------------------------------------------------------
class _Counts:
    def __init__(self) -> None:
        self.evicted = 0
        self.bytes = 0
        self.errors: list[tuple[str, str]] = []

    def cache_error(self, store: str, kind: str) -> None:
        self.errors.append((store, kind))

    def cache_evicted(self, store: str, n: int) -> None:
        self.evicted += n

    def cache_bytes(self, store: str, n: int) -> None:
        self.bytes = n


def test_memory_store_is_an_lru_bounded_in_bytes() -> None:
    import asyncio

    counts = _Counts()
    store = MemoryStore(250, counts)

    async def run() -> None:
        await store.put("a", b"x" * 100)
        await store.put("b", b"y" * 100)
        assert await store.get("a") == b"x" * 100  # a is now the most recently used
        await store.put("c", b"z" * 100)  # 300 > 250: b goes, not a
        assert await store.get("b") is None
        assert await store.get("a") is not None and await store.get("c") is not None
        await store.put("huge", b"h" * 251)  # larger than the whole bound: not kept, nothing evicted
        assert await store.get("huge") is None

    asyncio.run(run())
    assert counts.evicted == 1 and counts.bytes == 200 == store.bytes and len(store) == 2


def test_a_partial_or_corrupt_entry_never_unframes(tmp_path: Path) -> None:
    import asyncio

    blob = frame(b"payload")
    assert unframe(blob) == b"payload"
    assert unframe(blob[:-1]) is None  # partial
    assert unframe(blob[:-1] + b"X") is None  # flipped
    assert unframe(b"") is None and unframe(b"payload") is None
    store = DiskStore(tmp_path)

    async def run() -> None:
        await store.put("ab12", blob)
        assert await store.get("ab12") == blob
        assert await store.get("cd34") is None
        assert not list(tmp_path.rglob("*.tmp")), "the temporary file was left behind"

    asyncio.run(run())


def test_the_disk_store_drops_its_least_recently_used_entries_beyond_its_bound(tmp_path: Path) -> None:
    import asyncio
    import os

    counts = _Counts()
    store = DiskStore(tmp_path, max_bytes=1000, metrics=counts)

    async def run() -> None:
        for i, key in enumerate(("aa01", "bb02", "cc03")):
            await store.put(key, bytes(400))
            os.utime(store.path(key), (1000 + i, 1000 + i))  # written in this order
        # 1200 > 1000 at the third write: the oldest went (down to at most 900 bytes).
        assert await store.get("aa01") is None
        assert await store.get("bb02") is not None  # a hit: now the most recently used
        await store.put("dd04", bytes(400))  # 1200 again: cc03 is now the oldest
        assert await store.get("cc03") is None
        assert await store.get("bb02") is not None and await store.get("dd04") is not None

    asyncio.run(run())
    assert counts.evicted == 2
    assert sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()) == 800


def test_bad_cache_settings_are_startup_errors_naming_the_flag(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    for kw, flag in (
        ({"result_cache_redis": "http://localhost:6379"}, "--result-cache-redis"),
        ({"result_cache_redis": "redis://localhost:port/0"}, "--result-cache-redis"),
        ({"result_cache_dir": str(a_file)}, "--result-cache-dir"),
        ({"result_cache_bytes": -1}, "--result-cache-bytes"),
        ({"result_cache_ttl_s": -1}, "--result-cache-ttl-s"),
        ({"result_cache_dir_bytes": -1}, "--result-cache-dir-bytes"),
    ):
        with pytest.raises(ConfigError, match=flag):
            ServerConfig(**kw).validate()  # type: ignore[arg-type]
    ServerConfig(result_cache_redis="redis://127.0.0.1:6379/0").validate()


# -- real servers -----------------------------------------------------------------------------------
def _result(target: str, **kw: object) -> pb.Result:
    kw.setdefault("steps", 4)
    with ImageClient(target) as c:
        events = list(c.generate_stream(PROMPT, **kw))
    assert events[-1].WhichOneof("event") == "result"
    return events[-1].result


def _sample(srv: ServerThread, name: str, **labels: str) -> float:
    value = srv.server.metrics.registry.get_sample_value(name, {"model": "tiny", **labels})
    return value or 0.0


def _admitted(srv: ServerThread) -> float:
    return _sample(srv, "stepserve_admitted_requests_total", task="text_to_image")


@pytest.fixture(scope="module")
def fresh(tiny_sd_dir: Path):
    """A server without the cache: what a fresh generation returns."""
    srv = ServerThread.tiny(tiny_sd_dir, max_batch_size=8)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def cached(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A server with the memory and disk tiers, each step slowed down so that concurrent
    requests overlap."""
    mp = pytest.MonkeyPatch()
    mp.setenv("STEPSERVE_FAULTS", "step_delay_s=0.1")
    try:
        srv = ServerThread.tiny(
            tiny_sd_dir,
            result_cache=True,
            max_batch_size=8,
            result_cache_dir=str(tmp_path_factory.mktemp("result-cache")),
            # A leader's short deadline runs (and then passes) instead of being refused.
            reject_unmeetable_deadlines=False,
        )
    finally:
        mp.undo()
    yield srv
    srv.stop()


def test_a_hit_is_the_fresh_generation_bytes_marked_cached_and_charged_nothing(
    fresh: ServerThread, cached: ServerThread
) -> None:
    want = _result(fresh.target, seed=11, output_format="webp", output_quality=80)
    admitted = _admitted(cached)
    first = _result(cached.target, seed=11, output_format="webp", output_quality=80)
    again = _result(cached.target, seed=11, output_format="webp", output_quality=80)
    assert [i.data for i in first.images] == [i.data for i in want.images]
    assert [i.data for i in again.images] == [i.data for i in want.images]
    assert [i.seed for i in again.images] == [11]
    assert not first.usage.cached and first.usage.accelerator_seconds > 0 and first.usage.steps == 4
    u = again.usage
    assert u.cached and not u.coalesced
    assert (u.accelerator_seconds, u.cost_usd, u.steps, u.queue_ms) == (0, 0, 0, 0)
    assert _admitted(cached) == admitted + 1, "the hit reached the engine"
    assert _sample(cached, "stepserve_result_cache_hits_total", store="memory") >= 1
    assert _sample(cached, "stepserve_result_cache_misses_total") >= 1
    assert (
        cached.server.metrics.registry.get_sample_value("stepserve_result_cache_bytes", {"store": "memory"})
        > 0
    )


def test_a_request_without_a_seed_never_hits_but_its_seed_does(
    cached: ServerThread, fresh: ServerThread
) -> None:
    one = _result(cached.target)
    two = _result(cached.target)
    assert not one.usage.cached and not two.usage.cached
    assert one.images[0].seed != two.images[0].seed
    # Stored under the seed it got: asking for that seed is the same generation.
    again = _result(cached.target, seed=one.images[0].seed)
    assert again.usage.cached and again.images[0].data == one.images[0].data
    assert _result(fresh.target, seed=one.images[0].seed).images[0].data == one.images[0].data


def _stream(stub: pb_grpc.ImageGenerationServiceStub, rid: str, seed: int, **kw: object):
    return stub.Generate(build_request(PROMPT, steps=STEPS, seed=seed, request_id=rid, **kw), timeout=120)


def test_identical_requests_in_flight_run_one_generation_and_all_get_it(
    cached: ServerThread, fresh: ServerThread
) -> None:
    want = _result(fresh.target, seed=21, steps=STEPS).images[0].data
    admitted = _admitted(cached)
    coalesced = _sample(cached, "stepserve_result_cache_coalesced_total")
    with grpc.insecure_channel(cached.target) as ch:
        stub = pb_grpc.ImageGenerationServiceStub(ch)
        leader = _stream(stub, "leader", 21, preview_every=1)
        first = next(leader)  # queued or progress: it is in flight
        assert first.WhichOneof("event") in ("queued", "progress")
        followers = [_stream(stub, f"follower-{i}", 21, preview_every=2) for i in range(3)]
        results: dict[str, list[pb.GenerateResponse]] = {}

        def drain(name: str, call) -> None:
            results[name] = list(call)

        threads = [threading.Thread(target=drain, args=(f"follower-{i}", c)) for i, c in enumerate(followers)]
        for t in threads:
            t.start()
        results["leader"] = [first, *leader]
        for t in threads:
            t.join(60)
    assert _admitted(cached) == admitted + 1, "more than one generation ran"
    assert _sample(cached, "stepserve_result_cache_coalesced_total") == coalesced + 3
    for name, events in results.items():
        assert all(e.request_id == name for e in events)
        result = events[-1].result
        assert result.images[0].data == want, name
        assert not result.usage.cached
        assert result.usage.coalesced is (name != "leader")
        charged = result.usage.accelerator_seconds > 0
        assert charged is (name == "leader"), "the generation must be charged once, to its leader"
    # Each follower streams its own progress, with the generation's previews at its own cadence.
    for name in ("follower-0", "follower-1", "follower-2"):
        progress = [e.progress for e in results[name] if e.WhichOneof("event") == "progress"]
        assert progress[-1].step == STEPS and [p.step for p in progress] == sorted(p.step for p in progress)
        previews = [p.step for p in progress if p.HasField("preview")]
        assert previews and all(step % 2 == 0 for step in previews), (name, previews)
    leader_previews = [
        e.progress.step
        for e in results["leader"]
        if e.HasField("progress") and e.progress.HasField("preview")
    ]
    assert leader_previews == list(range(1, STEPS + 1))


def test_a_cancelled_leader_does_not_cancel_the_others(cached: ServerThread, fresh: ServerThread) -> None:
    want = _result(fresh.target, seed=31, steps=STEPS).images[0].data
    admitted = _admitted(cached)
    with grpc.insecure_channel(cached.target) as ch:
        stub = pb_grpc.ImageGenerationServiceStub(ch)
        leader = _stream(stub, "leader-c", 31)
        next(leader)
        followers = [_stream(stub, f"follower-c{i}", 31) for i in range(2)]
        firsts = [next(f) for f in followers]  # both have joined
        assert all(e.WhichOneof("event") in ("queued", "progress") for e in firsts)
        leader.cancel()
        with pytest.raises(grpc.RpcError) as err:
            list(leader)
        assert err.value.code() == grpc.StatusCode.CANCELLED
        done = [list(f)[-1].result for f in followers]
    assert [r.images[0].data for r in done] == [want, want]
    assert all(r.usage.coalesced for r in done)
    # Charged once, to the earliest call still waiting when it finished.
    assert [r.usage.accelerator_seconds > 0 for r in done] == [True, False]
    assert _admitted(cached) == admitted + 1


def test_the_last_call_leaving_cancels_the_generation(cached: ServerThread) -> None:
    with grpc.insecure_channel(cached.target) as ch:
        stub = pb_grpc.ImageGenerationServiceStub(ch)
        a = _stream(stub, "alone-a", 41)
        next(a)
        b = _stream(stub, "alone-b", 41)
        next(b)
        a.cancel()
        b.cancel()
    engine = cached.engine
    from .waiting import wait_until_idle

    wait_until_idle(engine)
    assert cached.server.servicer.flights.open_count() == 0
    # Nothing was stored: the next identical request generates.
    assert not _result(cached.target, seed=41, steps=STEPS).usage.cached


def test_the_disk_tier_survives_a_restart_and_a_corrupt_entry_is_rewritten(
    tiny_sd_dir: Path, tmp_path: Path, fresh: ServerThread
) -> None:
    want = _result(fresh.target, seed=51).images[0].data
    settings = {"result_cache": True, "result_cache_bytes": 0, "result_cache_dir": str(tmp_path)}
    first = ServerThread.tiny(tiny_sd_dir, **settings)  # type: ignore[arg-type]
    try:
        assert not _result(first.target, seed=51).usage.cached
    finally:
        first.stop()
    (entry,) = [p for p in tmp_path.rglob("*") if p.is_file()]
    second = ServerThread.tiny(tiny_sd_dir, **settings)  # type: ignore[arg-type]
    try:
        hit = _result(second.target, seed=51)
        assert hit.usage.cached and hit.images[0].data == want
        assert _sample(second, "stepserve_result_cache_hits_total", store="disk") == 1
        good = entry.read_bytes()
        entry.write_bytes(good[: len(good) // 2])  # a partial write, as a crash would leave
        redone = _result(second.target, seed=51)
        assert not redone.usage.cached and redone.images[0].data == want
        errors = second.server.metrics.registry.get_sample_value(
            "stepserve_result_cache_errors_total", {"store": "disk", "kind": "corrupt"}
        )
        assert errors == 1
        assert entry.read_bytes() == good, "the corrupt entry was not rewritten"
        assert _result(second.target, seed=51).usage.cached
    finally:
        second.stop()


def test_a_follower_outlives_its_leaders_deadline(cached: ServerThread, fresh: ServerThread) -> None:
    """The flight's engine request has the leader's deadline; a follower with a later one is
    not cut short by it: it carries on in a generation of its own."""
    want = _result(fresh.target, seed=61, steps=STEPS).images[0].data
    admitted = _admitted(cached)
    with grpc.insecure_channel(cached.target) as ch:
        stub = pb_grpc.ImageGenerationServiceStub(ch)
        leader = stub.Generate(build_request(PROMPT, steps=STEPS, seed=61, request_id="short"), timeout=0.5)
        next(leader)
        follower = _stream(stub, "long", 61)
        assert next(follower).WhichOneof("event") in ("queued", "progress")
        with pytest.raises(grpc.RpcError) as err:
            list(leader)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        events = list(follower)
    result = events[-1].result
    assert result.images[0].data == want and result.usage.accelerator_seconds > 0
    assert _admitted(cached) == admitted + 2  # the leader's generation, then the follower's own


def test_a_call_whose_previews_the_flight_lacks_runs_its_own(cached: ServerThread) -> None:
    """Joining must give a call what it asked for: a flight without previews does not carry a
    call that wants them; that call generates, with its previews. (A flight with previews
    every step carries calls that want every other one: the coalescing test above.)"""
    admitted = _admitted(cached)
    with grpc.insecure_channel(cached.target) as ch:
        stub = pb_grpc.ImageGenerationServiceStub(ch)
        plain = _stream(stub, "no-previews", 71)
        next(plain)
        wants = _stream(stub, "wants-previews", 71, preview_every=3)
        events = list(wants)
        list(plain)
    result = events[-1].result
    assert not result.usage.coalesced and not result.usage.cached
    previews = [e.progress.step for e in events if e.HasField("progress") and e.progress.HasField("preview")]
    assert previews == list(range(3, STEPS + 1, 3))
    assert _admitted(cached) == admitted + 2
