"""What the chart's pods get is what the Tandem processes need: the rendered environment builds
the real RouterConfig and WorkerConfig, the Redis URL parses as redis-py parses it, probes and
the drain fit the workers' stop, RBAC is least privilege, the NetworkPolicies open what the
processes use and no more, and the alerts and dashboard come from their one source in deploy/.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import json_format
from redis.asyncio.connection import parse_url

from cluster.roles import Role
from cluster.worker_config import WorkerConfig, worker_flags
from discovery.pods import ROLE_LABEL
from index.redis_client import RedisConfig
from openai_api.schemas import ChatCompletionRequest
from planner.config import PlannerConfig, planner_flags
from router.config import RouterConfig, router_flags
from tandem_proto.tandem.v1 import router_pb2
from tests.deploy.chart import (
    CHART,
    CI_VALUES,
    REPO,
    container_env,
    find,
    helm,
    render,
)
from tests.deploy.fakes import FakeCluster
from tests.support.prometheus_server import promtool

CI = {p.stem.removesuffix("-values"): p for p in CI_VALUES}
ALL_ON = ["monitoring.serviceMonitor.enabled=true", "monitoring.prometheusRule.enabled=true",
          "monitoring.grafanaDashboard.enabled=true"]
WORKER_ROLES = ("prefill", "decode", "aggregated")


def deployments(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Tandem's Deployments by component (router, prefill, ...), Redis left out."""
    return {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in docs
            if d["kind"] == "Deployment"
            and d["metadata"]["labels"]["app.kubernetes.io/component"] != "redis"}


def worker_config(deployment: dict[str, Any], role: str) -> WorkerConfig:
    # the aggregated role runs the decode worker's code (decode_worker.aggregated)
    fixed = Role(role) if role in {r.value for r in Role} else Role.DECODE
    return worker_flags().build(argparse.Namespace(), container_env(deployment), role=fixed)


@pytest.mark.parametrize("values", [None, *CI_VALUES],
                         ids=lambda p: "defaults" if p is None else p.stem)
def test_the_rendered_environment_builds_the_real_configs(values: Path | None) -> None:
    """Every variable the chart sets parses, into the dataclasses the processes build; a worker
    on its pod address has its transfer secret (else it would refuse to start)."""
    docs = render([values] if values else None)
    found = deployments(docs)
    router: RouterConfig = router_flags().build(argparse.Namespace(),
                                                container_env(found["router"]))
    assert (router.listen, router.http_listen, router.metrics_listen) == \
        ("0.0.0.0:50051", "0.0.0.0:8000", "0.0.0.0:9090")
    # TLS by default, from the mounted Secret; the router checks workers for one fixed name
    assert router.tls.require_choice() == "tls" and router.worker_tls_name == "tandem-worker"
    assert router.tls.tls_ca == "/etc/tandem/tls/ca.crt"
    for role in WORKER_ROLES:
        if role not in found:
            continue
        config = worker_config(found[role], role)
        assert config.host == "10.1.2.3" and config.id == "pod-0"
        assert config.transfer_token and config.listen == "0.0.0.0:9000"
        assert config.redis_url == router.redis_url and config.namespace == router.namespace
        assert config.model == router.model
        assert config.engine.block_size == router.block_size
        assert config.engine.hash_seed == router.hash_seed
        assert config.tls == router.tls
        RedisConfig(url=config.redis_url or "")


def test_gpu_workers_get_their_gpus_and_settings() -> None:
    found = deployments(render([CI["gpu-autoscaling"]]))
    prefill, decode = worker_config(found["prefill"], "prefill"), worker_config(
        found["decode"], "decode")
    assert prefill.engine.device == "cuda" and decode.engine.device == "cuda:0"
    assert decode.engine.kv_cache_bytes == 20 * 2**30  # a whole number stays an int
    assert prefill.engine.max_num_batched_tokens == 16384
    assert prefill.engine.kv_cache_fraction == 0.85
    for role in ("prefill", "decode"):
        container = found[role]["spec"]["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        pod = found[role]["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_the_redis_url_is_what_redis_py_reads() -> None:
    """External Redis over TLS: the password from its Secret (expanded by Kubernetes) and the
    TLS files as the URL's arguments, as redis-py's own parser reads them."""
    docs = render([CI["external-redis"]])
    env = container_env(deployments(docs)["decode"])
    assert env["REDIS_PASSWORD"] == "secret-password"
    parsed = parse_url(env["TANDEM_REDIS_URL"])
    assert parsed["host"] == "redis.data.svc.cluster.local" and parsed["port"] == 6380
    assert parsed["db"] == 2 and parsed["password"] == "secret-password"
    assert parsed["connection_class"].__name__ == "SSLConnection"
    tls = {k: v for k, v in parsed.items() if k.startswith("ssl_")}  # type: ignore[attr-defined]
    assert tls == {"ssl_ca_certs": "/etc/tandem/redis-tls/ca.crt",
                   "ssl_certfile": "/etc/tandem/redis-tls/tls.crt",
                   "ssl_keyfile": "/etc/tandem/redis-tls/tls.key"}
    pod = deployments(docs)["decode"]["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["redis-tls"]["mountPath"] == "/etc/tandem/redis-tls"
    assert {v["name"]: v for v in pod["volumes"]}["redis-tls"]["secret"]["secretName"] == \
        "tandem-redis-tls"
    assert env["OTEL_EXPORTER_OTLP_CERTIFICATE"] == "/etc/tandem/otlp-tls/ca.crt"
    # nothing the chart generates: the Secrets are the operator's
    assert [d for d in docs if d["kind"] == "Secret"] == []
    assert not any(d["metadata"]["name"].endswith("-redis") for d in docs)


def test_chart_made_secrets_are_random_and_kept() -> None:
    secrets = [d for d in render() if d["kind"] == "Secret"]
    assert {s["metadata"]["name"] for s in secrets} == {"t-tandem-transfer", "t-tandem-redis",
                                                        "t-tandem-tls"}
    for secret in secrets:
        assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        if secret["type"] == "kubernetes.io/tls":
            continue  # tests/deploy/test_chart_tls.py
        (value,) = secret["data"].values()
        assert len(value) >= 40  # base64 of 32 or 48 random characters


def test_probes_are_grpc_health_and_the_drain_fits_the_grace() -> None:
    plaintext = deployments(render(sets=["aggregated.enabled=true", "tls.enabled=false"]))
    for name, deployment in plaintext.items():  # the kubelet's own gRPC probe
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        port = {p["name"]: p["containerPort"] for p in container["ports"]}["grpc"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": port}, (name, probe)
        assert container_env(deployment)["TANDEM_INSECURE_PLAINTEXT"] == "1"
    for name, deployment in deployments(render(sets=["aggregated.enabled=true"])).items():
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        port = {p["name"]: p["containerPort"] for p in container["ports"]}["grpc"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            # TLS: the kubelet's gRPC probe speaks plaintext only; cluster.health_probe asks
            assert container[probe]["exec"]["command"] == [
                "python", "-m", "cluster.health_probe", "--port", str(port),
                "--server-name", "tandem-worker"], (name, probe)
        sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
        if name == "router":
            # the router gives in-flight requests 10 s (cluster/process.py ProcessOptions)
            assert pod["terminationGracePeriodSeconds"] >= sleep + 10
            continue
        grace = float(container_env(deployment)["TANDEM_SHUTDOWN_GRACE_S"])
        assert pod["terminationGracePeriodSeconds"] > sleep + grace, name
    decode = deployments(render())["decode"]
    assert container_env(decode)["TANDEM_SHUTDOWN_GRACE_S"] == "120"
    assert decode["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 140


def rules_of(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    return {d["metadata"]["name"]: d["rules"] for d in docs
            if d["kind"] in ("Role", "ClusterRole")}


def test_rbac_is_least_privilege() -> None:
    """No API access by default (Redis discovery); discovery reads pods; only the planner may
    scale, and only Deployments."""
    default = render()
    assert rules_of(default) == {}
    accounts = {d["metadata"]["name"]: d for d in default if d["kind"] == "ServiceAccount"}
    assert {n: a["automountServiceAccountToken"] for n, a in accounts.items()} == \
        {"t-tandem-router": False, "t-tandem-worker": False}

    docs = render([CI["kubernetes-discovery"]])
    assert rules_of(docs) == {
        "t-tandem-discovery": [{"apiGroups": [""], "resources": ["pods"],
                                "verbs": ["get", "list", "watch"]}],
        "t-tandem-planner": [
            {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list"]},
            {"apiGroups": ["apps"], "resources": ["deployments/scale"],
             "verbs": ["get", "patch", "update"]}]}
    bindings = {d["metadata"]["name"]: d["subjects"][0]["name"] for d in docs
                if d["kind"] == "RoleBinding"}
    assert bindings == {"t-tandem-discovery": "t-tandem-router",
                        "t-tandem-planner": "t-tandem-planner"}
    assert not any(d["kind"].startswith("Cluster") for d in docs)
    found = deployments(docs)
    assert found["router"]["spec"]["template"]["spec"]["automountServiceAccountToken"] is True
    for role in WORKER_ROLES:
        assert found[role]["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_discovery_and_planner_wiring() -> None:
    """The variables the discovery code and `tandem scale` read (names agreed with them)."""
    found = deployments(render([CI["kubernetes-discovery"]]))
    router: RouterConfig = router_flags().build(argparse.Namespace(),
                                                container_env(found["router"]))
    assert router.discovery == "kubernetes"
    assert router.kubernetes.kubernetes_namespace == "serving"
    assert router.kubernetes.kubernetes_label_selector == (
        "app.kubernetes.io/name=tandem,app.kubernetes.io/instance=t,"
        "tandem.ai/role in (prefill,decode,aggregated)")
    for role in WORKER_ROLES:  # the selector matches every worker pod, and no other pod
        labels = found[role]["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/component"] == labels[ROLE_LABEL] == role
    for name in ("router", "planner"):
        assert ROLE_LABEL not in found[name]["spec"]["template"]["metadata"]["labels"]
    planner = found["planner"]
    assert planner["spec"]["template"]["spec"]["containers"][0]["command"] == ["tandem", "scale"]
    scale: PlannerConfig = planner_flags().build(argparse.Namespace(), container_env(planner))
    assert scale.router == "t-tandem-router:50051"
    assert (scale.prefill_deployment, scale.decode_deployment) == \
        (found["prefill"]["metadata"]["name"], found["decode"]["metadata"]["name"])
    assert scale.interval_s == 15
    # the planner owns the prefill and decode replica counts: helm leaves them alone
    assert "replicas" not in found["prefill"]["spec"] and "replicas" not in found["decode"]["spec"]
    assert found["aggregated"]["spec"]["replicas"] == 2
    assert found["aggregated"]["spec"]["template"]["spec"]["containers"][0]["command"] == \
        ["python", "-m", "decode_worker.aggregated"]
    assert container_env(deployments(render())["router"])["TANDEM_DISCOVERY"] == "redis"


def test_network_policies() -> None:
    docs = render()
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    workers = policies["t-tandem-workers"]
    by_port = {json.dumps(rule["ports"]): rule["from"] for rule in workers["ingress"]}
    router_pods = {"matchLabels": {"app.kubernetes.io/name": "tandem",
                                   "app.kubernetes.io/instance": "t",
                                   "app.kubernetes.io/component": "router"}}
    assert by_port[json.dumps([{"protocol": "TCP", "port": 9000}])] == \
        [{"podSelector": router_pods}]
    transfer = [{"protocol": "TCP", "port": 32768, "endPort": 60999}]
    assert by_port[json.dumps(transfer)] == [{"podSelector": workers["podSelector"]}]
    assert by_port[json.dumps([{"protocol": "TCP", "port": 9090}])] == [
        {"namespaceSelector": {}, "podSelector": {
            "matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]
    # the processes use that range: the kernel's (control listener) and UCX's are pinned to it
    for role in ("prefill", "decode"):
        deployment = deployments(docs)[role]
        sysctls = deployment["spec"]["template"]["spec"]["securityContext"]["sysctls"]
        assert sysctls == [{"name": "net.ipv4.ip_local_port_range", "value": "32768 60999"}]
        assert container_env(deployment)["UCX_TCP_PORT_RANGE"] == "32768-60999"
    redis_from = policies["t-tandem-redis"]["ingress"][0]["from"]
    assert redis_from == [{"podSelector": router_pods}, {"podSelector": workers["podSelector"]}]
    # restricted router callers: the planner is still let in
    restricted = render([CI["external-redis"]], sets=["planner.enabled=true"])
    router = {d["metadata"]["name"]: d["spec"] for d in restricted
              if d["kind"] == "NetworkPolicy"}["t-tandem-router"]
    assert router["ingress"][0]["from"] == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "ingress"}}}]
    assert any(peer.get("podSelector", {}).get("matchLabels", {}).get(
        "app.kubernetes.io/component") == "planner"
        for rule in router["ingress"] for peer in rule.get("from", []))


def test_autoscaled_roles_leave_replicas_to_the_hpa() -> None:
    docs = render([CI["gpu-autoscaling"]])
    hpas = {d["spec"]["scaleTargetRef"]["name"]: d["spec"] for d in docs
            if d["kind"] == "HorizontalPodAutoscaler"}
    assert set(hpas) == {"t-tandem-router", "t-tandem-prefill", "t-tandem-decode"}
    for name in hpas:
        assert "replicas" not in find(docs, "Deployment", name)["spec"]
    assert hpas["t-tandem-prefill"]["metrics"] == [{"type": "Pods", "pods": {
        "metric": {"name": "tandem_num_requests_waiting"},
        "target": {"type": "AverageValue", "averageValue": "4"}}}]
    kinds = [m["type"] for m in hpas["t-tandem-decode"]["metrics"]]
    assert kinds == ["Resource", "Pods"]


def test_custom_metrics_exist_and_the_adapter_example_serves_them() -> None:
    """The HPA's metric names are gauges the workers export, and the Prometheus Adapter example
    has a rule naming each."""
    cluster = FakeCluster()
    cluster.traffic()
    exported = cluster.sample_names()
    adapter = yaml.safe_load((CHART / "examples" / "prometheus-adapter-values.yaml").read_text())
    served = {rule["name"]["as"] for rule in adapter["rules"]["custom"]}
    used = {m["name"] for role in ("prefill", "decode") for m in yaml.safe_load(
        CI["gpu-autoscaling"].read_text())[role]["autoscaling"]["customMetrics"]}
    assert used <= served <= exported
    for rule in adapter["rules"]["custom"]:
        (name,) = re.findall(r"^(tandem_\w+)\{", rule["seriesQuery"])
        assert name == rule["name"]["as"]


def test_alerts_and_dashboard_have_one_source(tmp_path: Path) -> None:
    """The PrometheusRule's groups are deploy/prometheus/alerts.yaml's (the chart reads it
    through a link), they pass `promtool check rules`, and the dashboard ConfigMap holds
    deploy/grafana/tandem-dashboard.json byte for byte, labelled for the Grafana sidecar."""
    for name, target in (("alerts.yaml", "deploy/prometheus/alerts.yaml"),
                         ("tandem-dashboard.json", "deploy/grafana/tandem-dashboard.json")):
        link = CHART / "files" / name
        assert link.is_symlink() and link.resolve() == (REPO / target).resolve()
    docs = render(sets=ALL_ON)
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    alerts = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yaml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]
    rendered = tmp_path / "rendered-rules.yaml"
    rendered.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = promtool("check", "rules", str(rendered))
    count = sum(len(g["rules"]) for g in alerts["groups"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {count} rules found" in result.stdout + result.stderr
    (dashboard,) = [d for d in docs if d["kind"] == "ConfigMap"]
    source = (REPO / "deploy" / "grafana" / "tandem-dashboard.json").read_text()
    assert dashboard["data"]["tandem-dashboard.json"] == source.rstrip("\n")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_notes_tell_how_to_call_the_router() -> None:
    """NOTES.txt (rendered by an offline dry-run install): the port-forward, a curl whose body
    the HTTP API's own schema accepts, and grpcurl calls whose JSON is a valid GenerateRequest."""
    run = helm("install", "t", str(CHART), "--namespace", "serving", "--dry-run=client")
    assert run.returncode == 0, run.stderr
    notes = run.stdout.split("NOTES:", 1)[1]
    assert "kubectl -n serving port-forward svc/t-tandem-router 50051:50051 8000:8000" in notes
    body = re.search(r"-d '(\{.*?\})'", notes, re.S)
    assert body is not None and \
        "curl -N --cacert tandem-ca.crt https://127.0.0.1:8000/v1/chat/completions" in notes
    assert "get secret t-tandem-tls -o jsonpath='{.data.ca\\.crt}'" in notes
    request = ChatCompletionRequest.model_validate_json(body[1])
    assert request.model == "SmolLM2-135M-Instruct"
    grpc_body = re.search(r"grpcurl -cacert tandem-ca.crt -d '(\{.*?\})'", notes)
    assert grpc_body is not None
    generate = json_format.Parse(grpc_body[1], router_pb2.GenerateRequest())
    assert generate.text and generate.sampling.max_tokens == 32
    assert "tandem.v1.Router/Generate" in notes and "grpc.health.v1.Health/Check" in notes
