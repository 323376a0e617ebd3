"""Feature caching (DeepCache) inside step-level batches: rows that reuse their request's deep
feature share forwards with rows that compute theirs and with requests that do not cache, and
each request's image is the same alone or batched; requests without caching are untouched."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import grpc
import numpy as np
import pytest
import torch

from stepserve.client import ImageClient, StepserveError
from stepserve.server.engine.feature_cache import cached_forward, feature_cache_support
from stepserve.server.engine.models import default_model_path, load_model
from stepserve.server.engine.models.registry import ModelLoadError
from stepserve.server.engine.types import Sampler
from stepserve.v1 import image_generation_pb2 as pb

from .engine_helpers import Harness, images_among, params
from .metrics_helpers import Samples, scrape
from .server_process import free_port
from .server_thread import ServerThread


def _no_plan(rows):
    return contextlib.nullcontext()


def _unet_inputs(adapter, n: int, seed: int = 0):
    """Random inputs of the adapter's UNet for ``n`` rows, its extra inputs included."""
    g = torch.Generator().manual_seed(seed)
    unet = adapter.unet
    h = w = int(unet.config.sample_size)
    x = torch.randn(n, int(unet.config.in_channels), h, w, generator=g)
    t = torch.tensor([999.0, 500.0, 20.0, 300.0, 700.0][:n])
    ctx = torch.randn(n, 77, int(unet.config.cross_attention_dim), generator=g)
    kwargs: dict = {}
    if unet.config.get("addition_embed_type") == "text_time":
        proj = int(unet.config.projection_class_embeddings_input_dim)
        n_time = 6
        text_dim = proj - n_time * int(unet.config.addition_time_embed_dim)
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(n, text_dim, generator=g),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(n, 1),
        }
    if unet.config.get("time_cond_proj_dim"):
        kwargs["timestep_cond"] = torch.randn(n, int(unet.config.time_cond_proj_dim), generator=g)
    return x, t, ctx, kwargs


@pytest.mark.parametrize("family", ["tiny_adapter", "sdxl", "lcm"])
def test_cached_forward_rows_equal_the_plain_forward_bit_for_bit(request, family: str) -> None:
    """A row that computes its deep feature, or reuses the one it computed, gets the plain
    forward's exact bits, whichever other rows compute or reuse theirs (every family's extra
    inputs: SDXL's added conditioning, LCM's guidance embedding)."""
    adapter = request.getfixturevalue(family)
    assert adapter.batch_invariant and feature_cache_support(adapter.unet) is None
    x, t, ctx, kw = _unet_inputs(adapter, 4)
    with torch.inference_mode():
        plain = adapter.unet(x, t, encoder_hidden_states=ctx, return_dict=False, **kw)[0]
        fresh = cached_forward(
            adapter.unet, x, t, ctx, reuse=[None] * 4, plan_for=_no_plan, pad_single=True, **kw
        )
        assert torch.equal(fresh.sample, plain)
        assert all(d is not None for d in fresh.deep)
        for pattern in ([0, 2], [1, 2, 3], [0, 1, 2, 3]):  # rows that reuse
            reuse = [fresh.deep[i] if i in pattern else None for i in range(4)]
            mixed = cached_forward(
                adapter.unet, x, t, ctx, reuse=reuse, plan_for=_no_plan, pad_single=True, **kw
            )
            assert torch.equal(mixed.sample, plain), pattern
            assert [d is None for d in mixed.deep] == [i in pattern for i in range(4)]
        # Reusing a stale feature (another timestep's) changes the row: the cache is read.
        stale = cached_forward(
            adapter.unet, x, t.flip(0), ctx, reuse=[None] * 4, plan_for=_no_plan, pad_single=True, **kw
        ).deep
        mixed = cached_forward(
            adapter.unet,
            x,
            t,
            ctx,
            reuse=[stale[0], None, None, None],
            plan_for=_no_plan,
            pad_single=True,
            **kw,
        )
        assert not torch.equal(mixed.sample[0], plain[0])
        assert torch.equal(mixed.sample[1:], plain[1:])


def test_cached_forward_counts_each_paths_flops(tiny_adapter) -> None:
    """The two paths' FLOPs per row add up to the plain forward's: the stages run every op of
    it once, and the deep middle is a real share."""
    from torch.utils.flop_counter import FlopCounterMode

    x, t, ctx, kw = _unet_inputs(tiny_adapter, 4)
    out = cached_forward(tiny_adapter.unet, x, t, ctx, reuse=[None] * 4, plan_for=_no_plan, count_flops=True)
    with torch.inference_mode(), FlopCounterMode(display=False) as plain:
        tiny_adapter.unet(x, t, encoder_hidden_states=ctx, return_dict=False)
    assert out.flops is not None
    shallow, middle = out.flops
    assert shallow + middle == plain.get_total_flops() / 4
    assert 0.1 < shallow / (shallow + middle) < 0.9


def _mix() -> list:
    """Requests at different steps with different intervals, CFG or not, and none caching."""
    return [
        params("c2", prompt="a blue square", seed=11, steps=6, cache_interval=2),
        params("plain", prompt="a yellow circle", seed=12, steps=5, guidance_scale=1.0),
        params("c4", prompt="a green triangle", seed=13, steps=7, cache_interval=4, sampler=Sampler.DDIM),
        params("plain2", prompt="a dog", seed=14, steps=3, num_images=2),
        params("c3u", prompt="a house", seed=15, steps=5, cache_interval=3, guidance_scale=1.0),
    ]


def test_feature_cached_request_alone_or_in_a_mixed_batch_is_identical(tiny_adapter) -> None:
    target = params("t", seed=7, steps=8, cache_interval=3, num_images=2)
    alone = images_among(tiny_adapter, target)
    for join_after in (0, 2):  # joining mid-way: the others refresh on other steps
        batched = images_among(tiny_adapter, target, _mix(), join_after)
        for a, b in zip(alone, batched, strict=True):
            np.testing.assert_array_equal(a, b)
    # The cache is used: the same request without it gives another image.
    uncached = images_among(tiny_adapter, replace(target, cache_interval=0))
    assert any(not np.array_equal(a, b) for a, b in zip(alone, uncached, strict=True))


def test_requests_without_caching_are_untouched_by_cached_neighbours(tiny_adapter) -> None:
    target = params("t", seed=3, steps=5, negative_prompt="red")
    plain_alone = images_among(tiny_adapter, target)
    batched = images_among(tiny_adapter, target, _mix(), join_after=1)
    for a, b in zip(plain_alone, batched, strict=True):
        np.testing.assert_array_equal(a, b)


def test_reuse_steps_are_charged_their_share_and_deep_features_freed(tiny_adapter) -> None:
    h = Harness({"tiny": tiny_adapter})
    cached, plain = params("c", steps=6, cache_interval=3), params("p", steps=6, seed=2)
    h.submit(cached)
    h.submit(plain)
    h.step()  # admitted and the first step (a refresh for the cached request)
    running = h.engine.scheduler.running
    assert running["c"].work.images[0].deep is not None  # kept after its refresh step
    assert running["p"].work.images[0].deep is None  # a request without caching keeps none
    share = tiny_adapter.row_costs([running["c"], running["p"]])
    assert 0 < share[0] < share[1] == 2.0  # reuses next step: less than its two rows
    h.run_until_idle()
    usage = {rid: h.result(rid).usage for rid in ("c", "p")}
    assert usage["c"].accelerator_s < usage["p"].accelerator_s


def test_cached_rows_with_loras_alone_or_batched_with_other_adapters() -> None:
    """On the embedded model and its adapters: each stage of a cached forward adds the
    adapters of its own rows (the deep middle runs a subset of them)."""
    adapter = load_model("tiny", default_model_path())
    base = dict(width=32, height=32, steps=5)
    target = params("t", seed=5, cache_interval=2, loras=(("stripes", 1.0),), **base)
    others = [
        params("o1", seed=6, loras=(("outline", 1.0),), **base),
        params("o2", seed=7, cache_interval=3, loras=(("outline", 0.5), ("stripes", 1.0)), **base),
        params("o3", seed=8, cache_interval=2, **base),
        params("o4", seed=9, **base),
    ]
    alone = images_among(adapter, target)
    batched = images_among(adapter, target, others, join_after=1)
    np.testing.assert_array_equal(alone[0], batched[0])
    without = images_among(adapter, replace(target, loras=()))
    assert not np.array_equal(alone[0], without[0])  # the adapter is applied


def test_cache_interval_over_the_api_presets_and_bad_values(tiny_sd_dir) -> None:
    """Over gRPC: the interval is validated against the model's limit (INVALID_ARGUMENT naming
    the field), a preset's interval applies unless the request sets its own, and ListModels
    reports both."""
    srv = ServerThread.tiny(
        tiny_sd_dir,
        model_options=["tiny.max_cache_interval=4", "tiny.cache_intervals.draft=3", "tiny.presets.draft=6"],
        metrics_port=free_port(),
    )
    try:
        with ImageClient(srv.target) as c:
            info = c.list_models()[0]
            assert info.max_cache_interval == 4
            assert {p.preset: p.cache_interval for p in info.presets}[pb.PRESET_DRAFT] == 3
            with pytest.raises(StepserveError) as e:
                c.generate("a red circle", steps=4, cache_interval=5)
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert [v.field for v in e.value.field_violations] == ["cache_interval"]
            assert "limit of 4" in e.value.field_violations[0].description
            common = dict(seed=4, width=32, height=32)
            draft = c.generate("a red circle", preset="draft", **common).images[0].data
            explicit = c.generate("a red circle", steps=6, cache_interval=3, **common).images[0].data
            off = c.generate("a red circle", preset="draft", cache_interval=0, **common).images[0].data
            plain = c.generate("a red circle", steps=6, **common).images[0].data
        assert draft == explicit and off == plain and draft != plain
        # Two cached requests of 6 steps at interval 3, one image, CFG: each computed on steps
        # 1 and 4 and reused on the other four, two rows a step (the warm-up caches nothing).
        metrics = Samples(scrape(srv.server.metrics_port))
        assert metrics.get("stepserve_feature_cache_rows_total", model="tiny", path="computed") == 2 * 2 * 2
        assert metrics.get("stepserve_feature_cache_rows_total", model="tiny", path="reused") == 2 * 4 * 2
    finally:
        srv.stop()


def test_a_model_option_beyond_what_the_unet_offers_is_a_startup_error(tiny_sd_dir) -> None:
    with pytest.raises(ModelLoadError, match="cache_intervals.draft 5 is more than its max_cache_interval 4"):
        load_model("tiny", tiny_sd_dir, overrides={"max_cache_interval": 4, "cache_intervals": {"draft": 5}})
