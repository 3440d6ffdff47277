"""cli.import_model: the default model's conversion, idempotent and never half-done, and the
folder set-up made (its config, dtype and chat template as the engine reads them)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli.import_model import (
    REQUIRED_FILES,
    SMOLLM2_GGUF,
    import_gguf,
    is_complete,
    smollm2_gguf,
)
from engine.chat_template import ChatTemplate
from engine.model_config import ModelConfig
from engine.weights import resolve_dtype

REPO_ROOT = Path(__file__).resolve().parents[2]


def fake_folder(path: Path, files: tuple[str, ...] = REQUIRED_FILES) -> Path:
    path.mkdir(parents=True)
    for name in files:
        (path / name).write_text("{}")
    return path


def test_a_folder_is_complete_only_with_every_file(tmp_path: Path) -> None:
    assert is_complete(fake_folder(tmp_path / "whole"))
    assert not is_complete(fake_folder(tmp_path / "half", REQUIRED_FILES[:-1]))
    assert not is_complete(tmp_path / "none")


def test_a_complete_folder_is_left_alone(tmp_path: Path) -> None:
    out = fake_folder(tmp_path / "model")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    # the GGUF does not even exist: nothing is read or converted
    assert import_gguf(tmp_path / "missing.gguf", out) is False
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_a_failed_conversion_leaves_no_folder_that_looks_complete(tmp_path: Path) -> None:
    out = fake_folder(tmp_path / "model", REQUIRED_FILES[:1])  # a killed set-up's, say
    leftover = fake_folder(tmp_path / ".model.partial-killed")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file" * 64)
    with pytest.raises(ValueError, match="GGUF magic"):  # transformers' reader refuses it
        import_gguf(bad, out)
    assert not is_complete(out)
    assert sorted(p.name for p in out.iterdir()) == [REQUIRED_FILES[0]]
    assert not leftover.exists()  # a killed conversion's leftovers are cleared first
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock", "bad.gguf", "model"]


def test_the_wheel_ships_the_gguf() -> None:
    gguf = smollm2_gguf()
    assert gguf.name == SMOLLM2_GGUF
    assert gguf.read_bytes()[:4] == b"GGUF"
    assert 80e6 < gguf.stat().st_size < 110e6  # Q4_1: 93 MB


def test_the_converted_folder_is_smollm2_in_float32_with_its_chat_template(
        smollm2: Path) -> None:
    raw = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in raw
    assert raw["architectures"] == ["LlamaForCausalLM"]
    config = ModelConfig.from_dir(smollm2)
    assert (config.family, config.num_layers, config.hidden_size, config.num_heads,
            config.num_kv_heads, config.vocab_size) == ("llama", 30, 576, 9, 3, 49152)
    assert config.tie_word_embeddings
    assert config.dtype == "float32"
    assert str(resolve_dtype(None, config.dtype)) == "torch.float32"  # what the engine runs
    assert (smollm2 / "model.safetensors").stat().st_size > 500e6  # float32: 538 MB
    template = ChatTemplate.from_dir(smollm2)
    assert template is not None
    prompt = template.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert json.loads((smollm2 / "tokenizer_config.json").read_text())["eos_token"] == \
        "<|im_end|>"


@pytest.mark.slow
def test_import_smollm2_converts_the_wheel_as_set_up_did(smollm2: Path, tmp_path: Path) -> None:
    out = tmp_path / "SmolLM2-135M-Instruct"
    done = subprocess.run([sys.executable, "-m", "cli.main", "import-smollm2", "--out", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr
    assert "converted in" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [".SmolLM2-135M-Instruct.lock",
                                                          "SmolLM2-135M-Instruct"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (smollm2 / name).read_bytes(), name
    again = subprocess.run([sys.executable, "-m", "cli.main", "import-smollm2", "--out",
                            str(out)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "already converted" in again.stdout
