"""Image inputs: image-to-image and inpainting, batched step by step with text-to-image.

Per family, the served image matches the diffusers pipeline of that kind of request (same
seed, steps, strength, sampler) within 2/255, batched with text-to-image requests at other
steps; alone and batched give identical pixels; dedicated 9-channel inpainting UNets serve
inpainting only; the init image's encode is charged to its request alone; pasting the
original back keeps it exactly outside the mask."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from stepserve.server.engine.models import load_model
from stepserve.server.engine.observer import EngineObserver
from stepserve.server.engine.samplers import GENERAL_SAMPLERS
from stepserve.server.engine.types import ProgressEvent, Sampler, Task

from .engine_helpers import Harness, params
from .reference import reference_images

MAX_DIFF = 2  # /255 per pixel, as text-to-image parity


def init_image(size: int = 32, seed: int = 0) -> np.ndarray:
    """A picture with structure (a disc on a gradient), so a wrong blend or offset shows."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.stack([xx, yy, 1 - xx], axis=-1) * 200
    disc = (xx - 0.3) ** 2 + (yy - 0.5) ** 2 < 0.04
    img[disc] = (230, 40, 40)
    noise = np.random.default_rng(seed).integers(0, 20, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def right_half_mask(size: int = 32) -> np.ndarray:
    """White (repaint) on the right half, black (keep) on the left."""
    mask = np.zeros((size, size), np.uint8)
    mask[:, size // 2 :] = 255
    return mask


def image_params(rid: str, task: Task, *, steps: int = 6, strength: float = 0.6, size: int = 32, **kw):
    """A request of ``task`` with the schedule as validation would set it."""
    mask = right_half_mask(size) if task is Task.INPAINTING else None
    first = steps - min(int(steps * strength), steps)
    return params(
        rid,
        init_image=init_image(size),
        mask=mask,
        strength=strength,
        first_step=first,
        steps=steps,
        width=size,
        height=size,
        **kw,
    )


def served(adapter, p, *, batched: bool = True) -> list[np.ndarray]:
    """``p``'s images, with (``batched``) a text-to-image request two steps ahead and another
    joining at the same step, sharing its forwards."""
    h = Harness({p.model: adapter})
    if batched:
        size = dict(width=p.width, height=p.height, model=p.model)
        extra = {"cfg": False} if adapter.info.guidance_embedded else {}
        h.submit(params("ahead", prompt="a blue square", seed=4, steps=p.steps + 3, **size, **extra))
        h.step(2)
    h.submit(p)
    if batched:
        h.submit(params("beside", prompt="a dog", seed=8, steps=3, guidance_scale=3.0, **size))
    h.run_until_idle()
    return h.result(p.request_id).images


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.fixture(scope="module")
def sd_inpaint(tiny_sd_inpaint_dir: Path):
    return load_model("inpaint", tiny_sd_inpaint_dir, max_batch_size=8)


# -- parity with diffusers' img2img and inpaint pipelines --------------------------------------


@pytest.mark.parametrize("sampler", GENERAL_SAMPLERS, ids=[s.value for s in GENERAL_SAMPLERS])
@pytest.mark.parametrize("task", [Task.IMAGE_TO_IMAGE, Task.INPAINTING], ids=["img2img", "inpaint"])
def test_sd_matches_its_pipeline_batched_with_text_requests(
    tiny_adapter, tiny_sd_dir: Path, task: Task, sampler: Sampler
) -> None:
    p = image_params("p", task, sampler=sampler, seed=11, negative_prompt="green")
    ours, ref = served(tiny_adapter, p), reference_images(tiny_sd_dir, p)
    assert max_diff(ours[0], ref[0]) <= MAX_DIFF


@pytest.mark.parametrize(
    ("task", "strength", "steps"),
    [(Task.IMAGE_TO_IMAGE, 1.0, 4), (Task.IMAGE_TO_IMAGE, 0.3, 10), (Task.INPAINTING, 1.0, 4)],
)
def test_sd_matches_at_full_and_low_strength_with_several_images(
    tiny_adapter, tiny_sd_dir: Path, task: Task, strength: float, steps: int
) -> None:
    """Strength 1 (inpainting: pure noise, img2img: noised to the first step) and a low one;
    image i of a request is the seed + i generation of diffusers."""
    p = image_params("p", task, strength=strength, steps=steps, seed=21, num_images=2, guidance_scale=1.0)
    ours = served(tiny_adapter, p)
    for i, seed in enumerate(p.seeds):
        ref = reference_images(tiny_sd_dir, replace(p, seed=seed, num_images=1))[0]
        assert max_diff(ours[i], ref) <= MAX_DIFF


def test_sd2_v_prediction_img2img_matches(tiny_sd2_dir: Path) -> None:
    sd2 = load_model("sd2", tiny_sd2_dir)
    p = image_params("p", Task.IMAGE_TO_IMAGE, model="sd2", size=48, sampler=Sampler.DPM_SOLVER_MULTISTEP)
    assert max_diff(served(sd2, p)[0], reference_images(tiny_sd2_dir, p)[0]) <= MAX_DIFF


@pytest.mark.parametrize("task", [Task.IMAGE_TO_IMAGE, Task.INPAINTING], ids=["img2img", "inpaint"])
def test_sdxl_matches_its_pipeline(sdxl, tiny_sdxl_dir: Path, task: Task) -> None:
    p = image_params("p", task, model="xl", seed=5, sampler=Sampler.EULER_ANCESTRAL)
    assert max_diff(served(sdxl, p)[0], reference_images(tiny_sdxl_dir, p)[0]) <= MAX_DIFF


def test_lcm_img2img_draws_its_schedule_from_strength(lcm, tiny_lcm_dir: Path) -> None:
    """LCM's img2img pipeline runs every step, over a schedule drawn from the first strength
    share of the original steps (not a truncated one)."""
    assert lcm.info.schedule(4, 0.5, Task.IMAGE_TO_IMAGE) == (0, 4)
    assert lcm.info.schedule(4, 0.05, Task.IMAGE_TO_IMAGE) == (0, 0)  # 2 original steps < 4
    p = replace(
        image_params("p", Task.IMAGE_TO_IMAGE, model="lcm", steps=4, strength=0.5, sampler=Sampler.LCM),
        first_step=0,
        cfg=False,
        guidance_scale=2.0,
    )
    h = Harness({"lcm": lcm})
    h.submit(p)
    h.run_until_idle()
    assert [e.total_steps for e in h.events["p"] if isinstance(e, ProgressEvent)] == [4] * 4
    assert max_diff(h.result("p").images[0], reference_images(tiny_lcm_dir, p)[0]) <= MAX_DIFF
    assert max_diff(served(lcm, p)[0], h.result("p").images[0]) == 0


def test_lcm_inpainting_matches_the_inpaint_pipeline(lcm, tiny_lcm_dir: Path) -> None:
    p = replace(
        image_params("p", Task.INPAINTING, model="lcm", steps=4, strength=0.75, sampler=Sampler.LCM),
        cfg=False,
        guidance_scale=2.0,
    )
    assert max_diff(served(lcm, p)[0], reference_images(tiny_lcm_dir, p)[0]) <= MAX_DIFF


# -- dedicated inpainting checkpoints (9-channel UNets) ---------------------------------------------


def test_inpainting_checkpoint_serves_inpainting_only_and_matches(
    sd_inpaint, tiny_sd_inpaint_dir: Path
) -> None:
    assert sd_inpaint.info.tasks == (Task.INPAINTING,)
    a = image_params("a", Task.INPAINTING, model="inpaint", seed=3, sampler=Sampler.DDIM)
    b = image_params("b", Task.INPAINTING, model="inpaint", seed=4, strength=1.0, steps=4)
    h = Harness({"inpaint": sd_inpaint})
    h.submit(a)
    h.step(1)
    h.submit(b)  # joins a at its second step: one forward, 9 channels per row
    h.run_until_idle()
    for p in (a, b):
        ref = reference_images(tiny_sd_inpaint_dir, p)[0]
        assert max_diff(h.result(p.request_id).images[0], ref) <= MAX_DIFF
    alone = served(sd_inpaint, b, batched=False)[0]
    np.testing.assert_array_equal(h.result("b").images[0], alone)


def test_sdxl_inpainting_checkpoint_matches(tiny_sdxl_inpaint_dir: Path) -> None:
    xl = load_model("xl-inpaint", tiny_sdxl_inpaint_dir)
    assert xl.info.tasks == (Task.INPAINTING,) and xl.family == "stable-diffusion-xl"
    p = image_params("p", Task.INPAINTING, model="xl-inpaint", seed=9)
    ref = reference_images(tiny_sdxl_inpaint_dir, p)[0]
    assert max_diff(served(xl, p, batched=False)[0], ref) <= MAX_DIFF


# -- batch invariance, charges, steps -------------------------------------------------------------------


@pytest.mark.parametrize("task", [Task.IMAGE_TO_IMAGE, Task.INPAINTING], ids=["img2img", "inpaint"])
def test_alone_or_batched_gives_identical_pixels(tiny_adapter, task: Task) -> None:
    p = image_params("p", task, sampler=Sampler.EULER_ANCESTRAL, seed=77)
    alone = served(tiny_adapter, p, batched=False)
    h = Harness({"tiny": tiny_adapter})
    for i in range(3):  # other image requests encoded with it, and text requests
        h.submit(image_params(f"i{i}", task, seed=i, strength=0.4 + 0.2 * i, steps=5 + i))
        h.submit(params(f"t{i}", seed=30 + i, steps=3 + i, guidance_scale=[1.0, 5.0, 9.0][i]))
    h.submit(p)
    h.step(2)
    h.submit(image_params("late", task, seed=99))
    h.run_until_idle()
    np.testing.assert_array_equal(h.result("p").images[0], alone[0])


class EncodeSpy(EngineObserver):
    def __init__(self) -> None:
        self.encoded: list[list[str]] = []

    def images_encoded(self, reqs, seconds) -> None:
        self.encoded.append([r.request_id for r in reqs])


def test_init_images_are_encoded_together_and_charged_to_their_requests_alone(tiny_adapter) -> None:
    spy = EncodeSpy()
    h = Harness({"tiny": tiny_adapter}, observers=[spy])
    h.submit(params("text", seed=1, steps=4))
    h.submit(image_params("i2i", Task.IMAGE_TO_IMAGE, steps=8, strength=0.5))
    h.submit(image_params("inp", Task.INPAINTING, steps=8, strength=0.5))
    h.run_until_idle()
    assert spy.encoded == [["i2i", "inp"]]  # one batched encode, the text request not in it
    assert h.result("text").usage.image_encode_s == 0.0
    for rid in ("i2i", "inp"):
        u = h.result(rid).usage
        assert 0.0 < u.image_encode_s < u.accelerator_s
        assert u.steps == 4  # int(8 * 0.5) steps run
        steps = [(e.step, e.total_steps) for e in h.events[rid] if isinstance(e, ProgressEvent)]
        assert steps == [(k, 4) for k in range(1, 5)]


# -- pasting the original back outside the mask ----------------------------------------------------


@pytest.mark.parametrize("feather", [0, 3])
def test_preserve_unmasked_keeps_the_init_pixels_outside_the_mask(tiny_adapter, feather: int) -> None:
    p = image_params("p", Task.INPAINTING, strength=1.0, seed=2)
    plain = served(tiny_adapter, p, batched=False)[0]
    kept = served(tiny_adapter, replace(p, preserve_unmasked=True, mask_feather=feather), batched=False)[0]
    init, edge = p.init_image, 16  # columns >= 16 are repainted
    assert init is not None
    # Without it the kept half is only close to the original (the VAE round trip, the blend).
    assert max_diff(plain[:, : edge - feather], init[:, : edge - feather]) > 0
    # With it: exact farther than the feather from the mask, the model's own farther inside.
    np.testing.assert_array_equal(kept[:, : edge - feather], init[:, : edge - feather])
    np.testing.assert_array_equal(kept[:, edge + feather :], plain[:, edge + feather :])
    if feather:
        # In between, a blend: each pixel between the two, neither at the edge.
        cols = slice(edge - feather, edge + feather)
        lo = np.minimum(init[:, cols], plain[:, cols]).astype(int)
        hi = np.maximum(init[:, cols], plain[:, cols]).astype(int)
        band = kept[:, cols].astype(int)
        assert ((band >= lo - 1) & (band <= hi + 1)).all()
        assert (band != init[:, cols]).any()


def test_a_grayscale_or_rgb_mask_is_thresholded_at_half_brightness(tiny_adapter) -> None:
    """Diffusers' mask processor binarises at 0.5: 127 keeps, 128 repaints."""
    p = image_params("p", Task.INPAINTING, strength=1.0, seed=2)
    soft = np.where(right_half_mask() > 0, 128, 127).astype(np.uint8)
    a = served(tiny_adapter, p, batched=False)[0]
    b = served(tiny_adapter, replace(p, mask=soft), batched=False)[0]
    np.testing.assert_array_equal(a, b)


def test_torch_state_is_untouched_by_image_requests(tiny_adapter) -> None:
    """Every draw comes from the request's own generators: the global RNG is not used."""
    torch.manual_seed(123)
    before = torch.get_rng_state()
    served(tiny_adapter, image_params("p", Task.INPAINTING, sampler=Sampler.EULER_ANCESTRAL), batched=False)
    assert torch.equal(torch.get_rng_state(), before)
