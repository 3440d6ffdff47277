"""The projections with fused epilogues (`linear_add`, `linear_silu`, `linear_mul`) against
the matmul followed by the unfused op, on prepacked and plain weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.model.linear import linear, linear_add, linear_mul, linear_silu, prepack

T, K, N = 13, 96, 80  # an odd row count: no kernel gets a tidy tile


def tensors(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, K, generator=g).to(dtype)  # [T, K]
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)  # [N, K]
    other = torch.randn(T, N, generator=g).to(dtype)  # [T, N]
    return x, w, other


def reference(op: str, x: torch.Tensor, w: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """The op in float32 on the same (possibly bf16-rounded) values."""
    y = F.linear(x.float(), w.float())  # [T, N]
    if op == "add":
        return y + other.float()
    if op == "silu":
        return F.silu(y)
    return y * other.float()


def fused(op: str, x: torch.Tensor, w: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    if op == "add":
        return linear_add(x, w, other)
    if op == "silu":
        return linear_silu(x, w)
    return linear_mul(x, w, other)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["add", "silu", "mul"])
def test_fused_epilogue_matches_the_unfused_op(op: str, dtype: torch.dtype,
                                               packed: bool) -> None:
    x, w, other = tensors(dtype)
    before = other.clone()
    got = fused(op, x, prepack(w) if packed else w, other)
    assert got.dtype == dtype and got.shape == (T, N)
    assert torch.equal(other, before)  # the residual / multiplier is read, not written
    want = reference(op, x, w, other)
    if dtype == torch.float32:  # summation order only
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:  # rounded to bf16 once (fused) or twice (plain): within ~2 bf16 steps
        torch.testing.assert_close(got.float(), want, rtol=2 ** -7, atol=2 ** -7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_and_plain_agree_on_the_whole_mlp(dtype: torch.dtype) -> None:
    """down(silu(gate(h)) * up(h)) + x, fused on packed halves vs the plain fused gate/up."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(T, K, generator=g).to(dtype)  # [T, K]
    gate_up = (torch.randn(2 * N, K, generator=g) / K ** 0.5).to(dtype)  # [2N, K]
    down = (torch.randn(K, N, generator=g) / N ** 0.5).to(dtype)  # [K, N]
    x = torch.randn(T, K, generator=g).to(dtype)  # [T, K]
    gate, up = gate_up.chunk(2)  # [N, K] each
    packed = linear_add(linear_mul(h, prepack(up), linear_silu(h, prepack(gate))),
                        prepack(down), x)  # [T, K]
    a, b = linear(h, gate_up).chunk(2, dim=-1)  # [T, N] each
    plain = x + linear(F.silu(a) * b, down)  # [T, K]
    tol = 1e-5 if dtype == torch.float32 else 2 ** -6
    torch.testing.assert_close(packed.float(), plain.float(), rtol=tol, atol=tol)
