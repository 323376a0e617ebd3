"""Train the embedded model's two LoRA adapters: ``outline`` (shapes drawn as outlines) and
``stripes`` (shapes filled with horizontal stripes), on the same captions as the base model
(the adapter is the style; the prompt still says color, shape, size and place).

    python models/tiny/train_loras.py [--out server/assets/tiny-shapes/loras] [--steps 400]

Each is a rank-4 PEFT LoRA of the UNet's attention projections, trained with the base
recipe's v-prediction loss on renders in its style (the base weights frozen), saved with
diffusers' ``save_lora_weights`` (PEFT keys, rank/alpha metadata): the files stepserve serves
with ``--lora`` and diffusers loads with ``load_lora_weights``. Deterministic for a seed
(CPU). ``make train-tiny-loras`` runs it; ``models/tiny/served.py --loras`` judges them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from models.tiny import data
from models.tiny.train import encode_all, lr_at, noised_batch

logger = logging.getLogger("train_loras")
ASSETS = Path(__file__).resolve().parents[2] / "server" / "assets" / "tiny-shapes"
ADAPTERS = ("outline", "stripes")
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "time_emb_proj"]


def train(
    style: str, steps: int, batch: int, rank: int, lr: float, images: int, seed: int, out: Path
) -> dict:
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline.from_pretrained(str(ASSETS))
    unet, text, vae, tok = pipe.unet, pipe.text_encoder, pipe.vae, pipe.tokenizer
    for m in (unet, text, vae):
        m.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGETS)
    unet.add_adapter(config)
    params = [p for p in unet.parameters() if p.requires_grad]
    pics, captions, _ = data.make_dataset(images, seed, style=style)
    with torch.no_grad():
        latents = encode_all(vae, pics) * vae.config.scaling_factor
        ids = tok(
            captions,
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        empty = tok(
            [""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt"
        ).input_ids[0]
    alphas = pipe.scheduler.alphas_cumprod.float()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed + 1)
    unet.train()
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, 50)
        tokens, t, xt, target = noised_batch(
            latents, ids.input_ids, empty, alphas, pipe.scheduler.config.num_train_timesteps, batch, gen
        )
        with torch.no_grad():
            cond = text(tokens)[0]
        loss = F.mse_loss(unet(xt, t, cond).sample, target)  # v-prediction, as the base recipe
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info("%s step %d/%d loss %.4f (%.0fs)", style, step, steps, loss.item(), time.time() - t0)
    unet.eval()
    layers = get_peft_model_state_dict(unet)  # PEFT's names throughout (see server/engine/lora.py)
    target = out / style
    target.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        str(target),
        unet_lora_layers=layers,
        unet_lora_adapter_metadata=config.to_dict(),
        safe_serialization=True,
    )
    return {
        "steps": steps,
        "batch": batch,
        "rank": rank,
        "lr": lr,
        "images": images,
        "seconds": time.time() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ASSETS / "loras")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", choices=ADAPTERS, action="append", help="train only this adapter (repeatable)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    record = {}
    for i, style in enumerate(args.only or ADAPTERS):
        record[style] = train(
            style, args.steps, args.batch, args.rank, args.lr, args.images, args.seed + 10 * i, args.out
        )
    (args.out / "recipe.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
