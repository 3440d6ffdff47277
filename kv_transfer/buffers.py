"""How a transfer backend hands a slice of the registered cache to UCX, on the CPU or on a GPU.

ucxx takes any object with the buffer protocol (`__array_interface__`: numpy) or with
`__cuda_array_interface__` (a CUDA torch tensor has one): the latter makes UCX move device
memory (cuda_copy / cuda_ipc / GPUDirect RDMA transports). A CPU torch tensor has neither, so
it goes through `.numpy()`, a view sharing its memory; a CUDA tensor goes as itself (`.numpy()`
raises on it). The choice is by the tensor's device, nothing else.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

BufferKind = Literal["host", "cuda"]


def buffer_kind(device: torch.device) -> BufferKind:
    """Which interface UCX gets for memory on `device`."""
    if device.type == "cpu":
        return "host"
    if device.type == "cuda":
        return "cuda"
    raise ValueError(f"device: UCX cannot move memory on {device} (cpu or cuda only)")


def ucx_buffer(region: torch.Tensor) -> np.ndarray | torch.Tensor:
    """`region` (contiguous) as an object ucxx's `Array` accepts, sharing its memory."""
    if not region.is_contiguous():
        raise ValueError("region: must be contiguous")
    if buffer_kind(region.device) == "host":
        return region.numpy()  # a view: the buffer protocol over the same memory
    return region  # __cuda_array_interface__
