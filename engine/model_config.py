"""The model's shape, read from a Hugging Face `config.json` (Llama and Qwen2 families).

Only `config.json` is read (the router uses this without the weights). The checkpoint's
identity, which needs the weights, is `engine.checkpoint_id`'s.

Sliding-window attention is refused, not run: the paged attention paths (CPU, Triton, the decode
mirror) attend to every earlier token, so past the window the output would silently diverge
from the model's. A window that can never bind, one at least as long as the model's context,
loads (it is full attention).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

# HF `architectures[0]` → our family name. Qwen2 differs from Llama by q/k/v biases; Mistral
# is Llama plus a sliding window (refused unless it cannot bind, see `_check_sliding_window`).
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}
# transformers' defaults where config.json leaves a field out (MistralConfig, Qwen2Config):
# `save_pretrained` omits values equal to the default, so absent does not mean "no window".
DEFAULT_SLIDING_WINDOW = 4096
DEFAULT_MAX_WINDOW_LAYERS = 28  # Qwen2: layers from this index on use the window


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    """Everything the engine needs to know about a model's architecture."""

    family: str  # "llama" or "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    # the dtype config.json gives the weights (`torch_dtype`, or `dtype` as transformers 5
    # writes it), as written, e.g. "bfloat16"; None when it names none. The engine runs in it
    # unless told otherwise (engine.weights.resolve_dtype).
    dtype: str | None = None

    def __post_init__(self) -> None:
        if self.family not in ("llama", "qwen2"):
            raise ValueError(f"family: unsupported model family {self.family!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads: {self.num_kv_heads} does not divide num_heads {self.num_heads}"
            )

    @cached_property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Builds a config from the parsed contents of an HF `config.json`.

        Raises ValueError naming the field for what the engine cannot run: an unsupported
        architecture or RoPE scaling, a sliding window that binds within the context.
        """
        archs = raw.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architectures: {arch!r} is not supported "
                f"(supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})"
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        for key in ("vocab_size", "hidden_size", "intermediate_size",
                    "num_hidden_layers", "num_attention_heads"):
            if key not in raw:
                raise ValueError(f"{key}: missing from config.json")
        num_heads = int(raw["num_attention_heads"])
        head_dim = raw.get("head_dim") or raw["hidden_size"] // num_heads
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        rope_theta = raw.get("rope_theta")
        scaling = raw.get("rope_scaling") or raw.get("rope_parameters")
        if rope_theta is None and isinstance(scaling, dict):
            rope_theta = scaling.get("rope_theta")
        max_positions = int(raw.get("max_position_embeddings", 2048))
        _check_sliding_window(arch, raw, max_positions)
        dtype = raw.get("dtype") or raw.get("torch_dtype")
        return cls(
            family=family,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            max_position_embeddings=max_positions,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=_parse_rope_scaling(scaling),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=family == "qwen2" or bool(raw.get("attention_bias", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            dtype=None if dtype is None else str(dtype),
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        """Reads `config.json` from a local Hugging Face model directory."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"model: no config.json in {model_dir}")
        return cls.from_dict(json.loads(path.read_text()))


def _check_sliding_window(arch: str, raw: dict[str, Any], max_positions: int) -> None:
    """Raises ValueError (`sliding_window: ...`) if attention is windowed within the context.

    transformers' semantics: a query at position q sees keys k > q - window, so the window binds
    only once a sequence is longer than it; sequences here never exceed `max_positions`.
    Mistral windows every layer; Qwen2 only with `use_sliding_window`, on the layers that
    `layer_types` marks "sliding_attention" (by default those from `max_window_layers` on).
    """
    if arch == "MistralForCausalLM":
        what = "Mistral's sliding window"
    elif arch == "Qwen2ForCausalLM" and raw.get("use_sliding_window"):
        num_layers = int(raw["num_hidden_layers"])
        first = int(raw.get("max_window_layers", DEFAULT_MAX_WINDOW_LAYERS))
        types = raw.get("layer_types") or ["sliding_attention" if i >= first else "full_attention"
                                           for i in range(num_layers)]
        layers = [i for i, kind in enumerate(types) if kind == "sliding_attention"]
        if not layers:
            return
        what = (f"Qwen2's sliding window (use_sliding_window, layers "
                f"{layers[0]}..{layers[-1]} of {num_layers})")
    else:
        return
    window = raw.get("sliding_window", DEFAULT_SLIDING_WINDOW)
    if window is None or int(window) >= max_positions:
        return
    raise ValueError(f"sliding_window: {what} of {int(window)} tokens is not supported "
                     f"(the model's context is {max_positions} tokens)")


def _parse_rope_scaling(raw: Any) -> RopeScaling | None:
    if not isinstance(raw, dict):
        return None
    kind = raw.get("rope_type") or raw.get("type")
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise ValueError(f"rope_scaling: rope_type {kind!r} is not supported (only 'llama3')")
    return RopeScaling(
        factor=float(raw["factor"]),
        low_freq_factor=float(raw["low_freq_factor"]),
        high_freq_factor=float(raw["high_freq_factor"]),
        original_max_position_embeddings=int(raw["original_max_position_embeddings"]),
    )
