"""Tiny random-weight Stable Diffusion pipelines built in code and saved to disk.

They use the real component classes (UNet2DConditionModel with cross-attention blocks,
AutoencoderKL, CLIPTextModel + CLIPTokenizer, a diffusers scheduler) at toy sizes, so tests
exercise exactly the loading and serving code real checkpoints go through.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from models.tiny import data as tiny_data
from models.tiny.tokenizer import build_tokenizer

WORDS = tiny_data.vocabulary_corpus() + ["dog", "cat", "house", "tree", "sky", "sunset", "photo", "of"]


def build_tiny_sd(
    path: Path, *, prediction_type: str = "epsilon", seed: int = 0, max_tokens: int = 16
) -> Path:
    """A ~0.3 M parameter SD-1.x-shaped pipeline: 32x32 images, 2x VAE, 16x16x4 latents."""
    torch.manual_seed(seed)
    tok = build_tokenizer(WORDS, max_tokens)
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=max_tokens,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    # SD 1.x's schedule and spacing.
    sched = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        timestep_spacing="leading",
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path
