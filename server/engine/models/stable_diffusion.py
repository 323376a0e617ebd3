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

import copy
import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from ..batch_invariance import make_rowwise_linears
from ..samplers import (
    GENERAL_SAMPLERS,
    KARRAS_SAMPLERS,
    SAMPLER_CLASSES,
    DiffusersSampler,
    SamplerFactory,
    sampler_for_class_name,
)
from ..types import ModelInfo, Preset, Sampler
from .base import Mark, ModelAdapter, RequestStepFailures
from .registry import ModelLoadError

if TYPE_CHECKING:
    from ..request import RequestState
    from ..types import RGBArray

logger = logging.getLogger(__name__)


class CudaMark:
    """A mark on a CUDA stream (an event with timing): the engine's view of GPU progress."""

    __slots__ = ("event",)

    def __init__(self, device: torch.device) -> None:
        self.event = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        self.event.record(torch.cuda.current_stream(device))

    def wait(self) -> None:
        self.event.synchronize()

    def seconds_since(self, start: Mark) -> float:
        assert isinstance(start, CudaMark)
        self.event.synchronize()
        return float(start.event.elapsed_time(self.event)) / 1000.0


# Optional per-model settings file a model directory may carry (keys of ModelInfo plus
# "latent_rgb_factors"); command-line overrides win over it.
SETTINGS_FILE = "stepserve.json"


@dataclass
class ImageState:
    """One image of a request: its own generator, sampler and latents."""

    seed: int
    generator: torch.Generator
    sampler: DiffusersSampler
    latents: torch.Tensor


@dataclass(frozen=True)
class Conditioning:
    """A text's encoding: cross-attention context, and (SDXL) the pooled embedding."""

    embeds: torch.Tensor  # 1 x tokens x width
    pooled: torch.Tensor | None = None  # 1 x projection width


# Extra UNet inputs of one forward row, by name: "timestep_cond", or SDXL's added conditioning
# "text_embeds" and "time_ids" (passed as added_cond_kwargs). Each is 1 x ...
RowExtras = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Row:
    """One row of a batched forward: input latents, timestep, text context, extra inputs."""

    x: torch.Tensor
    t: torch.Tensor
    context: torch.Tensor
    extras: RowExtras


@dataclass
class RequestWork:
    """A request's tensors."""

    images: list[ImageState]
    positive: Conditioning
    negative: Conditioning | None  # None: no classifier-free guidance
    guidance_scale: float
    extras: RowExtras  # for the positive row
    negative_extras: RowExtras
    # Per step, (sqrt(alpha_bar), sqrt(1 - alpha_bar)) at its timestep, on the host: the clean
    # estimate of a preview needs them without reading the device's timestep tensor.
    x0_coeffs: list[tuple[float, float]] = field(default_factory=list)
    preview_x0: torch.Tensor | None = None


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
    ) -> None:
        self.name = name
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
        self.latent_channels = int(self.unet.config.in_channels)
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
        settings.update(overrides or {})
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
        )
        if self.info.default_sampler not in samplers:
            raise ValueError(
                f"model {name}: default sampler {self.info.default_sampler.value} is not one of its own"
            )
        self._embed_cache: OrderedDict[str, Conditioning] = OrderedDict()
        self._embed_cache_size = embed_cache_size
        self._latent_rgb = self._fit_latent_rgb(settings.get("latent_rgb_factors"))
        self.preview_decoder = self._load_preview_decoder(settings.get("preview_decoder"))

    # -- prompts ------------------------------------------------------------------------
    def count_prompt_tokens(self, text: str) -> int:
        return len(self._count_tokenizer(text, add_special_tokens=False).input_ids)

    @torch.inference_mode()
    def _encode(self, texts: list[str]) -> list[Conditioning]:
        """Encodings of ``texts`` (cached, least recently used evicted), computed in one batch."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._embed_cache]
        if missing:
            for t, cond in zip(missing, self._encode_batch(missing), strict=True):
                self._embed_cache[t] = cond
        out = []
        for t in texts:
            self._embed_cache.move_to_end(t)
            out.append(self._embed_cache[t])
        while len(self._embed_cache) > self._embed_cache_size:
            self._embed_cache.popitem(last=False)
        return out

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
        return self._encode([req.params.negative_prompt])[0]

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
        positives = self._encode([r.params.prompt for r in reqs])
        for req, pos in zip(reqs, positives, strict=True):
            p = req.params
            neg = self._negative(req, pos) if p.cfg else None
            h, w = p.height // self.vae_scale_factor, p.width // self.vae_scale_factor
            images = []
            for seed in p.seeds:
                gen = torch.Generator(device=self.device).manual_seed(seed)
                sampler = self.sampler_factory.create(p.sampler, p.steps, p.karras)
                lat = randn_tensor(
                    (1, self.latent_channels, h, w), generator=gen, device=self.device, dtype=self.dtype
                )
                images.append(ImageState(seed, gen, sampler, lat * sampler.init_noise_sigma))
            req.work = RequestWork(
                images,
                pos,
                neg,
                p.guidance_scale,
                self._row_extras(req, pos),
                self._row_extras(req, neg) if neg is not None else {},
                self._x0_coeffs(images[0].sampler) if p.preview_every else [],
            )

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
            if self.batch_invariant and len(rows) == 1:
                rows = rows + rows  # a 1-row forward takes other conv kernels: pad to 2
            x = torch.cat([r.x for r in rows])
            t_all = torch.stack([r.t.to(torch.float32) for r in rows])
            extras = {k: torch.cat([r.extras[k] for r in rows]) for k in rows[0].extras}
            timestep_cond = extras.pop("timestep_cond", None)
            out = self.unet(
                x,
                t_all,
                encoder_hidden_states=torch.cat([r.context for r in rows]),
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
                    self._update(req, x[i : i + n], out[i : i + n])
                except Exception as e:
                    failures[req.request_id] = e
                i += n
        n_rows = sum(len(rr) for _, rr in inputs)
        if failures:
            raise RequestStepFailures(n_rows, failures)
        return n_rows

    def _step_inputs(self, req: RequestState[RequestWork]) -> list[Row]:
        """The request's rows of the batched forward: per image, (uncond, cond) with CFG."""
        w = _work(req)
        rows: list[Row] = []
        for im in w.images:
            t = im.sampler.timesteps[req.steps_done]
            x_in = im.sampler.scale_model_input(im.latents, t)
            if w.negative is not None:
                rows.append(Row(x_in, t, w.negative.embeds, w.negative_extras))
            rows.append(Row(x_in, t, w.positive.embeds, w.extras))
        return rows

    def _update(self, req: RequestState[RequestWork], x: torch.Tensor, out: torch.Tensor) -> None:
        """Apply guidance and advance each of the request's images one sampler step, given its
        rows of the forward's input and output. An exception here fails this request only."""
        w = _work(req)
        want_preview = req.preview_due()
        new_latents = []
        preview = None
        r = 0
        for i, im in enumerate(w.images):
            t = im.sampler.timesteps[req.steps_done]
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
            new_latents.append(
                im.sampler.step(noise, t, im.latents, generator=im.generator, return_dict=False)[0]
            )
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
        lat = torch.cat([im.latents for req in reqs for im in _work(req).images])
        images = self._evenly(lambda x: self.vae.decode(self._unscale(x), return_dict=False)[0], lat)
        # The pipeline's post-processing ("np" output, then x 255 and round), on the device:
        # only uint8 pixels cross to the host.
        pixels = self.pipe.image_processor.postprocess(images, output_type="pt")
        u8 = self._to_host((pixels.permute(0, 2, 3, 1).float() * 255).round().to(torch.uint8))
        out: list[list[RGBArray]] = []
        i = 0
        for req in reqs:
            n = len(_work(req).images)
            out.append([u8[j] for j in range(i, i + n)])
            i += n
        return out

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
