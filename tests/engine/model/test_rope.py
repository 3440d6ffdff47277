"""RoPE (`apply_rope`) against Hugging Face's `x * cos + rotate_half(x) * sin`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.model.rope import apply_rope, cos_sin_cache
from engine.model_config import ModelConfig


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_matches_rotate_half(tiny_llama: Path, dtype: torch.dtype) -> None:
    """float32: within an ulp of HF's bits; bf16: within one rounding step of HF's, and no
    further than HF's own bf16 result from the float32 rotation."""
    config = ModelConfig.from_dir(tiny_llama)
    cos, signed_sin = cos_sin_cache(config, 64)  # [P, D]
    positions = torch.tensor([0, 5, 63])
    x = torch.randn(3, 4, config.head_dim, generator=torch.Generator().manual_seed(0))
    half = config.head_dim // 2
    plain_sin = torch.cat((-signed_sin[:, :half], signed_sin[:, half:]), dim=-1)  # [P, D]

    def hf(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return x * c + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * s

    c, s = cos[positions].unsqueeze(1), plain_sin[positions].unsqueeze(1)  # [T, 1, D]
    exact = hf(x.to(dtype).float(), c.to(dtype).float(), s.to(dtype).float())  # [T, 4, D]
    got = apply_rope(x.to(dtype), c.to(dtype), signed_sin[positions].unsqueeze(1).to(dtype))
    expected = hf(x.to(dtype), c.to(dtype), s.to(dtype))
    assert got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=2e-7, atol=5e-7)
    else:
        torch.testing.assert_close(got.float(), expected.float(), rtol=2 ** -7, atol=2 ** -7)
        assert (got.float() - exact).abs().max() <= (expected.float() - exact).abs().max()


def test_rope_leaves_its_input_alone_and_rotates_a_strided_view(tiny_llama: Path) -> None:
    """q and k arrive as a view into the fused qkv output (rows strided past v)."""
    config = ModelConfig.from_dir(tiny_llama)
    cos, signed_sin = cos_sin_cache(config, 16)  # [P, D]
    d = config.head_dim
    qkv = torch.randn(5, 4 * d, generator=torch.Generator().manual_seed(1))  # [T, 4 D]
    before = qkv.clone()
    view = qkv[:, :3 * d].view(5, 3, d)  # [T, 3, D], row stride 4 D
    c, s = cos[:5].unsqueeze(1), signed_sin[:5].unsqueeze(1)  # [T, 1, D]
    got = apply_rope(view, c, s)
    assert torch.equal(qkv, before)
    assert torch.equal(got, apply_rope(view.contiguous(), c, s))
    assert torch.equal(got[0], view[0])  # position 0: no rotation
