"""Shared fixtures for the KV transfer tests: UCX quiet, local agents closed after each test."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from kvt_peer import CONFIG, SPEC, random_cache

from kv_transfer import KVLayoutSpec, TransferEvent, create_agent
from kv_transfer.agent import BaseAgent

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")  # inherited by the spawned peers


@pytest.fixture
def make_agent() -> Iterator[Callable[..., tuple[BaseAgent, Any]]]:
    """make_agent(backend, spec=SPEC, num_blocks=64, seed=0, **config) → (agent, its cache)."""
    agents: list[BaseAgent] = []

    def make(backend: str, spec: KVLayoutSpec = SPEC, num_blocks: int = 64, seed: int = 0,
             **config: Any) -> tuple[BaseAgent, Any]:
        agent = create_agent(spec, replace(CONFIG, backend=backend, **config))
        cache = random_cache(spec, num_blocks, seed)  # [G, N, g, 2, bs, Hkv, D]
        agent.register_cache(cache)
        agents.append(agent)
        return agent, cache

    yield make
    for agent in agents:
        agent.close()


def poll_until(agent: BaseAgent, want: int, timeout: float) -> list[TransferEvent]:
    """Polls until `want` events arrived or `timeout` passed; returns what arrived."""
    events: list[TransferEvent] = []
    deadline = time.monotonic() + timeout
    while len(events) < want and time.monotonic() < deadline:
        events += agent.poll()
        time.sleep(0.0005)
    return events


def scattered_ids(rng: np.random.Generator, n: int, num_blocks: int) -> list[int]:
    """`n` distinct block ids made of runs of random length 1-4 in random order (what a decode
    allocator that hands out mostly-adjacent runs produces)."""
    ids = np.arange(num_blocks)
    cuts = np.cumsum(rng.integers(1, 5, size=num_blocks))
    runs = [r for r in np.split(ids, cuts[cuts < num_blocks]) if len(r)]
    order = rng.permutation(len(runs))
    return [int(b) for i in order for b in runs[i]][:n]
