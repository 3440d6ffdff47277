"""engine.weights: single-file and sharded checkpoints, dtype casts, and missing-file errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from engine.tiny_model import make_tiny_model
from engine.weights import (
    INDEX_FILE,
    SINGLE_FILE,
    check_model_dir,
    iter_weights,
    load_state_dict,
    parse_dtype,
    resolve_dtype,
    weight_files,
)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("single"), arch="qwen2", seed=5)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("sharded"), arch="qwen2", seed=5, shards=3)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_sharded_equals_single(single: Path, sharded: Path) -> None:
    a, b = load_state_dict(single), load_state_dict(sharded)
    assert list(a) and sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    files = weight_files(sharded)
    assert [p.name for p in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sum(len(names) for names in files.values()) == len(a)
    assert list(weight_files(single)) == [single / SINGLE_FILE]


def test_iterates_shard_by_shard(sharded: Path) -> None:
    index = json.loads((sharded / INDEX_FILE).read_text())["weight_map"]
    shard_of_each = [index[name] for name, _ in iter_weights(sharded)]
    assert shard_of_each == sorted(shard_of_each)  # one shard open at a time, in order


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", torch.bfloat16])
def test_casts_to_requested_dtype(single: Path, dtype: str | torch.dtype) -> None:
    ref = load_state_dict(single, torch.float32)
    target = parse_dtype(dtype)
    for name, tensor in iter_weights(single, dtype):
        assert tensor.dtype == target
        assert torch.equal(tensor, ref[name].to(target))


def test_bfloat16_checkpoint_reads_as_float32(tmp_path: Path) -> None:
    bf16 = make_tiny_model(tmp_path / "bf16", seed=5, dtype="bfloat16")
    f32 = make_tiny_model(tmp_path / "f32", seed=5)
    a, b = load_state_dict(bf16, "float32"), load_state_dict(f32, "float32")
    assert all(a[n].dtype == torch.float32 and torch.equal(a[n], b[n].bfloat16().float())
               for n in a)


def test_rejects_unsupported_dtype(single: Path) -> None:
    for bad in ("int8", torch.int64):
        with pytest.raises(ValueError, match="dtype"):
            parse_dtype(bad)
    with pytest.raises(ValueError, match="float64"):
        next(iter_weights(single, "float64"))


@pytest.mark.parametrize(("configured", "checkpoint", "expected"), [
    (None, "bfloat16", torch.bfloat16),  # the checkpoint's own
    (None, "torch.float16", torch.float16),
    (None, None, torch.float32),  # config.json names no dtype
    ("float32", "bfloat16", torch.float32),  # configured wins
    ("bfloat16", "float8_e4m3fn", torch.bfloat16),  # even over one the engine cannot run
])
def test_resolve_dtype(configured: str | None, checkpoint: str | None,
                       expected: torch.dtype) -> None:
    assert resolve_dtype(configured, checkpoint) == expected


def test_resolve_dtype_refuses_a_checkpoint_dtype_it_cannot_run() -> None:
    for checkpoint in ("float8_e4m3fn", "int8", "auto"):
        with pytest.raises(ValueError, match=f"^dtype: the checkpoint's dtype '{checkpoint}'"):
            resolve_dtype(None, checkpoint)


def test_no_weights_names_the_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"{SINGLE_FILE}.*{INDEX_FILE}"):
        weight_files(tmp_path)


def test_missing_shard_is_named(sharded: Path, tmp_path: Path) -> None:
    broken = _copy(sharded, tmp_path / "m")
    (broken / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape("model-00002-of-00003.safetensors")):
        list(iter_weights(broken))


def test_malformed_index(sharded: Path, tmp_path: Path) -> None:
    broken = _copy(sharded, tmp_path / "m")
    (broken / INDEX_FILE).write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match="weight_map"):
        weight_files(broken)
    weight_map = json.loads((sharded / INDEX_FILE).read_text())["weight_map"]
    weight_map["model.extra.weight"] = "model-00001-of-00003.safetensors"
    (broken / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=r"'model\.extra\.weight'.*model-00001-of-00003"):
        list(iter_weights(broken))


def test_check_model_dir(single: Path, sharded: Path, tmp_path: Path) -> None:
    check_model_dir(single)
    check_model_dir(sharded)
    for missing in ("config.json", "tokenizer.json", SINGLE_FILE):
        broken = _copy(single, tmp_path / missing)
        (broken / missing).unlink()
        with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")):
            check_model_dir(broken)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape("config.json; tokenizer.json; neither")):
        check_model_dir(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        check_model_dir(tmp_path / "nowhere")
