"""The chart's TLS (tls.*): the certificate it makes serves real mutual TLS the way the router
calls workers (by IP, checked for tls.workerServerName); an existing Secret replaces it in every
pod, the planner and the ServiceMonitor; tls.enabled=false is an explicit plaintext choice."""

from __future__ import annotations

import argparse
import base64
from pathlib import Path
from typing import Any

from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.grpc_server import start_server
from cluster.tls import TlsConfig, client_channel
from planner.config import PlannerConfig, planner_flags
from router.config import RouterConfig, router_flags
from tests.deploy.chart import container_env, find, render
from tests.deploy.test_chart_wiring import deployments

SERVICE_NAMES = ["t-tandem-router", "t-tandem-router.serving.svc",
                 "t-tandem-router.serving.svc.cluster.local", "tandem-worker", "localhost"]


def volumes(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}


async def test_the_chart_made_certificate_serves_mutual_tls(tmp_path: Path) -> None:
    secret = find(render(), "Secret", "t-tandem-tls")
    assert secret["type"] == "kubernetes.io/tls"
    for key, value in secret["data"].items():
        (tmp_path / key).write_bytes(base64.b64decode(value))
    cert = x509.load_pem_x509_certificate((tmp_path / "tls.crt").read_bytes())
    cert.verify_directly_issued_by(
        x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes()))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == SERVICE_NAMES
    tls = TlsConfig(str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"),
                    str(tmp_path / "ca.crt"))
    server = await start_server([], credentials=tls.server_credentials(True))  # a worker's
    try:
        # the router's way: its certificate presented, the worker's checked for the name
        async with tls.channel(server.address, server_name="tandem-worker") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(grace=None)
    public = await start_server([], credentials=tls.server_credentials(False))  # the router's
    try:  # a client in the cluster: the CA only, the Service's name
        async with client_channel(public.address, str(tmp_path / "ca.crt"),
                                  server_name="t-tandem-router.serving.svc") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await public.stop(grace=None)


def test_an_existing_secret_is_mounted_everywhere_and_read_by_planner_and_monitor() -> None:
    docs = render(sets=["tls.existingSecret=my-certs", "planner.enabled=true",
                        "monitoring.serviceMonitor.enabled=true"])
    assert not [d for d in docs if d["kind"] == "Secret" and d["type"] == "kubernetes.io/tls"]
    found = deployments(docs)
    for name in ("router", "prefill", "decode"):
        assert volumes(found[name])["tls"]["secret"]["secretName"] == "my-certs", name
    planner = found["planner"]
    assert volumes(planner)["tls"]["secret"] == {
        "secretName": "my-certs", "items": [{"key": "ca.crt", "path": "ca.crt"}]}
    scale: PlannerConfig = planner_flags().build(argparse.Namespace(), container_env(planner))
    assert scale.tls_ca == "/etc/tandem/tls/ca.crt"
    assert scale.router_metrics_url == "https://t-tandem-router:9090/metrics"
    (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"] == {"ca": {"secret": {"name": "my-certs", "key": "ca.crt"}},
                                     "serverName": "tandem-worker"}


def test_tls_off_is_plaintext_chosen_explicitly_everywhere() -> None:
    docs = render(sets=["tls.enabled=false", "planner.enabled=true",
                        "monitoring.serviceMonitor.enabled=true"])
    assert not [d for d in docs if d["kind"] == "Secret" and d["type"] == "kubernetes.io/tls"]
    found = deployments(docs)
    router: RouterConfig = router_flags().build(argparse.Namespace(),
                                                container_env(found["router"]))
    assert router.tls.require_choice() == "plaintext" and router.worker_tls_name is None
    for deployment in found.values():
        assert "tls" not in volumes(deployment)
    scale: PlannerConfig = planner_flags().build(argparse.Namespace(),
                                                 container_env(found["planner"]))
    assert scale.tls_ca is None and scale.router_metrics_url is not None
    assert scale.router_metrics_url.startswith("http://")
    (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert "scheme" not in monitor["spec"]["endpoints"][0]
