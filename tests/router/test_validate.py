"""Request checks before routing: the id alphabet, the text size bound, tokenizing off the loop."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cluster.errors import InvalidRequest
from engine.model_config import ModelConfig
from engine.sampling import SamplingParams
from engine.tokenizer import Tokenizer
from router.request import GenerateInput
from router.validate import PromptValidator, check_request_id


@pytest.fixture(scope="module")
def validator(tiny_llama: Path) -> PromptValidator:
    return PromptValidator(Tokenizer.from_dir(tiny_llama), ModelConfig.from_dir(tiny_llama))


def text_request(text: str) -> GenerateInput:
    return GenerateInput("r1", text, [], SamplingParams())


@pytest.mark.parametrize("request_id", ["a", "req-1.0", "tenant:abc_9", "x" * 128])
def test_safe_ids_pass(request_id: str) -> None:
    check_request_id(request_id)


@pytest.mark.parametrize("request_id", ["", "x" * 129, "a\nb", "a b", "id\x1b[31m", "é"])
def test_unsafe_ids_are_refused_naming_the_field(request_id: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_request_id(request_id)
    assert caught.value.field == "request_id"
    assert "\n" not in str(caught.value)


async def test_a_text_too_large_for_the_context_is_refused_before_tokenizing(
        validator: PromptValidator, monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*_args: object, **_kwargs: object) -> list[int]:
        raise AssertionError("tokenized a text that cannot fit")

    monkeypatch.setattr(validator.tokenizer, "encode", never)
    huge = "x" * (validator.max_text_bytes + 1)
    with pytest.raises(InvalidRequest, match="text: .* cannot fit the model's context"):
        await validator.prompt_ids(text_request(huge))


async def test_the_bound_never_refuses_a_text_that_fits(validator: PromptValidator) -> None:
    # the longest token repeated: as many bytes per token as there can be
    tokenizer = validator.tokenizer
    longest = max(range(tokenizer.vocab_size),
                  key=lambda i: len(tokenizer.decode([i], skip_special_tokens=False).encode()))
    text = tokenizer.decode([longest] * (validator.context // 4), skip_special_tokens=False)
    ids = await validator.prompt_ids(text_request(text))
    assert 0 < len(ids) < validator.context


async def test_tokenizing_a_long_text_does_not_stall_the_event_loop(tiny_llama: Path) -> None:
    text = "the quick brown fox jumps over the lazy dog " * 60_000  # ~2.6 MB
    validator = PromptValidator(Tokenizer.from_dir(tiny_llama), ModelConfig.from_dir(tiny_llama))
    validator.max_text_bytes = len(text) + 1  # past the size bound: this test is about the
    validator.context = 10**9  # tokenizer thread, whatever the tiny model's context
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    task = asyncio.create_task(ticker())
    started = asyncio.get_running_loop().time()
    ids = await validator.prompt_ids(text_request(text))
    elapsed = asyncio.get_running_loop().time() - started
    task.cancel()
    assert len(ids) > 100_000
    # the loop kept turning while the tokenizer ran (holding the GIL it made ~1 tick in 300)
    assert ticks >= 0.2 * elapsed / 0.005, (ticks, elapsed)
