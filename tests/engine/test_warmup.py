"""Warm-up: on the torch path only the C++ CPU kernels are built (nothing on CUDA, nothing
with the kernel off); on the Triton path (interpreted on the CPU, compiled
with TANDEM_TEST_DEVICE=cuda) it runs both kernel variants on the real cache and leaves the
engine as it found it: every block free, no block event, no prefix-cache entry, correct
output after it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from engine.config import EngineConfig
from engine.engine import Engine
from engine.engine_loop import build_engine
from engine.kernels import BACKEND_ENV, cpu_ops
from engine.kernels.attention import _paged_attention_kernel
from engine.sampling import SamplingParams
from engine.warmup import warm_up
from tests.engine.hf_reference import hf_greedy
from tests.support.device import device_under_test

GREEDY = SamplingParams(max_tokens=3, ignore_eos=True)


def config() -> EngineConfig:
    return EngineConfig(num_blocks=8, block_size=4, kv_layer_group=2,
                        device=str(device_under_test()))


def test_torch_path_builds_only_the_cpu_kernels(
        tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BACKEND_ENV, "torch")
    engine = Engine(tiny_llama, config())
    if engine.device.type == "cpu":
        assert warm_up(engine) is not None and cpu_ops.available()
    else:
        assert warm_up(engine) is None
    assert engine.stats.steps == 0
    assert engine.block_manager.num_free_blocks == engine.num_blocks
    off = Engine(tiny_llama, dataclasses.replace(config(), cpu_kernels=False))
    assert warm_up(off) is None


def test_triton_warm_up_leaves_every_block_free_and_serves(
        tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BACKEND_ENV, "triton")
    launched: list[int] = []
    run = _paged_attention_kernel.run

    def counted(*args: Any, **kwargs: Any) -> Any:  # the real launch, counted
        launched.append(1)
        return run(*args, **kwargs)

    monkeypatch.setattr(_paged_attention_kernel, "run", counted)
    engine = build_engine(tiny_llama, config())  # warms up, as a worker starts
    assert len(launched) == 2 * engine.model_config.num_layers  # prefill + decode, every layer
    bm = engine.block_manager
    assert bm.num_free_blocks == engine.num_blocks and bm.drain_events() == []
    assert engine.stats.steps == 0 and engine.num_requests() == 0
    prompt = [5, 17, 99, 3, 250, 8, 41]
    assert engine.generate([prompt], GREEDY) == [hf_greedy(tiny_llama, prompt, 3)]
    assert bm.stats.prefix_hit_tokens == 0  # the warm-up's dummy tokens were never cached
    assert bm.num_free_blocks == engine.num_blocks
    with pytest.raises(RuntimeError, match="^warm_up: the engine already holds blocks"):
        engine.add_request("held", prompt, GREEDY)
        engine.step()
        warm_up(engine)
