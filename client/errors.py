"""The client's one exception type, carrying the status code and decoded error details."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass(frozen=True)
class FieldViolation:
    """A bad request field, as the server's ``google.rpc.BadRequest`` names it."""

    field: str
    description: str


class StepserveError(Exception):
    """A failed call: ``code`` is the gRPC status, ``message`` the server's explanation.

    ``field_violations`` lists bad fields (INVALID_ARGUMENT) and ``retry_after_s`` says when
    to try again (RESOURCE_EXHAUSTED, UNAVAILABLE) when the server sent that detail.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        field_violations: tuple[FieldViolation, ...] = (),
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.field_violations = field_violations
        self.retry_after_s = retry_after_s

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> StepserveError:
        code: grpc.StatusCode = err.code()
        message: str = err.details() or ""
        violations: list[FieldViolation] = []
        retry: float | None = None
        try:
            status = rpc_status.from_call(err)
        except ValueError:
            status = None
        if status is not None:
            for detail in status.details:
                if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    br = error_details_pb2.BadRequest()
                    detail.Unpack(br)
                    violations += [FieldViolation(v.field, v.description) for v in br.field_violations]
                elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    ri = error_details_pb2.RetryInfo()
                    detail.Unpack(ri)
                    retry = ri.retry_delay.ToMilliseconds() / 1000.0
        return cls(code, message, tuple(violations), retry)
