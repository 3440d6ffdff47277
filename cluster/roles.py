"""The roles a Tandem worker can play (no dependencies: the policies and the registry share it)."""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    """A worker's role; the value is what the registry stores and the CLI accepts."""

    PREFILL = "prefill"
    DECODE = "decode"
    # prefills and decodes its own requests (a decode worker the router asks to prefill every
    # prompt itself); pairs with no other worker
    AGGREGATED = "aggregated"
