"""A full-size Stable Diffusion 1.5 architecture at random weights, saved as a diffusers
pipeline directory, for benchmarking on an accelerator (speed does not depend on the weights'
values, and no model hub is reachable from here).

Same shapes as SD 1.5: UNet 320/640/1280/1280 channels, two layers per block, 768-wide
cross-attention, 64x64x4 latents (512x512 images); the SD VAE (128/256/512/512); a 12-layer,
768-wide CLIP text encoder over 77 tokens. The tokenizer is a small BPE trained here (its
vocabulary size changes one embedding lookup, nothing else). The images are noise.

    python bench/random_sd.py /tmp/sd15-random            # float16 weights, about 2 GB
    python bench/run.py --model /tmp/sd15-random --device cuda --profile brief
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.sd_schedule import SD_SCHEDULE  # noqa: E402
from models.tiny import data as tiny_data  # noqa: E402
from models.tiny.tokenizer import build_tokenizer  # noqa: E402

TOKENS = 77
# SD 1.5's UNet (64x64x4 latents: 512 px images).
SD15_UNET: dict[str, object] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
)


def build(path: Path, dtype: torch.dtype = torch.float16, seed: int = 0) -> int:
    """Save the pipeline at ``path``; returns the UNet's parameter count."""
    torch.manual_seed(seed)
    tok = build_tokenizer(tiny_data.vocabulary_corpus(), TOKENS)
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=TOKENS,
            hidden_act="quick_gelu",
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(**SD15_UNET)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SD_SCHEDULE),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(dtype=dtype)
    pipe.save_pretrained(path, safe_serialization=True)
    return sum(p.numel() for p in unet.parameters())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    args = ap.parse_args()
    n = build(args.out, getattr(torch, args.dtype))
    print(f"wrote {args.out} (UNet {n / 1e6:.0f} M parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
