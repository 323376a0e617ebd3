"""Behaviours the README promises, each checked once over the real API: --max-work, a request
that fails INTERNAL while the others in its batch succeed, the batch cap metric after an
out-of-memory split, preview_max_size_px, --log-format json, and SIGTERM while loading.

Where requests must overlap, every forward is slowed by an injected delay
(STEPSERVE_FAULTS="step_delay_s=..."), so the overlap does not depend on the hardware."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from stepserve.client import ImageClient, StepserveError

from .metrics_helpers import Samples, scrape
from .server_process import BIN, client, free_port, start_server
from .server_thread import ServerThread
from .waiting import wait_for


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_max_work_bounds_width_height_steps_and_images(tiny_sd_dir: Path) -> None:
    srv = ServerThread.tiny(tiny_sd_dir, max_work=32 * 32 * 4 * 2)
    try:
        with ImageClient(srv.target) as c:
            assert len(c.generate("a red circle", width=32, height=32, steps=4, num_images=2).images) == 2
            with pytest.raises(StepserveError) as e:
                c.generate("a red circle", width=32, height=32, steps=5, num_images=2)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        (violation,) = e.value.field_violations
        assert violation.field == "steps" and "10240 is more than the limit of 8192" in violation.description
    finally:
        srv.stop()


def start_long(c: ImageClient, prompt: str, steps: int, seed: int, out: dict) -> threading.Thread:
    """A call in the background; ``out`` gets its result or error, ``out["started"]`` is set
    at its first progress event."""
    out["started"] = threading.Event()

    def run() -> None:
        try:
            for ev in c.generate_stream(prompt, steps=steps, seed=seed):
                if ev.WhichOneof("event") == "progress":
                    out["started"].set()
                elif ev.WhichOneof("event") == "result":
                    out["result"] = ev.result
        except StepserveError as e:
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    return t


def test_one_request_fails_internal_while_its_batchmates_succeed(
    tiny_sd_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STEPSERVE_FAULTS", "request_error=POISON;step_delay_s=0.02")
    srv = ServerThread.tiny(tiny_sd_dir)
    try:
        with ImageClient(srv.target, service_config={}) as c:
            alone = pixels(c.generate("a red circle", steps=12, seed=1).images[0].data)
            out: dict = {}
            t = start_long(c, "a red circle", 12, 1, out)
            assert out["started"].wait(60)
            with pytest.raises(StepserveError) as poisoned:
                c.generate("POISON", steps=12, seed=2)  # joins the running batch, fails alone
            t.join(60)
        assert poisoned.value.code == grpc.StatusCode.INTERNAL
        assert "injected failure of request" in poisoned.value.message
        result = out["result"]
        np.testing.assert_array_equal(pixels(result.images[0].data), alone)
        assert result.usage.mean_batch_size > 1  # they did share forwards
    finally:
        srv.stop()


def test_the_batch_cap_metric_follows_an_out_of_memory_split(
    tiny_sd_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two guided images (4 rows) do not fit; one (2 rows) does.
    monkeypatch.setenv("STEPSERVE_FAULTS", "oom_above_rows=2;step_delay_s=0.02")
    srv = ServerThread.tiny(tiny_sd_dir, max_batch_size=4, metrics_port=free_port())
    port = srv.server.metrics_port
    try:
        assert Samples(scrape(port)).get("stepserve_max_batch_size", model="tiny") == 4
        with ImageClient(srv.target, service_config={}) as c:
            out: dict = {}
            t = start_long(c, "a red circle", 12, 1, out)
            assert out["started"].wait(60)
            second = c.generate("a blue square", steps=4, seed=2)
            t.join(60)
        assert len(second.images) == 1 and "result" in out  # both served, split in two
        # Half the images of the forward that ran out of memory (2): one per forward now.
        assert Samples(scrape(port)).get("stepserve_max_batch_size", model="tiny") == 1
    finally:
        srv.stop()


def test_previews_fit_preview_max_size_and_keep_the_aspect(server) -> None:
    with ImageClient(server.target) as c:
        previews = [
            ev.progress.preview
            for ev in c.generate_stream(
                "a red circle", width=64, height=32, steps=2, preview_every=1, preview_max_size=16
            )
            if ev.WhichOneof("event") == "progress"
        ]
    assert len(previews) == 2
    for p in previews:
        assert (p.width_px, p.height_px) == (16, 8)
        assert pixels(p.data).shape[:2] == (8, 16)


def test_json_logs_carry_request_and_trace_ids(tiny_sd_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    proc, target = start_server(tiny_sd_dir, log, "--log-format", "json", "--tracing", "console")
    try:
        with ImageClient(target) as c:
            c.generate("a red circle", steps=2, request_id="json-1")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    records = []
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # the console span exporter's and libraries' own output
        if isinstance(record, dict) and "level" in record:
            records.append(record)
    accepted = [r for r in records if "request json-1 accepted" in r["message"]]
    assert len(accepted) == 1
    (r,) = accepted
    assert {"ts", "level", "logger", "message"} <= set(r)
    assert r["request_id"] == "json-1" and len(r["trace_id"]) == 32 and int(r["trace_id"], 16)
    # The engine thread's lines about the request carry its ids too.
    done = [x for x in records if "request json-1 done" in x["message"]]
    assert done and done[0]["request_id"] == "json-1" and done[0]["trace_id"] == r["trace_id"]


def test_sigterm_while_models_load_refuses_calls_and_exits_cleanly(tiny_sd_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    port = free_port()
    target = f"127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "STEPSERVE_FAULTS": "load_delay_s=3"}
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [str(BIN / "stepserve"), "serve", "--host", "127.0.0.1", "--port", str(port)]
            + ["--model", f"tiny={tiny_sd_dir}", "--metrics-port", "0"],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        with grpc.insecure_channel(target) as ch:
            health = health_pb2_grpc.HealthStub(ch)

            def listening_not_ready() -> bool:
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                except grpc.RpcError:
                    return False  # not listening yet
                assert status == health_pb2.HealthCheckResponse.NOT_SERVING, "it finished loading"
                return True

            wait_for(listening_not_ready, timeout_s=60, what="the server listening")
        with ImageClient(target, service_config={}) as c, pytest.raises(StepserveError) as e:
            c.generate("a red circle", steps=2)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE and "not ready" in e.value.message
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
        text = log.read_text()
        assert "stopped" in text and "serving models" not in text
    finally:
        if proc.poll() is None:
            proc.kill()
    assert client(target, "health").returncode != 0  # nothing listens any more


def test_liveness_reports_a_wedged_engine_and_its_recovery(
    tiny_sd_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step that takes longer than --liveness-stall-s with a request in flight is what a
    wedged engine looks like from outside: liveness and readiness turn NOT_SERVING (so the
    orchestrator restarts it), and back to SERVING once steps complete again."""
    monkeypatch.setenv("STEPSERVE_FAULTS", "step_delay_s=1.5")  # each step "hangs" 1.5 s
    srv = ServerThread.tiny(tiny_sd_dir, liveness_stall_s=0.4)
    try:
        with grpc.insecure_channel(srv.target) as ch:
            health = health_pb2_grpc.HealthStub(ch)

            def status(service: str) -> int:
                return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status

            serving, not_serving = (
                health_pb2.HealthCheckResponse.SERVING,
                health_pb2.HealthCheckResponse.NOT_SERVING,
            )
            assert status("stepserve.liveness") == serving
            out: dict = {}
            with ImageClient(srv.target, service_config={}) as c:
                t = start_long(c, "a red circle", 2, 1, out)
                wait_for(lambda: status("stepserve.liveness") == not_serving, 30, "liveness NOT_SERVING")
                assert status("") == not_serving  # no new traffic to a wedged replica either
                t.join(60)
            assert "result" in out  # it was slow, not dead: the request finished
            wait_for(lambda: status("stepserve.liveness") == serving, 30, "liveness SERVING again")
            assert status("") == serving
    finally:
        srv.stop()
