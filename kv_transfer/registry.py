"""Backends by name (`TransferConfig.backend`), and the one call that builds an agent."""

from __future__ import annotations

from kv_transfer.agent import BaseAgent
from kv_transfer.base import TransferConfig
from kv_transfer.nixl_backend import NixlAgent
from kv_transfer.spec import KVLayoutSpec
from kv_transfer.ucxx_backend import UcxxAgent

BACKENDS: dict[str, type[BaseAgent]] = {"nixl": NixlAgent, "ucxx": UcxxAgent}


def create_agent(spec: KVLayoutSpec, config: TransferConfig) -> BaseAgent:
    """An agent of `config.backend` for a cache of layout `spec` (register the cache next)."""
    try:
        cls = BACKENDS[config.backend]
    except KeyError:
        raise ValueError(f"backend: unknown {config.backend!r} "
                         f"(known: {', '.join(sorted(BACKENDS))})") from None
    return cls(spec, config)
