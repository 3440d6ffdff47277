"""C++ kernels for the CPU engine, built at first use: decode and prefill attention, RoPE with
the KV cache write, RMSNorm, greedy argmax.

- `paged_decode_cpu` (`paged_decode_cpu.cpp`): one query token per sequence attends straight
  over the paged KV cache: no gather into a dense copy, the query heads of a KV head computed
  together, each K/V row upcast once, float32 softmax and sums, sequences spread over torch's
  intra-op threads. torch's SDPA flash path tiles every (sequence, head) for a single query row
  and needs the K/V gathered first.
- `prefill_attention_cpu` and `paged_prefill_attention_cpu` (`prefill_attention_cpu.cpp`):
  causal attention of fresh prompts over their own K/V, and of any batch (prompts over a cached
  prefix, chunks, decodes mixed in) over the paged cache, in flash order: query tiles of a KV
  head's query heads, keys in blocks of 16 up to the diagonal only, online float32 softmax,
  16 rows to a vector register so no reduction crosses lanes, bf16 products by VDPBF16PS on
  AVX512-BF16. 1.7x (fp32) and 2.5x (bf16) torch's CPU flash SDPA at SmolLM2-135M's prefill
  shape, which computes and masks whole tiles below 512 keys.
- `rope_store_cpu` (`rope_store_cpu.cpp`): a layer's RoPE on q and k, in place in the fused
  qkv output, and its K/V written to their cache slots, in one pass over the tokens; torch's
  path is seven ops (three for the rotation, two casts, two index copies).
- `rms_norm_cpu` (`rms_norm_cpu.cpp`): RMSNorm in one pass per row with HF's rounding; torch's
  is ~9 passes whose float32 temporaries of a long prompt fall out of cache.
- `argmax_cpu` (`argmax_cpu.cpp`): greedy sampling's argmax over the vocabulary, vectorized
  (torch's over bf16 logits is a scalar loop: milliseconds a step at a 152k vocab).

`engine/bench/README.md` has the figures. The kernels are compiled with the machine's own
instruction set (`-march=native`) by `torch.utils.cpp_extension` the first time `available()`
is asked (~20 s, once per machine: the build is kept under `TORCH_EXTENSIONS_DIR`,
`~/.cache/torch_extensions` by default, named by a hash of the sources and flags, so every
checkout with the same kernels shares it and a change builds anew); a worker asks in its
warm-up (`engine.warmup`). Without a C++ compiler and ninja, or if the build
fails, `available()` logs why once and returns False, and the engine runs torch's ops as
before (SDPA over the decode mirror, `engine/kernels/decode_mirror.py`; causal SDPA tiles,
`engine.kernels.attention.prefill_attention`; `F.rms_norm`).
`EngineConfig.cpu_kernels` (`--no-cpu-kernels` on a worker) turns them off.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(name)
                for name in ("paged_decode_cpu.cpp", "prefill_attention_cpu.cpp",
                             "rms_norm_cpu.cpp", "argmax_cpu.cpp",
                             "rope_store_cpu.cpp"))
HEADERS = (Path(__file__).with_name("cpu_widen.h"),)  # included by the sources
CFLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp")

_lock = threading.Lock()
_state: dict[str, bool] = {}  # "built": whether the ops are loaded; absent until first asked


def available() -> bool:
    """Whether the kernels can run: builds and loads them on the first call (thread-safe; later
    calls are a dict lookup)."""
    built = _state.get("built")
    if built is not None:
        return built
    with _lock:
        if "built" not in _state:
            _state["built"] = _build()
        return _state["built"]


def extension_name() -> str:
    """`tandem_cpu_ops_<hash of the sources and flags>`: the build's name and folder."""
    digest = hashlib.sha256(" ".join(CFLAGS).encode())
    for source in (*SOURCES, *HEADERS):
        digest.update(source.name.encode() + source.read_bytes())
    return f"tandem_cpu_ops_{digest.hexdigest()[:12]}"


def _build() -> bool:
    try:
        from torch.utils.cpp_extension import get_default_build_root, load

        # built from copies at a path that depends only on their content: ninja rebuilds when a
        # source's path changes, and two checkouts would otherwise take turns rebuilding
        name = extension_name()
        copies = Path(get_default_build_root()) / f"{name}_src"
        copies.mkdir(parents=True, exist_ok=True)
        for source in (*SOURCES, *HEADERS):
            target = copies / source.name
            if not target.exists():
                shutil.copyfile(source, target.with_suffix(".tmp"))
                target.with_suffix(".tmp").replace(target)  # atomic: no half-written source
        load(name=name, sources=[str(copies / source.name) for source in SOURCES],
             extra_cflags=list(CFLAGS), is_python_module=False, verbose=False)
        torch.ops.tandem_cpu.paged_decode  # noqa: B018 (raises if the ops did not register)
        torch.ops.tandem_cpu.rms_norm  # noqa: B018
        torch.ops.tandem_cpu.prefill_attention  # noqa: B018
        torch.ops.tandem_cpu.paged_prefill_attention  # noqa: B018
        torch.ops.tandem_cpu.argmax  # noqa: B018
        torch.ops.tandem_cpu.rope_store  # noqa: B018
    except Exception as error:  # no compiler, no ninja, a failed build: torch's ops
        log.warning("the C++ CPU kernels are not available (%s: %s); the engine runs torch's "
                    "ops", type(error).__name__, str(error)[-500:])
        return False
    log.info("C++ CPU kernels ready (decode and prefill attention, RoPE and KV store, "
             "RMSNorm, argmax)")
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


def prefill_supported(head_dim: int) -> bool:
    """Whether `prefill_attention_cpu` takes this head size (a multiple of 16 up to 128)."""
    return 0 < head_dim <= 128 and head_dim % 16 == 0


def prefill_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          cu_seqlens: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of fresh prompts: q `[T, Hq, D]`, k and v `[T, Hkv, D]` (one dtype: float32,
    bfloat16 or float16; D contiguous, `prefill_supported(D)`), sequence s owning rows
    `cu_seqlens[s]:cu_seqlens[s + 1]` (int32 `[S + 1]`, from 0 to T); returns `[T, Hq, D]`
    in q's dtype, softmax and sums in float32. Call `available()` first."""
    out: torch.Tensor = torch.ops.tandem_cpu.prefill_attention(q, k, v, cu_seqlens, scale)
    return out


def paged_prefill_attention_cpu(q: torch.Tensor, kv_layer: torch.Tensor,
                                block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                                seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of q `[T, Hq, D]` over one layer's paged cache `[N, 2, block_size, Hkv,
    D]` (q's dtype; `prefill_supported(D)`): sequence s has `seq_lens[s]` tokens in blocks
    `block_tables[s]` (int32 `[S, max_blocks]`), its queries are the last ones, rows
    `query_start_loc[s]:query_start_loc[s + 1]` (int32 `[S + 1]`); the step's own K/V must
    be stored already. Returns `[T, Hq, D]`. Call `available()` first."""
    out: torch.Tensor = torch.ops.tandem_cpu.paged_prefill_attention(
        q, kv_layer, block_tables, query_start_loc, seq_lens, scale)
    return out


def rope_store_cpu(qkv: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor,
                   kv_layer: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int,
                   num_kv_heads: int) -> None:
    """Rotates the q and k heads of qkv `[T, (Hq + 2 Hkv) D]` (the fused projection's output,
    D contiguous) in place by `engine.model.rope.apply_rope`'s rule, with cos and signed_sin
    `[T, D]` in qkv's dtype, and writes each token's rotated K and its V to slot
    `slot_mapping[t]` (int64 `[T]`) of one layer's cache `[N, 2, block_size, Hkv, D]`: qkv's
    dtype, or float32 over a bfloat16/float16 cache. Call `available()` first."""
    torch.ops.tandem_cpu.rope_store(qkv, cos, signed_sin, kv_layer, slot_mapping, num_heads,
                                    num_kv_heads)


def rms_norm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`engine.model.norm.rms_norm` of x `[T, H]` with a weight `[H]` of x's dtype, in one pass
    per row; `[T, H]`. Call `available()` first."""
    out: torch.Tensor = torch.ops.tandem_cpu.rms_norm(x, weight, eps)
    return out


def argmax_cpu(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(dim=-1)` of logits `[R, V]` (float32, bfloat16 or float16, V contiguous):
    int64 `[R]`, the first index of each row's maximum. Call `available()` first."""
    out: torch.Tensor = torch.ops.tandem_cpu.argmax(logits)
    return out
