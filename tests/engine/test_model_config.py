"""engine.model_config: what config.json the engine accepts (sliding windows that bind are
refused, naming the field) and the checkpoint dtype it reads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from engine.config import EngineConfig
from engine.engine import Engine
from engine.model_config import ModelConfig
from engine.sampling import SamplingParams
from engine.tiny_model import make_tiny_model
from tests.engine.hf_reference import hf_greedy

LLAMA: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512,
    "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32768,
}


def mistral(**fields: Any) -> dict[str, Any]:
    return {**LLAMA, "architectures": ["MistralForCausalLM"], "model_type": "mistral", **fields}


def qwen2(**fields: Any) -> dict[str, Any]:
    return {**LLAMA, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **fields}


@pytest.mark.parametrize(("raw", "message"), [
    (mistral(sliding_window=4096),
     r"^sliding_window: Mistral's sliding window of 4096 tokens is not supported "
     r"\(the model's context is 32768 tokens\)$"),
    # absent means transformers' default of 4096 (save_pretrained omits default values)
    (mistral(), "^sliding_window: Mistral's sliding window of 4096 tokens"),
    (mistral(sliding_window=32767), "^sliding_window: .* 32767 tokens"),
    (qwen2(use_sliding_window=True, sliding_window=4096, max_window_layers=2),
     r"^sliding_window: Qwen2's sliding window \(use_sliding_window, layers 2\.\.3 of 4\) "
     r"of 4096 tokens"),
    # max_window_layers defaults to 28: a 30-layer model windows its last two layers
    (qwen2(use_sliding_window=True, num_hidden_layers=30), r"layers 28\.\.29 of 30"),
    (qwen2(use_sliding_window=True, sliding_window=1024,
           layer_types=["sliding_attention", "full_attention", "full_attention",
                        "full_attention"]), r"layers 0\.\.0 of 4\) of 1024 tokens"),
])
def test_a_binding_sliding_window_is_refused(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(raw)


@pytest.mark.parametrize("raw", [
    mistral(sliding_window=None),
    mistral(sliding_window=32768),  # as long as the context: never binds
    mistral(sliding_window=4096, max_position_embeddings=4096),
    qwen2(use_sliding_window=False, sliding_window=4096),
    qwen2(sliding_window=4096),  # use_sliding_window defaults to false
    qwen2(use_sliding_window=True, sliding_window=None),
    qwen2(use_sliding_window=True, sliding_window=4096, max_window_layers=4),  # no layer
    LLAMA | {"sliding_window": 16},  # Llama has no window; transformers ignores the field
])
def test_a_window_that_cannot_bind_loads(raw: dict[str, Any]) -> None:
    assert ModelConfig.from_dict(raw).num_layers == raw["num_hidden_layers"]


@pytest.mark.parametrize(("fields", "dtype"), [
    ({"torch_dtype": "bfloat16"}, "bfloat16"),
    ({"dtype": "float16"}, "float16"),  # transformers 5 writes `dtype`
    ({"dtype": "bfloat16", "torch_dtype": "float32"}, "bfloat16"),
    ({"torch_dtype": "float8_e4m3fn"}, "float8_e4m3fn"),  # refused by the engine, not here
    ({}, None),
    ({"torch_dtype": None}, None),
])
def test_reads_the_checkpoint_dtype(fields: dict[str, Any], dtype: str | None) -> None:
    assert ModelConfig.from_dict(LLAMA | fields).dtype == dtype


def _as_mistral(src: Path, dst: Path, sliding_window: int) -> Path:
    """A copy of a tiny Llama checkpoint that transformers loads as a Mistral."""
    model_dir = Path(shutil.copytree(src, dst))
    raw = json.loads((model_dir / "config.json").read_text())
    raw.update(architectures=["MistralForCausalLM"], model_type="mistral",
               sliding_window=sliding_window)
    for key in ("attention_bias", "mlp_bias", "pretraining_tp"):  # not Mistral fields
        raw.pop(key)
    (model_dir / "config.json").write_text(json.dumps(raw))
    return model_dir


def test_mistral_with_a_window_as_long_as_its_context_matches_transformers(
        tmp_path: Path) -> None:
    llama = make_tiny_model(tmp_path / "llama", seed=7, max_position_embeddings=64)
    model_dir = _as_mistral(llama, tmp_path / "mistral", sliding_window=64)
    engine = Engine(model_dir, EngineConfig(num_blocks=20, block_size=4))
    prompt = [(7 * i) % 500 + 3 for i in range(40)]
    new = engine.max_model_len - len(prompt)  # up to the last position of the context
    tokens = engine.generate([prompt], SamplingParams(max_tokens=new, ignore_eos=True))[0]
    assert len(tokens) == new == 24
    assert tokens == hf_greedy(model_dir, prompt, new)
    shorter = _as_mistral(llama, tmp_path / "mistral-32", sliding_window=32)
    with pytest.raises(ValueError, match="^sliding_window: Mistral's sliding window of 32 "):
        Engine(shorter, EngineConfig(num_blocks=20, block_size=4))
