"""`ChatTemplate` renders as transformers' `apply_chat_template` does (the referee), on a
generated model folder given real templates: SmolLM2's ChatML, a Llama-3-style one that uses
`bos_token`, `raise_exception` and loop controls, and one with `{% generation %}` blocks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from engine.chat_template import ChatTemplate, ChatTemplateError
from engine.tiny_model import make_tiny_model

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_STYLE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{% if message['content'] == 'skip' %}{% continue %}{% endif %}\n"
    "  {{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + "
    "message['content'] | trim + eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant"
    "<|end_header_id|>\n\n' }}{% endif %}{{ {'k': '<b>'} | tojson }}")
GENERATION = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}"
              "{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}"
              "{% endfor %}")
CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "  What is 2+2? "},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "skip"},
        {"role": "user", "content": "And <b>3+3</b>?"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("chat") / "m", seed=0)


def with_template(model_dir: Path, source: str, tmp_path: Path, in_config: bool) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("tokenizer.json", "config.json"):
        (folder / name).write_bytes((model_dir / name).read_bytes())
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    tok_config.update(bos_token="<s>", eos_token="</s>")
    if in_config:
        tok_config["chat_template"] = source
    else:
        (folder / "chat_template.jinja").write_text(source)
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return folder


@pytest.mark.parametrize("source", [CHATML, LLAMA3_STYLE, GENERATION],
                         ids=["chatml", "llama3-style", "generation-tags"])
@pytest.mark.parametrize("in_config", [False, True], ids=["jinja-file", "tokenizer-config"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_as_transformers_does(model_dir: Path, tmp_path: Path, source: str,
                                      in_config: bool, add_generation_prompt: bool) -> None:
    folder = with_template(model_dir, source, tmp_path, in_config)
    template = ChatTemplate.from_dir(folder)
    assert template is not None
    ours = template.render(CHAT, add_generation_prompt=add_generation_prompt)
    theirs = AutoTokenizer.from_pretrained(folder).apply_chat_template(
        CHAT, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs


def test_a_template_refusing_a_conversation_raises_its_message(model_dir: Path,
                                                              tmp_path: Path) -> None:
    template = ChatTemplate.from_dir(with_template(model_dir, LLAMA3_STYLE, tmp_path, False))
    assert template is not None
    with pytest.raises(ChatTemplateError, match="unknown role tool"):
        template.render([{"role": "tool", "content": "x"}])


def test_a_folder_without_a_template_has_none(model_dir: Path) -> None:
    assert ChatTemplate.from_dir(model_dir) is None


def test_a_broken_template_is_a_chat_template_error(model_dir: Path, tmp_path: Path) -> None:
    template = ChatTemplate.from_dir(with_template(model_dir, "{{ messages[0].x.y }}", tmp_path,
                                                   False))
    assert template is not None
    with pytest.raises(ChatTemplateError):
        template.render([{"role": "user", "content": "hi"}])
