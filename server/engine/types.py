"""Domain types shared by the API edge and the engine (no protobuf, no torch)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    RGBArray = npt.NDArray[np.uint8]
    GrayArray = npt.NDArray[np.uint8]


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


class Task(str, enum.Enum):
    """Kinds of generation: from a prompt, from a prompt and an image, or repainting a
    masked region of an image."""

    TEXT_TO_IMAGE = "text_to_image"
    IMAGE_TO_IMAGE = "image_to_image"
    INPAINTING = "inpainting"


ALL_TASKS = (Task.TEXT_TO_IMAGE, Task.IMAGE_TO_IMAGE, Task.INPAINTING)


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
    # Image inputs, already decoded and resized to width x height: the init image (H x W x 3
    # uint8) for image-to-image and inpainting, the mask (H x W uint8, white = repaint) for
    # inpainting. Not compared (arrays).
    init_image: RGBArray | None = field(default=None, compare=False, repr=False)
    mask: GrayArray | None = field(default=None, compare=False, repr=False)
    # Share of the schedule run from the init image, in (0, 1] (1.0 without one).
    strength: float = 1.0
    # Schedule steps skipped because the init image stands in for them: the request runs
    # ``steps - first_step`` steps (see ModelInfo.schedule).
    first_step: int = 0
    # Inpainting: paste the init image back outside the mask, over a feathered edge (pixels).
    preserve_unmasked: bool = False
    mask_feather: int = 4
    # LoRA adapters, (registered name, scale) in the order they stack.
    loras: tuple[tuple[str, float], ...] = ()
    # Feature caching: the UNet's deep features computed every this many steps, reused in
    # between (0: off; see feature_cache.py).
    cache_interval: int = 0
    # Size of the encoded image inputs as received: gRPC keeps the request message (and so
    # these bytes) for the call's whole life.
    encoded_input_bytes: int = 0

    @property
    def task(self) -> Task:
        if self.init_image is None:
            return Task.TEXT_TO_IMAGE
        return Task.IMAGE_TO_IMAGE if self.mask is None else Task.INPAINTING

    @property
    def steps_run(self) -> int:
        """Denoising steps this request runs (progress counts these)."""
        return self.steps - self.first_step

    @property
    def input_bytes(self) -> int:
        """Host memory its image inputs hold while it waits, encoded and decoded (counted
        against the queue's input budget)."""
        decoded = sum(a.nbytes for a in (self.init_image, self.mask) if a is not None)
        # A waiting call holds about twice its encoded inputs (gRPC's received message and its
        # parsed copy); tests/test_image_inputs_api.py bounds the server's memory with this.
        return 2 * self.encoded_input_bytes + decoded

    @property
    def rows(self) -> int:
        """Rows this request adds to every batched denoiser forward."""
        return self.num_images * (2 if self.cfg else 1)

    @property
    def seeds(self) -> list[int]:
        """Seed of each image: image i uses seed + i (wrapping at 2**64)."""
        return [(self.seed + i) % (1 << 64) for i in range(self.num_images)]


# Weight quantizations a model may be served with (engine/quantization.py), and aliases.
QUANTIZATIONS = ("none", "int8", "int8wo", "int8dq", "fp8wo", "fp8dq")
QUANTIZATION_ALIASES = {"int8": "int8dq"}


@dataclass(frozen=True)
class LoraInfo:
    """A registered LoRA adapter as ListModels describes it."""

    name: str
    rank: int
    components: tuple[str, ...]


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
    # The generations it serves: all three for ordinary models; inpainting only for dedicated
    # inpainting models (UNets with mask and masked-image input channels).
    tasks: tuple[Task, ...] = ALL_TASKS
    # Latent-consistency models: image-to-image strength chooses the schedule from the first
    # strength share of these original (training) steps and every step runs, as diffusers'
    # LCM img2img pipeline; None: strength truncates the schedule (the other pipelines).
    strength_sets_schedule: int | None = None
    # Registered LoRA adapters, and how many one request may stack.
    loras: tuple[LoraInfo, ...] = ()
    max_loras_per_request: int = 4
    # Largest feature-caching interval a request may ask for (0: not offered), and the one
    # each preset selects when the request sets none.
    max_cache_interval: int = 0
    preset_cache_intervals: dict[Preset, int] = field(default_factory=dict)
    # Weight quantization of its UNet ("none", "int8wo", "int8dq", "fp8wo", "fp8dq"): it
    # changes the pixels, so it is part of what makes two generations the same.
    quantization: str = "none"

    def schedule(self, steps: int, strength: float, task: Task) -> tuple[int, int]:
        """(first_step, steps run) for a request: the one rule, as diffusers' pipelines apply
        strength. Steps run is 0 when strength is too low for any step to run."""
        if task is Task.TEXT_TO_IMAGE:
            return 0, steps
        if self.strength_sets_schedule is not None and task is Task.IMAGE_TO_IMAGE:
            # LCMScheduler.set_timesteps(steps, strength=...): needs one original step per step.
            return 0, steps if int(self.strength_sets_schedule * strength) >= steps else 0
        run = min(int(steps * strength), steps)
        return steps - run, run

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
    # Of accelerator_s, the time spent encoding the init image (and masked image) to latents.
    image_encode_s: float = 0.0
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
    # The scheduler left the request out of the forwards from now on (preempted at a step
    # boundary, its state kept); the next progress event is its next step.
    paused: bool = False


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
