"""Make a denoiser's per-sample output independent of the batch it runs in (CPU float32).

Measured on x86 CPUs with PyTorch's oneDNN/MKL kernels (see ``tests/test_batch_invariance.py``):

- ``nn.Linear`` on a 2-D input picks its GEMM kernel by the number of rows M, and rows come
  out different in the last bits for small M (below 3 to 16 rows, depending on the shape).
  In a UNet these are the time-embedding MLP and every ResNet block's ``time_emb_proj``,
  which see one row per sample. 3-D inputs (attention, feed-forward: M = batch x tokens)
  were invariant at every batch size tried.
- ``nn.Conv2d`` picks another algorithm for batch 1 than for batch >= 2.

So, in batch-invariant mode, 2-D linear layers compute each row as its own 1-row product (a
batched ``baddbmm``; these layers are a tiny share of the FLOPs) and a forward of a single row
is padded to two. With both, a
sample's UNet output is bit-identical whatever else is in the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RowwiseLinear(nn.Linear):
    """``nn.Linear`` whose 2-D rows do not depend on each other (batch-invariant).

    A 2-D input of M rows runs as M independent 1-row products in one batched call
    (``baddbmm`` over an expanded, uncopied weight), which gives each row the bits of a 1-row
    ``F.linear`` whatever M is (checked in tests/test_batch_invariance.py), at a fraction of
    the cost of M separate calls.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() != 2:
            return F.linear(input, self.weight, self.bias)
        m, k = input.shape
        w = self.weight.t().unsqueeze(0).expand(m, k, self.out_features)
        x = input.unsqueeze(1)
        if self.bias is None:
            return torch.bmm(x, w).squeeze(1)
        return torch.baddbmm(self.bias.expand(m, 1, self.out_features), x, w).squeeze(1)


def make_rowwise_linears(model: nn.Module) -> int:
    """Turn every plain ``nn.Linear`` of ``model`` into a :class:`RowwiseLinear` in place.

    Only the class changes (same parameters, same state dict). Returns how many layers.
    """
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = RowwiseLinear
            n += 1
    return n
