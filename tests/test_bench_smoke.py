"""The benchmark runs end to end (smoke profile: every mode and workload, briefly) and writes
its results and chart. Figures are not asserted here: speed is measured by `make bench`."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_smoke(out_dir: Path, *extra: str) -> tuple[Path, dict]:
    """``bench/run.py --profile smoke`` (with ``extra``) into ``out_dir``: its results file and
    what it holds."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench/run.py"), "--profile", "smoke", *extra, "--out", str(out_dir)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (result,) = out_dir.glob("*.json")
    return result, json.loads(result.read_text())


def test_bench_smoke(tmp_path: Path) -> None:
    result, r = run_smoke(tmp_path)
    assert result.name.endswith("-smoke.json")
    assert set(r["modes"]) == {"step", "request", "reference"}
    for mode in r["modes"].values():
        assert mode["lone"]["ok"] == 1 and mode["lone"]["errors"] == 0
        assert all(s["errors"] == 0 and s["images_per_s"] > 0 for s in mode["saturation"].values())
        assert all(m["errors"] == 0 and m["ok"] > 0 for m in mode["mixed"].values())
    for name in ("step", "request"):  # the mix's own capacity, measured before the open loops
        cap = r["modes"][name]["mixed_capacity"]
        assert cap["errors"] == 0 and cap["images_per_s"] > 0
    assert r["capacity_rps"] == r["modes"]["step"]["mixed_capacity"]["images_per_s"]
    # The edit workload (text-to-image, img2img at 0.5, inpainting): every mode served it
    # without an error, at the model's own size, and its ratios are its figures'.
    assert "skipped" not in r["edit_workload"] and r["edit_workload"]["image_size"] == [32, 32]
    # Not measured here (CI time): the open loops run at 80% of the mixed workload's capacity.
    assert "edit_capacity_rps" not in r and "mixed workload" in r["edit_workload"]["rate_basis"]
    for name, mode in r["modes"].items():
        (edit,) = mode["edit"].values()
        assert edit["errors"] == 0 and edit["ok"] > 0, (name, edit.get("error_messages"))
        kinds = edit["by_kind"]
        assert sum(k["ok"] for k in kinds.values()) == edit["ok"]
        if edit["requests"] >= 4:  # seed 7's first four draws are one of each task, and a text
            assert all(k["ok"] > 0 for k in kinds.values())
        for k in kinds.values():
            assert k["mean_steps_run"] is None or k["mean_steps_run"] > 0
        assert kinds["text"]["mean_image_encode_s"] in (None, 0.0)
        if name != "reference" and kinds["img2img"]["ok"]:  # stepserve reports its encode time
            assert kinds["img2img"]["mean_image_encode_s"] > 0
    step_edit, req_edit = r["modes"]["step"]["edit"]["0.8"], r["modes"]["request"]["edit"]["0.8"]
    for q in ("p50", "p99"):
        want = step_edit[f"latency_{q}_s"] / req_edit[f"latency_{q}_s"]
        assert r["ratios"][f"edit80_{q}_step_vs_request"] == want
    assert r["compute_images_per_s"] and all(v > 0 for v in r["compute_images_per_s"].values())
    assert r["pipeline_images_per_s"] > 0  # the in-process diffusers baseline
    ref_tp = r["modes"]["reference"]["saturation"]["1"]["images_per_s"]
    assert r["ratios"]["reference_vs_in_process_pipeline"] == ref_tp / r["pipeline_images_per_s"]
    # The smoke profile is too short to promise any target; what it checks is that each
    # verdict is a boolean computed from the run's own figures.
    ratios, met = r["ratios"], r["ratios"]["targets_met"]
    assert all(isinstance(v, bool) for v in met.values())
    # The lora workload: 8 random adapters, closed loops against --lora-batching mixed without
    # and with adapters and against separate with them; every request served.
    lora = r["lora"]
    assert lora["streams"] == 4 and "mixed server" in lora["no_adapters_basis"]
    for name in ("no_adapters", "mixed", "separate"):
        run = lora[name]
        assert run["errors"] == 0 and run["ok"] > 0, (name, run.get("error_messages"))
        assert run["images_per_s"] > 0 and run["mean_batch"] >= 1
    assert lora["no_adapters"]["without_adapter"] == lora["no_adapters"]["ok"]
    # The draft workload: PRESET_DRAFT closed loops without and with feature caching, every
    # request served at the preset's steps, and the quality cost beside the figures.
    draft = r["draft"]
    for name in ("without_caching", "with_caching"):
        for run in draft[name]["runs"]:
            assert run["errors"] == 0 and run["ok"] > 0, (name, run.get("error_messages"))
    assert draft["quality"]["steps"] == 8 and draft["quality"]["prompts"] == 4
    assert draft["quality"]["judge_with_caching"]["shape"] >= 0  # the embedded model: judged
    assert ratios["draft_cached_vs_plain"] == (
        draft["with_caching"]["images_per_s"] / draft["without_caching"]["images_per_s"]
    )
    # Seed 0's first draws: an adapter, none, then adapters (one of 8 or none, equally likely).
    assert lora["mixed"]["without_adapter"] < lora["mixed"]["ok"]
    assert lora["separate"]["without_adapter"] < lora["separate"]["ok"]
    assert (
        lora["step_server_saturation_images_per_s"] == r["modes"]["step"]["saturation"]["4"]["images_per_s"]
    )
    mixed = lora["mixed"]["images_per_s"]
    assert ratios["lora_mixed_vs_no_adapters"] == mixed / lora["no_adapters"]["images_per_s"]
    assert ratios["lora_mixed_vs_separate"] == mixed / lora["separate"]["images_per_s"]
    assert met == {
        "saturated_vs_compute_limit >= 0.90": (ratios["saturated_vs_compute_limit"] or 0) >= 0.90,
        "saturated_vs_reference >= hardware_batch_gain": ratios["saturated_vs_sequential_reference"]
        >= ratios["hardware_batch_gain"],
        "lone_latency_vs_reference <= 1.05": ratios["lone_latency_vs_reference"] <= 1.05,
        "mixed80 p50 and p99 step <= 0.6 x request": ratios["mixed80_p50_step_vs_request"] <= 0.6
        and ratios["mixed80_p99_step_vs_request"] <= 0.6,
        "ttfp after queue <= 2 steps (p50)": (ratios["ttfp_after_queue_steps_p50"] or 99) <= 2,
        "lora_mixed_vs_no_adapters >= 0.85": ratios["lora_mixed_vs_no_adapters"] >= 0.85,
        "lora_mixed_vs_separate >= 2.0": ratios["lora_mixed_vs_separate"] >= 2.0,
        "cache bytes identical to fresh generations": True,
    }
    # The cache workload: the same seeded Zipf loop with the result cache off and on; nothing
    # is cached or coalesced with it off, every item's bytes agree between the two.
    cache = r["cache"]
    assert cache["off"]["errors"] == 0 and cache["on"]["errors"] == 0
    assert cache["off"]["hit_rate"] == 0 and cache["off"]["coalesced_rate"] == 0
    assert cache["off"]["generations"] == cache["off"]["ok"]
    assert cache["on"]["generations"] <= cache["on"]["distinct_items"]  # each item generated once
    assert cache["quality"]["items_compared"] > 0 and cache["quality"]["bytes_identical_share"] == 1.0
    assert ratios["cache_hit_rate"] == cache["on"]["hit_rate"]
    step_lone = r["modes"]["step"]["lone"]["latency_p50_s"]
    assert ratios["lone_latency_vs_reference"] == step_lone / r["modes"]["reference"]["lone"]["latency_p50_s"]
    assert r["environment"]["command"] == "python bench/run.py --profile smoke"
    assert result.with_suffix(".png").stat().st_size > 10_000
    # The step-time curve it measured drives the scheduling simulator.
    sim = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench/simulate.py"),
            "--results",
            str(result),
            "--seeds",
            "2",
            "--duration",
            "10",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert sim.returncode == 0, sim.stderr[-3000:]
    assert "step-level capacity for the mix" in sim.stdout


def test_bench_slo_workload_smoke(tmp_path: Path) -> None:
    """`bench/run.py --only slo` at its smallest (one load, one k, short floods): every
    server answers, the refusals are the deadline's, and in the flood slo serves interactive
    requests faster than fifo (preemption; tens of times on this CPU, asserted at 2x)."""
    result, r = run_smoke(tmp_path, "--only", "slo")
    assert result.name.endswith("-smoke-slo.json")
    slo = r["slo"]
    assert set(slo["lone_s"]) == {"4", "10", "20", "30", "50"}
    assert slo["saturation_rps"]["fifo"] > 0 and slo["saturation_rps"]["slo"] > 0
    (row,) = slo["attainment"].values()
    for policy in ("request", "fifo", "slo"):
        assert row[policy]["requests"] > 0
        assert set(row[policy]["errors"]) <= {"RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}
    fifo, fast = slo["flood"]["fifo"], slo["flood"]["slo"]
    assert fifo["interactive_ok"] == fifo["interactive_requests"] > 0
    assert fast["interactive_ok"] == fast["interactive_requests"] > 0
    assert fast["interactive_p50_s"] < 0.5 * fifo["interactive_p50_s"]
    assert "flood: interactive p99 <= 2x lone" in r["ratios"]["targets_met"]
    assert r["environment"]["command"] == "python bench/run.py --profile smoke --only slo"


def test_loadgen_draws_each_adapter_and_none_alike() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    import loadgen

    names = tuple(f"bench-{i}" for i in range(8))
    draw = loadgen.LoraDraw(names, seed=0)
    counts = Counter(draw.of(i) for i in range(9000))
    assert set(counts) == {None, *names}
    assert all(900 <= c <= 1100 for c in counts.values()), counts  # 1000 each, within 3 sigma
    assert [draw.of(i) for i in range(3)] == [draw.of(i) for i in range(3)]  # the request's own
    assert [draw.of(i) for i in range(20)] != [loadgen.LoraDraw(names, seed=1).of(i) for i in range(20)]


def test_random_loras_are_peft_files_for_every_attention_projection(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    import random_loras
    from safetensors import safe_open
    from safetensors.torch import load_file

    from stepserve.server.engine.models import default_model_path

    layers = random_loras.unet_linears(default_model_path())
    assert layers and {m.rsplit(".", 1)[-1] for m in layers} == {"to_q", "to_k", "to_v", "0"}
    paths = random_loras.build(tmp_path, default_model_path(), count=2)
    assert list(paths) == ["bench-0", "bench-1"]
    tensors = []
    for path in paths.values():
        with safe_open(str(path / random_loras.FILE), framework="pt") as f:
            assert json.loads(f.metadata()["lora_adapter_metadata"])["unet.r"] == 8
        tensors.append(load_file(path / random_loras.FILE))
        assert set(tensors[-1]) == {f"unet.{m}.lora_{ab}.weight" for m in layers for ab in ("A", "B")}
    key = next(iter(tensors[0]))
    assert tensors[0][key].shape[0] == 8 and not tensors[0][key].equal(tensors[1][key])  # seeds differ


def test_simulator_serves_every_arrival_and_step_level_wins_on_a_flat_curve() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    import simulate

    flat = simulate.Costs(step_s={1: 0.030, 16: 0.045})
    cap = simulate.capacity(flat, 16, seconds=120)
    arr = simulate.arrivals(0.8 * cap, 30, seed=3)
    step = simulate.latencies(simulate.simulate("fifo", arr, flat, 16))
    req = simulate.latencies(simulate.simulate("request", arr, flat, 16))
    assert len(step) == len(req) == len(arr)  # nobody lost
    # Every request takes at least its own steps at batch-1 speed.
    assert min(step) >= 4 * 0.030 and min(req) >= 4 * 0.030
    # When batching is nearly free, joining between steps beats waiting for a batch.
    assert simulate.percentile(step, 0.5) < 0.5 * simulate.percentile(req, 0.5)
    assert simulate.percentile(step, 0.99) < simulate.percentile(req, 0.99)


def test_simulator_runs_the_engines_scheduler_and_slo_preempts_a_flood() -> None:
    """The flood on a CPU-like (linear) curve: batch-class streams fill the batch; under fifo
    interactive requests wait for a slot and share every forward, under slo they displace
    batch requests at the next step and run in small forwards."""
    sys.path.insert(0, str(ROOT / "bench"))
    import simulate

    from stepserve.server.engine.scheduler import SloScheduler, StepLevelScheduler

    assert isinstance(simulate.scheduler_for("slo", simulate.Costs({1: 0.01}), 4, None), SloScheduler)
    assert type(simulate.scheduler_for("fifo", simulate.Costs({1: 0.01}), 4, None)) is StepLevelScheduler
    cpu = simulate.Costs(step_s={1: 0.0125, 4: 0.028, 16: 0.108}, prepare_s=0.002, decode_s={1: 0.004})
    out = simulate.flood(cpu, 16, rate=0.25, duration=20, seeds=1)
    assert out["fifo"]["interactive_p99_vs_lone"] > 10
    assert out["slo"]["interactive_p99_vs_lone"] <= 2.0
    assert out["slo"]["ttfp_p99_full_steps"] <= 2.0
    assert out["slo"]["batch_requests_per_s"] >= 0.9 * out["fifo"]["batch_requests_per_s"]
