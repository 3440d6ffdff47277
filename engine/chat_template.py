"""A model's chat template, read from its folder and rendered with jinja2 the way transformers'
`apply_chat_template` renders it: a sandboxed environment with `trim_blocks` and
`lstrip_blocks`, loop controls, a `tojson` that does not escape HTML, `raise_exception` and
`strftime_now`, and the tokenizer's special tokens (`bos_token`, `eos_token`, ...) in scope.

The template is `chat_template.jinja` when the folder has one, else `tokenizer_config.json`'s
`chat_template` (a string, or a list of named templates of which "default" is taken). No torch
and no transformers import: the router renders chats.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                      "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """The template refused the conversation (its `raise_exception`) or failed to render."""


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}`: transformers tracks assistant spans with it;
    rendering for a prompt only needs the body."""

    tags = {"generation"}  # noqa: RUF012 (jinja2 declares it an instance attribute)

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@dataclass(frozen=True)
class ChatTemplate:
    """One model's template source and the special tokens it may refer to."""

    source: str
    special_tokens: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ChatTemplate | None:
        """The folder's template, or None when it has none (a base model)."""
        model_dir = Path(model_dir)
        tok_config = _read_json(model_dir / "tokenizer_config.json")
        jinja_file = model_dir / "chat_template.jinja"
        source: Any = (jinja_file.read_text(encoding="utf-8") if jinja_file.is_file()
                       else tok_config.get("chat_template"))
        if isinstance(source, list):  # [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if not isinstance(source, str) or not source.strip():
            return None
        special = {k: _token_text(tok_config[k]) for k in SPECIAL_TOKEN_KEYS
                   if tok_config.get(k) is not None}
        return cls(source=source, special_tokens=special)

    @cached_property
    def _compiled(self) -> jinja2.Template:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[_GenerationBlock, loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        return env.from_string(self.source)

    def render(self, messages: Sequence[Mapping[str, Any]],
               add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` (dicts with "role" and "content")."""
        try:
            return self._compiled.render(messages=[dict(m) for m in messages], tools=None,
                                         documents=None,
                                         add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens)
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template: {e}") from e


def _token_text(value: Any) -> str:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return str(value.get("content", "")) if isinstance(value, dict) else str(value)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    raw = json.loads(path.read_text(encoding="utf-8"))
    return raw if isinstance(raw, dict) else {}
