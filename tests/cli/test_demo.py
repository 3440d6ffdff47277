"""cli.demo: chat questions rendered with the model's template, plain prompts without one."""

from __future__ import annotations

import shutil
from pathlib import Path

from cli.demo import PLAIN_PROMPTS, QUESTIONS, demo_prompts
from engine.chat_template import ChatTemplate

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_a_model_without_a_template_gets_plain_prompts(tiny_llama: Path) -> None:
    assert [(p.shown, p.text) for p in demo_prompts(tiny_llama)] == \
        [(p, p) for p in PLAIN_PROMPTS]


def test_an_instruct_model_gets_its_chat_template(tiny_llama: Path, tmp_path: Path) -> None:
    model = Path(shutil.copytree(tiny_llama, tmp_path / "chat"))
    (model / "chat_template.jinja").write_text(CHATML)
    prompts = demo_prompts(model)
    assert [p.shown for p in prompts] == list(QUESTIONS)
    template = ChatTemplate.from_dir(model)
    assert template is not None
    for prompt in prompts:
        assert prompt.text == f"<|im_start|>user\n{prompt.shown}<|im_end|>\n" \
                              "<|im_start|>assistant\n"
