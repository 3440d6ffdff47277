"""The device the device-aware tests run on: `TANDEM_TEST_DEVICE` (default `cpu`).

The same tests run on the CPU in CI and on a GPU in `scripts/gpu_check.sh`
(`TANDEM_TEST_DEVICE=cuda`). Asking for CUDA where there is none is an error, never a skip: a
run that claims to have tested the GPU path must have run it.
"""

from __future__ import annotations

import os

import torch

DEVICE_ENV = "TANDEM_TEST_DEVICE"


def device_under_test() -> torch.device:
    """`TANDEM_TEST_DEVICE` as a torch device; raises if it names a CUDA device that is absent."""
    device = torch.device(os.environ.get(DEVICE_ENV) or "cpu")
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"{DEVICE_ENV}={device}: expected cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{DEVICE_ENV}={device}, but torch sees no CUDA device "
                           f"(torch {torch.__version__})")
    return device


