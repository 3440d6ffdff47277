"""`python -m engine.bench.profile_decode`: one decode step's ops, without the prompt's prefill.

`profile_step` profiles a whole `generate`, whose prompt prefill dominates a decode row. This
prefills `--batch` prompts of `--prompt-len` random tokens through the model (`ab_model.Side`:
prepacked, its own KV cache), runs `--warm-steps` decode steps untimed, times `--steps` more
(wall and process CPU per step), then profiles `--steps` steps and prints the ops by self CPU
time, shapes apart. `--no-cpu-kernels` runs torch's ops instead of `engine.kernels.cpu_ops`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from engine.bench.ab_model import Side, decode_batch, prefill_batch, prompts_of
from engine.forward_batch import ForwardBatch
from engine.model.llama import LlamaModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--warm-steps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rows", type=int, default=20, help="ops listed")
    parser.add_argument("--no-cpu-kernels", action="store_true")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    per_seq = -(-(args.prompt_len + 64) // 16)
    side = Side(LlamaModel, args.model, dtype, num_blocks=args.batch * per_seq + 8)
    side.runner.model.cpu_kernels = not args.no_cpu_kernels
    vocab = side.runner.model.config.vocab_size
    batch: ForwardBatch = prefill_batch(prompts_of(args.batch, args.prompt_len, vocab, 0),
                                        tuple(f"r{i}" for i in range(args.batch)))
    _, _, logits = side.forward(batch)
    tokens: list[int] = logits.argmax(-1).tolist()

    def step() -> tuple[float, float]:
        nonlocal batch, tokens
        batch = decode_batch(batch, tokens)
        wall, cpu, out = side.forward(batch)
        tokens = out.argmax(-1).tolist()
        return wall, cpu

    for _ in range(args.warm_steps):
        step()
    timed = [step() for _ in range(args.steps)]
    walls = [round(wall * 1e3, 1) for wall, _ in timed]
    cpus = [round(cpu * 1e3, 1) for _, cpu in timed]
    print(f"batch {args.batch}, {args.dtype}, context ~{args.prompt_len}: step wall ms {walls}, "
          f"CPU ms {cpus}")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows,
                                    max_name_column_width=40))


if __name__ == "__main__":
    main()
