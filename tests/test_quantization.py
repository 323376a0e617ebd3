"""Weight quantization (torchao) of a model's UNet: a clear error for a bad value, the
quantized model served end to end, its images the same alone or batched, close to the float
model's (a measured bound), and LoRA adapters on top."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stepserve.client import ImageClient
from stepserve.server.config import ConfigError, ServerConfig
from stepserve.server.engine.models import default_model_path, load_model
from stepserve.server.engine.models.registry import ModelLoadError
from stepserve.server.engine.quantization import quantized_layer, weight_bytes
from stepserve.server.engine.types import ResultEvent

from .engine_helpers import Harness, params
from .server_thread import ServerThread

# Largest pixel change int8 weights may make in the embedded model's images here (measured: 2
# for int8dq, 1 for int8wo; bench/quantization.py has more prompts); a broken quantization
# moves them by far more.
MAX_INT8_PIXEL_DIFF = 8


def test_an_unknown_quantization_is_a_startup_error_naming_the_option() -> None:
    config = ServerConfig(model_options=["tiny-shapes.quantization=int3"])
    with pytest.raises(ConfigError, match=r"tiny-shapes\.quantization=int3.*unknown quantization 'int3'"):
        config.validate().model_overrides()


def test_fp8_on_a_cpu_is_a_load_error_saying_why() -> None:
    with pytest.raises(ModelLoadError, match="fp8wo needs a CUDA GPU of compute capability 8.9"):
        load_model("tiny", default_model_path(), overrides={"quantization": "fp8wo"})


@pytest.fixture(scope="module")
def embedded_int8():
    return load_model("tiny", default_model_path(), overrides={"quantization": "int8"})


@pytest.fixture(scope="module")
def embedded_float():
    return load_model("tiny", default_model_path())


def _images(adapter, reqs) -> dict[str, list[np.ndarray]]:
    h = Harness({"tiny": adapter})
    for r in reqs:
        h.submit(r)
    h.run_until_idle()
    out = {}
    for r in reqs:
        ev = h.events[r.request_id][-1]
        assert isinstance(ev, ResultEvent)
        out[r.request_id] = ev.images
    return out


def _reqs():
    prompts = ["a small red circle on the left", "a large blue square at the top", "a green triangle"]
    return [
        params(
            f"r{i}", prompt=p, seed=10 + i, steps=8, width=32, height=32, guidance_scale=[7.5, 1.0, 4.0][i]
        )
        for i, p in enumerate(prompts)
    ]


def test_weight_only_int8_layers_depend_on_the_batch_but_dynamic_int8_layers_do_not() -> None:
    """Why "int8" is int8dq: torchao's weight-only int8 product gives a sample of a narrow
    layer (10 tokens) other bits batched than alone; the dynamic int8 one does not. When a
    torchao release changes either, this says so."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    same = {}
    for name, config in (
        ("int8wo", Int8WeightOnlyConfig()),
        ("int8dq", Int8DynamicActivationInt8WeightConfig()),
    ):
        torch.manual_seed(0)
        layer = torch.nn.Sequential(torch.nn.Linear(64, 128))
        quantize_(layer, config)
        x = torch.randn(16, 10, 64)
        with torch.inference_mode():
            same[name] = all(torch.equal(layer(x[:1]), layer(x[:n])[:1]) for n in (2, 8, 16))
    assert same == {"int8wo": False, "int8dq": True}


def test_int8_quantizes_the_transformer_linears_only_and_shrinks_them(embedded_int8, embedded_float) -> None:
    assert embedded_int8.info.quantization == "int8dq" and embedded_float.info.quantization == "none"
    q = {fqn: m for fqn, m in embedded_int8.unet.named_modules() if quantized_layer(m, fqn)}
    assert q and all(type(m.weight) is not torch.nn.Parameter for m in q.values())
    # The time-embedding linears stay float (and row-wise: batch invariance).
    assert type(embedded_int8.unet.time_embedding.linear_1.weight) is torch.nn.Parameter
    f = dict(embedded_float.unet.named_modules())
    float_bytes = sum(weight_bytes(f[fqn]) for fqn in q)
    int8_bytes = sum(weight_bytes(m) for m in q.values())
    assert int8_bytes < 0.4 * float_bytes  # int8 data plus scales, against float32


def test_quantized_images_are_the_same_alone_or_batched_and_close_to_float(
    embedded_int8, embedded_float
) -> None:
    reqs = _reqs()
    together = _images(embedded_int8, reqs)
    for r in reqs:
        alone = _images(embedded_int8, [r])[r.request_id]
        np.testing.assert_array_equal(alone[0], together[r.request_id][0])
    ref = _images(embedded_float, reqs)
    diffs = [np.abs(together[k][0].astype(int) - ref[k][0].astype(int)) for k in ref]
    assert max(int(d.max()) for d in diffs) <= MAX_INT8_PIXEL_DIFF
    assert any(d.max() > 0 for d in diffs)  # quantization did change the weights


def test_lora_adapters_apply_on_a_quantized_model(embedded_int8) -> None:
    base = dict(width=32, height=32, steps=6, seed=3)
    reqs = [params("with", loras=(("stripes", 1.0),), **base), params("without", **base)]
    out = _images(embedded_int8, reqs)
    assert not np.array_equal(out["with"][0], out["without"][0])
    np.testing.assert_array_equal(_images(embedded_int8, reqs[:1])["with"][0], out["with"][0])


def test_a_quantized_model_serves_over_grpc_and_lists_its_quantization() -> None:
    config = ServerConfig(
        host="127.0.0.1", port=0, metrics_port=0, model_options=["tiny-shapes.quantization=int8dq"]
    )
    srv = ServerThread(config.validate())
    try:
        with ImageClient(srv.target) as c:
            (info,) = c.list_models()
            assert info.quantization == "int8dq"
            result = c.generate("a red circle", seed=1, steps=4)
            assert result.images and result.usage.accelerator_seconds > 0
    finally:
        srv.stop()
