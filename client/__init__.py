"""Python clients for stepserve: :class:`ImageClient` (sync) and :class:`AsyncImageClient`.

>>> from stepserve.client import ImageClient
>>> with ImageClient("localhost:50051") as c:
...     result = c.generate("a small red circle on the left", seed=1)
...     result.images[0].save("circle.png")
"""

from .client import (
    CACHE_KEY_HEADER,
    DEFAULT_SERVICE_CONFIG,
    LORA_HEADER,
    AsyncImageClient,
    GeneratedImage,
    GenerationResult,
    ImageClient,
    ImageInput,
    TlsOptions,
    Usage,
    build_request,
    routing_metadata,
    task_names,
)
from .errors import FieldViolation, StepserveError

__all__ = [
    "CACHE_KEY_HEADER",
    "DEFAULT_SERVICE_CONFIG",
    "LORA_HEADER",
    "AsyncImageClient",
    "FieldViolation",
    "GeneratedImage",
    "GenerationResult",
    "ImageClient",
    "ImageInput",
    "StepserveError",
    "TlsOptions",
    "Usage",
    "build_request",
    "routing_metadata",
    "task_names",
]
