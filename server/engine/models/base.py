"""The interface the runner drives, one implementation per model family."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Generic, Protocol

from ..fault_injection import NO_FAULTS, Faults
from ..request import RequestState, WorkT

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from ..types import ModelInfo, RGBArray


class Mark(Protocol):
    """A point in the accelerator's queue of work, from :meth:`ModelAdapter.mark`.

    Work queued before the mark is done when the mark is reached; host arrays an adapter
    returned before the mark (previews, decoded images) are filled by then.
    """

    def wait(self) -> None:
        """Wait until the accelerator gets here."""
        ...

    def seconds_since(self, start: Mark) -> float:
        """Accelerator seconds from ``start`` (an earlier mark) to this one; waits for both."""
        ...


class HostMark:
    """A mark where work runs synchronously (CPU): reached when taken; times are wall time."""

    __slots__ = ("at",)

    def __init__(self) -> None:
        self.at = time.perf_counter()

    def wait(self) -> None:
        return None

    def seconds_since(self, start: Mark) -> float:
        assert isinstance(start, HostMark)
        return self.at - start.at


class RequestStepFailures(Exception):
    """Raised by :meth:`ModelAdapter.denoise_step` when some requests' own parts of the step
    failed: the step ran (``rows`` rows) for every request not in ``failures``, which maps
    request ids to their errors. The engine fails those requests and keeps the others."""

    def __init__(self, rows: int, failures: dict[str, BaseException]) -> None:
        super().__init__(f"{len(failures)} request(s) failed their step: {sorted(failures)}")
        self.rows = rows
        self.failures = failures


class ModelAdapter(ABC, Generic[WorkT]):
    """Encode / denoise-step / decode / preview for one loaded model.

    All methods run on the engine thread. A request's tensor state lives in
    ``RequestState.work``, of the adapter's own type ``WorkT``, set by :meth:`prepare` and
    dropped by :meth:`release`.
    """

    info: ModelInfo
    device: torch.device
    # Test-only fault injection (see ..fault_injection); no-ops unless a test turns them on.
    faults: Faults = NO_FAULTS

    @abstractmethod
    def prepare(self, reqs: list[RequestState[WorkT]]) -> None:
        """Encode the requests' prompts (batched, cached) and draw their initial latents."""

    def encode_images(self, reqs: list[RequestState[WorkT]]) -> None:
        """After :meth:`prepare`, encode the image inputs of ``reqs`` (image-to-image and
        inpainting requests only, batched) and draw their starting latents. Timed and
        charged apart from prompt encoding: text-only requests never pay for it."""
        raise NotImplementedError(f"{type(self).__name__} takes no image inputs")

    @abstractmethod
    def denoise_step(self, reqs: list[RequestState[WorkT]]) -> int:
        """Run one batched denoiser forward for ``reqs`` (one bucket) and advance each
        request's samplers by one step. Returns the number of rows in the forward.

        Must be transactional per request: an exception from the shared forward leaves every
        request as it was (the engine may retry them in smaller batches), and a failure in one
        request's own update is reported with :class:`RequestStepFailures` after the others
        have been advanced."""

    def row_costs(self, reqs: list[RequestState[WorkT]]) -> list[float]:
        """Each request's share of its next batched forward's work, in full rows (called
        before :meth:`denoise_step`): how a forward's time is split among them. A row that
        runs a cheaper path (feature caching) counts for less than one."""
        return [float(r.params.rows) for r in reqs]

    @abstractmethod
    def decode(self, reqs: list[RequestState[WorkT]]) -> list[list[RGBArray]]:
        """Decode finished requests' latents into RGB uint8 images (one list per request).

        The host arrays may still be being filled by the accelerator when this returns (an
        asynchronous copy): the engine reads them only after a :meth:`mark` taken later is
        reached."""

    @abstractmethod
    def previews(self, reqs: list[RequestState[WorkT]]) -> list[RGBArray | None]:
        """Cheap RGB previews of the requests' first images, as host arrays, for those whose
        step just run was due one (``RequestState.preview_due``); None for the others.
        Consumes the step's estimates. Called once per step for the whole batch, so an
        accelerator adapter can copy them to the host together. Like :meth:`decode`'s, the
        arrays may be filled asynchronously: read them after a later :meth:`mark` is reached."""

    @abstractmethod
    def count_prompt_tokens(self, text: str) -> int:
        """Tokens ``text`` takes in the model's text encoder (without special tokens)."""

    def register_lora(self, name: str, path: Path) -> object:
        """Register the LoRA adapter at ``path`` as ``name`` (see engine/lora.py)."""
        raise NotImplementedError(f"{type(self).__name__} serves no LoRA adapters")

    # Names of the adapters on the accelerator now (a frozenset replaced whole on change, so
    # the metrics collector may read it from another thread).
    resident_loras: frozenset[str] = frozenset()

    def lora_residency(self) -> tuple[int, int, int]:
        """(registered, resident on the device, device loads so far) of its LoRA adapters;
        read by the metrics collector from another thread (counts only)."""
        return (0, 0, 0)

    def feature_cache_rows(self) -> tuple[int, int]:
        """(rows that computed the UNet's deep features, rows that reused cached ones) in
        forwards with feature caching so far; read by the metrics collector from another
        thread (counts only)."""
        return (0, 0)

    def release(self, req: RequestState[WorkT]) -> None:
        """Free the request's tensors."""
        req.work = None

    def is_out_of_memory(self, exc: BaseException) -> bool:
        """Whether ``exc`` means the accelerator ran out of memory (so a smaller batch may fit)."""
        return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()

    def recover_from_oom(self) -> None:
        """Release cached accelerator memory after an out-of-memory error."""
        return None

    # Whether work returns before the accelerator has done it (CUDA): then the engine runs
    # ahead, queueing step k+1 before it reads step k's times, previews and images.
    asynchronous: bool = False

    def mark(self) -> Mark:
        """A mark after the work queued so far: how the engine times work and knows when host
        arrays are filled without waiting for the accelerator at every step. This default is
        for synchronous devices; asynchronous adapters return device events."""
        return HostMark()
