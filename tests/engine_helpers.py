"""Drive an Engine step by step (no thread) and record what it emits and runs."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace

from stepserve.server.engine.engine import Engine, EngineConfig
from stepserve.server.engine.models.base import ModelAdapter
from stepserve.server.engine.observer import EngineObserver
from stepserve.server.engine.types import (
    EngineEvent,
    FailedEvent,
    GenerationParams,
    ResultEvent,
    Sampler,
    runs_cfg,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """Wraps a real adapter's denoise_step to record which requests shared each forward."""

    def __init__(self, adapter: ModelAdapter) -> None:
        self.forwards: list[tuple[list[str], int]] = []
        original = adapter.denoise_step

        def spy(reqs):
            rows = original(reqs)
            self.forwards.append(([r.request_id for r in reqs], rows))
            return rows

        adapter.denoise_step = spy  # type: ignore[method-assign]
        self._adapter = adapter
        self._original = original

    def restore(self) -> None:
        self._adapter.denoise_step = self._original  # type: ignore[method-assign]


class Harness:
    def __init__(
        self, models: dict[str, ModelAdapter], observers: Sequence[EngineObserver] = (), **config: object
    ) -> None:
        self.clock = FakeClock()
        self.engine = Engine(models, EngineConfig(**config), clock=self.clock, observers=observers)  # type: ignore[arg-type]
        self.events: dict[str, list[EngineEvent]] = defaultdict(list)

    def submit(self, params: GenerationParams) -> None:
        self.engine.submit(params, self.events[params.request_id].append)

    def step(self, n: int = 1) -> None:
        for _ in range(n):
            self.engine.run_once()

    def run_until_idle(self, limit: int = 1000) -> None:
        for _ in range(limit):
            if self.engine.idle():
                return
            self.engine.run_once()
        raise AssertionError("engine did not finish")

    def result(self, rid: str) -> ResultEvent:
        final = self.events[rid][-1]
        assert isinstance(final, ResultEvent), final
        return final

    def failure(self, rid: str) -> FailedEvent:
        final = self.events[rid][-1]
        assert isinstance(final, FailedEvent), final
        return final


BASE = GenerationParams(
    request_id="r",
    model="tiny",
    prompt="a small red circle on the left",
    negative_prompt="",
    width=32,
    height=32,
    steps=4,
    guidance_scale=7.5,
    seed=1,
    sampler=Sampler.EULER,
    cfg=True,
)


def params(rid: str, **kw: object) -> GenerationParams:
    """BASE with ``kw`` changed; classifier-free guidance follows the model rule for the
    guidance scale (the test models take guidance as CFG) unless ``cfg`` is given."""
    p = replace(BASE, request_id=rid, **kw)  # type: ignore[arg-type]
    if "cfg" not in kw:
        p = replace(p, cfg=runs_cfg(p.guidance_scale, guidance_embedded=False))
    return p


def serve_among(adapter: ModelAdapter, target: GenerationParams, others=(), join_after: int = 0) -> Harness:
    """``target`` served with ``others``: half of them first, ``join_after`` steps, then the
    target and the rest (so it joins mid-way when join_after > 0), to the end."""
    h = Harness({"tiny": adapter})
    for o in others[: len(others) // 2]:
        h.submit(o)
    h.step(join_after)
    h.submit(target)
    for o in others[len(others) // 2 :]:
        h.submit(o)
    h.run_until_idle()
    return h


def images_among(adapter: ModelAdapter, target: GenerationParams, others=(), join_after: int = 0) -> list:
    """The images of ``target`` served as :func:`serve_among` does."""
    return serve_among(adapter, target, others, join_after).result(target.request_id).images
