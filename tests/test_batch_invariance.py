"""A request's image depends only on its own inputs, never on what it was batched with.

On CPU float32 the guarantee is bit-identical pixels (see
``stepserve/server/engine/batch_invariance.py`` for the kernels that needed care).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from stepserve.server.engine.batch_invariance import make_rowwise_linears
from stepserve.server.engine.samplers import GENERAL_SAMPLERS
from stepserve.server.engine.types import ProgressEvent, Sampler

from .engine_helpers import Harness, images_among, params, serve_among

SAMPLERS = list(GENERAL_SAMPLERS)


def _others(n: int) -> list:
    prompts = [
        "a blue square",
        "a large green triangle at the top",
        "a yellow circle",
        "a dog",
        "photo of a house",
    ]
    out = []
    for i in range(n):
        out.append(
            params(
                f"other{i}",
                prompt=prompts[i % len(prompts)],
                negative_prompt="red" if i % 2 else "",
                seed=100 + i,
                steps=3 + i % 4,
                guidance_scale=[7.5, 1.0, 4.0][i % 3],
                sampler=SAMPLERS[i % len(SAMPLERS)],
            )
        )
    return out


@pytest.fixture(scope="module")
def embedded_adapter():
    """The embedded model, previews through its shipped tiny decoder (AutoencoderTiny), served
    under the name the requests here use."""
    from stepserve.server.engine.models import default_model_path, load_model

    adapter = load_model("tiny", default_model_path())
    assert adapter.preview_decoder is not None
    return adapter


@pytest.mark.parametrize("previewer", ["linear map", "preview decoder"])
def test_previews_are_each_requests_own_alone_or_batched(request, previewer: str) -> None:
    """Previews are made for the whole batch at once (one host copy per step): each request
    still gets its own, the same as alone, and only at the steps it asked for; through the
    linear latent -> RGB map (the tiny random model) and through a preview decoder (the
    embedded model's, whose convolutions differ between odd and even batches on CPU)."""
    tiny_adapter = request.getfixturevalue(
        "tiny_adapter" if previewer == "linear map" else "embedded_adapter"
    )
    target = params("target", steps=5, preview_every=2, sampler=Sampler.DPM_SOLVER_MULTISTEP)
    others = [replace(o, preview_every=i % 3) for i, o in enumerate(_others(6))]

    def previews(h: Harness, rid: str) -> list:
        return [(e.step, e.preview) for e in h.events[rid] if isinstance(e, ProgressEvent)]

    def same(a: list, b: list) -> bool:
        return [s for s, _ in a] == [s for s, _ in b] and all(
            (x is None and y is None) or (x is not None and y is not None and np.array_equal(x, y))
            for (_, x), (_, y) in zip(a, b, strict=True)
        )

    h = serve_among(tiny_adapter, target, others, join_after=1)
    alone = previews(serve_among(tiny_adapter, target, []), "target")
    assert [s for s, p in alone if p is not None] == [2, 4]
    assert same(previews(h, "target"), alone)
    for o in others:  # each batchmate got its own previews, at its own steps
        mine = previews(h, o.request_id)
        due = [s for s in range(1, o.steps + 1) if o.preview_every and s % o.preview_every == 0]
        assert [s for s, p in mine if p is not None] == due
        assert same(mine, previews(serve_among(tiny_adapter, o, []), o.request_id))


@pytest.mark.parametrize("sampler", SAMPLERS, ids=[s.value for s in SAMPLERS])
def test_same_seed_alone_or_with_seven_others_gives_identical_pixels(tiny_adapter, sampler: Sampler) -> None:
    target = params("target", seed=42, steps=5, sampler=sampler, guidance_scale=6.0, negative_prompt="blue")
    alone = images_among(tiny_adapter, target, [])
    batched = images_among(tiny_adapter, target, _others(7), join_after=2)
    assert np.array_equal(alone[0], batched[0])


def test_unguided_request_alone_or_batched_is_identical(tiny_adapter) -> None:
    # guidance <= 1 adds a single row; alone, that is a batch of 1 (padded to 2 internally).
    target = params("target", seed=7, steps=4, guidance_scale=1.0)
    alone = images_among(tiny_adapter, target, [])
    batched = images_among(tiny_adapter, target, _others(7))
    assert np.array_equal(alone[0], batched[0])


def test_image_i_of_a_request_equals_a_single_image_request_with_seed_plus_i(tiny_adapter) -> None:
    multi = images_among(tiny_adapter, params("multi", seed=10, num_images=3, steps=3), [])
    single = images_among(tiny_adapter, params("single", seed=12, steps=3), [])
    assert np.array_equal(multi[2], single[0])
    assert not np.array_equal(multi[0], multi[1])


@pytest.mark.parametrize(("k", "n", "bias"), [(64, 256, True), (320, 1280, True), (1280, 320, False)])
def test_rowwise_linear_rows_equal_one_row_linear_at_every_batch_size(k: int, n: int, bias: bool) -> None:
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(k, n, bias=bias))
    x = torch.randn(33, k)
    ref = [lin(x[i : i + 1]) for i in range(33)]  # plain nn.Linear, one row at a time
    make_rowwise_linears(lin)
    for m in (1, 2, 3, 5, 8, 16, 33):
        out = lin(x[:m])
        for i in range(m):
            assert torch.equal(out[i : i + 1], ref[i]), (m, i)
    # Same parameters, same state dict: only the class changed.
    assert set(lin.state_dict()) == ({"0.weight", "0.bias"} if bias else {"0.weight"})


def test_batched_decode_gives_each_image_the_same_pixels_at_every_batch_size() -> None:
    """Finished requests are decoded together (padded to an even batch): an image's pixels do
    not depend on how many others finished in the same step. (The embedded model's VAE: its
    kernels do differ between odd and even batches on CPU; the tiny random one's do not.)"""
    from types import SimpleNamespace

    from stepserve.server.engine.models import default_model_path, load_model

    adapter = load_model("tiny-shapes", default_model_path())

    torch.manual_seed(0)
    lat = torch.randn(5, 4, 16, 16)

    def reqs(idx: list[int]) -> list:
        return [
            SimpleNamespace(
                work=SimpleNamespace(images=[SimpleNamespace(latents=lat[i : i + 1])]),
                params=SimpleNamespace(preserve_unmasked=False),
            )
            for i in idx
        ]

    alone = [adapter.decode(reqs([i]))[0][0] for i in range(5)]
    for n in (2, 3, 4, 5):
        together = adapter.decode(reqs(list(range(n))))
        for i in range(n):
            np.testing.assert_array_equal(together[i][0], alone[i])
