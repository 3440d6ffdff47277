"""Llama-family decoder (Llama 2/3, Mistral-style, Qwen2) running over the paged KV cache.

One file for the whole model, gpt-fast style. q/k/v and gate/up projections are fused into
single matmuls; `load_weights` maps Hugging Face parameter names onto them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from engine.forward_batch import ForwardBatch
from engine.kernels import paged_attention, store_kv
from engine.model.rope import apply_rope, cos_sin_cache
from engine.model_config import ModelConfig

LayerCallback = Callable[[int], None]
"""Called with the layer index once that layer's K/V for the batch is in the cache."""


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, as Hugging Face does. x: [T, H]."""
    xf = x.float()  # [T, H]
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # [T, H]
    return weight * xf.to(x.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        c = config
        self.config = c
        qkv_rows = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
        self.qkv_weight = nn.Parameter(torch.empty(qkv_rows, c.hidden_size, dtype=dtype),
                                       requires_grad=False)
        self.qkv_bias = (nn.Parameter(torch.empty(qkv_rows, dtype=dtype), requires_grad=False)
                         if c.attention_bias else None)
        self.o_weight = nn.Parameter(
            torch.empty(c.hidden_size, c.num_heads * c.head_dim, dtype=dtype), requires_grad=False)
        self.gate_up_weight = nn.Parameter(
            torch.empty(2 * c.intermediate_size, c.hidden_size, dtype=dtype), requires_grad=False)
        self.down_weight = nn.Parameter(
            torch.empty(c.hidden_size, c.intermediate_size, dtype=dtype), requires_grad=False)
        self.input_norm = nn.Parameter(torch.ones(c.hidden_size, dtype=dtype), requires_grad=False)
        self.post_norm = nn.Parameter(torch.ones(c.hidden_size, dtype=dtype), requires_grad=False)
        self.scale = c.head_dim ** -0.5

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_layer: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        c = self.config
        num_tokens = x.shape[0]
        h = rms_norm(x, self.input_norm, c.rms_norm_eps)  # [T, H]
        qkv = F.linear(h, self.qkv_weight, self.qkv_bias)  # [T, (Hq + 2 Hkv) D]
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = apply_rope(q.view(num_tokens, c.num_heads, c.head_dim), cos, sin)  # [T, Hq, D]
        k = apply_rope(k.view(num_tokens, c.num_kv_heads, c.head_dim), cos, sin)  # [T, Hkv, D]
        v = v.view(num_tokens, c.num_kv_heads, c.head_dim)  # [T, Hkv, D]
        store_kv(k, v, kv_layer, batch.slot_mapping)
        attn = paged_attention(q, kv_layer, batch.block_tables, batch.query_start_loc,
                               batch.seq_lens, self.scale, batch.max_query_len,
                               batch.max_seq_len)  # [T, Hq, D]
        x = x + F.linear(attn.reshape(num_tokens, q_size), self.o_weight)  # [T, H]
        h = rms_norm(x, self.post_norm, c.rms_norm_eps)  # [T, H]
        gate, up = F.linear(h, self.gate_up_weight).chunk(2, dim=-1)  # [T, I] each
        return x + F.linear(F.silu(gate) * up, self.down_weight)  # [T, H]


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm and LM head."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, max_positions: int) -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.embed = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size, dtype=dtype),
                                  requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(config, dtype) for _ in range(config.num_layers))
        self.norm = nn.Parameter(torch.ones(config.hidden_size, dtype=dtype), requires_grad=False)
        self.lm_head = (self.embed if config.tie_word_embeddings else nn.Parameter(
            torch.empty(config.vocab_size, config.hidden_size, dtype=dtype), requires_grad=False))
        cos, sin = cos_sin_cache(config, max_positions)
        self.rope_cos: torch.Tensor
        self.rope_sin: torch.Tensor
        self.register_buffer("rope_cos", cos, persistent=False)  # [P, D] float32
        self.register_buffer("rope_sin", sin, persistent=False)  # [P, D] float32

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_cache: torch.Tensor,
                on_layer_done: LayerCallback | None = None) -> torch.Tensor:
        """Next-token logits [S', V] (float32) for the rows in `batch.logits_indices`.

        kv_cache: [L, N, 2, block_size, Hkv, D]; this batch's K/V are written into it.
        """
        x = F.embedding(batch.input_ids, self.embed)  # [T, H]
        cos = self.rope_cos[batch.positions].to(self.dtype).unsqueeze(1)  # [T, 1, D]
        sin = self.rope_sin[batch.positions].to(self.dtype).unsqueeze(1)  # [T, 1, D]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, kv_cache[i], batch)  # [T, H]
            if on_layer_done is not None:
                on_layer_done(i)
        x = x[batch.logits_indices]  # [S', H]
        x = rms_norm(x, self.norm, self.config.rms_norm_eps)  # [S', H]
        return F.linear(x, self.lm_head).float()  # [S', V]

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
            targets[f"{p}mlp.gate_proj.weight"] = layer.gate_up_weight[:inter]
            targets[f"{p}mlp.up_proj.weight"] = layer.gate_up_weight[inter:]
            targets[f"{p}mlp.down_proj.weight"] = layer.down_weight
            targets[f"{p}input_layernorm.weight"] = layer.input_norm
            targets[f"{p}post_attention_layernorm.weight"] = layer.post_norm
        return targets
