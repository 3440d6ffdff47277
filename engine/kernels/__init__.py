"""The engine's attention kernels, one file per operation.

- `kv_write.py` — `store_kv`: writes this step's K/V into their slots of the paged cache.
- `attention.py` — `paged_attention`: varlen causal attention (decode, prefill, prefill over a
  cached prefix) over the paged cache.
- `backend.py` — which implementation runs.

(The files are not named after the functions so that `engine.kernels.attention` stays a
module: `mock.patch("engine.kernels.paged_attention.x")` would otherwise find the function.)

Each file holds the Triton kernel, its checked wrapper (`*_triton`), a pure-torch version
(`*_torch`, the CPU engine's path) and the dispatcher, which picks Triton for CUDA tensors and
torch otherwise; `TANDEM_ATTENTION_BACKEND=torch|triton` forces one (`backend.py`).
"""

from engine.kernels.attention import (
    paged_attention,
    paged_attention_torch,
    paged_attention_triton,
    release_workspace,
)
from engine.kernels.backend import BACKEND_ENV, select_backend
from engine.kernels.kv_write import store_kv, store_kv_torch, store_kv_triton

__all__ = [
    "BACKEND_ENV",
    "paged_attention",
    "paged_attention_torch",
    "paged_attention_triton",
    "release_workspace",
    "select_backend",
    "store_kv",
    "store_kv_torch",
    "store_kv_triton",
]
