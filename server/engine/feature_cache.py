"""Feature caching (DeepCache, Ma et al. 2024) inside step-level batches.

A UNet's deep features change slowly from one denoising step to the next: DeepCache computes
them every N steps ("refresh") and, in between, runs only the shallow path (the first down
block and the last up block, at full latent resolution) on the cached input of the last up
block. DeepCache and every server that offers it cache per *call*: all rows of a batch refresh
on the same steps. In a step-level batch, requests sit at different steps with different
intervals, so here each *row* decides: one forward runs

1. the shallow head (time embedding, ``conv_in``, ``down_blocks[0]``) for every row;
2. the deep middle (the other down blocks, the mid block, every up block but the last) for the
   rows that refresh (and rows of requests without caching) only;
3. the last up block and the output convolutions for every row, each row with its own deep
   feature: the fresh one, or the one its request cached at its last refresh.

Each step mirrors ``UNet2DConditionModel.forward`` of diffusers call for call, so a row that
refreshes gets exactly the bits of the plain forward (checked in tests/test_feature_cache.py
in batch-invariant mode) and requests that do not ask for caching are untouched. The cached
tensor lives with the request's per-image state and goes when the request ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# The LoRA plan for a subset of the forward's rows (row indices into the whole batch): the
# layers inside the block add those rows' adapters (see StableDiffusionAdapter._lora_plans).
PlanFor = Callable[[Sequence[int]], AbstractContextManager[None]]


def feature_cache_support(unet: Any) -> str | None:
    """Why ``unet`` cannot run the cached shallow path, or None when it can."""
    cfg = unet.config
    if type(unet).__name__ != "UNet2DConditionModel":
        return f"{type(unet).__name__} is not a UNet2DConditionModel"
    if len(unet.down_blocks) < 2 or len(unet.up_blocks) != len(unet.down_blocks):
        return "its UNet has fewer than two resolution levels"
    if cfg.get("class_embed_type") is not None or cfg.get("num_class_embeds") is not None:
        return "its UNet takes class embeddings"
    if cfg.get("addition_embed_type") == "image_hint":
        return "its UNet takes an image hint"
    return None


@dataclass(frozen=True)
class CachedForwardOutput:
    """A cached forward's noise predictions, and the deep feature (the last up block's input)
    of every row that computed one (None for the rows that reused theirs)."""

    sample: torch.Tensor
    deep: list[torch.Tensor | None]
    # With count_flops: (FLOPs per row of the shallow path, of the deep middle).
    flops: tuple[float, float] | None = None


def _down(block: nn.Module, sample: torch.Tensor, emb: torch.Tensor, ctx: Any) -> tuple[Any, Any]:
    if getattr(block, "has_cross_attention", False):
        return block(  # type: ignore[no-any-return]
            hidden_states=sample,
            temb=emb,
            encoder_hidden_states=ctx,
            attention_mask=None,
            cross_attention_kwargs=None,
            encoder_attention_mask=None,
        )
    return block(hidden_states=sample, temb=emb)  # type: ignore[no-any-return]


def _up(
    block: nn.Module,
    sample: torch.Tensor,
    emb: torch.Tensor,
    res: tuple[torch.Tensor, ...],
    ctx: Any,
    upsample_size: Any,
) -> torch.Tensor:
    if getattr(block, "has_cross_attention", False):
        return block(  # type: ignore[no-any-return]
            hidden_states=sample,
            temb=emb,
            res_hidden_states_tuple=res,
            encoder_hidden_states=ctx,
            cross_attention_kwargs=None,
            upsample_size=upsample_size,
            attention_mask=None,
            encoder_attention_mask=None,
        )
    return block(  # type: ignore[no-any-return]
        hidden_states=sample, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size
    )


def _rows(x: Any, idx: torch.Tensor) -> Any:
    """Rows ``idx`` of a tensor (or of each tensor of a tuple: an encoder's (text, image))."""
    if isinstance(x, tuple):
        return tuple(_rows(t, idx) for t in x)
    return x.index_select(0, idx)


@torch.inference_mode()
def cached_forward(
    unet: Any,  # a diffusers UNet2DConditionModel (its submodules are untyped)
    sample: torch.Tensor,
    timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    *,
    reuse: Sequence[torch.Tensor | None],
    timestep_cond: torch.Tensor | None = None,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    plan_for: PlanFor,
    pad_single: bool = False,
    count_flops: bool = False,
) -> CachedForwardOutput:
    """``unet``'s forward over a batch where row i reuses the deep feature ``reuse[i]`` (1 x
    C x h x w, from an earlier :class:`CachedForwardOutput`) or, when None, computes it.

    ``plan_for(rows)`` activates the LoRA plan of those rows around each stage. With
    ``pad_single`` (batch-invariant mode) a deep stage of one row runs as two copies: the
    convolutions take other kernels for a batch of one. ``count_flops`` counts each path's
    FLOPs per row (PyTorch's FlopCounterMode; slower, for one forward per image size).
    """
    # One counter per stage (entering a counter again resets it).
    counters = [FlopCounterMode(display=False) if count_flops else contextlib.nullcontext() for _ in range(3)]
    n = sample.shape[0]
    everyone = range(n)
    fresh = [i for i, r in enumerate(reuse) if r is None]
    up_factor = 2**unet.num_upsamplers
    forward_upsample_size = any(d % up_factor for d in sample.shape[-2:])

    # 1. The shallow head, every row (as UNet2DConditionModel.forward up to down_blocks[0]).
    with plan_for(everyone), counters[0]:
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
        emb = unet.time_embedding(t_emb, timestep_cond)
        aug_emb = unet.get_aug_embed(
            emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
        )
        emb = emb + aug_emb if aug_emb is not None else emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        ctx = unet.process_encoder_hidden_states(
            encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
        )
        h = unet.conv_in(sample)
        res: tuple[torch.Tensor, ...] = (h,)
        h, block_res = _down(unet.down_blocks[0], h, emb, ctx)
        res += block_res
    last = unet.up_blocks[-1]
    # The last up block takes conv_in's output and down_blocks[0]'s resnet outputs; the rest
    # (down_blocks[0]'s downsampler output onwards) feed the deep middle only.
    head_res, deep_res = res[: len(last.resnets)], res[len(last.resnets) :]

    # 2. The deep middle, for the rows that compute their feature.
    deep: list[torch.Tensor | None] = [None] * n
    if fresh:
        rows = fresh + fresh if pad_single and len(fresh) == 1 else fresh
        idx = torch.tensor(rows, device=sample.device)
        d_h, d_emb, d_ctx = _rows(h, idx), _rows(emb, idx), _rows(ctx, idx)
        d_res: tuple[torch.Tensor, ...] = tuple(_rows(r, idx) for r in deep_res)
        with plan_for(rows), counters[1]:
            for block in unet.down_blocks[1:]:
                d_h, block_res = _down(block, d_h, d_emb, d_ctx)
                d_res += block_res
            if unet.mid_block is not None:
                if getattr(unet.mid_block, "has_cross_attention", False):
                    d_h = unet.mid_block(
                        d_h,
                        d_emb,
                        encoder_hidden_states=d_ctx,
                        attention_mask=None,
                        cross_attention_kwargs=None,
                        encoder_attention_mask=None,
                    )
                else:
                    d_h = unet.mid_block(d_h, d_emb)
            # The skip features as the plain forward pops them; the head's stay at the bottom,
            # never consumed here (only their sizes are read), so they are not sliced.
            stack = head_res + d_res
            upsample_size = None
            for block in unet.up_blocks[:-1]:
                block_res, stack = stack[-len(block.resnets) :], stack[: -len(block.resnets)]
                if forward_upsample_size:
                    upsample_size = stack[-1].shape[2:]
                d_h = _up(block, d_h, d_emb, block_res, d_ctx, upsample_size)
        for j, i in enumerate(fresh):
            deep[i] = d_h[j : j + 1]

    # 3. The last up block and the output convolutions, every row with its own feature.
    features = [d if d is not None else reuse[i] for i, d in enumerate(deep)]
    h = torch.cat(features)  # type: ignore[arg-type]
    with plan_for(everyone), counters[2]:
        h = _up(last, h, emb, head_res, ctx, None)
        if unet.conv_norm_out:
            h = unet.conv_norm_out(h)
            h = unet.conv_act(h)
        h = unet.conv_out(h)
    flops = None
    if count_flops and fresh:
        head, middle, tail = (c.get_total_flops() for c in counters)  # type: ignore[union-attr]
        middle_rows = 2 if pad_single and len(fresh) == 1 else len(fresh)
        flops = ((head + tail) / n, middle / middle_rows)
    return CachedForwardOutput(h, deep, flops)
