"""engine.tiny_model: transformers loads what it writes, bit for bit, and decodes it stably."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it: never download

import transformers  # the referee, tests only

from engine.model_config import ModelConfig
from engine.tiny_model import PRESETS, hf_config, make_tiny_model
from engine.weights import load_state_dict, weight_files

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256}

# (arch, make_tiny_model overrides): both archs, tied and untied, single file and sharded.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "llama-tied-sharded-rope3": ("llama", {"tie_word_embeddings": True, "shards": 3,
                                           "rope_scaling": LLAMA3_ROPE}),
    "qwen2-sharded": ("qwen2", {"shards": 2}),
    "qwen2-tied-bf16": ("qwen2", {"tie_word_embeddings": True, "dtype": "bfloat16"}),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict[str, Any]]:
    arch, kw = VARIANTS[request.param]
    return make_tiny_model(tmp_path_factory.mktemp(request.param), arch=arch, seed=7, **kw), \
        arch, kw


def test_transformers_loads_exactly_our_tensors(variant: tuple[Path, str, dict[str, Any]]) -> None:
    model_dir, arch, kw = variant
    loaded: Any = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, output_loading_info=True)
    model, info = loaded
    assert type(model).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys

    dtype = getattr(torch, kw.get("dtype", "float32"))
    assert model.dtype == dtype
    ours = load_state_dict(model_dir, dtype)
    theirs = model.state_dict()
    tied = kw.get("tie_word_embeddings", False)
    assert set(theirs) - set(ours) == ({"lm_head.weight"} if tied else set())
    assert set(ours) <= set(theirs)
    for name, tensor in ours.items():
        assert torch.equal(theirs[name], tensor), name
    if tied:
        assert torch.equal(theirs["lm_head.weight"], ours["model.embed_tokens.weight"])
    assert any(name.endswith("q_proj.bias") for name in ours) == (arch == "qwen2")


def test_model_config_parses_it(variant: tuple[Path, str, dict[str, Any]]) -> None:
    model_dir, arch, kw = variant
    cfg = ModelConfig.from_dir(model_dir)
    tiny = PRESETS["tiny"]
    assert (cfg.family, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == \
        (arch, tiny.vocab_size, tiny.hidden_size, tiny.intermediate_size)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 4, 2, 16)
    assert (cfg.max_position_embeddings, cfg.rope_theta) == (2048, 10000.0)
    assert cfg.tie_word_embeddings == kw.get("tie_word_embeddings", False)
    assert cfg.attention_bias == (arch == "qwen2")
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (1, (2,))
    if "rope_scaling" in kw:
        assert cfg.rope_scaling is not None
        assert (cfg.rope_scaling.factor, cfg.rope_scaling.original_max_position_embeddings) == \
            (8.0, 256)
        hf_rope = transformers.AutoConfig.from_pretrained(model_dir).rope_parameters
        assert hf_rope["rope_type"] == "llama3" and hf_rope["factor"] == 8.0
    else:
        assert cfg.rope_scaling is None


def test_bench_preset(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path, preset="bench")
    cfg = ModelConfig.from_dir(model_dir)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads,
            cfg.num_kv_heads, cfg.vocab_size, cfg.tie_word_embeddings, cfg.rope_theta) == \
        (256, 688, 4, 8, 4, 1024, False, 10000.0)
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    assert len(tok["model"]["vocab"]) == 1024  # the corpus yields enough merges for the preset


def test_greedy_logits_are_well_separated(tmp_path: Path) -> None:
    # Greedy decoding is compared token for token with transformers: the top-1/top-2 gap must
    # stay far above float32 rounding, and the text must not collapse into one repeated token.
    gaps, distinct = [], []
    for arch, tied in (("llama", False), ("qwen2", True)):
        model_dir = make_tiny_model(tmp_path / arch, arch=arch, tie_word_embeddings=tied)
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            prompt = torch.randint(3, 512, (1, 8), generator=gen)
            with torch.inference_mode():
                out = model.generate(prompt, max_new_tokens=64, do_sample=False,
                                     eos_token_id=None, pad_token_id=0,
                                     output_logits=True, return_dict_in_generate=True)
            top2 = torch.cat(out.logits).topk(2, dim=-1).values  # [steps, 2]
            gaps.append(top2[:, 0] - top2[:, 1])
            distinct.append(len(set(out.sequences[0, 8:].tolist())))
    gap = torch.cat(gaps)
    assert (gap < 1e-3).float().mean() < 0.01, gap.min()
    assert gap.median() > 0.5
    assert min(distinct) >= 4, distinct


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    def files(d: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(d.iterdir())}

    kw: dict[str, Any] = {"arch": "qwen2", "shards": 2, "rope_scaling": LLAMA3_ROPE}
    a = files(make_tiny_model(tmp_path / "a", seed=3, **kw))
    b = files(make_tiny_model(tmp_path / "b", seed=3, **kw))
    c = files(make_tiny_model(tmp_path / "c", seed=4, **kw))
    assert a == b
    assert a["tokenizer.json"] == c["tokenizer.json"] and a["config.json"] == c["config.json"]
    assert a["model-00001-of-00002.safetensors"] != c["model-00001-of-00002.safetensors"]


def test_regenerating_replaces_old_weights(tmp_path: Path) -> None:
    make_tiny_model(tmp_path, seed=1, shards=3)
    make_tiny_model(tmp_path, seed=2)
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]
    assert list(weight_files(tmp_path)) == [tmp_path / "model.safetensors"]


def test_bad_arguments(tmp_path: Path) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"arch": "gpt2"}, "arch: 'gpt2'"),
        ({"preset": "huge"}, "preset: 'huge'"),
        ({"hidden": 32}, "unknown field.*hidden"),
        ({"shards": 0}, "shards: must be in 1..21"),
        ({"num_kv_heads": 3}, "num_kv_heads"),
        ({"vocab_size": 100}, "vocab_size: must be >= 259"),
        ({"dtype": "int8"}, "dtype: 'int8'"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            make_tiny_model(tmp_path / "m", **kw)
    assert not (tmp_path / "m").exists()  # validation happens before anything is written


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path)
    raw = json.loads((model_dir / "config.json").read_text())
    raw["architectures"] = ["GPT2LMHeadModel"]
    (model_dir / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="'GPT2LMHeadModel' is not supported"):
        ModelConfig.from_dir(model_dir)
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        ModelConfig.from_dir(tmp_path / "nowhere")


def test_smollm2_preset_has_smollm2s_shape(tmp_path: Path) -> None:
    # config.json alone (the 540 MB of weights are the benchmark's to write)
    (tmp_path / "config.json").write_text(json.dumps(hf_config(PRESETS["smollm2"], "llama")))
    cfg = ModelConfig.from_dir(tmp_path)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads,
            cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size, cfg.tie_word_embeddings,
            cfg.rope_theta, cfg.max_position_embeddings) == \
        (576, 1536, 30, 9, 3, 64, 49152, True, 100000.0, 8192)
