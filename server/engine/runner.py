"""The engine loop: one thread per accelerator executing the scheduler's step plans.

The asyncio server talks to it only through :meth:`Engine.submit` and :meth:`Engine.cancel`
(thread-safe, never blocking on model work) and receives events through a per-request sink
callable that must not block (the API's sink hands events to the event loop with
``call_soon_threadsafe``). The loop never waits on a client.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .models.base import Mark, ModelAdapter, RequestStepFailures
from .observer import EngineObserver, ObserverGroup
from .request import RequestState, RequestStatus
from .scheduler import BaseScheduler, StepPlan, make_scheduler
from .types import (
    EngineEvent,
    FailedEvent,
    FinishReason,
    GenerationParams,
    Priority,
    ProgressEvent,
    QueuedEvent,
    ResultEvent,
    Usage,
)

logger = logging.getLogger(__name__)

EventSink = Callable[[EngineEvent], None]


class EngineError(Exception):
    """Base class of the reasons :meth:`Engine.submit` refuses a request."""


class QueueFullError(EngineError):
    """The waiting queue is at ``max_queue``; the caller should retry later."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineStoppedError(EngineError):
    """The engine is draining, stopped, or has failed."""


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings (see ``stepserve.server.config.ServerConfig`` for the documented flags)."""

    batching: str = "step"
    max_queue: int = 256
    max_batch_delay_s: float = 0.05
    accelerator_cost_per_hour: float = 0.0
    # Batch-priority requests are served as if they arrived this much later (aging bound).
    batch_priority_delay_s: float = 60.0
    # Refuse at admission a request whose deadline the current load cannot meet.
    reject_unmeetable_deadlines: bool = True
    # Queue step k+1 on the accelerator before reading step k's times, previews and images
    # (see Engine._settle). None: when a model's device runs asynchronously (CUDA).
    run_ahead: bool | None = None


@dataclass
class _Pending:
    """Engine work to finish once the accelerator reaches ``mark`` (None: nothing to wait
    for): accounting, events. ``finals`` are the requests whose terminal event it sends."""

    iteration: int
    mark: Mark | None
    action: Callable[[], object]
    finals: Sequence[RequestState] = ()


class Engine:
    """Runs every loaded model's requests on one thread, one batched step at a time."""

    def __init__(
        self,
        models: dict[str, ModelAdapter],
        config: EngineConfig,
        clock: Callable[[], float] = time.monotonic,
        observers: Sequence[EngineObserver] = (),
    ) -> None:
        self.models = models
        self.config = config
        self.clock = clock
        self.scheduler: BaseScheduler = make_scheduler(
            config.batching,
            {n: m.info.max_batch_size for n, m in models.items()},
            config.max_batch_delay_s,
            {Priority.INTERACTIVE: 0.0, Priority.BATCH: config.batch_priority_delay_s},
        )
        self._cv = threading.Condition()
        self._inbox: deque[tuple[str, Any, Any]] = deque()
        self._sinks: dict[str, EventSink] = {}
        self._queued: dict[str, str] = {}  # request id -> model, for waiting requests
        self._running: dict[str, str] = {}  # request id -> model, for running requests
        # Batch capacity (images) not taken by running requests, per model: requests that will
        # fill it at the next step boundary do not count against max_queue.
        self._free_images = {n: m.info.max_batch_size for n, m in models.items()}
        self._draining = False
        self._stop = False
        self.failure: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._wake_at: float | None = None
        # Seconds per denoiser forward, smoothed, per model (for queue wait estimates).
        self._step_time: dict[str, float] = dict.fromkeys(models, 0.05)
        self.on_failure: Callable[[BaseException], None] | None = None
        self.observer = ObserverGroup(observers)
        self.forwards = 0
        self.last_batch_rows = 0
        # Accelerator time spent on model work (encode, forwards, previews, decode); the rest
        # of the wall time since start is idle (see accelerator_seconds()).
        self.busy_s = 0.0
        self._started_at = time.perf_counter()
        run_ahead = config.run_ahead
        if run_ahead is None:
            run_ahead = any(m.asynchronous for m in models.values())
        self.run_ahead = run_ahead
        self._outbox: deque[_Pending] = deque()
        self._iteration = 0

    # -- called from any thread ------------------------------------------------------------
    def start(self) -> None:
        self._started_at = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="stepserve-engine", daemon=True)
        self._thread.start()

    def submit(self, params: GenerationParams, sink: EventSink, trace_context: Any = None) -> None:
        """Queue a request; raises :class:`EngineError` subclasses when it cannot be taken.

        ``trace_context`` (the caller's OpenTelemetry span context) is handed to observers.
        """
        with self._cv:
            if self.failure is not None:
                raise EngineStoppedError(f"the engine has failed: {self.failure}")
            if self._draining or self._stop:
                raise EngineStoppedError("the server is shutting down")
            if params.request_id in self._sinks:
                raise ValueError(f"request id {params.request_id!r} is already in flight")
            depth = len(self._queued) - sum(max(0, f) for f in self._free_images.values())
            if depth >= self.config.max_queue:
                raise QueueFullError(
                    f"the queue is full ({depth} requests waiting, limit {self.config.max_queue})",
                    retry_after_s=self._step_time.get(params.model, 0.05) * params.steps,
                )
            self._sinks[params.request_id] = sink
            self._queued[params.request_id] = params.model
            req = RequestState(params=params, arrival_time=self.clock(), trace_context=trace_context)
            self._inbox.append(("submit", req, None))
            self._cv.notify()

    def cancel(self, request_id: str, status: RequestStatus = RequestStatus.FINISHED_CANCELLED) -> None:
        """Drop a request at the next step boundary (no-op if it already ended)."""
        with self._cv:
            if request_id in self._sinks:
                self._inbox.append(("cancel", request_id, status))
                self._cv.notify()

    def queue_depth(self, model: str | None = None) -> int:
        with self._cv:
            return sum(1 for m in self._queued.values() if model is None or m == model)

    def active_requests(self) -> int:
        with self._cv:
            return len(self._running)

    def load_by_model(self) -> dict[str, tuple[int, int]]:
        """(waiting, running) request counts per loaded model."""
        with self._cv:
            out = {m: [0, 0] for m in self.models}
            for m in self._queued.values():
                out[m][0] += 1
            for m in self._running.values():
                out[m][1] += 1
        return {m: (w, r) for m, (w, r) in out.items()}

    def accelerator_seconds(self) -> tuple[float, float]:
        """(busy, idle) seconds since start: busy is time in model work, idle the rest."""
        busy = self.busy_s
        return busy, max(0.0, time.perf_counter() - self._started_at - busy)

    def in_flight(self) -> int:
        with self._cv:
            return len(self._sinks)

    def drain(self, timeout_s: float) -> bool:
        """Refuse new requests and wait up to ``timeout_s`` for in-flight ones to finish.

        Returns True if everything finished; the rest is ended by :meth:`stop`.
        """
        end = time.monotonic() + timeout_s
        with self._cv:
            self._draining = True
            while self._sinks and self.failure is None:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.1))
            return True

    def stop(self) -> None:
        """End every remaining request with SHUTDOWN and stop the thread."""
        with self._cv:
            self._draining = True
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()

    # -- the engine thread ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self.run_once(block=True) is not None:
                pass
            self._settle()
            self._end_all(RequestStatus.FINISHED_SHUTDOWN, "the server shut down before the request finished")
            self._settle()
        except BaseException as e:  # the loop must never die silently
            logger.exception("engine loop failed")
            with self._cv:
                self.failure = e
                self._cv.notify_all()
            message = f"the engine failed: {e}"
            self._settle_after_failure(message)
            self._end_all(RequestStatus.FINISHED_ERROR, message)
            self._settle_after_failure(message)
            if self.on_failure is not None:
                self.on_failure(e)

    def run_once(self, block: bool = False) -> StepPlan | None:
        """One iteration of the loop: take in submissions and cancels, schedule, execute.

        The engine thread calls it with ``block=True`` (sleep while idle); tests call it
        directly, without starting the thread, to drive arrivals step by step. Returns the
        executed plan, or None when the engine is stopping.
        """
        if not self._drain_inbox(block):
            return None
        self._iteration += 1
        # Newcomers hear their place before anything runs, even if they start right away.
        self._report_positions()
        plan = self.scheduler.schedule(self.clock())
        self._wake_at = plan.wake_at
        self._execute(plan)
        self._report_positions()
        # Running ahead, this iteration's results wait until the next step is queued;
        # with nothing left to queue, they are read now.
        more = self.run_ahead and bool(self.scheduler.running)
        self._settle(self._iteration - 1 if more else None)
        return plan

    # -- completions ---------------------------------------------------------------------
    def _later(
        self, mark: Mark | None, action: Callable[[], object], finals: Sequence[RequestState] = ()
    ) -> None:
        """Finish engine work (accounting, events) once the accelerator reaches ``mark``.

        Without run-ahead that is at once (the engine waits for the accelerator here). With
        run-ahead the engine queues the next step first and settles this one while the
        accelerator runs it (see :meth:`_settle`). Either way they run in the order queued,
        so each request's events keep their order and its charges land before its usage.
        """
        self._outbox.append(_Pending(self._iteration, mark, action, finals))
        if not self.run_ahead:
            self._settle()

    def _settle(self, through: int | None = None) -> None:
        """Run queued completions in order: every one queued in iterations up to ``through``
        (all when None), waiting for the accelerator where needed; then those at the front
        that wait for nothing (queue positions, cancellations)."""
        while self._outbox:
            p = self._outbox[0]
            if p.mark is not None:
                if through is not None and p.iteration > through:
                    break
                p.mark.wait()
            self._outbox.popleft()
            p.action()

    def _settle_after_failure(self, message: str) -> None:
        """After an engine failure, settle what was queued as far as the accelerator allows:
        a request whose images are on the host still gets them; one whose completion cannot
        be read (the device failed too) ends with ``message``."""
        while self._outbox:
            p = self._outbox.popleft()
            try:
                if p.mark is not None:
                    p.mark.wait()
                p.action()
            except BaseException:
                logger.exception("settling queued engine work after the failure failed")
                for req in p.finals:
                    if req.request_id in self._sinks:
                        self._deliver_final(
                            req, FailedEvent(RequestStatus.FINISHED_ERROR.finish_reason, message)
                        )

    def _drain_inbox(self, block: bool) -> bool:
        """Move submissions and cancels into the scheduler; with ``block``, sleep while
        there is nothing to do. Returns False when the loop should stop."""
        wake_at = self._wake_at
        with self._cv:
            while block:
                if self._stop:
                    return False
                busy = self.scheduler.running or (self.scheduler.waiting and wake_at is None)
                if self._inbox or busy:
                    break
                timeout = None if wake_at is None else max(0.0, wake_at - self.clock())
                if timeout == 0.0:
                    break
                self._cv.wait(timeout)
                if wake_at is not None and self.clock() >= wake_at:
                    break
            if self._stop:
                return False
            items = list(self._inbox)
            self._inbox.clear()
        for kind, a, b in items:
            if kind == "submit":
                self.scheduler.add(a)
                if self.config.reject_unmeetable_deadlines:
                    self._refuse_if_unmeetable(a)
            else:
                self.scheduler.abort(a, b)
        return True

    def estimated_finish_s(self, req: RequestState) -> float:
        """Seconds until a just-queued request would finish at the current load: the wait for
        a slot plus its own steps, at the model's recent step time (an optimistic estimate:
        it assumes the batch does not grow)."""
        step = self._step_time[req.model]
        pos = self.scheduler.queue_positions()[req.request_id]
        info = self.models[req.model].info
        return (
            self.scheduler.estimated_wait(pos, req.model, step, info.default_steps) + req.params.steps * step
        )

    def _refuse_if_unmeetable(self, req: RequestState) -> None:
        deadline = req.params.deadline
        if deadline is None:
            return
        now = self.clock()
        need = self.estimated_finish_s(req)
        if now + need <= deadline:
            return
        self.scheduler.finish(req, RequestStatus.FINISHED_REJECTED, now)
        msg = (
            f"the deadline ({max(0.0, deadline - now):.2f}s left) cannot be met at the current load: "
            f"about {need:.2f}s to finish; retry with a longer deadline or later"
        )
        logger.info("request %s refused: %s", req.request_id, msg, extra=req.log_extra)
        self._emit_final(req, FailedEvent(FinishReason.UNMEETABLE_DEADLINE, msg, retry_after_s=need))

    def _execute(self, plan: StepPlan) -> None:
        now = self.clock()
        for req in plan.aborted:
            reason = req.status.finish_reason
            msg = {
                RequestStatus.FINISHED_CANCELLED: "the request was cancelled",
                RequestStatus.FINISHED_DEADLINE: "the request's deadline passed",
            }.get(req.status, "the request was aborted")
            logger.info(
                "request %s ended: %s after %d steps",
                req.request_id,
                reason.value,
                req.steps_done,
                extra=req.log_extra,
            )
            self._release(req)
            self._emit_final(req, FailedEvent(reason, msg))
        if plan.admitted:
            with self._cv:
                for req in plan.admitted:
                    self._queued.pop(req.request_id, None)
                    self._running[req.request_id] = req.model
                    self._free_images[req.model] -= req.params.num_images
            by_model: dict[str, list[RequestState]] = {}
            for req in plan.admitted:
                by_model.setdefault(req.model, []).append(req)
                if not req.params.internal:
                    self.observer.request_admitted(req, now)
            for model, reqs in by_model.items():
                self._prepare(model, reqs)
        batch = [r for r in plan.batch if r.status is RequestStatus.RUNNING and r.work is not None]
        if batch:
            plan.batch = batch
            self._step(plan)

    def _prepare(self, model: str, reqs: list[RequestState]) -> None:
        adapter = self.models[model]
        start = adapter.mark()
        try:
            adapter.prepare(reqs)
        except Exception as e:
            logger.exception("preparing %d request(s) for %s failed", len(reqs), model)
            for req in reqs:
                self._fail(req, f"encoding the prompt failed: {e}")
            return
        end = adapter.mark()

        def encoded() -> None:
            dt = self._spent(reqs, [r.params.rows for r in reqs], start, end)
            self.observer.prompts_encoded(reqs, dt)

        self._later(end, encoded)

    def _step(self, plan: StepPlan) -> None:
        model = plan.batch[0].model
        adapter = self.models[model]
        forwards: list[tuple[list[RequestState], int, Mark, Mark]] = []
        stepped = self._forward(adapter, plan.batch, forwards)
        # This step is queued: finish the previous one while the accelerator runs it.
        self._settle(self._iteration - 1)
        if not stepped:
            return
        plan.batch = stepped
        finished = self.scheduler.update(plan)
        for members, rows, start, end in forwards:
            self._later(end, self._stepped(model, members, rows, start, end))
        self._previews(adapter, stepped)
        if finished:
            self._finish(model, finished)

    def _stepped(
        self, model: str, members: list[RequestState], rows: int, start: Mark, end: Mark
    ) -> Callable[[], None]:
        def stepped() -> None:  # observers see steps_done after the step (and not the next)
            dt = end.seconds_since(start)
            self._step_time[model] = 0.8 * self._step_time[model] + 0.2 * dt
            self.observer.batch_stepped(members, rows, dt)

        return stepped

    def _previews(self, adapter: ModelAdapter, stepped: list[RequestState]) -> None:
        """Send the step's progress events, with previews (host arrays) made together; their
        time is split among the requests that got one."""
        start = adapter.mark()
        previews = adapter.previews(stepped)
        end = adapter.mark()
        made = [r for r, p in zip(stepped, previews, strict=True) if p is not None]
        steps = [r.steps_done for r in stepped]

        def progress() -> None:
            at = self.clock()
            if made:
                dt = self._spent(made, [1] * len(made), start, end)
                for req in made:
                    if req.first_preview_time is None:
                        req.first_preview_time = at
                    if not req.params.internal:
                        self.observer.preview_made(req, at, dt / len(made))
            for req, step, preview in zip(stepped, steps, previews, strict=True):
                event = ProgressEvent(step, req.total_steps, at - req.arrival_time, preview)
                self._send(req, event)

        self._later(end, progress)

    def _forward(
        self,
        adapter: ModelAdapter,
        batch: list[RequestState],
        done: list[tuple[list[RequestState], int, Mark, Mark]],
    ) -> list[RequestState]:
        """Run one batched step for ``batch``; returns the requests that advanced, and appends
        each successful forward's (requests, rows, start and end marks) to ``done``.

        Faults stay with the requests that cause them: a request whose own update fails is
        failed alone (the adapter reports it with RequestStepFailures); a failure of the shared
        forward is retried in two halves, down to single requests, so only a request that
        breaks the forward by itself fails. Out of memory also lowers the model's batch cap.
        The time of every attempt is charged to the requests in it.
        """
        start = adapter.mark()
        rows = 0
        failures: dict[str, BaseException] = {}
        error: Exception | None = None
        try:
            rows = adapter.denoise_step(batch)
        except RequestStepFailures as e:
            rows, failures = e.rows, e.failures
        except Exception as e:
            error = e
        end = adapter.mark()
        # Every attempt, failed or not, was spent on these requests (charged before any of
        # them ends below, so the charge is in their usage).
        weights = [r.params.rows for r in batch]
        self._later(end, lambda: self._spent(batch, weights, start, end))
        if error is not None:
            return self._retry_failed_forward(adapter, batch, error, done)
        for req in batch:
            if req.request_id in failures:
                err = failures[req.request_id]
                logger.error("step of request %s failed: %s", req.request_id, err, extra=req.log_extra)
                self._fail(req, f"the denoising step failed: {type(err).__name__}: {err}")
        stepped = [r for r in batch if r.request_id not in failures]
        if not rows or not stepped:
            return stepped
        self.forwards += 1
        self.last_batch_rows = rows
        images = sum(r.params.num_images for r in batch)
        for req in stepped:
            req.forwards += 1
            req.batch_images_sum += images
        done.append((stepped, rows, start, end))
        return stepped

    def _retry_failed_forward(
        self,
        adapter: ModelAdapter,
        batch: list[RequestState],
        error: Exception,
        done: list[tuple[list[RequestState], int, Mark, Mark]],
    ) -> list[RequestState]:
        """A shared forward failed: fail a lone request, else retry the batch in halves (after
        out of memory, also lower the model's batch cap)."""
        model = batch[0].model
        oom = adapter.is_out_of_memory(error)
        if oom:
            adapter.recover_from_oom()
            self._lower_capacity(model, sum(r.params.num_images for r in batch), error)
        if len(batch) == 1:
            what = "ran out of accelerator memory even alone" if oom else f"failed: {error}"
            logger.error("denoising step of request %s %s", batch[0].request_id, what, exc_info=error)
            self._fail(batch[0], f"the denoising step {what}")
            return []
        logger.warning(
            "batched step of %d requests of %s failed (%s: %s); retrying in halves",
            len(batch),
            model,
            type(error).__name__,
            error,
        )
        half = len(batch) // 2
        return self._forward(adapter, batch[:half], done) + self._forward(adapter, batch[half:], done)

    def _lower_capacity(self, model: str, images: int, exc: BaseException) -> None:
        """After out of memory with ``images`` in one forward, cap the model's batches below it."""
        cap = self.scheduler.capacity[model]
        new = max(1, min(cap, images // 2))
        if new < cap:
            self.scheduler.capacity[model] = new
            with self._cv:
                self._free_images[model] -= cap - new
            logger.warning(
                "out of accelerator memory with %d images in one forward of %s: batch cap %d -> %d (%s)",
                images,
                model,
                cap,
                new,
                exc,
            )

    def _finish(self, model: str, reqs: list[RequestState]) -> None:
        adapter = self.models[model]
        start = adapter.mark()
        try:
            decoded = adapter.decode(reqs)
        except Exception as e:
            logger.exception("decoding %d request(s) of %s failed", len(reqs), model)
            for req in reqs:
                self._fail(req, f"decoding the image failed: {e}")
            return
        end = adapter.mark()
        # Their slots are free for the next step; the images are sent once they are on the host.
        now = self.clock()
        for req in reqs:
            self.scheduler.finish(req, RequestStatus.FINISHED_OK, now)
            self._release(req)

        def results() -> None:
            dt = self._spent(reqs, [r.params.num_images for r in reqs], start, end)
            self.observer.images_decoded(reqs, dt)
            self._send_results(reqs, decoded)

        self._later(end, results, finals=reqs)

    def _send_results(self, reqs: list[RequestState], decoded: list[list[Any]]) -> None:
        now = self.clock()
        for req, imgs in zip(reqs, decoded, strict=True):
            usage = Usage(
                steps=req.params.steps,
                queue_s=(req.admitted_time or now) - req.arrival_time,
                total_s=now - req.arrival_time,
                accelerator_s=req.accelerator_s,
                mean_batch_size=req.batch_images_sum / max(1, req.forwards),
                cost_usd=req.accelerator_s * self.config.accelerator_cost_per_hour / 3600.0,
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
            self._deliver_final(req, ResultEvent(imgs, req.params.seeds, usage), usage)

    def _spent(self, reqs: Sequence[RequestState], weights: Sequence[int], start: Mark, end: Mark) -> float:
        """Account the accelerator time from ``start`` to ``end`` as spent on ``reqs``
        (split by ``weights``); returns it."""
        dt = end.seconds_since(start)
        self.busy_s += dt
        self._charge(reqs, dt, weights)
        return dt

    @staticmethod
    def _charge(reqs: Sequence[RequestState], seconds: float, weights: Sequence[int]) -> None:
        """Split ``seconds`` of shared accelerator work among ``reqs`` by their weights
        (the rows or images each added), so the shares add up to the whole."""
        total = sum(weights)
        for req, w in zip(reqs, weights, strict=True):
            req.accelerator_s += seconds * w / total

    def _fail(self, req: RequestState, message: str) -> None:
        self.scheduler.finish(req, RequestStatus.FINISHED_ERROR, self.clock())
        self._release(req)
        self._emit_final(req, FailedEvent(RequestStatus.FINISHED_ERROR.finish_reason, message))

    def _release(self, req: RequestState) -> None:
        if req.work is not None:
            self.models[req.model].release(req)

    def _end_all(self, status: RequestStatus, message: str) -> None:
        for req in self.scheduler.fail_all(status, self.clock()):
            self._release(req)
            self._emit_final(req, FailedEvent(status.finish_reason, message))
        # Submissions that never reached the scheduler.
        with self._cv:
            pending = [p for kind, p, _ in self._inbox if kind == "submit"]
            self._inbox.clear()
        for req in pending:
            req.status = status
            self._emit_final(req, FailedEvent(status.finish_reason, message))

    def _report_positions(self) -> None:
        positions = self.scheduler.queue_positions()
        for req in self.scheduler.waiting:
            pos = positions[req.request_id]
            if pos != req.reported_position:
                req.reported_position = pos
                info = self.models[req.model].info
                est = self.scheduler.estimated_wait(
                    pos, req.model, self._step_time[req.model], info.default_steps
                )
                self._emit(req, QueuedEvent(pos, est))

    # -- events ----------------------------------------------------------------------------
    def _emit(self, req: RequestState, event: EngineEvent) -> None:
        """Send ``event`` after everything queued before it (see :meth:`_later`)."""
        self._later(None, lambda: self._send(req, event))

    def _send(self, req: RequestState, event: EngineEvent) -> None:
        sink = self._sinks.get(req.request_id)
        if sink is None:
            return
        try:
            sink(event)
        except Exception:  # a broken sink must not stop the batch
            logger.exception("event sink for request %s failed", req.request_id)

    def _emit_final(self, req: RequestState, event: EngineEvent) -> None:
        """Send the request's one terminal event after everything queued before it."""
        self._later(None, lambda: self._deliver_final(req, event), finals=(req,))

    def _deliver_final(self, req: RequestState, event: EngineEvent, usage: Usage | None = None) -> None:
        """Send the request's one terminal event and forget it (the one place every accepted
        request ends, so observers count each exactly once)."""
        if not req.params.internal:
            reason = event.reason if isinstance(event, FailedEvent) else FinishReason.OK
            self.observer.request_finished(req, reason, self.clock(), usage)
        self._send(req, event)
        with self._cv:
            self._sinks.pop(req.request_id, None)
            self._queued.pop(req.request_id, None)
            if self._running.pop(req.request_id, None) is not None:
                self._free_images[req.model] += req.params.num_images
            self._cv.notify_all()
