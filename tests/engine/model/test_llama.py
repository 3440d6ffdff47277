"""Our Llama/Qwen2 forward pass against transformers on the same generated weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.forward_batch import ForwardBatch
from engine.kv_cache import CacheShape, allocate_kv_cache
from engine.model.llama import DecoderLayer, LlamaModel
from engine.model_config import ModelConfig
from engine.weights import iter_weights
from tests.engine.hf_reference import hf_logits

BLOCK = 4


def our_logits(model_dir: Path, prompt: list[int], dtype: torch.dtype,
               compute: torch.dtype | None = None, packed: bool = False) -> torch.Tensor:
    """Logits for every prompt position, prefilling into scattered cache blocks."""
    config = ModelConfig.from_dir(model_dir)
    model = LlamaModel(config, dtype, max_positions=config.max_position_embeddings)
    model.load_weights(iter_weights(model_dir, dtype))
    if compute is not None:
        model.use_compute_dtype(compute)
    if packed:
        model.prepack()
    n = len(prompt)
    num_blocks = -(-n // BLOCK)
    blocks = list(range(2 * num_blocks - 1, -1, -2))  # reversed, with holes
    cache = allocate_kv_cache(CacheShape(config.num_layers, 2 * num_blocks, BLOCK,
                                         config.num_kv_heads, config.head_dim, dtype,
                                         layer_group=config.num_layers))
    slots = [blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(n)]
    batch = ForwardBatch(
        input_ids=torch.tensor(prompt), positions=torch.arange(n),
        slot_mapping=torch.tensor(slots), block_tables=torch.tensor([blocks], dtype=torch.int32),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        seq_lens=torch.tensor([n], dtype=torch.int32), max_query_len=n, max_seq_len=n,
        logits_indices=torch.arange(n))
    return model(batch, cache)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2", "tiny_llama3_mha"])
def test_logits_match_transformers_float32(fixture: str, packed: bool,
                                           request: pytest.FixtureRequest) -> None:
    """Plain weights, and weights prepacked for oneDNN (what the CPU engine runs)."""
    model_dir = request.getfixturevalue(fixture)
    prompt = torch.randint(3, 500, (37,), generator=torch.Generator().manual_seed(0)).tolist()
    ours = our_logits(model_dir, prompt, torch.float32, packed=packed)
    ref = hf_logits(model_dir, prompt, torch.float32)
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("compute", [None, torch.float32])
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_logits_match_transformers_bfloat16(fixture: str, compute: torch.dtype | None,
                                            packed: bool, request: pytest.FixtureRequest) -> None:
    """bf16 computed in bf16, and in float32 over a bf16 cache (CPUs without bf16 matmuls);
    plain and prepacked weights."""
    model_dir = request.getfixturevalue(fixture)
    prompt = torch.randint(3, 500, (29,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = our_logits(model_dir, prompt, torch.bfloat16, compute, packed)
    ref = hf_logits(model_dir, prompt, torch.float32)
    scale = ref.abs().max().item()
    # bf16 keeps 8 bits of mantissa: compare against fp32 within a few percent of the range
    assert (ours - ref).abs().max().item() < 0.05 * scale
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.9


def test_unknown_and_missing_weights_are_named(tiny_llama: Path) -> None:
    config = ModelConfig.from_dir(tiny_llama)
    model = LlamaModel(config, torch.float32, max_positions=64)
    weights = dict(iter_weights(tiny_llama))
    with pytest.raises(ValueError, match="unexpected tensor 'model.extra.weight'"):
        model.load_weights([*weights.items(), ("model.extra.weight", torch.zeros(1))])
    del weights["model.norm.weight"]
    with pytest.raises(ValueError, match=r"missing tensors \['model.norm.weight'\]"):
        model.load_weights(weights.items())


def test_float32_compute_keeps_bf16_weight_values(tiny_llama: Path) -> None:
    config = ModelConfig.from_dir(tiny_llama)
    model = LlamaModel(config, torch.bfloat16, max_positions=64)
    model.load_weights(iter_weights(tiny_llama, torch.bfloat16))
    layer = model.layers[0]
    assert isinstance(layer, DecoderLayer)
    before = layer.qkv_weight.clone()
    model.use_compute_dtype(torch.float32)
    after = layer.qkv_weight
    assert after.dtype == torch.float32 and model.dtype == torch.bfloat16
    assert torch.equal(after, before.float())


def test_prepack_drops_the_plain_weights(tiny_llama3_mha: Path) -> None:
    """Packed weights replace the plain ones (no second copy); a tied head keeps its embedding
    for lookups; the dtype cannot change afterwards."""
    config = ModelConfig.from_dir(tiny_llama3_mha)
    model = LlamaModel(config, torch.float32, max_positions=64)
    model.load_weights(iter_weights(tiny_llama3_mha))
    model.prepack()
    layer = model.layers[0]
    assert isinstance(layer, DecoderLayer)
    assert all(getattr(layer, n).is_mkldnn
               for n in ("qkv_weight", "o_weight", "gate_weight", "up_weight", "down_weight"))
    assert layer.gate_up_weight is None  # split into the packed gate and up halves
    assert model.lm_head.is_mkldnn and not model.embed.is_mkldnn
    assert not any(p.is_mkldnn for p in model.parameters())
    with pytest.raises(RuntimeError, match="use_compute_dtype"):
        model.use_compute_dtype(torch.bfloat16)
    with pytest.raises(RuntimeError, match="before prepack"):
        model.load_weights(iter_weights(tiny_llama3_mha))
