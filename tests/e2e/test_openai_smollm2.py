"""The real model through the OpenAI API: SmolLM2-135M-Instruct (converted at set-up, see
`engine.default_model`), a chat answered greedily by the whole cluster through the openai SDK,
token for token what the gRPC path and transformers (float32, same folder) answer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from cli.local_cluster import LocalCluster
from cli.router_client import RouterClient
from engine.chat_template import ChatTemplate
from engine.default_model import smollm2_dir
from engine.tokenizer import Tokenizer
from tests.engine.hf_reference import hf_greedy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MAX_TOKENS = 48
MESSAGES: list[Any] = [{"role": "user", "content": "What is the capital of France, and what "
                        "is it famous for? Answer in a few sentences."}]


@pytest.fixture(scope="module")
def model() -> Path:
    path = smollm2_dir()
    if not (path / "config.json").is_file():
        pytest.skip(f"SmolLM2-135M-Instruct is not installed in {path} (scripts/setup.sh)")
    return path


async def test_a_greedy_chat_equals_grpc_and_transformers(model: Path, tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_dir(model)
    template = ChatTemplate.from_dir(model)
    assert template is not None
    ids = tokenizer.encode(template.render(MESSAGES), add_special_tokens=False)
    reference = hf_greedy(model, ids, MAX_TOKENS)
    eos = [i for i, t in enumerate(reference) if t in tokenizer.eos_token_ids]
    reference = reference[:eos[0] + 1] if eos else reference
    assert len(reference) >= 40, tokenizer.decode(reference)
    with LocalCluster(model, prefill=1, decode=1, log_dir=tmp_path,
                      worker_args=["--num-blocks", "64"]) as cluster:
        async with openai.AsyncOpenAI(base_url=f"{cluster.http_url}/v1", api_key="none",
                                      max_retries=0, timeout=300) as sdk:
            chat = await sdk.chat.completions.create(
                model="SmolLM2-135M-Instruct", messages=MESSAGES, temperature=0,
                max_tokens=MAX_TOKENS)
        async with RouterClient(cluster.router_address) as client:
            grpc_reply = await client.complete(token_ids=ids, max_tokens=MAX_TOKENS)
    answer = chat.choices[0].message.content
    assert chat.usage is not None and chat.usage.completion_tokens == len(reference) >= 40
    assert answer == tokenizer.decode(reference) == grpc_reply.text
    assert "Paris" in (answer or "")
