"""The token ids prompts are drawn from: a model's vocabulary without its special tokens.

Prompts are token ids, not text, because a token count is then exact: the router's gRPC
`token_ids` and `/v1/completions` take ids as they are, while text re-tokenized by the server
can merge or split tokens (random text especially). Chat endpoints take text: `decode` gives it,
and its token count is then only close to what was asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import tokenizers


@dataclass(frozen=True)
class TokenSpace:
    """Ids that a prompt may contain: [0, vocab_size) minus `excluded` (special tokens)."""

    vocab_size: int
    excluded: frozenset[int] = frozenset()
    tokenizer: tokenizers.Tokenizer | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.vocab_size - len(self.excluded) < 2:
            raise ValueError(f"vocab_size: need at least 2 usable ids, got {self.vocab_size} "
                             f"with {len(self.excluded)} excluded")

    @classmethod
    def from_tokenizer_dir(cls, model_dir: str | Path) -> TokenSpace:
        """The vocabulary of `model_dir/tokenizer.json`, its added (special) tokens excluded."""
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer: no tokenizer.json in {model_dir}")
        backend = tokenizers.Tokenizer.from_file(str(path))
        special = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        return cls(backend.get_vocab_size(with_added_tokens=True), special, backend)

    @cached_property
    def allowed(self) -> np.ndarray:
        ids = np.arange(self.vocab_size, dtype=np.int64)
        if self.excluded:
            ids = ids[~np.isin(ids, sorted(self.excluded))]
        return ids

    def draw(self, rng: np.random.Generator, n: int) -> tuple[int, ...]:
        """`n` ids, uniform over the allowed ones."""
        return tuple(int(i) for i in rng.choice(self.allowed, size=n))

    def decode(self, token_ids: tuple[int, ...]) -> str:
        """The prompt's text, for endpoints that take text only (needs the tokenizer)."""
        if self.tokenizer is None:
            raise ValueError("tokenizer: a text prompt needs --tokenizer DIR")
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=True))
