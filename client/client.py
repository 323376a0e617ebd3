"""Typed sync and asyncio clients over the generated ``stepserve.v1`` stubs."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from stepserve.v1 import image_generation_pb2 as pb
from stepserve.v1 import image_generation_pb2_grpc as pb_grpc

from .errors import StepserveError

SERVICE = "stepserve.v1.ImageGenerationService"

# Retries: gRPC retries Generate only before the server has sent a response, so a retried
# request never duplicates an image stream. UNAVAILABLE (a draining or restarting replica)
# and RESOURCE_EXHAUSTED (a full queue) are worth another try, on another replica when the
# channel balances over several.
DEFAULT_SERVICE_CONFIG: dict[str, Any] = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{"service": SERVICE}],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.2s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
            },
        }
    ],
}

_SAMPLERS = {
    "euler": pb.SAMPLER_EULER,
    "euler_ancestral": pb.SAMPLER_EULER_ANCESTRAL,
    "ddim": pb.SAMPLER_DDIM,
    "dpm_solver_multistep": pb.SAMPLER_DPM_SOLVER_MULTISTEP,
    "dpmpp_2m": pb.SAMPLER_DPM_SOLVER_MULTISTEP,
    "lcm": pb.SAMPLER_LCM,
}
_PRESETS = {"draft": pb.PRESET_DRAFT, "standard": pb.PRESET_STANDARD, "high": pb.PRESET_HIGH}
_FORMATS = {
    "png": pb.IMAGE_FORMAT_PNG,
    "jpeg": pb.IMAGE_FORMAT_JPEG,
    "jpg": pb.IMAGE_FORMAT_JPEG,
    "webp": pb.IMAGE_FORMAT_WEBP,
}
_PRIORITIES = {"interactive": pb.PRIORITY_INTERACTIVE, "batch": pb.PRIORITY_BATCH}
_EXT = {pb.IMAGE_FORMAT_PNG: "png", pb.IMAGE_FORMAT_JPEG: "jpg", pb.IMAGE_FORMAT_WEBP: "webp"}

# An image input of a request: encoded PNG / JPEG / WebP bytes, or the path of such a file.
ImageInput = bytes | bytearray | memoryview | str | os.PathLike[str]


def read_image_input(image: ImageInput | None) -> bytes:
    """The encoded bytes of an image input: bytes as they are, a ``str`` or path-like read
    from that file (``OSError`` if it cannot be); None gives ``b""`` (no image)."""
    if image is None:
        return b""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    return Path(image).read_bytes()


def task_names(model: pb.ModelInfo) -> list[str]:
    """The tasks a model serves (``ModelInfo.tasks``) as names: "text_to_image",
    "image_to_image", "inpainting"."""
    return [pb.Task.Name(t).removeprefix("TASK_").lower() for t in model.tasks]


@dataclass(frozen=True)
class TlsOptions:
    """TLS for the channel: the CA to trust (None = system roots), and a client certificate
    chain and key for mutual TLS."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)


@dataclass(frozen=True)
class GeneratedImage:
    """One encoded image with the seed that reproduces it."""

    data: bytes
    format: str
    width_px: int
    height_px: int
    seed: int

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(self.data)
        return p

    @classmethod
    def from_proto(cls, img: pb.Image) -> GeneratedImage:
        return cls(img.data, _EXT.get(img.format, "bin"), img.width_px, img.height_px, img.seed)


@dataclass(frozen=True)
class Usage:
    """What a generation consumed (see the server README's cost model)."""

    steps: int
    queue_ms: int
    total_ms: int
    accelerator_seconds: float
    mean_batch_size: float
    cost_usd: float
    # Accelerator time spent encoding the init image (and masked image) into latents;
    # included in accelerator_seconds; 0 for text-to-image.
    image_encode_seconds: float = 0.0
    # Served from the server's result cache: nothing ran, nothing is charged.
    cached: bool = False
    # Joined an identical request's generation already in flight.
    coalesced: bool = False


@dataclass(frozen=True)
class GenerationResult:
    """The final images of one Generate call."""

    request_id: str
    model: str
    images: list[GeneratedImage]
    usage: Usage

    @classmethod
    def from_response(cls, resp: pb.GenerateResponse) -> GenerationResult:
        r, u = resp.result, resp.result.usage
        return cls(
            request_id=resp.request_id,
            model=r.model,
            images=[GeneratedImage.from_proto(i) for i in r.images],
            usage=Usage(
                u.steps,
                u.queue_ms,
                u.total_ms,
                u.accelerator_seconds,
                u.mean_batch_size,
                u.cost_usd,
                u.image_encode_seconds,
                u.cached,
                u.coalesced,
            ),
        )


def build_request(
    prompt: str,
    *,
    model: str = "",
    negative_prompt: str = "",
    width: int = 0,
    height: int = 0,
    steps: int = 0,
    guidance_scale: float | None = None,
    seed: int | None = None,
    sampler: str | int = 0,
    num_images: int = 0,
    preview_every: int = 0,
    preview_max_size: int = 0,
    output_format: str | int = 0,
    output_quality: int = 0,
    request_id: str = "",
    priority: str | int = 0,
    preset: str | int = 0,
    karras_sigmas: bool = False,
    init_image: ImageInput | None = None,
    strength: float | None = None,
    mask_image: ImageInput | None = None,
    preserve_unmasked: bool = False,
    mask_feather_px: int | None = None,
    loras: Sequence[str | tuple[str, float]] = (),
    cache_interval: int | None = None,
) -> pb.GenerateRequest:
    """A ``GenerateRequest``; 0 / None / "" leave a field to the server's defaults.

    ``sampler``, ``output_format``, ``priority`` and ``preset`` take names ("euler", "ddim",
    "webp", "batch", "draft", ...) or enum values.

    ``init_image`` (PNG, JPEG or WebP bytes, or the path of such a file, read here) makes the
    request image-to-image, ``strength`` in (0, 1] (None: the server's 0.8) saying how much of
    the schedule runs from it; ``mask_image`` too (same forms; white = repaint, black = keep,
    the init image's size) makes it inpainting. ``preserve_unmasked`` pastes the init image's
    pixels back outside the mask, blended across ``mask_feather_px`` (None: the server's 4,
    0: a hard edge). A path that cannot be read raises ``OSError`` (``FileNotFoundError``...).
    ``loras``: registered LoRA adapters to stack, as ``"name"``, ``"name:scale"`` or
    ``(name, scale)``. ``cache_interval``: feature caching, the UNet's deep features
    computed every this many steps (None: the preset's, else off; 0 or 1: off).
    """
    req = pb.GenerateRequest(
        model=model,
        prompt=prompt,
        negative_prompt=negative_prompt,
        width_px=width,
        height_px=height,
        steps=steps,
        sampler=_SAMPLERS[sampler.lower()] if isinstance(sampler, str) else sampler,
        num_images=num_images,
        preview_every_n_steps=preview_every,
        preview_max_size_px=preview_max_size,
        output_format=_FORMATS[output_format.lower()] if isinstance(output_format, str) else output_format,
        output_quality=output_quality,
        request_id=request_id,
        priority=_PRIORITIES[priority.lower()] if isinstance(priority, str) else priority,
        preset=_PRESETS[preset.lower()] if isinstance(preset, str) else preset,
        karras_sigmas=karras_sigmas,
    )
    if guidance_scale is not None:
        req.guidance_scale = guidance_scale
    if seed is not None:
        req.seed = seed
    req.init_image = read_image_input(init_image)
    req.mask_image = read_image_input(mask_image)
    if strength is not None:
        req.strength = strength
    req.preserve_unmasked = preserve_unmasked
    if mask_feather_px is not None:
        req.mask_feather_px = mask_feather_px
    for lora in loras:
        name, scale = parse_lora(lora) if isinstance(lora, str) else lora
        req.loras.add(name=name, scale=scale)
    if cache_interval is not None:
        req.cache_interval = cache_interval
    return req


def parse_lora(text: str) -> tuple[str, float]:
    """``NAME`` or ``NAME:SCALE`` as (name, scale); scale 0 means the server's 1.0."""
    name, sep, scale = text.rpartition(":")
    if not sep:
        return text, 0.0
    try:
        return name, float(scale)
    except ValueError:
        raise ValueError(f"LoRA {text!r}: expected NAME or NAME:SCALE") from None


def _target(endpoints: str | Sequence[str]) -> str:
    """One target string; a list of host:port endpoints becomes an ``ipv4:``/``ipv6:`` list
    that the round_robin policy balances over."""
    if isinstance(endpoints, str):
        return endpoints
    hosts = list(endpoints)
    if len(hosts) == 1:
        return hosts[0]
    scheme = "ipv6" if any(h.startswith("[") for h in hosts) else "ipv4"
    return f"{scheme}:{','.join(hosts)}"


def _channel_args(
    service_config: dict[str, Any] | None, options: Sequence[tuple[str, Any]]
) -> list[tuple[str, Any]]:
    cfg = DEFAULT_SERVICE_CONFIG if service_config is None else service_config
    return [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(cfg)),
        ("grpc.max_receive_message_length", 64 << 20),
        ("grpc.keepalive_time_ms", 60_000),
        *options,
    ]


# Sent with a stream sent again (below), so the server's metrics count it as a retry.
PREVIOUS_ATTEMPTS_KEY = "stepserve-previous-attempts"

# Routing hints for a proxy in front of several replicas (deploy/k8s/components/envoy/): requests with the
# same key go to the same replica, where the adapters are loaded and the results cached. The
# server never reads them (it computes its own cache key and checks the adapters itself).
CACHE_KEY_HEADER = "x-stepserve-cache-key"
LORA_HEADER = "x-stepserve-lora"
# Fields that change neither the pixels nor the bytes of a generation.
_NOT_PIXELS = ("request_id", "priority", "preview_every_n_steps", "preview_max_size_px")


def routing_metadata(request: pb.GenerateRequest) -> list[tuple[str, str]]:
    """The routing hints of ``request``: ``x-stepserve-cache-key``, for a seeded request (an
    unseeded one is never the same generation twice), the SHA-256 (first 32 hex digits) of
    its deterministic wire encoding without the fields that do not change pixels (the
    TypeScript and Go clients compute the same); ``x-stepserve-lora``, the adapters' names,
    sorted, comma-separated."""
    out = []
    if request.HasField("seed"):
        key = pb.GenerateRequest()
        key.CopyFrom(request)
        for name in _NOT_PIXELS:
            key.ClearField(name)
        digest = hashlib.sha256(key.SerializeToString(deterministic=True)).hexdigest()[:32]
        out.append((CACHE_KEY_HEADER, digest))
    if request.loras:
        out.append((LORA_HEADER, ",".join(sorted({lora.name for lora in request.loras}))))
    return out


class _Attempts:
    """The attempts of one Generate stream. gRPC's own retries (the service config) end at
    the first response: a replica that queued a request and then shut down before starting
    it (its drain timeout passed) ends the stream UNAVAILABLE after Queued events only.
    No work was lost, so the stream is sent again, once, within the caller's deadline; the
    channel's balancer takes it to another replica, and a draining one refuses it before any
    response, which gRPC's retries handle."""

    def __init__(self, timeout_s: float | None, metadata: Sequence[tuple[str, str]]) -> None:
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._metadata = list(metadata)
        self._previous = 0
        self._started = False  # a response other than Queued arrived: the work began
        self._queued = False

    def timeout_s(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def metadata(self) -> list[tuple[str, str]]:
        extra = [(PREVIOUS_ATTEMPTS_KEY, str(self._previous))] if self._previous else []
        return self._metadata + extra

    def saw(self, resp: pb.GenerateResponse) -> None:
        if resp.WhichOneof("event") == "queued":
            self._queued = True
        else:
            self._started = True

    def again(self, err: grpc.RpcError) -> bool:
        """Whether to send the stream again after ``err``."""
        unstarted = self._queued and not self._started and err.code() == grpc.StatusCode.UNAVAILABLE
        if not unstarted or self._previous >= 1 or self.timeout_s() == 0.0:
            return False
        self._previous += 1
        self._queued = False
        return True


class ImageClient:
    """Blocking client. ``target`` is ``host:port``, ``dns:///name:port`` or a list of
    ``host:port`` endpoints (balanced round-robin). ``timeout_s`` is the default deadline
    of each call."""

    def __init__(
        self,
        target: str | Sequence[str] = "localhost:50051",
        *,
        tls: TlsOptions | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        timeout_s: float | None = None,
        service_config: dict[str, Any] | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        args = _channel_args(service_config, options)
        t = _target(target)
        self.channel = (
            grpc.secure_channel(t, tls.credentials(), args) if tls else grpc.insecure_channel(t, args)
        )
        self.stub = pb_grpc.ImageGenerationServiceStub(self.channel)
        self.metadata = list(metadata)
        self.timeout_s = timeout_s

    def __enter__(self) -> ImageClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def stream(
        self, request: pb.GenerateRequest, *, timeout_s: float | None = None
    ) -> Iterator[pb.GenerateResponse]:
        """Every event of one generation; raises :class:`StepserveError` on failure.
        Closing the iterator early cancels the generation. A stream its replica ended
        UNAVAILABLE before starting the work (only Queued events: it was shutting down) is
        sent again once, to the channel's next replica (see :class:`_Attempts`)."""
        attempts = _Attempts(timeout_s or self.timeout_s, self.metadata + routing_metadata(request))
        while True:
            call = self.stub.Generate(request, timeout=attempts.timeout_s(), metadata=attempts.metadata())
            try:
                for resp in call:
                    attempts.saw(resp)
                    yield resp
                return
            except grpc.RpcError as e:
                if not attempts.again(e):
                    raise StepserveError.from_rpc_error(e) from None
            finally:
                call.cancel()

    def generate_stream(self, prompt: str, **kwargs: Any) -> Iterator[pb.GenerateResponse]:
        """The events of one generation; ``kwargs`` are :func:`build_request`'s (image inputs
        too: ``init_image``, ``strength``, ``mask_image``, ``preserve_unmasked``,
        ``mask_feather_px``) and ``timeout_s``."""
        timeout = kwargs.pop("timeout_s", None)
        return self.stream(build_request(prompt, **kwargs), timeout_s=timeout)

    def generate(self, prompt: str, **kwargs: Any) -> GenerationResult:
        """Run a generation and return its result (events in between are dropped);
        ``kwargs`` as :meth:`generate_stream`."""
        for resp in self.generate_stream(prompt, **kwargs):
            if resp.WhichOneof("event") == "result":
                return GenerationResult.from_response(resp)
        raise StepserveError(grpc.StatusCode.INTERNAL, "the stream ended without a result")

    def list_models(self, *, timeout_s: float | None = None) -> list[pb.ModelInfo]:
        try:
            resp = self.stub.ListModels(
                pb.ListModelsRequest(), timeout=timeout_s or self.timeout_s, metadata=self.metadata
            )
        except grpc.RpcError as e:
            raise StepserveError.from_rpc_error(e) from None
        return list(resp.models)


class AsyncImageClient:
    """asyncio client with the same surface as :class:`ImageClient`."""

    def __init__(
        self,
        target: str | Sequence[str] = "localhost:50051",
        *,
        tls: TlsOptions | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        timeout_s: float | None = None,
        service_config: dict[str, Any] | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        args = _channel_args(service_config, options)
        t = _target(target)
        self.channel = (
            grpc.aio.secure_channel(t, tls.credentials(), args) if tls else grpc.aio.insecure_channel(t, args)
        )
        self.stub = pb_grpc.ImageGenerationServiceStub(self.channel)
        self.metadata = list(metadata)
        self.timeout_s = timeout_s

    async def __aenter__(self) -> AsyncImageClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def stream(
        self, request: pb.GenerateRequest, *, timeout_s: float | None = None
    ) -> AsyncIterator[pb.GenerateResponse]:
        """As :meth:`ImageClient.stream`."""
        attempts = _Attempts(timeout_s or self.timeout_s, self.metadata + routing_metadata(request))
        while True:
            call = self.stub.Generate(request, timeout=attempts.timeout_s(), metadata=attempts.metadata())
            try:
                async for resp in call:
                    attempts.saw(resp)
                    yield resp
                return
            except grpc.RpcError as e:
                if not attempts.again(e):
                    raise StepserveError.from_rpc_error(e) from None
            finally:
                call.cancel()

    def generate_stream(self, prompt: str, **kwargs: Any) -> AsyncIterator[pb.GenerateResponse]:
        timeout = kwargs.pop("timeout_s", None)
        return self.stream(build_request(prompt, **kwargs), timeout_s=timeout)

    async def generate(self, prompt: str, **kwargs: Any) -> GenerationResult:
        async for resp in self.generate_stream(prompt, **kwargs):
            if resp.WhichOneof("event") == "result":
                return GenerationResult.from_response(resp)
        raise StepserveError(grpc.StatusCode.INTERNAL, "the stream ended without a result")

    async def list_models(self, *, timeout_s: float | None = None) -> list[pb.ModelInfo]:
        try:
            resp = await self.stub.ListModels(
                pb.ListModelsRequest(), timeout=timeout_s or self.timeout_s, metadata=self.metadata
            )
        except grpc.RpcError as e:
            raise StepserveError.from_rpc_error(e) from None
        return list(resp.models)
