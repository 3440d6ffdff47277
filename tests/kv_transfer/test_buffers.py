"""The buffer ucxx gets for a slice of the cache: a numpy view on the CPU, the tensor itself
(its `__cuda_array_interface__`) on CUDA, chosen by device; the same memory either way.

The interfaces are checked as ucxx's `Array` reads them, without importing ucxx here: loading
ucxx's UCX in the pytest process before NIXL's aborts the process when a NIXL agent starts
later (the ucxx round trips in test_roundtrip.py move real bytes through both paths)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kv_transfer.buffers import buffer_kind, ucx_buffer
from tests.support.device import device_under_test


def test_kind_follows_the_device() -> None:
    assert buffer_kind(torch.device("cpu")) == "host"
    assert buffer_kind(torch.device("cuda", 3)) == "cuda"  # a device needs no GPU to be named
    with pytest.raises(ValueError, match="^device: UCX cannot move memory on meta"):
        buffer_kind(torch.device("meta"))
    with pytest.raises(ValueError, match="^region: must be contiguous"):
        ucx_buffer(torch.zeros(4, 4, dtype=torch.uint8).t())


def test_buffer_shares_the_cache_memory_on_the_device_under_test() -> None:
    """The interface ucxx reads gives the slice's address and length, host or CUDA by device."""
    device = device_under_test()
    cache = torch.zeros(8, 64, dtype=torch.uint8, device=device)  # [units, block_bytes]
    region = cache[2:5].view(-1)  # [3 * 64]
    buffer = ucx_buffer(region)
    cuda = device.type == "cuda"
    interface = getattr(buffer, "__cuda_array_interface__" if cuda else "__array_interface__")
    assert interface["data"][0] == region.data_ptr() and interface["shape"] == (3 * 64,)
    assert interface["typestr"] == "|u1"
    assert hasattr(buffer, "__cuda_array_interface__") == cuda
    if not cuda:
        assert isinstance(buffer, np.ndarray)
        buffer[:] = 7  # writes through to the cache
        assert int(cache[2:5].sum()) == 7 * 3 * 64 and int(cache.sum()) == 7 * 3 * 64
    else:
        assert buffer is region
