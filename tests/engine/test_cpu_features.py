"""Which dtype the model computes in, from the CPU's flags and the device."""

from __future__ import annotations

import torch

from engine.cpu_features import compute_dtype, cpu_flags, has_native_matmul

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
AVX2 = frozenset({"avx2", "fma"})


def test_bfloat16_computes_in_float32_on_an_avx2_cpu() -> None:
    assert compute_dtype(torch.bfloat16, CPU, AVX2) == torch.float32
    assert compute_dtype(torch.float16, CPU, AVX2) == torch.float32


def test_native_bf16_and_amx_keep_the_configured_dtype() -> None:
    for flag in ("avx512_bf16", "amx_bf16"):
        assert compute_dtype(torch.bfloat16, CPU, AVX2 | {flag}) == torch.bfloat16
    assert compute_dtype(torch.float16, CPU, AVX2 | {"avx512_fp16"}) == torch.float16


def test_float32_and_cuda_are_untouched() -> None:
    assert compute_dtype(torch.float32, CPU, AVX2) == torch.float32
    assert compute_dtype(torch.bfloat16, CUDA, AVX2) == torch.bfloat16
    assert has_native_matmul(torch.float32, frozenset())


def test_unknown_flags_mean_float32() -> None:
    assert compute_dtype(torch.bfloat16, CPU, frozenset()) == torch.float32
    assert isinstance(cpu_flags(), frozenset)
