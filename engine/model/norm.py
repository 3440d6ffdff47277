"""RMSNorm as Hugging Face computes it: normalized in float32, rounded to x's dtype, scaled.

`F.rms_norm` on CPU is a composite of ~9 ops (pow, sum, div, add, rsqrt, muls, casts), but on
a bfloat16 input it does its arithmetic in float32 and rounds once: exactly HF's
`(x.float() * rsqrt(mean(x^2) + eps)).to(bf16)`. So a bf16 x needs no float32 copy of its own
and no cast back (4 calls and ~12 ops before, 2 calls now), and the weight multiplies the
rounded result in bf16, as HF does. float32 x: `F.rms_norm` with the weight, HF's result bit
for bit.

With `native` (the C++ CPU kernels are built: `engine.kernels.cpu_ops`) the same rounding
runs in one pass per row (`rms_norm_cpu`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.kernels import cpu_ops


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             native: bool = False) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps), the mean and scaling in float32. x: [T, H].
    native: use `cpu_ops.rms_norm_cpu` (CPU tensors, the kernels built, weight in x's dtype)."""
    if native and weight.dtype == x.dtype:
        return cpu_ops.rms_norm_cpu(x, weight, eps)  # [T, H]
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)  # [T, H]
    return weight * F.rms_norm(x, weight.shape, None, eps)  # [T, H], normed rounded first
