"""Linear layers over weights prepacked for oneDNN (the CPU path), or plain ones elsewhere,
with the elementwise work that follows a projection fused into it where the backend can.

`F.linear` on CPU hands a plain [N, K] weight to MKL (float32) or oneDNN (bfloat16) on every
call, and oneDNN reorders it into its blocked layout each time. Reordering once at load
(`torch.ops.mkldnn._reorder_linear_weight`, what inductor's CPU backend does for frozen
weights) and calling `_linear_pointwise` skips that. Measured at the SmolLM2-135M shape, one
thread, summed over a decode step's matmuls (30 layers and the LM head): bf16 batch 1 96 ->
49 ms, fp32 batch 1 55 -> 43 ms, fp32 batch 32 609 -> 381 ms (a loaded machine: compare the
ratios). The packed weight is an opaque mkldnn tensor: it can only be multiplied, so packing
is the last step of loading. The results equal `F.linear`'s up to summation order.

Epilogues (issue 14): oneDNN applies a post-op to the matmul's float32 accumulator before it
rounds and writes the output, so `linear_add` (the residual add after o_proj and down_proj),
`linear_silu` (the gate projection) and `linear_mul` (the up projection times SiLU(gate)) cost
no pass of their own over the activations. On plain weights (CUDA, or CPUs without oneDNN)
`linear_add` is `addmm` with the residual as its C (cuBLAS adds it in the epilogue too); the
others are the matmul then the elementwise op. In bf16 a fused result is rounded once where
the unfused one rounds the matmul and then the sum/product: within one bf16 step of it.
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


def linear_add(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """x [T, K] @ weight [N, K]^T + residual [T, N] -> a new [T, N] (residual is not written)."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, None,
                                                         "add")  # [T, N]
    return torch.addmm(residual, x, weight.t())  # [T, N]


def linear_silu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """SiLU(x [T, K] @ weight [N, K]^T) -> [T, N]."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "swish", [], "")  # [T, N]
    return F.silu(F.linear(x, weight))  # [T, N]


def linear_mul(x: torch.Tensor, weight: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """(x [T, K] @ weight [N, K]^T) * other [T, N] -> a new [T, N]."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, weight, None,
                                                         "mul")  # [T, N]
    return F.linear(x, weight).mul_(other)  # [T, N]
