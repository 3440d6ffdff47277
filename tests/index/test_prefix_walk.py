"""The longest-prefix walk the pipelined reader and the in-memory tail share."""

from __future__ import annotations

from index.prefix_walk import PrefixWalk


def walk(blocks: list[set[str]], workers: set[str] | None = None) -> dict[str, int]:
    prefix = PrefixWalk(workers)
    for holders in blocks:
        if prefix.over or not prefix.step(holders):
            break
    return prefix.result()


def test_each_worker_gets_its_run_of_leading_blocks() -> None:
    blocks = [{"a", "b", "c"}, {"a", "b"}, {"a"}, {"a", "c"}]
    assert walk(blocks) == {"a": 4, "b": 2, "c": 1}  # c's 4th block does not count: a gap


def test_only_followed_workers_count() -> None:
    assert walk([{"a", "b"}, {"a", "b"}], workers={"b", "z"}) == {"b": 2}
    assert walk([{"a"}], workers=set()) == {}


def test_a_miss_on_the_first_block_matches_nothing() -> None:
    assert walk([set(), {"a"}]) == {}
    assert walk([]) == {}
