"""Domain types shared by the API edge and the engine (no protobuf, no torch)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    RGBArray = npt.NDArray[np.uint8]


class Sampler(str, enum.Enum):
    """Samplers the engine can run; each maps to a diffusers scheduler class."""

    EULER = "euler"
    EULER_ANCESTRAL = "euler_ancestral"
    DDIM = "ddim"
    DPM_SOLVER_MULTISTEP = "dpm_solver_multistep"
    LCM = "lcm"


class Preset(str, enum.Enum):
    """Quality presets: each model maps them to a number of steps."""

    DRAFT = "draft"
    STANDARD = "standard"
    HIGH = "high"


class ImageFormat(str, enum.Enum):
    """Encodings for final images."""

    PNG = "png"
    JPEG = "jpeg"
    WEBP = "webp"


class Priority(str, enum.Enum):
    """Scheduling class: interactive requests are served before batch ones (with aging)."""

    INTERACTIVE = "interactive"
    BATCH = "batch"


class FinishReason(str, enum.Enum):
    """How a request ended; mapped once to gRPC status codes at the API edge."""

    OK = "ok"
    CANCELLED = "cancelled"
    DEADLINE = "deadline"
    ERROR = "error"
    SHUTDOWN = "shutdown"
    # Refused at admission: its deadline cannot be met at the current load.
    UNMEETABLE_DEADLINE = "unmeetable_deadline"


@dataclass(frozen=True)
class GenerationParams:
    """One validated generation request, every default already resolved."""

    request_id: str
    model: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    sampler: Sampler
    # Whether classifier-free guidance runs (two forward rows per image): decided for the
    # request's model by ModelInfo.runs_cfg, the one rule.
    cfg: bool
    num_images: int = 1
    preview_every: int = 0
    preview_max_size: int = 256
    output_format: ImageFormat = ImageFormat.PNG
    output_quality: int = 90
    # Absolute time (engine clock, seconds) after which the request is dropped; None = never.
    deadline: float | None = None
    priority: Priority = Priority.INTERACTIVE
    # Karras noise schedule for the sampler (samplers in ModelInfo.karras_samplers only).
    karras: bool = False
    # A server-internal request (model warm-up): served like any other but not counted in
    # request metrics nor traced.
    internal: bool = False

    @property
    def rows(self) -> int:
        """Rows this request adds to every batched denoiser forward."""
        return self.num_images * (2 if self.cfg else 1)

    @property
    def seeds(self) -> list[int]:
        """Seed of each image: image i uses seed + i (wrapping at 2**64)."""
        return [(self.seed + i) % (1 << 64) for i in range(self.num_images)]


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model offers, as ListModels reports it and validation checks it."""

    name: str
    family: str
    default_width: int
    default_height: int
    default_steps: int
    default_guidance_scale: float
    default_sampler: Sampler
    samplers: tuple[Sampler, ...]
    max_batch_size: int
    size_multiple: int = 8
    min_size: int = 64
    max_size: int = 1024
    max_steps: int = 150
    max_images_per_request: int = 8
    max_prompt_tokens: int = 77
    # Steps each quality preset selects.
    preset_steps: dict[Preset, int] = field(default_factory=dict)
    # Samplers that can use the Karras noise schedule.
    karras_samplers: tuple[Sampler, ...] = ()
    # The model takes the guidance scale as an input embedding (LCM): no CFG rows.
    guidance_embedded: bool = False

    def runs_cfg(self, guidance_scale: float) -> bool:
        """Whether a request with this guidance scale runs classifier-free guidance here."""
        return runs_cfg(guidance_scale, self.guidance_embedded)


def runs_cfg(guidance_scale: float, guidance_embedded: bool) -> bool:
    """The one rule for classifier-free guidance: it runs when the scale is above 1 and the
    model does not take the scale as an input embedding (distilled models, LCM)."""
    return guidance_scale > 1.0 and not guidance_embedded


@dataclass
class Usage:
    """What one generation consumed (see README "Cost model")."""

    steps: int = 0
    queue_s: float = 0.0
    total_s: float = 0.0
    accelerator_s: float = 0.0
    mean_batch_size: float = 0.0
    cost_usd: float = 0.0


@dataclass(frozen=True)
class QueuedEvent:
    """The request waits; ``position`` is 0-based among waiting requests of its model."""

    position: int
    estimated_wait_s: float


@dataclass(frozen=True)
class ProgressEvent:
    """One denoising step done; ``preview`` is a small RGB array when one was due."""

    step: int
    total_steps: int
    elapsed_s: float
    preview: RGBArray | None = None


@dataclass(frozen=True)
class ResultEvent:
    """The finished images (RGB uint8 arrays, not yet encoded) and the request's usage."""

    images: list[RGBArray]
    seeds: list[int]
    usage: Usage = field(default_factory=Usage)


@dataclass(frozen=True)
class FailedEvent:
    """The request ended without a result."""

    reason: FinishReason
    message: str
    # When retrying may succeed (for refusals caused by load).
    retry_after_s: float | None = None


EngineEvent = QueuedEvent | ProgressEvent | ResultEvent | FailedEvent
