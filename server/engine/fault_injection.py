"""Fault injection, for tests only: make a model adapter fail the way real ones do.

Off by default (every hook is a no-op). Tests set ``adapter.faults`` directly; tests that run a
real server process set ``STEPSERVE_FAULTS``, e.g.
``STEPSERVE_FAULTS="request_error=POISON;oom_above_rows=4;crash=KILL-THE-ENGINE"``:

- ``request_error=TEXT``: a request whose prompt contains TEXT raises in its own part of a
  batched step (its sampler update), as a poisoned request would.
- ``forward_error=TEXT``: a batched forward that includes such a request raises (a poisoned
  input that breaks the shared forward).
- ``oom_above_rows=N``: a batched forward of more than N rows raises ``torch.OutOfMemoryError``.
- ``crash=TEXT``: a forward that includes such a request kills the engine thread (an error
  the engine cannot contain), to test that the process reports NOT_SERVING and exits.
- ``step_delay_s=S``: every batched forward takes S seconds longer (a slow accelerator), so
  tests that need work in flight for a while do not depend on the hardware's speed.
- ``load_delay_s=S``: loading the models takes S seconds longer (a large model), to test
  what happens while a server is still loading.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from .request import RequestState

ENV = "STEPSERVE_FAULTS"

T = TypeVar("T")
R = TypeVar("R")


class InjectedFault(RuntimeError):
    """An injected failure of one request or one forward."""


class EngineCrash(BaseException):
    """An injected failure that escapes the engine's per-request error handling."""


@dataclass
class Faults:
    request_error: str = ""
    forward_error: str = ""
    oom_above_rows: int = 0
    crash: str = ""
    step_delay_s: float = 0.0
    load_delay_s: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> Faults:
        out = cls()
        for item in filter(None, (s.strip() for s in spec.split(";"))):
            key, _, value = item.partition("=")
            if key not in cls.__dataclass_fields__:
                raise ValueError(f"{ENV}: unknown fault {key!r}")
            kind = type(getattr(out, key))
            setattr(out, key, kind(value))
        return out

    @classmethod
    def from_env(cls) -> Faults:
        return cls.parse(os.environ.get(ENV, ""))

    def __bool__(self) -> bool:
        return any(getattr(self, name) for name in self.__dataclass_fields__)

    def slow_load(self, load: Callable[[T], R], arg: T) -> R:
        """``load(arg)``, ``load_delay_s`` later."""
        if self.load_delay_s:
            time.sleep(self.load_delay_s)
        return load(arg)

    def before_forward(self, reqs: Sequence[RequestState], rows: int) -> None:
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        prompts = [r.params.prompt for r in reqs]
        if self.crash and any(self.crash in p for p in prompts):
            raise EngineCrash("injected engine crash")
        if self.forward_error and any(self.forward_error in p for p in prompts):
            raise InjectedFault(f"injected forward failure ({len(reqs)} requests in the batch)")
        if self.oom_above_rows and rows > self.oom_above_rows:
            import torch

            raise torch.OutOfMemoryError(
                f"injected: CUDA out of memory ({rows} rows > {self.oom_above_rows})"
            )

    def before_request_update(self, req: RequestState) -> None:
        if self.request_error and self.request_error in req.params.prompt:
            raise InjectedFault(f"injected failure of request {req.request_id}")


NO_FAULTS = Faults()
