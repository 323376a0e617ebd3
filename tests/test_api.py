"""The gRPC API end to end: a real in-process server on port 0, real client stubs."""

from __future__ import annotations

import io
import threading
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from PIL import Image

from stepserve.client import ImageClient, StepserveError, build_request
from stepserve.server.config import ServerConfig
from stepserve.v1 import image_generation_pb2 as pb
from stepserve.v1 import image_generation_pb2_grpc as pb_grpc

from .metrics_helpers import Samples, scrape
from .server_process import free_port
from .server_thread import ServerThread
from .waiting import wait_until_idle


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


@pytest.fixture(params=["off", "on"], ids=["in-step", "run-ahead"])
def server_both_ways(request, tiny_sd_dir):
    """A server settling each step before the next (CPU default), and one running ahead
    (the GPU default), to hold both to the same API behaviour."""
    srv = ServerThread.tiny(tiny_sd_dir, max_batch_size=8, run_ahead=request.param)
    assert srv.engine.run_ahead is (request.param == "on")
    yield srv
    srv.stop()


def test_generate_streams_queued_progress_previews_and_result(server_both_ways) -> None:
    server = server_both_ways
    with ImageClient(server.target) as c:
        events = list(
            c.generate_stream(
                "a small red circle on the left", steps=4, seed=3, preview_every=2, request_id="req-1"
            )
        )
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "queued" and kinds[-1] == "result"
    assert kinds.count("result") == 1
    assert all(e.request_id == "req-1" for e in events)
    progress = [e.progress for e in events if e.WhichOneof("event") == "progress"]
    assert [p.step for p in progress] == [1, 2, 3, 4]
    assert [p.HasField("preview") for p in progress] == [False, True, False, True]
    preview = decode(progress[1].preview.data)
    assert preview.format == "JPEG" and preview.size == (
        progress[1].preview.width_px,
        progress[1].preview.height_px,
    )
    result = events[-1].result
    assert result.model == "tiny" and len(result.images) == 1
    img = result.images[0]
    assert (img.width_px, img.height_px, img.seed, img.format) == (32, 32, 3, pb.IMAGE_FORMAT_PNG)
    assert decode(img.data).size == (32, 32)
    u = result.usage
    assert u.steps == 4 and u.accelerator_seconds > 0 and u.mean_batch_size >= 1
    assert u.cost_usd == pytest.approx(u.accelerator_seconds * 1.0 / 3600)
    assert u.total_ms >= u.queue_ms


def test_formats_seeds_and_sizes(server) -> None:
    with ImageClient(server.target) as c:
        r = c.generate(
            "a blue square", steps=2, seed=5, num_images=2, width=48, height=32, output_format="webp"
        )
        assert [i.seed for i in r.images] == [5, 6]
        assert all(decode(i.data).format == "WEBP" and decode(i.data).size == (48, 32) for i in r.images)
        j = c.generate("a blue square", steps=2, output_format="jpeg", guidance_scale=1.0)
        assert decode(j.images[0].data).format == "JPEG"
        assert j.images[0].seed < 2**32  # a random seed is chosen and reported back
        again = c.generate("a blue square", steps=2, seed=5, width=48, height=32, output_format="png")
        assert again.images[0].seed == 5


def test_list_models(server) -> None:
    with ImageClient(server.target) as c:
        (m,) = c.list_models()
    assert m.name == "tiny" and m.is_default and m.family == "stable-diffusion"
    assert (m.default_width_px, m.default_height_px) == (32, 32)
    assert m.default_steps == 30 and m.max_batch_size == 8
    assert set(m.supported_samplers) == {
        pb.SAMPLER_EULER,
        pb.SAMPLER_EULER_ANCESTRAL,
        pb.SAMPLER_DDIM,
        pb.SAMPLER_DPM_SOLVER_MULTISTEP,
    }


def test_invalid_request_names_every_bad_field(server) -> None:
    stub = pb_grpc.ImageGenerationServiceStub(grpc.insecure_channel(server.target))
    req = build_request("", width=33, steps=10_000, guidance_scale=-1, num_images=100)
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(req))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(e.value)
    br = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(br)
    fields = {v.field for v in br.field_violations}
    assert fields == {"prompt", "width_px", "steps", "guidance_scale", "num_images"}
    # The client library decodes the same details.
    with ImageClient(server.target) as c, pytest.raises(StepserveError) as ce:
        c.generate("x", sampler=99)
    assert ce.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in ce.value.field_violations] == ["sampler"]


def test_unknown_model_is_not_found(server) -> None:
    with ImageClient(server.target) as c, pytest.raises(StepserveError) as e:
        c.generate("a red circle", model="../../etc/passwd")
    assert e.value.code == grpc.StatusCode.NOT_FOUND and "tiny" in e.value.message


def test_a_request_id_already_in_flight_is_refused_and_the_first_goes_on(server) -> None:
    with ImageClient(server.target) as c:
        first = c.generate_stream("a red circle", steps=40, seed=1, request_id="twice")
        assert next(first).WhichOneof("event") in ("queued", "progress")
        with pytest.raises(StepserveError) as e:
            c.generate("a blue square", steps=2, request_id="twice")
        assert e.value.code == grpc.StatusCode.ALREADY_EXISTS and "'twice'" in e.value.message
        # The refusal touched nothing of the first call's: it still ends with its result.
        assert [ev for ev in first if ev.WhichOneof("event") == "result"]


def test_too_long_prompt_is_rejected_not_truncated(server) -> None:
    with ImageClient(server.target) as c, pytest.raises(StepserveError) as e:
        c.generate("red " * 40, steps=2)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        e.value.field_violations[0].field == "prompt" and "tokens" in e.value.field_violations[0].description
    )


def test_cancelling_the_call_stops_the_generation(server_both_ways) -> None:
    server = server_both_ways
    engine = server.engine
    with ImageClient(server.target) as c:
        stream = c.generate_stream("a red circle", steps=150, seed=1)
        for ev in stream:
            if ev.WhichOneof("event") == "progress" and ev.progress.step >= 2:
                break
        forwards_at_cancel = engine.ledger.forwards
        stream.close()  # cancels the RPC
    wait_until_idle(engine)
    # It left the batch at a step boundary: nowhere near its 150 steps.
    assert engine.ledger.forwards - forwards_at_cancel < 50


def test_a_deadline_that_passes_mid_generation_ends_it_and_stops_its_forwards(tiny_sd_dir) -> None:
    """No client retries, no refusal at admission: the request starts, streams progress, and
    its deadline passes mid-generation. The call ends DEADLINE_EXCEEDED, the server counts it
    as a deadline, and the engine drops it at a step boundary (no forwards after that). The
    deadline is set from the measured step time, so this holds on any hardware."""
    srv = ServerThread.tiny(tiny_sd_dir, reject_unmeetable_deadlines=False, metrics_port=free_port())
    try:
        engine = srv.engine
        with ImageClient(srv.target, service_config={}) as c:
            elapsed = [
                ev.progress.elapsed_ms / 1000
                for ev in c.generate_stream("a red circle", steps=8, seed=1)
                if ev.WhichOneof("event") == "progress"
            ]
            step_s = max((elapsed[-1] - elapsed[0]) / (len(elapsed) - 1), 1e-3)
            steps_before = Samples(scrape(srv.server.metrics_port)).get("stepserve_steps_total", model="tiny")
            progress = []
            with pytest.raises(StepserveError) as e:
                for ev in c.generate_stream("a blue square", steps=150, seed=2, timeout_s=30 * step_s):
                    if ev.WhichOneof("event") == "progress":
                        progress.append(ev.progress.step)
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert progress and progress[-1] < 150  # it was running, and did not finish
        wait_until_idle(engine)
        s = Samples(scrape(srv.server.metrics_port))
        assert s.get("stepserve_requests_total", model="tiny", code="deadline") == 1
        assert s.get("stepserve_requests_total", model="tiny", code="ok") == 1
        # Its steps stopped short of 150, and nothing is left to run for it.
        assert s.get("stepserve_steps_total", model="tiny") - steps_before < 150
        assert engine.idle()
    finally:
        srv.stop()


def test_concurrent_callers_are_batched_together(server_both_ways) -> None:
    server = server_both_ways
    engine = server.engine
    results: dict[int, object] = {}
    rows_seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            rows_seen.append(engine.ledger.last_batch_rows)
            time.sleep(0.002)

    def call(i: int) -> None:
        with ImageClient(server.target) as c:
            results[i] = c.generate(f"a {['red', 'blue', 'green', 'yellow'][i]} circle", steps=60, seed=i)

    w = threading.Thread(target=watch)
    w.start()
    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stop.set()
    w.join()
    assert len(results) == 4
    assert max(rows_seen) >= 4  # at least two guided requests shared a forward
    assert max(r.usage.mean_batch_size for r in results.values()) > 1  # type: ignore[attr-defined]


def test_health_goes_serving_after_load_and_not_serving_on_stop(tiny_adapter) -> None:
    cfg = ServerConfig(host="127.0.0.1", port=0, metrics_port=0).validate()
    srv = ServerThread(cfg, models={"tiny": tiny_adapter}, load=False)
    try:
        ch = grpc.insecure_channel(srv.target)
        health = health_pb2_grpc.HealthStub(ch)
        check = lambda svc="": health.Check(health_pb2.HealthCheckRequest(service=svc)).status  # noqa: E731
        assert check() == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(StepserveError) as e, ImageClient(srv.target, service_config={}) as c:
            c.generate("a red circle", steps=2)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        srv.call(srv.server.load())
        assert check() == health_pb2.HealthCheckResponse.SERVING
        assert check("stepserve.v1.ImageGenerationService") == health_pb2.HealthCheckResponse.SERVING
        srv.call(srv.server.health.enter_graceful_shutdown())
        assert check() == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        srv.stop()


def test_reflection_lists_the_service(server) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(grpc.insecure_channel(server.target))
    resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert {"stepserve.v1.ImageGenerationService", "grpc.health.v1.Health"} <= names


def test_async_client(server) -> None:
    import asyncio

    from stepserve.client import AsyncImageClient

    async def main() -> tuple[list[str], object, list]:
        async with AsyncImageClient(server.target) as c:
            kinds = [e.WhichOneof("event") async for e in c.generate_stream("a red circle", steps=2, seed=1)]
            result = await c.generate("a blue square", steps=2, seed=2)
            models = await c.list_models()
            try:
                await c.generate("a red circle", width=7)
            except StepserveError as e:
                assert e.code == grpc.StatusCode.INVALID_ARGUMENT
            else:
                raise AssertionError("invalid width accepted")
            return kinds, result, models

    kinds, result, models = asyncio.run(main())
    assert kinds == ["queued", "progress", "progress", "result"]
    assert result.images[0].seed == 2  # type: ignore[attr-defined]
    assert [m.name for m in models] == ["tiny"]
