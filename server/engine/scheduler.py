"""Who runs this step: admission, buckets, fairness. Pure Python: no torch, no threads.

The runner asks ``schedule(now)`` for a :class:`StepPlan` before every denoiser forward,
executes it, then calls ``update(plan)`` and ``finish(...)``. Time is passed in, so tests
drive the clock and arrivals explicitly.

Two policies share the bookkeeping in :class:`BaseScheduler`:

- :class:`StepLevelScheduler` (the default) admits waiting requests into the running set
  between any two steps, as long as the model's batch capacity (in images) allows, and
  steps one bucket (model + latent size) per forward, rotating between buckets so none
  starves.
- :class:`SloScheduler` (``--scheduling slo``) is step-level batching that also chooses
  *who* steps: by latency objective (the gRPC deadline, or ``--interactive-slo-s`` for
  interactive requests), interactive before batch class, least slack first. A waiting
  interactive request may displace running batch-class ones (they pause between steps,
  keeping their state, and resume where they stopped), and a forward may leave out requests
  that can afford it when a smaller, faster forward lets urgent ones meet their objectives.
- :class:`RequestLevelScheduler` is the classic dynamic batcher of general model servers:
  it forms a batch (up to the capacity, waiting at most ``max_delay_s`` for it to fill),
  runs that batch until every member finishes, and only then admits the next one.

Every policy estimates a request's finish time with the learned step-time curve
(:class:`~.step_times.StepTimes`), which deadline-aware admission checks deadlines against.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .request import BucketKey, RequestState, RequestStatus
from .step_times import StepTimes
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
    # Running requests of that bucket left out of this forward that stepped in their last
    # chance (now paused), and paused ones stepping again.
    paused: list[RequestState] = field(default_factory=list)
    resumed: list[RequestState] = field(default_factory=list)
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
    # Running requests left out of their bucket's forwards (preempted) now.
    paused: Mapping[str, int] = field(default_factory=dict)
    # LoRA adapters the waiting requests ask for (for an endpoint picker routing on adapter
    # residency; see stepserve_lora_requests_info).
    loras_waiting: Mapping[str, frozenset[str]] = field(default_factory=dict)


class BaseScheduler:
    """Waiting queue, running set, cancellation and deadlines, per-model capacity."""

    def __init__(
        self,
        capacity: dict[str, int],
        priority_delay_s: Mapping[Priority, float] | None = None,
        step_times: StepTimes | None = None,
    ) -> None:
        # Seconds per forward, learned by the runner; estimates of finish times read it.
        self.step_times = StepTimes() if step_times is None else step_times
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
        loras_waiting: dict[str, set[str]] = {m: set() for m in self._capacity}
        for req in self.waiting:
            waiting[req.model] += 1
            input_bytes += req.params.input_bytes
            loras_waiting[req.model].update(n for n, _ in req.params.loras)
        paused = dict.fromkeys(self._capacity, 0)
        for req in self.running.values():
            running[req.model] += 1
            paused[req.model] += req.paused
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
            paused=MappingProxyType(paused),
            loras_waiting=MappingProxyType({m: frozenset(v) for m, v in loras_waiting.items()}),
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
        plan.batch = self._pick_batch(now)
        if plan.batch:
            self._step_counter += 1
            bucket = plan.batch[0].bucket
            self._bucket_last_step[bucket] = self._step_counter
            chosen = {id(r) for r in plan.batch}
            for req in self.running.values():
                if req.bucket != bucket:
                    continue
                if id(req) in chosen:
                    req.last_step = self._step_counter
                    req.last_stepped_at = now
                    if req.paused:
                        req.paused = False
                        plan.resumed.append(req)
                elif not req.paused:
                    req.paused = True
                    req.pauses += 1
                    plan.paused.append(req)
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

    def forward_rows(self, reqs: list[RequestState]) -> int:
        return sum(r.params.rows for r in reqs)

    def step_estimate(self, reqs: list[RequestState]) -> float:
        """Seconds one forward of ``reqs`` (one bucket) is expected to take."""
        p = reqs[0].params
        return self.step_times.estimate(p.model, p.height, p.width, self.forward_rows(reqs))

    def estimate_finish_s(self, req: RequestState, now: float, default_steps: int) -> float:
        """Seconds until ``req`` (waiting) would finish under this policy at the current load:
        the wait for a slot, then its steps in forwards with its bucket's running requests
        (as many as fit the capacity), at the learned step time for that many rows of its
        size. Assumes nobody else joins: the estimate admission checks deadlines against."""
        pos = self.queue_positions()[req.request_id]
        mates = [r for r in self.running.values() if r.bucket == req.bucket]
        running = [r for r in self.running.values() if r.model == req.model] or [req]
        wait = self.estimated_wait(pos, req.model, self.step_estimate(running), default_steps)
        return wait + req.remaining_steps * self.step_estimate(self._fit([req, *mates]))

    def _fit(self, reqs: list[RequestState]) -> list[RequestState]:
        """The first of ``reqs`` that fit the model's capacity (the first always does)."""
        cap = self._capacity[reqs[0].model]
        out: list[RequestState] = []
        used = 0
        for r in reqs:
            if out and used + r.params.num_images > cap:
                break
            out.append(r)
            used += r.params.num_images
        return out

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

    def _pick_batch(self, now: float) -> list[RequestState]:
        """Running requests of the bucket that has waited longest for a step, as many as
        :meth:`_choose` takes, in arrival order."""
        if not self.running:
            return []
        buckets: dict[BucketKey, list[RequestState]] = {}
        for req in self.running.values():
            buckets.setdefault(req.bucket, []).append(req)

        def priority(item: tuple[BucketKey, list[RequestState]]) -> tuple[int, float]:
            key, members = item
            return (self._bucket_last_step.get(key, -1), min(r.arrival_time for r in members))

        _, members = min(buckets.items(), key=priority)
        picked = {id(r) for r in self._choose(members, now)}
        return [r for r in sorted(members, key=lambda r: r.arrival_time) if id(r) in picked]

    def _choose(self, members: list[RequestState], now: float) -> list[RequestState]:
        """Which of a bucket's running requests step. Normally the whole bucket fits its
        model's capacity. After the cap was lowered (out of memory) it may not: then the
        members stepped least recently go first."""
        return self._fit(sorted(members, key=lambda r: (r.last_step, r.arrival_time)))


class StepLevelScheduler(BaseScheduler):
    """Continuous batching: admit into the running set between any two steps."""

    def _admit(self, now: float, plan: StepPlan) -> list[RequestState]:
        admitted: list[RequestState] = []
        used = {m: self.used(m) for m in self._capacity}
        interactive = {m: self.interactive_images(m) for m in self._capacity}
        blocked: set[str] = set()
        for req in list(self.waiting):
            m, n = req.model, req.params.num_images
            if m in blocked:
                continue
            # A request larger than a lowered cap still runs, alone.
            if (
                used[m] + n <= self._capacity[m]
                or used[m] == 0
                or self._may_exceed(req, used[m], interactive[m])
            ):
                used[m] += n
                interactive[m] += n if req.params.priority is Priority.INTERACTIVE else 0
                admitted.append(req)
            else:
                # First come, first served per model: nobody overtakes a request that does
                # not fit yet (that would starve requests for many images).
                blocked.add(m)
        if admitted:
            ids = {id(r) for r in admitted}
            self.waiting = [r for r in self.waiting if id(r) not in ids]
        return admitted

    def interactive_images(self, model: str) -> int:
        return sum(
            r.params.num_images
            for r in self.running.values()
            if r.model == model and r.params.priority is Priority.INTERACTIVE
        )

    def _may_exceed(self, req: RequestState, used: int, interactive: int) -> bool:
        """Whether ``req`` may join beyond the capacity, ``used`` images running (of them
        ``interactive`` interactive): never here (see :class:`SloScheduler`)."""
        return False


class RequestLevelScheduler(BaseScheduler):
    """Classic dynamic batching: a formed batch runs to completion before the next forms."""

    def __init__(
        self,
        capacity: dict[str, int],
        max_delay_s: float,
        priority_delay_s: Mapping[Priority, float] | None = None,
        step_times: StepTimes | None = None,
    ) -> None:
        super().__init__(capacity, priority_delay_s, step_times)
        # Longest a request waits for its batch to fill before the batch starts anyway.
        self.max_delay_s = max_delay_s

    def estimate_finish_s(self, req: RequestState, now: float, default_steps: int) -> float:
        """The running batch's last member's steps first (nobody joins a running batch), then
        the batch forming wait, then its own steps with the waiting requests ahead of it that
        share its batch."""
        wait = 0.0
        if self.running:
            batch = list(self.running.values())
            wait = max(r.remaining_steps for r in batch) * self.step_estimate(batch)
        ahead = [r for r in self.waiting if r.bucket == req.bucket]
        mates = self._fit(ahead[: ahead.index(req) + 1])
        if not any(r is req for r in mates):  # not in the next batch: one more batch's time
            wait += max(r.remaining_steps for r in mates) * self.step_estimate(mates)
            mates = [req]
        return wait + self.max_delay_s + req.remaining_steps * self.step_estimate(mates)

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
        # (One expression for both, so that waking at wake_at always starts the batch.)
        start_by = head.arrival_time + self.max_delay_s
        if not full and now < start_by:
            plan.wake_at = start_by
            return []
        ids = {id(r) for r in chosen}
        self.waiting = [r for r in self.waiting if id(r) not in ids]
        return chosen


class SloScheduler(StepLevelScheduler):
    """Step-level batching that chooses who steps by latency objective.

    A request's objective is its deadline when it has one, else ``interactive_slo_s`` after
    its arrival for interactive requests (None: no objective). Before each forward the bucket's
    running requests are ranked: overdue for a step (paused longer than ``max_pause_s``: the
    aging bound, so nobody starves), then interactive before batch class, then requests that
    can still meet their objective before those that cannot even alone, then least slack
    (time left to the objective minus the remaining steps at the current step time), then
    arrival. The forward takes the ranked requests that fit the capacity, and then possibly
    fewer: when some would miss their objectives at this forward's step time and a smaller
    forward (leaving out the lowest ranked that can afford a pause: no objective, or slack to
    spare) lets more objectives be met, it takes the smallest such set; ties keep the
    larger forward (throughput). Requests left out pause, keeping latents, sampler state and
    embeddings, and resume where they stopped.

    Preemption: a waiting interactive request is admitted beyond the capacity while the
    running interactive images fit it and the running set stays within capacity plus
    ``max_paused_images`` (the cap on paused work): ranked first, it displaces batch-class
    requests at the next step boundary.
    """

    def __init__(
        self,
        capacity: dict[str, int],
        priority_delay_s: Mapping[Priority, float] | None = None,
        step_times: StepTimes | None = None,
        *,
        interactive_slo_s: float | None = None,
        max_paused_images: int | None = None,
        max_pause_s: float | None = None,
    ) -> None:
        super().__init__(capacity, priority_delay_s, step_times)
        self.interactive_slo_s = interactive_slo_s
        self.max_paused_images = {
            m: c if max_paused_images is None else max_paused_images for m, c in capacity.items()
        }
        self.max_pause_s = (
            self.priority_delay_s.get(Priority.BATCH, DEFAULT_BATCH_PRIORITY_DELAY_S)
            if max_pause_s is None
            else max_pause_s
        )

    def objective(self, req: RequestState) -> float | None:
        """When ``req`` should be done (engine clock), or None: its deadline, or for an
        interactive request the class objective if that comes first (callers often set a
        generous deadline as a safety net; the client library and gRPC tools do: it must not
        turn the service's target off)."""
        soft = self._class_objective(req)
        deadline = req.params.deadline
        if deadline is None or (soft is not None and soft < deadline):
            return soft
        return deadline

    def _class_objective(self, req: RequestState) -> float | None:
        if self.interactive_slo_s is not None and req.params.priority is Priority.INTERACTIVE:
            return req.arrival_time + self.interactive_slo_s
        return None

    def queue_key(self, req: RequestState) -> float:
        """Service order of waiting requests: a request with an objective is served as if it
        arrived at its latest start (the objective minus its steps at its step time alone:
        earliest deadline first, shorter work first on equal deadlines); one without, as the
        base policy orders it (arrival, plus its class's delay). A request is overtaken only by
        those whose latest start comes before its own, so none waits forever: past its latest
        start it has missed its objective (and a deadline ends it)."""
        o = self.objective(req)
        base = super().queue_key(req)
        if o is None:
            return base
        p = req.params
        latest_start = o - req.remaining_steps * self.step_times.estimate(p.model, p.height, p.width, p.rows)
        return latest_start + (base - req.arrival_time)  # a batch request keeps its class's delay

    def _overdue(self, req: RequestState, now: float) -> bool:
        since = req.last_stepped_at if req.last_stepped_at is not None else req.admitted_time
        return since is not None and now - since > self.max_pause_s

    def estimate_finish_s(self, req: RequestState, now: float, default_steps: int) -> float:
        """As step-level batching estimates it, except for an interactive request that would
        preempt (the batch is full of others): it steps at once, in the forward this policy
        would choose with it."""
        base = super().estimate_finish_s(req, now, default_steps)
        m, n = req.model, req.params.num_images
        if (
            self.used(m) + n <= self._capacity[m]
            or self.queue_positions()[req.request_id] != 0
            or not self._may_exceed(req, self.used(m), self.interactive_images(m))
        ):
            return base
        chosen = self._choose([*(r for r in self.running.values() if r.bucket == req.bucket), req], now)
        if not any(r is req for r in chosen):
            return base
        return min(base, req.remaining_steps * self.step_estimate(chosen))

    def _may_exceed(self, req: RequestState, used: int, interactive: int) -> bool:
        """Preemption: an interactive request joins a full running set while the interactive
        images fit the capacity (batch-class ones step aside), within the paused-work cap."""
        m, n = req.model, req.params.num_images
        cap = self._capacity[m]
        return (
            req.params.priority is Priority.INTERACTIVE
            and interactive + n <= cap
            and used + n <= cap + self.max_paused_images[m]
        )

    def _choose(self, members: list[RequestState], now: float) -> list[RequestState]:
        interactive_first = sorted(
            members,
            key=lambda r: (
                not self._overdue(r, now),
                r.params.priority is not Priority.INTERACTIVE,
                r.arrival_time,
            ),
        )
        t_ref = self.step_estimate(self._fit(interactive_first))
        objectives = {id(r): self.objective(r) for r in members}

        # A request's finish: its remaining steps, and about one more for decoding it.
        def hopeless(r: RequestState) -> bool:
            o = objectives[id(r)]
            return o is not None and now + (r.remaining_steps + 1) * self.step_estimate([r]) > o

        def key(r: RequestState) -> tuple[bool, bool, bool, float, float]:
            o = objectives[id(r)]
            slack = float("inf") if o is None else o - now - r.remaining_steps * t_ref
            return (
                not self._overdue(r, now),
                r.params.priority is not Priority.INTERACTIVE,
                hopeless(r),
                slack,
                r.arrival_time,
            )

        # Each request with an objective has a step-time budget: the step time that still
        # lets it meet the objective. One that cannot meet it any more keeps its step time
        # alone as budget if the objective is soft (late, it should still be quick); with a
        # deadline it has none (it will be dropped there: no use slowing others for it).
        def budget(r: RequestState, delay: float = 0.0) -> float | None:
            o = objectives[id(r)]
            if o is None:
                return None
            if not hopeless(r):
                return (o - now - delay) / (r.remaining_steps + 1)
            binding = r.params.deadline is not None and r.params.deadline <= o
            return None if binding else self.step_estimate([r])

        # The forward is a prefix of the ranked requests (those fitting the capacity; overdue
        # ones first, always in): the prefix under which the most objectives stay reachable,
        # then the least total lateness of those in it that miss, the longest on ties. A
        # request in the forward keeps its objective if the forward's step time is within its
        # budget; one left out, if after waiting this step
        # its budget still covers the full forward's step time (counted as running in full
        # forwards later). Only batch-class requests and requests with no objective to keep
        # (none, or past a deadline they cannot meet) are ever left out: leaving out
        # interactive requests with objectives for more urgent ones was tried and lost to fifo,
        # in the simulator on a flat (GPU-like) curve and on this CPU's real server (see
        # docs/architecture.md, Scheduling).
        ranked = self._fit(sorted(members, key=key))
        overdue = sum(self._overdue(r, now) for r in ranked)
        graded = [(r, budget(r)) for r in ranked]
        if all(b is None for _, b in graded):
            return ranked  # nothing to keep: everyone steps, as fifo
        t_full = self.step_estimate(ranked)
        best, best_score = ranked, (-1, 0.0)
        for n in range(len(ranked), max(1, overdue) - 1, -1):
            if n < len(ranked):
                left_out, its_budget = graded[n]
                if its_budget is not None and left_out.params.priority is Priority.INTERACTIVE:
                    break
            t = self.step_estimate(ranked[:n])
            met, late = 0, 0.0
            for r, b in graded[:n]:
                if b is not None:
                    met += t <= b
                    # Objectives missed anyway still count by how late: two interactive
                    # requests that cannot both make it still run fast together, not at the
                    # full forward's pace (the real flood's slowest requests did).
                    late += max(0.0, t - b) * (r.remaining_steps + 1)
            for r, b in graded[n:]:
                if b is not None:
                    later = budget(r, delay=t)
                    met += later is not None and t_full <= later
            score = (met, -late)
            if score > best_score:
                best, best_score = ranked[:n], score
        return best


def make_scheduler(
    mode: str,
    capacity: dict[str, int],
    max_delay_s: float,
    priority_delay_s: Mapping[Priority, float] | None = None,
    *,
    policy: str = "fifo",
    step_times: StepTimes | None = None,
    interactive_slo_s: float | None = None,
    max_paused_images: int | None = None,
) -> BaseScheduler:
    """``mode`` is ``"step"`` (continuous batching) or ``"request"`` (classic dynamic
    batching); for ``"step"``, ``policy`` is ``"fifo"`` (every running request steps) or
    ``"slo"`` (:class:`SloScheduler`)."""
    if mode == "step":
        if policy == "slo":
            return SloScheduler(
                capacity,
                priority_delay_s,
                step_times,
                interactive_slo_s=interactive_slo_s,
                max_paused_images=max_paused_images,
            )
        if policy != "fifo":
            raise ValueError(f"unknown scheduling policy {policy!r} (expected 'fifo' or 'slo')")
        return StepLevelScheduler(capacity, priority_delay_s, step_times)
    if mode == "request":
        return RequestLevelScheduler(capacity, max_delay_s, priority_delay_s, step_times)
    raise ValueError(f"unknown batching mode {mode!r} (expected 'step' or 'request')")


__all__ = [
    "DEFAULT_BATCH_PRIORITY_DELAY_S",
    "BaseScheduler",
    "Load",
    "RequestLevelScheduler",
    "SloScheduler",
    "StepLevelScheduler",
    "StepPlan",
    "make_scheduler",
    "priority_delays",
]
