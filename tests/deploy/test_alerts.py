"""deploy/prometheus/alerts.yaml: `promtool check rules`, `promtool test rules` with every alert
firing on a synthetic series, and the rules loaded and evaluated by a real Prometheus."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.conftest import ALERTS, ALERTS_TEST
from tests.deploy.fakes import FakeCluster
from tests.support.prometheus_server import LocalPrometheus, promtool

REQUIRED = {"TandemHighTTFT", "TandemHighITL", "TandemHighErrorRate", "TandemKVCacheNearlyFull",
            "TandemKVTransferFailures", "TandemRouterDegraded", "TandemWorkerDown",
            # fallbacks an operator is paged for (issue #9, bug 7)
            "TandemRegistryHeartbeatsFailing", "TandemPrefixIndexRepublishing",
            "TandemPrefixIndexPublishFailing", "TandemRouterRegistryUnreachable",
            "TandemPrefillPeerUnreachable"}


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(ALERTS))
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert f"SUCCESS: {len(alert_rules())} rules found" in out


def test_promtool_test_rules_every_alert_fires() -> None:
    result = promtool("test", "rules", str(ALERTS_TEST))
    out = result.stdout + result.stderr
    assert result.returncode == 0 and "SUCCESS" in out, out
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    fired = {case["alertname"] for test in tests for case in test.get("alert_rule_test", [])
             if case.get("exp_alerts")}
    names = {rule["alert"] for rule in alert_rules()}
    assert names - fired == set(), f"alerts never shown firing: {names - fired}"


def test_promtool_test_rules_fails_when_a_rule_changes(tmp_path: Path) -> None:
    """The unit tests really pin the rules: a TTFT threshold raised tenfold fails them."""
    shutil.copy(ALERTS_TEST, tmp_path / "alerts_test.yaml")
    text = ALERTS.read_text()
    changed = text.replace("tandem_time_to_first_token_seconds_bucket[5m]))) > 5",
                           "tandem_time_to_first_token_seconds_bucket[5m]))) > 50")
    assert changed != text
    (tmp_path / "alerts.yaml").write_text(changed)
    result = promtool("test", "rules", str(tmp_path / "alerts_test.yaml"))
    assert result.returncode != 0 and "TandemHighTTFT" in result.stdout + result.stderr


def test_alerts_cover_the_issue_and_are_annotated() -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= REQUIRED
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert "for" in rule, f"{rule['alert']} would fire on a single bad evaluation"


def test_alert_metrics_are_exported() -> None:
    cluster = FakeCluster()
    cluster.traffic()
    exported = cluster.sample_names()
    for rule in alert_rules():
        for name in re.findall(r"\btandem_\w+", rule["expr"]):
            assert name in exported, f"{rule['alert']}: {name} is not exported"


def test_prometheus_loads_and_evaluates_the_rules(prometheus: LocalPrometheus) -> None:
    deadline = time.monotonic() + 15
    while True:
        groups = prometheus.api("rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if rules and all(r.get("lastEvaluation", "").startswith("20") and
                         r["health"] != "unknown" for r in rules):
            break
        assert time.monotonic() < deadline, f"rules not evaluated: {rules}"
        time.sleep(0.5)
    assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
    bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not bad, bad
    # the fake cluster is healthy: nothing fires, nothing is even pending
    assert [r["name"] for r in rules if r["state"] != "inactive"] == []

