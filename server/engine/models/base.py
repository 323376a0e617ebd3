"""The interface the runner drives, one implementation per model family."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ..request import RequestState
    from ..types import ModelInfo, RGBArray


class ModelAdapter(ABC):
    """Encode / denoise-step / decode / preview for one loaded model.

    All methods run on the engine thread. A request's tensor state lives in
    ``RequestState.work``, set by :meth:`prepare` and dropped by :meth:`release`.
    """

    info: ModelInfo
    device: torch.device

    @abstractmethod
    def prepare(self, reqs: list[RequestState]) -> None:
        """Encode the requests' prompts (batched, cached) and draw their initial latents."""

    @abstractmethod
    def denoise_step(self, reqs: list[RequestState]) -> int:
        """Run one batched denoiser forward for ``reqs`` (one bucket) and advance each
        request's samplers by one step. Returns the number of rows in the forward."""

    @abstractmethod
    def decode(self, reqs: list[RequestState]) -> list[list[RGBArray]]:
        """Decode finished requests' latents into RGB uint8 images (one list per request)."""

    @abstractmethod
    def preview(self, req: RequestState) -> RGBArray | None:
        """A cheap RGB preview of the request's first image, if the step just run was due
        one (``RequestState.preview_due``); None otherwise. Consumes the step's estimate."""

    @abstractmethod
    def count_prompt_tokens(self, text: str) -> int:
        """Tokens ``text`` takes in the model's text encoder (without special tokens)."""

    def release(self, req: RequestState) -> None:
        """Free the request's tensors."""
        req.work = None

    def synchronize(self) -> None:
        """Wait for queued accelerator work (so wall-clock timings are real).

        A no-op where work runs synchronously (CPU); GPU adapters override it.
        """
        return None
