"""Warm-up at worker start: compile the Triton kernels before the first request pays for it.

Triton compiles a kernel for each new specialisation the first time it is launched (seconds
per kernel on a GPU). A worker that did not warm up makes its first request wait for the
prefill and the decode variants of `paged_attention` and for `store_kv`. `warm_up` runs one
prefill forward and one decode forward of a dummy sequence through the model, on the engine's
real cache, in blocks that are free at start, without the scheduler or the block manager: no
request, no allocation, no block event, nothing in the prefix cache. The dummy K/V left in
those blocks is garbage like any free block's (a block is written before it is read).

On the torch path (the CPU) what compiles is the C++ CPU kernels (`engine.kernels.cpu_ops`,
~20 s the first time on a machine, then loaded from their build cache); `warm_up` builds them
unless `EngineConfig.cpu_kernels` is off. The simulated engine compiles nothing: it returns
at once.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from engine.forward_batch import ForwardBatch
from engine.kernels import cpu_ops, select_backend
from engine.model_runner import ModelRunner

if TYPE_CHECKING:
    from engine.engine import Engine

log = logging.getLogger(__name__)


def warm_up(engine: Engine) -> float | None:
    """Runs a dummy prefill and decode when the Triton kernels will run, or builds the C++ CPU
    kernels on the torch path; returns the seconds it took, or None when there was
    nothing to do. Call before the engine serves anything."""
    runner = engine.runner
    if not isinstance(runner, ModelRunner):
        return None  # the sim computes nothing
    if select_backend(runner.kv_cache) != "triton":
        if runner.device.type != "cpu" or not engine.config.cpu_kernels:
            return None
        started = time.perf_counter()
        ready = cpu_ops.available()
        seconds = time.perf_counter() - started
        log.info("warm-up: C++ CPU kernels %s in %.2f s", "ready" if ready else "unavailable",
                 seconds)
        return seconds
    if engine.block_manager.num_free_blocks != engine.num_blocks:
        raise RuntimeError("warm_up: the engine already holds blocks; warm up before serving")
    started = time.perf_counter()
    bs = engine.config.block_size
    # a prompt over two blocks plus one token (so a partial block), then one decode token
    prompt_len = min(2 * bs + 1, engine.max_model_len - 1, engine.num_blocks * bs - 1)
    blocks = list(range(-(-(prompt_len + 1) // bs)))
    runner.forward(_dummy_batch(runner, engine, blocks, prompt_len, 0, prompt_len))
    runner.forward(_dummy_batch(runner, engine, blocks, prompt_len + 1, prompt_len, 1))
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    runner.model.decode_mirror.forget()
    seconds = time.perf_counter() - started
    log.info("warm-up: Triton kernels ready in %.2f s", seconds)
    return seconds


def _dummy_batch(runner: ModelRunner, engine: Engine, blocks: list[int], seq_len: int,
                 start: int, num_new: int) -> ForwardBatch:
    """One sequence of token 0s: its tokens [start, start + num_new) of `seq_len` in `blocks`."""
    bs, dev = engine.config.block_size, runner.device
    positions = list(range(start, start + num_new))
    slots = [blocks[p // bs] * bs + p % bs for p in positions]
    return ForwardBatch(
        input_ids=torch.zeros(num_new, dtype=torch.int64, device=dev),  # [T]
        positions=torch.tensor(positions, dtype=torch.int64, device=dev),  # [T]
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),  # [T]
        block_tables=torch.tensor([blocks], dtype=torch.int32, device=dev),  # [1, nb]
        query_start_loc=torch.tensor([0, num_new], dtype=torch.int32, device=dev),  # [2]
        seq_lens=torch.tensor([seq_len], dtype=torch.int32, device=dev),  # [1]
        max_query_len=num_new, max_seq_len=seq_len,
        logits_indices=torch.tensor([num_new - 1], dtype=torch.int64, device=dev),  # [1]
        request_ids=("warm-up",))
