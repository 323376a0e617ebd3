"""The embedded model served by stepserve's engine (in process): the model card's figures
"through stepserve", and the helper the tests and ``bench/previews.py`` generate with.

    python models/tiny/served.py            # judge the 48 card prompts and the 200 random ones
    python models/tiny/served.py --samplers # ... and the 48 with every sampler the model lists
    python models/tiny/served.py --edits    # ... and image-to-image and inpainting edits
    python models/tiny/served.py --loras    # ... and its LoRA adapters' styles

Requests run 16 at a time (32 forward rows with guidance), as a busy server batches them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: import as the package the tests use
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from models.tiny import data, judge
from stepserve.server.engine.engine import Engine, EngineConfig
from stepserve.server.engine.models import ModelAdapter, default_model_path, load_model
from stepserve.server.engine.types import EngineEvent, GenerationParams, ResultEvent, Task

__all__ = ["default_model_path", "edit_request", "final_image", "load", "request", "serve", "serve_prompts"]

MODEL = "tiny-shapes"


def load(max_batch_size: int = 32, **overrides: object) -> ModelAdapter:
    """The embedded model's adapter (``overrides``: its stepserve.json settings changed)."""
    return load_model(MODEL, default_model_path(), max_batch_size=max_batch_size, overrides=dict(overrides))


def request(adapter: ModelAdapter, rid: str, prompt: str, seed: int, **kw: object) -> GenerationParams:
    """A request at the model's own size with its defaults (steps, guidance, sampler),
    ``kw`` changing any field."""
    info = adapter.info
    fields: dict[str, object] = {
        "negative_prompt": "",
        "width": info.default_width,
        "height": info.default_height,
        "steps": info.default_steps,
        "guidance_scale": info.default_guidance_scale,
        "sampler": info.default_sampler,
        **kw,
    }
    cfg = info.runs_cfg(float(fields["guidance_scale"]))  # type: ignore[arg-type]
    return GenerationParams(request_id=rid, model=MODEL, prompt=prompt, seed=seed, cfg=cfg, **fields)  # type: ignore[arg-type]


def serve(adapter: ModelAdapter, reqs: list[GenerationParams]) -> dict[str, list[EngineEvent]]:
    """Run ``reqs`` through an engine to the end; every event of each request, by id."""
    engine = Engine({MODEL: adapter}, EngineConfig())
    events: dict[str, list[EngineEvent]] = {r.request_id: [] for r in reqs}
    for r in reqs:
        engine.submit(r, events[r.request_id].append)
    while not engine.idle():
        engine.run_once()
    return events


def final_image(events: list[EngineEvent]) -> np.ndarray:
    last = events[-1]
    assert isinstance(last, ResultEvent), last
    return last.images[0]


def serve_prompts(
    adapter: ModelAdapter,
    prompts: list[tuple[str, data.Sample]],
    seeds: list[int],
    **kw: object,
) -> list[np.ndarray]:
    """One image per prompt (with its seed), served together; ``kw`` changes the requests."""
    pairs = enumerate(zip(prompts, seeds, strict=True))
    reqs = [request(adapter, f"r{i}", p, seed, **kw) for i, ((p, _), seed) in pairs]
    events = serve(adapter, reqs)
    return [final_image(events[r.request_id]) for r in reqs]


def edit_request(
    adapter: ModelAdapter,
    rid: str,
    src: data.Sample,
    dst: data.Sample,
    seed: int,
    task: Task,
    strength: float,
    **kw: object,
) -> GenerationParams:
    """An image-to-image or inpainting request turning a render of ``src`` into ``dst``
    (inpainting repaints ``src``'s half, data.edit_mask)."""
    info = adapter.info
    first, _ = info.schedule(info.default_steps, strength, task)
    mask = data.edit_mask(src) if task is Task.INPAINTING else None
    init = np.asarray(data.render(src))
    cap = data.caption(dst)
    return request(
        adapter, rid, cap, seed, init_image=init, mask=mask, strength=strength, first_step=first, **kw
    )


def serve_edits(adapter: ModelAdapter, task: Task, strength: float, **kw: object) -> dict[str, float]:
    """The judge's scores of every data.edit_pairs() edit of ``task`` at ``strength`` (seed
    i for pair i), plus for inpainting how far the kept half moved (mean |difference|, /255)."""
    pairs = data.edit_pairs()
    reqs = [edit_request(adapter, f"e{i}", s, d, i, task, strength, **kw) for i, (s, d) in enumerate(pairs)]
    events = serve(adapter, reqs)
    images = [final_image(events[r.request_id]) for r in reqs]
    scores = judge.score(images, [d for _, d in pairs])
    if task is Task.INPAINTING:
        moved = []
        for r, im in zip(reqs, images, strict=True):
            assert r.init_image is not None and r.mask is not None
            moved.append(np.abs(im.astype(int) - r.init_image.astype(int))[r.mask == 0].mean())
        scores["kept_region_mean_diff"] = round(float(np.mean(moved)), 2)
    return scores


def style_prompts() -> list[tuple[str, data.Sample]]:
    """The prompts the adapters are judged on: every color and shape, large, at every place."""
    out = []
    for color in data.COLORS:
        for shape in data.SHAPES:
            for position in data.POSITIONS:
                s = data.Sample(color, shape, "large", position)
                out.append((data.caption(s), s))
    return out


def serve_styles(adapter: ModelAdapter, lora: str | None, scale: float = 1.0) -> dict[str, float]:
    """With adapter ``lora`` (None: none) on the 60 style prompts (seeds 0-59): the share read
    in each style, and the judge's usual columns."""
    prompts = style_prompts()
    loras = ((lora, scale),) if lora else ()
    images = serve_prompts(adapter, prompts, list(range(len(prompts))), loras=loras)
    styles = [judge.read_style(im) for im in images]
    scores = {f"style_{st}": sum(x == st for x in styles) / len(styles) for st in data.STYLES}
    return {**scores, **judge.score(images, [s for _, s in prompts])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samplers", action="store_true", help="also judge the 48 prompts with every sampler")
    ap.add_argument(
        "--edits", action="store_true", help="also judge image-to-image (strength 0.7) and inpainting edits"
    )
    ap.add_argument("--loras", action="store_true", help="also judge the model's LoRA adapters (styles)")
    ap.add_argument("--lora-scale", type=float, default=1.0, help="the adapters' scale for --loras")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    adapter = load()
    out: dict[str, dict[str, float]] = {}
    for name, (prompts, seeds) in data.eval_sets().items():
        out[name] = judge.score(serve_prompts(adapter, prompts, seeds), [s for _, s in prompts])
    if args.samplers:
        prompts, seeds = data.eval_sets()["eval_48"]
        for sampler in adapter.info.samplers:
            images = serve_prompts(adapter, prompts, seeds, sampler=sampler)
            out[f"eval_48_{sampler.value}"] = judge.score(images, [s for _, s in prompts])
    if args.edits:
        out["img2img_0.7"] = serve_edits(adapter, Task.IMAGE_TO_IMAGE, 0.7)
        out["inpaint_1.0"] = serve_edits(adapter, Task.INPAINTING, 1.0)
        out["inpaint_1.0_preserve_unmasked"] = serve_edits(
            adapter, Task.INPAINTING, 1.0, preserve_unmasked=True
        )
    if args.loras:
        for lora in (None, *sorted(adapter.loras)):
            out[f"style_{lora or 'base'}"] = serve_styles(adapter, lora, args.lora_scale)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
