"""Runs the Triton kernels under the interpreter unless the tests run on CUDA
(`TANDEM_TEST_DEVICE=cuda`, tests/support/device.py).

Triton decides when a `@triton.jit` function is *defined* whether it is compiled or
interpreted, so TRITON_INTERPRET must be set before `engine.kernels` is imported; pytest imports
this file before the test modules of this folder. If another test folder imported the kernels
first, they are reloaded here so the tests below get interpreted ones. On CUDA the variable
is left alone and the Triton tests run compiled, for real. Setting it affects only Triton
kernels defined later in this process, which on CPU tensors could not run any other way.
"""

from __future__ import annotations

import importlib
import os
import sys

from tests.support.device import device_under_test

if device_under_test().type == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    for _name in ("engine.kernels.kv_write", "engine.kernels.attention", "engine.kernels"):
        if _name in sys.modules:
            importlib.reload(sys.modules[_name])
