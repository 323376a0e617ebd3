"""Log set-up: human-readable text or one JSON object per line, each record carrying the
request id and trace id of the work it is about."""

from __future__ import annotations

import contextvars
import json
import logging
import time

from opentelemetry import trace

# The request the current asyncio task serves (set by the servicer for its log lines).
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "stepserve_request_id", default=None
)

CONTEXT_FIELDS = ("request_id", "trace_id", "span_id")


class ContextFilter(logging.Filter):
    """Adds ``request_id`` (from :data:`request_id_var`) and ``trace_id``/``span_id`` (from the
    current OpenTelemetry span) to records that lack them; the engine thread, which serves many
    requests at once, passes them per record with ``extra=req.log_extra``. ``record.context`` is
    the same as text (`` [request_id=... trace_id=...]``) for the text format."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            rid = request_id_var.get()
            if rid is not None:
                record.request_id = rid
        if not hasattr(record, "trace_id"):
            ctx = trace.get_current_span().get_span_context()
            if ctx.is_valid:
                record.trace_id = format(ctx.trace_id, "032x")
                record.span_id = format(ctx.span_id, "016x")
        parts = [f"{k}={getattr(record, k)}" for k in ("request_id", "trace_id") if hasattr(record, k)]
        record.context = f" [{' '.join(parts)}]" if parts else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, with any ``extra`` fields a call attached."""

    _std = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "context"}

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in self._std:
                out[k] = v
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(fmt: str = "text", level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s%(context)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
