"""Architecture of the ``tiny-shapes`` model: the Stable Diffusion component classes, small.

Sizes follow a probe that reached full prompt-following quality within the CPU budget:
a 2x VAE (32x32 RGB <-> 16x16x4 latents), a 2-layer CLIP text encoder of width 64 and a
3-level UNet (64/128/128 channels, cross-attention at 8x8 and 4x4), trained with the DDPM
linear beta schedule (1e-4..0.02, near-zero terminal SNR) and v-prediction.
"""

from __future__ import annotations

from diffusers import AutoencoderKL, AutoencoderTiny, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

LATENT_CHANNELS = 4
LATENT_SIZE = 16
TEXT_WIDTH = 64
MAX_TOKENS = 32

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=1e-4,
    beta_end=0.02,
    beta_schedule="linear",
    prediction_type="v_prediction",
    # "trailing" makes the first sampling step start at t=999, the (almost) pure-noise end
    # of this schedule, which is where the layout (position) of the image is decided.
    timestep_spacing="trailing",
)


def make_vae() -> AutoencoderKL:
    """2x VAE: 32x32 RGB <-> 16x16x4 latents (two levels, one downsampling)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=32,
    )


def make_preview_decoder() -> AutoencoderTiny:
    """TAESD's architecture (diffusers' ``AutoencoderTiny``) at this model's scale: one 2x
    upsampling, 16x16x4 scaled latents -> 32x32 RGB previews. Scaling factor 1: it reads the
    pipeline's scaled latents, as TAESD reads Stable Diffusion's."""
    return AutoencoderTiny(
        encoder_block_out_channels=(32, 32),
        decoder_block_out_channels=(48, 48),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(2, 1),
        latent_channels=LATENT_CHANNELS,
        scaling_factor=1.0,
    )


def make_text_encoder(vocab_size: int, bos_id: int, eos_id: int, pad_id: int) -> CLIPTextModel:
    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_WIDTH,
        intermediate_size=TEXT_WIDTH * 4,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        projection_dim=TEXT_WIDTH,
    )
    return CLIPTextModel(cfg)


def make_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(64, 128, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def make_sampler() -> EulerDiscreteScheduler:
    sampler = EulerDiscreteScheduler(**SCHEDULER_CONFIG)
    # Saved with the model, so that a DDIM sampler built from this config (from_config, as
    # diffusers users and stepserve do) does not clip its x0 estimate to [-1, 1], DDIM's
    # default for pixel-space models: on these latents it turns the image into noise.
    sampler.register_to_config(clip_sample=False)
    return sampler
