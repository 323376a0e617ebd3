"""Registering the service's handlers with deserializers that never fail: bytes that are not
a valid request message reach the servicer as :class:`MalformedRequest`, so the caller gets
INVALID_ARGUMENT naming the problem instead of gRPC's bare UNKNOWN."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError, Message

from stepserve.v1 import image_generation_pb2 as pb

from .errors import ApiError


@dataclass(frozen=True)
class MalformedRequest:
    """What the deserializer hands the servicer for bytes that are not a valid request
    message (so the caller gets INVALID_ARGUMENT, not grpc's UNKNOWN)."""

    type_name: str
    error: str

    def to_error(self) -> ApiError:
        return ApiError(
            grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {self.type_name}: {self.error}"
        )


def _lenient(cls: type[Message]) -> Callable[[bytes], Message | MalformedRequest]:
    def deserialize(data: bytes) -> Message | MalformedRequest:
        try:
            return cls.FromString(data)
        except DecodeError as e:
            return MalformedRequest(cls.DESCRIPTOR.full_name, str(e))

    return deserialize


def add_to_server(servicer: object, server: grpc.aio.Server) -> None:
    """Register every method of ``servicer`` (an ImageGenerationServicer), like the generated
    ``add_..._to_server``, but with deserializers that turn malformed bytes into
    :class:`MalformedRequest`."""
    service = pb.DESCRIPTOR.services_by_name["ImageGenerationService"]
    handlers = {}
    for method in service.methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=_lenient(request_cls),
            response_serializer=response_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
