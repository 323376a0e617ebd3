from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Property tests draw fresh examples on a developer's machine; in CI (CI set) the examples
# are derived from each test itself, so a failure there reproduces on the next run.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

from stepserve.server.engine.models import load_model  # noqa: E402

from .server_thread import ServerThread  # noqa: E402
from .tiny_pipelines import (  # noqa: E402
    build_tiny_lcm,
    build_tiny_sd,
    build_tiny_sd2,
    build_tiny_sd_inpaint,
    build_tiny_sdxl,
    build_tiny_sdxl_inpaint,
)


@pytest.fixture(scope="session", autouse=True)
def _torch_threads() -> None:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sd_vpred_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd(
        tmp_path_factory.mktemp("models") / "tiny-sd-v", prediction_type="v_prediction", seed=1
    )


@pytest.fixture(scope="session")
def tiny_sd2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd2(tmp_path_factory.mktemp("models") / "tiny-sd2")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_lcm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_lcm(tmp_path_factory.mktemp("models") / "tiny-lcm")


@pytest.fixture(scope="session")
def tiny_sd_inpaint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd_inpaint(tmp_path_factory.mktemp("models") / "tiny-sd-inpaint")


@pytest.fixture(scope="session")
def tiny_sdxl_inpaint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl_inpaint(tmp_path_factory.mktemp("models") / "tiny-sdxl-inpaint")


@pytest.fixture(scope="session")
def tiny_adapter(tiny_sd_dir: Path):
    return load_model("tiny", tiny_sd_dir, max_batch_size=16)


@pytest.fixture(scope="session")
def sdxl(tiny_sdxl_dir: Path):
    return load_model("xl", tiny_sdxl_dir, max_batch_size=8)


@pytest.fixture(scope="session")
def lcm(tiny_lcm_dir: Path):
    return load_model("lcm", tiny_lcm_dir, max_batch_size=8)


@pytest.fixture(scope="session")
def sd2(tiny_sd2_dir: Path):
    return load_model("sd2", tiny_sd2_dir, max_batch_size=8)


@pytest.fixture
def server(tiny_sd_dir: Path):
    """A fresh in-process server (its own engine) on the tiny random model, port 0."""
    srv = ServerThread.tiny(tiny_sd_dir, max_batch_size=8)
    yield srv
    srv.stop()
