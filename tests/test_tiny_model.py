"""The embedded tiny-shapes model: loads with plain diffusers, offline, and follows prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from models.tiny import data, judge
from stepserve.server.engine.models import default_model_path, load_model
from stepserve.server.engine.types import Sampler

from .engine_helpers import Harness, params

THRESHOLD = 0.9


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionPipeline:
    p = StableDiffusionPipeline.from_pretrained(str(default_model_path()))
    p.set_progress_bar_config(disable=True)
    return p


def to_u8(images: np.ndarray) -> list[np.ndarray]:
    return [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in images]


def test_judge_reads_ground_truth_renders_correctly() -> None:
    for blur in (0.0, 1.0):
        scores = judge.validate(n=500, seed=7, blur_px=blur)
        assert min(scores.values()) >= 0.99, (blur, scores)


def test_plain_diffusers_pipeline_follows_the_48_prompts(pipe: StableDiffusionPipeline) -> None:
    prompts = data.eval_prompts()
    assert len(prompts) == 48
    out = pipe(
        [p for p, _ in prompts],
        num_inference_steps=20,
        generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))],
        output_type="np",
    ).images
    assert out.shape == (48, 32, 32, 3)
    scores = judge.score(to_u8(out), [s for _, s in prompts])
    assert all(v >= THRESHOLD for v in scores.values()), scores


def test_served_images_follow_prompts_and_match_the_reference(pipe: StableDiffusionPipeline) -> None:
    adapter = load_model("tiny-shapes", default_model_path())
    assert (adapter.info.default_width, adapter.info.default_steps) == (32, 20)
    prompts = data.eval_prompts()[::4]
    h = Harness({"tiny-shapes": adapter})
    for i, (prompt, _) in enumerate(prompts):
        h.submit(
            params(
                f"r{i}",
                model="tiny-shapes",
                prompt=prompt,
                seed=i,
                width=32,
                height=32,
                steps=20,
                sampler=Sampler.DPM_SOLVER_MULTISTEP,
            )
        )
    h.run_until_idle()
    images = [h.result(f"r{i}").images[0] for i in range(len(prompts))]
    scores = judge.score(images, [s for _, s in prompts])
    assert all(v >= THRESHOLD for v in scores.values()), scores
    # Reference parity on the trained model for one of them.
    from stepserve.server.engine.samplers import SAMPLER_CLASSES

    pipe.scheduler = SAMPLER_CLASSES[Sampler.DPM_SOLVER_MULTISTEP].from_config(pipe.scheduler.config)
    ref = pipe(
        prompts[1][0], num_inference_steps=20, generator=[torch.Generator().manual_seed(1)], output_type="np"
    )
    diff = np.abs(to_u8(ref.images)[0].astype(int) - images[1].astype(int)).max()
    assert diff <= 2
