"""Small random-weight Llama / Qwen2 checkpoints in the exact Hugging Face layout, for tests.

`make_tiny_model(dir)` writes `config.json`, `generation_config.json`, safetensors weights
(single file, or shards plus `model.safetensors.index.json`), and a byte-level BPE
`tokenizer.json` trained on `engine/data/corpus.txt` with `tokenizer_config.json`, so that
`transformers`' `AutoModelForCausalLM` / `AutoTokenizer` load the directory offline (they are
the referee in correctness tests) — without this module importing transformers.

Everything is a pure function of (arch, seed, spec): same inputs, byte-identical files.
The init is chosen for greedy-decoding comparisons against transformers: projections keep
activations at RMS ~1, and logits get a standard deviation of ~`LOGIT_STD`, so the top-1/top-2
gap stays far above float32 rounding (measured over 1,200 greedy steps per variant: median
~1.4, about one step in a thousand below 1e-3) and greedy outputs do not collapse into
repeating one token (see `random_weights`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from engine.weights import DTYPES, INDEX_FILE, SINGLE_FILE

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
CORPUS_PATH = Path(__file__).parent / "data" / "corpus.txt"

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2: trained first, so they lead the vocabulary
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
# Qwen2's pre-tokenizer split (GPT-4 style, digits one by one); see `train_tokenizer`.
SPLIT_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
               r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte, plus the special tokens

LOGIT_STD = 6.0  # std of the logits at init: median top-1/top-2 gap ~1.4 (see random_weights)
BIAS_STD = 0.1  # Qwen2's q/k/v biases: non-zero so a missing bias shows up in tests
NORM_STD = 0.05  # RMSNorm weights are 1 + N(0, NORM_STD²): near 1, but not all-equal


@dataclass(frozen=True)
class TinyModelSpec:
    """The shape of a generated model; field names follow `engine.model_config.ModelConfig`."""

    hidden_size: int = 64
    intermediate_size: int = 172
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    vocab_size: int = 512
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    tie_word_embeddings: bool = False
    dtype: str = "float32"  # float32 | bfloat16 | float16: what the safetensors files hold

    def __post_init__(self) -> None:
        for f in ("hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "max_position_embeddings"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f}: must be >= 1, got {getattr(self, f)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads: {self.num_heads} does not divide "
                             f"hidden_size {self.hidden_size}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads: {self.num_kv_heads} does not divide "
                             f"num_heads {self.num_heads}")
        if self.vocab_size < MIN_VOCAB:
            raise ValueError(f"vocab_size: must be >= {MIN_VOCAB} (256 bytes + special tokens), "
                             f"got {self.vocab_size}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


PRESETS: dict[str, TinyModelSpec] = {
    # The model of unit tests and demos.
    "tiny": TinyModelSpec(),
    # Big enough that batching and paged attention show up in timings, still CPU-friendly.
    "bench": TinyModelSpec(hidden_size=256, intermediate_size=688, num_layers=4, num_heads=8,
                           num_kv_heads=4, vocab_size=1024, tie_word_embeddings=False),
    # SmolLM2-135M's shape (random weights): what prefill_worker.bench times by default. The
    # corpus yields fewer merges than 49,152, so the tokenizer is smaller than the embeddings.
    "smollm2": TinyModelSpec(hidden_size=576, intermediate_size=1536, num_layers=30,
                             num_heads=9, num_kv_heads=3, vocab_size=49152,
                             max_position_embeddings=8192, rope_theta=100000.0,
                             tie_word_embeddings=True),
}


def make_tiny_model(
    out_dir: str | Path,
    arch: str = "llama",
    seed: int = 0,
    preset: str = "tiny",
    shards: int = 1,
    **overrides: Any,
) -> Path:
    """Writes a random-weight model directory and returns its path.

    `arch`: "llama" or "qwen2" (adds q/k/v biases). `overrides`: any `TinyModelSpec` field,
    applied on top of `PRESETS[preset]`. `shards` > 1 splits the weights into that many files
    with a `model.safetensors.index.json`, as large HF checkpoints are.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch: {arch!r} is not one of {', '.join(ARCHITECTURES)}")
    if preset not in PRESETS:
        raise ValueError(f"preset: {preset!r} is not one of {', '.join(PRESETS)}")
    unknown = set(overrides) - {f.name for f in fields(TinyModelSpec)}
    if unknown:
        raise ValueError(f"overrides: unknown field(s) {', '.join(sorted(unknown))}")
    spec = replace(PRESETS[preset], **overrides)
    weights = random_weights(spec, arch, seed)
    if not 1 <= shards <= len(weights):
        raise ValueError(f"shards: must be in 1..{len(weights)}, got {shards}")
    tokenizer = train_tokenizer(spec.vocab_size, add_bos=arch == "llama")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", hf_config(spec, arch))
    _write_json(out / "generation_config.json",
                {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID})
    _save_weights(out, weights, shards)
    tokenizer.save(str(out / "tokenizer.json"), pretty=True)
    _write_json(out / "tokenizer_config.json", _tokenizer_config(spec, arch))
    return out


def hf_config(spec: TinyModelSpec, arch: str) -> dict[str, Any]:
    """The `config.json` contents, with every field HF's Llama/Qwen2 configs read."""
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "attention_dropout": 0.0,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "num_attention_heads": spec.num_heads,
        "num_hidden_layers": spec.num_layers,
        "num_key_value_heads": spec.num_kv_heads,
        "rms_norm_eps": 1e-5 if arch == "llama" else 1e-6,
        "rope_scaling": spec.rope_scaling,
        "rope_theta": spec.rope_theta,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "torch_dtype": spec.dtype,
        "use_cache": True,
        "vocab_size": spec.vocab_size,
    }
    if arch == "llama":
        config.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:  # Qwen2: q/k/v biases are implied by the architecture; no sliding window here
        config.update(use_sliding_window=False, sliding_window=None,
                      max_window_layers=spec.num_layers)
    return config


def random_weights(spec: TinyModelSpec, arch: str, seed: int) -> dict[str, torch.Tensor]:
    """HF-named tensors drawn from a seeded generator, in a fixed order, cast to `spec.dtype`."""
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * std

    def norm_weight(gain: float = 1.0) -> torch.Tensor:
        return gain * (1.0 + normal(spec.hidden_size, std=NORM_STD))

    h, inter, hd = spec.hidden_size, spec.intermediate_size, spec.head_dim
    q_out, kv_out = spec.num_heads * hd, spec.num_kv_heads * hd
    if spec.tie_word_embeddings:
        # The embeddings double as the lm_head. At std 1 a token's own logit (~|e|² = h) would
        # dominate and greedy decoding would repeat the input token forever; rows of norm ~1
        # keep that bias small, and the final norm's gain gives the logits their scale instead.
        embed_std, final_gain = 1.0 / math.sqrt(h), LOGIT_STD
    else:
        embed_std, final_gain = 1.0, 1.0
    w: dict[str, torch.Tensor] = {}
    w["model.embed_tokens.weight"] = normal(spec.vocab_size, h, std=embed_std)
    for i in range(spec.num_layers):
        p = f"model.layers.{i}"
        w[f"{p}.input_layernorm.weight"] = norm_weight()
        w[f"{p}.self_attn.q_proj.weight"] = normal(q_out, h, std=_init_std(h))
        w[f"{p}.self_attn.k_proj.weight"] = normal(kv_out, h, std=_init_std(h))
        w[f"{p}.self_attn.v_proj.weight"] = normal(kv_out, h, std=_init_std(h))
        if arch == "qwen2":
            w[f"{p}.self_attn.q_proj.bias"] = normal(q_out, std=BIAS_STD)
            w[f"{p}.self_attn.k_proj.bias"] = normal(kv_out, std=BIAS_STD)
            w[f"{p}.self_attn.v_proj.bias"] = normal(kv_out, std=BIAS_STD)
        w[f"{p}.self_attn.o_proj.weight"] = normal(h, q_out, std=_init_std(q_out))
        w[f"{p}.post_attention_layernorm.weight"] = norm_weight()
        w[f"{p}.mlp.gate_proj.weight"] = normal(inter, h, std=_init_std(h))
        w[f"{p}.mlp.up_proj.weight"] = normal(inter, h, std=_init_std(h))
        w[f"{p}.mlp.down_proj.weight"] = normal(h, inter, std=_init_std(inter))
    w["model.norm.weight"] = norm_weight(final_gain)
    if not spec.tie_word_embeddings:
        # The final norm leaves rows of RMS ~1 (norm ~sqrt(h)): logits of std ~LOGIT_STD.
        w["lm_head.weight"] = normal(spec.vocab_size, h, std=LOGIT_STD / math.sqrt(h))
    dtype = DTYPES[spec.dtype]
    return {name: t.to(dtype).contiguous() for name, t in w.items()}


def train_tokenizer(vocab_size: int, add_bos: bool = True) -> Tokenizer:
    """A byte-level BPE tokenizer trained on the bundled corpus: deterministic per vocab size.

    The pipeline is Qwen2's (NFC, Qwen's split regex, byte-level), which transformers'
    `Qwen2Tokenizer` rebuilds regardless of `tokenizer.json`, so both archs tokenize alike.
    `add_bos`: encoding with special tokens prepends `<|bos|>`, as Llama tokenizers do (Qwen2's
    do not). If the corpus runs out of merges the vocabulary is smaller than `vocab_size`.
    """
    if not CORPUS_PATH.is_file():
        raise FileNotFoundError(f"tokenizer: training corpus {CORPUS_PATH} is missing")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = CORPUS_PATH.read_text(encoding="utf-8").splitlines(keepends=True)
    tok.train_from_iterator(lines, trainer=trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
        )
    if tok.token_to_id(BOS) != BOS_ID or tok.token_to_id(EOS) != EOS_ID:
        raise RuntimeError("tokenizer: special tokens did not get ids 0..2")  # trainer changed
    return tok


def _tokenizer_config(spec: TinyModelSpec, arch: str) -> dict[str, Any]:
    special: dict[str, Any]
    if arch == "llama":  # PreTrainedTokenizerFast takes tokenizer.json as is (bos included)
        special = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS}
    else:  # Qwen2Tokenizer's defaults name <|endoftext|>; ours must override all of them
        special = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "unk_token": None}
    return {
        **special,
        "eos_token": EOS,
        "pad_token": PAD,
        "model_max_length": spec.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
    }


def _init_std(fan_in: int) -> float:
    # 1/sqrt(fan_in) keeps every projection's output at RMS ~1 (inputs are RMS-normed), so the
    # residual stream neither vanishes nor explodes and attention scores vary across positions.
    return 1.0 / math.sqrt(fan_in)


def _save_weights(out: Path, weights: dict[str, torch.Tensor], shards: int) -> None:
    for stale in [*out.glob("model*.safetensors"), out / INDEX_FILE]:
        stale.unlink(missing_ok=True)  # an old index would shadow a new single file
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    if shards == 1:
        save_file(weights, str(out / SINGLE_FILE), metadata=metadata)
        return
    names = list(weights)
    bounds = [round(i * len(names) / shards) for i in range(shards + 1)]
    weight_map: dict[str, str] = {}
    for i in range(shards):
        file_name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: weights[n] for n in names[bounds[i]:bounds[i + 1]]}
        save_file(part, str(out / file_name), metadata=metadata)
        weight_map.update(dict.fromkeys(part, file_name))
    total = sum(t.numel() * t.element_size() for t in weights.values())
    _write_json(out / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")

