"""Random LoRA adapters for a diffusers pipeline directory, for the benchmark's lora workload:
rank-8 adapters of the UNet's attention projections (to_q, to_k, to_v, to_out.0), diffusers/PEFT
keys with the rank/alpha metadata diffusers' ``save_lora_weights`` writes, fixed seeds.

Speed does not depend on the weights' values; they are small (std 0.1 for both factors, alpha =
rank) so that the images stay images, each adapter nudging them its own way (on the embedded
tiny-shapes model: a mean change of 1-6 levels of 255 per pixel, a shape's colour or the
background's tint; std 0.2 already repaints some, 0.3 turns them into texture).

    python bench/random_loras.py /tmp/loras [--model PATH] [--count 8]
    # prints the --lora flags for stepserve serve
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
FILE = "pytorch_lora_weights.safetensors"


def unet_linears(pipe_dir: Path, targets: tuple[str, ...] = TARGETS) -> dict[str, tuple[int, int]]:
    """The UNet's ``targets`` linear layers, by module path: (out_features, in_features). Read
    from the safetensors headers when there are any, else from the loaded UNet."""
    files = sorted((pipe_dir / "unet").glob("*.safetensors"))
    ends = tuple("." + t for t in targets)
    out: dict[str, tuple[int, int]] = {}
    if files:
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                names = st.keys()  # a safe_open handle is not iterable
                for key in names:
                    module, _, kind = key.rpartition(".")
                    shape = st.get_slice(key).get_shape()
                    if kind == "weight" and len(shape) == 2 and module.endswith(ends):
                        out[module] = (int(shape[0]), int(shape[1]))
        return out
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(pipe_dir), subfolder="unet")
    for name, mod in unet.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.endswith(ends):
            out[name] = (mod.out_features, mod.in_features)
    return out


def build(
    out_dir: Path,
    pipe_dir: Path,
    *,
    count: int = 8,
    rank: int = 8,
    std: float = 0.1,
    seed: int = 0,
    prefix: str = "bench",
) -> dict[str, Path]:
    """``count`` adapters ``{prefix}-0`` ... under ``out_dir`` (one directory each, adapter i
    drawn with seed ``seed + i``); returns their paths by name."""
    layers = unet_linears(pipe_dir)
    if not layers:
        raise ValueError(f"{pipe_dir}: no UNet layers named {', '.join(TARGETS)}")
    metadata = {
        "lora_adapter_metadata": json.dumps(
            {"unet.r": rank, "unet.lora_alpha": float(rank), "unet.target_modules": list(TARGETS)}
        ),
        "format": "pt",
    }
    paths = {}
    for i in range(count):
        g = torch.Generator().manual_seed(seed + i)
        tensors = {}
        for module, (n_out, n_in) in sorted(layers.items()):
            tensors[f"unet.{module}.lora_A.weight"] = torch.randn(rank, n_in, generator=g) * std
            tensors[f"unet.{module}.lora_B.weight"] = torch.randn(n_out, rank, generator=g) * std
        path = out_dir / f"{prefix}-{i}"
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path / FILE), metadata=metadata)
        paths[f"{prefix}-{i}"] = path
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", type=Path, help="a diffusers pipeline directory (default: the embedded one)")
    ap.add_argument("--count", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--std", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.model is None:
        from stepserve.server.engine.models import default_model_path

        args.model = default_model_path()
    paths = build(args.out, args.model, count=args.count, rank=args.rank, std=args.std, seed=args.seed)
    print(" ".join(f"--lora {name}={path}" for name, path in paths.items()))


if __name__ == "__main__":
    main()
