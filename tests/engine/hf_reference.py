"""The referee: Hugging Face transformers on the same generated weights (tests only)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
import transformers
from transformers import GenerationConfig


@lru_cache(maxsize=8)
def hf_model(model_dir: Path, dtype: torch.dtype = torch.float32) -> transformers.PreTrainedModel:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return model.eval()


def hf_greedy(model_dir: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers `generate`, greedy, never stopping early (no EOS).

    `eos_token_id=[]`, not None: None lets transformers take the checkpoint's EOS, and then
    `min_new_tokens` would mask it out of the logits: not greedy wherever EOS is the argmax.
    """
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                              eos_token_id=[], pad_token_id=0)
    with torch.inference_mode():
        model = hf_model(model_dir)
        out = model.generate(torch.tensor([prompt]), generation_config=config)  # type: ignore[operator]
    return out[0, len(prompt):].tolist()


def hf_logits(model_dir: Path, prompt: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Logits for every position of the prompt, [len, V] float32."""
    with torch.inference_mode():
        return hf_model(model_dir, dtype)(torch.tensor([prompt])).logits[0].float()
