"""The aggregated engine: one process that prefills and decodes with continuous batching.

    engine = Engine("path/to/hf-model", EngineConfig(dtype="bfloat16"))
    engine.add_request("r1", token_ids, SamplingParams(max_tokens=32))
    while engine.has_unfinished():
        for out in engine.step(): ...

The prefill and decode workers reuse its parts (model runner, scheduler, block manager).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.block_manager import Allocation, BlockManager
from engine.checkpoint_id import checkpoint_identity
from engine.config import EngineConfig
from engine.cpu_features import compute_dtype
from engine.errors import DuplicateRequest, InvalidInput
from engine.host_malloc import keep_freed_memory
from engine.kv_cache import CacheShape, allocate_kv_cache, blocks_for_budget
from engine.model.llama import LlamaModel
from engine.model_config import ModelConfig
from engine.model_runner import ModelRunner
from engine.request import FinishReason, Request, RequestStatus
from engine.sampling import SamplingParams
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sim.runner import SimRunner, sim_cache_shape, sim_model_id
from engine.weights import iter_weights, resolve_dtype

log = logging.getLogger(__name__)

StepLayerCallback = Callable[[int, ScheduledBatch], None]
"""Called with (layer index, the step's batch) once that layer's K/V of the step is cached."""

CPU_CACHE_CAP_BYTES = 4 * 2**30  # a CPU cache is committed host memory shared with other
# processes on the box: the fraction default is capped unless kv_cache_bytes says otherwise


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int


@dataclass(frozen=True)
class StepInfo:
    """What the last step ran (for step-time and batch-size metrics)."""

    seconds: float
    prefill_tokens: int  # prompt (or recomputed) tokens computed
    decode_seqs: int  # requests that decoded one token
    batch_size: int  # requests in the batch


@dataclass
class EngineStats:
    """Counters the workers export as metrics."""

    steps: int = 0
    prefill_tokens_computed: int = 0  # prompt (and recomputed) tokens run through the model
    decode_tokens_computed: int = 0
    generated_tokens: int = 0
    preemptions: int = 0


class Engine:
    """Loads a model, sizes the paged KV cache, and runs the step loop."""

    def __init__(self, model_dir: str | Path, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.model_config = ModelConfig.from_dir(model_dir)
        mc, cfg = self.model_config, self.config
        # the checkpoint's dtype unless configured: of the weights as loaded and the KV cache
        self.dtype = resolve_dtype(cfg.dtype, mc.dtype)
        self.max_model_len = min(cfg.max_model_len or mc.max_position_embeddings,
                                 mc.max_position_embeddings)
        self.runner: ModelRunner | SimRunner
        if cfg.engine == "sim":
            self._init_sim(model_dir)
        else:
            self._init_model(model_dir)
        self.block_manager = BlockManager(self.num_blocks, cfg.block_size,
                                          cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs,
                                   cfg.max_num_batched_tokens)
        self.stats = EngineStats()
        self.last_step: StepInfo | None = None  # what the latest step ran (None: nothing)
        # the latest step could run nothing and preempted nothing: only a change from outside
        # (a release, an admitted or expired reservation) can let the waiting requests in
        self.stalled = False
        self._requests: dict[str, Request] = {}  # every request the engine knows
        self._reserved: dict[str, Request] = {}  # decode role: awaiting their KV
        self._quarantined: dict[str, list[str]] = {}  # request id → block owner keys held
        self._quarantine_serial = 0
        self._arrivals = 0

    def _init_model(self, model_dir: str | Path) -> None:
        """Loads the weights, sizes and allocates the KV cache, builds the model runner."""
        mc, cfg = self.model_config, self.config
        # content, not folder name: peers with the same id may exchange KV (engine.checkpoint_id)
        self.model_id = checkpoint_identity(model_dir)
        log.info("model %s is %s, running in %s", model_dir, self.model_id,
                 str(self.dtype).removeprefix("torch."))
        if cfg.num_threads is not None:
            torch.set_num_threads(cfg.num_threads)
        self.device = torch.device(cfg.device)
        if self.device.type == "cpu":
            keep_freed_memory()  # no page faults on every step's activations
        model = LlamaModel(mc, self.dtype, self.max_model_len)
        model.decode_mirror.max_bytes = cfg.decode_mirror_bytes
        model.cpu_kernels = cfg.cpu_kernels
        model.load_weights(iter_weights(model_dir, self.dtype))
        model.to(self.device)
        # bf16 on a CPU without bf16 matmuls computes in float32 (engine.cpu_features): widen
        # the weights now, before the KV cache is sized from the memory that is left
        compute = compute_dtype(self.dtype, self.device)
        if compute != model.compute_dtype:
            model.use_compute_dtype(compute)
        self.num_blocks = self._num_blocks()
        self.cache_shape = CacheShape.for_model(mc, self.num_blocks, cfg.block_size,
                                                self.dtype, cfg.kv_layer_group)
        kv_cache = allocate_kv_cache(self.cache_shape, self.device)
        self.runner = ModelRunner(model, kv_cache, cfg.block_size, self.device)

    def _init_sim(self, model_dir: str | Path) -> None:
        """No model: as many blocks as the model would get (sized from its shape), in a tiny
        stand-in cache on the CPU, and the simulated runner (engine.sim)."""
        cfg = self.config
        self.model_id = sim_model_id(model_dir)
        self.device = torch.device("cpu")
        self.num_blocks = self._num_blocks()
        self.cache_shape = sim_cache_shape(self.num_blocks, cfg.block_size)
        self.runner = SimRunner(cfg.sim, self.cache_shape, self.model_config.vocab_size,
                                self.model_config.eos_token_ids)
        log.info("simulated engine for %s (%s): %d blocks, no weights loaded", model_dir,
                 self.model_id, self.num_blocks)

    # ---- requests ------------------------------------------------------------------------

    def validate(self, prompt_token_ids: list[int], sampling: SamplingParams) -> None:
        """Raises `InvalidInput` naming the field if the request can never be served."""
        vocab = self.model_config.vocab_size
        if not prompt_token_ids:
            raise InvalidInput("prompt_token_ids: must not be empty")
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidInput(
                f"prompt_token_ids: ids {bad[:5]} outside the vocabulary [0, {vocab})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidInput(
                f"prompt_token_ids: {len(prompt_token_ids)} tokens leave no room to generate "
                f"within the model's context of {self.max_model_len} tokens")
        try:
            sampling.check_vocab(vocab)
        except ValueError as error:
            raise InvalidInput(str(error)) from None
        most_tokens = min(len(prompt_token_ids) + sampling.max_tokens, self.max_model_len)
        if self.block_manager.blocks_needed(most_tokens) > self.num_blocks:
            raise InvalidInput(
                f"max_tokens: prompt + max_tokens = {most_tokens} tokens need more KV blocks "
                f"than the cache holds ({self.num_blocks} x {self.config.block_size} tokens)")

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    sampling: SamplingParams | None = None, cache_salt: bytes = b"") -> Request:
        """Queues a request after validating it (`InvalidInput` naming the field if invalid)."""
        request = self._new_request(request_id, prompt_token_ids, sampling or SamplingParams(),
                                    cache_salt)
        self._requests[request_id] = request
        self.scheduler.add(request)
        return request

    def _new_request(self, request_id: str, prompt_token_ids: list[int],
                     sampling: SamplingParams, cache_salt: bytes) -> Request:
        if not request_id:
            raise InvalidInput("request_id: must not be empty")
        if request_id in self._requests:
            raise DuplicateRequest(f"request_id: {request_id!r} is already running")
        self.validate(prompt_token_ids, sampling)
        request = Request(request_id, list(prompt_token_ids), sampling, self._arrivals,
                          cache_salt)
        request.init_hashes(self.config.block_size, self.config.hash_seed)
        self._arrivals += 1
        return request

    def abort(self, request_id: str) -> bool:
        """Stops a request wherever it is and frees its blocks. False if unknown."""
        return self.release(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # ---- the step ------------------------------------------------------------------------

    def step(self, on_layer_done: StepLayerCallback | None = None) -> list[RequestOutput]:
        """Runs one scheduled batch through the model; returns each request's new tokens.

        `on_layer_done(layer, batch)` is called as soon as each layer's K/V of this step is in
        the cache (the prefill worker pushes that layer's blocks to the decode worker then).
        """
        started = time.perf_counter()
        self.last_step = None
        batch = self.scheduler.schedule()
        self.stats.preemptions += len(batch.preempted)
        self.stalled = batch.is_empty and not batch.preempted
        if batch.is_empty:
            return []
        prefill_tokens = decode_seqs = 0
        hook = None if on_layer_done is None else (lambda layer: on_layer_done(layer, batch))
        rows, tokens = self.runner.run(batch, self.block_manager, hook)
        samplers = [batch.requests[i] for i in rows]
        self.stats.steps += 1
        for request, num_new in zip(batch.requests, batch.num_new_tokens, strict=True):
            is_decode = num_new == 1 and request.num_output_tokens > 0 and \
                request.num_computed_tokens == request.num_tokens - 1
            if is_decode:
                self.stats.decode_tokens_computed += 1
                decode_seqs += 1
            else:
                self.stats.prefill_tokens_computed += num_new
                prefill_tokens += num_new
            request.num_computed_tokens += num_new
            self.block_manager.commit(request.request_id, request.token_ids,
                                      request.block_hashes, request.num_computed_tokens)
        outputs = []
        for request, token in zip(samplers, tokens, strict=True):
            request.append_output(token)
            self.stats.generated_tokens += 1
            reason = self._finish_reason(request, token)
            if reason is not None:
                self._finish(request, reason)
            outputs.append(self._output(request, [token]))
        self.last_step = StepInfo(time.perf_counter() - started, prefill_tokens, decode_seqs,
                                  len(batch.requests))
        return outputs

    # ---- disaggregated roles -------------------------------------------------------------

    def reserve(self, request_id: str, prompt_token_ids: list[int],
                sampling: SamplingParams | None = None, cache_salt: bytes = b"",
                ) -> Allocation | None:
        """Decode role: allocates blocks for a prompt whose KV another worker will write.

        Blocks this engine already holds by prefix hash come back as cached (their tokens
        need not be sent). Returns None when the blocks are not free now, or when a preempted
        request waits for blocks (it goes first: no starvation). The request waits outside the
        scheduler until `admit_prefilled` (KV complete) or `release`.
        """
        sampling = sampling or SamplingParams()
        request = self._new_request(request_id, prompt_token_ids, sampling, cache_salt)
        if self.scheduler.has_preempted_waiting:
            return None
        allocation = self.block_manager.allocate(request_id, request.token_ids,
                                                 request.block_hashes)
        if allocation is None:
            return None
        request.num_cached_tokens = allocation.num_cached_tokens
        self._requests[request_id] = request
        self._reserved[request_id] = request
        return allocation

    def admit_prefilled(self, request_id: str, first_token: int) -> RequestOutput:
        """Decode role: the prompt's KV has landed; decode from the first sampled token on."""
        request = self._reserved.pop(request_id, None)
        if request is None:
            raise KeyError(f"request_id: no reservation {request_id!r}")
        prompt_len = len(request.prompt_token_ids)
        request.num_computed_tokens = prompt_len
        self.block_manager.commit(request_id, request.token_ids, request.block_hashes,
                                  prompt_len)
        request.append_output(first_token)
        reason = self._finish_reason(request, first_token)
        if reason is not None:
            self._finish(request, reason)
        else:
            self.scheduler.admit_running(request)
        return self._output(request, [first_token])

    def add_prefill_request(self, request_id: str, prompt_token_ids: list[int],
                            sampling: SamplingParams | None = None,
                            cache_salt: bytes = b"") -> Request:
        """Prefill role: computes the prompt and samples one token, then holds the blocks
        (their KV is being sent) until `release`."""
        sampling = sampling or SamplingParams()
        request = self.add_request(request_id, prompt_token_ids,
                                   dataclasses.replace(sampling, max_tokens=1), cache_salt)
        request.hold_blocks = True
        return request

    def release(self, request_id: str) -> bool:
        """Frees whatever a request holds (a reservation, held blocks, or a running or
        waiting request). False if the engine does not know it."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return False
        if self._reserved.pop(request_id, None) is not None or request.is_finished:
            self.block_manager.free(request_id)  # a reservation, or blocks held after prefill
            request.status = RequestStatus.FINISHED
            request.finish_reason = request.finish_reason or FinishReason.CANCELLED
        else:
            self.scheduler.finish(request, FinishReason.CANCELLED)
        return True

    def quarantine(self, request_id: str) -> bool:
        """Like `release`, but the blocks stay allocated until `release_quarantined`: a
        remote write may still be landing in them."""
        request = self._requests.pop(request_id, None)
        reserved = self._reserved.pop(request_id, None)
        if request is None:
            return False
        if reserved is None and not request.is_finished:
            self.scheduler.finish(request, FinishReason.CANCELLED, free=False)
        request.status = RequestStatus.FINISHED
        # the blocks move to a private owner id: the request id itself may be reused at once
        # (the decode worker's local prefill re-adds it)
        self._quarantine_serial += 1
        key = f"quarantine:{self._quarantine_serial}:{request_id}"
        if self.block_manager.has_request(request_id):
            self.block_manager.rename(request_id, key)
            self._quarantined.setdefault(request_id, []).append(key)
        return True

    def release_quarantined(self, request_id: str) -> None:
        """Frees the oldest quarantine of `request_id` (no-op when there is none)."""
        keys = self._quarantined.get(request_id)
        if keys:
            self.block_manager.free(keys.pop(0))
            if not keys:
                del self._quarantined[request_id]

    def num_requests(self) -> int:
        """Requests the engine knows: queued, running, reserved or holding blocks."""
        return len(self._requests)

    def num_queued_prompt_blocks(self) -> int:
        """Prompt blocks (a partial last block counted) of waiting and running requests whose
        KV is not computed yet: the prefill work this engine has accepted."""
        block_size = self.config.block_size
        queued = 0
        for request in (*self.scheduler.waiting, *self.scheduler.running):
            left = len(request.prompt_token_ids) - request.num_computed_tokens
            if left > 0:
                queued += -(-left // block_size)
        return queued

    def generate(self, prompts: list[list[int]],
                 sampling: SamplingParams | None = None) -> list[list[int]]:
        """Runs prompts to completion; returns each one's generated token ids."""
        ids = [f"generate-{self._arrivals + i}" for i in range(len(prompts))]
        for request_id, prompt in zip(ids, prompts, strict=True):
            self.add_request(request_id, prompt, sampling)
        results: dict[str, list[int]] = {i: [] for i in ids}
        while self.has_unfinished():
            for out in self.step():
                results[out.request_id].extend(out.new_token_ids)
        return [results[i] for i in ids]

    # ---- helpers -------------------------------------------------------------------------

    def _finish_reason(self, request: Request, token: int) -> FinishReason | None:
        p = request.sampling
        if token in p.stop_token_ids or (
                not p.ignore_eos and token in self.model_config.eos_token_ids):
            return FinishReason.STOP
        if request.num_output_tokens >= p.max_tokens or request.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, request: Request, reason: FinishReason) -> None:
        """Ends a request; its blocks are freed now, or held (prefill role) until release."""
        self.scheduler.finish(request, reason, free=not request.hold_blocks)
        if not request.hold_blocks:
            del self._requests[request.request_id]

    def _output(self, request: Request, tokens: list[int]) -> RequestOutput:
        return RequestOutput(request.request_id, tokens, request.is_finished,
                             request.finish_reason, len(request.prompt_token_ids),
                             request.num_cached_tokens)

    def _num_blocks(self) -> int:
        cfg, mc = self.config, self.model_config
        if cfg.num_blocks is not None:
            return cfg.num_blocks
        if cfg.kv_cache_bytes is not None:
            budget = cfg.kv_cache_bytes
        elif self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            budget = int(free * cfg.kv_cache_fraction)
        else:
            budget = min(int(_available_host_memory() * cfg.kv_cache_fraction),
                         CPU_CACHE_CAP_BYTES)
        blocks = blocks_for_budget(mc, cfg.block_size, self.dtype, budget)
        if blocks < 1:
            raise ValueError(f"kv_cache_bytes: {budget} bytes hold no KV block of this model")
        return blocks


def _available_host_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo")
