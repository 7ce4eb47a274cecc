"""A CPU kernel choice for the large model's non-autoregressive passes (a few tokens at once).

With PyTorch 2.13 on this project's x86 CPU (AVX-512, 2 threads), an fp32 ``nn.Linear`` over 1-3 rows runs at the
speed of reading its weights, but over 4 or more rows it switches to a GEMM path that costs 1.6-2.3x as much (a
large-model pass over 4 tokens took 1.9x a one-token step, over 11 tokens 2.5x). Computing the same product as
``W @ x^T`` keeps 4-64 rows at about 1.4x the one-row cost (measured: `benchmarks/drafting-ab.log`, docs/eval.md).
BiLD's verification passes are exactly such short blocks, so the engine switches the large model's linear layers to
:class:`SmallBatchLinear` on a CPU. One-row decode steps (what vanilla decoding does) and long prompts keep
PyTorch's own path; the weights are the same tensors and the outputs equal up to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MIN_ROWS, MAX_ROWS = 4, 64  # the row counts whose product goes through W @ x^T


class SmallBatchLinear(torch.nn.Linear):
    """``nn.Linear`` whose forward over MIN_ROWS..MAX_ROWS rows computes ``(W @ x^T)^T`` (same weights, same result)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if not MIN_ROWS <= rows <= MAX_ROWS or x.dtype != torch.float32:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, x.shape[-1]).T.contiguous()  # (in, rows)
        out = torch.mm(self.weight, flat).T.reshape(*x.shape[:-1], self.out_features)  # (..., out)
        return out if self.bias is None else out + self.bias


def use_small_batch_linear(model: torch.nn.Module) -> int:
    """Switch every plain fp32 ``nn.Linear`` of a CPU model to :class:`SmallBatchLinear` in place; returns how many.

    The modules keep their parameters (only their class changes), so a model that shares weights keeps sharing them.
    """
    switched = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.device.type == "cpu" and module.weight.dtype == torch.float32:
            module.__class__ = SmallBatchLinear
            switched += 1
    return switched
