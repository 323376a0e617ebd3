"""What the servicer's call paths share (servicer.py, cached_generate.py): how an accepted
call is going, the errors that end it, and the two ways it is ended with a status."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import grpc

from stepserve.v1 import image_generation_pb2 as pb

from ..engine.types import FailedEvent, FinishReason, QueuedEvent
from ..observability.metrics import Outcome
from .errors import ApiError

# The servicer's logger: one name for everything about a Generate call (tests and log
# queries select it).
logger = logging.getLogger("stepserve.server.api.servicer")


@dataclass
class Call:
    """How an accepted Generate call is going: when it was accepted, and when and how it
    ended (the engine's terminal event, the API's own failure, or the caller leaving)."""

    accepted_at: float
    ended_at: float | None = None
    outcome: Outcome | None = None

    def end(self, outcome: Outcome) -> None:
        """The call ended with ``outcome``; the first ending's time is kept (a result whose
        encoding then fails ends at the result, as an error)."""
        if self.ended_at is None:
            self.ended_at = time.monotonic()
        self.outcome = outcome


class StageError(Exception):
    """A step of the API's own work for a request (``stage``) failed; the cause is chained."""

    def __init__(self, stage: str) -> None:
        super().__init__(stage)
        self.stage = stage


class EngineFailure(Exception):
    """The engine ended the request without a result."""

    def __init__(self, event: FailedEvent) -> None:
        super().__init__(event.message)
        self.event = event


class Rejoin(Exception):
    """The flight a call followed ended for its leader's deadline (passed, or refused as
    unmeetable), not the call's own."""


DEADLINES = (FinishReason.DEADLINE, FinishReason.UNMEETABLE_DEADLINE)


async def guard(context: grpc.aio.ServicerContext, rid: str, stage: StageError, error: Exception) -> None:
    """The guard at the gRPC edge: an exception the servicer did not expect ends the call
    with INTERNAL naming what failed (never gRPC's bare UNKNOWN), logged with the request id."""
    cause = error.__cause__ if isinstance(error, StageError) and error.__cause__ is not None else error
    who = f"request {rid}" if rid else "a request"
    logger.error("%s: %s failed", who, stage.stage, exc_info=cause, extra={"request_id": rid} if rid else {})
    await context.abort(
        grpc.StatusCode.INTERNAL, f"{who}: {stage.stage} failed: {type(cause).__name__}: {cause}"
    )


async def abort(context: grpc.aio.ServicerContext, error: ApiError) -> None:
    """End the call with ``error`` and its ``google.rpc`` details.

    Same as ``abort_with_status``, but through ``abort`` so that the OpenTelemetry interceptor's
    context wrapper records the status code on the server span.
    """
    status = error.to_status()
    await context.abort(status.code, status.details, status.trailing_metadata)


def queued_response(request_id: str, event: QueuedEvent) -> pb.GenerateResponse:
    """The stream response for a queue-position event."""
    return pb.GenerateResponse(
        request_id=request_id,
        queued=pb.Queued(position=event.position, estimated_wait_ms=int(event.estimated_wait_s * 1000)),
    )
