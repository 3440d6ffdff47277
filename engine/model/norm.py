"""RMSNorm as Hugging Face computes it: normalized in float32, rounded to x's dtype, scaled.

`F.rms_norm` is no single kernel on CPU: it is a composite of ~9 ops (pow, sum, div, add,
rsqrt, two muls and casts), and a bfloat16 input went through it as a float32 copy, with two
more casts and the weight's multiply around it: 12 dispatches and 7 passes over the
activations, twice per layer. Here a bfloat16 x takes 3 passes: one reduction that reads x
in bf16 and accumulates in float32 (`vector_norm`), then x * rsqrt(mean(x^2) + eps) computed
in float32 (a bf16 x times a float32 scale promotes), rounded to bf16, times the weight in
bf16, as HF does. float32 x keeps `F.rms_norm`, HF's float32 result bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps), the mean and scaling in float32. x: [T, H]."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)  # [T, H]
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)  # [T, 1]
    scale = norm.square_().div_(x.shape[-1]).add_(eps).rsqrt_()  # [T, 1] float32
    return weight * torch.mul(x, scale).to(x.dtype)  # [T, H]
