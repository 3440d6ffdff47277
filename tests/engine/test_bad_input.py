"""Bad requests get a ValueError naming the field, and the engine keeps serving others."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling import SamplingParams
from tests.engine.hf_reference import hf_greedy


@pytest.fixture(scope="module")
def engine(tiny_llama: Path) -> Engine:
    return Engine(tiny_llama, EngineConfig(num_blocks=24, block_size=4, max_model_len=128))


@pytest.mark.parametrize(("prompt", "sampling", "field"), [
    ([], {}, "prompt_token_ids"),
    (list(range(3, 131)), {}, "prompt_token_ids"),  # 128 tokens: no room in a 128 context
    ([5, 6, 99999], {}, "prompt_token_ids"),
    ([5, -1], {}, "prompt_token_ids"),
    ([5, 6], {"stop_token_ids": (100000,)}, "stop_token_ids"),
    ([5, 6], {"max_tokens": 10_000}, "max_tokens"),  # more than the cache could ever hold
])
def test_invalid_requests_name_the_field(engine: Engine, prompt: list[int],
                                         sampling: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        engine.add_request("bad", prompt, SamplingParams(**sampling))  # type: ignore[arg-type]
    assert not engine.has_unfinished()


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"max_tokens": 0}, "max_tokens"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_k": -2}, "top_k"),
    ({"seed": -1}, "seed"),
])
def test_invalid_sampling_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_engine_keeps_serving_after_bad_input(engine: Engine, tiny_llama: Path) -> None:
    free = engine.block_manager.num_free_blocks
    engine.add_request("good", [5, 6, 7, 8, 9], SamplingParams(max_tokens=6, ignore_eos=True))
    with pytest.raises(ValueError, match="^request_id:"):
        engine.add_request("good", [5, 6], SamplingParams())
    with pytest.raises(ValueError, match="^prompt_token_ids:"):
        engine.add_request("bad", [], SamplingParams())
    tokens: list[int] = []
    while engine.has_unfinished():
        tokens += [t for o in engine.step() for t in o.new_token_ids]
    assert tokens == hf_greedy(tiny_llama, [5, 6, 7, 8, 9], 6)
    assert engine.block_manager.num_free_blocks == free


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"dtype": "int8"}, "dtype"), ({"block_size": 12}, "block_size"),
    ({"num_blocks": 0}, "num_blocks"), ({"kv_cache_fraction": 0.0}, "kv_cache_fraction"),
    ({"max_num_seqs": 0}, "max_num_seqs"), ({"kv_layer_group": 0}, "kv_layer_group"),
    ({"decode_mirror_bytes": -1}, "decode_mirror_bytes"),
])
def test_invalid_config_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        EngineConfig(**kwargs)  # type: ignore[arg-type]


def test_missing_model_files_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        Engine(tmp_path, EngineConfig(num_blocks=4))
