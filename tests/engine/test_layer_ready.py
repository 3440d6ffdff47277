"""Layer-group readiness: the CPU marker is done at once, a CUDA event once the group's kernels
ran (on TANDEM_TEST_DEVICE=cuda), and queued actions run in order, never before their marker."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from engine.layer_ready import CpuReady, CudaReady, ReadyQueue, record_ready
from tests.support.device import device_under_test


class Gate:
    """A marker opened by the test: stands for a group whose kernels are still running."""

    def __init__(self) -> None:
        self.open = False
        self.waited = 0

    def done(self) -> bool:
        return self.open

    def wait(self) -> None:
        self.waited += 1
        self.open = True  # what a blocking wait ends with


def test_cpu_marker_is_done_at_once() -> None:
    ready = record_ready(torch.device("cpu"))
    assert isinstance(ready, CpuReady) and ready.done()
    ready.wait()
    with pytest.raises(ValueError, match="^device: no readiness marker for meta"):
        record_ready(torch.device("meta"))


def test_cpu_actions_run_at_the_first_chance() -> None:
    queue, ran = ReadyQueue(), list[int]()
    for group in range(3):
        queue.push(record_ready(torch.device("cpu")), partial(ran.append, group))
        assert queue.run_ready() == 1
    assert ran == [0, 1, 2] and len(queue) == 0


def test_actions_wait_for_their_marker_and_keep_their_order() -> None:
    queue, ran = ReadyQueue(), list[int]()
    gates = [Gate(), Gate(), Gate()]
    for group, gate in enumerate(gates):
        queue.push(gate, partial(ran.append, group))
    assert queue.run_ready() == 0 and ran == []  # group 0 still running: nothing posts
    gates[1].open = True
    assert queue.run_ready() == 0 and ran == []  # group 1 done, but never before group 0
    gates[0].open = True
    assert queue.run_ready() == 2 and ran == [0, 1]
    assert queue.run_all() == 1 and ran == [0, 1, 2] and gates[2].waited == 1
    assert len(queue) == 0 and queue.run_all() == 0


def test_marker_on_the_device_under_test_follows_the_kernels() -> None:
    """On CUDA: an event recorded behind a long matmul chain is done only after it; the result
    the host reads after `wait` is the finished one."""
    device = device_under_test()
    x = torch.ones(512, 512, device=device)  # [n, n]
    for _ in range(20):
        x = torch.tanh(x @ x / 512)  # [n, n], launched, maybe not run
    ready = record_ready(device)
    assert isinstance(ready, CudaReady if device.type == "cuda" else CpuReady)
    ready.wait()
    assert ready.done()
    assert torch.isfinite(x).all()
