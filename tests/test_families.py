"""Model families: SD 2.x (v-prediction, 768-style), SDXL and LCM, each as a tiny random-weight
pipeline of the real component classes loaded from disk. Per family: parity with its diffusers
pipeline, batch invariance, and what ListModels reports; then several families served at once."""

from __future__ import annotations

import io
import json
import shutil
import threading
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from stepserve.client import ImageClient, StepserveError
from stepserve.server.config import ServerConfig
from stepserve.server.engine.models import load_model
from stepserve.server.engine.models.registry import ModelLoadError
from stepserve.server.engine.samplers import GENERAL_SAMPLERS
from stepserve.server.engine.types import Preset, Sampler
from stepserve.v1 import image_generation_pb2 as pb

from .engine_helpers import Harness, params
from .reference import reference_images
from .server_thread import ServerThread

MAX_DIFF = 2  # /255 per pixel, as for SD 1.x (tests/test_parity.py)


def served(adapter, p, *, with_other: bool = True) -> list[np.ndarray]:
    """The request's images from the engine, batched with a different request."""
    h = Harness({p.model: adapter})
    h.submit(p)
    if with_other:
        h.submit(
            replace(p, request_id="other", prompt="a blue square", seed=p.seed + 1000, negative_prompt="")
        )
    h.run_until_idle()
    return h.result(p.request_id).images


def assert_close(ours: list[np.ndarray], ref: list[np.ndarray]) -> None:
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref, strict=True):
        assert a.shape == b.shape
        assert np.abs(a.astype(int) - b.astype(int)).max() <= MAX_DIFF


# -- SDXL ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", GENERAL_SAMPLERS, ids=[s.value for s in GENERAL_SAMPLERS])
def test_sdxl_matches_its_pipeline(sdxl, tiny_sdxl_dir: Path, sampler: Sampler) -> None:
    # Empty negative prompt: SDXL's zeroed unconditional embeddings (force_zeros_for_empty_prompt).
    p = params("p", model="xl", sampler=sampler, steps=5, seed=11, guidance_scale=6.0)
    assert_close(served(sdxl, p), reference_images(tiny_sdxl_dir, p))


def test_sdxl_with_negative_prompt_other_size_and_karras(sdxl, tiny_sdxl_dir: Path) -> None:
    p = params(
        "p",
        model="xl",
        sampler=Sampler.DPM_SOLVER_MULTISTEP,
        karras=True,
        steps=5,
        seed=12,
        guidance_scale=5.0,
        negative_prompt="green",
        width=48,
        height=32,
    )
    ours = served(sdxl, p)
    assert ours[0].shape == (32, 48, 3)  # the size conditioning (time_ids) follows the request
    assert_close(ours, reference_images(tiny_sdxl_dir, p))


def test_sdxl_reports_its_family_and_added_conditioning_is_per_request(sdxl) -> None:
    assert sdxl.info.family == "stable-diffusion-xl"
    assert set(sdxl.info.samplers) == set(GENERAL_SAMPLERS) and not sdxl.info.guidance_embedded
    # What the UNet is given: each row's added conditioning is its own request's.
    seen: list[dict] = []

    def capture(module, args, kwargs):
        seen.append({k: v.clone() for k, v in kwargs["added_cond_kwargs"].items()})

    hook = sdxl.unet.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        wide = params("wide", model="xl", steps=2, seed=5, width=40, height=32)
        alone = {p.request_id: served(sdxl, p, with_other=False) for p in (wide,)}
        # The size conditioning follows the request's own size (height, width; CFG pair).
        assert seen[0]["time_ids"].tolist() == [[32.0, 40.0, 0.0, 0.0, 32.0, 40.0]] * 2
        seen.clear()
        red = params("red", model="xl", steps=2, seed=5, prompt="a red circle")
        blue = params("blue", model="xl", steps=2, seed=6, prompt="a blue square", guidance_scale=1.0)
        alone |= {p.request_id: served(sdxl, p, with_other=False) for p in (red, blue)}
        seen.clear()
        h = Harness({"xl": sdxl})
        for p in (red, blue):
            h.submit(p)
        h.run_until_idle()
    finally:
        hook.remove()
    # Rows: red's CFG pair (zeroed negative, then its prompt), then blue's one row.
    time_ids, text_embeds = seen[0]["time_ids"], seen[0]["text_embeds"]
    assert time_ids.tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 3
    assert torch.count_nonzero(text_embeds[0]) == 0  # SDXL's zeroed unconditional row
    assert not torch.equal(text_embeds[1], text_embeds[2])  # each prompt its own pooled embedding
    # Batched together, each request gets exactly the images it gets alone.
    for p in (red, blue):
        np.testing.assert_array_equal(h.result(p.request_id).images[0], alone[p.request_id][0])
    assert alone["wide"][0].shape == (32, 40, 3)


# -- LCM -------------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance", [1.0, 1.5, 8.0])
def test_lcm_matches_its_pipeline(lcm, tiny_lcm_dir: Path, guidance: float) -> None:
    p = params("p", model="lcm", sampler=Sampler.LCM, steps=4, seed=21, guidance_scale=guidance, cfg=False)
    assert_close(served(lcm, p), reference_images(tiny_lcm_dir, p))


def test_lcm_embeds_guidance_one_row_per_image_and_few_step_defaults(lcm) -> None:
    info = lcm.info
    assert info.family == "latent-consistency" and info.guidance_embedded
    assert info.samplers == (Sampler.LCM,) and info.default_sampler is Sampler.LCM
    assert (info.default_steps, info.default_guidance_scale) == (4, 1.5)  # from its stepserve.json
    assert info.preset_steps == {Preset.DRAFT: 2, Preset.STANDARD: 4, Preset.HIGH: 8}
    h = Harness({"lcm": lcm})
    rows = []
    original = lcm.denoise_step
    lcm.denoise_step = lambda reqs: rows.append(original(reqs)) or rows[-1]  # type: ignore[method-assign]
    try:
        h.submit(
            params(
                "a", model="lcm", sampler=Sampler.LCM, steps=2, guidance_scale=8.0, cfg=False, num_images=2
            )
        )
        h.submit(params("b", model="lcm", sampler=Sampler.LCM, steps=2, guidance_scale=1.0, cfg=False))
        h.run_until_idle()
    finally:
        lcm.denoise_step = original  # type: ignore[method-assign]
    assert rows == [3, 3]  # 2 + 1 images, no CFG pairs despite guidance 8


# -- SD 2.x ----------------------------------------------------------------------------------


def test_sd2_v_prediction_768_style_matches_its_pipeline(sd2, tiny_sd2_dir: Path) -> None:
    assert (sd2.info.default_width, sd2.info.default_height) == (48, 48)  # its native size
    assert sd2.prediction_type == "v_prediction"
    p = params("p", model="sd2", sampler=Sampler.EULER, karras=True, steps=5, seed=31, width=48, height=48)
    assert_close(served(sd2, p), reference_images(tiny_sd2_dir, p))


# -- batch invariance per family --------------------------------------------------------------


@pytest.mark.parametrize("family", ["xl", "lcm", "sd2"])
def test_same_seed_alone_or_batched_gives_identical_pixels(family: str, sdxl, lcm, sd2) -> None:
    adapter = {"xl": sdxl, "lcm": lcm, "sd2": sd2}[family]
    size = adapter.info.default_width
    sampler = adapter.info.default_sampler
    extra = {"cfg": False} if adapter.info.guidance_embedded else {}
    target = params("t", model=family, sampler=sampler, steps=4, seed=7, width=size, height=size, **extra)
    alone = served(adapter, target, with_other=False)
    h = Harness({family: adapter})
    for i in range(3):
        h.submit(
            params(
                f"o{i}",
                model=family,
                sampler=sampler,
                prompt=["a dog", "photo of a house", "a green triangle"][i],
                steps=3 + i,
                seed=50 + i,
                guidance_scale=[1.0, 4.0, 9.0][i],
                width=size,
                height=size,
                **extra,
            )
        )
    h.step(1)
    h.submit(target)
    h.run_until_idle()
    np.testing.assert_array_equal(h.result("t").images[0], alone[0])


# -- loading -------------------------------------------------------------------------------------


def test_load_errors_name_the_missing_or_mismatched_file(
    tiny_sdxl_dir: Path, tiny_lcm_dir: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "xl"
    shutil.copytree(tiny_sdxl_dir, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(ModelLoadError, match="text_encoder_2.*is missing"):
        load_model("x", broken)
    shutil.copytree(tiny_sdxl_dir / "text_encoder_2", broken / "text_encoder_2")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="unet.*holds no weights"):
        load_model("x", broken)
    lcm_dir = tmp_path / "lcm"
    shutil.copytree(tiny_lcm_dir, lcm_dir)
    cfg = json.loads((lcm_dir / "unet" / "config.json").read_text())
    cfg["time_cond_proj_dim"] = None
    (lcm_dir / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="time_cond_proj_dim"):
        load_model("x", lcm_dir)
    index = json.loads((lcm_dir / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionUpscalePipeline"
    (lcm_dir / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(
        ModelLoadError, match="StableDiffusionUpscalePipeline pipeline, which stepserve does not serve"
    ):
        load_model("x", lcm_dir)


# -- several families in one server --------------------------------------------------------------


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_mixed_load_over_families_and_samplers(
    tiny_sdxl_dir: Path, tiny_lcm_dir: Path, tiny_sd_dir: Path
) -> None:
    cfg = ServerConfig(
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        models=[f"xl={tiny_sdxl_dir}", f"lcm={tiny_lcm_dir}", f"sd={tiny_sd_dir}"],
        model_options=["xl.default_steps=6", "sd.presets.draft=3"],
    ).validate()
    srv = ServerThread(cfg)
    try:
        with ImageClient(srv.target) as c:
            infos = {m.name: m for m in c.list_models()}
            assert [m.name for m in c.list_models()][0] == "xl" and infos["xl"].is_default
            assert (infos["xl"].family, infos["lcm"].family, infos["sd"].family) == (
                "stable-diffusion-xl",
                "latent-consistency",
                "stable-diffusion",
            )
            assert infos["xl"].default_steps == 6  # overridden at load
            assert {p.preset: p.steps for p in infos["sd"].presets}[pb.PRESET_DRAFT] == 3
            assert (
                list(infos["lcm"].supported_samplers) == [pb.SAMPLER_LCM] and infos["lcm"].guidance_embedded
            )
            assert set(infos["sd"].karras_samplers) == {pb.SAMPLER_EULER, pb.SAMPLER_DPM_SOLVER_MULTISTEP}

            jobs = [
                {"model": "xl", "sampler": "euler", "seed": 1, "steps": 3},
                {
                    "model": "xl",
                    "sampler": "dpm_solver_multistep",
                    "seed": 2,
                    "steps": 4,
                    "karras_sigmas": True,
                },
                {"model": "lcm", "seed": 3, "preset": "draft"},
                {"model": "lcm", "seed": 4, "guidance_scale": 3.0},
                {"model": "sd", "sampler": "ddim", "seed": 5, "preset": "draft"},
                {"model": "sd", "sampler": "euler_ancestral", "seed": 6, "steps": 4, "guidance_scale": 1.0},
            ]
            alone = [decode(c.generate("a red circle", **j).images[0].data) for j in jobs]
            together: dict[int, np.ndarray] = {}
            steps_used: dict[int, int] = {}

            def run(i: int) -> None:
                with ImageClient(srv.target) as c2:
                    r = c2.generate("a red circle", **jobs[i])
                    together[i] = decode(r.images[0].data)
                    steps_used[i] = r.usage.steps

            threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
            assert steps_used[2] == 2 and steps_used[4] == 3  # presets picked per model
            for i in range(len(jobs)):
                np.testing.assert_array_equal(together[i], alone[i])

            # Choices a model does not offer are refused, naming the field.
            for bad, field in (
                ({"model": "sd", "sampler": "lcm"}, "sampler"),
                ({"model": "lcm", "sampler": "euler"}, "sampler"),
                ({"model": "xl", "sampler": "ddim", "karras_sigmas": True}, "karras_sigmas"),
            ):
                with pytest.raises(StepserveError) as e:
                    c.generate("a red circle", **bad)
                assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
                assert [v.field for v in e.value.field_violations] == [field]
    finally:
        srv.stop()
