"""Transfer grants (cluster/transfer_grant.py): each way a Prefill target can differ from what
a decode worker reserved is refused, naming the grant."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from cluster import transfer_grant
from cluster.errors import Forbidden

SECRET = "grant-secret"
TARGET = transfer_grant.target_of("req-1.0", "decode-a", "127.0.0.1:4000", "c0ffee",
                                  [7, 8, 9], 1, expires_unix_ms=10_000)
NOW = 5_000


def test_the_signed_target_passes() -> None:
    transfer_grant.verify(SECRET, TARGET, transfer_grant.sign(SECRET, TARGET), NOW)


@pytest.mark.parametrize("change", [
    {"block_ids": tuple(range(1024))},  # the poisoning attack: every block of the cache
    {"block_ids": (7, 8, 10)},
    {"num_cached_blocks": 0},
    {"endpoint_metadata": "10.9.9.9:4000"},  # another address
    {"worker_id": "decode-b"},
    {"compat_hash": "beef"},
    {"request_id": "req-2.0"},  # another attempt's reservation
    {"expires_unix_ms": 99_000},  # a lease stretched by the caller
])
def test_a_target_other_than_the_granted_one_is_refused(change: dict[str, Any]) -> None:
    mac = transfer_grant.sign(SECRET, TARGET)
    with pytest.raises(Forbidden, match="target.grant: does not cover this target"):
        transfer_grant.verify(SECRET, dataclasses.replace(TARGET, **change), mac, NOW)


def test_a_missing_a_foreign_or_a_non_decode_grant_is_refused() -> None:
    with pytest.raises(Forbidden, match="target.grant: missing"):
        transfer_grant.verify(SECRET, TARGET, b"", NOW)
    with pytest.raises(Forbidden, match="does not cover"):  # another cluster's secret
        transfer_grant.verify(SECRET, TARGET, transfer_grant.sign("other", TARGET), NOW)
    with pytest.raises(Forbidden, match="not signed by a decode worker"):  # aggregated signer
        transfer_grant.verify(SECRET, TARGET, transfer_grant.sign(SECRET, TARGET, "aggregated"),
                              NOW)


def test_an_expired_grant_is_refused() -> None:
    mac = transfer_grant.sign(SECRET, TARGET)
    with pytest.raises(Forbidden, match="target.grant: expired: .* ended 1 ms ago"):
        transfer_grant.verify(SECRET, TARGET, mac, TARGET.expires_unix_ms + 1)
