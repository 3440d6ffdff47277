"""`tandem up --demo`: asks the served model a few questions over the router and prints the
answers as they stream.

An instruct model (a folder with a chat template, like the default SmolLM2) gets real chat
questions, each rendered with the model's own template (`engine.chat_template`); a folder
without one (a base model, the generated tiny model) gets plain text prompts. Greedy, and each
answer ends at the model's EOS (`<|im_end|>` for SmolLM2) or `max_tokens`.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from engine.chat_template import ChatTemplate

QUESTIONS = (
    "What is the capital of France?",
    "Give me three tips for writing clear code.",
    "Why is the sky blue? Answer in two sentences.",
)
PLAIN_PROMPTS = (
    "The quick brown fox",
    "Disaggregated serving splits prefill and decode because",
    "The quick brown fox jumps over the lazy dog, and then",
)
MAX_TOKENS = 80  # room for a short answer: a few seconds each on two CPU cores with SmolLM2


class DemoPrompt(NamedTuple):
    """What the demo shows (`shown`) and what it sends (`text`: the rendered chat, or the same)."""

    shown: str
    text: str


def demo_prompts(model_dir: Path) -> list[DemoPrompt]:
    """The chat questions rendered with the folder's template, or plain prompts without one."""
    template = ChatTemplate.from_dir(model_dir)
    if template is None:
        return [DemoPrompt(prompt, prompt) for prompt in PLAIN_PROMPTS]
    return [DemoPrompt(question, template.render([{"role": "user", "content": question}],
                                                 add_generation_prompt=True))
            for question in QUESTIONS]


async def run_demo(address: str, model_dir: Path, ca: str | None = None) -> None:
    """Streams each demo prompt's answer from the router at `address`, then the cluster's
    status."""
    from cli.router_client import RouterClient

    async with RouterClient(address, ca=ca) as client:
        for prompt in demo_prompts(model_dir):
            print(f"\n> {prompt.shown}\n", end="", flush=True)
            async for chunk in client.generate(text=prompt.text, max_tokens=MAX_TOKENS,
                                               temperature=0.0):
                print(chunk.text, end="", flush=True)
                if chunk.finish_reason:
                    print(f"\n[{chunk.finish_reason}: {chunk.prompt_tokens} prompt tokens "
                          f"({chunk.cached_tokens} cached), {chunk.completion_tokens} "
                          f"generated]", flush=True)
        status = await client.status()
        print(f"\ncluster: {len(status.workers)} workers, prefix index "
              f"{'exact' if status.prefix_index_mode == 1 else 'degraded'}, "
              f"policy {status.policy}", flush=True)
