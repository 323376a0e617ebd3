"""Bearer-token authentication and per-token model permissions, as a grpc.aio interceptor.

The token file (``--auth-token-file``) holds one token per line, optionally followed by the
models that token may use (comma-separated); without a list a token may use every model.
Blank lines and ``#`` comments are ignored::

    # ops: everything
    3f9c0d8a1b...
    # the thumbnails service: only the small model
    a71e44b2c0... tiny-shapes

No or malformed ``authorization`` metadata, or an unknown token: ``UNAUTHENTICATED``. A known
token asking for a model it may not use: ``PERMISSION_DENIED``. Services listed in
``--auth-public-services`` (default: health, so Kubernetes probes work) need no token.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc


class AuthConfigError(ValueError):
    """The token file is missing, unreadable, or holds no token."""


@dataclass(frozen=True)
class TokenEntry:
    digest: bytes
    models: frozenset[str] | None  # None: every model


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def load_tokens(path: str | Path) -> list[TokenEntry]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise AuthConfigError(f"--auth-token-file {path}: {e.strerror}") from e
    entries = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        token, _, models = line.partition(" ")
        allowed = frozenset(m.strip() for m in models.split(",") if m.strip()) or None
        entries.append(TokenEntry(_digest(token), allowed))
    if not entries:
        raise AuthConfigError(f"--auth-token-file {path}: no tokens in the file")
    return entries


def _aborting_handler(
    like: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``like`` that ends the call with ``code``."""

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover - never reached; makes this an async generator

    kw = {"request_deserializer": like.request_deserializer, "response_serializer": like.response_serializer}
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(bool(like.request_streaming), bool(like.response_streaming))]
    return make(streaming if like.response_streaming else unary, **kw)


class BearerTokenAuth(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(
        self,
        tokens: Iterable[TokenEntry],
        public_services: Iterable[str],
        default_model: str,
        on_denied: Callable[[grpc.StatusCode], None] | None = None,
    ) -> None:
        self.tokens = list(tokens)
        self.public = set(public_services)
        self.default_model = default_model
        self.on_denied = on_denied

    def _lookup(self, token: str) -> TokenEntry | None:
        """The entry for ``token``, comparing against every entry in constant time."""
        digest = _digest(token)
        found = None
        for entry in self.tokens:
            if hmac.compare_digest(entry.digest, digest):
                found = entry
        return found

    def _deny(
        self, handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str
    ) -> grpc.RpcMethodHandler:
        if self.on_denied is not None:
            self.on_denied(code)
        return _aborting_handler(handler, code, message)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        service = details.method.lstrip("/").split("/", 1)[0]
        handler = await continuation(details)
        if handler is None or service in self.public:
            return handler
        metadata = dict(details.invocation_metadata or ())
        auth = str(metadata.get("authorization", ""))
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return self._deny(
                handler,
                grpc.StatusCode.UNAUTHENTICATED,
                "missing credentials: send metadata 'authorization: Bearer <token>'",
            )
        entry = self._lookup(token.strip())
        if entry is None:
            return self._deny(handler, grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not valid")
        if entry.models is None or handler.response_streaming is False:
            return handler
        return self._restrict_models(handler, entry.models)

    def _restrict_models(
        self, handler: grpc.RpcMethodHandler, allowed: frozenset[str]
    ) -> grpc.RpcMethodHandler:
        """Wrap a streaming (Generate) handler to refuse models the token may not use."""
        behavior = handler.unary_stream
        on_denied = self.on_denied

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            model = getattr(request, "model", "") or self.default_model
            if model not in allowed:
                if on_denied is not None:
                    on_denied(grpc.StatusCode.PERMISSION_DENIED)
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED, f"this token may not use model {model!r}"
                )
            async for response in behavior(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
