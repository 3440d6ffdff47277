"""The default model, SmolLM2-135M-Instruct as converted at set-up, through the whole cluster:
greedy output equals transformers' on the same folder in float32, token for token, on chat
prompts rendered with the model's template.

Real processes on loopback: redis-server, 1 prefill and 1 decode worker (KV over NIXL/UCX), the
router; a real gRPC client, and the official openai SDK on the router's HTTP API. The referee
is `AutoModelForCausalLM` with `generate`, greedy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoTokenizer, GenerationConfig

from cli.local_cluster import LocalCluster
from cli.router_client import Completion, RouterClient
from engine.chat_template import ChatTemplate
from engine.tokenizer import Tokenizer
from tests.engine.hf_reference import hf_greedy, hf_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

CHATS = (
    [{"role": "user", "content": "Give me three tips for writing clear code."}],
    [{"role": "user", "content": "Explain what a hash table is."}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris."},
     {"role": "user", "content": "Tell me one fact about Italy's capital."}],
)
GENERATED = 40  # tokens each; ignore_eos on both sides, so both make exactly this many


@pytest.fixture(scope="module")
def cluster(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    logs = tmp_path_factory.mktemp("smollm2-logs")
    with LocalCluster(smollm2, prefill=1, decode=1, log_dir=logs) as running:
        yield running


def hf_chat_ids(model_dir: Path, chat: list[dict[str, str]]) -> list[int]:
    """The chat's prompt as transformers' `apply_chat_template` renders and tokenizes it (no
    special tokens added: the template writes them)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


async def test_greedy_chat_equals_transformers(smollm2: Path, cluster: LocalCluster) -> None:
    template = ChatTemplate.from_dir(smollm2)
    assert template is not None, "the converted folder has no chat template"
    texts = [template.render(chat, add_generation_prompt=True) for chat in CHATS]
    async with RouterClient(cluster.router_address) as client:
        # at once: the decode worker batches them, as it would any traffic
        results: list[Completion] = await asyncio.gather(*(
            client.complete(text, max_tokens=GENERATED, ignore_eos=True, timeout=240)
            for text in texts))
    tokenizer = Tokenizer.from_dir(smollm2)  # the router's
    for chat, text, result in zip(CHATS, texts, results, strict=True):
        prompt = hf_chat_ids(smollm2, chat)
        assert tokenizer.encode(text) == prompt  # the same prompt on both sides
        assert result.prompt_tokens == len(prompt)
        assert result.finish_reason == "length" and result.completion_tokens == GENERATED
        want = hf_greedy(smollm2, prompt, GENERATED)
        assert result.token_ids == want, (chat[-1]["content"], result.text)


async def test_an_answer_ends_at_eos_as_transformers_ends_it(smollm2: Path,
                                                            cluster: LocalCluster) -> None:
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = hf_chat_ids(smollm2, chat)
    async with RouterClient(cluster.router_address) as client:
        result = await client.complete(token_ids=prompt, max_tokens=64, timeout=120)
    config = GenerationConfig(max_new_tokens=64, do_sample=False)  # EOS: <|im_end|>, id 2
    with torch.inference_mode():
        out = hf_model(smollm2).generate(torch.tensor([prompt]),  # type: ignore[operator]
                                         generation_config=config)
    want = out[0, len(prompt):].tolist()
    assert want[-1] == 2 and len(want) < 64  # transformers stopped at <|im_end|>
    assert result.finish_reason == "stop"
    assert result.token_ids in (want, want[:-1])  # with or without the EOS token itself
    assert "Paris" in result.text


async def test_a_greedy_chat_through_the_openai_sdk_equals_grpc_and_transformers(
        smollm2: Path, cluster: LocalCluster) -> None:
    chat = [{"role": "user", "content": "What is the capital of France, and what is it "
             "famous for? Answer in a few sentences."}]
    prompt = hf_chat_ids(smollm2, chat)
    tokenizer = Tokenizer.from_dir(smollm2)
    reference = hf_greedy(smollm2, prompt, 48)
    eos = [i for i, t in enumerate(reference) if t in tokenizer.eos_token_ids]
    reference = reference[:eos[0] + 1] if eos else reference
    assert len(reference) >= 40, tokenizer.decode(reference)
    async with openai.AsyncOpenAI(base_url=f"{cluster.http_url}/v1", api_key="none",
                                  max_retries=0, timeout=300) as sdk:
        reply = await sdk.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=chat,  # type: ignore[arg-type]
            temperature=0, max_tokens=48)
    async with RouterClient(cluster.router_address) as client:
        grpc_reply = await client.complete(token_ids=prompt, max_tokens=48, timeout=240)
    answer = reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens == len(reference)
    assert answer == tokenizer.decode(reference) == grpc_reply.text
    assert "Paris" in (answer or "")
