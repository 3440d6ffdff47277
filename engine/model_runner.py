"""Builds a step's `ForwardBatch` from scheduled requests, runs the model on it and samples
the next tokens: the engine's `StepRunner` when a model is loaded."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from engine.block_manager import BlockManager
from engine.cpu_features import compute_dtype
from engine.forward_batch import ForwardBatch
from engine.kernels import cpu_ops
from engine.model.linear import can_prepack
from engine.model.llama import LayerCallback, LlamaModel
from engine.request import Request
from engine.sampler import sample
from engine.scheduler import ScheduledBatch
from engine.step_runner import StepTokens


class ModelRunner:
    """Owns the model and the KV cache tensor; turns requests into tensors and back."""

    def __init__(self, model: LlamaModel, kv_cache: torch.Tensor, block_size: int,
                 device: torch.device) -> None:
        self.model = model
        # bf16 on a CPU without bf16 matmuls computes in float32 (engine.cpu_features)
        self.compute_dtype = compute_dtype(model.dtype, device)
        if self.compute_dtype != model.compute_dtype:
            model.use_compute_dtype(self.compute_dtype)
        if can_prepack(device) and not model.packed:
            model.prepack()  # oneDNN's weight layout, once (engine.model.linear)
        self.kv_cache = kv_cache  # [G, N, g, 2, bs, Hkv, D] (engine.kv_cache), model.dtype
        self.block_size = block_size
        self.device = device

    def run(self, batch: ScheduledBatch, block_manager: BlockManager,
            on_layer_done: Callable[[int], None] | None) -> StepTokens:
        """One forward pass over the batch, then sampling (`engine.step_runner.StepRunner`).

        An all-greedy batch takes its argmax where the logits are (on a GPU: only the token
        ids come to the host, not [S', V] floats); any other goes through `engine.sampler`.
        """
        forward, rows = self.build_batch(batch.requests, batch.num_new_tokens, block_manager)
        logits = self.model(forward, self.kv_cache, on_layer_done)  # [S', V] on the device
        samplers = [batch.requests[i] for i in rows]
        if all(r.sampling.greedy for r in samplers):
            return StepTokens(rows, self.greedy(logits).tolist())
        return StepTokens(rows, sample(logits.cpu(), [r.sampling for r in samplers],
                                       [r.output_position for r in samplers]))

    def greedy(self, logits: torch.Tensor) -> torch.Tensor:
        """Each row's argmax `[S']`: the C++ kernel on CPU when the model may use them."""
        if (logits.device.type == "cpu" and logits.dim() == 2 and logits.stride(-1) == 1
                and self.model.cpu_kernels and cpu_ops.available()):
            return cpu_ops.argmax_cpu(logits)  # [S']
        return logits.argmax(dim=-1)  # [S']

    def build_batch(self, requests: Sequence[Request], num_new_tokens: Sequence[int],
                    block_manager: BlockManager) -> tuple[ForwardBatch, list[int]]:
        """The step's tensors, and the indices of `requests` that sample a token."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        logits_rows: list[int] = []
        sampling_requests: list[int] = []
        for i, (request, num_new) in enumerate(zip(requests, num_new_tokens, strict=True)):
            start = request.num_computed_tokens
            end = start + num_new
            blocks = block_manager.block_ids(request.request_id)
            input_ids.extend(request.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            query_start.append(query_start[-1] + num_new)
            seq_lens.append(end)
            tables.append(blocks[:-(-end // bs)])
            if end == request.num_tokens:  # the last known token: its logits give the next
                logits_rows.append(query_start[-1] - 1)
                sampling_requests.append(i)
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        dev = self.device
        batch = ForwardBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.int64, device=dev),  # [T]
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),  # [T]
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),  # [T]
            block_tables=torch.tensor(padded, dtype=torch.int32, device=dev),  # [S, width]
            query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=dev),  # [S+1]
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),  # [S]
            max_query_len=max(num_new_tokens),
            max_seq_len=max(seq_lens),
            logits_indices=torch.tensor(logits_rows, dtype=torch.int64, device=dev),  # [S']
            request_ids=tuple(r.request_id for r in requests),
        )
        return batch, sampling_requests

    def forward(self, batch: ForwardBatch,
                on_layer_done: LayerCallback | None = None) -> torch.Tensor:
        """Next-token logits [S', V] float32 on the CPU."""
        return self.model(batch, self.kv_cache, on_layer_done).cpu()
