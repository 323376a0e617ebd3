"""LoRA adapters per request: loaded in diffusers' formats and checked against the model,
several adapters (and none) in one batched forward, parity with diffusers' own
``load_lora_weights`` + ``set_adapters``, bit-identical alone vs batched, and the API's
answers for unknown or out-of-range adapters."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline
from PIL import Image

from stepserve.client import ImageClient, StepserveError
from stepserve.server.engine.lora import LoraLinear, LoraLoadError
from stepserve.server.engine.models import load_model
from stepserve.server.engine.samplers import SAMPLER_CLASSES
from stepserve.server.engine.types import Sampler, Task

from .engine_helpers import Harness, params
from .metrics_helpers import Samples, scrape
from .server_process import free_port
from .server_thread import ServerThread
from .test_image_inputs import image_params
from .tiny_pipelines import build_lora

MAX_DIFF = 2


@pytest.fixture(scope="module")
def loras(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """x: UNet and text encoder, rank 4, alpha 8 (scale 2); y: UNet only, rank 2 (feed-forward
    layers too); u: UNet only, rank 4, alpha 8; k: kohya keys with alphas, UNet and text
    encoder."""
    d = tmp_path_factory.mktemp("loras")
    return {
        "x": build_lora(d / "x", tiny_sd_dir, seed=1, rank=4, alpha=8, text_targets=("q_proj", "v_proj")),
        "y": build_lora(d / "y", tiny_sd_dir, seed=2, rank=2, unet_targets=("to_k", "to_v", "ff.net.2")),
        "u": build_lora(d / "u", tiny_sd_dir, seed=4, rank=4, alpha=8),
        "k": build_lora(
            d / "k",
            tiny_sd_dir,
            seed=3,
            rank=2,
            alpha=1,
            kohya=True,
            text_targets=("q_proj", "k_proj", "v_proj", "out_proj"),
        ),
    }


@pytest.fixture(scope="module")
def adapter(tiny_sd_dir: Path, loras: dict[str, Path]):
    a = load_model("tiny", tiny_sd_dir, max_batch_size=16)
    for name, path in loras.items():
        a.register_lora(name, path)
    return a


def reference(tiny_sd_dir: Path, loras: dict[str, Path], p, weights: dict[str, float]) -> np.ndarray:
    """diffusers with ``load_lora_weights`` of each adapter and ``set_adapters`` weights: the
    text-to-image pipeline, or for a request with an init image (and mask) diffusers'
    img2img (inpaint) pipeline, called with its image, mask and strength."""
    cls = {
        Task.TEXT_TO_IMAGE: StableDiffusionPipeline,
        Task.IMAGE_TO_IMAGE: StableDiffusionImg2ImgPipeline,
        Task.INPAINTING: StableDiffusionInpaintPipeline,
    }[p.task]
    pipe = cls.from_pretrained(
        str(tiny_sd_dir), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = SAMPLER_CLASSES[p.sampler].from_config(pipe.scheduler.config)
    for name in weights:
        pipe.load_lora_weights(str(loras[name]), adapter_name=name)
    if weights:
        pipe.set_adapters(list(weights), list(weights.values()))
    images = {}
    if p.init_image is not None:
        images = {"image": Image.fromarray(p.init_image), "strength": p.strength}
        if p.mask is not None:
            images["mask_image"] = Image.fromarray(p.mask)
    image = pipe(
        p.prompt,
        **images,
        negative_prompt=p.negative_prompt or None,
        num_inference_steps=p.steps,
        guidance_scale=p.guidance_scale,
        height=p.height,
        width=p.width,
        generator=[torch.Generator().manual_seed(p.seed)],
        output_type="np",
    ).images[0]
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def serve(adapter, *reqs) -> dict[str, np.ndarray]:
    h = Harness({"tiny": adapter})
    for p in reqs:
        h.submit(p)
    h.run_until_idle()
    return {p.request_id: h.result(p.request_id).images[0] for p in reqs}


def diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_one_forward_serves_different_adapters_and_each_matches_diffusers(
    adapter, tiny_sd_dir: Path, loras: dict[str, Path]
) -> None:
    """x at 0.7 batched with y, no adapter, and x at another scale: one forward per step
    (rows of every kind), each image as diffusers draws it with that adapter alone."""
    reqs = [
        params("x07", seed=3, steps=4, negative_prompt="green", loras=(("x", 0.7),)),
        params("y", seed=4, steps=4, prompt="a blue square", loras=(("y", 1.0),)),
        params("none", seed=5, steps=4, prompt="a dog"),
        params("x-1", seed=6, steps=4, guidance_scale=1.0, loras=(("x", -1.0),)),
    ]
    forwards: list[int] = []
    original = adapter.denoise_step
    adapter.denoise_step = lambda rs: forwards.append(len(rs)) or original(rs)  # type: ignore[method-assign]
    try:
        got = serve(adapter, *reqs)
    finally:
        adapter.denoise_step = original  # type: ignore[method-assign]
    assert forwards == [4, 4, 4, 4]  # never split by adapter
    for p in reqs:
        weights = dict(p.loras)
        assert diff(got[p.request_id], reference(tiny_sd_dir, loras, p, weights)) <= MAX_DIFF, p.request_id
    # The adapters do something: without them the image differs.
    assert (
        diff(got["x07"], serve(adapter, params("plain", seed=3, steps=4, negative_prompt="green"))["plain"])
        > 20
    )


def test_stacked_adapters_and_kohya_keys_match_diffusers(
    adapter, tiny_sd_dir: Path, loras: dict[str, Path]
) -> None:
    """Two adapters stacked with weights, one with text-encoder layers, and an adapter in
    kohya/A1111 keys with alphas, converted as diffusers converts them."""
    stack = params("s", seed=8, steps=3, sampler=Sampler.EULER_ANCESTRAL, loras=(("x", 0.5), ("y", 1.5)))
    kohya = params("k", seed=9, steps=3, loras=(("k", 1.5),))
    got = serve(adapter, stack, kohya)
    assert diff(got["s"], reference(tiny_sd_dir, loras, stack, {"x": 0.5, "y": 1.5})) <= MAX_DIFF
    assert diff(got["k"], reference(tiny_sd_dir, loras, kohya, {"k": 1.5})) <= MAX_DIFF


def test_adapters_with_init_images_and_masks_match_diffusers(
    adapter, tiny_sd_dir: Path, loras: dict[str, Path]
) -> None:
    """Image-to-image (strength 0.6) with x and inpainting with kohya k, in one batch with a
    text-to-image request of y and an image-to-image request without adapters: each as
    diffusers' img2img / inpaint pipeline draws it after ``load_lora_weights``."""
    i2i = image_params("i2i", Task.IMAGE_TO_IMAGE, steps=5, seed=21, loras=(("x", 0.8),))
    inp = image_params(
        "inp", Task.INPAINTING, steps=5, seed=22, sampler=Sampler.EULER_ANCESTRAL, loras=(("k", 1.5),)
    )
    others = [
        params("text", seed=23, steps=4, prompt="a dog", loras=(("y", 1.0),)),
        image_params("bare", Task.IMAGE_TO_IMAGE, steps=5, seed=24),
    ]
    got = serve(adapter, i2i, inp, *others)
    for p in (i2i, inp):
        assert diff(got[p.request_id], reference(tiny_sd_dir, loras, p, dict(p.loras))) <= MAX_DIFF, (
            p.request_id
        )
    # The adapters do something to image requests too.
    plain = serve(adapter, replace(i2i, request_id="pi", loras=()), replace(inp, request_id="pm", loras=()))
    assert diff(got["i2i"], plain["pi"]) > 20
    assert diff(got["inp"][:, 16:], plain["pm"][:, 16:]) > 20  # the repainted half


def test_alone_or_batched_gives_identical_pixels(adapter) -> None:
    target = params("t", seed=11, steps=4, loras=(("y", 0.8), ("x", 0.3)))
    alone = serve(adapter, target)["t"]
    others = [
        params("a", seed=1, steps=5, loras=(("x", 0.3), ("y", 0.8))),  # same adapters, other order
        params("b", seed=2, steps=3, loras=(("k", 1.0),)),
        params("c", seed=3, steps=6, guidance_scale=1.0),
    ]
    h = Harness({"tiny": adapter})
    for p in others:
        h.submit(p)
    h.step(2)
    h.submit(target)
    h.run_until_idle()
    np.testing.assert_array_equal(h.result("t").images[0], alone)


def test_loading_wraps_only_targeted_layers_and_names_what_does_not_fit(
    adapter, tiny_sd_dir: Path, tiny_sdxl_dir: Path, tmp_path: Path
) -> None:
    wrapped = [n for n, m in adapter.unet.named_modules() if isinstance(m, LoraLinear)]
    assert wrapped and all(n.endswith(("to_q", "to_k", "to_v", "to_out.0", "ff.net.2")) for n in wrapped)
    assert {x.name: (x.rank, x.components) for x in adapter.info.loras} == {
        "k": (2, ("unet", "text_encoder")),
        "u": (4, ("unet",)),
        "x": (4, ("unet", "text_encoder")),
        "y": (2, ("unet",)),
    }
    fresh = load_model("fresh", tiny_sd_dir)
    xl_lora = build_lora(tmp_path / "xl", tiny_sdxl_dir, seed=1)  # another model's layers
    with pytest.raises(LoraLoadError, match=r"unet\.down_blocks.*(no such module|but the model's layer is)"):
        fresh.register_lora("xl", xl_lora)
    with pytest.raises(LoraLoadError, match="does not exist"):
        fresh.register_lora("missing", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraLoadError, match="exactly one .safetensors file"):
        fresh.register_lora("empty", tmp_path / "empty")
    conv = build_lora(tmp_path / "conv", tiny_sd_dir, seed=1, unet_targets=("proj_in",))
    assert isinstance(dict(fresh.unet.named_modules())["down_blocks.0.attentions.0.proj_in"], torch.nn.Conv2d)
    with pytest.raises(LoraLoadError, match="adapts a Conv2d; stepserve serves LoRA on linear layers only"):
        fresh.register_lora("conv", conv)
    assert fresh.info.loras == ()


def test_the_api_lists_adapters_and_refuses_unknown_or_out_of_range_ones(
    tiny_sd_dir: Path, loras: dict[str, Path]
) -> None:
    srv = ServerThread.tiny(
        tiny_sd_dir,
        loras=[f"x={loras['x']}", f"tiny:y={loras['y']}"],
        max_loras_per_request=2,
        metrics_port=free_port(),
    )
    try:
        with ImageClient(srv.target) as c:
            (m,) = c.list_models()
            assert [(x.name, x.rank, list(x.components)) for x in m.loras] == [
                ("x", 4, ["unet", "text_encoder"]),
                ("y", 2, ["unet"]),
            ]
            assert m.max_loras_per_request == 2
            r = c.generate("a red circle", steps=2, seed=1, loras=["x:0.5", ("y", 2.0)])
            assert len(r.images) == 1
            with pytest.raises(StepserveError) as e:
                c.generate("a red circle", steps=2, loras=["z"])
            assert e.value.code == grpc.StatusCode.NOT_FOUND and "'z'" in e.value.message
            for loras_, field in (
                (["x:4.5"], "loras[0].scale"),
                (["x", "y:nan"], "loras[1].scale"),
                (["x", "x:2"], "loras[1].name"),
                (["x", "y", "x:2"], "loras"),
            ):
                with pytest.raises(StepserveError) as e:
                    c.generate("a red circle", steps=2, loras=loras_)
                assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
                assert field in [v.field for v in e.value.field_violations], (
                    loras_,
                    e.value.field_violations,
                )
        metrics = Samples(scrape(srv.server.metrics_port))
        assert metrics.get("stepserve_loras_registered", model="tiny") == 2
        assert metrics.get("stepserve_lora_requests_total", model="tiny", lora="x") == 1
        assert metrics.get("stepserve_lora_requests_total", model="tiny", lora="y") == 1
        assert metrics.get("stepserve_loras_resident", model="tiny") == 2
    finally:
        srv.stop()


def test_endpoint_picker_metrics_show_running_and_waiting_adapters(
    tiny_sd_dir: Path, loras: dict[str, Path]
) -> None:
    """stepserve_lora_requests_info carries the Gateway API Inference Extension's adapter
    labels (running: loaded and ready; waiting: asked for by waiting requests, not loaded),
    and stepserve_utilization the batch's fill, while requests run and wait."""
    srv = ServerThread.tiny(
        tiny_sd_dir, loras=[f"x={loras['x']}", f"y={loras['y']}"], max_batch_size=1, metrics_port=free_port()
    )
    try:
        with ImageClient(srv.target) as c:
            running = c.generate_stream("a red circle", steps=150, seed=1, loras=["x"])
            assert next(e for e in running if e.WhichOneof("event") == "progress")
            waiting = c.generate_stream("a blue square", steps=150, seed=2, loras=["y", "x"])
            assert next(waiting).WhichOneof("event") == "queued"
            metrics = Samples(scrape(srv.server.metrics_port))
            info = [s for s in metrics.samples if s.name == "stepserve_lora_requests_info"]
            assert len(info) == 1 and info[0].value > 0
            assert info[0].labels == {
                "model": "tiny",
                "running_lora_adapters": "x",  # loaded for the running request
                "waiting_lora_adapters": "y",  # x is loaded already
                "max_lora": "64",
            }
            assert (
                metrics.get("stepserve_utilization", model="tiny") == 2.0
            )  # one running, one waiting, cap 1
            running.close()
            waiting.close()
    finally:
        srv.stop()


def test_adapters_beyond_the_resident_limit_wait_on_the_host(
    tiny_sd_dir: Path, loras: dict[str, Path]
) -> None:
    """With one adapter resident at a time, requests alternating two adapters copy them in
    again each time (counted) and get the same images as with both resident."""
    small = load_model("tiny", tiny_sd_dir, max_loras_resident=1)
    both = load_model("tiny", tiny_sd_dir)
    for name in ("x", "y"):
        small.register_lora(name, loras[name])
        both.register_lora(name, loras[name])
    reqs = [params(f"r{i}", seed=i, steps=2, loras=((["x", "y"][i % 2], 1.0),)) for i in range(4)]
    h = Harness({"tiny": small})
    for p in reqs:  # one at a time: each needs the adapter the last one pushed out
        h.submit(p)
        h.run_until_idle()
    assert small.lora_residency() == (2, 1, 4)
    for p in reqs:
        np.testing.assert_array_equal(h.result(p.request_id).images[0], serve(both, p)[p.request_id])


def test_sdxl_adapters_match_diffusers(sdxl, tiny_sdxl_dir: Path, tmp_path: Path) -> None:
    """SDXL: an adapter of the UNet's attention layers (transformer depth 2, linear
    projections), batched with a request without it."""
    from diffusers import StableDiffusionXLPipeline

    path = build_lora(tmp_path / "xl", tiny_sdxl_dir, seed=5, rank=4, alpha=4)
    if "xl-style" not in sdxl.loras:
        sdxl.register_lora("xl-style", path)
    p = params("p", model="xl", seed=12, steps=3, loras=(("xl-style", 0.8),))
    h = Harness({"xl": sdxl})
    h.submit(p)
    h.submit(params("plain", model="xl", seed=13, steps=3))
    h.run_until_idle()
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_dir))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(path), adapter_name="xl-style")
    pipe.set_adapters(["xl-style"], [0.8])
    ref = pipe(
        p.prompt,
        num_inference_steps=3,
        guidance_scale=p.guidance_scale,
        height=32,
        width=32,
        generator=[torch.Generator().manual_seed(12)],
        output_type="np",
    ).images[0]
    ref_u8 = (np.clip(ref, 0, 1) * 255).round().astype(np.uint8)
    assert diff(h.result("p").images[0], ref_u8) <= MAX_DIFF


def test_sdxl_adapters_of_both_text_encoders_match_diffusers(
    sdxl, tiny_sdxl_dir: Path, tmp_path: Path
) -> None:
    """SDXL adapters with text_encoder and text_encoder_2 layers (PEFT keys and the metadata
    diffusers writes): one with UNet and both encoders, one with the second encoder alone
    (it also feeds the pooled embedding), batched with a request without adapters; each as
    diffusers draws it, and each visibly changes the image."""
    from diffusers import StableDiffusionXLPipeline

    text = ("q_proj", "k_proj", "v_proj", "out_proj")
    paths = {
        "xl-te": build_lora(
            tmp_path / "xl-te", tiny_sdxl_dir, seed=6, rank=4, alpha=8, text_targets=text, text2_targets=text
        ),
        "xl-te2": build_lora(
            tmp_path / "xl-te2", tiny_sdxl_dir, seed=7, unet_targets=(), text2_targets=(*text, "fc1", "fc2")
        ),
    }
    for name, path in paths.items():
        if name not in sdxl.loras:
            sdxl.register_lora(name, path)
    info = {x.name: x.components for x in sdxl.info.loras}
    assert info["xl-te"] == ("unet", "text_encoder", "text_encoder_2")
    assert info["xl-te2"] == ("text_encoder_2",)
    reqs = [
        params("te", model="xl", seed=14, steps=3, loras=(("xl-te", 0.8),)),
        params("te2", model="xl", seed=15, steps=3, negative_prompt="green", loras=(("xl-te2", 1.0),)),
        params("plain", model="xl", seed=14, steps=3),
    ]
    h = Harness({"xl": sdxl})
    for p in reqs:
        h.submit(p)
    h.run_until_idle()
    got = {p.request_id: h.result(p.request_id).images[0] for p in reqs}
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_dir))
    pipe.set_progress_bar_config(disable=True)
    for name, path in paths.items():
        pipe.load_lora_weights(str(path), adapter_name=name)
    for p in reqs[:2]:
        ((name, scale),) = p.loras
        pipe.set_adapters([name], [scale])
        ref = pipe(
            p.prompt,
            negative_prompt=p.negative_prompt or None,
            num_inference_steps=p.steps,
            guidance_scale=p.guidance_scale,
            height=32,
            width=32,
            generator=[torch.Generator().manual_seed(p.seed)],
            output_type="np",
        ).images[0]
        ref_u8 = (np.clip(ref, 0, 1) * 255).round().astype(np.uint8)
        assert diff(got[p.request_id], ref_u8) <= MAX_DIFF, p.request_id
    assert diff(got["te"], got["plain"]) > 20
    h2 = Harness({"xl": sdxl})
    h2.submit(replace(reqs[1], request_id="te2-plain", loras=()))
    h2.run_until_idle()
    assert diff(got["te2"], h2.result("te2-plain").images[0]) > 20


def test_separate_lora_batching_gives_each_adapter_its_own_forwards(adapter) -> None:
    """The comparison mode (--lora-batching separate): requests share a forward only with
    requests of the same adapters, as servers without per-row adapters batch; same images."""
    reqs = [
        params("x", seed=1, steps=2, loras=(("x", 1.0),)),
        params("x2", seed=2, steps=2, loras=(("x", 1.0),)),
        params("y", seed=3, steps=2, loras=(("y", 1.0),)),
        params("none", seed=4, steps=2),
    ]
    batches: list[list[str]] = []
    original = adapter.denoise_step

    def spy(rs):
        batches.append(sorted(r.request_id for r in rs))
        return original(rs)

    adapter.denoise_step = spy  # type: ignore[method-assign]
    try:
        h = Harness({"tiny": adapter}, lora_batching="separate")
        for p in reqs:
            h.submit(p)
        h.run_until_idle()
    finally:
        adapter.denoise_step = original  # type: ignore[method-assign]
    assert sorted(map(tuple, batches)) == sorted([("x", "x2")] * 2 + [("y",)] * 2 + [("none",)] * 2)
    mixed = serve(adapter, *reqs)
    for p in reqs:
        np.testing.assert_array_equal(h.result(p.request_id).images[0], mixed[p.request_id])


def test_the_engine_refuses_an_adapter_it_does_not_have(adapter) -> None:
    """Validation answers NOT_FOUND first; the engine's door refuses too, so no request with
    an unknown adapter ever reaches a forward."""
    h = Harness({"tiny": adapter})
    with pytest.raises(ValueError, match="no LoRA adapter nope"):
        h.submit(params("p", loras=(("nope", 1.0),)))
    assert h.engine.idle()


def _adapter(name: str, rank: int, seed: int, paths: tuple[str, ...] = ("a", "b")):
    from stepserve.server.engine.lora import LoraAdapter, LoraLayer

    g = torch.Generator().manual_seed(seed)
    layers = {
        p: LoraLayer(torch.randn(rank, 6, generator=g), torch.randn(5, rank, generator=g), 0.5) for p in paths
    }
    return LoraAdapter(name, f"/{name}", {"unet": layers})


def test_a_gathered_plan_adds_each_rows_own_adapters_and_keeps_few_stacks() -> None:
    """Rows of ranks 2 and 3, an adapter lacking layer b, a stack of two, and a row with none,
    in one plan: each row gets exactly its own low-rank terms. Stacked weights are kept for
    the 4 most recent adapter sets and dropped when one of their adapters leaves."""
    from stepserve.server.engine.lora import LoraContext

    ads = {"p": _adapter("p", 2, 1), "q": _adapter("q", 3, 2), "r": _adapter("r", 2, 3, ("a",))}
    stacks = [(("p", 1.0),), (), (("q", -0.5), ("p", 2.0)), (("r", 1.5),), (("p", 0.25),)]
    context = LoraContext()
    plan = context.plan("unet", stacks, ads)
    x = torch.randn(5, 7, 6)
    for path in ("a", "b"):
        y = torch.randn(5, 7, 5)
        got = plan.apply(path, x, y.clone())
        for row, stack in enumerate(stacks):
            want = y[row].clone()
            for name, scale in stack:
                layer = ads[name].layers["unet"].get(path)
                if layer is not None:
                    want += scale * layer.scale * (x[row] @ layer.down.T @ layer.up.T)
            torch.testing.assert_close(got[row], want, rtol=1e-5, atol=1e-5)
        assert torch.equal(got[1], y[1])  # no adapter: untouched
    assert len(context._stacked) == 2  # one set per position: (p, q, r) first, (p) second
    for i in range(5):
        context.stacked("unet", (_adapter(f"s{i}", 2, 10 + i),), "a")
    assert len(context._stacked) == 4
    held = next(iter(context._stacked.values()))[0][0]
    context.forget(held)
    assert all(held not in entry[0] for entry in context._stacked.values())
