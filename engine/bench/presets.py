"""The bench's model shapes (random weights) and what each engine computes a dtype in.

`toy`: the engine-overhead preset (hidden 256, 4 layers, vocab 1,024). `smollm2-135m`: the shape
of SmolLM2-135M (30 layers, hidden 576, intermediate 1,536, 9/3 heads, vocab 49,152, tied
embeddings). `qwen2-0.5b`: the shape of Qwen2-0.5B (24 layers, hidden 896, intermediate 4,864,
14/2 heads, vocab 151,936, tied embeddings, q/k/v biases), written in bfloat16 (1 GB instead
of 2). Real checkpoints come in through `--model DIR`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch

from engine.cpu_features import compute_dtype
from engine.model_config import ModelConfig
from engine.tiny_model import make_tiny_model


class Preset(NamedTuple):
    arch: str
    base: str  # the `engine.tiny_model` preset it starts from
    overrides: dict[str, Any]


PRESETS: dict[str, Preset] = {
    "toy": Preset("llama", "bench", {}),
    "smollm2-135m": Preset("llama", "smollm2", {}),
    "qwen2-0.5b": Preset("qwen2", "smollm2", dict(
        hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2,
        vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
        tie_word_embeddings=True, dtype="bfloat16")),
}


def make_preset(name: str, out_dir: Path) -> Path:
    """Writes the preset's random-weight checkpoint into `out_dir` (reused when it is there)."""
    if name not in PRESETS:
        raise ValueError(f"preset: {name!r} is not one of {', '.join(PRESETS)}")
    if (out_dir / "config.json").is_file():
        return out_dir
    arch, base, overrides = PRESETS[name]
    return make_tiny_model(out_dir, arch=arch, preset=base, seed=0, **overrides)


def weight_bytes_per_step(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of weights one batch-1 decode step reads: every layer's, the final norm and the
    LM head (the embedding table is only indexed, one row, unless it is the tied LM head)."""
    c = config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    layer = (q + 2 * kv) * c.hidden_size + c.hidden_size * q \
        + 3 * c.intermediate_size * c.hidden_size + 2 * c.hidden_size
    if c.attention_bias:
        layer += q + 2 * kv
    elements = c.num_layers * layer + c.hidden_size + c.vocab_size * c.hidden_size
    return elements * torch.empty((), dtype=dtype).element_size()


def compute_dtypes(dtype: str, device: str,
                   flags: frozenset[str] | None = None) -> dict[str, str]:
    """The dtype each engine's matmuls run in when asked for `dtype`: Tandem computes bf16 in
    float32 on a CPU without native bf16 (`engine.cpu_features`); transformers and vLLM run
    the configured dtype (emulated there, converting tiles to float32 on the fly)."""
    asked = getattr(torch, dtype)
    ours = compute_dtype(asked, torch.device(device), flags)
    short = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    peers = short[asked] + ("" if ours == asked else " (emulated)")
    return {"tandem": short[ours], "eager": peers, "sdpa": peers, "vllm": peers}
