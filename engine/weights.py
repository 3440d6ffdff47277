"""Reading a local Hugging Face checkpoint's tensors from safetensors files.

Two layouts: one `model.safetensors`, or shards `model-0000i-of-0000n.safetensors` listed by
`model.safetensors.index.json` (`weight_map`: tensor name → shard file). Tensors are read one
at a time through `safetensors.safe_open` (memory-mapped), so a checkpoint larger than RAM can
be streamed into the model shard by shard. Names are returned as HF writes them; mapping them
onto our modules is the model's job.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """`"bfloat16"` → `torch.bfloat16`; accepts the three dtypes the engine runs in."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype: {dtype} is not supported (supported: {', '.join(DTYPES)})")
        return dtype
    name = dtype.removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not supported (supported: {', '.join(DTYPES)})")
    return DTYPES[name]


def resolve_dtype(configured: str | None, checkpoint: str | None) -> torch.dtype:
    """The dtype an engine runs a checkpoint in: `configured` when given, else the checkpoint's
    own (config.json's `torch_dtype` / `dtype`: `ModelConfig.dtype`), else float32.

    Raises ValueError naming `dtype` when the checkpoint's dtype is one the engine cannot run
    (e.g. float8): then `dtype` must be configured.
    """
    if configured is not None:
        return parse_dtype(configured)
    if checkpoint is None:
        return torch.float32
    name = checkpoint.removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype: the checkpoint's dtype {checkpoint!r} (config.json) is not one "
                         f"the engine runs; set dtype to one of {', '.join(DTYPES)}")
    return DTYPES[name]


def weight_files(model_dir: str | Path) -> dict[Path, list[str]]:
    """Each safetensors file of the checkpoint → the tensor names it holds, in shard order.

    Raises FileNotFoundError naming the missing file (no weights at all, or a shard named by
    the index that is not on disk) and ValueError for a malformed index.
    """
    model_dir = Path(model_dir)
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        return _read_index(model_dir, index_path)
    single = model_dir / SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {single: list(f.keys())}
    raise FileNotFoundError(f"weights: neither {SINGLE_FILE} nor {INDEX_FILE} in {model_dir}")


def iter_weights(
    model_dir: str | Path, dtype: str | torch.dtype = torch.float32
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields `(hf_name, tensor)` for every tensor of the checkpoint, cast to `dtype`, on CPU.

    Only one tensor (plus its cast copy) is materialized at a time; the files are mmapped.
    """
    target = parse_dtype(dtype)
    for path, names in weight_files(model_dir).items():
        with safe_open(str(path), framework="pt") as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise ValueError(f"weights: {name!r} is listed in {INDEX_FILE} "
                                     f"but missing from {path.name}")
                yield name, f.get_tensor(name).to(target)


def load_state_dict(
    model_dir: str | Path, dtype: str | torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """All tensors in one dict: for small models and tests (big ones should `iter_weights`)."""
    return dict(iter_weights(model_dir, dtype))


def check_model_dir(model_dir: str | Path) -> None:
    """Verifies a model directory has config.json, its weights and tokenizer.json.

    Raises FileNotFoundError that names every missing piece (and the directory).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model: {model_dir} is not a directory")
    missing = [name for name in ("config.json", "tokenizer.json")
               if not (model_dir / name).is_file()]
    try:
        weight_files(model_dir)
    except FileNotFoundError as e:
        missing.append(str(e).removeprefix("weights: "))
    if missing:
        raise FileNotFoundError(f"model: {model_dir} is missing: {'; '.join(missing)}")


def _read_index(model_dir: Path, index_path: Path) -> dict[Path, list[str]]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"weights: {index_path} has no valid 'weight_map': {e}") from e
    files: dict[Path, list[str]] = {}
    for name, file_name in weight_map.items():
        files.setdefault(model_dir / file_name, []).append(name)
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"weights: shard {path.name} (named by {INDEX_FILE}) "
                                    f"is missing from {model_dir}")
    return dict(sorted(files.items()))
