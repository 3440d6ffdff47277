"""The aggregated engine end to end: greedy tokens identical to transformers `generate`, in the
dtype the checkpoint or the config says."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine, RequestOutput
from engine.model.llama import LlamaModel
from engine.model_runner import ModelRunner
from engine.request import FinishReason
from engine.sampling import SamplingParams
from engine.tiny_model import make_tiny_model
from kv_transfer.spec import KVLayoutSpec
from tests.engine.hf_reference import hf_greedy

NEW = 12
GREEDY = SamplingParams(max_tokens=NEW, ignore_eos=True)


def random_prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_staggered(engine: Engine, prompts: list[list[int]], arrive_at: list[int],
                  sampling: SamplingParams = GREEDY) -> dict[str, list[int]]:
    """Adds prompt i before step arrive_at[i]; runs until everything finishes."""
    results: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    step = 0
    while step <= max(arrive_at) or engine.has_unfinished():
        for i, when in enumerate(arrive_at):
            if when == step:
                engine.add_request(f"r{i}", prompts[i], sampling)
        for out in engine.step():
            results[out.request_id].extend(out.new_token_ids)
        step += 1
    return results


def make_engine(model_dir: Path, **overrides: object) -> Engine:
    config: dict[str, object] = dict(num_blocks=96, block_size=4, max_num_batched_tokens=48,
                                     max_num_seqs=8)
    config.update(overrides)
    return Engine(model_dir, EngineConfig(**config))  # type: ignore[arg-type]


@pytest.mark.parametrize("fixture,kernel", [("tiny_llama", True), ("tiny_qwen2", True),
                                            ("tiny_llama3_mha", True), ("tiny_llama", False)])
def test_staggered_batch_with_shared_prefixes_matches_transformers(
        fixture: str, kernel: bool, request: pytest.FixtureRequest) -> None:
    """Decode attention by the C++ CPU kernel, and (kernel off) by SDPA over the mirror."""
    model_dir = request.getfixturevalue(fixture)
    base = random_prompt(40, 0)
    prompts = [random_prompt(7, 1), base, base[:33] + random_prompt(5, 2),
               random_prompt(61, 3), base[:20], random_prompt(3, 4)]
    engine = make_engine(model_dir, cpu_kernels=kernel)
    free_at_start = engine.block_manager.num_free_blocks
    results = run_staggered(engine, prompts, arrive_at=[0, 0, 3, 5, 9, 9])
    for i, prompt in enumerate(prompts):
        assert results[f"r{i}"] == hf_greedy(model_dir, prompt, NEW), f"prompt {i}"
    assert engine.block_manager.num_free_blocks == free_at_start
    # 61 + 40 tokens need chunking under a 48-token budget; prefixes of `base` were reused
    assert engine.block_manager.stats.prefix_hit_tokens >= 32 + 16
    # kernel on: no step was mirrored; off: decode steps were
    assert (model_of(engine).decode_mirror.appended_rows > 0) is (not kernel)


def model_of(engine: Engine) -> LlamaModel:
    assert isinstance(engine.runner, ModelRunner)
    return engine.runner.model


def test_prefix_hit_skips_computation_and_keeps_tokens(tiny_llama: Path) -> None:
    engine = make_engine(tiny_llama)
    prompt = random_prompt(50, 5)
    first = engine.generate([prompt], GREEDY)[0]
    computed_once = engine.stats.prefill_tokens_computed
    second = engine.generate([prompt[:45] + [9, 9, 9]], GREEDY)[0]
    assert first == hf_greedy(tiny_llama, prompt, NEW)
    assert second == hf_greedy(tiny_llama, prompt[:45] + [9, 9, 9], NEW)
    assert computed_once == 50
    assert engine.stats.prefill_tokens_computed - computed_once == 48 - 44  # 11 blocks cached
    assert engine.block_manager.stats.prefix_hit_tokens == 44


def test_preemption_by_recompute_keeps_tokens_identical(tiny_llama: Path) -> None:
    prompts = [random_prompt(n, 10 + n) for n in (14, 9, 18, 11)]
    sampling = SamplingParams(max_tokens=24, ignore_eos=True)
    # 20 blocks of 4 tokens: four prompts fit, their growth does not
    engine = make_engine(tiny_llama, num_blocks=20, max_num_batched_tokens=64)
    results = run_staggered(engine, prompts, arrive_at=[0, 0, 0, 0], sampling=sampling)
    assert engine.stats.preemptions > 0
    for i, prompt in enumerate(prompts):
        assert results[f"r{i}"] == hf_greedy(tiny_llama, prompt, 24), f"prompt {i}"
    assert engine.block_manager.num_free_blocks == 20


def test_abort_midway_frees_every_block(tiny_llama: Path) -> None:
    engine = make_engine(tiny_llama)
    start = engine.block_manager.num_free_blocks
    for i in range(3):
        engine.add_request(f"a{i}", random_prompt(30 + i, 20 + i), GREEDY)
    engine.add_request("waiting", random_prompt(200, 30), GREEDY)  # cannot be admitted yet
    engine.step()
    engine.step()
    assert engine.block_manager.num_free_blocks < start
    for rid in ("a0", "a1", "a2", "waiting"):
        assert engine.abort(rid)
    assert not engine.abort("a0")
    assert not engine.has_unfinished()
    assert engine.block_manager.num_free_blocks == start


def test_stop_tokens_and_max_tokens_finish(tiny_llama: Path) -> None:
    engine = make_engine(tiny_llama)
    prompt = random_prompt(10, 40)
    expected = hf_greedy(tiny_llama, prompt, NEW)
    stop_at = expected[4]
    first_stop = expected.index(stop_at)
    engine.add_request("s", prompt, SamplingParams(max_tokens=NEW, stop_token_ids=(stop_at,),
                                                   ignore_eos=True))
    outputs: list[RequestOutput] = []
    while engine.has_unfinished():
        outputs += engine.step()
    tokens = [t for o in outputs for t in o.new_token_ids]
    assert tokens == expected[:first_stop + 1]
    assert outputs[-1].finished and outputs[-1].finish_reason is FinishReason.STOP
    engine.add_request("m", prompt, SamplingParams(max_tokens=3, ignore_eos=True))
    last = [o for _ in range(5) for o in engine.step()][-1]
    assert last.finish_reason is FinishReason.LENGTH


def test_seeded_sampling_is_reproducible_whatever_the_batch(tiny_llama: Path) -> None:
    sampling = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, top_k=50, seed=1234,
                              ignore_eos=True)
    prompt = random_prompt(12, 50)
    alone = make_engine(tiny_llama).generate([prompt], sampling)[0]
    crowd = make_engine(tiny_llama).generate(
        [random_prompt(20, 51), prompt, random_prompt(5, 52)],
        SamplingParams(max_tokens=10, temperature=1.0, seed=None, ignore_eos=True))
    del crowd
    engine = make_engine(tiny_llama)
    engine.add_request("other", random_prompt(20, 53),
                       SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True))
    engine.add_request("seeded", prompt, sampling)
    got: list[int] = []
    while engine.has_unfinished():
        got += [t for o in engine.step() if o.request_id == "seeded" for t in o.new_token_ids]
    assert got == alone
    assert got != hf_greedy(tiny_llama, prompt, 10)  # it really sampled


def test_a_seeded_request_resumed_with_its_tokens_continues_its_stream(
        tiny_llama: Path) -> None:
    """What a migrated request relies on: prompt + the first n tokens, with seed_offset n,
    samples exactly the rest of the undisturbed run."""
    sampling = SamplingParams(max_tokens=12, temperature=1.0, seed=99, ignore_eos=True)
    prompt = random_prompt(9, 60)
    engine = make_engine(tiny_llama)
    whole = engine.generate([prompt], sampling)[0]
    for n in (1, 5):
        resumed = SamplingParams(max_tokens=12 - n, temperature=1.0, seed=99, ignore_eos=True,
                                 seed_offset=n)
        assert engine.generate([prompt + whole[:n]], resumed)[0] == whole[n:], n
    assert whole != hf_greedy(tiny_llama, prompt, 12)  # it really sampled


def test_bfloat16_engine_runs_and_mostly_agrees(tiny_llama: Path) -> None:
    prompt = random_prompt(25, 60)
    tokens = make_engine(tiny_llama, dtype="bfloat16").generate([prompt], GREEDY)[0]
    assert len(tokens) == NEW
    assert tokens[:2] == hf_greedy(tiny_llama, prompt, NEW)[:2]


def _with_config(src: Path, dst: Path, **fields: object) -> Path:
    """A copy of a checkpoint with config.json fields replaced (None: removed)."""
    model_dir = Path(shutil.copytree(src, dst))
    raw = json.loads((model_dir / "config.json").read_text())
    raw.update(fields)
    raw = {k: v for k, v in raw.items() if v is not None}
    (model_dir / "config.json").write_text(json.dumps(raw))
    return model_dir


def test_engine_runs_in_the_checkpoints_dtype_unless_configured(
        tiny_llama: Path, tmp_path: Path) -> None:
    bf16 = make_tiny_model(tmp_path / "bf16", seed=1, dtype="bfloat16")
    undeclared = _with_config(tiny_llama, tmp_path / "undeclared", torch_dtype=None)
    v5 = _with_config(bf16, tmp_path / "v5", torch_dtype=None, dtype="bfloat16")
    for model_dir, configured, expected in [
        (bf16, None, torch.bfloat16), (v5, None, torch.bfloat16),
        (bf16, "float32", torch.float32), (tiny_llama, None, torch.float32),
        (undeclared, None, torch.float32), (tiny_llama, "bfloat16", torch.bfloat16),
    ]:
        engine = make_engine(model_dir, dtype=configured)
        assert engine.dtype == expected, (model_dir.name, configured)
        assert engine.cache_shape.dtype == engine.runner.kv_cache.dtype == expected
        assert model_of(engine).dtype == expected
        spec = KVLayoutSpec.from_cache_shape(engine.cache_shape, engine.model_id)
        assert spec.dtype == str(expected).removeprefix("torch.")
    prompt = random_prompt(25, 61)  # a bf16 checkpoint run as is mostly agrees with float32
    tokens = make_engine(bf16).generate([prompt], GREEDY)[0]
    assert tokens[:2] == make_engine(bf16, dtype="float32").generate([prompt], GREEDY)[0][:2]


def test_a_checkpoint_dtype_the_engine_cannot_run_is_named(tiny_llama: Path,
                                                          tmp_path: Path) -> None:
    fp8 = _with_config(tiny_llama, tmp_path / "fp8", torch_dtype="float8_e4m3fn")
    with pytest.raises(ValueError, match="^dtype: the checkpoint's dtype 'float8_e4m3fn'"):
        make_engine(fp8)
    assert make_engine(fp8, dtype="float32").dtype == torch.float32


def test_decode_mirror_off_gives_the_same_tokens(tiny_llama: Path) -> None:
    """The CPU decode mirror is only a copy of the cache: on or off, and the C++ kernel that reads
    the cache itself instead, the same greedy tokens."""
    prompts = [random_prompt(n, 20 + n) for n in (5, 18, 31)]
    on = make_engine(tiny_llama, cpu_kernels=False)
    off = make_engine(tiny_llama, cpu_kernels=False, decode_mirror_bytes=0)
    kernel = make_engine(tiny_llama)
    assert on.generate(prompts, GREEDY) == off.generate(prompts, GREEDY) == \
        kernel.generate(prompts, GREEDY)
    assert model_of(on).decode_mirror.appended_rows > 0
    assert model_of(off).decode_mirror.gathered_rows == 0
