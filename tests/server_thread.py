"""Run an in-process StepServer on port 0 in a background thread with its own event loop,
so tests can use the ordinary blocking clients against it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from stepserve.server.app import StepServer
from stepserve.server.config import ServerConfig
from stepserve.server.engine.models.base import ModelAdapter

T = TypeVar("T")


class ServerThread:
    """The result cache is off unless ``result_cache`` is set: a test that sends one request
    twice (alone and batched, before and after a fault) tests the engine, and a cache hit or a
    coalesced generation would make it pass without running anything."""

    def __init__(
        self,
        config: ServerConfig,
        models: dict[str, ModelAdapter] | None = None,
        load: bool = True,
        result_cache: bool = False,
    ):
        if not result_cache:
            assert not (config.result_cache_dir or config.result_cache_redis), "pass result_cache=True"
            config = replace(config, result_cache_bytes=0)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="test-server-loop")
        self._thread.start()
        self.server: StepServer = self.call(self._make(config, models))
        self.port = self.call(self.server.start())
        if load:
            self.call(self.server.load())

    @classmethod
    def tiny(cls, model_dir: Path, result_cache: bool = False, **settings: Any) -> ServerThread:
        """A server on localhost port 0, no metrics port, serving ``model_dir`` as "tiny",
        with ``settings`` (ServerConfig fields) on top."""
        base: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "metrics_port": 0}
        config = ServerConfig(**{**base, "models": [f"tiny={model_dir}"], **settings})
        return cls(config.validate(), result_cache=result_cache)

    async def _make(self, config: ServerConfig, models: dict[str, ModelAdapter] | None) -> StepServer:
        return StepServer(config, models)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def engine(self):
        return self.server.engine

    def stop(self, drain_timeout_s: float = 5.0) -> None:
        try:
            self.call(self.server.stop(drain_timeout_s))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
