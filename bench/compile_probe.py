"""What torch.compile would give the embedded model's UNet on this machine: compile times,
forward times against eager at a few batch sizes, and whether a row's output still does not
depend on the batch (the engine's batch-invariance promise).

    python bench/compile_probe.py [--rows 2,8,16] [--reps 10] [--warm-cache]

Not part of `make bench`: on two CPU cores compiling takes minutes (the figures quoted in
docs/architecture.md come from this script).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from stepserve.server.engine.models import default_model_path, load_model


def forward_s(f: Callable[..., Any], args: tuple[torch.Tensor, ...], reps: int) -> float:
    x, t, ctx = args
    f(x, t, encoder_hidden_states=ctx, return_dict=False)
    t0 = time.perf_counter()
    for _ in range(reps):
        f(x, t, encoder_hidden_states=ctx, return_dict=False)
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="2,8,16", help="forward batch sizes (rows) to time")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warm-cache", action="store_true", help="reuse inductor's compile cache")
    args = ap.parse_args()
    if not args.warm_cache:  # compile times from scratch, as on a fresh machine or pod
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
    rows = [int(r) for r in args.rows.split(",")]
    adapter = load_model("tiny-shapes", default_model_path())  # row-wise linears on CPU
    unet = adapter.unet
    side = int(unet.config.sample_size)
    g = torch.Generator().manual_seed(0)
    n = max(rows)
    x = torch.randn(n, unet.config.in_channels, side, side, generator=g)
    t = torch.rand(n, generator=g) * 900
    ctx = torch.randn(n, adapter.info.max_prompt_tokens + 2, unet.config.cross_attention_dim, generator=g)
    compiled = torch.compile(unet, dynamic=True)
    with torch.inference_mode():
        outs = {}
        for r in rows:
            t0 = time.perf_counter()
            outs[r] = compiled(x[:r], t[:r], encoder_hidden_states=ctx[:r], return_dict=False)[0]
            print(f"compiled forward at {r} rows first call: {time.perf_counter() - t0:.1f}s", flush=True)
        eager = unet(x[: rows[0]], t[: rows[0]], encoder_hidden_states=ctx[: rows[0]], return_dict=False)[0]
        diff = (eager - outs[rows[0]]).abs().max().item()
        print(f"compiled vs eager at {rows[0]} rows: max abs difference {diff:.2e}")
        k = rows[0]
        for r in rows[1:]:
            same = torch.equal(outs[r][:k], outs[k])
            print(f"rows 0..{k - 1} at {r} rows bit-identical to at {k} rows: {same}")
        for r in rows:
            a = (x[:r], t[:r], ctx[:r])
            e, c = forward_s(unet, a, args.reps), forward_s(compiled, a, args.reps)
            print(f"{r} rows: eager {e * 1000:.1f} ms, compiled {c * 1000:.1f} ms, speed-up {e / c:.2f}x")


if __name__ == "__main__":
    main()
