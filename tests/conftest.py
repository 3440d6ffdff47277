"""Shared fixtures: locally generated tiny models (random weights, HF layout), made once, and
the default model as set-up converted it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.device import device_under_test

# Triton fixes at definition time whether a kernel is compiled or interpreted: unless the tests
# run on CUDA (TANDEM_TEST_DEVICE, tests/support/device.py),
# interpret every kernel this test process defines (tests/engine/kernels runs them; the CPU
# engine itself uses the torch path, so nothing else is affected).
if device_under_test().type == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cli.import_model import is_complete
from engine.default_model import smollm2_dir
from engine.tiny_model import make_tiny_model

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_llama(models_dir: Path) -> Path:
    """Llama with GQA (4 query heads, 2 KV heads), untied embeddings."""
    return make_tiny_model(models_dir / "llama", arch="llama", seed=1)


@pytest.fixture(scope="session")
def tiny_qwen2(models_dir: Path) -> Path:
    """Qwen2 (q/k/v biases) with GQA."""
    return make_tiny_model(models_dir / "qwen2", arch="qwen2", seed=2)


@pytest.fixture(scope="session")
def tiny_llama3_mha(models_dir: Path) -> Path:
    """Llama with multi-head attention, tied embeddings and Llama-3 RoPE scaling, 2 shards."""
    return make_tiny_model(models_dir / "llama3-mha", arch="llama", seed=3, num_kv_heads=4,
                           tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE, shards=2)


# A ChatML-like template in the tiny model's own special tokens.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="session")
def tiny_chat_llama(models_dir: Path) -> Path:
    """`tiny_llama`'s weights (same seed) with a chat template, for the chat API."""
    path = make_tiny_model(models_dir / "llama-chat", arch="llama", seed=1)
    (path / "chat_template.jinja").write_text(TINY_CHAT_TEMPLATE, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct as `scripts/setup.sh` converted it; a failure, never a skip, when
    it is missing."""
    path = smollm2_dir()
    if not is_complete(path):
        pytest.fail(f"the default model is not in {path}: run scripts/setup.sh (it installs "
                    "and converts SmolLM2-135M-Instruct), or `tandem import-smollm2`")
    return path
