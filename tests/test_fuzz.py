"""Property tests against a live in-process server: arbitrary GenerateRequests and raw garbage
bytes always get a proper status (never UNKNOWN or INTERNAL), read at the end of each stream
(an error after the stream started counts too), nothing leaks, and the server serves a normal
request afterwards. In CI the examples are derandomized (tests/conftest.py)."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from stepserve.client import ImageClient
from stepserve.v1 import image_generation_pb2 as pb
from stepserve.v1 import image_generation_pb2_grpc as pb_grpc

from .waiting import wait_until_idle

GENERATE = "/stepserve.v1.ImageGenerationService/Generate"
# What a caller's request may legitimately get back. OK means the stream started.
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def _image(fmt: str, size: tuple[int, int], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(len(fmt) + size[0])
    arr = rng.integers(0, 256, (size[1], size[0], 3 if mode == "RGB" else 1), dtype=np.uint8)
    Image.fromarray(arr.squeeze()).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


# Image inputs: valid ones of every format and a few sizes (some outside the model's range,
# or not matching each other), and the same cut short or with a byte changed.
IMAGES = [
    _image(fmt, size, mode)
    for fmt in ("PNG", "JPEG", "WEBP")
    for size, mode in (((32, 32), "RGB"), ((16, 40), "L"), ((8, 8), "RGB"), ((72, 64), "RGB"))
]
image_bytes = st.one_of(
    st.just(b""),
    st.sampled_from(IMAGES),
    st.binary(max_size=120),
    st.tuples(st.sampled_from(IMAGES), st.floats(0, 1)).map(lambda t: t[0][: int(len(t[0]) * t[1])]),
    st.tuples(st.sampled_from(IMAGES), st.integers(0, 10_000), st.integers(0, 255)).map(
        lambda t: t[0][: t[1] % len(t[0])] + bytes([t[2]]) + t[0][t[1] % len(t[0]) + 1 :]
    ),
)

u32 = st.one_of(st.integers(0, 64), st.sampled_from([8, 16, 24, 32, 40, 64, 1000, 2**31, 2**32 - 1]))
enum_value = st.integers(0, 12)  # known values and unknown ones (proto3 enums are open)
text = st.text(max_size=200)

requests = st.builds(
    pb.GenerateRequest,
    model=st.one_of(st.sampled_from(["", "tiny", "TINY", "../tiny", "/etc/passwd"]), text),
    prompt=st.one_of(st.sampled_from(["a red circle", ""]), text, st.text(min_size=300, max_size=3000)),
    negative_prompt=st.one_of(st.just(""), text),
    width_px=u32,
    height_px=u32,
    steps=u32,
    guidance_scale=st.one_of(st.none(), st.floats(width=32), st.floats(0, 20, width=32)),
    seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    sampler=enum_value,
    num_images=u32,
    preview_every_n_steps=u32,
    preview_max_size_px=u32,
    output_format=enum_value,
    request_id=st.one_of(st.just(""), text, st.from_regex(r"[a-z0-9-]{1,20}", fullmatch=True)),
    output_quality=u32,
    priority=enum_value,
    init_image=image_bytes,
    mask_image=image_bytes,
    strength=st.one_of(st.none(), st.floats(width=32), st.floats(0, 1, width=32)),
    preserve_unmasked=st.booleans(),
    mask_feather_px=st.one_of(st.none(), u32),
)


def final_status(call: grpc.Call) -> grpc.StatusCode:
    """The status a Generate call ends with, its stream read to the end."""
    try:
        for _ in call:
            pass
        return call.code()
    except grpc.RpcError as e:
        return e.code()


def assert_idle_and_serving(server) -> None:
    wait_until_idle(server.engine)
    with ImageClient(server.target) as c:
        assert len(c.generate("a red circle", steps=2).images) == 1


FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def fuzz_server(tiny_sd_dir):

    from .server_thread import ServerThread

    # Few steps at most, so that every accepted request can be run to its end.
    srv = ServerThread.tiny(
        tiny_sd_dir, max_queue=8, model_options=["tiny.max_steps=4", "tiny.default_steps=2"]
    )
    yield srv
    srv.stop()


def statuses(server, strategy: st.SearchStrategy[pb.GenerateRequest], examples: int) -> set[grpc.StatusCode]:
    """The final statuses of ``examples`` requests drawn from ``strategy``; each must be one
    a caller may legitimately get."""
    seen: set[grpc.StatusCode] = set()
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.ImageGenerationServiceStub(ch)

        @settings(FUZZ, max_examples=examples)
        @given(req=strategy)
        def check(req: pb.GenerateRequest) -> None:
            code = final_status(stub.Generate(req, timeout=60))
            seen.add(code)
            assert code in ALLOWED, (code, req)

        check()
    return seen


def test_arbitrary_requests_get_proper_statuses(fuzz_server) -> None:
    seen = statuses(fuzz_server, requests, 120)
    # The strategy reached both sides: accepted requests and refused ones.
    assert {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT} <= seen
    assert_idle_and_serving(fuzz_server)


# Requests whose other fields are valid, so that the image inputs decide the outcome.
image_requests = st.builds(
    pb.GenerateRequest,
    prompt=st.just("a red circle"),
    steps=st.integers(1, 4),
    width_px=st.sampled_from([0, 0, 32, 40]),
    height_px=st.sampled_from([0, 0, 32, 24]),
    init_image=image_bytes,
    mask_image=image_bytes,
    strength=st.one_of(st.none(), st.floats(width=32), st.floats(0, 1, width=32)),
    preserve_unmasked=st.booleans(),
    mask_feather_px=st.one_of(st.none(), st.integers(0, 80)),
)


def test_image_inputs_get_proper_statuses(fuzz_server) -> None:
    assert {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT} <= statuses(fuzz_server, image_requests, 80)
    assert_idle_and_serving(fuzz_server)


def test_garbage_bytes_get_invalid_argument_not_unknown(fuzz_server) -> None:
    with grpc.insecure_channel(fuzz_server.target) as ch:
        raw = ch.unary_stream(GENERATE)  # no serializers: bytes go on the wire as they are

        @FUZZ
        @given(data=st.binary(max_size=300))
        def check(data: bytes) -> None:
            code = final_status(raw(data, timeout=60))
            assert code in ALLOWED, (code, data)

        check()
        for data in (b"\xff\xff\xff", b"\x12\x02\xc3\x28", b"\x0a\x05ab"):
            with pytest.raises(grpc.RpcError) as e:
                list(raw(data, timeout=10))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid stepserve.v1.GenerateRequest" in e.value.details()
    assert_idle_and_serving(fuzz_server)
