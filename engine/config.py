"""Engine configuration: one frozen dataclass, validated on construction.

Values found at run time (how many blocks fit) live on the objects that find them
(`engine.engine.Engine.num_blocks`), never written back here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from engine.block_hash import DEFAULT_HASH_SEED
from engine.sim.cost_model import SimCostModel
from engine.weights import DTYPES


@dataclass(frozen=True)
class EngineConfig:
    """How one engine process runs a model.

    The KV cache is sized by, in order of precedence: `num_blocks`, `kv_cache_bytes`, or
    `kv_cache_fraction` of the memory free on the device when the engine starts.
    Defaults are set for real models on GPUs (block size 16, 8K-token prefill chunks);
    tests shrink them.
    """

    dtype: str | None = field(default=None, metadata={
        "help": "compute and KV dtype: float32, bfloat16 or float16; unset: the checkpoint's "
                "own (config.json torch_dtype / dtype)"})
    device: str = field(default="cpu", metadata={"help": "torch device: cpu, cuda, cuda:1, ..."})
    block_size: int = field(default=16, metadata={
        "help": "tokens per KV cache block (a power of two); router and workers must agree"})
    num_blocks: int | None = field(default=None, metadata={
        "help": "KV cache blocks; unset: sized by kv_cache_bytes, else kv_cache_fraction"})
    kv_cache_bytes: int | None = field(default=None, metadata={
        "help": "KV cache size in bytes; unset: kv_cache_fraction of the free memory"})
    kv_cache_fraction: float = field(default=0.5, metadata={
        "help": "share of the device memory free at start given to the KV cache, in (0, 1]"})
    max_num_seqs: int = field(default=256, metadata={
        "help": "requests decoded together in one step"})
    max_num_batched_tokens: int = field(default=8192, metadata={
        "help": "token budget of one step (longer prompts are prefilled in chunks)"})
    max_model_len: int | None = field(default=None, metadata={
        "help": "longest prompt + completion; unset: the model's max_position_embeddings"})
    enable_prefix_caching: bool = field(default=True, metadata={
        "help": "reuse cached KV blocks of identical prompt prefixes"})
    hash_seed: int = field(default=DEFAULT_HASH_SEED, metadata={
        "help": "seed of the chained block hashes; router and workers must agree"})
    num_threads: int | None = field(default=None, metadata={
        "help": "torch intra-op threads on CPU; unset: torch's default"})
    kv_layer_group: int | None = field(default=None, metadata={
        "help": "layers per KV cache group, a divisor of the model's layer count; unset: auto "
                "(engine/kv_cache.py); prefill and decode workers must agree"})
    cpu_kernels: bool = field(default=True, metadata={
        "help": "CPU only: decode attention and RMSNorm by C++ kernels "
                "(engine/kernels/cpu_ops.py), built at first use (~20 s, kept); false: torch's "
                "SDPA, decode mirror and norm"})
    decode_mirror_bytes: int = field(default=1 << 30, metadata={
        "help": "CPU only: memory for the dense K/V copy of a steady decode batch, on top of "
                "the KV cache (engine/kernels/decode_mirror.py); 0 turns it off"})

    engine: Literal["model", "sim"] = field(default="model", metadata={
        "help": "model: run the checkpoint; sim: no model (config.json is read, no weights): "
                "steps last as the sim cost model says, tokens are a hash of the context "
                "(engine/sim/); prefill and decode workers must agree"})
    sim: SimCostModel = field(default_factory=SimCostModel)

    def __post_init__(self) -> None:
        if self.engine not in ("model", "sim"):
            raise ValueError(f"engine: must be 'model' or 'sim', got {self.engine!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype: must be one of {sorted(DTYPES)} or unset, "
                             f"got {self.dtype!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size: must be a power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks: must be >= 1, got {self.num_blocks}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes < 1:
            raise ValueError(f"kv_cache_bytes: must be >= 1, got {self.kv_cache_bytes}")
        if not 0.0 < self.kv_cache_fraction <= 1.0:
            raise ValueError(f"kv_cache_fraction: must be in (0, 1], got {self.kv_cache_fraction}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs: must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens: must be >= 1, got {self.max_num_batched_tokens}")
        if self.kv_layer_group is not None and self.kv_layer_group < 1:
            raise ValueError(f"kv_layer_group: must be >= 1, got {self.kv_layer_group}")
        if self.decode_mirror_bytes < 0:
            raise ValueError(f"decode_mirror_bytes: must be >= 0, got {self.decode_mirror_bytes}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len: must be >= 2, got {self.max_model_len}")
