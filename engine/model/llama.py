"""Llama-family decoder (Llama 2/3, Mistral-style, Qwen2) running over the paged KV cache.

One file for the whole model, gpt-fast style. q/k/v and gate/up projections are fused into
single matmuls; `load_weights` maps Hugging Face parameter names onto them. The residual adds
run inside the o and down projections' matmuls (`linear_add`); on prepacked (CPU) weights the
gate/up matmul is split again at `prepack` so that SiLU and the product with up run inside
the gate and up matmuls too (`linear_silu`, `linear_mul`): a layer's elementwise work is
then its two RMSNorms and RoPE, which with the C++ CPU kernels also writes the layer's K/V to
the cache (`AttentionStep.rope_store`; issue 14, engine/bench/README.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from engine.forward_batch import ForwardBatch
from engine.kernels.decode_mirror import DecodeMirror
from engine.kv_cache import kv_layer
from engine.model.attention_step import AttentionStep
from engine.model.linear import linear, linear_add, linear_mul, linear_silu, prepack
from engine.model.norm import rms_norm
from engine.model.rope import apply_rope, cos_sin_cache
from engine.model_config import ModelConfig

# The MLP of a large batch runs 2,048 rows at a time: its [T, 2 I] activation stays under
# glibc's 32 MiB mmap threshold (larger blocks are mmapped fresh on every call, and
# page-faulting them in halved the float32 matmul rate at T = 8,192 on our 2-core VM) and
# closer to the cache. Prefill 16 x 512 forward: 617 ms unchunked, 546 ms in 2,048-row chunks.
MLP_CHUNK_TOKENS = 2048

LayerCallback = Callable[[int], None]
"""Called with the layer index once that layer's K/V for the batch is in the cache."""


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, index: int) -> None:
        super().__init__()
        c = config
        self.config = c
        self.index = index
        qkv_rows = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
        self.qkv_weight = nn.Parameter(torch.empty(qkv_rows, c.hidden_size, dtype=dtype),
                                       requires_grad=False)
        self.qkv_bias = (nn.Parameter(torch.empty(qkv_rows, dtype=dtype), requires_grad=False)
                         if c.attention_bias else None)
        self.o_weight = nn.Parameter(
            torch.empty(c.hidden_size, c.num_heads * c.head_dim, dtype=dtype), requires_grad=False)
        self.gate_up_weight: nn.Parameter | None = nn.Parameter(
            torch.empty(2 * c.intermediate_size, c.hidden_size, dtype=dtype), requires_grad=False)
        # after `prepack`: gate_up_weight is None and these hold its two halves, packed
        self.gate_weight: torch.Tensor | None
        self.up_weight: torch.Tensor | None
        self.register_buffer("gate_weight", None, persistent=False)
        self.register_buffer("up_weight", None, persistent=False)
        self.down_weight = nn.Parameter(
            torch.empty(c.hidden_size, c.intermediate_size, dtype=dtype), requires_grad=False)
        self.input_norm = nn.Parameter(torch.ones(c.hidden_size, dtype=dtype), requires_grad=False)
        self.post_norm = nn.Parameter(torch.ones(c.hidden_size, dtype=dtype), requires_grad=False)
        self.scale = c.head_dim ** -0.5

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_layer: torch.Tensor, step: AttentionStep) -> torch.Tensor:
        c = self.config
        num_tokens = x.shape[0]
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        h = rms_norm(x, self.input_norm, c.rms_norm_eps, step.cpu_kernels)  # [T, H]
        qkv = linear(h, self.qkv_weight, self.qkv_bias)  # [T, (Hq + 2 Hkv) D]
        # q and k rotated in one go: they are adjacent in qkv
        qk = qkv[:, :q_size + kv_size].view(num_tokens, c.num_heads + c.num_kv_heads, c.head_dim)
        if step.cpu_kernels:  # rotated in place in qkv and K/V stored, in one C++ pass
            step.rope_store(qkv, cos[:, 0], sin[:, 0], kv_layer, c.num_heads, c.num_kv_heads)
        else:
            qk = apply_rope(qk, cos, sin)  # [T, Hq + Hkv, D]
        q, k = qk[:, :c.num_heads], qk[:, c.num_heads:]  # [T, Hq, D], [T, Hkv, D]
        v = qkv[:, q_size + kv_size:].view(num_tokens, c.num_kv_heads, c.head_dim)  # [T, Hkv, D]
        attn = step.attend(q, k, v, kv_layer, self.index, self.scale,
                           stored=step.cpu_kernels)  # [T, Hq, D]
        x = linear_add(attn.reshape(num_tokens, q_size), self.o_weight, x)  # [T, H]
        if num_tokens <= MLP_CHUNK_TOKENS:
            return self._mlp_residual(x, step.cpu_kernels)
        for rows in x.split(MLP_CHUNK_TOKENS):  # x is this layer's own: the chunks go back in
            rows.copy_(self._mlp_residual(rows, step.cpu_kernels))  # [chunk, H]
        return x

    def _mlp_residual(self, x: torch.Tensor, native_norm: bool) -> torch.Tensor:
        """x + MLP(norm(x)); x: [T, H]; native_norm: the norm by `cpu_ops.rms_norm_cpu`."""
        h = rms_norm(x, self.post_norm, self.config.rms_norm_eps, native_norm)  # [T, H]
        if self.gate_weight is not None and self.up_weight is not None:  # prepacked
            # SiLU and the product with up in the matmuls' epilogues: no pass of their own
            act = linear_mul(h, self.up_weight, linear_silu(h, self.gate_weight))  # [T, I]
        else:
            assert self.gate_up_weight is not None
            gate, up = linear(h, self.gate_up_weight).chunk(2, dim=-1)  # [T, I] each
            act = F.silu(gate).mul_(up)  # [T, I]
        return linear_add(act, self.down_weight, x)  # [T, H]

    def prepack(self) -> None:
        """Replaces the projection weights by their oneDNN-packed form (`linear`); gate/up
        becomes two packed weights, `gate_weight` and `up_weight` (`gate_up_weight` None)."""
        for name in ("qkv_weight", "o_weight", "down_weight"):
            packed = prepack(getattr(self, name))
            delattr(self, name)  # the plain Parameter: freed, not kept beside the packed copy
            self.register_buffer(name, packed, persistent=False)
        assert self.gate_up_weight is not None, "prepack: already packed"
        gate, up = self.gate_up_weight.chunk(2)  # [I, H] each
        self.gate_weight, self.up_weight = prepack(gate), prepack(up)
        self.gate_up_weight = None  # the plain Parameter: freed


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm and LM head."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, max_positions: int) -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype  # of the checkpoint's values and of the KV cache
        self.compute_dtype = dtype  # of the weights as stored and the activations
        self.embed = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size, dtype=dtype),
                                  requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(config, dtype, i)
                                    for i in range(config.num_layers))
        self.decode_mirror = DecodeMirror()  # the CPU path's dense K/V of a steady batch
        self.cpu_kernels = True  # decode attention and norms on CPU by engine.kernels.cpu_ops
        self.norm = nn.Parameter(torch.ones(config.hidden_size, dtype=dtype), requires_grad=False)
        self.lm_head = (self.embed if config.tie_word_embeddings else nn.Parameter(
            torch.empty(config.vocab_size, config.hidden_size, dtype=dtype), requires_grad=False))
        self.packed = False  # see `prepack`
        cos, sin = cos_sin_cache(config, max_positions)
        self.rope_cos: torch.Tensor
        self.rope_sin: torch.Tensor
        self.register_buffer("rope_cos", cos, persistent=False)  # [P, D] float32
        self.register_buffer("rope_sin", sin, persistent=False)  # [P, D] float32, signed

    def use_compute_dtype(self, dtype: torch.dtype) -> None:
        """Stores the weights in `dtype` and computes in it; the KV cache keeps `self.dtype`.

        For bfloat16 models on CPUs without native bf16 matmuls (`engine.cpu_features`): the
        weights keep their bf16 values, widened to float32 once here. Call after loading.
        """
        if self.packed:
            raise RuntimeError("use_compute_dtype: call it before prepack")
        for param in self.parameters():  # a tied LM head is the embedding: converted once
            param.data = param.data.to(dtype)
        self.compute_dtype = dtype

    def prepack(self) -> None:
        """Packs every linear weight for oneDNN (`engine.model.linear`); CPU only, after loading
        and `use_compute_dtype`. The plain weights are dropped, except the embedding table:
        tied to the LM head, it is kept for lookups and the head gets a packed copy."""
        for layer in self.layers:
            assert isinstance(layer, DecoderLayer)
            layer.prepack()
        head = prepack(self.lm_head)
        delattr(self, "lm_head")  # a tied head's embedding stays registered as `embed`
        self.register_buffer("lm_head", head, persistent=False)
        self.packed = True

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_cache: torch.Tensor,
                on_layer_done: LayerCallback | None = None) -> torch.Tensor:
        """Next-token logits [S', V] (float32) for the rows in `batch.logits_indices`.

        kv_cache: the whole model's cache (`engine.kv_cache`); this batch's K/V go into it.
        """
        x = F.embedding(batch.input_ids, self.embed)  # [T, H]
        cos = self.rope_cos[batch.positions].to(self.compute_dtype).unsqueeze(1)  # [T, 1, D]
        sin = self.rope_sin[batch.positions].to(self.compute_dtype).unsqueeze(1)  # [T, 1, D]
        step = AttentionStep(batch, kv_cache, len(self.layers), self.compute_dtype,
                             self.decode_mirror, self.cpu_kernels)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, kv_layer(kv_cache, i), step)  # [T, H]
            if on_layer_done is not None:
                on_layer_done(i)
        x = x[batch.logits_indices]  # [S', H]
        x = rms_norm(x, self.norm, self.config.rms_norm_eps, step.cpu_kernels)  # [S', H]
        return linear(x, self.lm_head).float()  # [S', V]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies Hugging Face-named tensors in; fails naming any missing or unknown one."""
        targets = self._weight_targets()
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq"):
                continue  # older checkpoints store this derived buffer
            dest = targets.get(name)
            if dest is None:
                raise ValueError(f"weights: unexpected tensor {name!r} for a "
                                 f"{self.config.family} model of this shape")
            if tuple(tensor.shape) != tuple(dest.shape):
                raise ValueError(f"weights: {name} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(dest.shape)}")
            dest.copy_(tensor)
            loaded.add(name)
        missing = sorted(set(targets) - loaded)
        if missing:
            more = " ..." if len(missing) > 5 else ""
            raise ValueError(f"weights: missing tensors {missing[:5]}{more}")

    def _weight_targets(self) -> dict[str, torch.Tensor]:
        """HF parameter name → the (view of the) tensor it fills."""
        if self.packed:  # packed weights cannot be sliced or written
            raise RuntimeError("load_weights: call it before prepack")
        c = self.config
        q_size, kv_size, inter = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, \
            c.intermediate_size
        targets: dict[str, torch.Tensor] = {"model.embed_tokens.weight": self.embed,
                                            "model.norm.weight": self.norm}
        if not c.tie_word_embeddings:
            targets["lm_head.weight"] = self.lm_head
        for i, layer in enumerate(self.layers):
            assert isinstance(layer, DecoderLayer)
            p = f"model.layers.{i}."
            rows = {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}
            for n, (start, size) in rows.items():
                targets[f"{p}self_attn.{n}_proj.weight"] = layer.qkv_weight[start:start + size]
                if layer.qkv_bias is not None:
                    targets[f"{p}self_attn.{n}_proj.bias"] = layer.qkv_bias[start:start + size]
            targets[f"{p}self_attn.o_proj.weight"] = layer.o_weight
            assert layer.gate_up_weight is not None  # not packed (checked above)
            targets[f"{p}mlp.gate_proj.weight"] = layer.gate_up_weight[:inter]
            targets[f"{p}mlp.up_proj.weight"] = layer.gate_up_weight[inter:]
            targets[f"{p}mlp.down_proj.weight"] = layer.down_weight
            targets[f"{p}input_layernorm.weight"] = layer.input_norm
            targets[f"{p}post_attention_layernorm.weight"] = layer.post_norm
        return targets
