"""The Stable Diffusion family as ModelAdapters: SD 1.x/2.x (and the embedded ``tiny-shapes``
model), SDXL, and latent-consistency (LCM) distilled models.

Numerics follow each family's diffusers pipeline ``__call__`` step for step (prompt encoding,
latent initialisation, ``scale_model_input``, classifier-free guidance as
``uncond + g * (cond - uncond)`` or the guidance-scale embedding of distilled models, added
conditioning, the sampler's ``step``, VAE decode and post-processing), so a request's image matches
the reference pipeline run with the same seed, sampler, steps and guidance; the parity tests
hold each family to that.

One class per family; they differ only in what they load, how they encode prompts (SDXL: two
encoders, penultimate hidden states, a pooled embedding) and which extra per-row inputs the
UNet takes (SDXL: ``text_embeds`` and ``time_ids``; distilled models: ``timestep_cond``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from ..batch_invariance import make_rowwise_linears
from ..feature_cache import cached_forward, feature_cache_support
from ..lora import LoraAdapter, LoraContext, LoraLoadError, LoraStack, read_lora, wrap_targets
from ..quantization import QuantizationError, canonical, quantize_unet
from ..samplers import (
    GENERAL_SAMPLERS,
    KARRAS_SAMPLERS,
    SAMPLER_CLASSES,
    DiffusersSampler,
    SamplerFactory,
    sampler_for_class_name,
)
from ..types import ALL_TASKS, LoraInfo, ModelInfo, Preset, Sampler, Task
from .base import Mark, ModelAdapter, RequestStepFailures
from .registry import ModelLoadError
from .sd_state import Conditioning, CudaMark, ImageState, RequestWork, Row, RowExtras

if TYPE_CHECKING:
    from ..request import RequestState
    from ..types import RGBArray

logger = logging.getLogger(__name__)

# Optional per-model settings file a model directory may carry (keys of ModelInfo plus
# "latent_rgb_factors"); command-line overrides win over it.
SETTINGS_FILE = "stepserve.json"

# Feature caching: the largest interval a model offers unless its settings say otherwise,
# and the most any may (DeepCache's quality falls off well before).
DEFAULT_MAX_CACHE_INTERVAL = 10
MAX_CACHE_INTERVAL = 50


def _latents(im: ImageState) -> torch.Tensor:
    """An image's latents (drawn at prepare, or at encode_images for image inputs)."""
    if im.latents is None:
        raise RuntimeError(f"image of seed {im.seed} has no latents (its init image was not encoded)")
    return im.latents


def _work(req: RequestState[RequestWork]) -> RequestWork:
    """The request's tensors (set by ``prepare``, dropped by ``release``)."""
    if req.work is None:
        raise RuntimeError(f"request {req.request_id} has no tensors (not prepared, or released)")
    return req.work


class StableDiffusionAdapter(ModelAdapter[RequestWork]):
    """Runs a diffusers ``StableDiffusionPipeline`` directory one batched step at a time."""

    family = "stable-diffusion"
    pipeline_class = "StableDiffusionPipeline"

    def _load_pipeline(self, dtype: torch.dtype) -> Any:
        import diffusers

        cls = getattr(diffusers, self.pipeline_class)
        kwargs: dict[str, Any] = {}
        if "safety_checker" in cls._optional_components:
            kwargs = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
        return cls.from_pretrained(str(self.path), local_files_only=True, torch_dtype=dtype, **kwargs)

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
        pipeline_class: str | None = None,
        max_loras_resident: int = 64,
    ) -> None:
        self.name = name
        if pipeline_class is not None:  # the directory's own class (an inpainting pipeline)
            self.pipeline_class = pipeline_class
        self.path = Path(path)
        self.device = torch.device(device)
        self.asynchronous = self.device.type == "cuda"
        if dtype is None:
            dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.dtype = dtype
        self.pipe = self._load_pipeline(dtype).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.unet = self.pipe.unet.eval()
        self.vae = self.pipe.vae.eval()
        if dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False):
            self.vae.to(torch.float32)  # this VAE overflows in float16 (SDXL): decode in float32
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

        # diffusers calls the pipeline's sampler its "scheduler".
        base_config = self.pipe.scheduler.config
        self.sampler_factory = SamplerFactory(base_config, device=str(self.device))
        self.prediction_type = base_config.get("prediction_type", "epsilon")
        ref = SAMPLER_CLASSES[Sampler.DDIM].from_config(base_config)
        self._alphas_cumprod = ref.alphas_cumprod.double().cpu().numpy()
        self.vae_scale_factor = self.pipe.vae_scale_factor
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.latent_channels = int(self.vae.config.latent_channels)
        # Dedicated inpainting UNets take the mask and the masked image's latents as extra
        # input channels (4 + 1 + 4); they serve inpainting only.
        self.inpainting_unet = int(self.unet.config.in_channels) == 2 * self.latent_channels + 1
        if not self.inpainting_unet and int(self.unet.config.in_channels) != self.latent_channels:
            raise ModelLoadError(
                f"model {name}: its UNet takes {self.unet.config.in_channels} input channels; stepserve "
                f"serves UNets of {self.latent_channels} (the VAE's latents) or "
                f"{2 * self.latent_channels + 1} (inpainting)"
            )
        from diffusers.image_processor import VaeImageProcessor

        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor,
            do_normalize=False,
            do_binarize=True,
            do_convert_grayscale=True,
        )
        # Distilled models (LCM) take the guidance scale as an embedding and run no CFG.
        self.guidance_embed_dim: int | None = self.unet.config.get("time_cond_proj_dim")

        settings: dict[str, Any] = {}
        settings_path = self.path / SETTINGS_FILE
        if settings_path.exists():
            settings = json.loads(settings_path.read_text())
            # A preview decoder the model ships is named relative to the model directory
            # (a --model-option path is the operator's own, used as given).
            if settings.get("preview_decoder"):
                settings["preview_decoder"] = str(self.path / settings["preview_decoder"])
            # So are the LoRA adapters it ships ({"name": "relative path"}), registered at load.
            settings["loras"] = {n: str(self.path / p) for n, p in settings.get("loras", {}).items()}
        settings.update(overrides or {})
        # Before any LoRA adapter wraps a layer (they add float terms to the quantized base).
        self.quantization = self._quantize(name, str(settings.get("quantization", "none")))
        native = int(self.unet.config.sample_size) * self.vae_scale_factor
        default_sampler = settings.get("default_sampler")
        own_sampler = sampler_for_class_name(type(self.pipe.scheduler).__name__)
        samplers = (Sampler.LCM,) if own_sampler is Sampler.LCM else GENERAL_SAMPLERS
        default_steps = int(settings.get("default_steps", 30))
        max_steps = int(settings.get("max_steps", 150))
        presets = {
            Preset.DRAFT: max(1, round(default_steps * 0.4)),
            Preset.STANDARD: default_steps,
            Preset.HIGH: min(max_steps, default_steps * 2),
        }
        presets.update({Preset(k): int(v) for k, v in settings.get("presets", {}).items()})
        max_cache_interval, preset_cache_intervals = self._feature_cache_settings(name, settings)
        self.info = ModelInfo(
            name=name,
            family=self.family,
            default_width=int(settings.get("default_width", native)),
            default_height=int(settings.get("default_height", native)),
            default_steps=default_steps,
            default_guidance_scale=float(settings.get("default_guidance_scale", 7.5)),
            default_sampler=Sampler(default_sampler) if default_sampler else (own_sampler or Sampler.EULER),
            samplers=samplers,
            max_batch_size=max_batch_size,
            min_size=int(settings.get("min_size", 8 * self.vae_scale_factor)),
            max_size=int(settings.get("max_size", 2 * native)),
            max_steps=max_steps,
            max_images_per_request=min(max_batch_size, int(settings.get("max_images_per_request", 8))),
            max_prompt_tokens=int(self.tokenizer.model_max_length) - 2,
            preset_steps=presets,
            karras_samplers=tuple(k for k in KARRAS_SAMPLERS if k in samplers),
            guidance_embedded=self.guidance_embed_dim is not None,
            tasks=(Task.INPAINTING,) if self.inpainting_unet else ALL_TASKS,
            # LCM's img2img pipeline hands strength to the sampler's schedule.
            strength_sets_schedule=(
                int(base_config.get("original_inference_steps", 50)) if own_sampler is Sampler.LCM else None
            ),
            max_cache_interval=max_cache_interval,
            preset_cache_intervals=preset_cache_intervals,
            quantization=self.quantization,
        )
        if self.info.default_sampler not in samplers:
            raise ValueError(
                f"model {name}: default sampler {self.info.default_sampler.value} is not one of its own"
            )
        # Feature caching: per latent size, a cached row's share of a full row's work; rows
        # of cached forwards that computed / reused deep features (metrics).
        self._shallow_share: dict[tuple[int, int], float] = {}
        self._feature_rows = [0, 0]
        self._embed_cache: OrderedDict[tuple[str, LoraStack], Conditioning] = OrderedDict()
        # LoRA adapters: all registered ones on the host, the recently used on the device.
        self.loras: dict[str, LoraAdapter] = {}
        self._resident: OrderedDict[str, LoraAdapter] = OrderedDict()
        self.resident_loras: frozenset[str] = frozenset()
        self.max_loras_resident = max_loras_resident
        self.lora_loads = 0  # adapters copied to the device (resident misses)
        self._lora_context = LoraContext()
        self._embed_cache_size = embed_cache_size
        self._latent_rgb = self._fit_latent_rgb(settings.get("latent_rgb_factors"))
        self.preview_decoder = self._load_preview_decoder(settings.get("preview_decoder"))
        for lora_name, lora_path in settings.get("loras", {}).items():
            try:
                self.register_lora(lora_name, Path(lora_path))
            except LoraLoadError as e:
                raise ModelLoadError(f"model {name}: its own LoRA {lora_name!r}: {e}") from e

    def _quantize(self, name: str, mode: str) -> str:
        """Quantize the UNet as the model's ``quantization`` setting says; its canonical name."""
        try:
            mode = canonical(mode)
            if mode != "none":
                n = quantize_unet(self.unet, mode, self.device)
                logger.info("model %s: %d UNet linear layers quantized (%s)", name, n, mode)
        except QuantizationError as e:
            raise ModelLoadError(f"model {name}: quantization: {e}") from e
        return mode

    def _feature_cache_settings(self, name: str, settings: dict[str, Any]) -> tuple[int, dict[Preset, int]]:
        """(max_cache_interval, interval per preset) from the model's settings: by default
        up to DEFAULT_MAX_CACHE_INTERVAL where the UNet supports it, no preset caching."""
        why_not = feature_cache_support(self.unet)
        limit = int(settings.get("max_cache_interval", 0 if why_not else DEFAULT_MAX_CACHE_INTERVAL))
        if limit > 1 and why_not:
            raise ModelLoadError(f"model {name}: max_cache_interval {limit}: no feature caching, {why_not}")
        if not 0 <= limit <= MAX_CACHE_INTERVAL:
            raise ModelLoadError(
                f"model {name}: max_cache_interval {limit} is outside 0..{MAX_CACHE_INTERVAL}"
            )
        intervals = {Preset(k): int(v) for k, v in settings.get("cache_intervals", {}).items()}
        for preset, n in intervals.items():
            if n > 1 and n > limit:
                raise ModelLoadError(
                    f"model {name}: cache_intervals.{preset.value} {n} is more than its "
                    f"max_cache_interval {limit}"
                )
        return (limit if limit > 1 else 0), {p: n for p, n in intervals.items() if n > 1}

    # -- prompts ------------------------------------------------------------------------
    def count_prompt_tokens(self, text: str) -> int:
        return len(self._count_tokenizer(text, add_special_tokens=False).input_ids)

    @torch.inference_mode()
    def _encode(self, texts: list[str], stacks: list[LoraStack] | None = None) -> list[Conditioning]:
        """Encodings of ``texts``, each with its text-encoder adapters (``stacks``; none by
        default), cached by both (least recently used evicted), computed in one batch."""
        keys = list(zip(texts, stacks or [()] * len(texts), strict=True))
        missing = [k for k in dict.fromkeys(keys) if k not in self._embed_cache]
        if missing:
            with self._lora_plans(("text_encoder", "text_encoder_2"), [k[1] for k in missing]):
                encoded = self._encode_batch([k[0] for k in missing])
            for k, cond in zip(missing, encoded, strict=True):
                self._embed_cache[k] = cond
        out = []
        for k in keys:
            self._embed_cache.move_to_end(k)
            out.append(self._embed_cache[k])
        while len(self._embed_cache) > self._embed_cache_size:
            self._embed_cache.popitem(last=False)
        return out

    # -- LoRA adapters ---------------------------------------------------------------------
    def register_lora(self, name: str, path: Path) -> LoraAdapter:
        """Read the adapter at ``path``, check it against this model, wrap the layers it
        targets, and list it in ``info``. Raises ``LoraLoadError`` naming what does not fit."""
        components = {
            "unet": self.unet,
            "text_encoder": self.text_encoder,
            "text_encoder_2": getattr(self.pipe, "text_encoder_2", None),
        }
        adapter = read_lora(name, path, type(self.pipe), components)
        for component, layers in adapter.layers.items():
            model = components[component]
            assert model is not None
            wrap_targets(model, component, layers, self._lora_context)
        self.loras[name] = adapter
        infos = tuple(LoraInfo(n, a.rank, a.components) for n, a in sorted(self.loras.items()))
        self.info = dataclasses.replace(self.info, loras=infos)
        return adapter

    def lora_residency(self) -> tuple[int, int, int]:
        return (len(self.loras), len(self._resident), self.lora_loads)

    def _resident_lora(self, name: str) -> LoraAdapter:
        """The adapter's weights on the model's device and dtype (least recently used ones
        leave the device beyond ``max_loras_resident``)."""
        got = self._resident.get(name)
        if got is None:
            got = self.loras[name].to(self.device, self.dtype)
            self._resident[name] = got
            self.lora_loads += 1
            while len(self._resident) > self.max_loras_resident:
                _, gone = self._resident.popitem(last=False)
                self._lora_context.forget(gone)
            self.resident_loras = frozenset(self._resident)  # replaced whole: read by metrics
        self._resident.move_to_end(name)
        return got

    @contextlib.contextmanager
    def _lora_plans(self, components: tuple[str, ...], stacks: list[LoraStack]) -> Iterator[None]:
        """During the block, the wrapped layers of ``components`` add each row's adapters
        (row i: ``stacks[i]``); no plan when no row has any."""
        if not any(stacks):
            yield
            return
        adapters = {n: self._resident_lora(n) for stack in stacks for n, _ in stack}
        for c in components:
            self._lora_context.plans[c] = self._lora_context.plan(c, stacks, adapters)
        try:
            yield
        finally:
            self._lora_context.plans.clear()

    def _text_stack(self, req: RequestState[RequestWork]) -> LoraStack:
        """The request's adapters that change its prompt encoding."""
        return tuple(
            (n, s) for n, s in req.params.loras if any(c != "unet" for c in self.loras[n].components)
        )

    def _tokens(self, tokenizer: Any, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = tokenizer(
            texts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return enc.input_ids.to(self.device), enc.attention_mask.to(self.device)

    def _encode_batch(self, texts: list[str]) -> list[Conditioning]:
        """SD 1.x/2.x: the text encoder's last hidden state."""
        ids, attention = self._tokens(self.tokenizer, texts)
        mask = attention if getattr(self.text_encoder.config, "use_attention_mask", False) else None
        emb = self.text_encoder(ids, attention_mask=mask)[0].to(dtype=self.dtype)
        return [Conditioning(emb[i : i + 1]) for i in range(len(texts))]

    def _negative(self, req: RequestState[RequestWork], positive: Conditioning) -> Conditioning:
        """The unconditional side of classifier-free guidance: the negative prompt's encoding
        (the empty prompt's when there is none)."""
        return self._encode([req.params.negative_prompt], [self._text_stack(req)])[0]

    def _row_extras(self, req: RequestState[RequestWork], cond: Conditioning) -> RowExtras:
        """Extra UNet inputs of one of the request's rows with text conditioning ``cond``."""
        if self.guidance_embed_dim is None:
            return {}
        w = torch.tensor([req.params.guidance_scale - 1.0])
        emb = self.pipe.get_guidance_scale_embedding(w, embedding_dim=self.guidance_embed_dim)
        return {"timestep_cond": emb.to(self.device, self.dtype)}

    # -- engine operations ---------------------------------------------------------------
    @torch.inference_mode()
    def prepare(self, reqs: list[RequestState[RequestWork]]) -> None:
        positives = self._encode([r.params.prompt for r in reqs], [self._text_stack(r) for r in reqs])
        for req, pos in zip(reqs, positives, strict=True):
            p = req.params
            neg = self._negative(req, pos) if p.cfg else None
            h, w = p.height // self.vae_scale_factor, p.width // self.vae_scale_factor
            # LCM's img2img pipeline draws its schedule for the strength; the others truncate.
            strength = (
                p.strength if self.info.strength_sets_schedule and p.task is Task.IMAGE_TO_IMAGE else 1.0
            )
            images = []
            for seed in p.seeds:
                gen = torch.Generator(device=self.device).manual_seed(seed)
                sampler = self.sampler_factory.create(p.sampler, p.steps, p.karras, strength)
                lat = None
                if p.init_image is None:
                    lat = randn_tensor(
                        (1, self.latent_channels, h, w), generator=gen, device=self.device, dtype=self.dtype
                    )
                    lat = lat * sampler.init_noise_sigma
                elif hasattr(sampler, "set_begin_index"):
                    sampler.set_begin_index(p.first_step)  # as the pipelines' get_timesteps
                images.append(ImageState(seed, gen, sampler, lat))
            req.work = RequestWork(
                images,
                pos,
                neg,
                p.guidance_scale,
                self._row_extras(req, pos),
                self._row_extras(req, neg) if neg is not None else {},
                p.first_step,
                self._x0_coeffs(images[0].sampler)[p.first_step :] if p.preview_every else [],
            )

    @torch.inference_mode()
    def encode_images(self, reqs: list[RequestState[RequestWork]]) -> None:
        """The init images (and masked images) of prepared image-to-image and inpainting
        requests, encoded by the VAE in one batch, and each image's starting latents drawn
        from its own generator in the order diffusers' pipelines draw them: the init image's
        latent sample, the noise, then (inpainting) the masked image's latent sample."""
        pixels: list[torch.Tensor] = []
        for req in reqs:
            p = req.params
            assert p.init_image is not None
            init = self._pixels(p.init_image)
            pixels.append(init)
            if p.mask is not None:
                mask = self.mask_processor.preprocess(Image.fromarray(p.mask), height=p.height, width=p.width)
                mask = mask.to(self.device)
                pixels.append(init * (mask < 0.5))  # the masked image, as diffusers makes it
                latent_size = (p.height // self.vae_scale_factor, p.width // self.vae_scale_factor)
                _work(req).mask = F.interpolate(mask, size=latent_size).to(self.device, self.dtype)
        dists = self._evenly_encode(torch.cat(pixels))
        k = 0
        for req in reqs:
            p = req.params
            w = _work(req)
            init_dist = dists[k]
            masked_dist = dists[k + 1] if p.mask is not None else None
            k += 2 if p.mask is not None else 1
            inpaint = p.task is Task.INPAINTING
            # Strength 1 inpainting starts from pure noise (diffusers' is_strength_max).
            from_noise = inpaint and p.strength == 1.0
            for im in w.images:
                t0 = im.sampler.timesteps[w.first_step : w.first_step + 1]
                image_latents = None
                if not (inpaint and self.inpainting_unet and from_noise):
                    image_latents = self._sample(init_dist, im.generator)
                noise = randn_tensor(
                    init_dist[0].shape, generator=im.generator, device=self.device, dtype=self.dtype
                )
                if from_noise:
                    im.latents = noise * im.sampler.init_noise_sigma
                else:
                    assert image_latents is not None
                    im.latents = im.sampler.add_noise(image_latents, noise, t0)
                if masked_dist is not None:
                    masked = self._sample(masked_dist, im.generator)
                    if self.inpainting_unet:
                        im.masked_latents = masked
                    else:
                        im.image_latents, im.noise = image_latents, noise

    def _pixels(self, rgb: np.ndarray) -> torch.Tensor:
        """An H x W x 3 uint8 image as the VAE's input, through the pipeline's own image
        processor (to [-1, 1], 1 x 3 x H x W)."""
        t: torch.Tensor = self.pipe.image_processor.preprocess(Image.fromarray(rgb))
        return t.to(self.device, torch.float32)

    def _evenly_encode(self, pixels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image: the VAE posterior's (mean, std), from one batched encode (padded to an
        even batch like decode, so an image's latents do not depend on its batch)."""
        params = self._evenly(lambda x: self.vae.encode(x.to(self.vae.dtype)).latent_dist.parameters, pixels)
        out = []
        for row in torch.split(params, 1):
            dist = DiagonalGaussianDistribution(row)
            out.append((dist.mean, dist.std))
        return out

    def _sample(self, dist: tuple[torch.Tensor, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """A latent sample of an encoded image drawn from ``generator``, scaled as the
        pipelines scale encoded latents (``DiagonalGaussianDistribution.sample``, then the
        scaling factor, and SDXL-style mean/std when the VAE has them)."""
        mean, std = dist
        eps = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        # Contiguous: the encoder's output may be channels-last, and a forward of only such
        # rows would take other convolution kernels than a mixed one (other bits).
        return self._scale(mean + std * eps).contiguous()

    def _scale(self, z: torch.Tensor) -> torch.Tensor:
        """VAE encoder output -> latents (the inverse of ``_unscale``)."""
        mean, std = self.vae.config.get("latents_mean"), self.vae.config.get("latents_std")
        if mean is not None and std is not None:
            m = torch.tensor(mean).view(1, -1, 1, 1).to(z)
            s = torch.tensor(std).view(1, -1, 1, 1).to(z)
            return ((z - m) * self.scaling_factor / s).to(self.dtype)
        return (z * self.scaling_factor).to(self.dtype)

    @torch.inference_mode()
    def denoise_step(self, reqs: list[RequestState[RequestWork]]) -> int:
        failures: dict[str, BaseException] = {}
        # 1. Each request's model inputs (no state changes besides the samplers' idempotent
        # step-index initialisation), so a failed forward can be retried.
        inputs: list[tuple[RequestState[RequestWork], list[Row]]] = []
        for req in reqs:
            try:
                inputs.append((req, self._step_inputs(req)))
            except Exception as e:
                failures[req.request_id] = e
        rows = [row for _, rr in inputs for row in rr]
        if rows:
            # 2. One batched forward for everyone (a failure here fails the whole call).
            self.faults.before_forward([r for r, _ in inputs], len(rows))
            stacks = [r.loras for r in rows]
            if self.batch_invariant and len(rows) == 1:
                rows = rows + rows  # a 1-row forward takes other conv kernels: pad to 2
                stacks = stacks + stacks
            x = torch.cat([r.x for r in rows]).contiguous(memory_format=torch.contiguous_format)
            t_all = torch.stack([r.t.to(torch.float32) for r in rows])
            extras = {k: torch.cat([r.extras[k] for r in rows]) for k in rows[0].extras}
            timestep_cond = extras.pop("timestep_cond", None)
            context = torch.cat([r.context for r in rows])
            deep: list[torch.Tensor | None] = []
            if any(r.caching for r in rows):
                size = (reqs[0].params.height, reqs[0].params.width)
                # Rows that reuse their request's deep feature skip the UNet's middle.
                cached = cached_forward(
                    self.unet,
                    x,
                    t_all,
                    context,
                    reuse=[r.reuse for r in rows],
                    timestep_cond=timestep_cond,
                    added_cond_kwargs=extras or None,
                    plan_for=lambda idx: self._lora_plans(("unet",), [stacks[i] for i in idx]),
                    pad_single=self.batch_invariant,
                    count_flops=size not in self._shallow_share,
                )
                out, deep = cached.sample, cached.deep
                reused = sum(r.reuse is not None for r in rows)
                self._feature_rows[0] += len(rows) - reused
                self._feature_rows[1] += reused
                if cached.flops is not None:
                    shallow, middle = cached.flops
                    self._shallow_share[size] = shallow / (shallow + middle)
            else:
                with self._lora_plans(("unet",), stacks):
                    out = self.unet(
                        x,
                        t_all,
                        encoder_hidden_states=context,
                        timestep_cond=timestep_cond,
                        added_cond_kwargs=extras or None,
                        return_dict=False,
                    )[0]
            # 3. Each request's own update: guidance, sampler step, preview estimate.
            i = 0
            for req, rr in inputs:
                n = len(rr)
                try:
                    self.faults.before_request_update(req)
                    self._update(req, x[i : i + n, : self.latent_channels], out[i : i + n], deep[i : i + n])
                except Exception as e:
                    failures[req.request_id] = e
                i += n
        n_rows = sum(len(rr) for _, rr in inputs)
        if failures:
            raise RequestStepFailures(n_rows, failures)
        return n_rows

    def _step_inputs(self, req: RequestState[RequestWork]) -> list[Row]:
        """The request's rows of the batched forward: per image, (uncond, cond) with CFG; an
        inpainting UNet's rows carry the mask and the masked image's latents too."""
        w = _work(req)
        caching = req.params.cache_interval > 1
        rows: list[Row] = []
        for im in w.images:
            t = w.timestep(im, req.steps_done)
            x_in = im.sampler.scale_model_input(_latents(im), t)
            if self.inpainting_unet:
                assert w.mask is not None and im.masked_latents is not None
                x_in = torch.cat([x_in, w.mask, im.masked_latents], dim=1)
            stack = req.params.loras
            reuse = None if self._refreshes(req, im) else im.deep
            if w.negative is not None:
                r_neg = None if reuse is None else reuse[:1]
                rows.append(Row(x_in, t, w.negative.embeds, w.negative_extras, stack, r_neg, caching))
                reuse = None if reuse is None else reuse[1:]
            rows.append(Row(x_in, t, w.positive.embeds, w.extras, stack, reuse, caching))
        return rows

    def _refreshes(self, req: RequestState[RequestWork], im: ImageState) -> bool:
        """Whether the request's next step computes its deep features (every step without
        feature caching; every cache_interval-th, counted from its first, with it)."""
        n = req.params.cache_interval
        return n <= 1 or im.deep is None or req.steps_done % n == 0

    def row_costs(self, reqs: list[RequestState[RequestWork]]) -> list[float]:
        costs = []
        for req in reqs:
            w = req.work
            rows = float(req.params.rows)
            if w is not None and w.images and not self._refreshes(req, w.images[0]):
                rows *= self._cached_row_share(req.params.height, req.params.width)
            costs.append(rows)
        return costs

    def feature_cache_rows(self) -> tuple[int, int]:
        return self._feature_rows[0], self._feature_rows[1]

    def _cached_row_share(self, height: int, width: int) -> float:
        """A row that reuses its deep feature, as a share of a full row's work at this image
        size (FLOPs, counted in the first cached forward of the size: every caching request's
        first step computes its features, so the share is known before any row reuses)."""
        return self._shallow_share.get((height, width), 1.0)

    def _update(
        self,
        req: RequestState[RequestWork],
        x: torch.Tensor,
        out: torch.Tensor,
        deep: list[torch.Tensor | None],
    ) -> None:
        """Apply guidance and advance each of the request's images one sampler step, given its
        rows of the forward's input (latent channels) and output, and of the deep features
        the forward computed (feature caching; empty without it). An exception here fails
        this request only."""
        w = _work(req)
        if req.params.cache_interval > 1 and deep and deep[0] is not None:
            per_image = len(deep) // len(w.images)
            for k, im in enumerate(w.images):
                im.deep = torch.cat(deep[k * per_image : (k + 1) * per_image])  # type: ignore[arg-type]
        want_preview = req.preview_due()
        last = req.steps_done == req.total_steps - 1
        new_latents = []
        preview = None
        r = 0
        for i, im in enumerate(w.images):
            t = w.timestep(im, req.steps_done)
            if w.negative is not None:
                uncond, cond = out[r : r + 1], out[r + 1 : r + 2]
                noise = uncond + w.guidance_scale * (cond - uncond)
                x_in = x[r : r + 1]
                r += 2
            else:
                noise = out[r : r + 1]
                x_in = x[r : r + 1]
                r += 1
            if want_preview and i == 0:
                preview = self._x0_estimate(x_in, noise, *w.x0_coeffs[req.steps_done])
                if im.image_latents is not None and w.mask is not None:
                    preview = w.mask * preview + (1 - w.mask) * im.image_latents  # the kept region
            lat = im.sampler.step(noise, t, im.latents, generator=im.generator, return_dict=False)[0]
            if im.image_latents is not None and w.mask is not None:
                # An ordinary UNet inpainting: the known region, re-noised to the next step's
                # level (clean after the last), replaces the model's there.
                known = im.image_latents
                if not last:
                    t_next = im.sampler.timesteps[w.first_step + req.steps_done + 1]
                    known = im.sampler.add_noise(known, im.noise, t_next.reshape(1))
                lat = (1 - w.mask) * known + w.mask * lat
            new_latents.append(lat)
        for im, lat in zip(w.images, new_latents, strict=True):
            im.latents = lat
        if preview is not None:
            w.preview_x0 = preview

    def _x0_coeffs(self, sampler: DiffusersSampler) -> list[tuple[float, float]]:
        """(sqrt(alpha_bar), sqrt(1 - alpha_bar)) at each of a sampler's timesteps (one host
        copy of the timesteps at admission, none per step)."""
        ts = sampler.timesteps.detach().double().cpu().numpy()
        ab = np.interp(ts, np.arange(len(self._alphas_cumprod)), self._alphas_cumprod)
        return [(float(a) ** 0.5, (1.0 - float(a)) ** 0.5) for a in ab]

    def _x0_estimate(self, x_in: torch.Tensor, model_out: torch.Tensor, a: float, s: float) -> torch.Tensor:
        """The model's current estimate of the clean latents (x_in is the DDPM-scaled x_t,
        a and s the step's sqrt(alpha_bar) and sqrt(1 - alpha_bar))."""
        if self.prediction_type == "v_prediction":
            out: torch.Tensor = a * x_in - s * model_out
        elif self.prediction_type == "epsilon":
            out = (x_in - s * model_out) / a
        else:
            out = model_out
        return out

    def _unscale(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> the VAE decoder's input (scaling factor, and SDXL-style mean/std if set)."""
        z = z.to(self.vae.dtype)
        mean, std = self.vae.config.get("latents_mean"), self.vae.config.get("latents_std")
        if mean is not None and std is not None:
            m = torch.tensor(mean).view(1, -1, 1, 1).to(z)
            s = torch.tensor(std).view(1, -1, 1, 1).to(z)
            return z * s / self.scaling_factor + m
        return z / self.scaling_factor

    def _evenly(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``fn`` (a convolutional decoder) over the batch ``x``, each row's output independent
        of the batch's size: on CPU these kernels give a row the same bits in every even-sized
        batch, but not in odd ones (batch 1 included), so an odd batch is padded with a copy
        of its last row, dropped after."""
        n = len(x)
        if self.batch_invariant and n % 2:
            x = torch.cat([x, x[-1:]])
        return fn(x)[:n]

    @torch.inference_mode()
    def decode(self, reqs: list[RequestState[RequestWork]]) -> list[list[RGBArray]]:
        lat = torch.cat([_latents(im) for req in reqs for im in _work(req).images])
        images = self._evenly(lambda x: self.vae.decode(self._unscale(x), return_dict=False)[0], lat)
        # The pipeline's post-processing ("np" output, then x 255 and round), on the device:
        # only uint8 pixels cross to the host.
        pixels = self.pipe.image_processor.postprocess(images, output_type="pt")
        i = 0
        for req in reqs:
            n = len(_work(req).images)
            if req.params.preserve_unmasked:
                pixels[i : i + n] = self._overlay(req, pixels[i : i + n])
            i += n
        u8 = self._to_host((pixels.permute(0, 2, 3, 1).float() * 255).round().to(torch.uint8))
        out: list[list[RGBArray]] = []
        i = 0
        for req in reqs:
            n = len(_work(req).images)
            out.append([u8[j] for j in range(i, i + n)])
            i += n
        return out

    def _overlay(self, req: RequestState[RequestWork], pixels: torch.Tensor) -> torch.Tensor:
        """The init image's pixels pasted back where the mask keeps them (as diffusers'
        ``apply_overlay`` and A1111's "only masked" do), blended across a feathered edge: the
        binarised mask box-blurred over 2 * feather + 1 pixels, so pixels farther than
        ``feather`` from the repainted region are the init image's exactly."""
        p = req.params
        assert p.init_image is not None and p.mask is not None
        init = torch.from_numpy(p.init_image).to(self.device).permute(2, 0, 1)[None].float() / 255.0
        repaint = (torch.from_numpy(p.mask).to(self.device) >= 128).float()[None, None]
        if p.mask_feather > 0:
            k = 2 * p.mask_feather + 1
            repaint = F.avg_pool2d(repaint, k, stride=1, padding=p.mask_feather, count_include_pad=False)
        out: torch.Tensor = pixels.float() * repaint + init * (1 - repaint)
        return out.to(pixels.dtype)

    @torch.inference_mode()
    def previews(self, reqs: list[RequestState[RequestWork]]) -> list[RGBArray | None]:
        """Projected on the device and copied to the host in one transfer: one wait for the
        device per step, not one per previewing request (``reqs`` is one bucket: one size)."""
        out: list[RGBArray | None] = [None] * len(reqs)
        works = [r.work for r in reqs]
        due = [i for i, w in enumerate(works) if w is not None and w.preview_x0 is not None]
        if not due:
            return out
        estimates = []
        for i in due:
            w = _work(reqs[i])
            x0, w.preview_x0 = w.preview_x0, None
            assert x0 is not None
            estimates.append(x0)
        host = self._to_host(self._preview_rgb(torch.cat(estimates)))
        for k, i in enumerate(due):
            out[i] = host[k]
        return out

    def _preview_rgb(self, x0: torch.Tensor) -> torch.Tensor:
        """N x H x W x 3 uint8 previews of clean-latent estimates (N x C x h x w): through the
        tiny preview decoder when the model has one (full size, readable colours and shapes),
        else the linear latent -> RGB map (latent size, a few operations)."""
        if self.preview_decoder is not None:
            decoder = self.preview_decoder
            # diffusers' convention for AutoencoderTiny: the pipeline's latents over its
            # scaling factor (1 for TAESD, which reads SD's scaled latents), output in [-1, 1].
            scaled = x0.to(decoder.dtype) / decoder.config.scaling_factor
            images = self._evenly(lambda x: decoder.decode(x).sample, scaled)
            return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
        wgt, bias = self._latent_rgb
        p = torch.einsum("nchw,cr->nhwr", x0.float(), wgt) + bias
        return (p.clamp(0, 1) * 255).round().to(torch.uint8)

    def _load_preview_decoder(self, path: str | None) -> Any:
        """diffusers' ``AutoencoderTiny`` (TAESD, as ComfyUI and A1111 preview with) from a
        local directory, for previews; None (or an empty option, to turn a model's own
        decoder off): the linear map."""
        if not path:
            return None
        from diffusers import AutoencoderTiny

        if not (Path(path) / "config.json").is_file():
            raise ModelLoadError(
                f"model {self.name}: preview decoder {str(path)!r} is not a diffusers AutoencoderTiny "
                "directory (no config.json)"
            )
        decoder = AutoencoderTiny.from_pretrained(  # type: ignore[no-untyped-call]
            str(path), local_files_only=True, torch_dtype=self.dtype
        )
        return decoder.to(self.device).eval()

    @torch.inference_mode()
    def _fit_latent_rgb(self, factors: list[list[float]] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """A linear latent -> RGB map for previews (no VAE decode per preview).

        Uses factors from the model's settings if given, else fits them by least squares
        on the VAE's own encodings of flat color patches (a few milliseconds at load).
        """
        if factors is not None:
            m = torch.tensor(factors, dtype=torch.float32, device=self.device)
            return m[:-1], m[-1]
        g = torch.Generator().manual_seed(0)
        colors = torch.rand(8, 3, 4, 4, generator=g)
        imgs = F.interpolate(colors, scale_factor=16, mode="nearest")
        enc = self.vae.encode((imgs * 2 - 1).to(self.device, self.vae.dtype)).latent_dist.mean
        lat = (enc * self.scaling_factor).float().cpu()
        target = F.interpolate(imgs, size=lat.shape[-2:], mode="area")
        x = lat.permute(0, 2, 3, 1).reshape(-1, lat.shape[1])
        x = torch.cat([x, torch.ones(len(x), 1)], dim=1)
        y = target.permute(0, 2, 3, 1).reshape(-1, 3)
        sol = torch.linalg.lstsq(x, y).solution
        return sol[:-1].to(self.device), sol[-1].to(self.device)

    def is_out_of_memory(self, exc: BaseException) -> bool:
        return isinstance(exc, torch.OutOfMemoryError) or super().is_out_of_memory(exc)

    def recover_from_oom(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def mark(self) -> Mark:
        return CudaMark(self.device) if self.asynchronous else super().mark()

    def _to_host(self, t: torch.Tensor) -> np.ndarray:
        """``t`` as a host array; from a GPU, copied asynchronously into pinned memory (filled
        when a mark taken after this call is reached), so the engine does not wait here."""
        t = t.contiguous()
        if t.device.type == "cpu":
            return t.numpy()
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host.numpy()


class StableDiffusionXLAdapter(StableDiffusionAdapter):
    """SDXL (``StableDiffusionXLPipeline``): two text encoders and size conditioning."""

    family = "stable-diffusion-xl"
    pipeline_class = "StableDiffusionXLPipeline"

    def _encode_batch(self, texts: list[str]) -> list[Conditioning]:
        """Both encoders' penultimate hidden states, concatenated; the pooled embedding from
        the second (projection) encoder, as ``StableDiffusionXLPipeline.encode_prompt``."""
        hidden = []
        pooled = None
        for tokenizer, encoder in (
            (self.tokenizer, self.text_encoder),
            (self.pipe.tokenizer_2, self.pipe.text_encoder_2),
        ):
            if encoder is None:
                continue
            ids, _ = self._tokens(tokenizer, texts)
            out = encoder(ids, output_hidden_states=True)
            if out[0].ndim == 2:
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        emb = torch.cat(hidden, dim=-1).to(self.dtype)
        assert pooled is not None, "SDXL needs a projection text encoder for the pooled embedding"
        pooled = pooled.to(self.dtype)
        return [Conditioning(emb[i : i + 1], pooled[i : i + 1]) for i in range(len(texts))]

    def _negative(self, req: RequestState[RequestWork], positive: Conditioning) -> Conditioning:
        # As the reference: no negative prompt means zeros, for models configured so.
        if not req.params.negative_prompt and self.pipe.config.get("force_zeros_for_empty_prompt", True):
            assert positive.pooled is not None
            return Conditioning(torch.zeros_like(positive.embeds), torch.zeros_like(positive.pooled))
        return super()._negative(req, positive)

    def _row_extras(self, req: RequestState[RequestWork], cond: Conditioning) -> RowExtras:
        p = req.params
        # original size, crop top-left, target size: the image as asked for, uncropped.
        time_ids = torch.tensor(
            [[p.height, p.width, 0, 0, p.height, p.width]], device=self.device, dtype=self.dtype
        )
        assert cond.pooled is not None
        return {**super()._row_extras(req, cond), "text_embeds": cond.pooled, "time_ids": time_ids}


class LatentConsistencyAdapter(StableDiffusionAdapter):
    """LCM-distilled Stable Diffusion (``LatentConsistencyModelPipeline``): few steps with the
    LCM sampler, guidance as an input embedding instead of classifier-free guidance."""

    family = "latent-consistency"
    pipeline_class = "LatentConsistencyModelPipeline"
