"""Which implementation of a kernel runs: Triton on CUDA tensors, pure torch otherwise.

`TANDEM_ATTENTION_BACKEND=torch|triton` forces one for every kernel in this package (read on each
call, so a test or a benchmark can flip it). Forcing `triton` on CPU tensors only works when
`TRITON_INTERPRET=1` was set before the kernel modules were imported: Triton decides at
decoration time whether a kernel is compiled or interpreted.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

BACKEND_ENV = "TANDEM_ATTENTION_BACKEND"

Backend = Literal["torch", "triton"]


def select_backend(tensor: torch.Tensor) -> Backend:
    """The backend for a kernel whose inputs live where `tensor` does."""
    forced = os.environ.get(BACKEND_ENV, "")
    if forced == "torch":
        return "torch"
    if forced == "triton":
        return "triton"
    if forced:
        raise ValueError(f"{BACKEND_ENV}={forced!r}: expected 'torch' or 'triton'")
    return "triton" if tensor.is_cuda else "torch"


def is_interpreted(kernel: object) -> bool:
    """Whether a `@triton.jit` kernel was defined under TRITON_INTERPRET=1."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_triton_device(kernel: object, tensor: torch.Tensor) -> None:
    """Raises if a Triton `kernel` cannot run on `tensor`'s device (CPU needs the interpreter)."""
    if not tensor.is_cuda and not is_interpreted(kernel):
        raise RuntimeError(
            f"Triton kernels need CUDA tensors, got {tensor.device}; on CPU set TRITON_INTERPRET=1"
            " before engine.kernels is imported"
        )
