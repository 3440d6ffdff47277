"""`paged_decode_cpu`: the CPU engine's decode attention, a C++ kernel built at first use.

One query token per sequence attends straight over the paged KV cache
(`paged_decode_cpu.cpp`): no gather into a dense copy, the query heads of a KV head computed
together, each K/V row upcast once, float32 softmax and sums, sequences spread over torch's
intra-op threads. At the SmolLM2-135M shape (9 query / 3 KV heads of 64) it takes a fraction of
what torch's SDPA does on the same batch (the SDPA flash path tiles every (sequence, head)
for a single query row); `engine/bench/README.md` has the figures.

The kernel is compiled with the machine's own instruction set (`-march=native`) by
`torch.utils.cpp_extension` the first time `available()` is asked (~20 s, once per machine:
the build is kept under `TORCH_EXTENSIONS_DIR`, `~/.cache/torch_extensions` by default, and
rebuilt only when the source or flags change). Without a C++ compiler, or if the build fails,
`available()` logs why once and returns False, and the engine attends with torch's SDPA and
the decode mirror as before (`engine/kernels/decode_mirror.py`). `EngineConfig.cpu_decode_kernel`
(`--cpu-decode-kernel false`) turns the kernel off.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_decode_cpu.cpp")
EXTENSION = "tandem_paged_decode_cpu"
CFLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp")

_lock = threading.Lock()
_state: dict[str, bool] = {}  # "built": whether the op is loaded; absent until first asked


def available() -> bool:
    """Whether `paged_decode_cpu` can run: builds and loads the kernel on the first call
    (thread-safe; later calls are a dict lookup)."""
    built = _state.get("built")
    if built is not None:
        return built
    with _lock:
        if "built" not in _state:
            _state["built"] = _build()
        return _state["built"]


def _build() -> bool:
    try:
        from torch.utils.cpp_extension import load

        load(name=EXTENSION, sources=[str(SOURCE)], extra_cflags=list(CFLAGS),
             is_python_module=False, verbose=False)
        torch.ops.tandem_cpu.paged_decode  # noqa: B018 (raises if the op did not register)
    except Exception as error:  # no compiler, no headers, a failed build: the torch path
        log.warning("the C++ CPU decode attention kernel is not available (%s: %s); decode "
                    "attends with torch SDPA", type(error).__name__, str(error)[-500:])
        return False
    log.info("C++ CPU decode attention kernel ready")
    return True


def paged_decode_cpu(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Decode attention of q `[S, Hq, D]` (one token per sequence) over the first
    `seq_lens[s]` positions of sequence s in one layer's cache `[N, 2, block_size, Hkv, D]`
    (blocks `block_tables[s]`, int32 `[S, max_blocks]`; `seq_lens` int32 `[S]`); returns
    `[S, Hq, D]` in q's dtype. q may be float32 over a bfloat16/float16 cache. Call
    `available()` first."""
    out: torch.Tensor = torch.ops.tandem_cpu.paged_decode(q, kv_layer, block_tables, seq_lens,
                                                          scale)
    return out
