"""Text ↔ token ids for a local Hugging Face model directory, and incremental detokenization.

A thin wrapper over `tokenizers.Tokenizer` (the Rust library behind HF fast tokenizers), loaded
from `tokenizer.json`. The special ids come from `generation_config.json`, `config.json` and
`tokenizer_config.json` when present. No torch import: the router tokenizes too.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import tokenizers

REPLACEMENT_CHAR = "\ufffd"  # what a decoder yields for an incomplete UTF-8 sequence


class Tokenizer:
    """Encodes and decodes text with one model's tokenizer."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        bos_token_id: int | None = None,
        eos_token_ids: Sequence[int] = (),
    ) -> None:
        self._backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids: tuple[int, ...] = tuple(eos_token_ids)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """Loads `tokenizer.json` (required) and the bos/eos ids from a model directory.

        eos ids are the union, in this order, of `generation_config.json`'s `eos_token_id`,
        `config.json`'s, and `tokenizer_config.json`'s `eos_token`; bos is the first found.
        """
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer: no tokenizer.json in {model_dir}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception on malformed files
            raise ValueError(f"tokenizer: cannot parse {path}: {e}") from e

        bos: int | None = None
        eos: list[int] = []
        for name in ("generation_config.json", "config.json"):
            raw = _read_json(model_dir / name)
            if bos is None and isinstance(raw.get("bos_token_id"), int):
                bos = raw["bos_token_id"]
            eos += _as_ids(raw.get("eos_token_id"))
        tok_config = _read_json(model_dir / "tokenizer_config.json")
        if bos is None:
            bos = _special_id(backend, tok_config.get("bos_token"), "bos_token")
        eos_from_tok = _special_id(backend, tok_config.get("eos_token"), "eos_token")
        if eos_from_tok is not None:
            eos.append(eos_from_tok)
        return cls(backend, bos_token_id=bos, eos_token_ids=tuple(dict.fromkeys(eos)))

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, special and added tokens included."""
        return int(self._backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` applies the tokenizer's template (e.g. bos).

        Runs without the GIL (the library's batch call releases it; its single-text call does
        not), so a long text tokenized on a worker thread does not stall the event loop."""
        (encoding,) = self._backend.encode_batch([text], add_special_tokens=add_special_tokens)
        return list(encoding.ids)

    @cached_property
    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes of text one token stands for. With a tokenizer that represents
        every byte of its input (byte-level BPE, byte-fallback SentencePiece), a text of n bytes
        has at least n / max_token_bytes tokens: a cheap bound before tokenizing it."""
        return max(len(self.decode([i], skip_special_tokens=False).encode())
                   for i in range(self.vocab_size))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; an incomplete UTF-8 sequence at the end decodes to U+FFFD."""
        return str(self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry (e.g. `"<|eos|>"`), or None if it is not one."""
        return self._backend.token_to_id(token)

    def incremental_decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        """A fresh streaming detokenizer for one sequence of generated ids."""
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)


class IncrementalDecoder:
    """Turns generated token ids, fed one at a time, into text deltas.

    Decoding one token alone is wrong in two ways: byte-level BPE may split one UTF-8 character
    over several tokens, and some decoders change a token's text depending on its neighbours
    (leading spaces). So each step decodes a short window of recent ids twice, with and without
    the unread ones, and emits the difference; while the text ends in U+FFFD the character is
    incomplete and the delta is held back until the next token completes it. The concatenated
    deltas, plus `finish()`, equal `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the context window re-decoded each step
        self._read_offset = 0  # ids before this one have been emitted as text

    def push(self, token_id: int) -> str:
        """Adds one token id; returns the text it completes ("" while a character is split)."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if full.endswith(REPLACEMENT_CHAR) or len(full) <= len(prefix):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full[len(prefix):]

    def extend(self, token_ids: Iterable[int]) -> str:
        """Adds several ids; returns the concatenated deltas."""
        return "".join(self.push(t) for t in token_ids)

    def finish(self) -> str:
        """Flushes held-back text (an incomplete character decodes to U+FFFD) at end of stream."""
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self._ids)
        return full[len(prefix):] if len(full) > len(prefix) else ""

    @property
    def token_ids(self) -> list[int]:
        """All ids pushed so far."""
        return list(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special) if ids else ""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"tokenizer: {path} is not valid JSON: {e}") from e
    return raw if isinstance(raw, dict) else {}


def _as_ids(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [int(v) for v in value]
    return []


def _special_id(backend: tokenizers.Tokenizer, token: Any, field: str) -> int | None:
    """The id of a special token named in `tokenizer_config.json` (a string or an AddedToken)."""
    if isinstance(token, dict):
        token = token.get("content")
    if not isinstance(token, str):
        return None
    token_id = backend.token_to_id(token)
    if token_id is None:
        raise ValueError(f"tokenizer_config.json: {field} {token!r} is not in tokenizer.json")
    return int(token_id)
