"""The simulated engine: its steps last what its cost model says (a fake clock), its tokens
repeat, and it frees every block, cancels included."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling import SamplingParams
from engine.sim.cost_model import SimCostModel
from engine.sim.runner import SimRunner, sim_token

COST = SimCostModel(sim_step_s=0.003, sim_prefill_token_s=0.0002, sim_decode_seq_s=0.0005,
                    sim_decode_context_token_s=0.00001)


class FakeClock:
    """Time that moves only when slept on."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def sim_engine(model: Path, clock: FakeClock | None = None, **overrides: object) -> Engine:
    config = EngineConfig(engine="sim", num_blocks=64, block_size=4, sim=COST,
                          max_num_batched_tokens=64)
    engine = Engine(model, dataclasses.replace(config, **overrides))  # type: ignore[arg-type]
    if clock is not None:
        assert isinstance(engine.runner, SimRunner)
        engine.runner.clock, engine.runner.sleep = clock.clock, clock.sleep
    return engine


def test_cost_model_formula() -> None:
    assert COST.step_seconds(0, 0, 0) == pytest.approx(0.003)
    assert COST.step_seconds(100, 0, 0) == pytest.approx(0.003 + 100 * 0.0002)
    assert COST.step_seconds(0, 8, 800) == pytest.approx(0.003 + 8 * 0.0005 + 800 * 0.00001)
    with pytest.raises(ValueError, match="sim_prefill_token_s"):
        SimCostModel(sim_prefill_token_s=-1.0)
    with pytest.raises(ValueError, match="sim_eos_probability"):
        SimCostModel(sim_eos_probability=1.5)


def test_steps_take_the_modelled_time(tiny_llama: Path) -> None:
    clock = FakeClock()
    engine = sim_engine(tiny_llama, clock)
    engine.add_request("a", list(range(1, 21)), SamplingParams(max_tokens=3))
    engine.add_request("b", list(range(30, 40)), SamplingParams(max_tokens=3))
    start = clock.now
    engine.step()  # both prompts in one step: 30 prompt tokens
    assert clock.now - start == pytest.approx(COST.step_seconds(30, 0, 0))
    start = clock.now
    engine.step()  # both decode one token: contexts of 21 and 11 tokens
    assert clock.now - start == pytest.approx(COST.step_seconds(0, 2, 21 + 11))
    assert engine.last_step is not None and engine.last_step.decode_seqs == 2


def test_a_slow_caller_is_not_charged_twice(tiny_llama: Path) -> None:
    """Time already spent in the step counts against its budget: only the rest is slept."""
    clock = FakeClock()
    engine = sim_engine(tiny_llama, clock)
    runner = engine.runner
    assert isinstance(runner, SimRunner)
    real_clock = clock.clock
    calls = iter([0.0, 0.002])  # the step began at 0; 2 ms have passed at the layer's wait
    runner.clock = lambda: next(calls, real_clock())
    engine.add_request("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=1))
    engine.step()
    assert clock.slept == [pytest.approx(COST.step_seconds(5, 0, 0) - 0.002)]


def test_tokens_repeat_and_avoid_eos(tiny_llama: Path) -> None:
    first = sim_engine(tiny_llama).generate([[5, 6, 7, 8, 9]], SamplingParams(max_tokens=12))
    second = sim_engine(tiny_llama, block_size=8).generate([[5, 6, 7, 8, 9]],
                                                           SamplingParams(max_tokens=12))
    assert first == second and len(first[0]) == 12  # no EOS: runs to max_tokens
    eos = set(Engine(tiny_llama, EngineConfig(engine="sim", num_blocks=8)).model_config
              .eos_token_ids)
    assert not eos & set(first[0])
    assert sim_token([1, 2, 3], 10, {0, 1, 2, 3, 4, 5, 6, 7, 8}) == 9
    assert sim_token([1, 2, 3], 10, {7}, eos_probability=1.0) == 7


def test_eos_when_asked(tiny_llama: Path) -> None:
    cost = dataclasses.replace(COST, sim_eos_probability=1.0)
    engine = sim_engine(tiny_llama, FakeClock(), sim=cost)
    out = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=10))
    assert len(out[0]) == 1 and out[0][0] in engine.model_config.eos_token_ids


def test_no_block_leaks_after_cancels(tiny_llama: Path) -> None:
    engine = sim_engine(tiny_llama, FakeClock())
    total = engine.block_manager.num_free_blocks
    for i in range(6):
        engine.add_request(f"r{i}", list(range(1 + i, 14 + i)), SamplingParams(max_tokens=8))
    engine.reserve("reserved", list(range(50, 60)))
    for _ in range(3):
        engine.step()
    assert engine.release("r1") and engine.release("r4") and engine.release("reserved")
    engine.add_prefill_request("held", list(range(70, 80)))
    while engine.has_unfinished():
        engine.step()
    assert engine.release("held")
    assert engine.num_requests() == 0
    assert engine.block_manager.num_free_blocks == total


def test_sim_reads_no_weights(tiny_llama: Path, tmp_path: Path) -> None:
    """Only config.json is needed; the sim's KV layout is its own, never the model's."""
    (tmp_path / "config.json").write_bytes((tiny_llama / "config.json").read_bytes())
    engine = Engine(tmp_path, EngineConfig(engine="sim", num_blocks=16))
    assert engine.model_id.startswith("sim:")
    assert engine.cache_shape.num_layers == 1
    assert tuple(engine.runner.kv_cache.shape) == engine.cache_shape.dims
    with pytest.raises(ValueError, match="engine"):
        EngineConfig(engine="fake")  # type: ignore[arg-type]
