"""The real command lines: ``stepserve serve`` in a subprocess, ``stepserve-client`` against it
(and the client library's image inputs, against the same server)."""

from __future__ import annotations

import asyncio
import io
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stepserve.client import AsyncImageClient, ImageClient, build_request
from stepserve.v1 import image_generation_pb2 as pb

from .server_process import client, start_server


@pytest.fixture(scope="module")
def served(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    proc, target = start_server(tiny_sd_dir, log, "--max-batch-size", "4")
    try:
        yield target
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        assert code == 0, log.read_text()
        assert "stopped" in log.read_text()


def test_generate_writes_images_and_previews(served: str, tmp_path: Path) -> None:
    out = tmp_path / "img.png"
    previews = tmp_path / "previews"
    r = client(
        served,
        "generate",
        "a small red circle on the left",
        "-o",
        str(out),
        "--seed",
        "3",
        "--steps",
        "6",
        "--previews",
        str(previews),
        "--preview-every",
        "2",
        "--num-images",
        "2",
    )
    assert r.returncode == 0, r.stderr
    paths = [tmp_path / "img-0.png", tmp_path / "img-1.png"]
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size == (32, 32)
    assert "seed 3" in r.stdout and "seed 4" in r.stdout
    assert sorted(p.name for p in previews.iterdir()) == ["step-002.jpg", "step-004.jpg", "step-006.jpg"]
    with Image.open(previews / "step-002.jpg") as im:
        assert im.format == "JPEG"
    assert "step 6/6" in r.stderr  # the progress display


def test_generate_jpeg_from_suffix_and_size(served: str, tmp_path: Path) -> None:
    out = tmp_path / "x.jpg"
    r = client(
        served,
        "generate",
        "a blue square",
        "-o",
        str(out),
        "--size",
        "48x32",
        "--steps",
        "2",
        "--sampler",
        "ddim",
    )
    assert r.returncode == 0, r.stderr
    with Image.open(out) as im:
        assert im.format == "JPEG" and im.size == (48, 32)


def test_models_lists_the_model(served: str) -> None:
    r = client(served, "models")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("tiny (default): stable-diffusion, 32x32")
    assert "dpm_solver_multistep" in r.stdout
    assert "tasks: text_to_image, image_to_image, inpainting" in r.stdout


def test_bad_input_exits_nonzero_with_the_field(served: str, tmp_path: Path) -> None:
    r = client(served, "generate", "a red circle", "-o", str(tmp_path / "a.png"), "--size", "33x32")
    assert r.returncode == 1
    assert "INVALID_ARGUMENT" in r.stderr and "width_px" in r.stderr
    assert not (tmp_path / "a.png").exists()


def _write_png(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels).save(path, format="PNG")
    return path


def _noise_rgb(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _left_half_mask(width: int, height: int) -> np.ndarray:
    """White (repaint) on the left half, black (keep) on the right."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, : width // 2] = 255
    return mask


def test_generate_image_to_image(served: str, tmp_path: Path) -> None:
    # Not the model's default 32x32, so the size can only come from the init image.
    init = _write_png(tmp_path / "init.png", _noise_rgb(48, 40))
    out = tmp_path / "out.png"
    r = client(
        served,
        "generate",
        "a blue circle on the left",
        "--init-image",
        str(init),
        "--strength",
        "0.5",
        "--steps",
        "4",
        "--seed",
        "1",
        "-o",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (48, 40)
    assert "step 2/2" in r.stderr  # int(4 * 0.5) steps run
    assert "2 steps" in r.stdout and "image encode" in r.stdout


def test_generate_inpainting_preserves_unmasked_pixels(served: str, tmp_path: Path) -> None:
    pixels = _noise_rgb(32, 32, seed=1)
    init = _write_png(tmp_path / "init.png", pixels)
    mask = _write_png(tmp_path / "mask.png", _left_half_mask(32, 32))
    out = tmp_path / "out.png"
    r = client(
        served,
        "generate",
        "a red square",
        "--init-image",
        str(init),
        "--mask",
        str(mask),
        "--preserve-unmasked",
        "--mask-feather",
        "0",
        "--steps",
        "3",
        "--seed",
        "2",
        "-o",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    with Image.open(out) as im:
        assert im.size == (32, 32)
        got = np.asarray(im.convert("RGB"))
    assert np.array_equal(got[:, 16:], pixels[:, 16:])  # kept: the init image's own pixels
    assert not np.array_equal(got[:, :16], pixels[:, :16])  # repainted


def test_generate_missing_init_image_is_a_usage_error(served: str, tmp_path: Path) -> None:
    out = tmp_path / "out.png"
    missing = tmp_path / "missing.png"
    r = client(served, "generate", "a red circle", "--init-image", str(missing), "-o", str(out))
    assert r.returncode == 2
    assert "--init-image" in r.stderr and "missing.png" in r.stderr and "No such file" in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()


def test_generate_mask_without_init_image_is_invalid_argument(served: str, tmp_path: Path) -> None:
    mask = _write_png(tmp_path / "mask.png", _left_half_mask(32, 32))
    out = tmp_path / "out.png"
    r = client(served, "generate", "a red circle", "--mask", str(mask), "--steps", "2", "-o", str(out))
    assert r.returncode == 1
    assert "INVALID_ARGUMENT" in r.stderr and "mask_image" in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()


def test_build_request_image_inputs(tmp_path: Path) -> None:
    png = io.BytesIO()
    Image.fromarray(_noise_rgb(8, 8)).save(png, format="PNG")
    data = png.getvalue()
    path = tmp_path / "in.png"
    path.write_bytes(data)

    plain = build_request("x")
    assert plain.init_image == b"" and plain.mask_image == b"" and not plain.preserve_unmasked
    assert not plain.HasField("strength") and not plain.HasField("mask_feather_px")

    for image in (data, bytearray(data), path, str(path)):
        req = build_request("x", init_image=image, mask_image=image, strength=0.25, mask_feather_px=0)
        assert req.init_image == data and req.mask_image == data
        assert req.strength == 0.25 and req.HasField("mask_feather_px") and req.mask_feather_px == 0
    assert build_request("x", preserve_unmasked=True).preserve_unmasked

    with pytest.raises(FileNotFoundError):
        build_request("x", init_image=tmp_path / "missing.png")


def test_clients_send_image_inputs(served: str, tmp_path: Path) -> None:
    pixels = _noise_rgb(32, 32, seed=3)
    init = _write_png(tmp_path / "init.png", pixels)
    mask_png = io.BytesIO()
    Image.fromarray(_left_half_mask(32, 32)).save(mask_png, format="PNG")

    with ImageClient(served, timeout_s=120) as c:
        res = c.generate("a circle", init_image=init, strength=0.5, steps=4, seed=1)
    assert res.usage.steps == 2 and res.usage.image_encode_seconds > 0
    assert res.usage.image_encode_seconds <= res.usage.accelerator_seconds

    async def inpaint() -> tuple[list[int], pb.GenerateResponse]:
        async with AsyncImageClient(served, timeout_s=120) as c:
            steps, last = [], None
            async for resp in c.generate_stream(
                "a square",
                init_image=str(init),
                mask_image=mask_png.getvalue(),
                preserve_unmasked=True,
                mask_feather_px=0,
                steps=2,
                seed=2,
            ):
                if resp.WhichOneof("event") == "progress":
                    steps.append(resp.progress.step)
                last = resp
            assert last is not None
            return steps, last

    steps, last = asyncio.run(inpaint())
    assert steps and last.WhichOneof("event") == "result"
    with Image.open(io.BytesIO(last.result.images[0].data)) as im:
        got = np.asarray(im.convert("RGB"))
    assert np.array_equal(got[:, 16:], pixels[:, 16:])
