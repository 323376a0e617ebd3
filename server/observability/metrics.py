"""Prometheus metrics: one registry per server, served on ``--metrics-port``.

Counters and histograms are fed by engine hooks (:class:`MetricsObserver`) and by the API,
which counts every Generate call's outcome (``stepserve_requests_total``) where the status the
caller gets is known. Gauges that describe the engine's present state
(queue depth, active requests, accelerator busy/idle time, device memory) are read from the
engine at scrape time by :class:`EngineCollector`, so they can never drift from the truth.
See README "Metrics" for the list and docs/architecture.md for the cost model.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..engine.observer import EngineObserver
from ..engine.types import FinishReason, Task, Usage

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from ..engine.engine import Engine
    from ..engine.request import RequestState

# Diffusion requests take from tens of milliseconds (a few steps of a small model) to minutes
# (50 steps of SDXL behind a queue).
LATENCY_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)
# One batched denoiser forward: about a millisecond (tiny model, GPU) to seconds (SDXL, CPU).
STEP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
ACCELERATOR_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
COST_BUCKETS_USD = (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)

# Model label for requests that named no model this server knows (bounded cardinality: callers
# cannot create label values).
UNKNOWN_MODEL = "unknown"


class Outcome(enum.Enum):
    """The ``code`` label of ``stepserve_requests_total``: how a Generate call ended."""

    OK = "ok"
    INVALID = "invalid"  # INVALID_ARGUMENT or NOT_FOUND: the caller's mistake
    REJECTED = "rejected"  # RESOURCE_EXHAUSTED: the queue was full or the deadline unmeetable
    UNAVAILABLE = "unavailable"  # not ready, draining, or shut down before finishing
    CANCELLED = "cancelled"  # the caller cancelled or went away
    DEADLINE = "deadline"  # the caller's deadline passed
    ERROR = "error"  # INTERNAL: the server failed


OUTCOME_OF_REASON = {
    FinishReason.OK: Outcome.OK,
    FinishReason.CANCELLED: Outcome.CANCELLED,
    FinishReason.DEADLINE: Outcome.DEADLINE,
    FinishReason.ERROR: Outcome.ERROR,
    FinishReason.SHUTDOWN: Outcome.UNAVAILABLE,
    FinishReason.UNMEETABLE_DEADLINE: Outcome.REJECTED,
}


class Metrics:
    """Every stepserve metric, registered in its own :class:`CollectorRegistry`."""

    def __init__(self, registry: CollectorRegistry | None = None, process_collectors: bool = True) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        if process_collectors:
            # prometheus-client's defaults: process_* (CPU, memory, fds), python_info, python_gc_*.
            for c in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
                r.register(c)
        m = ("model",)

        def hist(name: str, doc: str, buckets: Sequence[float], labels: Sequence[str] = m) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r)

        def counter(name: str, doc: str, labels: Sequence[str] = m) -> Counter:
            return Counter(name, doc, labels, registry=r)

        self.requests = counter(
            "stepserve_requests", "Generate calls by final outcome (code).", ("model", "code")
        )
        self.retries = counter(
            "stepserve_request_retries",
            "Generate calls that were another attempt of an earlier call (gRPC's automatic retries, "
            "or the client library's retry of a stream its replica never started), by outcome (code); "
            "also counted in stepserve_requests_total.",
            ("model", "code"),
        )
        self.request_duration = hist(
            "stepserve_request_duration_seconds",
            "Time from acceptance to the final event of each accepted Generate call.",
            LATENCY_BUCKETS_S,
            ("model", "code"),
        )
        self.queue_wait = hist(
            "stepserve_queue_wait_seconds",
            "Time requests waited before joining the running batch.",
            LATENCY_BUCKETS_S,
        )
        self.first_preview = hist(
            "stepserve_time_to_first_preview_seconds",
            "Time from acceptance to the first preview image (requests that asked for previews).",
            LATENCY_BUCKETS_S,
        )
        self.step_duration = hist(
            "stepserve_step_duration_seconds",
            "Wall time of one batched denoiser forward plus its sampler steps.",
            STEP_BUCKETS_S,
        )
        self.batch_size = hist(
            "stepserve_batch_size", "Images in one batched denoiser forward.", BATCH_BUCKETS
        )
        self.batch_requests = hist(
            "stepserve_batch_requests", "Requests in one batched denoiser forward.", BATCH_BUCKETS
        )
        self.admitted = counter(
            "stepserve_admitted_requests",
            "Requests that joined the running batch, by task (text_to_image, image_to_image, inpainting).",
            ("model", "task"),
        )
        self.preemptions = counter(
            "stepserve_preemptions",
            "Times a running request was paused at a step boundary (left out of its bucket's forward "
            "for more urgent work, --scheduling slo; or after the batch cap was lowered).",
            ("model",),
        )
        self.lora_requests = counter(
            "stepserve_lora_requests",
            "Requests that joined the running batch with a LoRA adapter, by adapter (registered names only).",
            ("model", "lora"),
        )
        self.image_encode = hist(
            "stepserve_image_encode_seconds",
            "Accelerator time of one batched VAE encode of the init images (and masked images) of the "
            "requests that joined together; charged to them alone.",
            STEP_BUCKETS_S,
        )
        self.steps = counter("stepserve_steps", "Denoising steps run, counted once per request per step.")
        self.images = counter("stepserve_images", "Images generated and returned.")
        self.generation_accelerator = hist(
            "stepserve_generation_accelerator_seconds",
            "Accelerator time attributed to each successful generation (Usage.accelerator_seconds).",
            ACCELERATOR_BUCKETS_S,
        )
        self.generation_cost = hist(
            "stepserve_generation_cost_usd",
            "Cost of each successful generation (Usage.cost_usd).",
            COST_BUCKETS_USD,
        )
        self.cost_total = counter(
            "stepserve_cost_usd",
            "Accelerator cost attributed to requests (successful or not), in US dollars.",
        )
        self.accelerator_charged = counter(
            "stepserve_accelerator_charged_seconds",
            "Accelerator seconds attributed to requests (successful or not).",
        )
        self.auth_failures = counter(
            "stepserve_auth_failures", "Calls refused by authentication (code: the status sent).", ("code",)
        )
        # The result cache (server/api/result_cache.py): how each cache-keyed lookup ended, and
        # what the stores did.
        self.cache_hits = counter(
            "stepserve_result_cache_hits",
            "Generate calls answered from the result cache, by the store that had the entry "
            "(memory, disk, redis).",
            ("model", "store"),
        )
        self.cache_misses = counter(
            "stepserve_result_cache_misses",
            "Generate calls with a seed that found no cache entry and no identical generation in "
            "flight, so started a generation.",
        )
        self.cache_coalesced = counter(
            "stepserve_result_cache_coalesced",
            "Generate calls that joined an identical generation already in flight instead of starting one.",
        )
        self.cache_errors = counter(
            "stepserve_result_cache_errors",
            "Result cache store failures (kind: unavailable, an operation failed; corrupt, an entry "
            "failed its checksum and was dropped); the request went on without the store.",
            ("store", "kind"),
        )
        self.cache_evictions = counter(
            "stepserve_result_cache_evictions",
            "Entries a result cache store dropped to stay within its bound (memory: "
            "--result-cache-bytes, disk: --result-cache-dir-bytes), least recently used first.",
            ("store",),
        )
        self.cache_bytes_held = Gauge(
            "stepserve_result_cache_bytes",
            "Bytes of entries the memory store holds now.",
            ("store",),
            registry=r,
        )
        self.build_info = Gauge(
            "stepserve_build_info", "Always 1; labels name the version.", ("version",), registry=r
        )

    # -- API side: how each Generate call ended ----------------------------------------
    def count_refused(self, model: str, outcome: Outcome, retry: bool = False) -> None:
        """A call refused before the engine took it (invalid, rejected, unavailable);
        ``retry``: it was another attempt of an earlier call."""
        self._count(model, outcome, retry)

    def count_finished(self, model: str, outcome: Outcome, seconds: float, retry: bool = False) -> None:
        """An accepted call ended with ``outcome`` ``seconds`` after it was accepted."""
        self._count(model, outcome, retry)
        self.request_duration.labels(model, outcome.value).observe(max(0.0, seconds))

    def _count(self, model: str, outcome: Outcome, retry: bool) -> None:
        self.requests.labels(model, outcome.value).inc()
        if retry:
            self.retries.labels(model, outcome.value).inc()

    # -- the result cache (result_cache.CacheMetrics) ------------------------------------
    def cache_lookup(self, model: str, result: str, store: str = "") -> None:
        """A seeded request's lookup ended: ``hit`` (in ``store``), ``coalesced`` or ``miss``."""
        if result == "hit":
            self.cache_hits.labels(model, store).inc()
        elif result == "coalesced":
            self.cache_coalesced.labels(model).inc()
        else:
            self.cache_misses.labels(model).inc()

    def cache_error(self, store: str, kind: str) -> None:
        self.cache_errors.labels(store, kind).inc()

    def cache_evicted(self, store: str, n: int) -> None:
        self.cache_evictions.labels(store).inc(n)

    def cache_bytes(self, store: str, n: int) -> None:
        self.cache_bytes_held.labels(store).set(n)

    def init_cache(self, models: Sequence[str], stores: Sequence[str]) -> None:
        """Create the cache's label sets at zero (for rates and alerts before traffic)."""
        for model in models:
            self.cache_misses.labels(model)
            self.cache_coalesced.labels(model)
            for store in stores:
                self.cache_hits.labels(model, store)
        for store in stores:
            for kind in ("unavailable", "corrupt"):
                self.cache_errors.labels(store, kind)
            if store in ("memory", "disk"):
                self.cache_evictions.labels(store)
            if store == "memory":
                self.cache_bytes_held.labels(store).set(0)

    def init_model(self, model: str) -> None:
        """Create a model's label sets at zero, so rates and alerts see them before traffic."""
        for outcome in Outcome:
            self.requests.labels(model, outcome.value)
            self.retries.labels(model, outcome.value)
        for metric in (self.steps, self.images, self.cost_total, self.accelerator_charged):
            metric.labels(model)
        for task in Task:
            self.admitted.labels(model, task.value)

    def serve(self, host: str, port: int) -> WSGIServer:
        """Serve ``/metrics`` over HTTP on a daemon thread; returns the server (``.server_port``)."""
        server, _ = start_http_server(port, addr=host.strip("[]"), registry=self.registry)
        return server


class MetricsObserver(EngineObserver):
    """Feeds :class:`Metrics` from the engine's hooks."""

    def __init__(self, metrics: Metrics, cost_per_hour: float) -> None:
        self.m = metrics
        self.usd_per_s = cost_per_hour / 3600.0

    def request_admitted(self, req: RequestState, now: float) -> None:
        self.m.queue_wait.labels(req.model).observe(max(0.0, now - req.arrival_time))
        self.m.admitted.labels(req.model, req.params.task.value).inc()
        for name, _ in req.params.loras:
            self.m.lora_requests.labels(req.model, name).inc()

    def images_encoded(self, reqs: Sequence[RequestState], seconds: float) -> None:
        self.m.image_encode.labels(reqs[0].model).observe(seconds)

    def request_paused(self, req: RequestState, now: float) -> None:
        self.m.preemptions.labels(req.model).inc()

    def batch_stepped(self, batch: Sequence[RequestState], rows: int, seconds: float) -> None:
        model = batch[0].model
        self.m.step_duration.labels(model).observe(seconds)
        self.m.batch_size.labels(model).observe(sum(r.params.num_images for r in batch))
        self.m.batch_requests.labels(model).observe(len(batch))
        # Denoising steps of requests; the warm-up's (internal) forwards count as work only.
        self.m.steps.labels(model).inc(sum(1 for r in batch if not r.params.internal))

    def preview_made(self, req: RequestState, now: float, seconds: float) -> None:
        if req.first_preview_time == now:
            self.m.first_preview.labels(req.model).observe(now - req.arrival_time)

    def request_finished(
        self, req: RequestState, reason: FinishReason, now: float, usage: Usage | None
    ) -> None:
        # The call's outcome is counted by the API, which knows the status the caller got.
        model = req.model
        # Work done for a request that later failed was still spent: it is charged too.
        self.m.accelerator_charged.labels(model).inc(req.accelerator_s)
        self.m.cost_total.labels(model).inc(req.accelerator_s * self.usd_per_s)
        if usage is not None:
            self.m.generation_accelerator.labels(model).observe(usage.accelerator_s)
            self.m.generation_cost.labels(model).observe(usage.cost_usd)
            self.m.images.labels(model).inc(req.params.num_images)


class EngineCollector(Collector):
    """Scrape-time gauges and counters read from the engine's own state."""

    def __init__(
        self,
        engine: Callable[[], Engine | None],
        max_batch_sizes: dict[str, int],
        cuda_devices: Sequence[str] = (),
        lora_residency: Callable[[], dict[str, tuple[int, int, int]]] | None = None,
        feature_cache_rows: Callable[[], dict[str, tuple[int, int]]] | None = None,
        max_loras_resident: int = 0,
        resident_loras: Callable[[], dict[str, frozenset[str]]] | None = None,
    ) -> None:
        self._engine = engine
        self._max_batch = max_batch_sizes
        self._cuda = list(cuda_devices)
        self._loras = lora_residency
        self._feature_rows = feature_cache_rows
        self._max_loras = max_loras_resident
        self._resident_loras = resident_loras

    def describe(self) -> Iterator[Metric]:
        return iter(())  # unchecked collector: names are fixed but values come at scrape time

    def collect(self) -> Iterator[Metric]:
        engine = self._engine()
        queue = _per_model("stepserve_queue_depth", "Requests waiting for a place in the running batch.")
        active = _per_model(
            "stepserve_active_requests", "Requests in the running batch (admitted, not finished)."
        )
        paused = _per_model(
            "stepserve_paused_requests",
            "Requests in the running set left out of their bucket's forwards now (preempted; state kept).",
        )
        cap = _per_model(
            "stepserve_max_batch_size",
            "Most images one batched forward may hold now (lowered after an out-of-memory error).",
        )
        load = engine.load() if engine is not None else None  # one consistent snapshot
        for model, max_batch in self._max_batch.items():
            if load is None:
                waiting, running, size, held = 0, 0, max_batch, 0
            else:
                # The live cap: the engine lowers it after running out of accelerator memory.
                waiting, running, size = load.waiting[model], load.running[model], load.capacity[model]
                held = load.paused.get(model, 0)
            queue.add_metric([model], waiting)
            active.add_metric([model], running)
            paused.add_metric([model], held)
            cap.add_metric([model], size)
        yield queue
        yield active
        yield paused
        yield cap
        # For endpoint pickers (Gateway API Inference Extension): the batch's fill, and the
        # adapters running and waiting in its model-server protocol's labels.
        utilization = _per_model(
            "stepserve_utilization",
            "Requests waiting and running over the most images one forward holds: 1 = a full batch.",
        )
        loras = GaugeMetricFamily(
            "stepserve_lora_requests_info",
            "LoRA adapters loaded on the accelerator and ready to serve, those the waiting requests "
            "ask for that are not, and the most kept loaded (--max-loras-resident), as the Gateway "
            "API Inference Extension's model-server protocol names them; the value is the time of "
            "this snapshot (s).",
            labels=["model", "running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )
        now = time.time()
        ready_by_model = self._resident_loras() if self._resident_loras is not None else {}
        for model in self._max_batch:
            if load is None:
                utilization.add_metric([model], 0.0)
                continue
            size = max(1, load.capacity[model])
            utilization.add_metric([model], (load.waiting[model] + load.running[model]) / size)
            if self._max_loras:
                ready = ready_by_model.get(model, frozenset())
                wanted = load.loras_waiting.get(model, frozenset())
                loras.add_metric(
                    [model, ",".join(sorted(ready)), ",".join(sorted(wanted - ready)), str(self._max_loras)],
                    now,
                )
        yield utilization
        if self._max_loras:
            yield loras
        if self._loras is not None:
            registered = _per_model("stepserve_loras_registered", "LoRA adapters registered (--lora).")
            resident = _per_model(
                "stepserve_loras_resident",
                "LoRA adapters held on the accelerator now (at most --max-loras-resident).",
            )
            loads = CounterMetricFamily(
                "stepserve_lora_loads",
                "LoRA adapters copied to the accelerator (a request's adapter was not resident).",
                labels=["model"],
            )
            for model, (n, held, copied) in self._loras().items():
                registered.add_metric([model], n)
                resident.add_metric([model], held)
                loads.add_metric([model], copied)
            yield registered
            yield resident
            yield loads
        if self._feature_rows is not None:
            rows = CounterMetricFamily(
                "stepserve_feature_cache_rows",
                "Denoiser rows of forwards with feature caching (cache_interval), by path: 'computed' "
                "ran the whole UNet (refreshing, or a request without caching), 'reused' the shallow "
                "path on its request's cached deep features.",
                labels=["model", "path"],
            )
            for model, (computed, reused) in self._feature_rows().items():
                rows.add_metric([model, "computed"], computed)
                rows.add_metric([model, "reused"], reused)
            yield rows
        busy, idle = engine.accelerator_seconds() if engine is not None else (0.0, 0.0)
        yield CounterMetricFamily(
            "stepserve_accelerator_busy_seconds",
            "Accelerator time spent on model work (encode, denoise, preview, decode).",
            value=busy,
        )
        yield CounterMetricFamily(
            "stepserve_accelerator_idle_seconds",
            "Engine wall time with no model work running; not charged to any request.",
            value=idle,
        )
        if self._cuda:
            import torch

            mem = GaugeMetricFamily(
                "stepserve_accelerator_memory_bytes",
                "CUDA memory held by this process (kind: allocated by tensors, reserved by the allocator).",
                labels=["device", "kind"],
            )
            for dev in self._cuda:
                mem.add_metric([dev, "allocated"], torch.cuda.memory_allocated(dev))
                mem.add_metric([dev, "reserved"], torch.cuda.memory_reserved(dev))
            yield mem


def _per_model(name: str, doc: str) -> GaugeMetricFamily:
    """A gauge family with one ``model`` label, filled at scrape time."""
    return GaugeMetricFamily(name, doc, labels=["model"])
