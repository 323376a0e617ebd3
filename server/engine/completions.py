"""Engine work that needs the accelerator's results (timings, previews, images), run in the
order it was queued once the accelerator has got that far.

On a GPU, reading any result makes the CPU wait for the GPU, which then idles while the CPU
plans and queues the next step. So with run-ahead on, the engine queues iteration k+1's
forward before it reads iteration k's results: each piece of model work is followed by a
:class:`Completion` (accounting, observer hooks, events) that waits for its mark. Without
run-ahead (synchronous devices) every completion runs as soon as it is queued.

:meth:`CompletionQueue.work_queued` and :meth:`CompletionQueue.iteration_done` are the only
places that decide when completions run; the engine loop just tells the queue what happened.
Completions always run in the order queued, so each request's events keep their order and
an attempt's charge lands before the request can end.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .models.base import Mark
from .request import RequestState

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    """Run ``action`` once the accelerator reaches ``mark`` (None: nothing to wait for).
    ``finals`` are the requests whose terminal event the action sends."""

    iteration: int
    mark: Mark | None
    action: Callable[[], object]
    finals: Sequence[RequestState] = ()


class CompletionQueue:
    """Completions in the order queued, run as the run-ahead policy allows."""

    def __init__(self, run_ahead: bool) -> None:
        self.run_ahead = run_ahead
        # The engine loop's iteration counter: completions are tagged with it.
        self.iteration = 0
        self._queue: deque[Completion] = deque()
        # Terminal requests of a completion that raised partway (the engine is failing).
        self._interrupted: list[RequestState] = []

    def defer(
        self, mark: Mark | None, action: Callable[[], object], finals: Sequence[RequestState] = ()
    ) -> None:
        """Queue ``action`` to run after everything queued before it, once the accelerator
        reaches ``mark``; without run-ahead it runs now."""
        self._queue.append(Completion(self.iteration, mark, action, finals))
        if not self.run_ahead:
            self._run(through=None)

    def next_iteration(self) -> None:
        self.iteration += 1

    def work_queued(self) -> None:
        """This iteration's step is on the accelerator: what earlier iterations queued can be
        read now, while the accelerator runs it."""
        self._run(through=self.iteration - 1)

    def iteration_done(self, more_work: bool) -> None:
        """The iteration ended. If more work follows, its completions wait for the next
        iteration's step to be queued (run-ahead); otherwise they run now."""
        self._run(through=self.iteration - 1 if more_work and self.run_ahead else None)

    def run_all(self) -> None:
        """Run everything queued, waiting for the accelerator as needed (shutting down)."""
        self._run(through=None)

    def _run(self, through: int | None) -> None:
        """Run completions in order: every one queued in iterations up to ``through`` (all
        when None), waiting for the accelerator where needed; then those at the front that
        wait for nothing (queue positions, cancellations)."""
        while self._queue:
            c = self._queue[0]
            if c.mark is not None:
                if through is not None and c.iteration > through:
                    break
                c.mark.wait()
            self._queue.popleft()
            try:
                c.action()
            except BaseException:
                self._interrupted.extend(c.finals)  # for run_after_failure to answer
                raise

    def run_after_failure(self, lost: Callable[[RequestState], None]) -> None:
        """After the engine failed, run what was queued as far as the accelerator allows: a
        request whose images reached the host still gets them; for a completion that cannot
        run (the device failed too), ``lost`` is called for each of its ``finals``, as for
        those of a completion that raised partway (``lost`` skips requests already ended)."""
        interrupted, self._interrupted = self._interrupted, []
        for req in interrupted:
            lost(req)
        while self._queue:
            c = self._queue.popleft()
            try:
                if c.mark is not None:
                    c.mark.wait()
                c.action()
            except BaseException:
                logger.exception("running queued engine work after the failure failed")
                for req in c.finals:
                    lost(req)
