"""TLS on a real gRPC server over loopback: mutual TLS lets in only clients whose certificate the
cluster CA signed and that has not expired; a plaintext client fails; the config refuses
half-given files and refuses to serve when neither TLS nor plaintext was chosen."""

from __future__ import annotations

import argparse
import asyncio
import datetime
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from cli.throwaway_ca import ClusterCerts, Issued, issue, make_ca, write_cluster_certs
from cluster import health_probe
from cluster.grpc_server import GrpcServer, start_server
from cluster.process import ProcessOptions, serve_until_stopped
from cluster.roles import Role
from cluster.settings import ConfigFlags
from cluster.tls import PLAINTEXT, TlsConfig, client_channel
from cluster.worker_config import worker_flags
from router.config import router_flags

pytestmark = pytest.mark.timeout(60)


@dataclass(frozen=True)
class Pki:
    certs: ClusterCerts
    tls: TlsConfig
    folder: Path

    def write(self, name: str, issued: Issued) -> tuple[str, str]:
        cert, key = self.folder / f"{name}.pem", self.folder / f"{name}-key.pem"
        issued.write(cert, key)
        return str(cert), str(key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    certs = write_cluster_certs(folder / "cluster")
    tls = TlsConfig(tls_cert=str(certs.cert), tls_key=str(certs.key), tls_ca=str(certs.ca))
    return Pki(certs, tls, folder)


@pytest.fixture
async def mtls_server(pki: Pki) -> AsyncIterator[GrpcServer]:
    """A server like a worker's: client certificates required (health is enough to call)."""
    server = await start_server([], credentials=pki.tls.server_credentials(True))
    yield server
    await server.stop(grace=None)


async def health(channel: aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                            timeout=5)
    return int(reply.status)


async def refused(channel: aio.Channel) -> str:
    """The details of the failure of a call on `channel` (it must fail UNAVAILABLE: the TLS
    handshake never completes, so no call reaches a servicer)."""
    async with channel:
        with pytest.raises(aio.AioRpcError) as info:
            await health(channel)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE, info.value
    return info.value.details() or ""


async def test_a_client_certificate_signed_by_the_cluster_ca_gets_through(
        pki: Pki, mtls_server: GrpcServer) -> None:
    async with pki.tls.channel(mtls_server.address) as channel:  # the router's way
        assert await health(channel) == health_pb2.HealthCheckResponse.SERVING
    async with client_channel(mtls_server.address, str(pki.certs.ca),
                              cert=str(pki.certs.client_cert),
                              key=str(pki.certs.client_key)) as channel:
        assert await health(channel) == health_pb2.HealthCheckResponse.SERVING


async def test_a_client_without_a_certificate_is_refused(pki: Pki,
                                                         mtls_server: GrpcServer) -> None:
    await refused(client_channel(mtls_server.address, str(pki.certs.ca)))


async def test_a_certificate_signed_by_another_ca_is_refused(pki: Pki,
                                                             mtls_server: GrpcServer) -> None:
    cert, key = pki.write("stranger", issue(make_ca("another CA"), "stranger"))
    await refused(client_channel(mtls_server.address, str(pki.certs.ca), cert=cert, key=key))


async def test_an_expired_certificate_is_refused(pki: Pki, mtls_server: GrpcServer) -> None:
    ca = make_ca()  # a CA of the cluster's own: only the expiry is wrong
    (pki.folder / "ca2.pem").write_bytes(ca.cert_pem())
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
    server_tls = TlsConfig(*pki.write("server2", issue(ca, "node")), tls_ca=str(pki.folder /
                                                                                "ca2.pem"))
    server = await start_server([], credentials=server_tls.server_credentials(True))
    try:
        cert, key = pki.write("expired", issue(ca, "old", days=1, not_before=long_ago))
        await refused(client_channel(server.address, str(pki.folder / "ca2.pem"), cert=cert,
                                     key=key))
        cert, key = pki.write("fresh", issue(ca, "new"))
        async with client_channel(server.address, str(pki.folder / "ca2.pem"), cert=cert,
                                  key=key) as channel:  # the same CA, in date: let in
            assert await health(channel) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(grace=None)


async def test_a_plaintext_client_against_a_tls_port_fails(mtls_server: GrpcServer) -> None:
    await refused(aio.insecure_channel(mtls_server.address))


async def test_a_server_certificate_from_another_ca_is_not_trusted(pki: Pki) -> None:
    other = make_ca("another CA")
    (pki.folder / "other-ca.pem").write_bytes(other.cert_pem())
    server = await start_server([], credentials=pki.tls.server_credentials(False))
    try:
        await refused(client_channel(server.address, str(pki.folder / "other-ca.pem")))
        # the router's public port asks no client certificate: the CA alone is enough
        async with client_channel(server.address, str(pki.certs.ca)) as channel:
            assert await health(channel) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(grace=None)


async def test_workers_dialled_by_ip_are_checked_against_a_fixed_name(pki: Pki) -> None:
    """Pod IPs are in no certificate: the router checks `worker_tls_name` instead."""
    ca = make_ca()
    (pki.folder / "ca3.pem").write_bytes(ca.cert_pem())
    cert, key = pki.write("named", issue(ca, "worker", dns=("tandem-worker",), ips=()))
    tls = TlsConfig(cert, key, str(pki.folder / "ca3.pem"))
    server = await start_server([], credentials=tls.server_credentials(True))
    try:
        await refused(tls.channel(server.address))  # 127.0.0.1 is not in the certificate
        async with tls.channel(server.address, server_name="tandem-worker") as channel:
            assert await health(channel) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(grace=None)


def test_tls_files_come_in_threes_and_exclude_plaintext(pki: Pki) -> None:
    with pytest.raises(ValueError, match="tls_key, tls_ca: required with tls_cert"):
        TlsConfig(tls_cert="c.pem")
    with pytest.raises(ValueError, match="insecure_plaintext: conflicts with tls_cert"):
        TlsConfig(tls_cert="c", tls_key="k", tls_ca="a", insecure_plaintext=True)
    with pytest.raises(ValueError, match="tls_ca: must not be empty"):
        TlsConfig(tls_ca="")
    with pytest.raises(ValueError, match="--insecure-plaintext"):
        TlsConfig().require_choice()
    assert PLAINTEXT.require_choice() == "plaintext" and PLAINTEXT.scheme == "http"
    assert pki.tls.require_choice() == "tls" and pki.tls.scheme == "https"
    missing = TlsConfig(str(pki.folder / "nope.pem"), str(pki.certs.key), str(pki.certs.ca))
    with pytest.raises(ValueError, match="tls_cert: cannot read .*nope.pem"):
        missing.server_credentials(True)
    junk = pki.folder / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(ValueError, match="tls_cert: .*junk.pem is not a PEM file"):
        TlsConfig(str(junk), str(pki.certs.key), str(pki.certs.ca)).files()


def test_every_role_takes_the_tls_flags_and_variables() -> None:
    argv = ["--model", "/m", "--redis-url", "redis://r:1/0", "--tls-cert", "c", "--tls-key", "k"]
    roles: list[tuple[ConfigFlags[Any], dict[str, Any]]] = [
        (worker_flags(), {"role": Role.DECODE}), (router_flags(), {})]
    for flags, fixed in roles:
        parser = argparse.ArgumentParser()
        flags.add_to(parser)
        config = flags.build(parser.parse_args(argv), {"TANDEM_TLS_CA": "a"}, **fixed)
        assert (config.tls.tls_cert, config.tls.tls_key, config.tls.tls_ca) == ("c", "k", "a")
        plain = flags.build(parser.parse_args(argv[:4]), {"TANDEM_INSECURE_PLAINTEXT": "1"},
                            **fixed)
        assert plain.tls == PLAINTEXT


async def test_a_process_with_neither_tls_nor_plaintext_chosen_does_not_serve() -> None:
    options = ProcessOptions(name="t", listen="127.0.0.1:0", metrics_registry=CollectorRegistry())
    with pytest.raises(ValueError, match="TLS is required"):
        await serve_until_stopped([], options)


async def test_the_chart_probe_reads_the_process_tls_variables(
        pki: Pki, mtls_server: GrpcServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m cluster.health_probe`, the chart's probe under TLS (the kubelet's gRPC probe
    speaks plaintext only): SERVING with the pod's own certificate, a failure without one."""
    port = ["--port", str(mtls_server.port), "--server-name", "tandem-worker"]
    for name, value in (("TANDEM_TLS_CERT", pki.certs.cert), ("TANDEM_TLS_KEY", pki.certs.key),
                        ("TANDEM_TLS_CA", pki.certs.ca)):
        monkeypatch.setenv(name, str(value))
    assert await asyncio.to_thread(health_probe.main, port) == 0
    await mtls_server.set_serving(False)
    assert await asyncio.to_thread(health_probe.main, port) == 1
    await mtls_server.set_serving(True)
    for name in ("TANDEM_TLS_CERT", "TANDEM_TLS_KEY", "TANDEM_TLS_CA"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("TANDEM_INSECURE_PLAINTEXT", "1")  # a plaintext probe: refused
    assert await asyncio.to_thread(health_probe.main, port) == 1
