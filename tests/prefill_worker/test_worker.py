"""The prefill worker's push: one write per completed layer group of each step, the last one
marked `last`, with a real engine and a stand-in agent that copies what each write names
between two caches (the real transfers are tested in tests/kv_transfer and tests/e2e)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.engine_loop import EngineLoop
from engine.kv_cache import allocate_kv_cache, kv_layer
from engine.sampling import SamplingParams
from engine.tiny_model import make_tiny_model
from prefill_worker.worker import PrefillWorker, PushPlan

BS = 4


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "llama4", arch="llama", seed=4,
                           num_layers=4)


class CopyingAgent:
    """Records each write and copies its blocks from `source` into `target` right away."""

    def __init__(self, source: torch.Tensor, target: torch.Tensor) -> None:
        self.source, self.target = source, target  # [G, N, g, 2, bs, Hkv, D] each
        self.writes: list[tuple[range, list[int], bool]] = []

    def write(self, peer: str, request_id: str, src_blocks: Sequence[int],
              dst_blocks: Sequence[int], layers: range, *, last: bool,
              trace_context: str = "") -> int:
        for layer in layers:
            kv_layer(self.target, layer)[list(dst_blocks)] = kv_layer(self.source, layer)[
                list(src_blocks)]
        self.writes.append((layers, list(dst_blocks), last))
        return len(self.writes)


@pytest.mark.parametrize(("layer_group", "group"), [(1, 1), (2, 2), (None, 4)])
def test_one_write_per_layer_group_and_chunk(four_layers: Path, layer_group: int | None,
                                             group: int) -> None:
    engine = Engine(four_layers, EngineConfig(num_blocks=32, block_size=BS,
                                              max_num_batched_tokens=16,
                                              kv_layer_group=layer_group))
    assert engine.cache_shape.layer_group == group  # None: auto, all 4 layers (tiny blocks)
    target = allocate_kv_cache(engine.cache_shape)
    agent = CopyingAgent(engine.runner.kv_cache, target)
    worker = PrefillWorker(EngineLoop(engine), agent, "prefill-test")  # type: ignore[arg-type]
    prompt = list(range(40, 77))  # 37 tokens: 10 blocks, 3 chunks of <= 16 tokens
    dst = [int(b) for b in np.random.default_rng(0).permutation(32)[:10]]
    worker.plans["r"] = PushPlan("peer", dst, "", next_block=0)
    engine.add_prefill_request("r", prompt, SamplingParams(max_tokens=1))
    while not engine.step(worker.on_layer_done):
        pass

    groups = [range(lo, lo + group) for lo in range(0, 4, group)]
    chunks = [dst[0:4], dst[4:8], dst[8:10]]  # the blocks each chunk completes
    assert agent.writes == [(layers, blocks, False) for blocks in chunks for layers in groups
                            ][:-1] + [(groups[-1], chunks[-1], True)]
    src = engine.block_manager.block_ids("r")
    assert torch.equal(target[:, dst], engine.runner.kv_cache[:, src])  # every layer arrived
    assert not target[:, dst].eq(0).all()
