"""What the host CPU can do natively, and the dtype the model computes in because of it.

On a CPU without bf16/fp16 matrix instructions (AVX2-only x86, e.g. AMD EPYC before Zen 4),
torch runs a bfloat16 matmul by converting tiles to float32 on the fly: measured on a 2-core
EPYC (AVX2), `F.linear` at 32 x 256 -> 1,376 takes 1.5 ms in bf16 against 0.2 ms in fp32, and
the gap grows with the batch. There the model keeps its weights' bf16 values but stores them
as float32 and computes in float32; the KV cache keeps the configured dtype (it is part of the
transfer compatibility hash). CPUs with AVX512-BF16 or AMX (and CUDA devices) compute in the
configured dtype. (`torch.backends.cpu.get_cpu_capability()` says only "AVX2" / "AVX512": it
does not tell whether AVX512-BF16 is there, so the flags decide.) Where /proc/cpuinfo cannot be
read the answer is "not native": float32 compute is always correct, only maybe slower.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")

# /proc/cpuinfo flags that give fast native matmuls in each reduced-precision dtype
NATIVE_MATMUL_FLAGS: dict[torch.dtype, frozenset[str]] = {
    torch.bfloat16: frozenset({"avx512_bf16", "amx_bf16", "bf16"}),  # "bf16": Arm (BFMMLA)
    torch.float16: frozenset({"avx512_fp16", "amx_fp16"}),
}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where that file is missing)."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):  # x86, Arm
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def has_native_matmul(dtype: torch.dtype, flags: frozenset[str] | None = None) -> bool:
    """Whether this CPU multiplies `dtype` matrices natively (float32 always does)."""
    if dtype == torch.float32:
        return True
    flags = cpu_flags() if flags is None else flags
    return bool(flags & NATIVE_MATMUL_FLAGS.get(dtype, frozenset()))


def compute_dtype(dtype: torch.dtype, device: torch.device,
                  flags: frozenset[str] | None = None) -> torch.dtype:
    """The dtype the model's matmuls run in when configured for `dtype` on `device`."""
    if device.type != "cpu" or has_native_matmul(dtype, flags):
        return dtype
    return torch.float32
