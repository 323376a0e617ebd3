"""Load generator: drives one target over real gRPC (asyncio, one process) and writes one
record per request as JSON. Run by bench/run.py as a separate process from the server.

Two shapes of load:
- closed loop: ``--streams N --duration S``: N callers, each sending its next request as soon
  as the previous one finished (all with ``--steps``, or each drawn from the mix with ``--mix``);
- open loop: ``--rate R --duration S``: Poisson arrivals at R requests/s (fixed seed), each
  request drawn from the mix (steps, sampler), sent whether or not earlier ones finished.

``--edit`` (either shape) makes each request one of three tasks, drawn with a seeded RNG of its
own (so the arrivals, steps and samplers are those of the same seed without it): a third
text-to-image, a third image-to-image at strength 0.5 from an init image, a third inpainting at
strength 1.0 (diffusers' inpainting default) of an init image under a mask. The init images
(one flat shape on a light background, as the tiny-shapes model draws) and the masks (the
right half, or a centred square, white = repaint) are drawn here with PIL, deterministically,
at ``--image-size`` (default: the target's default model's size, from ListModels), so edits
come out at the size text-to-image requests do.

``--priority batch`` sends PRIORITY_BATCH requests; ``--deadlines 4:0.2,10:0.5,...`` gives each
request a gRPC deadline by its steps (the SLO workloads: objectives as deadlines), recorded as
``deadline_s``.

``--zipf K:S`` (either shape) repeats requests as users of one prompt box do: request ``i``
draws item ``j`` of K with probability proportional to 1 / (j + 1)^S (seeded with ``--seed``
and ``i``) and asks for prompt ``j`` mod 5 with seed ``j``, so the same item is the same
generation; its record holds the item, whether the server answered from its result cache
(``cached``) or shared a generation in flight (``coalesced``), and the image's sha256.

``--loras A,B,...`` (either shape) attaches LoRA adapters: request ``i`` draws one of the named
adapters or none, all equally likely (8 names: 1 in 9 without), at scale 1.0, from a RNG seeded
with ``--seed`` and ``i`` (so the draw is the request's own, whatever order the calls go in).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import random
import sys
import time
from dataclasses import dataclass
from typing import Any

import grpc
from PIL import Image, ImageDraw

from stepserve.client import build_request
from stepserve.v1 import image_generation_pb2 as pb
from stepserve.v1 import image_generation_pb2_grpc as pb_grpc

MIX_STEPS = (4, 10, 20, 30, 50)
MIX_SAMPLERS = ("euler", "euler_ancestral", "ddim", "dpm_solver_multistep")
PROMPTS = (
    "a small red circle on the left",
    "a large blue square at the top",
    "a green triangle in the middle",
    "a small yellow circle at the bottom",
    "a large red triangle on the right",
)
# --edit: the tasks, equally likely, and the strength each is sent with (text-to-image: none).
EDIT_KINDS = ("text", "img2img", "inpaint")
EDIT_STRENGTH = {"img2img": 0.5, "inpaint": 1.0}
# Init images: (color, shape, centre x, centre y, half side), fractions of the image's side.
INIT_SHAPES = (
    ((220, 40, 40), "circle", 0.28, 0.5, 0.22),
    ((40, 70, 220), "square", 0.5, 0.28, 0.13),
    ((40, 170, 60), "triangle", 0.5, 0.5, 0.22),
    ((235, 200, 30), "circle", 0.5, 0.72, 0.13),
)
BACKGROUND = (235, 235, 235)
# Masks (white = repaint), each with a prompt for what to paint there.
MASKS = (
    ("right half", "a small yellow triangle on the right"),
    ("centre square", "a large blue circle in the middle"),
)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@dataclass(frozen=True)
class EditInputs:
    """The init images and masks of ``--edit`` requests, PNG-encoded once per run."""

    inits: tuple[bytes, ...]
    masks: tuple[bytes, ...]

    @classmethod
    def draw(cls, width: int, height: int) -> EditInputs:
        inits = []
        for color, shape, cx, cy, half in INIT_SHAPES:
            img = Image.new("RGB", (width, height), BACKGROUND)
            d = ImageDraw.Draw(img)
            x, y, r = cx * width, cy * height, half * min(width, height)
            if shape == "circle":
                d.ellipse((x - r, y - r, x + r, y + r), fill=color)
            elif shape == "square":
                d.rectangle((x - r, y - r, x + r, y + r), fill=color)
            else:
                d.polygon(((x, y - r), (x + r, y + r), (x - r, y + r)), fill=color)
            inits.append(_png(img))
        masks = []
        for name, _ in MASKS:
            img = Image.new("L", (width, height), 0)
            d = ImageDraw.Draw(img)
            if name == "right half":
                d.rectangle((width // 2, 0, width, height), fill=255)
            else:
                d.rectangle((width // 4, height // 4, width - width // 4, height - height // 4), fill=255)
            masks.append(_png(img))
        return cls(tuple(inits), tuple(masks))

    def apply(self, req: pb.GenerateRequest, kind: str, i: int) -> None:
        """Make ``req`` (request number ``i``) a ``kind`` request: its init image, strength and,
        for inpainting, mask and a prompt for what to paint under it."""
        if kind == "text":
            return
        req.init_image = self.inits[i % len(self.inits)]
        req.strength = EDIT_STRENGTH[kind]
        if kind == "inpaint":
            m = (i // len(self.inits)) % len(self.masks)
            req.mask_image = self.masks[m]
            req.prompt = MASKS[m][1]


@dataclass(frozen=True)
class Calls:
    """How every request is sent: its priority class and, by steps, its deadline (seconds)."""

    priority: str = "interactive"
    deadlines: dict[int, float] | None = None
    # A quality preset ("draft"...): it picks the steps (and the model's feature caching).
    preset: str = ""

    def deadline(self, steps: int) -> float | None:
        return None if self.deadlines is None else self.deadlines[steps]


@dataclass(frozen=True)
class LoraDraw:
    """``--loras``: each request's adapter (or None), drawn from ``names`` and none alike."""

    names: tuple[str, ...]
    seed: int

    def of(self, i: int) -> str | None:
        choices = (None, *self.names)
        return choices[random.Random(f"lora-{self.seed}-{i}").randrange(len(choices))]


@dataclass(frozen=True)
class ZipfDraw:
    """--zipf: which of ``items`` repeated generations request ``i`` asks for."""

    items: int
    s: float
    seed: int

    def of(self, i: int) -> int:
        weights = [1.0 / (j + 1) ** self.s for j in range(self.items)]
        return random.Random(f"zipf-{self.seed}-{i}").choices(range(self.items), weights)[0]


def _zipf(text: str) -> tuple[int, float]:
    k, _, s = text.partition(":")
    return int(k), float(s or 1.0)


async def one(
    stub: pb_grpc.ImageGenerationServiceStub,
    i: int,
    steps: int,
    sampler: str,
    preview: bool,
    t0: float,
    kind: str = "text",
    edit: EditInputs | None = None,
    loras: LoraDraw | None = None,
    calls: Calls = Calls(),
    zipf: ZipfDraw | None = None,
) -> dict[str, Any]:
    lora = loras.of(i) if loras is not None else None
    deadline = calls.deadline(steps)
    item = zipf.of(i) if zipf is not None else i
    req = build_request(
        PROMPTS[item % len(PROMPTS)],
        steps=0 if calls.preset else steps,
        preset=calls.preset or 0,
        seed=item,
        sampler=sampler,
        preview_every=1 if preview else 0,
        loras=[(lora, 1.0)] if lora else (),
        priority=calls.priority,
    )
    if edit is not None:
        edit.apply(req, kind, i)
    rec: dict[str, Any] = {
        "i": i,
        "kind": kind,
        "steps": steps,
        "sampler": sampler,
        "lora": lora,
        "priority": calls.priority,
        "deadline_s": deadline,
        "start": time.perf_counter() - t0,
    }
    if zipf is not None:
        rec["item"] = item
    try:
        async for ev in stub.Generate(req, timeout=deadline or 900):
            now = time.perf_counter() - t0
            kind = ev.WhichOneof("event")
            if kind == "progress":
                rec.setdefault("first_progress", now)
                if ev.progress.HasField("preview"):
                    rec.setdefault("first_preview", now)
            elif kind == "result":
                rec["end"] = now
                rec["queue_s"] = ev.result.usage.queue_ms / 1000
                rec["accelerator_s"] = ev.result.usage.accelerator_seconds
                rec["mean_batch"] = ev.result.usage.mean_batch_size
                rec["steps_run"] = ev.result.usage.steps  # int(steps * strength) for edits
                rec["image_encode_s"] = ev.result.usage.image_encode_seconds
                if zipf is not None:
                    rec["cached"] = ev.result.usage.cached
                    rec["coalesced"] = ev.result.usage.coalesced
                    rec["sha256"] = hashlib.sha256(ev.result.images[0].data).hexdigest()
                rec["ok"] = True
    except grpc.aio.AioRpcError as e:
        rec["error"] = e.code().name
        rec["error_details"] = e.details()
        rec["end"] = time.perf_counter() - t0
    return rec


async def closed_loop(
    target: str,
    streams: int,
    duration: float,
    steps: int,
    preview: bool,
    mix_seed: int | None = None,
    edit: EditInputs | None = None,
    edit_seed: int = 0,
    loras: LoraDraw | None = None,
    calls: Calls = Calls(),
    zipf: ZipfDraw | None = None,
) -> list[dict[str, Any]]:
    """``mix_seed`` set: each request's steps and sampler are drawn from the mix (seeded);
    ``edit`` set: its task too; ``loras`` set: its adapter; ``zipf`` set: its prompt and seed
    (see the module's docstring)."""
    records: list[dict[str, Any]] = []
    rng = random.Random(mix_seed)
    kinds = random.Random(f"edit-{edit_seed}")
    t0 = time.perf_counter()
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.ImageGenerationServiceStub(ch)
        counter = iter(range(10**9))

        async def caller() -> None:  # at least one request each, then until the duration is up
            while True:
                if mix_seed is None:
                    s, sampler = steps, "euler"
                else:
                    s, sampler = rng.choice(MIX_STEPS), rng.choice(MIX_SAMPLERS)
                kind = kinds.choice(EDIT_KINDS) if edit is not None else "text"
                records.append(
                    await one(stub, next(counter), s, sampler, preview, t0, kind, edit, loras, calls, zipf)
                )
                if time.perf_counter() - t0 >= duration:
                    break

        await asyncio.gather(*(caller() for _ in range(streams)))
    return records


async def open_loop(
    target: str,
    rate: float,
    duration: float,
    seed: int,
    preview: bool,
    steps: int | None,
    edit: EditInputs | None = None,
    loras: LoraDraw | None = None,
    calls: Calls = Calls(),
    zipf: ZipfDraw | None = None,
) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    kinds = random.Random(f"edit-{seed}")  # its own: the same arrivals with and without --edit
    t0 = time.perf_counter()
    tasks = []
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.ImageGenerationServiceStub(ch)
        t, i = 0.0, 0
        while True:
            t += rng.expovariate(rate)
            if t > duration:
                break
            delay = t - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            s = steps or rng.choice(MIX_STEPS)
            sampler = rng.choice(MIX_SAMPLERS)
            kind = kinds.choice(EDIT_KINDS) if edit is not None else "text"
            tasks.append(
                asyncio.create_task(one(stub, i, s, sampler, preview, t0, kind, edit, loras, calls, zipf))
            )
            i += 1
        return list(await asyncio.gather(*tasks))


def default_size(target: str) -> tuple[int, int]:
    """The default image size of the target's default model (ListModels lists it first)."""
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.ImageGenerationServiceStub(ch)
        model = stub.ListModels(pb.ListModelsRequest(), timeout=60).models[0]
    return model.default_width_px, model.default_height_px


def _size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h or w)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--target", required=True)
    ap.add_argument("--streams", type=int, default=0)
    ap.add_argument("--rate", type=float, default=0.0)
    ap.add_argument("--duration", type=float, required=True)
    ap.add_argument("--steps", type=int, default=0, help="closed loop: steps of every request (default 20)")
    ap.add_argument("--preview", action="store_true", help="ask for a preview every step")
    ap.add_argument("--mix", action="store_true", help="closed loop: draw steps and samplers from the mix")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--edit", action="store_true", help="a third each text-to-image, img2img (0.5), inpainting"
    )
    ap.add_argument(
        "--image-size", type=_size, help="--edit: init images' WxH or N (default: the target's default)"
    )
    ap.add_argument(
        "--loras",
        type=lambda t: tuple(n for n in t.split(",") if n),
        default=(),
        help="comma-separated adapter names: each request draws one of them or none (seeded)",
    )
    ap.add_argument(
        "--zipf", type=_zipf, help="K:S: repeat K generations, item j drawn with weight 1/(j+1)^S (seeded)"
    )
    ap.add_argument("--priority", choices=("interactive", "batch"), default="interactive")
    ap.add_argument("--preset", choices=("draft", "standard", "high"), help="ask for a preset, not steps")
    ap.add_argument(
        "--deadlines",
        type=lambda t: {int(k): float(v) for k, v in (p.split(":") for p in t.split(","))},
        help="STEPS:SECONDS,...: each request's gRPC deadline by its steps",
    )
    args = ap.parse_args()
    calls = Calls(args.priority, args.deadlines, args.preset or "")
    loras = LoraDraw(args.loras, args.seed) if args.loras else None
    zipf = ZipfDraw(*args.zipf, args.seed) if args.zipf else None
    edit = EditInputs.draw(*(args.image_size or default_size(args.target))) if args.edit else None
    if args.streams:
        records = asyncio.run(
            closed_loop(
                args.target,
                args.streams,
                args.duration,
                args.steps or 20,
                args.preview,
                args.seed if args.mix else None,
                edit,
                args.seed,
                loras,
                calls,
                zipf,
            )
        )
    else:
        records = asyncio.run(
            open_loop(
                args.target,
                args.rate,
                args.duration,
                args.seed,
                args.preview,
                args.steps,
                edit,
                loras,
                calls,
                zipf,
            )
        )
    json.dump(records, sys.stdout)


if __name__ == "__main__":
    main()
