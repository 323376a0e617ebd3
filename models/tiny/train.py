"""Train the embedded ``tiny-shapes`` model from scratch on this CPU (``make train-tiny``).

Stages (all seeded; the same command gives the same weights on the same torch build):
1. render the procedural data set (``data.py``) and build the tokenizer (``tokenizer.py``);
2. train the VAE (L1 + MSE reconstruction, KL weight 1e-3: with v1's 1e-4 the UNet mixed
   colors, see the model card), then measure the latent scaling factor;
3. encode every image to latents with the frozen VAE, and train the tiny preview decoder
   (diffusers' ``AutoencoderTiny``) on them;
4. train the UNet and the text encoder jointly with v-prediction on the DDPM linear schedule,
   dropping 10% of captions (empty prompt) so classifier-free guidance works, keeping an EMA
   of the UNet and text-encoder weights;
5. save a diffusers ``StableDiffusionPipeline`` directory (float32 safetensors, so a plain
   ``from_pretrained`` runs on CPU without a dtype argument), then generate
   the 48-prompt evaluation set and 200 random prompts with the reference pipeline, judge
   them, write the sample grid and the figures into ``metrics.json``.

Run from the repo root: ``python models/tiny/train.py --out server/assets/tiny-shapes``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import arch  # noqa: E402
import data  # noqa: E402
import tokenizer as tok_mod  # noqa: E402

logger = logging.getLogger("train-tiny")

PREVIEW_DECODER_DIR = "preview_decoder"
SERVING_DEFAULTS = {
    "default_steps": 20,
    "default_guidance_scale": 7.5,
    "default_sampler": "euler",
    "max_size": 64,
    "max_images_per_request": 16,
}


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def train_vae(images: np.ndarray, steps: int, batch: int, seed: int, kl_weight: float):
    vae = arch.make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, 1e-3, 50)
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        x = to_tensor(images[idx.numpy()])
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info("vae step %d/%d loss %.4f (%.0fs)", step, steps, loss.item(), time.time() - t0)
    vae.eval().requires_grad_(False)
    return vae


@torch.no_grad()
def encode_all(vae, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch):
        out.append(vae.encode(to_tensor(images[i : i + batch])).latent_dist.mean)
    return torch.cat(out)


@torch.no_grad()
def fit_latent_rgb(vae, seed: int, n: int = 2000) -> list[list[float]]:
    """Linear latent -> RGB map for stepserve's previews, fitted on the training distribution
    (rows: one per latent channel, then the bias). A fit on generic color patches, which
    stepserve does for models without one, reads this VAE's latents poorly."""
    images, _, _ = data.make_dataset(n, seed)
    x = to_tensor(images)
    lat = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    target = F.interpolate((x + 1) / 2, size=lat.shape[-2:], mode="area")
    flat = lat.permute(0, 2, 3, 1).reshape(-1, lat.shape[1])
    xs = torch.cat([flat, torch.ones(len(flat), 1)], 1)
    sol = torch.linalg.lstsq(xs, target.permute(0, 2, 3, 1).reshape(-1, 3)).solution
    return [[round(v, 5) for v in row] for row in sol.tolist()]


@torch.no_grad()
def judge_reconstructions(vae, seed: int, n: int = 500) -> dict[str, float]:
    """The judge's scores on VAE round trips: the ceiling for anything the UNet makes."""
    import judge

    images, _, samples = data.make_dataset(n, seed)
    rec = vae.decode(vae.encode(to_tensor(images)).latent_dist.mean).sample
    rec = ((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return judge.score(list(rec), samples)


def noised_batch(latents, ids, empty_ids, alphas_cumprod, num_timesteps, batch, gen):
    """One training batch of the recipe: latents, their captions' token ids (10% dropped to
    the empty caption, for guidance), timesteps, the noised latents and the v-prediction
    target. The LoRA trainer draws its batches the same way."""
    idx = torch.randint(0, len(latents), (batch,), generator=gen)
    x0 = latents[idx]
    tok = ids[idx].clone()
    tok[torch.rand(batch, generator=gen) < 0.1] = empty_ids
    t = torch.randint(0, num_timesteps, (batch,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    a = alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    return tok, t, a * x0 + s * noise, a * noise - s * x0


def train_unet(latents, ids, empty_ids, vocab, steps, batch, seed, lr):
    unet = arch.make_unet()
    text = arch.make_text_encoder(*vocab)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text).requires_grad_(False)
    sampler = arch.make_sampler()
    alphas_cumprod = sampler.alphas_cumprod.float()
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, 100)
        tok, t, xt, target = noised_batch(
            latents, ids, empty_ids, alphas_cumprod, sampler.config.num_train_timesteps, batch, gen
        )
        cond = text(tok)[0]
        pred = unet(xt, t, cond).sample
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.998, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_text, text)):
                for pe, pl in zip(ema.parameters(), live.parameters(), strict=True):
                    pe.lerp_(pl, 1 - decay)
        if step % 100 == 0 or step == steps - 1:
            logger.info("unet step %d/%d loss %.4f (%.0fs)", step, steps, loss.item(), time.time() - t0)
    return ema_unet.eval(), ema_text.eval()


def train_preview_decoder(images: np.ndarray, latents: torch.Tensor, steps: int, batch: int, seed: int):
    """A tiny TAESD (diffusers' ``AutoencoderTiny``) for this model's previews, by TAESD's
    recipe: the decoder learns images from the VAE's (scaled) latents, the encoder the VAE's
    latents from images. Previews decode the clean-image estimates of unfinished steps,
    which are washed out (pulled toward the mean latent), blurred and noisy compared with
    the data's latents; the decoder sees latents degraded that way too (half of them) and
    learns to show the image they are heading for."""
    tiny = arch.make_preview_decoder()
    opt = torch.optim.AdamW(tiny.parameters(), lr=2e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    mean = latents.mean(0, keepdim=True)
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, 2e-3, 50)
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        x, z = to_tensor(images[idx.numpy()]), latents[idx]
        degraded = (torch.rand(batch, 1, 1, 1, generator=gen) < 0.5).float()
        keep = 1 - degraded * 0.7 * torch.rand(batch, 1, 1, 1, generator=gen)
        blur = degraded * torch.rand(batch, 1, 1, 1, generator=gen)
        sigma = 0.2 * torch.rand(batch, 1, 1, 1, generator=gen)
        zin = mean + keep * (z - mean)
        zin = (1 - blur) * zin + blur * F.avg_pool2d(zin, 3, stride=1, padding=1, count_include_pad=False)
        rec = tiny.decode(zin + sigma * torch.randn(z.shape, generator=gen)).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + F.mse_loss(tiny.encode(x).latents, z)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            logger.info(
                "preview decoder step %d/%d loss %.4f (%.0fs)", step, steps, loss.item(), time.time() - t0
            )
    return tiny.eval().requires_grad_(False)


def generate(
    pipe, prompts: list[tuple[str, data.Sample]], seeds: list[int], steps: int = 20
) -> list[np.ndarray]:
    """Images of ``prompts`` from diffusers' own pipeline (default guidance and sampler)."""
    images: list[np.ndarray] = []
    for i in range(0, len(prompts), 64):
        out = pipe(
            [p for p, _ in prompts[i : i + 64]],
            num_inference_steps=steps,
            generator=[torch.Generator().manual_seed(s) for s in seeds[i : i + 64]],
            output_type="np",
        ).images
        images += [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in out]
    return images


def evaluate(pipe_dir: Path) -> tuple[dict[str, dict[str, float]], list[np.ndarray]]:
    """Generate the 48 evaluation prompts (seeds 0-47) and 200 random ones (seeds from 1000)
    with diffusers' own pipeline and judge them; also returns the 48 images."""
    import judge
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    scores = {}
    for name, (prompts, seeds) in data.eval_sets().items():
        images = generate(pipe, prompts, seeds)
        scores[name] = judge.score(images, [s for _, s in prompts])
        if name == "eval_48":
            samples = images
    return scores, samples


def grid(images: list[np.ndarray], cols: int, scale: int = 2):
    from PIL import Image

    h, w, _ = images[0].shape
    rows = math.ceil(len(images) / cols)
    canvas = Image.new("RGB", (cols * w * scale, rows * h * scale), (255, 255, 255))
    for i, im in enumerate(images):
        tile = Image.fromarray(im).resize((w * scale, h * scale), Image.Resampling.NEAREST)
        canvas.paste(tile, ((i % cols) * w * scale, (i // cols) * h * scale))
    return canvas


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="pipeline directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=40_000, help="training set size")
    p.add_argument("--vae-steps", type=int, default=600)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-kl", type=float, default=1e-3, help="weight of the VAE's KL term")
    p.add_argument("--unet-steps", type=int, default=2600)
    p.add_argument("--unet-batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--preview-steps", type=int, default=1000, help="preview decoder (AutoencoderTiny) steps")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--eval-only", action="store_true", help="only re-judge the pipeline at --out")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.eval_only:
        scores, samples = evaluate(args.out)
        grid(samples, cols=8, scale=4).save(args.out / "samples.png")
        metrics_path = args.out / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
        metrics["judge_20_steps"] = scores
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.out / "vae").eval()
        metrics["judge_vae_reconstructions"] = judge_reconstructions(vae, args.seed + 3)
        logger.info("vae reconstructions judged: %s", metrics["judge_vae_reconstructions"])
        metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
        logger.info("judge: %s", scores)
        return 0
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    started = time.time()
    timings: dict[str, float] = {}

    t = time.time()
    images, captions, _ = data.make_dataset(args.images, args.seed)
    tok = tok_mod.build_tokenizer(data.vocabulary_corpus(), arch.MAX_TOKENS)
    enc = tok(
        captions, padding="max_length", max_length=arch.MAX_TOKENS, truncation=True, return_tensors="pt"
    )
    ids = enc.input_ids
    empty_ids = tok([""], padding="max_length", max_length=arch.MAX_TOKENS, return_tensors="pt").input_ids[0]
    timings["data_s"] = time.time() - t
    logger.info("data: %d images, %d distinct captions, vocab %d", len(images), len(set(captions)), len(tok))

    t = time.time()
    vae = train_vae(images, args.vae_steps, args.vae_batch, args.seed + 1, args.vae_kl)
    raw = encode_all(vae, images)
    # The UNet is built for arch.LATENT_SIZE; a VAE with another downsampling factor would
    # train it on latents of the wrong size (and the pipeline would sample tiled images).
    assert raw.shape[-1] == arch.LATENT_SIZE, (raw.shape, arch.LATENT_SIZE)
    scaling = float(1.0 / raw.std())
    vae.register_to_config(scaling_factor=scaling)
    latents = raw * scaling
    timings["vae_s"] = time.time() - t
    vae_scores = judge_reconstructions(vae, args.seed + 3)
    logger.info("vae reconstructions judged: %s", vae_scores)
    logger.info("vae done, scaling_factor %.4f", scaling)

    t = time.time()
    preview_decoder = train_preview_decoder(images, latents, args.preview_steps, 32, args.seed + 6)
    timings["preview_decoder_s"] = time.time() - t

    t = time.time()
    vocab = (len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    unet, text = train_unet(
        latents, ids, empty_ids, vocab, args.unet_steps, args.unet_batch, args.seed + 2, args.lr
    )
    timings["unet_s"] = time.time() - t

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
        unet=unet,
        scheduler=arch.make_sampler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(args.out, safe_serialization=True)
    tok_mod.save_tokenizer(tok, args.out / "tokenizer")
    # Not a pipeline component (model_index.json does not name it; diffusers ignores it):
    # stepserve.json points stepserve's previews at it.
    preview_decoder.save_pretrained(args.out / PREVIEW_DECODER_DIR, safe_serialization=True)
    # stepserve's per-model defaults (the serving code reads them; diffusers ignores the file).
    serving = dict(
        SERVING_DEFAULTS,
        preview_decoder=PREVIEW_DECODER_DIR,
        latent_rgb_factors=fit_latent_rgb(vae, args.seed + 4),
    )
    (args.out / "stepserve.json").write_text(json.dumps(serving, indent=2) + "\n")
    timings["train_total_s"] = time.time() - started

    t = time.time()
    scores, samples = evaluate(args.out)
    timings["eval_s"] = time.time() - t
    grid(samples, cols=8, scale=4).save(args.out / "samples.png")
    metrics = {
        "judge_20_steps": scores,
        "judge_vae_reconstructions": vae_scores,
        "timings": timings,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    logger.info("judge: %s", scores)
    logger.info("timings: %s", timings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
