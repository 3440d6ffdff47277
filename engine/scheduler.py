"""Continuous batching: which requests run in the next step, and how many tokens each.

Each step has a token budget (`max_num_batched_tokens`). Running requests go first, in
arrival order: a decoding request needs one token, a request still prefilling gets the next
chunk of its prompt. Then waiting requests are admitted while the budget, `max_num_seqs` and
free blocks allow; a request is admitted only when blocks for its whole prompt can be
allocated (prefix-cache hits are reused, not recomputed). When a running request needs a new
block and none is free, the most recently arrived running request is preempted: its blocks
are freed and it goes back to the front of the queue to be recomputed later (its full blocks
usually remain in the prefix cache, so recompute is cheap). The preempted request keeps its
generated tokens: recomputing prompt + output gives the logits of its next token, so the tokens
it streams are those of an undisturbed run (and a seeded request's generator simply goes on).

Preemption never deadlocks: a request is validated to fit the whole cache alone
(`Engine.validate`), the oldest running request is preempted last, and in the decode role no
new reservation is granted while a preempted request waits (`has_preempted_waiting`), so the
blocks held outside the scheduler (reservations awaiting KV, quarantines) only drain.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.request import FinishReason, Request, RequestStatus


@dataclass
class ScheduledBatch:
    """One step's work: requests with the number of new tokens each computes."""

    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.requests


class Scheduler:
    """Owns the waiting queue and the running set; the block manager owns the blocks."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in arrival order
        self.num_preemptions = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    @property
    def has_preempted_waiting(self) -> bool:
        """A preempted request waits for blocks: new work should not take them first."""
        return any(r.num_preemptions for r in self.waiting)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._make_room(request, request.num_computed_tokens + num_new, batch):
                break  # the request itself was preempted; everything after it too
            batch.requests.append(request)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
            index += 1
        if batch.preempted:
            return batch  # memory is short: admit nothing new this step
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            allocation = self.block_manager.allocate(
                request.request_id, request.token_ids, request.block_hashes)
            if allocation is None:
                break
            self.waiting.popleft()
            request.num_computed_tokens = allocation.num_cached_tokens
            if request.num_preemptions == 0:
                request.num_cached_tokens = allocation.num_cached_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            batch.requests.append(request)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
        return batch

    def admit_running(self, request: Request) -> None:
        """Adds a request whose KV is already in its blocks (decode role) to the running set."""
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        self.running.sort(key=lambda r: r.arrival)

    def finish(self, request: Request, reason: FinishReason, free: bool = True) -> None:
        """Ends a request (running or waiting) and frees its blocks unless told not to."""
        if request.is_finished:
            return
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        if free:
            self.block_manager.free(request.request_id)

    def _make_room(self, request: Request, num_tokens: int, batch: ScheduledBatch) -> bool:
        """Grows the request's blocks to `num_tokens`, preempting the newest requests if needed.

        Returns False when `request` itself had to be preempted.
        """
        while not self.block_manager.append_slots(request.request_id, num_tokens):
            victim = self.running.pop()
            self._preempt(victim)
            batch.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request.request_id)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
