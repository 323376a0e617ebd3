"""Weight quantization of a model's UNet through torchao (``--model-option NAME.quantization``).

What is quantized: the linear layers of the UNet's transformer blocks (attention projections,
feed-forward, linear ``proj_in``/``proj_out``), where its matrix FLOPs and most of its linear
weights are. Convolutions, the time-embedding MLP and every ResNet's ``time_emb_proj`` stay in
float: they see one row per image (2-D inputs), the layers batch invariance makes row-wise
(``batch_invariance.py``), and they are a small share of the work. Text encoders and the VAE
stay in float (they run once per prompt or image, not per step).

Modes (torchao's configs; names follow them):

- ``int8wo``: int8 weights, per output channel scales, float activations (CPU and GPU);
- ``int8dq``: int8 weights and dynamically quantized int8 activations (per token);
- ``fp8wo`` / ``fp8dq``: float8 (e4m3) weights, activations too for ``fp8dq``; CUDA GPUs of
  compute capability 8.9 or newer only;
- ``int8``: the alias of ``int8dq``; ``none``: float weights (the default).

Batch invariance: the quantized layers take 3-D inputs (rows x tokens), whose products were
already row-independent in float. With torchao 0.18 on CPU, ``int8dq`` keeps that at every
shape tried, and ``int8wo`` does not at the layer level: a layer fed few tokens (1 x 10 x 64)
gives a sample other bits in a batch of 2-16 than alone (from 64 rows on it did not), which is
why ``int8`` means ``int8dq``. Whole images were bit-identical alone and batched under both on
the embedded and tiny models (tests/test_quantization.py), but only ``int8dq`` is promised.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .batch_invariance import RowwiseLinear
from .types import QUANTIZATION_ALIASES, QUANTIZATIONS


class QuantizationError(ValueError):
    """The quantization cannot run here (unknown, torchao missing, no fp8 on this device)."""


def canonical(mode: str) -> str:
    """``mode``'s canonical name; raises QuantizationError naming the choices."""
    if mode not in QUANTIZATIONS:
        raise QuantizationError(f"unknown quantization {mode!r}: one of {', '.join(QUANTIZATIONS)}")
    return QUANTIZATION_ALIASES.get(mode, mode)


def quantized_layer(module: nn.Module, fqn: str) -> bool:
    """Whether the UNet layer at ``fqn`` is one that quantization converts."""
    if not isinstance(module, nn.Linear):
        return False
    return ".transformer_blocks." in fqn or fqn.endswith((".proj_in", ".proj_out"))


def _config(mode: str, device: torch.device) -> Any:
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Float8WeightOnlyConfig,
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
        )
    except ImportError as e:
        raise QuantizationError(f"quantization {mode} needs torchao (pip install torchao): {e}") from e
    if mode.startswith("fp8"):
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
            where = (
                device.type
                if device.type != "cuda"
                else f"compute capability {torch.cuda.get_device_capability(device)}"
            )
            raise QuantizationError(
                f"quantization {mode} needs a CUDA GPU of compute capability 8.9 or newer, not {where}"
            )
        return Float8WeightOnlyConfig() if mode == "fp8wo" else Float8DynamicActivationFloat8WeightConfig()
    return Int8WeightOnlyConfig() if mode == "int8wo" else Int8DynamicActivationInt8WeightConfig()


def quantize_unet(unet: nn.Module, mode: str, device: torch.device) -> int:
    """Quantize ``unet``'s transformer-block linears in place (``mode`` canonical, not none);
    returns how many layers. Row-wise linears among them (batch-invariant mode) go back to
    plain linears first: their 3-D inputs never took the row-wise path."""
    from torchao.quantization import quantize_

    config = _config(mode, device)
    chosen = [m for fqn, m in unet.named_modules() if quantized_layer(m, fqn)]
    for m in chosen:
        if type(m) is RowwiseLinear:
            m.__class__ = nn.Linear  # type: ignore[assignment]
    quantize_(unet, config, filter_fn=quantized_layer)
    return len(chosen)


def weight_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers as stored (a quantized weight counts its
    integer data and scales)."""

    def size(t: torch.Tensor) -> int:
        flatten = getattr(t, "__tensor_flatten__", None)
        if flatten is not None and type(t) not in (torch.Tensor, nn.Parameter):
            names, _ = flatten()
            return sum(size(getattr(t, n)) for n in names)
        return t.numel() * t.element_size()

    return sum(size(t) for t in [*module.parameters(), *module.buffers()])
