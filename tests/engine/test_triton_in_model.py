"""The Triton kernels inside the model and the engine (`TANDEM_ATTENTION_BACKEND=triton`),
against the torch path and transformers, in a layer-grouped cache (g = 2: a layer's blocks lie
g block-sizes apart, not one).

On the CPU the kernels run under `TRITON_INTERPRET=1` (tests/conftest.py), about a thousand
times slower than compiled, so the shapes are tiny; with `TANDEM_TEST_DEVICE=cuda` the same
tests run the compiled kernels (scripts/gpu_check.sh).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.forward_batch import ForwardBatch
from engine.kernels import BACKEND_ENV
from engine.kernels.backend import select_backend
from engine.kv_cache import CacheShape, allocate_kv_cache, kv_layer
from engine.model.llama import LlamaModel
from engine.model_config import ModelConfig
from engine.sampling import SamplingParams
from engine.weights import iter_weights
from tests.engine.hf_reference import hf_greedy, hf_logits
from tests.support.device import device_under_test

BLOCK = 4


def prefill_logits(model_dir: Path, prompt: list[int], device: torch.device) -> torch.Tensor:
    """Logits [n, V] of a prompt prefilled into reversed, scattered blocks of a g = 2 cache."""
    config = ModelConfig.from_dir(model_dir)
    model = LlamaModel(config, torch.float32, max_positions=64)
    model.load_weights(iter_weights(model_dir, torch.float32))
    model.to(device)
    n = len(prompt)
    num_blocks = -(-n // BLOCK)
    blocks = list(range(2 * num_blocks - 1, -1, -2))  # reversed, with holes
    cache = allocate_kv_cache(CacheShape(config.num_layers, 2 * num_blocks, BLOCK,
                                         config.num_kv_heads, config.head_dim, torch.float32,
                                         layer_group=2), device)  # [1, N, 2, 2, bs, Hkv, D]
    layer0 = kv_layer(cache, 0)  # [N, 2, bs, Hkv, D]
    assert layer0.stride(0) == 2 * layer0[0].numel()  # uneven: g = 2 runs per block
    slots = [blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(n)]
    batch = ForwardBatch(
        input_ids=torch.tensor(prompt, device=device),  # [T]
        positions=torch.arange(n, device=device),  # [T]
        slot_mapping=torch.tensor(slots, device=device),  # [T]
        block_tables=torch.tensor([blocks], dtype=torch.int32, device=device),  # [1, nb]
        query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=device),  # [2]
        seq_lens=torch.tensor([n], dtype=torch.int32, device=device),  # [1]
        max_query_len=n, max_seq_len=n, logits_indices=torch.arange(n, device=device))
    return model(batch, cache).cpu()  # [n, V]


def test_model_with_triton_kernels_matches_torch_and_transformers(
        tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    device = device_under_test()
    prompt = torch.randint(3, 500, (11,), generator=torch.Generator().manual_seed(0)).tolist()
    monkeypatch.setenv(BACKEND_ENV, "triton")
    assert select_backend(torch.empty(0, device=device)) == "triton"
    triton = prefill_logits(tiny_llama, prompt, device)
    monkeypatch.setenv(BACKEND_ENV, "torch")
    torch_path = prefill_logits(tiny_llama, prompt, device)
    torch.testing.assert_close(triton, torch_path, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(triton, hf_logits(tiny_llama, prompt, torch.float32),
                               atol=2e-4, rtol=1e-4)


def test_engine_with_triton_kernels_matches_transformers(
        tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill, a prefix-cache hit (a prompt over cached blocks) and batched decode steps, all
    through the Triton kernels, in a g = 2 cache."""
    monkeypatch.setenv(BACKEND_ENV, "triton")
    engine = Engine(tiny_llama, EngineConfig(num_blocks=12, block_size=BLOCK, kv_layer_group=2,
                                             device=str(device_under_test())))
    assert engine.cache_shape.layer_group == 2
    assert select_backend(engine.runner.kv_cache) == "triton"  # what every layer's step picks
    base = torch.randint(3, 500, (9,), generator=torch.Generator().manual_seed(1)).tolist()
    prompts = [base, base[:8] + [7, 8]]
    greedy = SamplingParams(max_tokens=3, ignore_eos=True)
    [first] = engine.generate([prompts[0]], greedy)
    [second] = engine.generate([prompts[1]], greedy)  # its first 8 tokens are cached
    assert engine.block_manager.stats.prefix_hit_tokens >= 8
    assert first == hf_greedy(tiny_llama, prompts[0], 3)
    assert second == hf_greedy(tiny_llama, prompts[1], 3)
    assert engine.block_manager.num_free_blocks == engine.num_blocks
