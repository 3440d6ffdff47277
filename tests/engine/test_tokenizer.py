"""engine.tokenizer: encode/decode against transformers, incremental detokenization, errors."""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it: never download

from transformers import AutoTokenizer  # the referee, tests only

from engine.tiny_model import BOS_ID, EOS_ID, make_tiny_model
from engine.tokenizer import REPLACEMENT_CHAR, Tokenizer

TEXTS = [
    "Hello, world!",
    "héllo wörld 漢字 🙂",
    "The year 2024 had 12345 days, didn't it?",
    "  leading spaces\n\nand\ttabs  ",
    "def f(x):\n    return x ** 2  # squares\n",
    "Straße, naïve café, привет, こんにちは, 你好, €20 🙂🚀👍🏽",
    "",
]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp(request.param), arch=request.param)


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


def test_round_trip(tok: Tokenizer) -> None:
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_special_ids_and_vocab(tok: Tokenizer, model_dir: Path) -> None:
    assert tok.bos_token_id == BOS_ID
    assert tok.eos_token_ids == (EOS_ID,)
    assert tok.vocab_size == 512
    assert tok.token_to_id("<|eos|>") == EOS_ID
    assert tok.token_to_id("no such token") is None
    with_specials = tok.encode("hi", add_special_tokens=True)
    assert (with_specials[0] == BOS_ID) == (json.loads(
        (model_dir / "config.json").read_text())["model_type"] == "llama")  # Qwen2 adds no bos
    assert tok.decode([BOS_ID, *tok.encode("hi", False), EOS_ID]) == "hi"
    assert tok.decode([EOS_ID], skip_special_tokens=False) == "<|eos|>"


def test_matches_transformers(tok: Tokenizer, model_dir: Path) -> None:
    hf = AutoTokenizer.from_pretrained(model_dir)
    for text in [*TEXTS, "inside <|eos|> text"]:
        for add in (True, False):
            assert tok.encode(text, add_special_tokens=add) == hf.encode(
                text, add_special_tokens=add), (text, add)
        ids = tok.encode(text)
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids)
    assert (hf.eos_token_id, hf.pad_token_id) == (EOS_ID, 0)
    assert len(hf) == tok.vocab_size  # transformers added no token of its own (Qwen2's unk)


def _stream(tok: Tokenizer, ids: list[int], skip: bool = True) -> list[str]:
    dec = tok.incremental_decoder(skip_special_tokens=skip)
    deltas = [dec.push(i) for i in ids]
    deltas.append(dec.finish())
    assert dec.token_ids == ids
    return deltas


def test_incremental_equals_full_decode(tok: Tokenizer) -> None:
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        deltas = _stream(tok, ids)
        assert "".join(deltas) == tok.decode(ids) == text
        assert not any(REPLACEMENT_CHAR in d for d in deltas)
        assert deltas[-1] == ""  # valid text: nothing left over for finish()


def test_incremental_holds_back_split_characters(tok: Tokenizer) -> None:
    ids = tok.encode("漢字 🙂", add_special_tokens=False)
    # The tiny vocabulary has no merges for these: each is several byte tokens, so some single
    # tokens decode to U+FFFD, and their pushes must return "" until the character completes.
    assert any(tok.decode([i]) == REPLACEMENT_CHAR for i in ids)
    deltas = _stream(tok, ids)
    assert "" in deltas[:-1]
    assert not any(REPLACEMENT_CHAR in d for d in deltas)
    assert "".join(deltas) == "漢字 🙂"


def test_incremental_random_ids(tok: Tokenizer) -> None:
    # Arbitrary ids (specials, stray continuation bytes): the stream must still equal the full
    # decode, with incomplete tails flushed by finish().
    rng = random.Random(0)
    for skip in (True, False):
        for _ in range(30):
            ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
            assert "".join(_stream(tok, ids, skip)) == tok.decode(ids, skip_special_tokens=skip)


def test_incremental_finish_flushes_incomplete_tail(tok: Tokenizer) -> None:
    ids = tok.encode("ok 🙂", add_special_tokens=False)[:-1]  # drop the emoji's last byte
    full = tok.decode(ids)
    assert full.startswith("ok") and full.endswith(REPLACEMENT_CHAR)
    dec = tok.incremental_decoder()
    emitted = dec.extend(ids)
    assert REPLACEMENT_CHAR not in emitted  # held back while incomplete ...
    assert emitted + dec.finish() == full  # ... and flushed, lossily, at the end
    assert dec.finish() == ""


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)


def test_malformed_files(model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)

    (tmp_path / "tokenizer.json").write_bytes((model_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match=re.escape("eos_token '<|nope|>'")):
        Tokenizer.from_dir(tmp_path)


def test_eos_ids_are_the_union_of_configs(model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((model_dir / "tokenizer.json").read_bytes())
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2]}))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "<|pad|>"}, "bos_token": "<|bos|>"}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.eos_token_ids == (7, 2, 0)
    assert tok.bos_token_id == BOS_ID  # from tokenizer_config, as no other file names one
