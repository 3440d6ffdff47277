"""RMSNorm against Hugging Face's LlamaRMSNorm arithmetic, bit for bit."""

from __future__ import annotations

import pytest
import torch

from engine.model.norm import rms_norm


def hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm.forward."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@pytest.mark.parametrize("rows", [1, 7, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_hugging_face(dtype: torch.dtype, rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, 576, generator=g) * 3).to(dtype)  # [T, H]
    weight = torch.randn(576, generator=g).to(dtype)  # [H]
    got = rms_norm(x, weight, 1e-5)
    assert got.dtype == dtype
    assert torch.equal(got, hf_rms_norm(x, weight, 1e-5))


def test_rms_norm_reads_a_row_slice_and_a_large_eps() -> None:
    """A view of every other row (a strided input) and an eps that dominates tiny rows."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(10, 64, generator=g) * 1e-3).to(torch.bfloat16)[::2]  # [5, 64]
    weight = torch.ones(64, dtype=torch.bfloat16)  # [H]
    assert torch.equal(rms_norm(x, weight, 0.5), hf_rms_norm(x, weight, 0.5))
