"""Validate a ``GenerateRequest`` and map it to the engine's ``GenerationParams``.

Every field is checked against the model's limits and the server's configuration; all
violations are collected so the caller learns about every bad field at once. Defaults
(0 / unset / ``_UNSPECIFIED``) are resolved here, explicitly, and nowhere else.
"""

from __future__ import annotations

import math
import re
import secrets
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from stepserve.v1 import image_generation_pb2 as pb

from ..engine.types import GenerationParams, ImageFormat, ModelInfo, Preset, Priority, Sampler, Task
from .errors import ApiError, FieldViolation, invalid_argument, not_found
from .image_inputs import ImageHeader, probe

SAMPLER_FROM_PROTO: dict[int, Sampler] = {
    pb.SAMPLER_EULER: Sampler.EULER,
    pb.SAMPLER_EULER_ANCESTRAL: Sampler.EULER_ANCESTRAL,
    pb.SAMPLER_DDIM: Sampler.DDIM,
    pb.SAMPLER_DPM_SOLVER_MULTISTEP: Sampler.DPM_SOLVER_MULTISTEP,
    pb.SAMPLER_LCM: Sampler.LCM,
}
PRESET_FROM_PROTO: dict[int, Preset] = {
    pb.PRESET_DRAFT: Preset.DRAFT,
    pb.PRESET_STANDARD: Preset.STANDARD,
    pb.PRESET_HIGH: Preset.HIGH,
}
PRESET_TO_PROTO = {v: k for k, v in PRESET_FROM_PROTO.items()}
SAMPLER_TO_PROTO = {v: k for k, v in SAMPLER_FROM_PROTO.items()}
FORMAT_FROM_PROTO: dict[int, ImageFormat] = {
    pb.IMAGE_FORMAT_UNSPECIFIED: ImageFormat.PNG,
    pb.IMAGE_FORMAT_PNG: ImageFormat.PNG,
    pb.IMAGE_FORMAT_JPEG: ImageFormat.JPEG,
    pb.IMAGE_FORMAT_WEBP: ImageFormat.WEBP,
}
FORMAT_TO_PROTO = {
    ImageFormat.PNG: pb.IMAGE_FORMAT_PNG,
    ImageFormat.JPEG: pb.IMAGE_FORMAT_JPEG,
    ImageFormat.WEBP: pb.IMAGE_FORMAT_WEBP,
}
TASK_TO_PROTO = {
    Task.TEXT_TO_IMAGE: pb.TASK_TEXT_TO_IMAGE,
    Task.IMAGE_TO_IMAGE: pb.TASK_IMAGE_TO_IMAGE,
    Task.INPAINTING: pb.TASK_INPAINTING,
}
_TASK_NAMES = {
    Task.TEXT_TO_IMAGE: "text-to-image",
    Task.IMAGE_TO_IMAGE: "image-to-image",
    Task.INPAINTING: "inpainting",
}
# GenerateRequest.strength when an init image comes without one (diffusers' img2img default).
DEFAULT_STRENGTH = 0.8
DEFAULT_MASK_FEATHER_PX = 4
MAX_MASK_FEATHER_PX = 64
PRIORITY_FROM_PROTO: dict[int, Priority] = {
    pb.PRIORITY_UNSPECIFIED: Priority.INTERACTIVE,
    pb.PRIORITY_INTERACTIVE: Priority.INTERACTIVE,
    pb.PRIORITY_BATCH: Priority.BATCH,
}
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/@+=-]{1,128}$")


@dataclass(frozen=True)
class Limits:
    """Server-wide request limits (the model's own limits live in ModelInfo)."""

    # Largest width * height * steps * num_images one request may ask for (--max-work).
    max_work: int
    # Largest preview_max_size_px accepted.
    max_preview_size: int = 1024
    # Preview size used when a request leaves preview_max_size_px at 0.
    default_preview_size: int = 256
    # Largest accepted |guidance_scale|.
    max_guidance_scale: float = 30.0
    # Longest accepted prompt or negative prompt, in characters (token limits are per model).
    max_prompt_chars: int = 4096
    # Most pixels an init image or mask may have, read from its header before decoding
    # (--max-image-pixels).
    max_image_pixels: int = 4096 * 4096


def validate_generate(
    req: pb.GenerateRequest,
    models: Mapping[str, ModelInfo],
    default_model: str,
    limits: Limits,
    count_tokens: Callable[[str, str], int],
    deadline: float | None = None,
) -> GenerationParams:
    """The request as engine parameters, or an :class:`ApiError` naming what is wrong."""
    name = req.model or default_model
    info = models.get(name)
    if info is None:
        known = ", ".join(sorted(models))
        raise not_found("model", name, f"model {name!r} is not served here (available: {known})")

    bad: list[FieldViolation] = []

    def check(ok: bool, field: str, description: str) -> None:
        if not ok:
            bad.append(FieldViolation(field, description))

    for field, text in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt)):
        if len(text) > limits.max_prompt_chars:
            check(False, field, f"is {len(text)} characters long; the limit is {limits.max_prompt_chars}")
            continue
        if text:
            n = count_tokens(name, text)
            check(
                n <= info.max_prompt_tokens,
                field,
                f"is {n} tokens long; model {name!r} reads at most {info.max_prompt_tokens}",
            )
    check(bool(req.prompt.strip()), "prompt", "must not be empty")

    task, init, mask = _image_inputs(req, limits, bad)
    if task not in info.tasks:
        served = " and ".join(_TASK_NAMES[t] for t in info.tasks)
        field = {Task.TEXT_TO_IMAGE: "init_image", Task.IMAGE_TO_IMAGE: "mask_image"}.get(task, "mask_image")
        check(False, field, f"model {name!r} serves {served} only; this request is {_TASK_NAMES[task]}")

    # The output takes the init image's size (rounded down to the size multiple) unless set.
    width = req.width_px or (init.width - init.width % info.size_multiple if init else info.default_width)
    height = req.height_px or (
        init.height - init.height % info.size_multiple if init else info.default_height
    )
    for field, v, explicit in (("width_px", width, req.width_px), ("height_px", height, req.height_px)):
        where = field if explicit or init is None else "init_image"
        what = f"{v}" if where == field else f"its {field[:-3]} ({v} after rounding down to a multiple of 8)"
        if v % info.size_multiple:
            check(False, where, f"{what} is not a multiple of {info.size_multiple}")
        elif not info.min_size <= v <= info.max_size:
            hint = "" if where == field else "; set width_px and height_px to resize it"
            check(
                False,
                where,
                f"{what} is outside model {name!r}'s range {info.min_size}..{info.max_size}{hint}",
            )

    steps = req.steps or info.default_steps
    cache_interval = 0
    if req.preset != pb.PRESET_UNSPECIFIED:
        preset = PRESET_FROM_PROTO.get(req.preset)
        if preset is None:
            check(False, "preset", f"{req.preset} is not a known Preset value")
        else:
            cache_interval = info.preset_cache_intervals.get(preset, 0)
            if not req.steps:  # explicit steps win over a preset
                steps = info.preset_steps.get(preset, steps)
    if req.HasField("cache_interval"):
        cache_interval = req.cache_interval
        if not info.max_cache_interval and cache_interval > 1:
            check(False, "cache_interval", f"model {name!r} does not offer feature caching (0 or 1 only)")
        else:
            check(
                cache_interval <= info.max_cache_interval,
                "cache_interval",
                f"{cache_interval} is more than model {name!r}'s limit of {info.max_cache_interval}",
            )
    cache_interval = cache_interval if cache_interval > 1 else 0
    check(steps <= info.max_steps, "steps", f"{steps} is more than the limit of {info.max_steps}")

    guidance = info.default_guidance_scale
    if req.HasField("guidance_scale"):
        guidance = float(req.guidance_scale)
        check(
            math.isfinite(guidance) and 0.0 <= guidance <= limits.max_guidance_scale,
            "guidance_scale",
            f"{guidance} is outside 0..{limits.max_guidance_scale}",
        )

    seed = req.seed if req.HasField("seed") else secrets.randbelow(1 << 32)

    sampler = info.default_sampler
    if req.sampler != pb.SAMPLER_UNSPECIFIED:
        chosen = SAMPLER_FROM_PROTO.get(req.sampler)
        if chosen is None:
            check(False, "sampler", f"{req.sampler} is not a known Sampler value")
        elif chosen not in info.samplers:
            check(False, "sampler", f"{pb.Sampler.Name(req.sampler)} is not supported by model {name!r}")
        else:
            sampler = chosen
    if req.karras_sigmas and sampler not in info.karras_samplers:
        names = ", ".join(s.value for s in info.karras_samplers) or "none"
        check(
            False,
            "karras_sigmas",
            f"sampler {sampler.value} has no Karras schedule (samplers with one: {names})",
        )

    strength = 1.0
    if req.HasField("strength"):
        strength = float(req.strength)
        if task is Task.TEXT_TO_IMAGE:
            check(False, "strength", "applies only with an init_image")
        elif not (math.isfinite(strength) and 0.0 < strength <= 1.0):
            check(False, "strength", f"{strength} is outside (0, 1]")
        strength = round(strength, 6)  # a float32 0.7 is 0.7, as the caller meant
    elif task is not Task.TEXT_TO_IMAGE:
        strength = DEFAULT_STRENGTH
    strength_ok = math.isfinite(strength) and 0.0 < strength <= 1.0
    first_step, steps_run = info.schedule(steps, strength if strength_ok else 1.0, task)
    if task is not Task.TEXT_TO_IMAGE and strength_ok and steps_run == 0:
        if info.strength_sets_schedule is not None and task is Task.IMAGE_TO_IMAGE:
            need = steps / info.strength_sets_schedule
            check(
                False,
                "strength",
                f"{strength} leaves fewer than {steps} of model {name!r}'s {info.strength_sets_schedule} "
                f"original steps; with {steps} steps it must be at least {need:.4g}",
            )
        else:
            check(False, "strength", f"{strength} runs no step of {steps} (int(steps * strength) = 0)")

    check(
        req.preserve_unmasked is False or task is Task.INPAINTING,
        "preserve_unmasked",
        "applies only to inpainting (with init_image and mask_image)",
    )
    feather = DEFAULT_MASK_FEATHER_PX
    if req.HasField("mask_feather_px"):
        feather = req.mask_feather_px
        check(task is Task.INPAINTING, "mask_feather_px", "applies only to inpainting")
        check(
            feather <= MAX_MASK_FEATHER_PX, "mask_feather_px", f"{feather} is more than {MAX_MASK_FEATHER_PX}"
        )

    loras = _loras(req, info, name, check)

    num_images = req.num_images or 1
    check(
        num_images <= info.max_images_per_request,
        "num_images",
        f"{num_images} is more than model {name!r}'s limit of {info.max_images_per_request}",
    )

    preview_size = req.preview_max_size_px or limits.default_preview_size
    check(
        8 <= preview_size <= limits.max_preview_size,
        "preview_max_size_px",
        f"{preview_size} is outside 8..{limits.max_preview_size}",
    )

    fmt = FORMAT_FROM_PROTO.get(req.output_format)
    check(fmt is not None, "output_format", f"{req.output_format} is not a known ImageFormat value")
    quality = req.output_quality or 90
    check(1 <= quality <= 100, "output_quality", f"{quality} is outside 1..100")

    priority = PRIORITY_FROM_PROTO.get(req.priority)
    check(priority is not None, "priority", f"{req.priority} is not a known Priority value")

    request_id = req.request_id or uuid.uuid4().hex
    check(
        bool(_REQUEST_ID.match(request_id)),
        "request_id",
        "must be 1-128 characters from letters, digits and ._:/@+=-",
    )

    if not bad:
        work = width * height * steps * num_images
        check(
            work <= limits.max_work,
            "steps",
            f"width_px * height_px * steps * num_images = {work} is more than the limit of {limits.max_work}",
        )

    if bad:
        raise invalid_argument(bad)
    assert fmt is not None and priority is not None
    return GenerationParams(
        request_id=request_id,
        model=name,
        prompt=req.prompt,
        negative_prompt=req.negative_prompt,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=guidance,
        seed=seed,
        sampler=sampler,
        num_images=num_images,
        preview_every=req.preview_every_n_steps,
        preview_max_size=min(preview_size, max(width, height)),
        output_format=fmt,
        output_quality=quality,
        deadline=deadline,
        priority=priority,
        karras=req.karras_sigmas,
        cfg=info.runs_cfg(guidance),
        strength=strength,
        first_step=first_step,
        preserve_unmasked=req.preserve_unmasked,
        mask_feather=feather,
        encoded_input_bytes=len(req.init_image) + len(req.mask_image),
        loras=loras,
        cache_interval=cache_interval,
    )


# Largest |LoraWeight.scale| accepted.
MAX_LORA_SCALE = 4.0


def _loras(
    req: pb.GenerateRequest, info: ModelInfo, model: str, check: Callable[[bool, str, str], None]
) -> tuple[tuple[str, float], ...]:
    """The request's adapters as (name, scale); an unknown name is NOT_FOUND, raised at once."""
    known = {lora.name for lora in info.loras}
    check(
        len(req.loras) <= info.max_loras_per_request,
        "loras",
        f"{len(req.loras)} adapters; model {model!r} takes at most {info.max_loras_per_request} per request",
    )
    out: list[tuple[str, float]] = []
    seen: set[str] = set()
    for i, lora in enumerate(req.loras):
        if lora.name not in known:
            listed = ", ".join(sorted(known)) or "none"
            raise not_found(
                "lora",
                lora.name,
                f"LoRA {lora.name!r} is not registered for model {model!r} (registered: {listed})",
            )
        check(lora.name not in seen, f"loras[{i}].name", f"{lora.name!r} is listed twice")
        seen.add(lora.name)
        scale = float(lora.scale) or 1.0
        check(
            math.isfinite(scale) and abs(scale) <= MAX_LORA_SCALE,
            f"loras[{i}].scale",
            f"{scale} is outside -{MAX_LORA_SCALE:g}..{MAX_LORA_SCALE:g}",
        )
        out.append((lora.name, round(scale, 6)))
    return tuple(out)


def _image_inputs(
    req: pb.GenerateRequest, limits: Limits, bad: list[FieldViolation]
) -> tuple[Task, ImageHeader | None, ImageHeader | None]:
    """The request's task and the headers of its image inputs (violations appended to
    ``bad``). Only headers are read here; the pixels are decoded later, off the event loop
    (see image_inputs.decode_inputs)."""
    if req.mask_image and not req.init_image:
        bad.append(FieldViolation("mask_image", "needs an init_image (inpainting repaints part of one)"))
    if not req.init_image:
        return Task.TEXT_TO_IMAGE, None, None
    init = _header(req.init_image, "init_image", limits, bad)
    if not req.mask_image:
        return Task.IMAGE_TO_IMAGE, init, None
    mask = _header(req.mask_image, "mask_image", limits, bad)
    if mask is not None and init is not None and (mask.width, mask.height) != (init.width, init.height):
        bad.append(
            FieldViolation(
                "mask_image",
                f"is {mask.width}x{mask.height}; it must be init_image's size, {init.width}x{init.height}",
            )
        )
    return Task.INPAINTING, init, mask


__all__ = ["ApiError", "Limits", "validate_generate"]


def _header(data: bytes, field: str, limits: Limits, bad: list[FieldViolation]) -> ImageHeader | None:
    found = probe(data, field, limits.max_image_pixels)
    if isinstance(found, FieldViolation):
        bad.append(found)
        return None
    return found
