"""`python -m engine.bench.profile_decode` on the generated tiny model: it times decode steps
and lists the ops, with the C++ CPU kernels and without."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("kernels", [True, False])
def test_profiles_decode_steps(tiny_llama: Path, kernels: bool) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "engine.bench.profile_decode", "--model", str(tiny_llama),
         "--batch", "3", "--dtype", "float32", "--prompt-len", "9", "--steps", "2",
         *([] if kernels else ["--no-cpu-kernels"])],
        capture_output=True, text=True, check=True, cwd=Path(__file__).parents[3]).stdout
    assert "batch 3, float32, context ~9: step wall ms [" in out
    assert ("tandem_cpu::paged_decode" in out) is kernels
    assert ("aten::_scaled_dot_product" in out) is not kernels
