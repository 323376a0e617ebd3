"""Parity with the reference: the service's image equals diffusers'
``StableDiffusionPipeline.__call__`` for the same seed, steps, sampler and guidance, within
2/255 per pixel (the engine's batch-invariant kernels differ from the reference's batched
ones in the last float bits; measured differences are 0-1/255)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stepserve.server.engine.models import load_model
from stepserve.server.engine.samplers import GENERAL_SAMPLERS
from stepserve.server.engine.types import Sampler

from .engine_helpers import Harness, params
from .reference import reference_images

SAMPLERS = list(GENERAL_SAMPLERS)


def served(adapter, p) -> list[np.ndarray]:
    h = Harness({p.model: adapter})
    h.submit(p)
    # A second, different request in the same batch: parity must hold while batched.
    h.submit(
        params(
            "other",
            model=p.model,
            prompt="a blue square",
            seed=99,
            steps=p.steps,
            width=p.width,
            height=p.height,
        )
    )
    h.run_until_idle()
    return h.result(p.request_id).images


@pytest.mark.parametrize("sampler", SAMPLERS, ids=[s.value for s in SAMPLERS])
def test_matches_diffusers_pipeline(tiny_adapter, tiny_sd_dir: Path, sampler: Sampler) -> None:
    p = params("p", sampler=sampler, steps=6, seed=1234, guidance_scale=7.0, negative_prompt="green")
    ours, ref = served(tiny_adapter, p)[0], reference_images(tiny_sd_dir, p)[0]
    assert ours.shape == ref.shape == (32, 32, 3)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 2


def test_matches_without_guidance_and_with_several_images(tiny_adapter, tiny_sd_dir: Path) -> None:
    p = params("p", sampler=Sampler.EULER_ANCESTRAL, steps=5, seed=77, guidance_scale=1.0, num_images=2)
    ours, ref = served(tiny_adapter, p), reference_images(tiny_sd_dir, p)
    for a, b in zip(ours, ref, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


def test_matches_for_a_v_prediction_model(tiny_sd_vpred_dir: Path) -> None:
    adapter = load_model("vpred", tiny_sd_vpred_dir)
    p = params("p", model="vpred", sampler=Sampler.DPM_SOLVER_MULTISTEP, steps=6, seed=5)
    ours, ref = served(adapter, p)[0], reference_images(tiny_sd_vpred_dir, p)[0]
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 2
