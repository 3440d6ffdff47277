"""Linear layers over weights prepacked for oneDNN (the CPU path), or plain ones elsewhere.

`F.linear` on CPU hands a plain [N, K] weight to MKL (float32) or oneDNN (bfloat16) on every
call, and oneDNN reorders it into its blocked layout each time. Reordering once at load
(`torch.ops.mkldnn._reorder_linear_weight`, what inductor's CPU backend does for frozen
weights) and calling `_linear_pointwise` skips that. Measured at the SmolLM2-135M shape, one
thread, summed over a decode step's matmuls (30 layers and the LM head): bf16 batch 1 96 ->
49 ms, fp32 batch 1 55 -> 43 ms, fp32 batch 32 609 -> 381 ms (a loaded machine: compare the
ratios). The packed weight is an opaque mkldnn tensor: it can only be multiplied, so packing
is the last step of loading. The results equal `F.linear`'s up to summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def can_prepack(device: torch.device) -> bool:
    """Whether weights on `device` can be prepacked: CPU builds with oneDNN."""
    return device.type == "cpu" and torch.backends.mkldnn.is_available()


def prepack(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K], float32 or bfloat16 on CPU -> oneDNN's blocked layout (opaque)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)


def linear(x: torch.Tensor, weight: torch.Tensor,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] @ weight [N, K]^T + bias [N] -> [T, N]; weight plain or `prepack`ed."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")  # [T, N]
    return F.linear(x, weight, bias)  # [T, N]
