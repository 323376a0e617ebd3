"""The Stable Diffusion adapters' per-request tensor state and forward rows."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..samplers import DiffusersSampler
from .base import Mark


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


@dataclass
class ImageState:
    """One image of a request: its own generator, sampler and latents, and for image inputs
    what its steps keep reusing."""

    seed: int
    generator: torch.Generator
    sampler: DiffusersSampler
    # None until drawn: at prepare for text-to-image, after the init image's encode otherwise.
    latents: torch.Tensor | None
    # Inpainting with an ordinary UNet: the init image's latents and the noise they are
    # re-noised with after every step (the known region blended back, as diffusers does).
    image_latents: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    # Inpainting with a 9-channel UNet: the masked image's latents, an input of every row.
    masked_latents: torch.Tensor | None = None
    # Feature caching: the deep feature of the image's rows (uncond and cond with CFG) at its
    # last refresh step, reused until the next one (see feature_cache.py).
    deep: torch.Tensor | None = None


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
    # The row's LoRA adapters, (name, scale) in the request's order.
    loras: tuple[tuple[str, float], ...] = ()
    # Feature caching: the deep feature this row reuses (1 x C x h x w), or None to compute
    # it; ``caching`` marks rows of requests that cache (only then does a forward take the
    # cached path, so requests without caching run the plain forward when alone).
    reuse: torch.Tensor | None = None
    caching: bool = False


@dataclass
class RequestWork:
    """A request's tensors."""

    images: list[ImageState]
    positive: Conditioning
    negative: Conditioning | None  # None: no classifier-free guidance
    guidance_scale: float
    extras: RowExtras  # for the positive row
    negative_extras: RowExtras
    # Index in each image's sampler schedule of the request's first step (an init image
    # stands in for the steps before it).
    first_step: int = 0
    # Per step run, (sqrt(alpha_bar), sqrt(1 - alpha_bar)) at its timestep, on the host: the
    # clean estimate of a preview needs them without reading the device's timestep tensor.
    x0_coeffs: list[tuple[float, float]] = field(default_factory=list)
    preview_x0: torch.Tensor | None = None
    # Inpainting: the mask at latent size (1 x 1 x h x w, 1 = repaint), as diffusers resizes it.
    mask: torch.Tensor | None = None

    def timestep(self, im: ImageState, steps_done: int) -> torch.Tensor:
        """The image's timestep for the request's next step."""
        t: torch.Tensor = im.sampler.timesteps[self.first_step + steps_done]
        return t
