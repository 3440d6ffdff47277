"""Short bounded runs against a real local cluster (redis-server, a prefill and a decode worker,
the router, on the tiny Llama with a chat template): over gRPC every output is written, no
request fails and the cluster's own figures are there; over the router's OpenAI-compatible HTTP
API (completions with token ids, chat with text) every request streams to its end."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import matplotlib.image
import pytest

from cli.local_cluster import LocalCluster
from loadtest.cli import main


@pytest.fixture(scope="module")
def cluster(tiny_chat_llama: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """The tiny Llama with a chat template (for the chat endpoint)."""
    logs = tmp_path_factory.mktemp("loadtest-cluster-logs")
    with LocalCluster(tiny_chat_llama, prefill=1, decode=1, log_dir=logs,
                      worker_args=["--num-blocks", "192"]) as running:
        yield running


@pytest.mark.slow
def test_a_bounded_sweep_writes_every_output(cluster: LocalCluster, tiny_chat_llama: Path,
                                             tmp_path: Path) -> None:
    out = tmp_path / "run"
    status = main([
        "run", "--address", cluster.router_address,
        "--metrics-url", f"http://{cluster.router.metrics_address}/metrics",
        "--tokenizer", str(tiny_chat_llama), "--workload", "shared-prefix", "--groups", "2",
        "--users", "5", "--system-len", "64", "--question-len", "uniform:8,24",
        "--output-len", "8", "--rate", "5", "10", "--duration", "30", "--max-requests", "10",
        "--slo-ttft-ms", "2000", "--slo-tpot-ms", "500", "--out", str(out), "--no-progress",
        "--name", "e2e"])
    assert status == 0
    run = json.loads((out / "run.json").read_text())
    assert [p["label"] for p in run["points"]] == ["5 req/s", "10 req/s"]
    for point in run["points"]:
        summary = point["summary"]
        assert summary["requests"] == {"sent": 10, "ok": 10, "errors": 0, "cancelled": 0,
                                       "error_rate": 0.0}
        assert summary["tokens"]["output"] == 80
        assert summary["latency_s"]["ttft"]["count"] == 10
        assert summary["latency_s"]["itl"]["count"] == 70  # one token per message
        # each point has its own cache salt: its 2 system prompts are computed once each
        assert summary["tokens"]["cached_prompt_ratio"] > 0.3
        cluster_figures = point["cluster"]
        assert cluster_figures["transfers_completed"] == 10
        assert cluster_figures["kv_blocks_sent"] > 0
        assert cluster_figures["requests"] == 10
        assert cluster_figures["retries"] == 0 and cluster_figures["local_prefills"] == 0
        assert cluster_figures["prefix_hit_ratio"] > 0.3
        assert cluster_figures["policy"] == "kv_aware"
    text = (out / "summary.md").read_text()
    assert "| 5 req/s | 10 | 10 | 0 | 0 |" in text and "| 10 req/s | 10 | 10 | 0 | 0 |" in text
    for name in ("latency_cdf.png", "throughput.png", "sweep.png"):
        assert matplotlib.image.imread(out / name).ndim == 3


@pytest.mark.slow
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_the_openai_target_against_the_routers_http_api(
        cluster: LocalCluster, tiny_chat_llama: Path, tmp_path: Path, endpoint: str) -> None:
    out = tmp_path / endpoint
    status = main([
        "run", "--target", "openai", "--url", cluster.http_url, "--endpoint", endpoint,
        "--tokenizer", str(tiny_chat_llama), "--input-len", "uniform:16,48", "--output-len", "6",
        "--concurrency", "3", "--duration", "30", "--max-requests", "8", "--out", str(out),
        "--no-progress"])  # no --model: the first /v1/models lists
    assert status == 0
    run = json.loads((out / "run.json").read_text())
    (point,) = run["points"]
    assert run["target"] == "openai-http"
    assert point["summary"]["requests"]["ok"] == 8
    assert point["summary"]["tokens"]["output"] == 48  # usage: ignore_eos held
    for record in point["records"]:
        assert record["finish_reason"] == "length" and record["completion_tokens"] == 6
        assert record["chunk_times"] and record["prompt_tokens"] > 0
        if endpoint == "completions":  # token ids sent as they are
            assert record["prompt_tokens"] == record["input_tokens"]
    assert point["cluster"] == {}  # no gRPC status over HTTP, no --metrics-url
    assert (out / "summary.md").is_file() and (out / "latency_cdf.png").is_file()
