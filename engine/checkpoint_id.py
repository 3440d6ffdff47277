"""A checkpoint's identity from its content: what two workers compare before exchanging KV.

`checkpoint_identity(dir)` is `<model_type>@<12 hex>`, e.g. `llama@3f2a9c1b7d0e`: readable in
status and handshake errors, and the same for the same checkpoint wherever it lies (the folder's
name and path are not part of it). The hex is the start of `checkpoint_fingerprint(dir)`, a
sha256 over:

- `config.json`, parsed and re-serialized canonically (key order and whitespace do not count);
- for every tensor the engine loads (the index's `weight_map`, or every tensor of the single
  file): its name, dtype and shape from the safetensors header, and its bytes: all of them for
  a tensor of at most `SAMPLES * SAMPLE_BYTES` bytes (norms, biases), else `SAMPLES` windows of
  `SAMPLE_BYTES` at fixed, evenly spaced offsets from its first byte to its last.

Tensors are digested one by one and combined in name order, so sharding does not count: the
same tensors in one file or in many have one identity.

What it does not cover: the bytes of a large tensor between the sampled windows. A checkpoint
that differs from another only there (a few edited rows of an embedding, say) gets the same
identity; any fine-tune or merge that moves every weight of a tensor does not. Hashing every
byte is not affordable: sha256 runs at well under 1 GB/s a core (3.6 s per GiB measured on the
dev box), minutes for a 140 GB checkpoint at every start, on top of the load's own read. This
reads the headers plus at most `SAMPLES * SAMPLE_BYTES` per tensor, about 12 MB for a 70B model.
Tokenizer files and `generation_config.json` are not covered: they do not shape the KV cache.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any, BinaryIO

from engine.weights import weight_files

FORMAT = b"tandem-checkpoint-fingerprint-v1"  # bump when what is hashed changes
# The sampling is part of the identity's definition, not a tunable: workers that sampled
# differently would never agree, so these are constants of the format (FORMAT names them).
SAMPLES = 4  # windows per large tensor: the first and last bytes, and two between
SAMPLE_BYTES = 4096  # one page per window: a disk reads no less for a smaller one
ID_HEX = 12  # hex digits of the fingerprint in the readable identity (48 bits)
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on a header


def checkpoint_identity(model_dir: str | Path) -> str:
    """`<model_type>@<12 hex of the fingerprint>`: the model's name in the KV compatibility hash."""
    model_dir = Path(model_dir)
    config = _read_config(model_dir)
    label = config.get("model_type") or "model"
    return f"{label}@{_fingerprint(model_dir, config)[:ID_HEX]}"


def checkpoint_fingerprint(model_dir: str | Path) -> str:
    """sha256 hex of config.json and sampled tensor bytes (see the module docstring).

    Raises FileNotFoundError for a missing config.json or weight file and ValueError for a
    malformed safetensors header or a tensor the index names that its shard lacks.
    """
    model_dir = Path(model_dir)
    return _fingerprint(model_dir, _read_config(model_dir))


def sample_offsets(nbytes: int) -> list[tuple[int, int]]:
    """(offset, length) of the windows hashed in a tensor of `nbytes` bytes."""
    if nbytes <= SAMPLES * SAMPLE_BYTES:
        return [(0, nbytes)]
    last = nbytes - SAMPLE_BYTES
    return [(i * last // (SAMPLES - 1), SAMPLE_BYTES) for i in range(SAMPLES)]


def _fingerprint(model_dir: Path, config: dict[str, Any]) -> str:
    digests: dict[str, bytes] = {}
    for path, names in weight_files(model_dir).items():
        digests.update(_tensor_digests(path, names))
    h = hashlib.sha256(FORMAT)
    h.update(_canonical(config))
    for name in sorted(digests):
        h.update(_canonical(name))
        h.update(digests[name])
    return h.hexdigest()


def _tensor_digests(path: Path, names: list[str]) -> dict[str, bytes]:
    with open(path, "rb") as f:
        header, data_start = _read_header(f, path)
        digests = {}
        for name in names:
            entry = header.get(name)
            if not isinstance(entry, dict):
                raise ValueError(f"weights: {name!r} is listed for {path.name} but missing from it")
            try:
                begin, end = (int(x) for x in entry["data_offsets"])
                meta = _canonical([str(entry["dtype"]), [int(d) for d in entry["shape"]]])
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"weights: {path.name} has a malformed header entry for "
                                 f"{name!r}: {e!r}") from e
            if not 0 <= begin <= end:
                raise ValueError(f"weights: {path.name} gives {name!r} offsets {begin}..{end}")
            h = hashlib.sha256(meta)
            for offset, length in sample_offsets(end - begin):
                f.seek(data_start + begin + offset)
                chunk = f.read(length)
                if len(chunk) != length:
                    raise ValueError(f"weights: {path.name} ends inside tensor {name!r}")
                h.update(chunk)
            digests[name] = h.digest()
        return digests


def _read_header(f: BinaryIO, path: Path) -> tuple[dict[str, Any], int]:
    """The safetensors header (tensor name → dtype, shape, data_offsets) and where data starts."""
    prefix = f.read(8)  # little-endian u64: the header's length in bytes
    if len(prefix) != 8:
        raise ValueError(f"weights: {path} is too short for a safetensors file")
    (size,) = struct.unpack("<Q", prefix)
    if size > MAX_HEADER_BYTES:
        raise ValueError(f"weights: {path} has a malformed safetensors header ({size} bytes)")
    try:
        header = json.loads(f.read(size))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"weights: {path} has a malformed safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise ValueError(f"weights: {path} has a malformed safetensors header")
    return header, 8 + size


def _read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"model: no config.json in {model_dir}")
    config = json.loads(path.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"model: {path} is not a JSON object")
    return config


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
