"""Where Tandem keeps the models it converts: the default model's folder.

(Minimal on this branch: the set-up that installs and converts SmolLM2-135M-Instruct lives
beside it on the `smollm2` branch, with the same two functions.)
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
