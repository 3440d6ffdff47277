"""How a decoder layer writes its K/V to the paged cache and attends: decided once per forward.

Everything here that depends only on the batch (which path runs, the cache rows this step
writes, the rows a decode batch gathers, the prompt lengths) is computed once per forward
pass and reused by every layer. With the C++ CPU kernels, a layer's RoPE and K/V store are one
kernel (`rope_store`, then `attend(..., stored=True)`); without them `attend` stores. Paths,
on the torch backend (CPU):

- all sequences decoding (`max_query_len == 1`): the C++ kernel `paged_decode_cpu` straight
  over the paged cache (`engine/kernels/cpu_ops.py`) when it is built and not turned off;
  else `paged_decode_torch` over a `DecodePlan`, or, from the second step of a steady decode
  batch on, the model's `DecodeMirror`;
- all sequences fresh prompts (`q_len == seq_len`): attention over the step's own K/V, as the
  cache holds them (rounded to the cache dtype), with no gather: the C++ kernel
  `prefill_attention_cpu` when built (and the head size is one it takes), else
  `prefill_attention` (causal SDPA tiles);
- anything else (prompts over a cached prefix, chunks of long prompts, mixed batches): the
  C++ kernel `paged_prefill_attention_cpu` over the paged cache when built (the head size one
  it takes, q in the cache's dtype), else `paged_attention`.

On the Triton backend (CUDA) every step is `store_kv` + `paged_attention`.

The queries may be float32 over a bfloat16 cache (`engine.cpu_features.compute_dtype`): K/V
are rounded to the cache dtype when stored and read back upcast.
"""

from __future__ import annotations

import torch

from engine.forward_batch import ForwardBatch
from engine.kernels import cpu_ops, paged_attention, select_backend, store_kv
from engine.kernels.attention import (
    DecodePlan,
    paged_decode_torch,
    plan_decode,
    prefill_attention,
)
from engine.kernels.cache_rows import block_stride_rows
from engine.kernels.decode_mirror import DecodeMirror, MirrorStep
from engine.kernels.kv_write import key_rows, store_kv_rows
from engine.kv_cache import kv_layer


class AttentionStep:
    """Per-forward attention state; `attend` runs one layer's store + attention."""

    def __init__(self, batch: ForwardBatch, kv_cache: torch.Tensor, num_layers: int,
                 compute_dtype: torch.dtype, mirror: DecodeMirror | None = None,
                 cpu_kernels: bool = True) -> None:
        """kv_cache: the whole model's cache (`engine.kv_cache`); mirror: the model's;
        cpu_kernels: whether this pass may use the C++ CPU kernels (`engine.kernels.cpu_ops`):
        `paged_decode_cpu` for decode steps, `prefill_attention_cpu` for fresh prompts,
        `paged_prefill_attention_cpu` for other batches, and `rms_norm_cpu` (the layers read
        `self.cpu_kernels`)."""
        self.batch = batch
        self.triton = select_backend(kv_cache) == "triton"
        self.k_rows: torch.Tensor | None = None  # [T] rows of K in a layer (torch path)
        self.decode: DecodePlan | None = None
        self.mirror = mirror
        self.mirror_step: MirrorStep | None = None
        self.prompt_lens: list[int] | None = None  # all fresh prompts: their lengths
        layer0 = kv_layer(kv_cache, 0)  # [N, 2, bs, Hkv, D]: every layer has its strides
        stride = block_stride_rows(layer0)
        decoding = batch.max_query_len == 1 and batch.num_tokens > 0
        self.cpu_kernels = (cpu_kernels and not self.triton and not kv_cache.is_cuda
                            and cpu_ops.available())
        # the C++ kernel reads the paged cache itself: no mirror, no gather
        self.native_decode = decoding and self.cpu_kernels
        # the C++ prefill kernels, for a head size they take
        self.native_prefill = self.cpu_kernels and cpu_ops.prefill_supported(layer0.shape[-1])
        if mirror is not None and not (decoding and stride is not None and not self.triton
                                       and not self.native_decode):
            mirror.forget()
        if self.triton or stride is None or batch.num_tokens == 0:
            return
        if not self.cpu_kernels:  # else `rope_store` writes the cache
            self.k_rows = key_rows(batch.slot_mapping, layer0.shape[2], stride)
        if decoding:
            if self.native_decode:
                return
            if mirror is not None:
                self.mirror_step = mirror.begin(
                    batch.request_ids, batch.seq_lens.tolist(), layer0, batch.block_tables,
                    num_layers, compute_dtype)
            if self.mirror_step is None:
                self.decode = plan_decode(layer0, batch.block_tables, batch.seq_lens,
                                          batch.max_seq_len)
        elif int(batch.seq_lens.sum()) == batch.num_tokens:  # every q_len == seq_len
            self.prompt_lens = batch.seq_lens.tolist()

    def rope_store(self, qkv: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor,
                   kv_layer: torch.Tensor, num_heads: int, num_kv_heads: int) -> None:
        """With `cpu_kernels`: rotates the q and k heads of qkv `[T, (Hq + 2 Hkv) D]` in place
        (cos, signed_sin `[T, D]`, `engine.model.rope`) and stores this step's K/V in
        `kv_layer`, in one C++ pass; then `attend(..., stored=True)`."""
        cpu_ops.rope_store_cpu(qkv, cos, signed_sin, kv_layer, self.batch.slot_mapping,
                               num_heads, num_kv_heads)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_layer: torch.Tensor, layer: int, scale: float,
               stored: bool = False) -> torch.Tensor:
        """Stores k, v `[T, Hkv, D]` in `kv_layer` (layer number `layer`) unless `stored`
        (`rope_store` did), returns q's `[T, Hq, D]` attention output."""
        b = self.batch
        k_cache, v_cache = k.to(kv_layer.dtype), v.to(kv_layer.dtype)  # [T, Hkv, D]
        if not stored:
            if self.k_rows is None:
                store_kv(k_cache, v_cache, kv_layer, b.slot_mapping)
            else:
                store_kv_rows(k_cache, v_cache, kv_layer, self.k_rows)
        if self.native_decode:
            return cpu_ops.paged_decode_cpu(q, kv_layer, b.block_tables, b.seq_lens, scale)
        if self.mirror_step is not None and self.mirror is not None:
            return self.mirror.attend(self.mirror_step, layer, q, k_cache.to(q.dtype),
                                      v_cache.to(q.dtype), kv_layer, scale)
        if self.decode is not None:
            return paged_decode_torch(q, kv_layer, self.decode, scale)
        if self.prompt_lens is not None:
            k, v = k_cache.to(q.dtype), v_cache.to(q.dtype)  # K/V at the cache's precision
            if self.native_prefill:
                return cpu_ops.prefill_attention_cpu(q, k, v, b.query_start_loc, scale)
            return prefill_attention(q, k, v, self.prompt_lens, scale)
        if self.native_prefill and q.dtype == kv_layer.dtype:
            return cpu_ops.paged_prefill_attention_cpu(q, kv_layer, b.block_tables,
                                                       b.query_start_loc, b.seq_lens, scale)
        q_in = q.to(kv_layer.dtype) if self.triton else q  # Triton wants one dtype
        out = paged_attention(q_in, kv_layer, b.block_tables, b.query_start_loc, b.seq_lens,
                              scale, b.max_query_len, b.max_seq_len)  # [T, Hq, D]
        return out.to(q.dtype)
