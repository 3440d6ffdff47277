"""The simulated engine's cost model: how long one step of the real engine takes.

    step_s = step_s                                      (fixed: scheduling, sampling, launch)
           + prefill_token_s        · prompt tokens computed in the step
           + decode_seq_s           · requests that decode one token in the step
           + decode_context_token_s · context tokens those requests attend to

A step that mixes prompt chunks and decodes pays both parts, as the real engine's forward does
(one batch through every layer). The defaults are fitted on this repository's engine running
SmolLM2-135M's shape (`tandem make-tiny-model DIR --preset smollm2`, float32) on one thread of
the 2-core dev box (a decode worker's share under `tandem up`):

    python -m engine.sim.fit --model DIR --repeats 5 --num-threads 1

17 points (prompts of 32-512 tokens; batches of 1-32 at contexts of 64-512), fastest of 5
steps each, mean relative error 10.9% (the run is in docs/architecture.md). Fit them again for
another model or machine and pass the flags it prints. Pure Python: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SimCostModel:
    """The constants of the simulated engine's step time (module doc); each is a flag."""

    sim_step_s: float = field(default=0.0784, metadata={
        "help": "--engine sim: fixed seconds of every step"})
    sim_prefill_token_s: float = field(default=0.00369, metadata={
        "help": "--engine sim: seconds per prompt token computed in a step"})
    sim_decode_seq_s: float = field(default=0.00489, metadata={
        "help": "--engine sim: seconds per request decoding one token in a step"})
    sim_decode_context_token_s: float = field(default=0.00000482, metadata={
        "help": "--engine sim: seconds per context token attended to by a decoding request"})
    sim_eos_probability: float = field(default=0.0, metadata={
        "help": "--engine sim: chance that a sampled token is the model's end-of-sequence "
                "token (drawn from the same hash as the token, so runs repeat); 0: never, "
                "requests run to max_tokens"})

    def __post_init__(self) -> None:
        for name in ("sim_step_s", "sim_prefill_token_s", "sim_decode_seq_s",
                     "sim_decode_context_token_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.sim_eos_probability <= 1.0:
            raise ValueError(f"sim_eos_probability: must be in [0, 1], "
                             f"got {self.sim_eos_probability}")

    def step_seconds(self, prefill_tokens: int, decode_seqs: int,
                     decode_context_tokens: int) -> float:
        """The modelled time of one step that computes `prefill_tokens` prompt tokens and
        decodes `decode_seqs` requests holding `decode_context_tokens` tokens of context."""
        return (self.sim_step_s + self.sim_prefill_token_s * prefill_tokens
                + self.sim_decode_seq_s * decode_seqs
                + self.sim_decode_context_token_s * decode_context_tokens)
