"""The model work of one step plan, and the accounting and events it leads to.

:class:`StepRunner` executes what the scheduler decided: it ends the aborted, encodes the
newcomers' prompts, runs the batched forward (under the fault policy), makes the step's
previews and decodes the finished. Everything that needs the accelerator's results
(charges, step times, observer hooks, events) is queued as a completion after the work's
mark, so it runs when the accelerator has got there (see completions.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from .completions import CompletionQueue
from .fault_policy import Attempt, Forward, StepOutcome, denoise_with_retries
from .ledger import Ledger
from .models.base import Mark, ModelAdapter
from .observer import EngineObserver
from .outbox import Outbox
from .request import RequestState, RequestStatus
from .scheduler import BaseScheduler
from .types import FailedEvent, ProgressEvent, ResultEvent, Usage

if TYPE_CHECKING:
    from .types import RGBArray

logger = logging.getLogger(__name__)

_ABORT_MESSAGES = {
    RequestStatus.FINISHED_CANCELLED: "the request was cancelled",
    RequestStatus.FINISHED_DEADLINE: "the request's deadline passed",
}


class StepRunner:
    """Turns a step plan into model work, charges and events."""

    def __init__(
        self,
        models: dict[str, ModelAdapter],
        scheduler: BaseScheduler,
        ledger: Ledger,
        completions: CompletionQueue,
        outbox: Outbox,
        observer: EngineObserver,
        clock: Callable[[], float],
        cost_per_hour: float,
    ) -> None:
        self.models = models
        self.scheduler = scheduler
        self.ledger = ledger
        self.completions = completions
        self.outbox = outbox
        self.observer = observer
        self.clock = clock
        self.usd_per_s = cost_per_hour / 3600.0

    def end_aborted(self, aborted: list[RequestState]) -> None:
        """Requests the scheduler dropped at this boundary (cancelled, past deadline)."""
        for req in aborted:
            reason = req.status.finish_reason
            logger.info(
                "request %s ended: %s after %d steps",
                req.request_id,
                reason.value,
                req.steps_done,
                extra=req.log_extra,
            )
            self.release(req)
            message = _ABORT_MESSAGES.get(req.status, "the request was aborted")
            self.outbox.end_later(req, FailedEvent(reason, message))

    def prepare(self, admitted: list[RequestState]) -> None:
        """Encode the prompts of the requests that joined, one batch per model."""
        now = self.clock()
        by_model: dict[str, list[RequestState]] = {}
        for req in admitted:
            by_model.setdefault(req.model, []).append(req)
            if not req.params.internal:
                self.observer.request_admitted(req, now)
        for model, reqs in by_model.items():
            self._prepare_model(model, reqs)

    def _prepare_model(self, model: str, reqs: list[RequestState]) -> None:
        adapter = self.models[model]
        start = adapter.mark()
        try:
            adapter.prepare(reqs)
        except Exception as e:
            logger.exception("preparing %d request(s) for %s failed", len(reqs), model)
            for req in reqs:
                self.fail(req, f"encoding the prompt failed: {e}")
            return
        end = adapter.mark()

        def encoded() -> None:
            seconds = self.ledger.charge(reqs, [r.params.rows for r in reqs], start, end)
            self.observer.prompts_encoded(reqs, seconds)

        self.completions.defer(end, encoded)
        with_images = [r for r in reqs if r.params.init_image is not None]
        if with_images:
            self._encode_images(adapter, with_images, end)

    def _encode_images(self, adapter: ModelAdapter, reqs: list[RequestState], start: Mark) -> None:
        """The image inputs of ``reqs`` (just prepared), encoded in one batch and charged to
        them alone, by images."""
        try:
            adapter.encode_images(reqs)
        except Exception as e:
            logger.exception("encoding the init images of %d request(s) failed", len(reqs))
            for req in reqs:
                self.fail(req, f"encoding the init image failed: {e}")
            return
        end = adapter.mark()

        def encoded() -> None:
            before = [r.accelerator_s for r in reqs]
            seconds = self.ledger.charge(reqs, [r.params.num_images for r in reqs], start, end)
            for req, b in zip(reqs, before, strict=True):
                req.image_encode_s += req.accelerator_s - b
            self.observer.images_encoded(reqs, seconds)

        self.completions.defer(end, encoded)

    def pauses(self, paused: list[RequestState], resumed: list[RequestState]) -> None:
        """Requests the scheduler left out of this forward (told with a paused progress
        event) and those it took back."""
        now = self.clock()
        for req in paused:
            logger.info(
                "request %s paused after %d steps", req.request_id, req.steps_done, extra=req.log_extra
            )
            if not req.params.internal:
                self.observer.request_paused(req, now)
            event = ProgressEvent(req.steps_done, req.total_steps, now - req.arrival_time, paused=True)
            self.outbox.send_later(req, event)
        for req in resumed:
            if not req.params.internal:
                self.observer.request_resumed(req, now)

    def denoise(self, batch: list[RequestState]) -> StepOutcome:
        """One batched step for the plan's batch (those still running after prepare)."""
        batch = [r for r in batch if r.status is RequestStatus.RUNNING]
        if not batch:
            return StepOutcome()
        model = batch[0].model
        outcome = denoise_with_retries(self.models[model], batch)
        # Every attempt, failed or not, was spent on its requests: charged before any of them
        # can end below, so the charge is in their usage.
        for attempt in outcome.attempts:
            self.completions.defer(attempt.end, partial(self._charge_attempt, attempt))
        if outcome.out_of_memory is not None:
            self._lower_capacity(model, *outcome.out_of_memory)
        for req, message in outcome.failed:
            self.fail(req, message)
        for fwd in outcome.forwards:
            self.ledger.record_forward(fwd.rows)
            for req in fwd.requests:
                req.forwards += 1
                req.batch_images_sum += fwd.images
        return outcome

    def _charge_attempt(self, attempt: Attempt) -> None:
        self.ledger.charge(attempt.requests, attempt.weights, attempt.start, attempt.end)

    def _forward_done(self, model: str, fwd: Forward) -> None:
        # Queued after this step's update and run before the next one's: observers see
        # steps_done of this step.
        seconds = fwd.end.seconds_since(fwd.start)
        self.ledger.record_step_time(model, seconds)
        p = fwd.requests[0].params
        self.scheduler.step_times.record(model, p.height, p.width, fwd.rows, seconds)
        self.observer.batch_stepped(fwd.requests, fwd.rows, seconds)

    def _lower_capacity(self, model: str, images: int, error: BaseException) -> None:
        """After running out of memory with ``images`` in one forward, cap the model's batches
        at half of it."""
        old = self.scheduler.lower_capacity(model, images // 2)
        if old is not None:
            logger.warning(
                "out of accelerator memory with %d images in one forward of %s: batch cap %d -> %d (%s)",
                images,
                model,
                old,
                self.scheduler.capacity[model],
                error,
            )

    def report_progress(self, outcome: StepOutcome) -> None:
        """After the scheduler's update: the step's timing and observer hooks (which see
        ``steps_done`` of this step), then progress events for the requests that stepped,
        with the previews that were due (made together, their time split among the requests
        that got one)."""
        stepped = outcome.stepped
        if not stepped:
            return
        model = stepped[0].model
        for fwd in outcome.forwards:
            self.completions.defer(fwd.end, partial(self._forward_done, model, fwd))
        adapter = self.models[model]
        start = adapter.mark()
        previews = adapter.previews(stepped)
        end = adapter.mark()
        made = [r for r, p in zip(stepped, previews, strict=True) if p is not None]
        steps = [r.steps_done for r in stepped]  # now, not when the completion runs

        def send_progress() -> None:
            at = self.clock()
            if made:
                seconds = self.ledger.charge(made, [1] * len(made), start, end)
                for req in made:
                    if req.first_preview_time is None:
                        req.first_preview_time = at
                    if not req.params.internal:
                        self.observer.preview_made(req, at, seconds / len(made))
            for req, step, preview in zip(stepped, steps, previews, strict=True):
                self.outbox.send(req, ProgressEvent(step, req.total_steps, at - req.arrival_time, preview))

        self.completions.defer(end, send_progress)

    def finish(self, finished: list[RequestState]) -> None:
        """Decode the requests whose steps are all done and send their results."""
        if not finished:
            return
        model = finished[0].model
        adapter = self.models[model]
        start = adapter.mark()
        try:
            decoded = adapter.decode(finished)
        except Exception as e:
            logger.exception("decoding %d request(s) of %s failed", len(finished), model)
            for req in finished:
                self.fail(req, f"decoding the image failed: {e}")
            return
        end = adapter.mark()
        # Their slots are free for the next step; the images go out once they are on the host.
        now = self.clock()
        for req in finished:
            self.scheduler.finish(req, RequestStatus.FINISHED_OK, now)
            self.release(req)

        def send_results() -> None:
            seconds = self.ledger.charge(finished, [r.params.num_images for r in finished], start, end)
            self.observer.images_decoded(finished, seconds)
            now = self.clock()
            for req, images in zip(finished, decoded, strict=True):
                self._send_result(req, images, now)

        self.completions.defer(end, send_results, finals=finished)

    def _send_result(self, req: RequestState, images: list[RGBArray], now: float) -> None:
        usage = Usage(
            steps=req.params.steps_run,
            image_encode_s=req.image_encode_s,
            queue_s=(req.admitted_time or now) - req.arrival_time,
            total_s=now - req.arrival_time,
            accelerator_s=req.accelerator_s,
            mean_batch_size=req.batch_images_sum / max(1, req.forwards),
            cost_usd=req.accelerator_s * self.usd_per_s,
        )
        logger.info(
            "request %s done: %d steps, %.3fs total, %.3f accelerator-s, mean batch %.1f",
            req.request_id,
            usage.steps,
            usage.total_s,
            usage.accelerator_s,
            usage.mean_batch_size,
            extra=req.log_extra,
        )
        self.outbox.end(req, ResultEvent(images, req.params.seeds, usage), usage)

    def fail(self, req: RequestState, message: str) -> None:
        """End a request with an error (the others go on)."""
        self.scheduler.finish(req, RequestStatus.FINISHED_ERROR, self.clock())
        self.release(req)
        self.outbox.end_later(req, FailedEvent(RequestStatus.FINISHED_ERROR.finish_reason, message))

    def release(self, req: RequestState) -> None:
        """Free the request's tensors."""
        if req.work is not None:
            self.models[req.model].release(req)
