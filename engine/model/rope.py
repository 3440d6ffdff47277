"""Rotary position embeddings, with Llama-3 frequency scaling, computed as Hugging Face does."""

from __future__ import annotations

import math

import torch

from engine.model_config import ModelConfig, RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Per-pair rotation frequencies, [head_dim // 2] float32."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim  # [D/2]
    inv_freq = 1.0 / (theta ** exponents)  # [D/2]
    if scaling is None:
        return inv_freq
    # Llama 3: long wavelengths are slowed by `factor`, short ones kept, the band between
    # interpolated smoothly.
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq  # [D/2]
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)  # [D/2]
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled  # [D/2]
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def cos_sin_cache(config: ModelConfig, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin for every position, each [max_positions, head_dim] float32.

    The sin table's first half is negated (see `apply_rope`); cos is Hugging Face's.
    """
    inv_freq = inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    positions = torch.arange(max_positions, dtype=torch.float32)  # [P]
    freqs = positions[:, None] * inv_freq[None, :]  # [P, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
    signs = torch.cat((-torch.ones_like(inv_freq), torch.ones_like(inv_freq)))  # [D]
    return emb.cos(), emb.sin() * signs


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotates x [T, H, D] by the angles of its rows' positions (cos, signed_sin: [T, 1, D]).

    Hugging Face computes `x * cos + cat(-x2, x1) * sin`: per half `x1 c - x2 s` and
    `x2 c + x1 s`. Here that is three ops and one new tensor: `x * cos`, then each half
    accumulates the other half times its part of `signed_sin` (whose first half is -sin) in
    place (`addcmul_`), without materializing the rotated copy or the products. A product and
    its sum are rounded once (HF rounds each): within an ulp of HF's result in float32, within
    one rounding step in bfloat16.
    """
    half = x.shape[-1] // 2
    out = x * cos  # [T, H, D]
    out[..., :half].addcmul_(x[..., half:], signed_sin[..., :half])  # x1 c - x2 s
    out[..., half:].addcmul_(x[..., :half], signed_sin[..., half:])  # x2 c + x1 s
    return out
