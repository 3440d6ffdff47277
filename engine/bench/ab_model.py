"""`python -m engine.bench.ab_model`: the model code at a git revision against the working tree.

Loads `engine/model/*.py` as they were at `--baseline` (a git revision) beside the current
ones, builds both models from the same checkpoint (each with its own KV cache, both through
`ModelRunner`, so both are prepacked the same way), and times them taking turns within one
process: a forward pass of A, then the same of B, `--rounds` times; the figure is the median
of B's time ÷ A's per round, so machine load that drifts slowly cancels out. Workloads: decode
at each batch (prompts of `--prompt-len` tokens prefilled first, then `--steps` decode steps
timed one by one) and one prefill of `--prefill` (sequences x tokens). Both models' logits are
compared on every workload (greedy tokens and the largest difference). Besides wall time it
reports the ratio of process CPU time: on a machine shared far beyond its cores (load 20+ on
2), wall time mostly measures waiting; with `--threads 1` CPU time is the work done. And the
ops one forward pass calls from Python and dispatches in all, which load does not change.

Only the model package is swapped: kernels, the cache, `ModelRunner` are the current ones.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import torch
from torch.profiler import ProfilerActivity, profile

from engine.forward_batch import ForwardBatch
from engine.host_malloc import keep_freed_memory
from engine.kv_cache import CacheShape, allocate_kv_cache
from engine.model.llama import LlamaModel
from engine.model_config import ModelConfig
from engine.model_runner import ModelRunner
from engine.weights import DTYPES, iter_weights

BLOCK = 16
BASELINE_PACKAGE = "_ab_baseline_model"


def load_baseline(revision: str) -> ModuleType:
    """`engine/model/llama.py` at `revision`, importing its siblings at `revision` too."""
    root = Path(__file__).resolve().parents[2]
    names = subprocess.run(["git", "-C", str(root), "ls-tree", "--name-only", revision,
                            "engine/model/"], check=True, capture_output=True,
                           text=True).stdout.split()
    package = ModuleType(BASELINE_PACKAGE)
    package.__path__ = []
    sys.modules[BASELINE_PACKAGE] = package
    modules = {}
    for path in names:
        stem = Path(path).stem
        if path.endswith(".py") and stem != "__init__":
            modules[stem] = subprocess.run(["git", "-C", str(root), "show", f"{revision}:{path}"],
                                           check=True, capture_output=True, text=True).stdout
    loaded: dict[str, ModuleType] = {}

    def load(stem: str) -> ModuleType:
        if stem in loaded:
            return loaded[stem]
        source = modules[stem].replace("engine.model.", f"{BASELINE_PACKAGE}.")
        for other in modules:  # siblings first, so their imports resolve to the baseline
            if f"{BASELINE_PACKAGE}.{other} import" in source and other != stem:
                load(other)
        name = f"{BASELINE_PACKAGE}.{stem}"
        spec = importlib.util.spec_from_loader(name, loader=None)
        assert spec is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        exec(compile(source, f"{revision}:engine/model/{stem}.py", "exec"), module.__dict__)
        loaded[stem] = module
        return module

    return load("llama")


class Side:
    """One model with its own cache, and the batches it runs."""

    def __init__(self, model_cls: type, model_dir: Path, dtype: torch.dtype,
                 num_blocks: int) -> None:
        config = ModelConfig.from_dir(model_dir)
        model = model_cls(config, dtype, config.max_position_embeddings)
        model.load_weights(iter_weights(model_dir, dtype))
        shape = CacheShape.for_model(config, num_blocks, BLOCK, dtype)
        self.runner = ModelRunner(model, allocate_kv_cache(shape), BLOCK, torch.device("cpu"))

    def forward(self, batch: ForwardBatch) -> tuple[float, float, torch.Tensor]:
        """Wall and CPU (this process, all threads) seconds of one forward pass, logits."""
        wall, cpu = time.perf_counter(), time.process_time()
        logits = self.runner.forward(batch)  # [S', V]
        return time.perf_counter() - wall, time.process_time() - cpu, logits


def prefill_batch(prompts: list[list[int]], ids: tuple[str, ...]) -> ForwardBatch:
    """Fresh prompts, sequence s in blocks `s * blocks_per_seq ...` (blocks_per_seq from the
    longest prompt plus decode room)."""
    per_seq = -(-(max(map(len, prompts)) + 64) // BLOCK)
    tokens: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    starts = [0]
    for s, prompt in enumerate(prompts):
        tokens += prompt
        positions += range(len(prompt))
        slots += [s * per_seq * BLOCK + p for p in range(len(prompt))]
        starts.append(starts[-1] + len(prompt))
    tables = [[s * per_seq + b for b in range(per_seq)] for s in range(len(prompts))]
    lens = [len(p) for p in prompts]
    return ForwardBatch(
        input_ids=torch.tensor(tokens), positions=torch.tensor(positions),
        slot_mapping=torch.tensor(slots), block_tables=torch.tensor(tables, dtype=torch.int32),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32), max_query_len=max(lens),
        max_seq_len=max(lens), logits_indices=torch.tensor(starts[1:]) - 1, request_ids=ids)


def decode_batch(prev: ForwardBatch, next_tokens: list[int]) -> ForwardBatch:
    """One token more for every sequence of `prev` (a prefill or decode batch)."""
    lens = prev.seq_lens + 1  # [S]
    positions = (lens - 1).long()  # [S]
    blocks = prev.block_tables[torch.arange(len(lens)), positions // BLOCK].long()  # [S]
    return ForwardBatch(
        input_ids=torch.tensor(next_tokens), positions=positions,
        slot_mapping=blocks * BLOCK + positions % BLOCK, block_tables=prev.block_tables,
        query_start_loc=torch.arange(len(lens) + 1, dtype=torch.int32), seq_lens=lens,
        max_query_len=1, max_seq_len=int(lens.max()), logits_indices=torch.arange(len(lens)),
        request_ids=prev.request_ids)


def prompts_of(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (batch, length), generator=g).tolist()


def count_ops(side: Side, batch: ForwardBatch) -> tuple[int, int]:
    """How many ops one forward pass calls (from Python), and dispatches in all (counting the
    ops inside composite ops): unlike its time, counts the machine's load cannot blur."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        side.forward(batch)
    events = prof.events()
    return sum(1 for event in events if event.cpu_parent is None), len(events)


def compare(name: str, a: Side, b: Side, batches: list[ForwardBatch], rounds: int) -> None:
    """Times `batches` in order on A and B, taking turns batch by batch, `rounds` times."""
    ratios, cpu_ratios, a_times, b_times = [], [], [], []
    agree, total, diff = 0, 0, 0.0
    for _ in range(rounds):
        for batch in batches:
            ta, ca, la = a.forward(batch)
            tb, cb, lb = b.forward(batch)
            ratios.append(tb / ta)
            cpu_ratios.append(cb / ca)
            a_times.append(ta)
            b_times.append(tb)
            agree += int((la.argmax(-1) == lb.argmax(-1)).sum())
            total += la.shape[0]
            diff = max(diff, (la - lb).abs().max().item())
    load = os.getloadavg()[0]
    (calls_a, ops_a), (calls_b, ops_b) = count_ops(a, batches[-1]), count_ops(b, batches[-1])
    ops = f"{calls_a:,} / {calls_b:,} | {ops_a:,} / {ops_b:,}"
    print(f"| {name} | {ops} | {statistics.median(a_times) * 1e3:,.1f} | "
          f"{statistics.median(b_times) * 1e3:,.1f} | {1 / statistics.median(ratios):.2f}x | "
          f"{1 / statistics.median(cpu_ratios):.2f}x | "
          f"{agree}/{total} | {diff:.3g} | {load:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--baseline", default="main", help="git revision of side A")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8, help="decode steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prefill", nargs=2, type=int, default=[8, 512], metavar=("SEQS", "LEN"))
    parser.add_argument("--prefill-rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch intra-op threads; unset: torch's")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    baseline = load_baseline(args.baseline)
    vocab = ModelConfig.from_dir(args.model).vocab_size
    print(f"A: engine/model at {args.baseline}; B: working tree; threads "
          f"{torch.get_num_threads()}; ms are medians per forward pass")
    print("| dtype, workload | calls A / B | ops A / B | A ms | B ms | B speed-up, wall | "
          "B speed-up, CPU time | same argmax | max logit diff | load |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    most = max(max(args.batches), args.prefill[0])
    blocks = most * -(-(max(args.prompt_len, args.prefill[1]) + 64) // BLOCK)
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        a = Side(baseline.LlamaModel, args.model, dtype, blocks)
        b = Side(LlamaModel, args.model, dtype, blocks)
        for size in args.batches:
            ids = tuple(f"r{i}" for i in range(size))
            first = prefill_batch(prompts_of(size, args.prompt_len, vocab, size), ids)
            # both sides prefill the same prompts, then decode the same (A's greedy) tokens
            _, _, logits = a.forward(first)
            b.forward(first)
            steps, batch = [], first
            for _ in range(args.steps):
                batch = decode_batch(batch, logits.argmax(-1).tolist())
                steps.append(batch)
                _, _, logits = a.forward(batch)
                b.forward(batch)
            # every round replays the same steps: the cache rows are rewritten with the same
            # values, and the decode mirror holds the batch from the second step on
            compare(f"{dtype_name}, decode batch {size}", a, b, steps, args.rounds)
        seqs, length = args.prefill
        ids = tuple(f"p{i}" for i in range(seqs))
        compare(f"{dtype_name}, prefill {seqs}x{length}", a, b,
                [prefill_batch(prompts_of(seqs, length, vocab, 99), ids)], args.prefill_rounds)


if __name__ == "__main__":
    main()
