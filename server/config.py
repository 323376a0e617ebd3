"""One typed settings object for the server: command-line flags over ``STEPSERVE_*``
environment variables over defaults, validated at start-up."""

from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any

from .engine.engine import EngineConfig
from .engine.models.registry import DEFAULT_MODEL_NAME
from .engine.types import QUANTIZATIONS

# The engine's own defaults are the flags' defaults (defined once, in EngineConfig).
_ENGINE = EngineConfig()

# Per-model serving settings --model-option may set (also the keys of a model's stepserve.json).
MODEL_OPTION_KEYS = {
    "default_steps",
    "default_guidance_scale",
    "default_sampler",
    "default_width",
    "default_height",
    "min_size",
    "max_size",
    "max_steps",
    "max_images_per_request",
    "preview_decoder",
    "max_cache_interval",
    "quantization",
}
PRESET_KEYS = {"presets.draft", "presets.standard", "presets.high"}
# The feature-caching interval each preset selects (stepserve.json: "cache_intervals").
CACHE_INTERVAL_KEYS = {"cache_intervals.draft", "cache_intervals.standard", "cache_intervals.high"}


def _scalar(raw: str) -> Any:
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def redis_url_problem(url: str) -> str | None:
    """What is wrong with a Redis URL (None: nothing), as redis-py parses it, without connecting."""
    from urllib.parse import urlsplit

    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        return f"scheme {scheme!r} is not redis://, rediss:// or unix://"
    try:
        from redis.connection import parse_url

        parse_url(url)  # type: ignore[no-untyped-call]
    except (ValueError, TypeError) as e:
        return str(e)
    if scheme != "unix" and not urlsplit(url).hostname:
        return "no host"
    return None


class ConfigError(ValueError):
    """A setting is out of range; the message names the setting and its value."""


def _opt(default: Any, help: str, metavar: str = "") -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, "metavar": metavar})
    return field(default=default, metadata={"help": help})


@dataclass
class ServerConfig:
    """Everything ``stepserve serve`` can be told. Each field is one flag (``--max-queue``)
    and one environment variable (``STEPSERVE_MAX_QUEUE``); the flag wins."""

    host: str = _opt("[::]", "address to listen on for gRPC")
    port: int = _opt(50051, "gRPC port (0 picks a free one)")
    models: list[str] = _opt(
        [],
        "model to serve as NAME=PATH, a local diffusers pipeline directory (repeatable; "
        "env: comma-separated); none serves the embedded tiny-shapes model",
        "NAME=PATH",
    )
    model_options: list[str] = _opt(
        [],
        "override a model's serving setting as NAME.KEY=VALUE (repeatable; env: comma-separated); keys: "
        + ", ".join(sorted(MODEL_OPTION_KEYS))
        + ", presets.draft|standard|high, cache_intervals.draft|standard|high; beats the model "
        "directory's stepserve.json",
        "NAME.KEY=VALUE",
    )
    loras: list[str] = _opt(
        [],
        "LoRA adapter as NAME=PATH for the default model or MODEL:NAME=PATH (repeatable; env: "
        "comma-separated); PATH is a .safetensors file, or a directory holding one, in a format "
        "diffusers' load_lora_weights reads (diffusers/PEFT or kohya keys; UNet and text encoders)",
        "[MODEL:]NAME=PATH",
    )
    max_loras_resident: int = _opt(
        64,
        "LoRA adapters kept on the accelerator per model (the least recently used leave; "
        "the rest wait on the host)",
    )
    max_loras_per_request: int = _opt(4, "most LoRA adapters one request may stack")
    lora_batching: str = _opt(
        "mixed",
        "'mixed': requests with different LoRA adapters share each forward; 'separate': each "
        "adapter stack is batched on its own (how servers without per-row adapters batch; for comparison)",
    )
    default_model: str = _opt("", "model an empty GenerateRequest.model selects (default: the first --model)")
    batching: str = _opt(
        "step",
        "'step': continuous batching, requests join and leave between denoising steps; "
        "'request': classic dynamic batching, a formed batch runs to completion (for comparison)",
    )
    scheduling: str = _opt(
        _ENGINE.scheduling,
        "step batching's policy: 'fifo': every running request steps in each forward of its size; "
        "'slo': choose who steps by latency objective (deadline, --interactive-slo-s), interactive "
        "first, least slack first; preempt batch-class requests at step boundaries",
    )
    interactive_slo_s: float = _opt(
        0.0,
        "--scheduling slo: latency objective of PRIORITY_INTERACTIVE requests without a deadline, "
        "seconds after arrival (0 = none)",
    )
    max_paused_images: int = _opt(
        -1,
        "--scheduling slo: most images per model paused (preempted, state kept) beyond the batch "
        "capacity (-1 = the max batch size; 0 = never preempt)",
    )
    max_batch_size: int = _opt(16, "most images one model denoises in one batched forward")
    run_ahead: str = _opt(
        "auto",
        "'on': queue step k+1 on the accelerator before reading step k's timings, previews and images "
        "(no wait for the device per step); 'off': finish each step before the next; "
        "'auto': on for devices that run asynchronously (CUDA), off on CPU",
    )
    max_batch_delay_ms: int = _opt(
        round(_ENGINE.max_batch_delay_s * 1000),
        "request-level batching only: longest a batch waits to fill, in ms",
    )
    max_queue: int = _opt(
        _ENGINE.max_queue,
        "most requests waiting beyond the free batch slots; beyond it Generate answers RESOURCE_EXHAUSTED",
    )
    max_queued_input_bytes: int = _opt(
        _ENGINE.max_queued_input_bytes or 0,
        "most bytes the waiting requests' image inputs may hold (as received, and decoded); beyond it "
        "a request with image inputs answers RESOURCE_EXHAUSTED (0 = no limit)",
    )
    max_request_bytes: int = _opt(
        16 << 20,
        "largest request message accepted, in bytes (the gRPC receive limit; image inputs need room); "
        "beyond it gRPC answers RESOURCE_EXHAUSTED",
    )
    max_image_pixels: int = _opt(
        4096 * 4096, "most pixels an init_image or mask_image may have (checked before decoding)"
    )
    reject_unmeetable_deadlines: bool = _opt(
        _ENGINE.reject_unmeetable_deadlines,
        "refuse at once (RESOURCE_EXHAUSTED, RetryInfo) a request whose deadline the current load "
        "cannot meet, instead of running it and failing late",
    )
    batch_priority_delay_s: float = _opt(
        _ENGINE.batch_priority_delay_s,
        "PRIORITY_BATCH requests are served as if they arrived this many seconds later than they did: "
        "interactive ones go first, but never ones that arrived more than this after (aging)",
    )
    device: str = _opt("auto", "torch device: auto (cuda if available), cpu, cuda, cuda:1, ...")
    dtype: str = _opt(
        "auto", "weights dtype: auto (float16 on GPU, float32 on CPU), float32, float16, bfloat16"
    )
    threads: int = _opt(0, "torch intra-op threads on CPU (0 = one per core)")
    accelerator_cost_per_hour: float = _opt(
        1.0, "price of one accelerator-hour in USD, for Usage.cost_usd (a placeholder: set yours)"
    )
    encode_workers: int = _opt(2, "threads that encode PNG/JPEG/WebP off the engine thread")
    drain_timeout_s: float = _opt(30.0, "seconds in-flight requests get to finish after SIGTERM")
    liveness_stall_s: float = _opt(
        300.0,
        "liveness (and readiness) report NOT_SERVING while the engine has spent this many seconds "
        "in one iteration with work in flight (a wedged engine: a hung device, a deadlock); 0 = off",
    )
    warmup: bool = _opt(True, "run one short generation per model before reporting SERVING")
    max_work: int = _opt(512 * 512 * 50 * 4, "largest width*height*steps*num_images of one request")
    metrics_port: int = _opt(9464, "Prometheus /metrics HTTP port, on --host (0 = no metrics endpoint)")
    tracing: str = _opt(
        "auto",
        "OpenTelemetry tracing: auto (on when OTEL_TRACES_EXPORTER or OTEL_EXPORTER_OTLP_ENDPOINT is set), "
        "otlp, console, or off; endpoint, sampler and resource come from the standard OTEL_* variables",
    )
    trace_steps: str = _opt(
        "events",
        "how denoising steps appear in traces: events (one span event per step), spans (one child "
        "span per step), or none",
    )
    auth_token_file: str = _opt(
        "",
        "file of bearer tokens, one per line, each optionally followed by the models it may use "
        "(comma-separated); empty: no authentication",
    )
    auth_public_services: str = _opt(
        "grpc.health.v1.Health",
        "comma-separated gRPC services callable without a token (add "
        "grpc.reflection.v1alpha.ServerReflection to expose reflection)",
    )
    tls_cert: str = _opt("", "PEM certificate chain for TLS (with --tls-key); empty: plaintext")
    tls_key: str = _opt("", "PEM private key for TLS")
    tls_client_ca: str = _opt("", "PEM CA bundle: require client certificates signed by it (mutual TLS)")
    max_connection_age_s: float = _opt(
        300.0,
        "close each client connection after this long (gracefully, in-flight calls get "
        "--drain-timeout-s), so clients re-resolve and rebalance across replicas; 0 = never",
    )
    result_cache_bytes: int = _opt(
        256 << 20,
        "result cache: most bytes of final images kept in memory (LRU); identical requests with a "
        "seed are answered from it and identical ones in flight run once; 0 = no memory tier "
        "(the cache and coalescing are on while any tier is)",
    )
    result_cache_dir: str = _opt(
        "",
        "result cache: also keep entries in this directory, one file per key (survives restarts); "
        "empty: none",
    )
    result_cache_dir_bytes: int = _opt(
        4 << 30,
        "result cache: most bytes of entries kept in --result-cache-dir; beyond it the least "
        "recently used go (0 = no bound)",
    )
    result_cache_redis: str = _opt(
        "",
        "result cache: also keep entries in Redis at this URL (redis://HOST:PORT/DB, rediss://, "
        "unix://), shared by replicas; empty: none",
    )
    result_cache_ttl_s: int = _opt(
        7 * 86_400, "result cache: seconds a Redis entry lives after it is written (0 = until evicted)"
    )
    log_format: str = _opt("text", "log format: text or json")
    log_level: str = _opt("INFO", "log level: DEBUG, INFO, WARNING, ERROR")

    @property
    def result_cache_on(self) -> bool:
        """Whether any result cache tier is configured (and so coalescing is on)."""
        return bool(self.result_cache_bytes or self.result_cache_dir or self.result_cache_redis)

    def model_specs(self) -> list[tuple[str, Path]]:
        """``--model`` values as (name, path) pairs."""
        out = []
        for spec in self.models:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise ConfigError(f"--model {spec!r}: expected NAME=PATH")
            out.append((name, Path(path)))
        return out

    def lora_specs(self) -> list[tuple[str, str, Path]]:
        """``--lora`` values as (model, name, path); no model means the default model."""
        out = []
        for spec in self.loras:
            target, sep, path = spec.partition("=")
            model, colon, name = target.rpartition(":")
            if not sep or not name or not path or (colon and not model):
                raise ConfigError(f"--lora {spec!r}: expected NAME=PATH or MODEL:NAME=PATH")
            out.append((model or self.default_model_name(), name, Path(path)))
        return out

    def default_model_name(self) -> str:
        """The model an empty GenerateRequest.model (or a --lora without MODEL:) means."""
        specs = self.model_specs()
        return self.default_model or (specs[0][0] if specs else DEFAULT_MODEL_NAME)

    def model_overrides(self) -> dict[str, dict[str, Any]]:
        """``--model-option`` values by model name, as a stepserve.json-shaped dict."""
        out: dict[str, dict[str, Any]] = {}
        for opt in self.model_options:
            target, sep, raw = opt.partition("=")
            name, dot, key = target.partition(".")
            if not sep or not dot or not name:
                raise ConfigError(f"--model-option {opt!r}: expected NAME.KEY=VALUE")
            if key not in MODEL_OPTION_KEYS | PRESET_KEYS | CACHE_INTERVAL_KEYS:
                raise ConfigError(f"--model-option {opt!r}: unknown key {key!r}")
            settings = out.setdefault(name, {})
            if key == "quantization" and raw not in QUANTIZATIONS:
                choices = ", ".join(QUANTIZATIONS)
                raise ConfigError(f"--model-option {opt!r}: unknown quantization {raw!r} (one of {choices})")
            if key in PRESET_KEYS | CACHE_INTERVAL_KEYS:
                group, preset = key.split(".", 1)
                try:
                    settings.setdefault(group, {})[preset] = int(raw)
                except ValueError:
                    raise ConfigError(f"--model-option {opt!r}: expected a whole number") from None
            else:
                settings[key] = _scalar(raw)
        return out

    def validate(self) -> ServerConfig:
        """Check every bound; raises :class:`ConfigError` naming the bad value."""

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(0 <= self.port <= 65535, f"--port {self.port}: must be 0..65535")
        need(
            self.batching in ("step", "request"), f"--batching {self.batching!r}: must be 'step' or 'request'"
        )
        need(1 <= self.max_batch_size <= 1024, f"--max-batch-size {self.max_batch_size}: must be 1..1024")
        need(self.scheduling in ("fifo", "slo"), f"--scheduling {self.scheduling!r}: must be 'fifo' or 'slo'")
        need(
            0 <= self.interactive_slo_s <= 86_400,
            f"--interactive-slo-s {self.interactive_slo_s}: must be 0..86400 (0 = none)",
        )
        need(
            -1 <= self.max_paused_images <= 4096,
            f"--max-paused-images {self.max_paused_images}: must be -1..4096 (-1 = the max batch size)",
        )
        need(
            self.run_ahead in ("auto", "on", "off"),
            f"--run-ahead {self.run_ahead!r}: must be auto, on or off",
        )
        need(
            0 <= self.max_batch_delay_ms <= 60_000,
            f"--max-batch-delay-ms {self.max_batch_delay_ms}: must be 0..60000",
        )
        need(0 <= self.max_queue <= 1_000_000, f"--max-queue {self.max_queue}: must be 0..1000000")
        need(
            self.max_queued_input_bytes >= 0,
            f"--max-queued-input-bytes {self.max_queued_input_bytes}: must be >= 0",
        )
        need(
            1024 <= self.max_request_bytes <= 1 << 30,
            f"--max-request-bytes {self.max_request_bytes}: must be 1024..{1 << 30}",
        )
        need(
            1 <= self.max_image_pixels <= 1 << 30,
            f"--max-image-pixels {self.max_image_pixels}: must be 1..{1 << 30}",
        )
        need(
            self.dtype in ("auto", "float32", "float16", "bfloat16"), f"--dtype {self.dtype!r}: unknown dtype"
        )
        need(self.threads >= 0, f"--threads {self.threads}: must be >= 0")
        need(
            0 <= self.batch_priority_delay_s <= 86_400,
            f"--batch-priority-delay-s {self.batch_priority_delay_s}: must be 0..86400",
        )
        need(
            self.accelerator_cost_per_hour >= 0,
            f"--accelerator-cost-per-hour {self.accelerator_cost_per_hour}: must be >= 0",
        )
        need(1 <= self.encode_workers <= 64, f"--encode-workers {self.encode_workers}: must be 1..64")
        need(self.drain_timeout_s >= 0, f"--drain-timeout-s {self.drain_timeout_s}: must be >= 0")
        need(self.liveness_stall_s >= 0, f"--liveness-stall-s {self.liveness_stall_s}: must be >= 0")
        need(self.max_work > 0, f"--max-work {self.max_work}: must be > 0")
        need(0 <= self.metrics_port <= 65535, f"--metrics-port {self.metrics_port}: must be 0..65535")
        need(
            self.tracing in ("auto", "otlp", "console", "off"),
            f"--tracing {self.tracing!r}: must be auto, otlp, console or off",
        )
        need(
            self.trace_steps in ("none", "events", "spans"),
            f"--trace-steps {self.trace_steps!r}: must be none, events or spans",
        )
        need(
            self.log_format in ("text", "json"), f"--log-format {self.log_format!r}: must be 'text' or 'json'"
        )
        need(bool(self.tls_cert) == bool(self.tls_key), "--tls-cert and --tls-key go together")
        need(not self.tls_client_ca or bool(self.tls_cert), "--tls-client-ca needs --tls-cert and --tls-key")
        for flag, path in (
            ("--tls-cert", self.tls_cert),
            ("--tls-key", self.tls_key),
            ("--tls-client-ca", self.tls_client_ca),
            ("--auth-token-file", self.auth_token_file),
        ):
            need(not path or Path(path).is_file(), f"{flag} {path}: no such file")
        need(
            self.max_connection_age_s >= 0,
            f"--max-connection-age-s {self.max_connection_age_s}: must be >= 0",
        )
        need(
            self.lora_batching in ("mixed", "separate"),
            f"--lora-batching {self.lora_batching!r}: must be 'mixed' or 'separate'",
        )
        need(
            1 <= self.max_loras_resident <= 100_000,
            f"--max-loras-resident {self.max_loras_resident}: must be 1..100000",
        )
        need(
            0 <= self.max_loras_per_request <= 64,
            f"--max-loras-per-request {self.max_loras_per_request}: must be 0..64",
        )
        need(
            0 <= self.result_cache_bytes <= 1 << 40,
            f"--result-cache-bytes {self.result_cache_bytes}: must be 0..{1 << 40} (0 = no memory tier)",
        )
        need(
            not self.result_cache_dir
            or not Path(self.result_cache_dir).exists()
            or Path(self.result_cache_dir).is_dir(),
            f"--result-cache-dir {self.result_cache_dir}: exists and is not a directory",
        )
        need(
            self.result_cache_dir_bytes >= 0,
            f"--result-cache-dir-bytes {self.result_cache_dir_bytes}: must be >= 0 (0 = no bound)",
        )
        need(self.result_cache_ttl_s >= 0, f"--result-cache-ttl-s {self.result_cache_ttl_s}: must be >= 0")
        if self.result_cache_redis:
            problem = redis_url_problem(self.result_cache_redis)
            need(problem is None, f"--result-cache-redis {self.result_cache_redis!r}: {problem}")
        names = [n for n, _ in self.model_specs()]
        need(len(names) == len(set(names)), f"--model names must be unique, got {names}")
        try:
            for name in self.model_overrides():
                need(
                    name in (names or [DEFAULT_MODEL_NAME]),
                    f"--model-option for {name!r}, which is not a --model name",
                )
        except ValueError as e:
            raise ConfigError(str(e)) from e
        loras = self.lora_specs()
        for model, name, _ in loras:
            need(
                model in (names or [DEFAULT_MODEL_NAME]),
                f"--lora {model}:{name}: no --model is called {model!r}",
            )
        pairs = [(m, n) for m, n, _ in loras]
        need(len(pairs) == len(set(pairs)), f"--lora names must be unique per model, got {pairs}")
        if self.default_model and names:
            need(
                self.default_model in names,
                f"--default-model {self.default_model!r} is not among the --model names {names}",
            )
        return self


def _default(f: Field[Any]) -> Any:
    """A dataclass field's default value, whether given directly or by a factory."""
    if f.default is not MISSING:
        return f.default
    factory: Any = f.default_factory
    return factory()


def _parse_env(raw: str, default: Any) -> Any:
    if isinstance(default, bool):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(default, list):
        return [s for s in raw.split(",") if s]
    return type(default)(raw)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per ServerConfig field (defaults are resolved in :func:`from_args`)."""
    for f in fields(ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        default = _default(f)
        env = "STEPSERVE_" + f.name.upper()
        help_text = f"{f.metadata['help']} [env {env}; default {default!r}]"
        if isinstance(default, bool):
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif isinstance(default, list):
            singular = "--" + f.name.removesuffix("s").replace("_", "-")  # --model, --model-option
            parser.add_argument(
                singular,
                dest=f.name,
                action="append",
                default=None,
                metavar=f.metadata["metavar"],
                help=help_text,
            )
        else:
            parser.add_argument(flag, dest=f.name, type=type(default), default=None, help=help_text)


def from_args(ns: argparse.Namespace, environ: dict[str, str] | None = None) -> ServerConfig:
    """Flags over environment over defaults, validated."""
    env = os.environ if environ is None else environ
    kwargs: dict[str, Any] = {}
    for f in fields(ServerConfig):
        value = getattr(ns, f.name, None)
        if value is None:
            raw = env.get("STEPSERVE_" + f.name.upper())
            if raw is None:
                continue
            default = _default(f)
            try:
                value = _parse_env(raw, default)
            except ValueError as e:
                raise ConfigError(f"STEPSERVE_{f.name.upper()}={raw!r}: {e}") from e
        kwargs[f.name] = value
    return ServerConfig(**kwargs).validate()
