"""Start-up checks: config bounds and model directories, with messages naming the problem."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from stepserve.server.config import ConfigError, ServerConfig, add_arguments, from_args
from stepserve.server.engine.models import default_model_path
from stepserve.server.engine.models.registry import ModelLoadError, inspect_model_dir


def parse(argv: list[str], env: dict[str, str] | None = None) -> ServerConfig:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return from_args(p.parse_args(argv), env or {})


def test_flags_override_environment_over_defaults() -> None:
    cfg = parse(
        ["--max-queue", "5", "--model", "a=/x", "--model", "b=/y"],
        {"STEPSERVE_MAX_QUEUE": "9", "STEPSERVE_PORT": "6000"},
    )
    assert cfg.max_queue == 5 and cfg.port == 6000 and cfg.batching == "step"
    assert cfg.model_specs() == [("a", Path("/x")), ("b", Path("/y"))]
    assert parse([], {"STEPSERVE_WARMUP": "false"}).warmup is False


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "70000"], "--port 70000"),
        (["--batching", "static"], "--batching 'static'"),
        (["--max-batch-size", "0"], "--max-batch-size 0"),
        (["--run-ahead", "always"], "--run-ahead 'always'"),
        (["--model", "nopath"], "expected NAME=PATH"),
        (["--model", "a=/x", "--model", "a=/y"], "unique"),
        (["--model", "a=/x", "--default-model", "b"], "--default-model 'b'"),
    ],
)
def test_bad_settings_name_the_value(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(argv)


def test_model_dir_checks(tmp_path: Path, tiny_sd_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        inspect_model_dir(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="model_index.json"):
        inspect_model_dir(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ModelLoadError, match="FluxPipeline pipeline, which stepserve does not serve"):
        inspect_model_dir(tmp_path)
    assert inspect_model_dir(tiny_sd_dir) == "StableDiffusionPipeline"


def test_embedded_model_ships_in_the_package() -> None:
    path = default_model_path()
    assert inspect_model_dir(path) == "StableDiffusionPipeline"
