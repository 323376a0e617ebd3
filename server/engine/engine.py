"""The engine: one thread per accelerator running the scheduler's step plans.

The asyncio server talks to it only through :meth:`Engine.submit` and :meth:`Engine.cancel`
(thread-safe, never blocking on model work) and receives events through a per-request sink
that must not block (the API's sink hands events to the event loop with
``call_soon_threadsafe``). The loop never waits on a client.

Each iteration (:meth:`Engine.run_once`) reads like vLLM's ``EngineCore.step``: move the
inbox into the scheduler, **schedule** (who ends, who joins, who steps), **execute** (the
runner's model work: encode the newcomers, one batched forward), **update** (steps done,
who finished), then previews and decoding of the finished, whose results the completion
queue reads when the accelerator has got there.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .completions import CompletionQueue
from .inbox import EventSink, Inbox, Message, Submit
from .ledger import Ledger
from .models.base import ModelAdapter
from .observer import EngineObserver, ObserverGroup
from .outbox import Outbox
from .request import RequestState, RequestStatus
from .runner import StepRunner
from .scheduler import DEFAULT_BATCH_PRIORITY_DELAY_S, Load, StepPlan, make_scheduler, priority_delays
from .types import FailedEvent, FinishReason, GenerationParams, QueuedEvent

logger = logging.getLogger(__name__)

__all__ = ["Engine", "EngineConfig", "EventSink"]


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings. The defaults here are also the defaults of the server's flags
    (``stepserve.server.config.ServerConfig`` documents them), except the price, which the
    server sets to a placeholder."""

    batching: str = "step"
    max_queue: int = 256
    max_batch_delay_s: float = 0.05
    accelerator_cost_per_hour: float = 0.0
    # Batch-priority requests are served as if they arrived this much later (aging bound).
    batch_priority_delay_s: float = DEFAULT_BATCH_PRIORITY_DELAY_S
    # Refuse at admission a request whose deadline the current load cannot meet.
    reject_unmeetable_deadlines: bool = True
    # Queue step k+1 on the accelerator before reading step k's times, previews and images
    # (see completions.py). None: when a model's device runs asynchronously (CUDA).
    run_ahead: bool | None = None
    # Most host bytes the waiting requests' image inputs may hold (the encoded bytes gRPC keeps
    # with the call, and the decoded pixels); beyond it a request with image inputs is refused
    # like one past max_queue. None: no byte limit.
    max_queued_input_bytes: int | None = 512 << 20
    # "mixed": requests with different LoRA adapters share forwards; "separate": each adapter
    # stack gets batches of its own (what servers without per-row adapters do; for comparison).
    lora_batching: str = "mixed"
    # Step-level batching's policy: "fifo" (every running request steps in its bucket's
    # forwards) or "slo" (choose who steps by objective, preempt at step boundaries).
    scheduling: str = "fifo"
    # slo: interactive requests without a deadline aim to finish this long after arriving.
    interactive_slo_s: float | None = None
    # slo: most images paused (preempted) per model beyond its batch capacity; None: as many
    # as the capacity.
    max_paused_images: int | None = None


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
        self.scheduler = make_scheduler(
            config.batching,
            {n: m.info.max_batch_size for n, m in models.items()},
            config.max_batch_delay_s,
            priority_delays(config.batch_priority_delay_s),
            policy=config.scheduling,
            interactive_slo_s=config.interactive_slo_s,
            max_paused_images=config.max_paused_images,
        )
        self.ledger = Ledger(models)
        self.inbox = Inbox(config.max_queue, self._load(), config.max_queued_input_bytes)
        run_ahead = config.run_ahead
        if run_ahead is None:
            run_ahead = any(m.asynchronous for m in models.values())
        self.run_ahead = run_ahead
        self.completions = CompletionQueue(run_ahead)
        self.observer = ObserverGroup(observers)
        self.outbox = Outbox(self.inbox, self.completions, self.observer, clock, self._load)
        self.runner = StepRunner(
            models,
            self.scheduler,
            self.ledger,
            self.completions,
            self.outbox,
            self.observer,
            clock,
            config.accelerator_cost_per_hour,
        )
        self.on_failure: Callable[[BaseException], None] | None = None
        self._thread: threading.Thread | None = None
        self._wake_at: float | None = None
        # For stalled_s(): when the loop last showed progress, and whether it is asleep
        # waiting for work (then it owes none).
        self._heartbeat = time.monotonic()
        self._asleep = False

    # -- called from any thread ------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread."""
        self.ledger.start()
        self._thread = threading.Thread(target=self.run_forever, name="stepserve-engine", daemon=True)
        self._thread.start()

    def submit(self, params: GenerationParams, sink: EventSink, trace_context: Any = None) -> None:
        """Queue a request; raises :class:`~.inbox.EngineError` subclasses when it cannot be
        taken now, ValueError when it can never be (an id in flight, a model not loaded, more
        images than the model batches). ``trace_context`` (the caller's OpenTelemetry span
        context) goes to observers."""
        self.scheduler.check_admissible(params)  # never let the engine thread meet one
        info = self.models[params.model].info
        if params.task not in info.tasks:
            raise ValueError(f"model {params.model!r} does not serve {params.task.value} requests")
        unknown = sorted({n for n, _ in params.loras} - {x.name for x in info.loras})
        if unknown:
            raise ValueError(f"model {params.model!r} has no LoRA adapter {', '.join(unknown)}")
        self.inbox.submit(Submit(params, self.clock(), trace_context), sink)

    def cancel(self, request_id: str, status: RequestStatus = RequestStatus.FINISHED_CANCELLED) -> None:
        """Drop a request at the next step boundary (no-op if it already ended)."""
        self.inbox.cancel(request_id, status)

    def drain(self, timeout_s: float) -> bool:
        """Refuse new requests and wait up to ``timeout_s`` for in-flight ones to finish.

        Returns True if everything finished; the rest is ended by :meth:`stop`."""
        return self.inbox.wait_until_empty(timeout_s)

    def stop(self) -> None:
        """End every remaining request with SHUTDOWN and stop the thread."""
        self.inbox.close()
        if self._thread is not None:
            self._thread.join()

    def load(self) -> Load:
        """Per model: requests waiting (the inbox's included) and running, and the batch
        capacity, as of the scheduler's last change (one consistent snapshot)."""
        return self.inbox.load()

    def queue_depth(self, model: str | None = None) -> int:
        """Requests accepted and not yet running."""
        waiting = self.inbox.load().waiting
        return waiting.get(model, 0) if model is not None else sum(waiting.values())

    def active_requests(self) -> int:
        """Requests in the running set."""
        return sum(self.inbox.load().running.values())

    def in_flight(self) -> int:
        return self.inbox.in_flight()

    def accelerator_seconds(self) -> tuple[float, float]:
        """(busy, idle) seconds since start: busy is time in model work, idle the rest."""
        return self.ledger.accelerator_seconds()

    def stalled_s(self) -> float:
        """Seconds the loop has been inside one iteration (0 while it sleeps for lack of
        work): a wedged engine (a hung device, a deadlock) shows as a number that only grows."""
        return 0.0 if self._asleep else max(0.0, time.monotonic() - self._heartbeat)

    # -- the engine thread ---------------------------------------------------------------
    def run_forever(self) -> None:
        """The engine thread's body: iterate until stopped, then end what is left with
        SHUTDOWN. If anything escapes (a bug, a lost device), every request ends with the
        error and ``on_failure`` is told."""
        try:
            while self.run_once(block=True) is not None:
                pass
            self.completions.run_all()
            self._end_all(RequestStatus.FINISHED_SHUTDOWN, "the server shut down before the request finished")
            self.completions.run_all()
        except BaseException as e:  # the loop must never die silently
            logger.exception("engine loop failed")
            self.inbox.fail(e)
            message = f"the engine failed: {e}"
            self.completions.run_after_failure(self.outbox.lost(message))
            self._end_all(RequestStatus.FINISHED_ERROR, message)
            self.completions.run_after_failure(self.outbox.lost(message))
            if self.on_failure is not None:
                self.on_failure(e)

    def run_once(self, block: bool = False) -> StepPlan | None:
        """One iteration: take in submissions and cancels, schedule, execute, update.

        The engine thread calls it with ``block=True`` (sleep while idle); tests call it
        directly, without starting the thread, to drive arrivals step by step. Returns the
        executed plan, or None when the engine is stopping.
        """
        if not self._take_inbox(block):
            return None
        self.completions.next_iteration()
        # Newcomers hear their place before anything runs, even if they start right away.
        self._report_positions()
        # Schedule: who ends now, who joins the running set, which bucket steps.
        plan = self.scheduler.schedule(self.clock())
        self._wake_at = plan.wake_at
        self.inbox.publish(self._load())
        # Execute: end the aborted, encode the newcomers, one batched forward.
        self.runner.end_aborted(plan.aborted)
        self.runner.pauses(plan.paused, plan.resumed)
        self.runner.prepare(plan.admitted)
        outcome = self.runner.denoise(plan.batch)
        if outcome.attempts:  # a step is queued: read the previous one while it runs
            self.completions.work_queued()
        # Update: steps done and who finished; their progress, previews and images.
        finished = self.scheduler.update(outcome.stepped)
        self.runner.report_progress(outcome)
        self.runner.finish(finished)
        self._report_positions()
        self.inbox.publish(self._load())
        self.completions.iteration_done(more_work=bool(self.scheduler.running))
        self._heartbeat = time.monotonic()
        return plan

    def _load(self) -> Load:
        """The scheduler's counts now, with the current step times."""
        return self.scheduler.load(self.ledger.step_time_s)

    def idle(self) -> bool:
        """Nothing waits, runs or sits in the inbox (for tests that drive :meth:`run_once`)."""
        return not self.scheduler.has_unfinished() and self.queue_depth() == 0

    def _take_inbox(self, block: bool) -> bool:
        """Move submissions and cancels into the scheduler; with ``block``, first sleep while
        there is nothing to do. Returns False when the loop should stop."""
        s = self.scheduler
        busy = bool(s.running) or (bool(s.waiting) and self._wake_at is None)
        refused: list[tuple[RequestState, FailedEvent]] = []

        def deliver(messages: list[Message]) -> Load:
            for m in messages:
                if isinstance(m, Submit):
                    req = self._request(m)
                    s.add(req)
                    refusal = self._refuse_if_unmeetable(req)
                    if refusal is not None:
                        refused.append((req, refusal))
                else:
                    s.abort(m.request_id, m.status)
            return self._load()

        sleep = block and not busy
        self._asleep = sleep
        try:
            return self.inbox.take(sleep, self._wake_at, self.clock, deliver)
        finally:  # even if a later message broke the engine, the refused hear so
            # The iteration starts now: beat before leaving the sleep, so that no watchdog
            # poll in between reads the idle time as a stall.
            self._heartbeat = time.monotonic()
            self._asleep = False
            for req, event in refused:
                logger.info("request %s refused: %s", req.request_id, event.message, extra=req.log_extra)
                self.outbox.end_later(req, event)

    def _request(self, submission: Submit) -> RequestState:
        req = submission.to_request()
        if self.config.lora_batching == "separate":
            req.batch_tag = submission.params.loras
        return req

    def estimated_finish_s(self, req: RequestState) -> float:
        """Seconds until a just-queued request would finish at the current load, as the
        scheduling policy estimates it with the learned step-time curve."""
        info = self.models[req.model].info
        return self.scheduler.estimate_finish_s(req, self.clock(), info.default_steps)

    def _refuse_if_unmeetable(self, req: RequestState) -> FailedEvent | None:
        """Deadline-aware admission: take a just-queued request out again if the current load
        cannot finish it before its deadline; returns the event it ends with."""
        deadline = req.params.deadline
        if not self.config.reject_unmeetable_deadlines or deadline is None:
            return None
        now = self.clock()
        need = self.estimated_finish_s(req)
        if now + need <= deadline:
            return None
        self.scheduler.finish(req, RequestStatus.FINISHED_REJECTED, now)
        msg = (
            f"the deadline ({max(0.0, deadline - now):.2f}s left) cannot be met at the current load: "
            f"about {need:.2f}s to finish; retry with a longer deadline or later"
        )
        return FailedEvent(FinishReason.UNMEETABLE_DEADLINE, msg, retry_after_s=need)

    def _report_positions(self) -> None:
        positions = self.scheduler.queue_positions()
        for req in self.scheduler.waiting:
            pos = positions[req.request_id]
            if pos != req.reported_position:
                req.reported_position = pos
                info = self.models[req.model].info
                est = self.scheduler.estimated_wait(
                    pos, req.model, self.ledger.step_time_s[req.model], info.default_steps
                )
                self.outbox.send_later(req, QueuedEvent(pos, est))

    def _end_all(self, status: RequestStatus, message: str) -> None:
        """End every request the engine holds, and those still in the inbox, with ``status``."""
        for req in self.scheduler.fail_all(status, self.clock()):
            self.runner.release(req)
            self.outbox.end_later(req, FailedEvent(status.finish_reason, message))
        for submission in self.inbox.take_submissions():
            req = self._request(submission)
            req.status = status
            self.outbox.end_later(req, FailedEvent(status.finish_reason, message))
