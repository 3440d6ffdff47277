"""vLLM's CPU build as a bench contender: `vllm_runner.py` in a subprocess, which runs one
workload per request and is SIGSTOP'd between its turns (`PausedGroup`) so that its processes
and threads leave the CPU to the other engines."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch

from engine.bench.interleave import ContenderGone
from engine.bench.paused_group import PausedGroup
from engine.bench.workloads import Workload

VLLM_SCRIPT = Path(__file__).with_name("vllm_runner.py")
CLOSE_S = 60.0  # for vLLM to shut down its engine process after its stdin closes
# vLLM's KV cache: the largest workload (128 sequences of 192 tokens, or 32 of 513) needs
# 0.6 GiB in bf16 and 1.1 GiB in fp32 at the 135M shape; 4 GiB got vLLM's worker OOM-killed
# on a shared 24 GiB VM
KV_CACHE_GIB = 2


class VllmRunner:
    """vLLM's CPU build in a subprocess (engine start-up is ~50 s), one workload per call.

    It starts undisturbed; after it answers READY it is stopped, and each call resumes it for
    its run only. With `stop_between=False` it stays running (to measure what it uses then).
    """

    def __init__(self, python: str, model_dir: Path, dtype: str, works: list[Workload],
                 stop_between: bool = True) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump([{"prompts": w.prompts, "new_tokens": w.new_tokens,
                        "count_prompt": w.count_prompt} for w in works], f)
        self.works = works
        self.stop_between = stop_between
        self.group = PausedGroup(
            [python, str(VLLM_SCRIPT), str(model_dir), dtype, f.name], text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=vllm_env(torch.get_num_threads()))
        self.proc = self.group.proc
        try:
            self._answer("READY")
            if stop_between:
                self.group.stop()
        except BaseException:
            self.group.kill()
            raise

    def _answer(self, prefix: str) -> list[str]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # vLLM's own log lines come here too
            if line.startswith(prefix):
                return line.split()
        raise RuntimeError(f"vLLM exited ({self.proc.wait()}) before answering {prefix}")

    def _run(self, i: int) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{i}\n")
        self.proc.stdin.flush()
        _, index, tokens, seconds = self._answer("RESULT")
        work = self.works[i]
        expected = (sum(map(len, work.prompts)) if work.count_prompt
                    else len(work.prompts) * work.new_tokens)
        assert int(index) == i and int(tokens) == expected, f"vLLM counted {tokens} tokens"
        return int(tokens) / float(seconds)

    def __call__(self, i: int) -> float:
        """Tokens/s of workload `i`; `ContenderGone` (its group killed) if vLLM has died, e.g.
        its worker OOM-killed on a shared machine, so that the bench goes on without it."""
        try:
            if not self.stop_between:
                return self._run(i)
            with self.group.turn():
                return self._run(i)
        except (RuntimeError, BrokenPipeError) as err:
            if self.proc.poll() is None:
                raise
            self.group.kill()
            raise ContenderGone(f"vLLM exited ({self.proc.returncode}): {err}") from err

    def close(self, failed: bool = False) -> None:
        """Let vLLM shut down (resumed, stdin closed); kill its group if it has not within
        CLOSE_S, or at once when the bench `failed` (an exception, Ctrl-C)."""
        if self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        self.group.close(0.0 if failed else CLOSE_S)



def vllm_env(threads: int) -> dict[str, str]:
    """vLLM's environment: offline, its OpenMP threads as many as the in-process engines' torch
    threads (cores 0..threads-1; vLLM's default binds a whole NUMA node, more than torch uses on
    a big host), and the GPU choice passed through; nothing else of this process's."""
    env = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}",
           "PATH": "/usr/bin:/bin", "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB)}
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        env["CUDA_VISIBLE_DEVICES"] = os.environ["CUDA_VISIBLE_DEVICES"]
    return env
