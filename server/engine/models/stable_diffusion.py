"""Stable Diffusion 1.x/2.x (and the embedded ``tiny-shapes`` model) as a ModelAdapter.

Numerics follow ``diffusers.StableDiffusionPipeline.__call__`` step for step (prompt
encoding, latent initialisation, ``scale_model_input``, classifier-free guidance as
``uncond + g * (cond - uncond)``, ``scheduler.step``, VAE decode and post-processing), so a
request's image matches the reference pipeline run with the same seed, sampler, steps and
guidance; the parity tests hold it to that.
"""

from __future__ import annotations

import copy
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from ..batch_invariance import make_rowwise_linears
from ..samplers import SAMPLER_CLASSES, SchedulerFactory, sampler_for_class_name
from ..types import ModelInfo, Sampler
from .base import ModelAdapter, RequestStepFailures

if TYPE_CHECKING:
    from ..request import RequestState
    from ..types import RGBArray

logger = logging.getLogger(__name__)

# Optional per-model settings file a model directory may carry (keys of ModelInfo plus
# "latent_rgb_factors"); command-line overrides win over it.
SETTINGS_FILE = "stepserve.json"


@dataclass
class ImageState:
    """One image of a request: its own generator, sampler state and latents."""

    seed: int
    generator: torch.Generator
    scheduler: Any  # a diffusers scheduler instance (see samplers.DiffusersScheduler)
    latents: torch.Tensor


@dataclass
class RequestWork:
    """A request's tensors."""

    images: list[ImageState]
    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor | None
    guidance_scale: float
    preview_x0: torch.Tensor | None = None


class StableDiffusionAdapter(ModelAdapter):
    """Runs a diffusers ``StableDiffusionPipeline`` directory one batched step at a time."""

    family = "stable-diffusion"

    def __init__(
        self,
        name: str,
        path: Path,
        *,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        max_batch_size: int = 16,
        batch_invariant: bool | None = None,
        embed_cache_size: int = 1024,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        from diffusers import StableDiffusionPipeline

        self.name = name
        self.path = Path(path)
        self.device = torch.device(device)
        if dtype is None:
            dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.dtype = dtype
        self.pipe = StableDiffusionPipeline.from_pretrained(  # type: ignore[no-untyped-call]
            str(self.path),
            local_files_only=True,
            torch_dtype=dtype,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        ).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.unet = self.pipe.unet.eval()
        self.vae = self.pipe.vae.eval()
        self.text_encoder = self.pipe.text_encoder.eval()
        self.tokenizer = self.pipe.tokenizer
        # Validation counts tokens on the event loop while the engine thread encodes; fast
        # tokenizers are not safe to share between threads ("Already borrowed"), so the
        # API side gets its own copy.
        self._count_tokenizer = copy.deepcopy(self.tokenizer)
        # Bit-identical results regardless of batch composition are promised on CPU float32.
        if batch_invariant is None:
            batch_invariant = self.device.type == "cpu" and dtype == torch.float32
        self.batch_invariant = batch_invariant
        if batch_invariant:
            make_rowwise_linears(self.unet)

        base_config = self.pipe.scheduler.config
        self.schedulers = SchedulerFactory(base_config, device=str(self.device))
        self.prediction_type = base_config.get("prediction_type", "epsilon")
        ref = SAMPLER_CLASSES[Sampler.DDIM].from_config(base_config)
        self._alphas_cumprod = ref.alphas_cumprod.double().cpu().numpy()
        self.vae_scale_factor = self.pipe.vae_scale_factor
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.latent_channels = int(self.unet.config.in_channels)

        settings: dict[str, Any] = {}
        settings_path = self.path / SETTINGS_FILE
        if settings_path.exists():
            settings = json.loads(settings_path.read_text())
        settings.update(overrides or {})
        native = int(self.unet.config.sample_size) * self.vae_scale_factor
        default_sampler = settings.get("default_sampler")
        self.info = ModelInfo(
            name=name,
            family=self.family,
            default_width=int(settings.get("default_width", native)),
            default_height=int(settings.get("default_height", native)),
            default_steps=int(settings.get("default_steps", 30)),
            default_guidance_scale=float(settings.get("default_guidance_scale", 7.5)),
            default_sampler=Sampler(default_sampler)
            if default_sampler
            else (sampler_for_class_name(type(self.pipe.scheduler).__name__) or Sampler.EULER),
            samplers=tuple(SAMPLER_CLASSES),
            max_batch_size=max_batch_size,
            min_size=int(settings.get("min_size", 8 * self.vae_scale_factor)),
            max_size=int(settings.get("max_size", 2 * native)),
            max_steps=int(settings.get("max_steps", 150)),
            max_images_per_request=min(max_batch_size, int(settings.get("max_images_per_request", 8))),
            max_prompt_tokens=int(self.tokenizer.model_max_length) - 2,
        )
        self._embed_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._embed_cache_size = embed_cache_size
        self._latent_rgb = self._fit_latent_rgb(settings.get("latent_rgb_factors"))

    # -- prompts ------------------------------------------------------------------------
    def count_prompt_tokens(self, text: str) -> int:
        return len(self._count_tokenizer(text, add_special_tokens=False).input_ids)

    @torch.inference_mode()
    def _encode(self, texts: list[str]) -> list[torch.Tensor]:
        """Embeddings (1 x tokens x width each) as the reference pipeline computes them."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._embed_cache]
        if missing:
            enc = self.tokenizer(
                missing,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            mask = None
            if getattr(self.text_encoder.config, "use_attention_mask", False):
                mask = enc.attention_mask.to(self.device)
            emb = self.text_encoder(enc.input_ids.to(self.device), attention_mask=mask)[0]
            emb = emb.to(dtype=self.dtype)
            for i, t in enumerate(missing):
                self._embed_cache[t] = emb[i : i + 1]
        out = []
        for t in texts:
            self._embed_cache.move_to_end(t)
            out.append(self._embed_cache[t])
        while len(self._embed_cache) > self._embed_cache_size:
            self._embed_cache.popitem(last=False)
        return out

    # -- engine operations ---------------------------------------------------------------
    @torch.inference_mode()
    def prepare(self, reqs: list[RequestState]) -> None:
        texts: list[str] = []
        for req in reqs:
            texts.append(req.params.prompt)
            if req.params.uses_guidance:
                texts.append(req.params.negative_prompt)
        embeds = iter(self._encode(texts))
        for req in reqs:
            p = req.params
            pos = next(embeds)
            neg = next(embeds) if p.uses_guidance else None
            h, w = p.height // self.vae_scale_factor, p.width // self.vae_scale_factor
            images = []
            for seed in p.seeds:
                gen = torch.Generator(device=self.device).manual_seed(seed)
                sched = self.schedulers.create(p.sampler, p.steps)
                lat = randn_tensor(
                    (1, self.latent_channels, h, w), generator=gen, device=self.device, dtype=self.dtype
                )
                images.append(ImageState(seed, gen, sched, lat * sched.init_noise_sigma))
            req.work = RequestWork(images, pos, neg, p.guidance_scale)

    @torch.inference_mode()
    def denoise_step(self, reqs: list[RequestState]) -> int:
        failures: dict[str, BaseException] = {}
        # 1. Each request's model inputs (no state changes besides the schedulers' idempotent
        # step-index initialisation), so a failed forward can be retried.
        inputs: list[tuple[RequestState, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]] = []
        for req in reqs:
            try:
                inputs.append((req, *self._step_inputs(req)))
            except Exception as e:
                failures[req.request_id] = e
        xs = [x for _, rx, _, _ in inputs for x in rx]
        cs = [c for _, _, rc, _ in inputs for c in rc]
        ts = [t for _, _, _, rt in inputs for t in rt]
        rows = len(xs)
        if rows:
            # 2. One batched forward for everyone (a failure here fails the whole call).
            self.faults.before_forward([r for r, *_ in inputs], rows)
            pad = self.batch_invariant and rows == 1
            x = torch.cat(xs + xs[:1] if pad else xs)
            c = torch.cat(cs + cs[:1] if pad else cs)
            t_all = torch.stack([t.to(torch.float32) for t in (ts + ts[:1] if pad else ts)])
            out = self.unet(x, t_all, encoder_hidden_states=c, return_dict=False)[0]
            # 3. Each request's own update: guidance, sampler step, preview estimate.
            r = 0
            for req, rx, _, _ in inputs:
                n = len(rx)
                try:
                    self.faults.before_request_update(req)
                    self._update(req, x[r : r + n], out[r : r + n])
                except Exception as e:
                    failures[req.request_id] = e
                r += n
        if failures:
            raise RequestStepFailures(rows, failures)
        return rows

    def _step_inputs(
        self, req: RequestState
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """The request's rows of the batched forward: inputs, text embeddings, timesteps."""
        w: RequestWork = req.work
        xs: list[torch.Tensor] = []
        cs: list[torch.Tensor] = []
        ts: list[torch.Tensor] = []
        for im in w.images:
            t = im.scheduler.timesteps[req.steps_done]
            x_in = im.scheduler.scale_model_input(im.latents, t)
            if w.negative_embeds is not None:
                xs += [x_in, x_in]
                cs += [w.negative_embeds, w.prompt_embeds]
                ts += [t, t]
            else:
                xs.append(x_in)
                cs.append(w.prompt_embeds)
                ts.append(t)
        return xs, cs, ts

    def _update(self, req: RequestState, x: torch.Tensor, out: torch.Tensor) -> None:
        """Apply guidance and advance each of the request's images one sampler step, given its
        rows of the forward's input and output. An exception here fails this request only."""
        w: RequestWork = req.work
        want_preview = req.preview_due()
        new_latents = []
        preview = None
        r = 0
        for i, im in enumerate(w.images):
            t = im.scheduler.timesteps[req.steps_done]
            if w.negative_embeds is not None:
                uncond, cond = out[r : r + 1], out[r + 1 : r + 2]
                noise = uncond + w.guidance_scale * (cond - uncond)
                x_in = x[r : r + 1]
                r += 2
            else:
                noise = out[r : r + 1]
                x_in = x[r : r + 1]
                r += 1
            if want_preview and i == 0:
                preview = self._x0_estimate(x_in, noise, t)
            new_latents.append(
                im.scheduler.step(noise, t, im.latents, generator=im.generator, return_dict=False)[0]
            )
        for im, lat in zip(w.images, new_latents, strict=True):
            im.latents = lat
        if preview is not None:
            w.preview_x0 = preview

    def _x0_estimate(self, x_in: torch.Tensor, model_out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model's current estimate of the clean latents (x_in is the DDPM-scaled x_t)."""
        ab = float(np.interp(float(t), np.arange(len(self._alphas_cumprod)), self._alphas_cumprod))
        a, s = ab**0.5, (1.0 - ab) ** 0.5
        if self.prediction_type == "v_prediction":
            out: torch.Tensor = a * x_in - s * model_out
        elif self.prediction_type == "epsilon":
            out = (x_in - s * model_out) / a
        else:
            out = model_out
        return out

    @torch.inference_mode()
    def decode(self, reqs: list[RequestState]) -> list[list[RGBArray]]:
        lat = [im.latents for req in reqs for im in req.work.images]
        if self.batch_invariant:
            # Conv kernels differ between batch 1 and larger batches; decode one at a time.
            decoded = [self.vae.decode(z / self.scaling_factor, return_dict=False)[0] for z in lat]
            images = torch.cat(decoded)
        else:
            images = self.vae.decode(torch.cat(lat) / self.scaling_factor, return_dict=False)[0]
        arr = self.pipe.image_processor.postprocess(images, output_type="np")
        u8 = (arr * 255).round().astype(np.uint8)
        out: list[list[RGBArray]] = []
        i = 0
        for req in reqs:
            n = len(req.work.images)
            out.append([u8[j] for j in range(i, i + n)])
            i += n
        return out

    @torch.inference_mode()
    def preview(self, req: RequestState) -> RGBArray | None:
        if req.work is None or req.work.preview_x0 is None:
            return None
        x0, req.work.preview_x0 = req.work.preview_x0, None
        wgt, bias = self._latent_rgb
        rgb = torch.einsum("chw,cr->hwr", x0[0].float().cpu(), wgt) + bias
        return (rgb.clamp(0, 1) * 255).round().to(torch.uint8).numpy()

    @torch.inference_mode()
    def _fit_latent_rgb(self, factors: list[list[float]] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """A linear latent -> RGB map for previews (no VAE decode per preview).

        Uses factors from the model's settings if given, else fits them by least squares
        on the VAE's own encodings of flat color patches (a few milliseconds at load).
        """
        if factors is not None:
            m = torch.tensor(factors, dtype=torch.float32)
            return m[:-1], m[-1]
        g = torch.Generator().manual_seed(0)
        colors = torch.rand(8, 3, 4, 4, generator=g)
        imgs = F.interpolate(colors, scale_factor=16, mode="nearest")
        enc = self.vae.encode((imgs * 2 - 1).to(self.device, self.dtype)).latent_dist.mean
        lat = (enc * self.scaling_factor).float().cpu()
        target = F.interpolate(imgs, size=lat.shape[-2:], mode="area")
        x = lat.permute(0, 2, 3, 1).reshape(-1, lat.shape[1])
        x = torch.cat([x, torch.ones(len(x), 1)], dim=1)
        y = target.permute(0, 2, 3, 1).reshape(-1, 3)
        sol = torch.linalg.lstsq(x, y).solution
        return sol[:-1], sol[-1]

    def is_out_of_memory(self, exc: BaseException) -> bool:
        return isinstance(exc, torch.OutOfMemoryError) or super().is_out_of_memory(exc)

    def recover_from_oom(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
