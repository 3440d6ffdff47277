"""The bench's model shapes, its bytes-per-step count and compute-dtype labels."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine.bench.bandwidth import read_bandwidth
from engine.bench.presets import PRESETS, compute_dtypes, make_preset, weight_bytes_per_step
from engine.model.llama import LlamaModel
from engine.model_config import ModelConfig
from engine.tiny_model import PRESETS as TINY_PRESETS
from engine.tiny_model import hf_config


def read_per_step(model: LlamaModel) -> int:
    """Bytes of every parameter but an untied embedding table (only indexed at batch 1)."""
    params = {id(p): p for p in model.parameters()}
    if not model.config.tie_word_embeddings:
        params.pop(id(model.embed))
    return sum(p.numel() * p.element_size() for p in params.values())


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2", "tiny_llama3_mha"])
def test_weight_bytes_per_step_counts_the_model(fixture: str,
                                                request: pytest.FixtureRequest) -> None:
    config = ModelConfig.from_dir(request.getfixturevalue(fixture))
    for dtype in (torch.float32, torch.bfloat16):
        model = LlamaModel(config, dtype, max_positions=16)
        assert weight_bytes_per_step(config, dtype) == read_per_step(model)


def test_presets_have_the_real_shapes() -> None:
    preset = PRESETS["qwen2-0.5b"]
    qwen = ModelConfig.from_dict(hf_config(
        replace(TINY_PRESETS[preset.base], **preset.overrides), preset.arch))
    assert (qwen.num_layers, qwen.hidden_size, qwen.intermediate_size, qwen.num_heads,
            qwen.num_kv_heads, qwen.vocab_size) == (24, 896, 4864, 14, 2, 151936)
    assert qwen.attention_bias and qwen.tie_word_embeddings
    # 494M parameters, as Qwen2-0.5B has (the tied head counted once)
    assert weight_bytes_per_step(qwen, torch.float32) // 4 == pytest.approx(494e6, rel=0.01)


def test_make_preset_writes_once_and_refuses_unknown(tmp_path: Path) -> None:
    model_dir = make_preset("toy", tmp_path / "toy")
    stamp = (model_dir / "config.json").stat().st_mtime_ns
    assert make_preset("toy", tmp_path / "toy") == model_dir
    assert (model_dir / "config.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="preset"):
        make_preset("gpt5", tmp_path / "x")
    assert set(PRESETS) == {"toy", "smollm2-135m", "qwen2-0.5b"}


def test_compute_dtypes_say_when_tandem_widens_bf16() -> None:
    no_bf16 = compute_dtypes("bfloat16", "cpu", frozenset({"avx2"}))
    assert no_bf16 == {"tandem": "fp32", "eager": "bf16 (emulated)", "sdpa": "bf16 (emulated)",
                       "vllm": "bf16 (emulated)"}
    native = compute_dtypes("bfloat16", "cpu", frozenset({"avx512_bf16"}))
    assert set(native.values()) == {"bf16"}
    assert set(compute_dtypes("float32", "cpu", frozenset()).values()) == {"fp32"}


def test_read_bandwidth_is_positive() -> None:
    assert read_bandwidth(num_bytes=1 << 20, repeats=2) > 0
