"""vLLM's environment in the bench: as many OpenMP threads as the in-process engines, offline,
the GPU choice passed through and nothing else of the bench's environment."""

from __future__ import annotations

import pytest

from engine.bench.vllm_client import vllm_env


def test_vllm_gets_the_torch_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PYTHONPATH", "/somewhere/tandem")
    assert vllm_env(2) == {"HF_HUB_OFFLINE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
                           "PATH": "/usr/bin:/bin", "VLLM_CPU_KVCACHE_SPACE": "2"}
    assert vllm_env(16)["VLLM_CPU_OMP_THREADS_BIND"] == "0-15"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert vllm_env(1)["CUDA_VISIBLE_DEVICES"] == "1"
    assert vllm_env(1)["VLLM_CPU_OMP_THREADS_BIND"] == "0-0"
