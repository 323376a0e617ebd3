"""Google API error model: standard codes with ``google.rpc`` details, via grpcio-status."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request and what is wrong with it."""

    field: str
    description: str


# The standard trailer through which a server steers gRPC's own retries (gRFC A6): wait this
# many milliseconds before the next attempt, or (negative) do not retry at all.
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
DO_NOT_RETRY_MS = -1


class ApiError(Exception):
    """An error to answer with a specific status code and optional details. ``pushback_ms``
    (None: leave it to the client's backoff) tells gRPC's retry machinery when to retry,
    or with a negative value not to."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        details: Sequence[any_pb2.Any] = (),
        pushback_ms: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = list(details)
        self.pushback_ms = pushback_ms

    def to_status(self) -> grpc.Status:
        """The status, with the ``google.rpc`` details and the retry pushback as trailers."""
        code_value: int = self.code.value[0]
        proto = status_pb2.Status(code=code_value, message=self.message, details=self.details)
        status = rpc_status.to_status(proto)
        if self.pushback_ms is None:
            return status
        pushback = ((RETRY_PUSHBACK_KEY, str(self.pushback_ms)),)
        return status._replace(trailing_metadata=tuple(status.trailing_metadata) + pushback)


def _pack(msg: object) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)  # type: ignore[arg-type]
    return a


def invalid_argument(violations: Sequence[FieldViolation]) -> ApiError:
    """INVALID_ARGUMENT with a ``BadRequest`` listing every bad field."""
    br = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in violations
        ]
    )
    msg = "; ".join(f"{v.field}: {v.description}" for v in violations)
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"invalid request: {msg}", [_pack(br)])


def not_found(resource_type: str, name: str, message: str) -> ApiError:
    info = error_details_pb2.ResourceInfo(
        resource_type=resource_type, resource_name=name, description=message
    )
    return ApiError(grpc.StatusCode.NOT_FOUND, message, [_pack(info)])


def resource_exhausted(
    message: str, retry_after_s: float, subject: str = "queue", time_left_s: float | None = None
) -> ApiError:
    """RESOURCE_EXHAUSTED with ``RetryInfo`` (when to retry) and a ``QuotaFailure``.

    gRPC's automatic retries are pushed back by the same delay, or told not to retry when
    the caller's deadline (``time_left_s``, None: none) ends before the delay does, or the
    refusal is about the deadline itself: then the caller gets this status and its details
    at once, not a DEADLINE_EXCEEDED after retries that could not succeed."""
    delay = duration_pb2.Duration()
    delay.FromMilliseconds(max(1, int(retry_after_s * 1000)))
    retry = error_details_pb2.RetryInfo(retry_delay=delay)
    quota = error_details_pb2.QuotaFailure(
        violations=[error_details_pb2.QuotaFailure.Violation(subject=subject, description=message)]
    )
    hopeless = subject == "deadline" or (time_left_s is not None and time_left_s <= retry_after_s)
    pushback = DO_NOT_RETRY_MS if hopeless else max(1, int(retry_after_s * 1000))
    return ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, [_pack(retry), _pack(quota)], pushback)


def unavailable(message: str, retry_after_s: float | None = None) -> ApiError:
    details = []
    if retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(max(1, int(retry_after_s * 1000)))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    return ApiError(grpc.StatusCode.UNAVAILABLE, message, details)


assert grpc.StatusCode.INVALID_ARGUMENT.value[0] == code_pb2.INVALID_ARGUMENT
