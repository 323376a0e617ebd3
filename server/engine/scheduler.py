"""Who runs this step: admission, buckets, fairness. Pure Python: no torch, no threads.

The runner asks ``schedule(now)`` for a :class:`StepPlan` before every denoiser forward,
executes it, then calls ``update(plan)`` and ``finish(...)``. Time is passed in, so tests
drive the clock and arrivals explicitly.

Two policies share the bookkeeping in :class:`BaseScheduler`:

- :class:`StepLevelScheduler` (the default) admits waiting requests into the running set
  between any two steps, as long as the model's batch capacity (in images) allows, and
  steps one bucket (model + latent size) per forward, rotating between buckets so none
  starves.
- :class:`RequestLevelScheduler` is the classic dynamic batcher of general model servers:
  it forms a batch (up to the capacity, waiting at most ``max_delay_s`` for it to fill),
  runs that batch until every member finishes, and only then admits the next one.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .request import BucketKey, RequestState, RequestStatus
from .types import GenerationParams, Priority

# How much later than an interactive request a batch request counts as having arrived, by
# default (see :meth:`BaseScheduler.queue_key`; ``--batch-priority-delay-s`` sets it).
DEFAULT_BATCH_PRIORITY_DELAY_S = 60.0


def priority_delays(batch_delay_s: float = DEFAULT_BATCH_PRIORITY_DELAY_S) -> dict[Priority, float]:
    """Each priority class's delay: none for interactive requests, ``batch_delay_s`` for batch."""
    return {Priority.INTERACTIVE: 0.0, Priority.BATCH: batch_delay_s}


@dataclass
class StepPlan:
    """What the runner does in one iteration."""

    # Requests that ended before running this step (cancelled, past deadline).
    aborted: list[RequestState] = field(default_factory=list)
    # Requests admitted into the running set now: encode prompts, initialise latents.
    admitted: list[RequestState] = field(default_factory=list)
    # The requests of one bucket that take part in this step's batched forward.
    batch: list[RequestState] = field(default_factory=list)
    # When nothing can run, the earliest time something might (None = on the next event).
    wake_at: float | None = None


@dataclass(frozen=True)
class Load:
    """Per model: requests waiting and running, and the batch capacity (images) now and
    free. A snapshot (see :meth:`BaseScheduler.load`), safe to hand to other threads."""

    waiting: Mapping[str, int]
    running: Mapping[str, int]
    capacity: Mapping[str, int]
    free_images: Mapping[str, int]
    # Seconds until a running request finishes and frees its slot at the model's current
    # step time (one step when none runs): when a refused caller may find room.
    next_slot_s: Mapping[str, float]
    # Host bytes the waiting requests' image inputs hold (encoded and decoded).
    waiting_input_bytes: int = 0


class BaseScheduler:
    """Waiting queue, running set, cancellation and deadlines, per-model capacity."""

    def __init__(
        self, capacity: dict[str, int], priority_delay_s: Mapping[Priority, float] | None = None
    ) -> None:
        # Most images each model may have in its running set (its max batch size), lowered by
        # lower_capacity() after an out-of-memory error; max_images stays the configured limit.
        self._capacity = dict(capacity)
        self.max_images = dict(capacity)
        self.priority_delay_s = dict(priority_delays() if priority_delay_s is None else priority_delay_s)
        # Waiting requests in service order (ascending queue_key; ties keep arrival order).
        self.waiting: list[RequestState] = []
        self.running: dict[str, RequestState] = {}
        self._pending_aborts: dict[str, RequestStatus] = {}
        self._step_counter = 0
        self._bucket_last_step: dict[BucketKey, int] = {}

    # -- intake -------------------------------------------------------------------------
    def check_admissible(self, params: GenerationParams) -> None:
        """Raise ValueError for a request no capacity could ever take (a model it does not
        schedule, more images than the model batches). Reads only settings fixed at start, so
        any thread may call it."""
        limit = self.max_images.get(params.model)
        if limit is None:
            raise ValueError(f"model {params.model!r} is not loaded")
        if params.num_images > limit:
            raise ValueError(
                f"request {params.request_id} asks for {params.num_images} images, more than "
                f"model {params.model!r} can batch ({limit})"
            )

    def add(self, req: RequestState) -> None:
        """Queue ``req``; the engine's door (``Engine.submit``) has already checked it with
        :meth:`check_admissible`, so nothing here can refuse on the engine thread."""
        req.status = RequestStatus.WAITING
        keys = [self.queue_key(r) for r in self.waiting]
        self.waiting.insert(bisect.bisect_right(keys, self.queue_key(req)), req)

    def queue_key(self, req: RequestState) -> float:
        """Service order of waiting requests: arrival time, plus a delay for lower priority.

        A batch request arriving at t is served as if it arrived at t + delay: interactive
        requests arriving before then go first, later ones queue behind it. That is aging: no
        request waits behind newcomers for more than its class's delay, so none starves.
        """
        return req.arrival_time + self.priority_delay_s.get(req.params.priority, 0.0)

    def abort(self, request_id: str, status: RequestStatus) -> None:
        """Mark a request to be dropped at the next step boundary."""
        assert status.is_finished
        self._pending_aborts.setdefault(request_id, status)

    @property
    def capacity(self) -> Mapping[str, int]:
        """Most images each model may have in its running set now (read-only)."""
        return MappingProxyType(self._capacity)

    def lower_capacity(self, model: str, images: int) -> int | None:
        """Cap ``model``'s running set at ``images`` (at least 1) if that is below its cap now
        (after running out of accelerator memory); returns the old cap if it changed."""
        old = self._capacity[model]
        new = max(1, min(old, images))
        if new == old:
            return None
        self._capacity[model] = new
        return old

    def load(self, step_time_s: Mapping[str, float]) -> Load:
        """A snapshot of each model's waiting and running requests and its capacity, with
        ``step_time_s`` each model's seconds per step now."""
        waiting = dict.fromkeys(self._capacity, 0)
        running = dict.fromkeys(self._capacity, 0)
        used = dict.fromkeys(self._capacity, 0)
        fewest_steps_left: dict[str, int] = {}
        input_bytes = 0
        for req in self.waiting:
            waiting[req.model] += 1
            input_bytes += req.params.input_bytes
        for req in self.running.values():
            running[req.model] += 1
            used[req.model] += req.params.num_images
            left = max(1, req.remaining_steps)
            fewest_steps_left[req.model] = min(fewest_steps_left.get(req.model, left), left)
        return Load(
            next_slot_s=MappingProxyType(
                {m: fewest_steps_left.get(m, 1) * step_time_s[m] for m in self._capacity}
            ),
            waiting=MappingProxyType(waiting),
            running=MappingProxyType(running),
            capacity=MappingProxyType(dict(self._capacity)),
            free_images=MappingProxyType({m: max(0, c - used[m]) for m, c in self._capacity.items()}),
            waiting_input_bytes=input_bytes,
        )

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def used(self, model: str) -> int:
        return sum(r.params.num_images for r in self.running.values() if r.model == model)

    def num_waiting(self, model: str | None = None) -> int:
        return sum(1 for r in self.waiting if model is None or r.model == model)

    # -- the step -----------------------------------------------------------------------
    def schedule(self, now: float) -> StepPlan:
        plan = StepPlan()
        plan.aborted = self._collect_aborts(now)
        plan.admitted = self._admit(now, plan)
        for req in plan.admitted:
            req.status = RequestStatus.RUNNING
            req.admitted_time = now
            self.running[req.request_id] = req
        plan.batch = self._pick_batch()
        if plan.batch:
            self._step_counter += 1
            self._bucket_last_step[plan.batch[0].bucket] = self._step_counter
            for req in plan.batch:
                req.last_step = self._step_counter
        return plan

    def update(self, stepped: list[RequestState]) -> list[RequestState]:
        """Record that ``stepped`` ran one step; returns those whose steps are all done."""
        done = []
        for req in stepped:
            req.steps_done += 1
            if req.steps_complete:
                done.append(req)
        return done

    def finish(self, req: RequestState, status: RequestStatus, now: float) -> None:
        """Remove a request from the running set (or queue) with a terminal status."""
        assert status.is_finished
        self.running.pop(req.request_id, None)
        if req.status is RequestStatus.WAITING:
            self.waiting = [r for r in self.waiting if r is not req]
        req.status = status
        req.finished_time = now
        self._pending_aborts.pop(req.request_id, None)

    def fail_all(self, status: RequestStatus, now: float) -> list[RequestState]:
        """End every waiting and running request (shutdown, engine failure)."""
        out = list(self.waiting) + list(self.running.values())
        for req in out:
            self.finish(req, status, now)
        self.waiting.clear()
        return out

    def queue_positions(self) -> dict[str, int]:
        """0-based position of each waiting request among the waiting requests of its model."""
        seen: dict[str, int] = {}
        out = {}
        for req in self.waiting:
            pos = seen.get(req.model, 0)
            out[req.request_id] = pos
            seen[req.model] = pos + 1
        return out

    def estimated_wait(self, position: int, model: str, step_time_s: float, default_steps: int) -> float:
        """Rough time until the request at ``position`` starts: when enough slots free up."""
        free = self._capacity[model] - self.used(model)
        if position < free:
            return 0.0
        k = position - free
        remaining = sorted(r.remaining_steps for r in self.running.values() if r.model == model)
        if k < len(remaining):
            return remaining[k] * step_time_s
        cap = max(1, self._capacity[model])
        rounds = (k - len(remaining)) // cap + 1
        last = remaining[-1] if remaining else 0
        return (last + rounds * default_steps) * step_time_s

    # -- helpers for subclasses ----------------------------------------------------------
    def _collect_aborts(self, now: float) -> list[RequestState]:
        aborted = []
        for req in list(self.waiting) + list(self.running.values()):
            status = self._pending_aborts.get(req.request_id)
            deadline = req.params.deadline
            if status is None and deadline is not None and now >= deadline:
                status = RequestStatus.FINISHED_DEADLINE
            if status is not None:
                self.finish(req, status, now)
                aborted.append(req)
        # Aborts for ids that are not (or no longer) here are stale: forget them.
        self._pending_aborts.clear()
        return aborted

    def _admit(self, now: float, plan: StepPlan) -> list[RequestState]:
        raise NotImplementedError

    def _pick_batch(self) -> list[RequestState]:
        """All running requests of the bucket that has waited longest for a step."""
        if not self.running:
            return []
        buckets: dict[BucketKey, list[RequestState]] = {}
        for req in self.running.values():
            buckets.setdefault(req.bucket, []).append(req)

        def priority(item: tuple[BucketKey, list[RequestState]]) -> tuple[int, float]:
            key, members = item
            return (self._bucket_last_step.get(key, -1), min(r.arrival_time for r in members))

        _, members = min(buckets.items(), key=priority)
        # Normally the whole bucket fits its model's capacity. After the cap was lowered (out
        # of memory) it may not: then the members stepped least recently go first.
        cap = self._capacity[members[0].model]
        chosen: list[RequestState] = []
        used = 0
        for req in sorted(members, key=lambda r: (r.last_step, r.arrival_time)):
            if chosen and used + req.params.num_images > cap:
                break
            chosen.append(req)
            used += req.params.num_images
        picked = {id(r) for r in chosen}
        return [r for r in sorted(members, key=lambda r: r.arrival_time) if id(r) in picked]


class StepLevelScheduler(BaseScheduler):
    """Continuous batching: admit into the running set between any two steps."""

    def _admit(self, now: float, plan: StepPlan) -> list[RequestState]:
        admitted: list[RequestState] = []
        used = {m: self.used(m) for m in self._capacity}
        blocked: set[str] = set()
        for req in list(self.waiting):
            if req.model in blocked:
                continue
            # A request larger than a lowered cap still runs, alone.
            fits = used[req.model] + req.params.num_images <= self._capacity[req.model]
            if fits or used[req.model] == 0:
                used[req.model] += req.params.num_images
                admitted.append(req)
            else:
                # First come, first served per model: nobody overtakes a request that does
                # not fit yet (that would starve requests for many images).
                blocked.add(req.model)
        if admitted:
            ids = {id(r) for r in admitted}
            self.waiting = [r for r in self.waiting if id(r) not in ids]
        return admitted


class RequestLevelScheduler(BaseScheduler):
    """Classic dynamic batching: a formed batch runs to completion before the next forms."""

    def __init__(
        self,
        capacity: dict[str, int],
        max_delay_s: float,
        priority_delay_s: Mapping[Priority, float] | None = None,
    ) -> None:
        super().__init__(capacity, priority_delay_s)
        # Longest a request waits for its batch to fill before the batch starts anyway.
        self.max_delay_s = max_delay_s

    def _admit(self, now: float, plan: StepPlan) -> list[RequestState]:
        if self.running or not self.waiting:
            return []
        head = self.waiting[0]
        candidates = [r for r in self.waiting if r.bucket == head.bucket]
        cap = self._capacity[head.model]
        chosen: list[RequestState] = []
        used = 0
        for req in candidates:
            if chosen and used + req.params.num_images > cap:  # the head runs even if over a lowered cap
                break
            chosen.append(req)
            used += req.params.num_images
        full = used == cap or len(chosen) < len(candidates)
        if not full and now - head.arrival_time < self.max_delay_s:
            plan.wake_at = head.arrival_time + self.max_delay_s
            return []
        ids = {id(r) for r in chosen}
        self.waiting = [r for r in self.waiting if id(r) not in ids]
        return chosen


def make_scheduler(
    mode: str,
    capacity: dict[str, int],
    max_delay_s: float,
    priority_delay_s: Mapping[Priority, float] | None = None,
) -> BaseScheduler:
    """``mode`` is ``"step"`` (continuous batching) or ``"request"`` (classic dynamic batching)."""
    if mode == "step":
        return StepLevelScheduler(capacity, priority_delay_s)
    if mode == "request":
        return RequestLevelScheduler(capacity, max_delay_s, priority_delay_s)
    raise ValueError(f"unknown batching mode {mode!r} (expected 'step' or 'request')")


__all__ = [
    "DEFAULT_BATCH_PRIORITY_DELAY_S",
    "BaseScheduler",
    "Load",
    "RequestLevelScheduler",
    "StepLevelScheduler",
    "StepPlan",
    "make_scheduler",
    "priority_delays",
]
