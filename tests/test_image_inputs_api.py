"""Image inputs through the gRPC API: sizes, strength, what ListModels says, every bad input
answered INVALID_ARGUMENT naming its field (checked before decoding where it can be), the
request size limit, and the queue's budget for image inputs."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image

from stepserve.server.engine.types import Sampler
from stepserve.v1 import image_generation_pb2 as pb
from stepserve.v1 import image_generation_pb2_grpc as pb_grpc

from .engine_helpers import params
from .reference import reference_images
from .server_thread import ServerThread
from .test_image_inputs import init_image, right_half_mask


def encode(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels but whose data is a few bytes
    (a decompression bomb's shape): only a header check catches it cheaply."""
    data = encode(np.zeros((1, 1, 3), np.uint8))
    ihdr = struct.pack(">II", width, height) + data[24:29]
    return data[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + data[33:]


@pytest.fixture(scope="module")
def srv(tiny_sd_dir: Path, tiny_sd_inpaint_dir: Path):
    s = ServerThread.tiny(
        tiny_sd_dir,
        max_batch_size=8,
        models=[f"tiny={tiny_sd_dir}", f"inpaint={tiny_sd_inpaint_dir}"],
        max_image_pixels=200 * 200,
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def stub(srv):
    with grpc.insecure_channel(srv.target) as ch:
        yield pb_grpc.ImageGenerationServiceStub(ch)


def run(stub, **fields) -> list[pb.GenerateResponse]:
    return list(
        stub.Generate(pb.GenerateRequest(prompt=fields.pop("prompt", "a red circle"), **fields), timeout=60)
    )


def violations(stub, **fields) -> dict[str, str]:
    """The BadRequest field violations of an INVALID_ARGUMENT answer, by field."""
    with pytest.raises(grpc.RpcError) as e:
        run(stub, **fields)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    br = error_details_pb2.BadRequest()
    assert rpc_status.from_call(e.value).details[0].Unpack(br)
    return {v.field: v.description for v in br.field_violations}


def decoded(response: pb.GenerateResponse) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(response.result.images[0].data)).convert("RGB"))


def test_list_models_tells_each_models_tasks(stub) -> None:
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    all_three = [pb.TASK_TEXT_TO_IMAGE, pb.TASK_IMAGE_TO_IMAGE, pb.TASK_INPAINTING]
    assert list(models["tiny"].tasks) == all_three
    assert list(models["inpaint"].tasks) == [pb.TASK_INPAINTING]


def test_img2img_takes_the_init_images_size_and_counts_the_steps_it_runs(stub) -> None:
    img = init_image(48)[:40, :44]  # 44 x 40: rounded down to 40 x 40
    events = run(stub, init_image=encode(img), strength=0.5, steps=10, seed=1)
    progress = [e.progress for e in events if e.WhichOneof("event") == "progress"]
    assert [(p.step, p.total_steps) for p in progress] == [(k, 5) for k in range(1, 6)]
    result = events[-1].result
    assert (result.images[0].width_px, result.images[0].height_px) == (40, 40)
    assert (
        result.usage.steps == 5 and 0 < result.usage.image_encode_seconds < result.usage.accelerator_seconds
    )
    text = run(stub, steps=2)[-1].result
    assert text.usage.image_encode_seconds == 0


def test_a_set_size_resizes_the_init_image_as_diffusers_does(stub, tiny_sd_dir: Path) -> None:
    """A 64 x 48 JPEG, asked for at 32 x 32: resized (Lanczos) before encoding, as diffusers'
    pipeline resizes the same image given height and width."""
    big = np.asarray(Image.fromarray(init_image(64)).resize((64, 48)))
    data = encode(big, "JPEG")
    ours = decoded(
        run(
            stub,
            init_image=data,
            width_px=32,
            height_px=32,
            strength=0.75,
            steps=4,
            seed=5,
            sampler=pb.SAMPLER_DDIM,
        )[-1]
    )
    as_sent = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    resized = np.asarray(Image.fromarray(as_sent).resize((32, 32), Image.Resampling.LANCZOS))
    p = params(
        "r",
        prompt="a red circle",
        width=32,
        height=32,
        steps=4,
        seed=5,
        sampler=Sampler.DDIM,
        init_image=resized,
        strength=0.75,
        first_step=1,
    )
    ref = reference_images(tiny_sd_dir, p)[0]
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 2


def test_inpainting_through_the_api_keeps_the_original_outside_the_mask(stub) -> None:
    img = init_image(32)
    events = run(
        stub,
        init_image=encode(img),
        mask_image=encode(np.stack([right_half_mask()] * 3, -1)),  # an RGB mask works too
        steps=4,
        strength=1.0,
        seed=2,
        preserve_unmasked=True,
        mask_feather_px=0,
        preview_every_n_steps=2,
    )
    assert sum(e.progress.HasField("preview") for e in events if e.WhichOneof("event") == "progress") == 2
    np.testing.assert_array_equal(decoded(events[-1])[:, :16], img[:, :16])


def test_bad_image_inputs_name_their_field(stub) -> None:
    png = encode(init_image(32))
    mask = encode(right_half_mask())
    noisy_mask = encode(np.random.default_rng(1).integers(0, 2, (32, 32), dtype=np.uint8) * 255)
    gif = io.BytesIO()
    Image.fromarray(init_image(32)).save(gif, format="GIF")
    cases: list[tuple[dict, str, str]] = [
        ({"init_image": b"not an image"}, "init_image", "not a PNG, JPEG or WebP"),
        ({"init_image": gif.getvalue()}, "init_image", "not a PNG, JPEG or WebP"),
        ({"init_image": png[: len(png) // 2]}, "init_image", "could not be decoded"),
        (
            {"init_image": png, "mask_image": noisy_mask[: len(noisy_mask) // 2]},
            "mask_image",
            "could not be decoded",
        ),
        ({"init_image": png_claiming(50_000, 50_000)}, "init_image", "limit is 40000"),
        ({"init_image": encode(init_image(201))}, "init_image", "201x201 = 40401 pixels"),
        (
            {"init_image": png, "mask_image": encode(right_half_mask(24))},
            "mask_image",
            "must be init_image's size",
        ),
        ({"init_image": encode(init_image(8))}, "init_image", "outside model 'tiny''s range"),
        ({"init_image": png, "strength": 0.0}, "strength", "outside (0, 1]"),
        ({"init_image": png, "strength": 1.5}, "strength", "outside (0, 1]"),
        ({"init_image": png, "strength": float("nan")}, "strength", "outside (0, 1]"),
        ({"init_image": png, "strength": 0.2, "steps": 4}, "strength", "runs no step"),
        ({"mask_image": mask}, "mask_image", "needs an init_image"),
        ({"strength": 0.5}, "strength", "only with an init_image"),
        ({"init_image": png, "preserve_unmasked": True}, "preserve_unmasked", "only to inpainting"),
        ({"init_image": png, "mask_image": mask, "mask_feather_px": 65}, "mask_feather_px", "more than 64"),
        ({"model": "inpaint"}, "init_image", "serves inpainting only"),
        ({"model": "inpaint", "init_image": png}, "mask_image", "serves inpainting only"),
    ]
    for fields, field, words in cases:
        got = violations(stub, steps=fields.pop("steps", 4), **fields)
        assert field in got and words in got[field], (fields.keys(), got)


def test_requests_up_to_the_size_limit_are_taken_and_larger_ones_refused(tiny_sd_dir: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8)
    big = encode(noise)  # ~1.5 MB: over the old 1 MiB limit, under 2 MiB
    assert 1 << 20 < len(big) < 2 << 20
    s = ServerThread.tiny(tiny_sd_dir, max_request_bytes=2 << 20, max_image_pixels=1 << 20)
    try:
        with grpc.insecure_channel(s.target) as ch:
            stub = pb_grpc.ImageGenerationServiceStub(ch)
            assert run(stub, init_image=big, width_px=32, height_px=32, steps=2)[-1].HasField("result")
            with pytest.raises(grpc.RpcError) as e:
                run(stub, init_image=big + big, width_px=32, height_px=32, steps=2)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        s.stop()


def test_queued_image_inputs_hold_bounded_memory(tiny_sd_dir: Path, tmp_path: Path) -> None:
    """A real server, its one batch slot busy: 80 requests with a 4.3 MB init image each come
    in (344 MB), none with a deadline. Their bytes are held while they wait (gRPC keeps each
    call's message), so the queue's input budget (20 MB here) takes a few and refuses the
    rest RESOURCE_EXHAUSTED, naming the flag; a text request still queues; the server's
    resident memory grows by the budget and transient buffers, far less than what was sent.
    (glibc is told to return large freed buffers to the system at once, so resident memory
    follows live memory.)"""
    from .server_process import start_server

    budget, n = 20_000_000, 80
    proc, target = start_server(
        tiny_sd_dir,
        tmp_path / "server.log",
        "--max-batch-size=1",
        f"--max-queued-input-bytes={budget}",
        f"--max-image-pixels={2000 * 2000}",
        env={"STEPSERVE_FAULTS": "step_delay_s=0.2", "MALLOC_MMAP_THRESHOLD_": "131072"},
    )

    def rss() -> int:
        with open(f"/proc/{proc.pid}/statm") as f:
            return int(f.read().split()[1]) * 4096

    noise = np.random.default_rng(0).integers(0, 255, (1200, 1200, 3), dtype=np.uint8)
    big = encode(noise)
    assert len(big) > 4_000_000
    queued, refused = [], []
    try:
        with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
            stub = pb_grpc.ImageGenerationServiceStub(ch)
            busy = stub.Generate(pb.GenerateRequest(prompt="a red circle", steps=100))
            assert next(busy).WhichOneof("event") in ("queued", "progress")
            before = rss()
            calls = []  # every call kept open: a dropped one would be cancelled
            for i in range(n):
                call = stub.Generate(
                    pb.GenerateRequest(
                        prompt="a red circle", init_image=big, width_px=32, height_px=32, seed=i
                    )
                )
                calls.append(call)
                try:
                    queued.append(next(call).WhichOneof("event"))  # waits behind the busy slot
                except grpc.RpcError as e:
                    refused.append(e)
            grown = rss() - before
            text = stub.Generate(pb.GenerateRequest(prompt="a blue square", steps=2))
            assert next(text).WhichOneof("event") == "queued"
            for call in [*calls, busy, text]:
                call.cancel()
    finally:
        proc.terminate()
        proc.wait(30)
    assert queued == ["queued"] * (budget // (2 * len(big) + 32 * 32 * 3))  # see input_bytes
    assert len(refused) == n - len(queued)
    assert {e.code() for e in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert "--max-queued-input-bytes" in refused[0].details()
    assert grown < 200 << 20, f"resident memory grew by {grown / 2**20:.0f} MiB"
