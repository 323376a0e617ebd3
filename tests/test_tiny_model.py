"""The embedded tiny-shapes model: loads with plain diffusers, offline, follows prompts (the
model card's judge, strict about color), with every sampler it lists, and previews it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from models.tiny import data, judge, served
from stepserve.server.engine.models import ModelAdapter
from stepserve.server.engine.types import ProgressEvent, Sampler, Task

# Per attribute (color, shape, size, position, one_color); the committed weights reach 98% or
# more on the model card's figures, the margin is for CPU nondeterminism across machines.
THRESHOLD = 0.95


def passes(scores: dict[str, float]) -> bool:
    return set(scores) == {*judge.ATTRIBUTES, "one_color"} and all(v >= THRESHOLD for v in scores.values())


@pytest.fixture(scope="module")
def adapter() -> ModelAdapter:
    return served.load(max_batch_size=64)


@pytest.fixture(scope="module")
def reference_images(adapter: ModelAdapter) -> list[np.ndarray]:
    """The 48 evaluation prompts through plain diffusers, at the model's default steps and
    guidance (its stepserve.json), seeds 0-47."""
    pipe = StableDiffusionPipeline.from_pretrained(str(served.default_model_path()))
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = data.eval_sets()["eval_48"]
    out = pipe(
        [p for p, _ in prompts],
        num_inference_steps=adapter.info.default_steps,
        guidance_scale=adapter.info.default_guidance_scale,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="np",
    ).images
    assert out.shape == (48, 32, 32, 3)
    return [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in out]


def test_judge_reads_ground_truth_renders_correctly() -> None:
    for blur in (0.0, 1.0):
        scores = judge.validate(n=500, seed=7, blur_px=blur)
        assert min(scores.values()) >= 0.99, (blur, scores)


def test_judge_rejects_off_palette_and_two_colored_shapes() -> None:
    """An olive or brownish-gray "red" is no color of the palette, and a shape half red, half
    green is two colors: the judge must not read either as the nearest palette color."""
    spec = data.Sample("red", "square", "large", "center")
    red = np.asarray(data.render(spec))
    assert judge.read(red).color == "red" and not judge.read(red).mixed
    for off in ((130, 105, 50), (120, 90, 80)):  # olive; grayish brown
        reading = judge.read(np.asarray(data.render(spec, fill=off)))
        assert reading.color == judge.OFF_PALETTE, (off, reading)
    green = np.asarray(data.render(replace(spec, color="green")))
    half = red.copy()
    half[:, 16:] = green[:, 16:]
    assert judge.read(half).mixed
    assert judge.score([half], [spec])["one_color"] == 0.0


def test_plain_diffusers_pipeline_follows_the_48_prompts(reference_images: list[np.ndarray]) -> None:
    prompts, _ = data.eval_sets()["eval_48"]
    scores = judge.score(reference_images, [s for _, s in prompts])
    assert passes(scores), scores


def test_served_images_match_the_reference_and_follow_prompts(
    adapter: ModelAdapter, reference_images: list[np.ndarray]
) -> None:
    info = adapter.info
    assert (info.default_width, info.default_steps, info.default_sampler) == (32, 20, Sampler.EULER)
    prompts, seeds = data.eval_sets()["eval_48"]
    images = served.serve_prompts(adapter, prompts, seeds)
    # Served in batches of up to 32 requests, each image still matches the reference.
    for ours, ref in zip(images, reference_images, strict=True):
        assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 2
    scores = judge.score(images, [s for _, s in prompts])
    assert passes(scores), scores


def test_random_prompts_with_other_seeds_are_followed(adapter: ModelAdapter) -> None:
    """200 random prompts (every attribute named, any phrasing), seeds from 1000, served by
    the engine: the model follows prompts it was not tuned on, not only the card's 48."""
    prompts, seeds = data.eval_sets()["random_200"]
    scores = judge.score(served.serve_prompts(adapter, prompts, seeds), [s for _, s in prompts])
    assert passes(scores), scores


@pytest.mark.parametrize(
    "sampler", [s for s in Sampler if s not in (Sampler.LCM, Sampler.EULER)], ids=lambda s: s.value
)
def test_every_listed_sampler_follows_the_prompts(adapter: ModelAdapter, sampler: Sampler) -> None:
    """Each other sampler the model lists (its default, Euler, is judged above) gives clean
    images that the judge reads as the prompts (DDIM too: the model's scheduler config turns
    off DDIM's clipping, which turned these latents into noise)."""
    assert sampler in adapter.info.samplers
    prompts, seeds = data.eval_sets()["eval_48"]
    images = served.serve_prompts(adapter, prompts, seeds, sampler=sampler)
    scores = judge.score(images, [s for _, s in prompts])
    assert passes(scores), scores


def test_shipped_preview_decoder_shows_the_image_forming() -> None:
    """The embedded model ships a tiny preview decoder (AutoencoderTiny, named in its
    stepserve.json): previews are full size, the last one is close to the final image, the
    judge reads the shape off the middle step's preview and color and shape off the previews
    from three quarters of the way on. Without it (the option set empty) previews fall back
    to the latent-size linear map; the images are the same either way."""
    prompts, seeds = data.eval_sets()["eval_48"]
    prompts, seeds = prompts[::3], seeds[::3]
    events = {}
    for name, overrides in (("decoder", {}), ("linear", {"preview_decoder": ""})):
        adapter = served.load(**overrides)
        assert (adapter.preview_decoder is not None) == (name == "decoder")
        reqs = [
            served.request(adapter, f"r{i}", p, seed, preview_every=5)
            for i, ((p, _), seed) in enumerate(zip(prompts, seeds, strict=True))
        ]
        events[name] = served.serve(adapter, reqs)

    def preview(name: str, i: int, step: int) -> np.ndarray:
        got = [e.preview for e in events[name][f"r{i}"] if isinstance(e, ProgressEvent) and e.step == step]
        assert len(got) == 1 and got[0] is not None
        return got[0]

    shape_at_middle = both_at_three_quarters = 0
    for i, (_, spec) in enumerate(prompts):
        final = served.final_image(events["decoder"][f"r{i}"])
        assert np.array_equal(final, served.final_image(events["linear"][f"r{i}"]))
        assert preview("decoder", i, 10).shape == (32, 32, 3) and preview("linear", i, 10).shape == (
            16,
            16,
            3,
        )
        assert np.abs(preview("decoder", i, 20).astype(float) - final.astype(float)).mean() < 8, spec
        middle, late = judge.read(preview("decoder", i, 10)), judge.read(preview("decoder", i, 15))
        shape_at_middle += middle.shape == spec.shape
        both_at_three_quarters += late.color == spec.color and late.shape == spec.shape
    assert shape_at_middle >= 0.8 * len(prompts), shape_at_middle
    assert both_at_three_quarters >= 0.9 * len(prompts), both_at_three_quarters


def test_previews_show_each_request_own_image(adapter: ModelAdapter) -> None:
    """A preview shows its own request's image, not a plausible average: each last preview is
    nearer its own final image than the other request's."""
    reqs = [
        served.request(adapter, "blue", "a large blue square on the left", 3, preview_every=5),
        served.request(adapter, "yellow", "a large yellow circle on the right", 3, preview_every=5),
    ]
    events = served.serve(adapter, reqs)
    last = {
        r: [e.preview for e in events[r] if isinstance(e, ProgressEvent) and e.preview is not None]
        for r in events
    }
    assert all(len(p) == 4 for p in last.values())

    def err(rid: str, other: str) -> float:
        final = served.final_image(events[other]).astype(float)
        return float(np.abs(last[rid][-1].astype(float) - final).mean())

    assert err("blue", "blue") < err("blue", "yellow") and err("yellow", "yellow") < err("yellow", "blue")


def test_ddim_draws_the_same_image_as_euler(adapter: ModelAdapter) -> None:
    """DDIM (eta 0) and Euler integrate the same ODE: on the embedded model they give the same
    image, not noise (DDIM built from the model's config must not clip its x0 estimate)."""
    reqs = [
        served.request(adapter, s.value, "a red circle", 0, sampler=s) for s in (Sampler.EULER, Sampler.DDIM)
    ]
    events = served.serve(adapter, reqs)
    euler, ddim = (served.final_image(events[s.value]).astype(int) for s in (Sampler.EULER, Sampler.DDIM))
    assert np.abs(euler - ddim).mean() < 1.0


# -- image-to-image and inpainting ----------------------------------------------------------------


def test_img2img_changes_what_the_prompt_says_and_keeps_the_place(adapter: ModelAdapter) -> None:
    """The issue's example first: "a blue circle on the left" from a red circle on the left
    at strength 0.7; then a third of the edit set (every color pair, alternating shapes and
    sides: the source is a circle, so a new shape must be drawn too)."""
    red = data.Sample("red", "circle", "large", "left")
    blue = data.Sample("blue", "circle", "large", "left")
    pairs = [(red, blue), *data.edit_pairs()[::3]]
    reqs = [
        served.edit_request(adapter, f"e{i}", s, d, i, Task.IMAGE_TO_IMAGE, 0.7)
        for i, (s, d) in enumerate(pairs)
    ]
    events = served.serve(adapter, reqs)
    images = [served.final_image(events[r.request_id]) for r in reqs]
    first = judge.read(images[0])
    assert (first.color, first.shape, first.position) == ("blue", "circle", "left")
    assert passes(judge.score(images, [d for _, d in pairs]))
    assert {e.total_steps for e in events["e0"] if isinstance(e, ProgressEvent)} == {14}  # int(20 * 0.7)


def test_inpainting_repaints_the_masked_half_and_keeps_the_other(adapter: ModelAdapter) -> None:
    pairs = data.edit_pairs()[1::3]
    reqs = [
        served.edit_request(adapter, f"e{i}", s, d, i, Task.INPAINTING, 1.0) for i, (s, d) in enumerate(pairs)
    ]
    events = served.serve(adapter, reqs)
    images = [served.final_image(events[r.request_id]) for r in reqs]
    assert passes(judge.score(images, [d for _, d in pairs]))
    for r, im in zip(reqs, images, strict=True):
        assert r.init_image is not None and r.mask is not None
        # The kept half is the background it was, within the VAE's round trip.
        assert np.abs(im.astype(int) - r.init_image.astype(int))[r.mask == 0].mean() < 4


# -- its LoRA adapters ---------------------------------------------------------------------------------

# Share of large shapes read in the adapter's style; the committed adapters measure 0.32
# (outline) and 0.97 (stripes) on the 60 style prompts (model card): outline is weak.
STYLE_THRESHOLD = {"outline": 0.2, "stripes": 0.85}


@pytest.mark.parametrize("style", ["outline", "stripes"])
def test_its_adapters_draw_their_style_and_keep_the_prompt(adapter: ModelAdapter, style: str) -> None:
    """The shipped adapters (registered from the model's stepserve.json): the style reads as
    the adapter's (the base model: solid), and the prompt's size and place stay (color and
    shape drift: see the model card)."""
    prompts = served.style_prompts()[::2]
    seeds = list(range(len(prompts)))
    base = served.serve_prompts(adapter, prompts, seeds)
    styled = served.serve_prompts(adapter, prompts, seeds, loras=((style, 1.0),))
    assert sum(judge.read_style(im) == "solid" for im in base) / len(base) >= 0.95
    assert sum(judge.read_style(im) == style for im in styled) / len(styled) >= STYLE_THRESHOLD[style]
    scores = judge.score(styled, [s for _, s in prompts])
    assert min(scores["size"], scores["position"]) >= 0.9, scores


def test_its_adapter_matches_diffusers(adapter: ModelAdapter) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(str(served.default_model_path()))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(served.default_model_path() / "loras" / "outline"), adapter_name="outline")
    pipe.set_adapters(["outline"], [0.8])
    ref = pipe(
        "a large blue square on the left",
        num_inference_steps=adapter.info.default_steps,
        guidance_scale=adapter.info.default_guidance_scale,
        generator=[torch.Generator().manual_seed(3)],
        output_type="np",
    ).images[0]
    ours = served.final_image(
        served.serve(
            adapter,
            [served.request(adapter, "p", "a large blue square on the left", 3, loras=(("outline", 0.8),))],
        )["p"]
    )
    assert np.abs(ours.astype(int) - (np.clip(ref, 0, 1) * 255).round().astype(int)).max() <= 2
