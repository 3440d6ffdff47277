"""engine.checkpoint_id: a checkpoint's identity comes from its content, not its folder, and
is found without reading the weights in full."""

from __future__ import annotations

import json
import re
import shutil
import struct
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from engine.checkpoint_id import (
    SAMPLE_BYTES,
    SAMPLES,
    checkpoint_fingerprint,
    checkpoint_identity,
    sample_offsets,
)
from engine.config import EngineConfig
from engine.engine import Engine
from engine.tiny_model import make_tiny_model
from engine.weights import INDEX_FILE, SINGLE_FILE
from kv_transfer.spec import KVLayoutSpec


def _spec(model_dir: Path) -> KVLayoutSpec:
    """The KV spec a worker serving `model_dir` hands its peers (cluster/worker_runtime.py)."""
    engine = Engine(model_dir, EngineConfig(num_blocks=4, block_size=4))
    return KVLayoutSpec.from_cache_shape(engine.cache_shape, engine.model_id)


def _rewrite_tensor(model_dir: Path, name: str, edit: float) -> None:
    path = model_dir / SINGLE_FILE
    tensors = load_file(str(path))
    tensors[name].view(-1)[0] += edit
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_same_checkpoint_in_differently_named_folders_has_one_identity(
        tiny_llama: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_llama, tmp_path / "some-other-name")
    identity = checkpoint_identity(tiny_llama)
    assert re.fullmatch(r"llama@[0-9a-f]{12}", identity)
    assert checkpoint_identity(copy) == identity
    assert checkpoint_fingerprint(copy) == checkpoint_fingerprint(tiny_llama)


def test_different_weights_in_same_named_folders_differ(tmp_path: Path) -> None:
    first = make_tiny_model(tmp_path / "a" / "model", seed=11)
    second = make_tiny_model(tmp_path / "b" / "model", seed=12)
    assert (first / "config.json").read_bytes() == (second / "config.json").read_bytes()
    assert checkpoint_identity(first) != checkpoint_identity(second)
    spec_a, spec_b = _spec(first), _spec(second)
    assert spec_a.model_name == checkpoint_identity(first)
    assert spec_a.compat_hash != spec_b.compat_hash
    assert spec_a.differing_fields(spec_b.to_dict()) == ["model_name"]


def test_sharded_checkpoint_has_the_identity_of_its_single_file(tmp_path: Path) -> None:
    single = make_tiny_model(tmp_path / "single", arch="qwen2", seed=5)
    sharded = make_tiny_model(tmp_path / "sharded", arch="qwen2", seed=5, shards=3)
    other = make_tiny_model(tmp_path / "other", arch="qwen2", seed=6, shards=3)
    assert checkpoint_identity(sharded) == checkpoint_identity(single)
    assert checkpoint_identity(other) != checkpoint_identity(sharded)
    assert checkpoint_identity(sharded).startswith("qwen2@")


@pytest.mark.parametrize("name", [
    "model.layers.1.input_layernorm.weight",  # small: hashed in full
    "model.embed_tokens.weight",  # large: its first element is in the first window
])
def test_an_edited_tensor_changes_the_fingerprint(tiny_llama: Path, tmp_path: Path,
                                                   name: str) -> None:
    copy = shutil.copytree(tiny_llama, tmp_path / "edited")
    _rewrite_tensor(copy, name, 0.5)
    assert checkpoint_fingerprint(copy) != checkpoint_fingerprint(tiny_llama)


def test_config_counts_by_content_not_by_formatting(tiny_llama: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_llama, tmp_path / "config")
    raw = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(dict(reversed(raw.items()))))  # no indent
    assert checkpoint_fingerprint(copy) == checkpoint_fingerprint(tiny_llama)
    raw["rope_theta"] = 500000.0  # same weights, different positions: different K
    (copy / "config.json").write_text(json.dumps(raw))
    assert checkpoint_fingerprint(copy) != checkpoint_fingerprint(tiny_llama)


def test_sample_offsets_cover_small_tensors_whole_and_large_ones_at_both_ends() -> None:
    assert sample_offsets(0) == [(0, 0)]
    assert sample_offsets(SAMPLES * SAMPLE_BYTES) == [(0, SAMPLES * SAMPLE_BYTES)]
    big = 10**9
    windows = sample_offsets(big)
    assert len(windows) == SAMPLES and all(n == SAMPLE_BYTES for _, n in windows)
    assert windows[0][0] == 0 and windows[-1][0] + SAMPLE_BYTES == big
    assert [o for o, _ in windows] == sorted({o for o, _ in windows})


def _bytes_read() -> int:
    """Bytes this process has read through read() calls so far (Linux /proc/self/io)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def test_a_huge_checkpoint_is_fingerprinted_from_samples(tmp_path: Path) -> None:
    # 64 GiB of bf16 in 4 shards, as sparse files: hashing it all would take minutes
    shard_bytes, weight_map = 2**34, {}
    for i in range(4):
        name, file_name = f"model.layers.{i}.mlp.weight", f"model-{i + 1:05d}-of-00004.safetensors"
        header = json.dumps({"__metadata__": {"format": "pt"}, name: {
            "dtype": "BF16", "shape": [2**16, 2**17], "data_offsets": [0, shard_bytes]}}).encode()
        header += b" " * (-len(header) % 8)  # safetensors pads the header to 8 bytes
        with open(tmp_path / file_name, "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header)
            f.truncate(8 + len(header) + shard_bytes)
        weight_map[name] = file_name
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    before, started = _bytes_read(), time.perf_counter()
    identity = checkpoint_identity(tmp_path)
    elapsed, read = time.perf_counter() - started, _bytes_read() - before
    assert identity.startswith("llama@")
    assert read < 2**20, f"read {read} bytes of a {4 * shard_bytes}-byte checkpoint"
    assert elapsed < 5.0


def test_malformed_weights_are_named(tiny_llama3_mha: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_llama3_mha, tmp_path / "broken")  # 2 shards and an index
    path = copy / "model-00002-of-00002.safetensors"
    path.write_bytes(path.read_bytes()[:-100])  # the last tensor ends past the file's end
    with pytest.raises(ValueError, match="^weights: .* ends inside tensor"):
        checkpoint_fingerprint(copy)
    (copy / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        checkpoint_identity(copy)
