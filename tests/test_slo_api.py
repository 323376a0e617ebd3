"""SLO scheduling through the API: a real request paused at a step boundary by a more urgent
one, told so on its stream, resumed where it stopped, and its image the same as never paused."""

from __future__ import annotations

import threading
from pathlib import Path

from stepserve.client import GenerationResult, ImageClient

from .server_thread import ServerThread
from .waiting import wait_for


def test_an_interactive_request_pauses_a_batch_one_which_resumes_with_the_same_image(
    tiny_sd_dir: Path,
) -> None:
    server = ServerThread.tiny(tiny_sd_dir, scheduling="slo", max_batch_size=1, max_paused_images=1)
    try:
        with ImageClient(server.target) as client:
            long_kw = {"steps": 40, "seed": 7, "width": 32, "height": 32, "priority": "batch"}
            events = []
            done = threading.Event()

            def run_long() -> None:
                for resp in client.generate_stream("a red circle", request_id="long", **long_kw):
                    events.append(resp)
                done.set()

            t = threading.Thread(target=run_long)
            t.start()
            wait_for(lambda: sum(e.WhichOneof("event") == "progress" for e in events) >= 2, 60, "two steps")
            short = client.generate("a blue square", steps=3, seed=1, width=32, height=32, request_id="short")
            at_short_end = sum(e.WhichOneof("event") == "progress" and not e.progress.paused for e in events)
            t.join(120)
            assert done.is_set()
            progress = [e.progress for e in events if e.WhichOneof("event") == "progress"]
            paused = [p for p in progress if p.paused]
            # Paused once, at a step boundary, and told so; the steps then go on from there.
            assert len(paused) == 1, progress
            steps = [p.step for p in progress if not p.paused]
            assert steps == list(range(1, 41))
            assert paused[0].step == steps[progress.index(paused[0]) - 1]
            assert at_short_end < 40  # the short one finished while the long one was paused
            assert short.usage.steps == 3
            paused_result = GenerationResult.from_response(events[-1])
            alone = client.generate("a red circle", request_id="alone", **long_kw)
            assert paused_result.images[0].data == alone.images[0].data  # PNG of the same pixels
        registry = server.server.metrics.registry
        assert registry.get_sample_value("stepserve_preemptions_total", {"model": "tiny"}) == 1
    finally:
        server.stop()
