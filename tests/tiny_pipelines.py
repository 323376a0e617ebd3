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

from models.sd_schedule import SD_SCHEDULE
from models.tiny import data as tiny_data
from models.tiny.tokenizer import build_tokenizer

NO_SAFETY_CHECKER: dict[str, object] = {
    "safety_checker": None,
    "feature_extractor": None,
    "requires_safety_checker": False,
}
WORDS = tiny_data.vocabulary_corpus() + ["dog", "cat", "house", "tree", "sky", "sunset", "photo", "of"]


def build_tiny_sd(
    path: Path, *, prediction_type: str = "epsilon", seed: int = 0, max_tokens: int = 16
) -> Path:
    """A ~0.3 M parameter SD-1.x-shaped pipeline: 32x32 images, 2x VAE, 16x16x4 latents."""
    torch.manual_seed(seed)
    tok = build_tokenizer(WORDS, max_tokens)
    text = _tiny_clip(tok, 32, max_tokens)
    unet = _tiny_unet()
    vae = _tiny_vae(32)
    # SD 1.x's schedule and spacing.
    sampler = EulerDiscreteScheduler(**SD_SCHEDULE, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
        unet=unet,
        scheduler=sampler,
        **NO_SAFETY_CHECKER,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def _tiny_unet(**overrides: object) -> UNet2DConditionModel:
    """The SD-1.x-shaped toy UNet (16x16x4 latents, 32-wide text context), with overrides."""
    config: dict[str, object] = {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (32, 64),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "layers_per_block": 1,
        "cross_attention_dim": 32,
        "attention_head_dim": 4,
        "norm_num_groups": 8,
        **overrides,
    }
    return UNet2DConditionModel(**config)


def _tiny_clip(tok, hidden: int, max_tokens: int, *, projection_dim: int | None = None):
    from transformers import CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_tokens,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        projection_dim=projection_dim or hidden,
    )
    return CLIPTextModelWithProjection(cfg) if projection_dim else CLIPTextModel(cfg)


def _tiny_vae(sample_size: int, **kw: object) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size,
        **kw,  # type: ignore[arg-type]
    )


def build_tiny_sd2(path: Path, *, seed: int = 2, max_tokens: int = 16) -> Path:
    """SD-2.x-768-shaped: v-prediction, linear attention projections, per-block head dims,
    upcast attention, a wider (OpenCLIP-like) text width and a larger native size (48x48
    here, as 768 is to 512)."""
    torch.manual_seed(seed)
    tok = build_tokenizer(WORDS, max_tokens)
    unet = _tiny_unet(
        sample_size=24,
        cross_attention_dim=48,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        upcast_attention=True,
    )
    sampler = EulerDiscreteScheduler(**SD_SCHEDULE, prediction_type="v_prediction")
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(48),
        text_encoder=_tiny_clip(tok, 48, max_tokens),
        tokenizer=tok,
        unet=unet,
        scheduler=sampler,
        **NO_SAFETY_CHECKER,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_sdxl(
    path: Path, *, seed: int = 3, max_tokens: int = 16, time_cond_proj_dim: int | None = None
) -> Path:
    """SDXL-shaped: two text encoders (the second with a projection, giving the pooled
    embedding), penultimate-layer hidden states concatenated as cross-attention context,
    "text_time" added conditioning (pooled text + original size, crop, target size), linear
    projections and more transformer layers in the deeper block, as in SDXL."""
    from diffusers import StableDiffusionXLPipeline

    torch.manual_seed(seed)
    tok = build_tokenizer(WORDS, max_tokens)
    tok2 = build_tokenizer(WORDS, max_tokens)
    text = _tiny_clip(tok, 32, max_tokens)
    text2 = _tiny_clip(tok2, 32, max_tokens, projection_dim=16)
    unet = _tiny_unet(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 16,
        cross_attention_dim=64,
        time_cond_proj_dim=time_cond_proj_dim,
    )
    sampler = EulerDiscreteScheduler(**SD_SCHEDULE)
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(32, force_upcast=True),
        text_encoder=text,
        text_encoder_2=text2,
        tokenizer=tok,
        tokenizer_2=tok2,
        unet=unet,
        scheduler=sampler,
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_lcm(path: Path, *, seed: int = 4, max_tokens: int = 16) -> Path:
    """An LCM-distilled SD-1.x-shaped pipeline: the UNet takes the guidance scale as an
    embedding (time_cond_proj_dim) instead of classifier-free guidance, with LCMScheduler."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    torch.manual_seed(seed)
    tok = build_tokenizer(WORDS, max_tokens)
    unet = _tiny_unet(time_cond_proj_dim=32)  # the guidance-scale embedding input
    sampler = LCMScheduler(**SD_SCHEDULE, original_inference_steps=50)
    pipe = LatentConsistencyModelPipeline(
        vae=_tiny_vae(32),
        text_encoder=_tiny_clip(tok, 32, max_tokens),
        tokenizer=tok,
        unet=unet,
        scheduler=sampler,
        **NO_SAFETY_CHECKER,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    # Few-step serving defaults, as a real LCM checkpoint's stepserve.json would set them.
    (path / "stepserve.json").write_text('{"default_steps": 4, "default_guidance_scale": 1.5}')
    return path


def build_tiny_preview_decoder(path: Path, *, seed: int = 0) -> Path:
    """A random diffusers ``AutoencoderTiny`` (the TAESD architecture) at toy width, for 4-channel
    latents: its decoder doubles the latent size once (16x16 latents -> 32x32 previews)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    AutoencoderTiny(
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        latent_channels=4,
    ).save_pretrained(path)
    return path


def build_tiny_sd_inpaint(path: Path, *, seed: int = 5, max_tokens: int = 16) -> Path:
    """A dedicated inpainting checkpoint, SD-1.x-shaped (``StableDiffusionInpaintPipeline``):
    the UNet takes 9 input channels, the latents, the mask and the masked image's latents."""
    from diffusers import StableDiffusionInpaintPipeline

    torch.manual_seed(seed)
    tok = build_tokenizer(WORDS, max_tokens)
    pipe = StableDiffusionInpaintPipeline(
        vae=_tiny_vae(32),
        text_encoder=_tiny_clip(tok, 32, max_tokens),
        tokenizer=tok,
        unet=_tiny_unet(in_channels=9),
        scheduler=EulerDiscreteScheduler(**SD_SCHEDULE),
        **NO_SAFETY_CHECKER,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_sdxl_inpaint(path: Path, *, seed: int = 6) -> Path:
    """An SDXL inpainting checkpoint (``StableDiffusionXLInpaintPipeline``, 9-channel UNet):
    the tiny SDXL pipeline's components with an inpainting UNet, saved as that class."""
    from diffusers import StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline

    xl = build_tiny_sdxl(path.with_name(path.name + "-base"), seed=seed)
    base = StableDiffusionXLPipeline.from_pretrained(str(xl))
    torch.manual_seed(seed)
    config = dict(base.unet.config)
    config["in_channels"] = 9
    unet = UNet2DConditionModel.from_config(config)
    parts = {
        k: v for k, v in base.components.items() if k not in ("unet", "image_encoder", "feature_extractor")
    }
    StableDiffusionXLInpaintPipeline(**parts, unet=unet).save_pretrained(path, safe_serialization=True)
    return path


def build_lora(
    path: Path,
    pipe_dir: Path,
    *,
    seed: int,
    rank: int = 4,
    alpha: float | None = None,
    unet_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
    text_targets: tuple[str, ...] = (),
    kohya: bool = False,
    std: float = 0.3,
    text2_targets: tuple[str, ...] = (),
) -> Path:
    """A random LoRA for the pipeline at ``pipe_dir``: diffusers/PEFT keys (with the adapter
    metadata diffusers' ``save_lora_weights`` writes: rank and alpha), or kohya/A1111 keys
    (``lora_unet_..._to_q.lora_down.weight`` with ``.alpha``) when ``kohya``. Weights are
    large enough to change the images visibly. ``text2_targets``: layers of SDXL's second
    text encoder (``text_encoder_2.`` keys, ``lora_te2_`` in kohya's)."""
    import json as _json

    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file

    pipe = DiffusionPipeline.from_pretrained(str(pipe_dir))
    g = torch.Generator().manual_seed(seed)
    alpha = float(rank if alpha is None else alpha)
    tensors: dict[str, torch.Tensor] = {}
    for prefix, kohya_prefix, model, targets in (
        ("unet", "lora_unet", pipe.unet, unet_targets),
        ("text_encoder", "lora_te", pipe.text_encoder, text_targets),
        ("text_encoder_2", "lora_te2", getattr(pipe, "text_encoder_2", None), text2_targets),
    ):
        if model is None:
            assert not targets, f"{pipe_dir} has no {prefix}"
            continue
        for name, mod in model.named_modules():
            if not targets or not any(name.endswith("." + t) for t in targets):
                continue
            if isinstance(mod, torch.nn.Conv2d):  # a 1x1 projection: to test refusing it
                n_in, n_out = mod.in_channels, mod.out_channels
            else:
                n_in, n_out = mod.in_features, mod.out_features
            down = torch.randn(rank, n_in, generator=g) * std
            up = torch.randn(n_out, rank, generator=g) * std
            if kohya:
                key = f"{kohya_prefix}_{name.replace('.', '_')}"
                if prefix.startswith("text_encoder") and not name.startswith("text_model"):
                    key = f"{kohya_prefix}_text_model_{name.replace('.', '_')}"
                tensors[f"{key}.lora_down.weight"] = down
                tensors[f"{key}.lora_up.weight"] = up
                tensors[f"{key}.alpha"] = torch.tensor(alpha)
            else:
                tensors[f"{prefix}.{name}.lora_A.weight"] = down
                tensors[f"{prefix}.{name}.lora_B.weight"] = up
    path.mkdir(parents=True, exist_ok=True)
    metadata = None
    if not kohya:
        config = {}
        for prefix, targets in (
            ("unet", unet_targets),
            ("text_encoder", text_targets),
            ("text_encoder_2", text2_targets),
        ):
            if targets:
                for k, v in {"r": rank, "lora_alpha": alpha, "target_modules": list(targets)}.items():
                    config[f"{prefix}.{k}"] = v
        metadata = {"lora_adapter_metadata": _json.dumps(config), "format": "pt"}
    save_file(tensors, str(path / "pytorch_lora_weights.safetensors"), metadata=metadata)
    return path
