"""The C++ RoPE + KV store (`cpu_ops.rope_store_cpu`) against the torch path it replaces:
`engine.model.rope.apply_rope` on the q and k heads, then `store_kv_torch` of the rotated K and
the V. Same bits in bfloat16 and float16 (it rounds as apply_rope does), within an ulp in
float32 (the compiler may fuse a product into its sum). Caches are shuffled (slots out of
order), hold NaN in every slot the step does not write, and include a layer-group view whose
blocks are strided."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import cpu_ops
from engine.kernels.kv_write import store_kv_torch
from engine.kv_cache import kv_layer
from engine.model.rope import apply_rope, cos_sin_cache
from engine.model_config import ModelConfig


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    """The kernels must build on a machine with a C++ compiler: a failure here is a failure."""
    assert cpu_ops.available(), "the C++ CPU kernels did not build (see the log)"


def _angles(head_dim: int, positions: torch.Tensor,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, signed sin `[T, D]` in `dtype`, as `LlamaModel.forward` takes them."""
    config = ModelConfig(family="llama", vocab_size=64, hidden_size=head_dim * 2,
                         intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                         head_dim=head_dim, rms_norm_eps=1e-6, rope_theta=10_000.0,
                         max_position_embeddings=4096)
    cos, sin = cos_sin_cache(config, 4096)  # [P, D]
    return cos[positions].to(dtype), sin[positions].to(dtype)


def _case(tokens: int, hq: int, hkv: int, d: int, num_blocks: int, block_size: int,
          compute: torch.dtype, cache: torch.dtype, seed: int = 0,
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [T, (hq + 2 hkv) d], cos, sin [T, d], a NaN cache layer, shuffled slots [T]."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, generator=gen).to(compute)
    positions = torch.randint(0, 4096, (tokens,), generator=gen)
    cos, sin = _angles(d, positions, compute)
    layer = torch.full((num_blocks, 2, block_size, hkv, d), float("nan"), dtype=cache)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]  # int64
    return qkv, cos, sin, layer, slots


def _torch_path(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: torch.Tensor,
                slots: torch.Tensor, hq: int, hkv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the model computes without the kernels: (qkv with q, k rotated, the cache)."""
    tokens, d = qkv.shape[0], layer.shape[-1]
    qk = apply_rope(qkv[:, :(hq + hkv) * d].view(tokens, hq + hkv, d),
                    cos.unsqueeze(1), sin.unsqueeze(1))  # [T, hq + hkv, d]
    out = qkv.clone()
    out[:, :(hq + hkv) * d] = qk.reshape(tokens, -1)
    k = qk[:, hq:].to(layer.dtype)  # [T, hkv, d]
    v = qkv[:, (hq + hkv) * d:].view(tokens, hkv, d).to(layer.dtype)  # [T, hkv, d]
    cache = layer.clone()
    store_kv_torch(k.contiguous(), v.contiguous(), cache, slots)
    return out, cache


def _check(got_qkv: torch.Tensor, got_cache: torch.Tensor, want_qkv: torch.Tensor,
           want_cache: torch.Tensor) -> None:
    rtol, atol = (2e-7, 5e-7) if got_qkv.dtype == torch.float32 else (0.0, 0.0)  # an ulp / exact
    torch.testing.assert_close(got_qkv, want_qkv, rtol=rtol, atol=atol)
    written = ~want_cache.isnan()
    assert torch.equal(got_cache.isnan(), ~written), "a slot the step does not own was written"
    if got_cache.dtype != got_qkv.dtype:  # float32 K rounded to the cache: an ulp apart at most
        rtol, atol = 2 ** -8, 1e-30
    torch.testing.assert_close(got_cache[written], want_cache[written], rtol=rtol, atol=atol)


# (tokens, Hq, Hkv, D, blocks, block size, compute dtype, cache dtype)
CASES = {
    "smollm2-shape-bf16": (37, 9, 3, 64, 8, 16, torch.bfloat16, torch.bfloat16),
    "toy-shape-fp32": (50, 8, 4, 32, 6, 16, torch.float32, torch.float32),
    "llama-8b-heads-fp16": (9, 32, 8, 128, 4, 16, torch.float16, torch.float16),
    "fp32-over-bf16-cache": (21, 4, 2, 48, 8, 4, torch.float32, torch.bfloat16),
    "fp32-over-fp16-cache": (21, 4, 2, 16, 8, 4, torch.float32, torch.float16),
    "mqa-one-token": (1, 8, 1, 128, 2, 16, torch.bfloat16, torch.bfloat16),
}


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
def test_matches_apply_rope_then_store_kv(case: tuple) -> None:
    tokens, hq, hkv, d, blocks, bs, compute, cache = case
    qkv, cos, sin, layer, slots = _case(tokens, hq, hkv, d, blocks, bs, compute, cache)
    want_qkv, want_cache = _torch_path(qkv, cos, sin, layer, slots, hq, hkv)
    cpu_ops.rope_store_cpu(qkv, cos, sin, layer, slots, hq, hkv)
    _check(qkv, layer, want_qkv, want_cache)


def test_v_heads_are_not_rotated() -> None:
    qkv, cos, sin, layer, slots = _case(5, 4, 2, 32, 4, 4, torch.float32, torch.float32)
    v_before = qkv[:, 6 * 32:].clone()
    cpu_ops.rope_store_cpu(qkv, cos, sin, layer, slots, 4, 2)
    assert torch.equal(qkv[:, 6 * 32:], v_before)


def test_strided_qkv_rows_and_a_layer_group_cache() -> None:
    """qkv as a view with padded rows, the cache layer a view whose blocks are 3 layers apart
    (`engine.kv_cache`'s layer groups): the other layers' blocks stay NaN."""
    hq, hkv, d, blocks, bs = 8, 2, 64, 6, 16
    qkv, cos, sin, layer, slots = _case(40, hq, hkv, d, blocks, bs, torch.bfloat16,
                                        torch.bfloat16, seed=3)
    want_qkv, want_cache = _torch_path(qkv, cos, sin, layer, slots, hq, hkv)
    padded = torch.zeros(40, qkv.shape[1] + 24, dtype=qkv.dtype)
    strided = padded[:, :qkv.shape[1]]
    strided.copy_(qkv)
    group = torch.full((1, blocks, 3, 2, bs, hkv, d), float("nan"), dtype=torch.bfloat16)
    view = kv_layer(group, 1)  # [N, 2, bs, Hkv, D], strided blocks
    assert not view.is_contiguous()
    cpu_ops.rope_store_cpu(strided, cos, sin, view, slots, hq, hkv)
    _check(strided, view, want_qkv, want_cache)
    assert torch.equal(padded[:, qkv.shape[1]:], torch.zeros(40, 24, dtype=qkv.dtype))
    others = torch.ones(3, dtype=torch.bool)
    others[1] = False
    assert group[:, :, others].isnan().all(), "another layer's blocks were written"


BAD = {
    "slot out of range": ({"slot": 10_000}, "slot_mapping\\[2\\] = 10000 is outside"),
    "negative slot": ({"slot": -1}, "slot_mapping\\[2\\] = -1 is outside"),
    "wrong qkv width": ({"hq": 6}, "qkv must be \\[T, \\(Hq \\+ 2 Hkv\\) D\\]"),
    "heads not a multiple": ({"hq": 5}, "num_heads 5 is not a positive multiple"),
    "kv heads": ({"hkv": 1}, "num_kv_heads 1 but kv_layer has 2"),
    "cos dtype": ({"cos_dtype": torch.bfloat16}, "cos/sin dtype"),
    "bf16 over fp32 cache": ({"cache": torch.float32, "compute": torch.bfloat16},
                             "not supported"),
    "int32 slots": ({"slots_dtype": torch.int32}, "slot_mapping must be contiguous 1-D int64"),
}


@pytest.mark.parametrize("bad,match", BAD.values(), ids=list(BAD))
def test_bad_arguments_are_named_and_nothing_is_written(bad: dict, match: str) -> None:
    compute, cache = bad.get("compute", torch.float32), bad.get("cache", torch.float32)
    qkv, cos, sin, layer, slots = _case(4, 4, 2, 16, 4, 4, compute, cache)
    if "slot" in bad:
        slots[2] = bad["slot"]
    if "cos_dtype" in bad:
        cos = cos.to(bad["cos_dtype"])
    slots = slots.to(bad.get("slots_dtype", torch.int64))
    before = qkv.clone()
    with pytest.raises(RuntimeError, match=match):
        cpu_ops.rope_store_cpu(qkv, cos, sin, layer, slots, bad.get("hq", 4), bad.get("hkv", 2))
    assert torch.equal(qkv, before) and layer.isnan().all()
