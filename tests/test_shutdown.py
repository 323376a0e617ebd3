"""SIGTERM on a real server process: drain in-flight work, refuse new work, exit 0."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import grpc

from stepserve.client import ImageClient, StepserveError

from .server_process import start_server


def run_long_request(target: str, steps: int, started: threading.Event, out: dict, images: int = 1) -> None:
    with ImageClient(target, service_config={}) as c:
        try:
            for ev in c.generate_stream("a red circle", steps=steps, seed=1, num_images=images):
                if ev.WhichOneof("event") == "progress":
                    started.set()
                if ev.WhichOneof("event") == "result":
                    out["result"] = ev.result
        except StepserveError as e:
            out["error"] = e


def test_sigterm_lets_in_flight_requests_finish_and_refuses_new_ones(
    tiny_sd_dir: Path, tmp_path: Path
) -> None:
    log = tmp_path / "server.log"
    proc, target = start_server(tiny_sd_dir, log, "--drain-timeout-s", "60")
    started, out = threading.Event(), {}
    t = threading.Thread(target=run_long_request, args=(target, 150, started, out))
    t.start()
    assert started.wait(60)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with ImageClient(target, service_config={}) as c:
        try:
            c.generate("a blue square", steps=2)
            refused = None
        except StepserveError as e:
            refused = e
    assert refused is not None and refused.code == grpc.StatusCode.UNAVAILABLE
    t.join(120)
    assert "result" in out, out  # the accepted request was not lost
    assert proc.wait(60) == 0, log.read_text()


def test_requests_past_the_drain_timeout_end_with_unavailable(tiny_sd_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    proc, target = start_server(tiny_sd_dir, log, "--drain-timeout-s", "0.5")
    started, out = threading.Event(), {}
    # 150 steps of 4 images take several seconds: far more than the 0.5 s drain.
    t = threading.Thread(target=run_long_request, args=(target, 150, started, out, 4))
    t.start()
    assert started.wait(60)
    proc.send_signal(signal.SIGTERM)
    t.join(120)
    assert proc.wait(60) == 0, log.read_text()
    assert "result" not in out
    err = out["error"]
    assert err.code == grpc.StatusCode.UNAVAILABLE and "shut down" in err.message, err
