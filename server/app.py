"""Assemble and run a stepserve server: gRPC (service, health, reflection) + engine."""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio
from grpc_health.v1.health_pb2_grpc import add_HealthServicer_to_server
from grpc_reflection.v1alpha import reflection
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.sdk.trace import TracerProvider

from stepserve import __version__
from stepserve.v1 import image_generation_pb2 as pb

from .api.auth import BearerTokenAuth, load_tokens
from .api.cache_key import ModelFingerprint
from .api.registration import add_to_server
from .api.result_cache import ResultCache, build_stores
from .api.servicer import ImageGenerationServicer
from .api.validation import Limits
from .config import ConfigError, ServerConfig
from .engine.engine import Engine, EngineConfig
from .engine.fault_injection import ENV as FAULTS_ENV
from .engine.fault_injection import Faults
from .engine.lora import LoraLoadError
from .engine.models import DEFAULT_MODEL_NAME, ModelAdapter, default_model_path, load_model
from .engine.models.registry import ModelLoadError
from .engine.observer import EngineObserver
from .engine.types import EngineEvent, FailedEvent, GenerationParams, ResultEvent, Task
from .model_digest import files_digest
from .observability.metrics import EngineCollector, Metrics, MetricsObserver
from .observability.tracing import TRACER_NAME, TracingObserver, build_tracer_provider, tracing_exporter_name

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ImageGenerationService"].full_name
# Health service name for liveness probes: SERVING from start until the engine dies, and
# still SERVING while draining (so a liveness probe never kills a pod finishing its streams).
# "" and SERVICE_NAME are readiness: SERVING only while new requests are welcome.
LIVENESS_SERVICE = "stepserve.liveness"
# Requests are small; responses carry images (a few MB at most for SDXL-size PNGs x 8).
MAX_SEND_BYTES = 64 << 20


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str) -> torch.dtype | None:
    return None if dtype == "auto" else getattr(torch, dtype)


def load_models(config: ServerConfig) -> dict[str, ModelAdapter]:
    """Load every configured model (or the embedded default), by name."""
    specs = config.model_specs() or [(DEFAULT_MODEL_NAME, default_model_path())]
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype)
    models: dict[str, ModelAdapter] = {}
    overrides = config.model_overrides()
    for name, path in specs:
        logger.info("loading model %s from %s on %s", name, path, device)
        models[name] = load_model(
            name,
            path,
            device=device,
            dtype=dtype,
            max_batch_size=config.max_batch_size,
            overrides=overrides.get(name),
            max_loras_resident=config.max_loras_resident,
        )
        models[name].info = replace(models[name].info, max_loras_per_request=config.max_loras_per_request)
    for model, name, path in config.lora_specs():
        logger.info("registering LoRA %s for model %s from %s", name, model, path)
        try:
            models[model].register_lora(name, path)
        except LoraLoadError as e:
            raise ModelLoadError(f"--lora {model}:{name}={path}: {e}") from e
    return models


def model_fingerprint(adapter: ModelAdapter) -> ModelFingerprint:
    """What decides ``adapter``'s pixels besides a request (result_cache.ModelFingerprint).
    A model without a directory (built in code) gets a digest unique to this process: its
    entries are never shared with another."""
    import diffusers

    path = getattr(adapter, "path", None)
    files = files_digest(Path(path)) if path is not None else f"in-process:{id(adapter)}:{__version__}"
    runtime = (
        f"{getattr(adapter, 'dtype', '?')}|{adapter.device.type}|stepserve {__version__}|"
        f"torch {torch.__version__}|diffusers {diffusers.__version__}"
    )
    loras = {name: files_digest(Path(lora.source)) for name, lora in getattr(adapter, "loras", {}).items()}
    return ModelFingerprint(
        files=files, runtime=runtime, loras=loras, options={"quantization": adapter.info.quantization}
    )


async def build_result_cache(
    config: ServerConfig, models: dict[str, ModelAdapter], metrics: Metrics
) -> ResultCache | None:
    """The configured result cache (None: off). A directory that cannot be written is a
    configuration error; a Redis that does not answer yet is only logged (it may come later,
    and the server works without it)."""
    if not config.result_cache_on:
        return None
    if config.result_cache_dir:
        root = Path(config.result_cache_dir)
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = root / ".stepserve-write-probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"--result-cache-dir {root}: cannot write there: {e}") from e
    stores = build_stores(
        config.result_cache_bytes,
        config.result_cache_dir,
        config.result_cache_dir_bytes,
        config.result_cache_redis,
        config.result_cache_ttl_s,
        metrics,
    )
    fingerprints = {}
    for name, adapter in models.items():
        fingerprints[name] = await asyncio.to_thread(model_fingerprint, adapter)
    cache = ResultCache(stores, metrics, fingerprints)
    metrics.init_cache(list(models), [s.name for s in stores])
    for store in stores:
        client = getattr(store, "client", None)
        if client is not None:
            try:
                await client.ping()
            except Exception as e:
                logger.warning(
                    "result cache: Redis at %s does not answer (%s); serving without it until it does",
                    config.result_cache_redis,
                    e,
                )
    logger.info("result cache on: %s", ", ".join(s.name for s in stores))
    return cache


def default_model_name(config: ServerConfig) -> str:
    return config.default_model_name()


class StepServer:
    """A stepserve instance in this process: ``await start()``, ``await load()``, ``await stop()``.

    ``tracer_provider`` overrides the one ``config.tracing`` would build (tests pass one with an
    in-memory exporter); without either, nothing is traced.
    """

    def __init__(
        self,
        config: ServerConfig,
        models: dict[str, ModelAdapter] | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.config = config
        self._preloaded = models
        self.models: dict[str, ModelAdapter] = {}
        self.engine: Engine | None = None
        self.port = 0
        self.metrics_port = 0
        self._metrics_http: WSGIServer | None = None
        self.pool = ThreadPoolExecutor(config.encode_workers, thread_name_prefix="stepserve-encode")
        self.health = health_aio.HealthServicer()
        self.metrics = Metrics()
        self.metrics.build_info.labels(__version__).set(1)
        self._owns_tracer_provider = False
        if tracer_provider is None:
            exporter = tracing_exporter_name(config.tracing)
            if exporter is not None:
                tracer_provider = build_tracer_provider(exporter, __version__)
                self._owns_tracer_provider = True
                logger.info("tracing on: %s exporter", exporter)
        self.tracer_provider = tracer_provider
        tracer = (
            tracer_provider.get_tracer(TRACER_NAME, __version__)
            if tracer_provider is not None
            else trace.NoOpTracer()
        )
        self.servicer = ImageGenerationServicer(
            default_model_name(config),
            Limits(max_work=config.max_work, max_image_pixels=config.max_image_pixels),
            self.pool,
            self.metrics,
            tracer,
        )
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if tracer_provider is not None:
            interceptors.append(aio_server_interceptor(tracer_provider=tracer_provider))  # type: ignore[no-untyped-call]
        if config.auth_token_file:
            interceptors.append(
                BearerTokenAuth(
                    load_tokens(config.auth_token_file),
                    [s.strip() for s in config.auth_public_services.split(",") if s.strip()],
                    default_model_name(config),
                    on_denied=lambda code: self.metrics.auth_failures.labels(code.name).inc(),
                )
            )
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", config.max_request_bytes),
            ("grpc.max_send_message_length", MAX_SEND_BYTES),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
        if config.max_connection_age_s > 0:
            options += [
                ("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)),
                # Streams open when the age is reached get as long as a drain to finish.
                ("grpc.max_connection_age_grace_ms", int(max(config.drain_timeout_s, 1.0) * 1000)),
            ]
        self.server = grpc.aio.server(
            interceptors=interceptors,
            options=options,
        )
        add_to_server(self.servicer, self.server)
        add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )
        self.failed = asyncio.Event()
        self._watchdog: asyncio.Future[None] | None = None

    async def _set_health(self, serving: bool, liveness: bool = True) -> None:
        def status(ok: bool) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
            return (
                health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
            )

        for name in ("", SERVICE_NAME):
            await self.health.set(name, status(serving))
        await self.health.set(LIVENESS_SERVICE, status(liveness))

    async def start(self) -> int:
        """Listen (health says NOT_SERVING until :meth:`load` finishes); returns the port."""
        address = f"{self.config.host}:{self.config.port}"
        if self.config.tls_cert:
            self.port = self.server.add_secure_port(address, self._tls_credentials())
        else:
            self.port = self.server.add_insecure_port(address)
        await self._set_health(False)
        await self.server.start()
        logger.info("stepserve listening on %s:%d", self.config.host, self.port)
        if self.config.metrics_port:
            self._metrics_http = self.metrics.serve(self.config.host, self.config.metrics_port)
            self.metrics_port = self._metrics_http.server_port
            logger.info("metrics on http://%s:%d/metrics", self.config.host, self.metrics_port)
        return self.port

    def _tls_credentials(self) -> grpc.ServerCredentials:
        c = self.config
        ca = Path(c.tls_client_ca).read_bytes() if c.tls_client_ca else None
        return grpc.ssl_server_credentials(
            [(Path(c.tls_key).read_bytes(), Path(c.tls_cert).read_bytes())],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )

    async def load(self) -> None:
        """Load models, start the engine, warm up, then report SERVING."""
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        faults = Faults.from_env()
        if faults:
            logger.warning("%s is set: injecting faults (testing only): %s", FAULTS_ENV, faults)
        if self._preloaded is not None:
            self.models = self._preloaded
        else:
            self.models = await asyncio.to_thread(faults.slow_load, load_models, self.config)
        if faults:
            for adapter in self.models.values():
                adapter.faults = faults
        self.servicer.cache = await build_result_cache(self.config, self.models, self.metrics)
        observers: list[EngineObserver] = [
            MetricsObserver(self.metrics, self.config.accelerator_cost_per_hour)
        ]
        if self.tracer_provider is not None:
            tracer = self.tracer_provider.get_tracer(TRACER_NAME, __version__)
            observers.append(TracingObserver(tracer, self.config.trace_steps))
        engine = Engine(
            self.models,
            EngineConfig(
                batching=self.config.batching,
                max_queue=self.config.max_queue,
                max_batch_delay_s=self.config.max_batch_delay_ms / 1000.0,
                accelerator_cost_per_hour=self.config.accelerator_cost_per_hour,
                batch_priority_delay_s=self.config.batch_priority_delay_s,
                reject_unmeetable_deadlines=self.config.reject_unmeetable_deadlines,
                run_ahead={"on": True, "off": False}.get(self.config.run_ahead),
                max_queued_input_bytes=self.config.max_queued_input_bytes or None,
                lora_batching=self.config.lora_batching,
                scheduling=self.config.scheduling,
                interactive_slo_s=self.config.interactive_slo_s or None,
                max_paused_images=None
                if self.config.max_paused_images < 0
                else self.config.max_paused_images,
            ),
            observers=observers,
        )
        for name in self.models:
            self.metrics.init_model(name)
        cuda = sorted({str(m.device) for m in self.models.values() if m.device.type == "cuda"})
        self.metrics.registry.register(
            EngineCollector(
                lambda: self.engine,
                {n: m.info.max_batch_size for n, m in self.models.items()},
                cuda,
                lambda: {n: m.lora_residency() for n, m in self.models.items()},
                lambda: {n: m.feature_cache_rows() for n, m in self.models.items()},
                self.config.max_loras_resident,
                lambda: {n: m.resident_loras for n, m in self.models.items()},
            )
        )
        loop = asyncio.get_running_loop()

        def on_failure(exc: BaseException) -> None:
            loop.call_soon_threadsafe(self._on_engine_failure, exc)

        engine.on_failure = on_failure
        engine.start()
        self.engine = engine
        self.servicer.attach(engine, self.models)
        if self.config.warmup:
            for name in self.models:
                await asyncio.to_thread(self._warmup, name)
        self.servicer.ready = True
        await self._set_health(True)
        logger.info("serving models: %s", ", ".join(self.models))
        if self.config.liveness_stall_s > 0:
            self._watchdog = asyncio.ensure_future(self._watch_for_stalls(self.config.liveness_stall_s))

    async def _watch_for_stalls(self, limit_s: float) -> None:
        """Liveness that catches a wedged engine, not only a dead one: while the engine has
        spent ``limit_s`` in one iteration with work in flight, report NOT_SERVING (the
        orchestrator restarts the pod); if it recovers, SERVING again."""
        stalled = False
        while not self.failed.is_set():
            await asyncio.sleep(min(5.0, limit_s / 4))
            if self.failed.is_set():  # the engine died while we slept: it is not "recovered"
                return
            engine = self.engine
            draining = not self.servicer.ready and not stalled  # not ready, and not because of us
            if engine is None or draining:
                continue
            now_stalled = engine.stalled_s() > limit_s and engine.in_flight() > 0
            if now_stalled and not stalled:
                logger.error(
                    "the engine has made no progress for %.0fs with %d request(s) in flight; "
                    "reporting NOT_SERVING",
                    engine.stalled_s(),
                    engine.in_flight(),
                )
                self.servicer.ready = False
                await self._set_health(False, liveness=False)
            elif stalled and not now_stalled:
                logger.warning("the engine is making progress again; reporting SERVING")
                self.servicer.ready = True
                await self._set_health(True)
            stalled = now_stalled

    def _on_engine_failure(self, exc: BaseException) -> None:
        logger.error("engine failed (%s); reporting NOT_SERVING", exc)
        self.servicer.ready = False
        self.failed.set()
        asyncio.ensure_future(self._set_health(False, liveness=False))

    def _warmup(self, name: str) -> None:
        """One short generation of each kind the model serves, one after the other
        (text-to-image, then inpainting, which runs the VAE's encoder too), before the
        model reports SERVING."""
        assert self.engine is not None
        info = self.models[name].info
        base = GenerationParams(
            request_id=f"warmup-{name}",
            internal=True,
            model=name,
            prompt="warm-up",
            negative_prompt="",
            width=info.default_width,
            height=info.default_height,
            steps=2,
            guidance_scale=info.default_guidance_scale,
            seed=0,
            sampler=info.default_sampler,
            cfg=info.runs_cfg(info.default_guidance_scale),
        )
        runs = []
        if Task.TEXT_TO_IMAGE in info.tasks:
            runs.append(base)
        if Task.INPAINTING in info.tasks:
            grey = np.full((base.height, base.width, 3), 128, np.uint8)
            mask = np.zeros((base.height, base.width), np.uint8)
            mask[:, base.width // 2 :] = 255
            runs.append(replace(base, request_id=f"warmup-inpaint-{name}", init_image=grey, mask=mask))
        for params in runs:
            done = threading.Event()
            outcome: list[EngineEvent] = []

            def sink(
                event: EngineEvent, outcome: list[EngineEvent] = outcome, done: threading.Event = done
            ) -> None:
                if isinstance(event, ResultEvent | FailedEvent):
                    outcome.append(event)
                    done.set()

            self.engine.submit(params, sink)
            done.wait()
            if isinstance(outcome[0], FailedEvent):
                raise RuntimeError(f"warm-up of model {name} failed: {outcome[0].message}")

    async def stop(self, drain_timeout_s: float | None = None) -> None:
        """Graceful stop: NOT_SERVING, refuse new work, let in-flight requests finish
        within the drain timeout, end the rest with UNAVAILABLE, close the server."""
        timeout = self.config.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        if self._watchdog is not None:
            self._watchdog.cancel()
        self.servicer.ready = False
        await self._set_health(False, liveness=not self.failed.is_set())
        if self.engine is not None:
            drained = await asyncio.to_thread(self.engine.drain, timeout)
            if not drained:
                logger.warning("drain timeout (%.1fs) passed; ending the remaining requests", timeout)
        # Stop taking calls before ending what is left (HTTP/2 GOAWAY: a call already on its way,
        # such as a client sending again a request that never started here, is refused in a way
        # gRPC retries on another replica); the remaining streams get their status within the
        # grace period.
        closing = asyncio.ensure_future(self.server.stop(grace=2.0))
        if self.engine is not None:
            await asyncio.to_thread(self.engine.stop)
        await closing
        await self.servicer.flights.wait_idle()
        if self.servicer.cache is not None:
            await self.servicer.cache.close()
        self.pool.shutdown(wait=False)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        if self._owns_tracer_provider and self.tracer_provider is not None:
            self.tracer_provider.shutdown()  # flushes spans still in the batch processor
