"""A real server process: SIGTERM drains in-flight work, refuses new work and exits 0; an engine
that dies takes health down, ends every stream and exits non-zero.

Long requests are made long by an injected step delay (STEPSERVE_FAULTS="step_delay_s=..."),
not by the hardware being slow, so the tests hold on a fast GPU runner too."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stepserve.client import ImageClient, StepserveError

from .server_process import start_server
from .waiting import wait_for

# Every forward takes at least this long: 150 steps last 3 s or more on any hardware.
SLOW = {"STEPSERVE_FAULTS": "step_delay_s=0.02"}


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
    proc, target = start_server(tiny_sd_dir, log, "--drain-timeout-s", "60", env=SLOW)
    started, out = threading.Event(), {}
    t = threading.Thread(target=run_long_request, args=(target, 150, started, out))
    t.start()
    assert started.wait(60)
    proc.send_signal(signal.SIGTERM)
    with grpc.insecure_channel(target) as ch:
        health = health_pb2_grpc.HealthStub(ch)

        def status(service: str) -> int:
            return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status

        # Readiness goes down (no new traffic) while the long request is still running;
        # liveness stays up while draining, so a liveness probe does not kill the pod before
        # its streams finish.
        wait_for(lambda: status("") == health_pb2.HealthCheckResponse.NOT_SERVING)
        assert "result" not in out and t.is_alive()
        assert status("stepserve.v1.ImageGenerationService") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert status("stepserve.liveness") == health_pb2.HealthCheckResponse.SERVING
    with ImageClient(target, service_config={}) as c, pytest.raises(StepserveError) as refused:
        c.generate("a blue square", steps=2)
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    t.join(120)
    assert "result" in out, out  # the accepted request was not lost
    assert proc.wait(60) == 0, log.read_text()


def test_requests_past_the_drain_timeout_end_with_unavailable(tiny_sd_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    proc, target = start_server(tiny_sd_dir, log, "--drain-timeout-s", "0.5", env=SLOW)
    started, out = threading.Event(), {}
    # 150 steps take 3 s or more (the injected delay): far more than the 0.5 s drain.
    t = threading.Thread(target=run_long_request, args=(target, 150, started, out, 4))
    t.start()
    assert started.wait(60)
    proc.send_signal(signal.SIGTERM)
    t.join(120)
    assert proc.wait(60) == 0, log.read_text()
    assert "result" not in out
    err = out["error"]
    assert err.code == grpc.StatusCode.UNAVAILABLE and "shut down" in err.message, err


def test_engine_death_ends_every_stream_and_exits_non_zero(tiny_sd_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    proc, target = start_server(
        tiny_sd_dir, log, env={"STEPSERVE_FAULTS": "crash=KILL-THE-ENGINE;step_delay_s=0.02"}
    )
    started, out = threading.Event(), {}
    t = threading.Thread(target=run_long_request, args=(target, 150, started, out))
    t.start()
    assert started.wait(60)
    with grpc.insecure_channel(target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        with ImageClient(target, service_config={}) as c, pytest.raises(StepserveError) as killer:
            c.generate("KILL-THE-ENGINE", steps=2)
        assert killer.value.code == grpc.StatusCode.INTERNAL, killer.value
        # The in-flight stream is ended with a status, not left hanging.
        t.join(30)
        assert not t.is_alive()
        assert "result" not in out and out["error"].code == grpc.StatusCode.INTERNAL, out
        assert "engine failed" in out["error"].message
    # The orchestrator sees a failed process and restarts it.
    assert proc.wait(60) == 1, log.read_text()
    assert "reporting NOT_SERVING" in log.read_text()
