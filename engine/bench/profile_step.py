"""`python -m engine.bench.profile_step`: where a Tandem step's time goes, by kind of work.

Runs the bench's workloads (decode at batch B: 128-token prompts, 16 tokens generated;
prefill: 8 x 512) once to warm up and once under `torch.profiler`, and sorts every op's own
time into matmuls (the decoder layers' projections), the LM head (the matmul over the vocab),
attention (SDPA and the KV cache's gathers and writes), elementwise (norms, RoPE, SiLU,
residual adds, dtype casts), sampling (argmax, top-k, softmax over the vocab) and the rest;
what no op accounts for is Python and framework overhead (building batches, scheduling,
dispatch). Shares of wall time, per workload and dtype. (Not `profile.py`: the vLLM runner
runs from this folder, and a `profile` module here would shadow the standard library's.)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from engine.bench.presets import PRESETS, make_preset
from engine.bench.workloads import decode_workload, prefill_workload
from engine.config import EngineConfig
from engine.engine import Engine
from engine.model_config import ModelConfig
from engine.sampling import SamplingParams

MATMULS = ("aten::mm", "aten::addmm", "aten::matmul", "mkldnn::_linear_pointwise",
           "aten::linear", "mkl::_mkl_linear")
ATTENTION = ("sdpa", "scaled_dot_product", "_attention", "paged_decode",  # tandem_cpu's too
             "aten::bmm", "aten::baddbmm", "aten::_softmax", "aten::index", "aten::index_put_",
             "aten::index_copy_", "aten::index_select",
             "aten::gather", "aten::masked_fill")
SAMPLING = ("aten::argmax", "tandem_cpu::argmax", "aten::topk", "aten::sort", "aten::multinomial",
            "aten::cumsum")
ELEMENTWISE = ("aten::mul", "aten::add", "aten::sub", "aten::pow", "aten::rsqrt",
               "aten::mean", "aten::sum", "aten::silu", "aten::rms_norm", "aten::copy_",
               "aten::_to_copy", "aten::cat", "aten::embedding", "aten::div", "aten::neg",
               "aten::_fused_rms_norm", "tandem_cpu::rms_norm", "aten::fill_", "aten::zero_",
               "aten::clone")
KINDS = ("matmuls", "lm_head", "attention", "elementwise", "sampling", "other ops", "python")


def kind_of(name: str, shapes: list, vocab: int) -> str:
    """The kind of work of one op (see the module docstring)."""
    if name.startswith(MATMULS):
        head = any(isinstance(s, list) and vocab in s for s in shapes)
        return "lm_head" if head else "matmuls"
    if any(key in name for key in ATTENTION):
        return "attention"
    if name.startswith(SAMPLING):
        return "sampling"
    if name.startswith(ELEMENTWISE):
        return "elementwise"
    return "other ops"


def breakdown(engine: Engine, prompts: list[list[int]], new_tokens: int,
              vocab: int) -> tuple[float, dict[str, float]]:
    """Wall seconds of one generate, and each kind's share of it."""
    sampling = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    engine.generate(prompts, sampling)  # warm-up
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        engine.generate(prompts, sampling)
        wall = time.perf_counter() - start
    seconds = dict.fromkeys(KINDS, 0.0)
    for event in prof.key_averages(group_by_input_shape=True):
        kind = kind_of(event.key, event.input_shapes, vocab)
        seconds[kind] += event.self_cpu_time_total / 1e6
    seconds["python"] = max(0.0, wall - sum(seconds.values()))
    return wall, {k: v / wall for k, v in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=list(PRESETS), default="smollm2-135m")
    source.add_argument("--model", type=Path)
    parser.add_argument("--preset-dir", type=Path)
    args = parser.parse_args()
    model_dir = args.model or make_preset(
        args.preset, args.preset_dir or Path(tempfile.mkdtemp(prefix="tandem-profile-")))
    vocab = ModelConfig.from_dir(model_dir).vocab_size
    print(f"model: {args.model or args.preset}, threads: {torch.get_num_threads()}; "
          "share of wall time")
    print("| dtype | workload | generate ms | " + " | ".join(KINDS) + " |")
    print("| --- " * (3 + len(KINDS)) + "|")
    for dtype in args.dtypes:
        engine = Engine(model_dir, EngineConfig(
            dtype=dtype, num_blocks=4096, block_size=16, max_num_batched_tokens=8192,
            max_num_seqs=256, enable_prefix_caching=False))
        runs = [(f"decode batch {b}", decode_workload(b).prompts, 16) for b in args.batches]
        runs.append(("prefill 8x512", prefill_workload().prompts[:8], 1))
        for name, prompts, new_tokens in runs:
            wall, shares = breakdown(engine, prompts, new_tokens, vocab)
            print(f"| {dtype} | {name} | {wall * 1e3:,.0f} | "
                  + " | ".join(f"{shares[k]:.0%}" for k in KINDS) + " |", flush=True)


if __name__ == "__main__":
    main()
