"""The real command lines: ``stepserve serve`` in a subprocess, ``stepserve-client`` against it."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

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


def test_bad_input_exits_nonzero_with_the_field(served: str, tmp_path: Path) -> None:
    r = client(served, "generate", "a red circle", "-o", str(tmp_path / "a.png"), "--size", "33x32")
    assert r.returncode == 1
    assert "INVALID_ARGUMENT" in r.stderr and "width_px" in r.stderr
    assert not (tmp_path / "a.png").exists()
