"""TLS end to end on a real local cluster: router and workers serving TLS from a throwaway CA,
mutual TLS between them, a router with a bearer token, a Redis with a password.

- the openai SDK over https (trusting the CA) and the gRPC client over TLS get the same greedy
  tokens; without a token: 401 / UNAUTHENTICATED, over TLS;
- a plaintext client on a TLS port fails (and the server logs the failed handshake);
- a worker refuses a client with no certificate, one signed by another CA, and an expired one
  from the cluster's own CA; the router's certificate alone still needs the cluster secret;
- /metrics is https with the same certificate.
"""

from __future__ import annotations

import datetime
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from grpc import aio

from cli.local_cluster import LocalCluster
from cli.router_client import RouterClient
from cli.throwaway_ca import ClusterCerts, Issued, issue, make_ca, write_cluster_certs
from cluster.tls import client_channel
from tandem_proto.tandem.v1 import common_pb2, worker_pb2_grpc
from tests.e2e.helpers import cluster_auth

pytestmark = pytest.mark.timeout(300)

TOKEN = "tls-e2e-token"


@dataclass
class TlsCluster:
    cluster: LocalCluster
    certs: ClusterCerts
    ca: Issued  # the cluster CA, key included, to issue more certificates

    def write(self, name: str, issued: Issued) -> tuple[str, str]:
        cert, key = self.certs.folder / f"{name}.pem", self.certs.folder / f"{name}-key.pem"
        issued.write(cert, key)
        return str(cert), str(key)


@pytest.fixture(scope="module")
def tls(tiny_chat_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsCluster]:
    logs = tmp_path_factory.mktemp("tls-cluster-logs")
    ca = make_ca()
    certs = write_cluster_certs(logs / "certs", ca=ca)
    tokens = logs / "api-tokens"
    tokens.write_text(f"{TOKEN}\n")
    with LocalCluster(tiny_chat_llama, prefill=1, decode=1, log_dir=logs, tls=certs,
                      worker_args=["--num-blocks", "64"],
                      router_args=["--api-tokens-file", str(tokens)], api_token=TOKEN,
                      redis_password="tls-e2e-redis-pw") as running:
        yield TlsCluster(running, certs, ca)


async def test_openai_sdk_over_https_and_grpc_over_tls_serve_the_same_tokens(
        tls: TlsCluster) -> None:
    cluster, ca = tls.cluster, str(tls.certs.ca)
    assert cluster.http_url.startswith("https://127.0.0.1:")
    async with RouterClient(cluster.router_address, TOKEN, ca=ca) as client:
        grpc_reply = await client.complete(text="Once upon a time", max_tokens=6)
    assert grpc_reply.completion_tokens == 6
    verify = ssl.create_default_context(cafile=ca)  # the openai SDK over https, trusting the CA
    with openai.OpenAI(base_url=f"{cluster.http_url}/v1", api_key=TOKEN, max_retries=0,
                       http_client=openai.DefaultHttpxClient(verify=verify)) as sdk:
        reply = sdk.completions.create(model="llama-chat", prompt="Once upon a time",
                                       max_tokens=6, temperature=0)
    assert reply.choices[0].text == grpc_reply.text
    with openai.OpenAI(base_url=f"{cluster.http_url}/v1", api_key="wrong", max_retries=0,
                       http_client=openai.DefaultHttpxClient(verify=verify)) as mallory, \
            pytest.raises(openai.AuthenticationError):
        mallory.models.list()
    no_token = httpx.get(f"{cluster.http_url}/v1/models", verify=verify)
    assert no_token.status_code == 401


async def test_grpc_without_a_token_is_unauthenticated_over_tls(tls: TlsCluster) -> None:
    async with RouterClient(tls.cluster.router_address, None, ca=str(tls.certs.ca)) as client:
        with pytest.raises(aio.AioRpcError) as refused:
            await client.complete(text="Hello", max_tokens=2)
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_plaintext_clients_on_tls_ports_fail(tls: TlsCluster) -> None:
    cluster = tls.cluster
    async with RouterClient(cluster.router_address, TOKEN) as plaintext:  # no CA: plaintext
        with pytest.raises(aio.AioRpcError) as failed:
            await plaintext.complete(text="Hello", max_tokens=2)
    assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "Handshake failed" in cluster.router.log()  # the server says why
    http = cluster.http_url.replace("https://", "http://")
    with pytest.raises(httpx.HTTPError):  # the TLS server drops a plaintext request
        httpx.get(f"{http}/health", timeout=5)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{cluster.http_url}/health", timeout=5)  # the system's CAs: untrusted
    verify = ssl.create_default_context(cafile=str(tls.certs.ca))
    assert httpx.get(f"{cluster.http_url}/health", verify=verify).status_code == 200


async def worker_status(address: str, ca: str, cert: str | None = None,
                        key: str | None = None) -> common_pb2.WorkerStatus:
    async with client_channel(address, ca, cert=cert, key=key) as channel:
        return await worker_pb2_grpc.WorkerStub(channel).Status(
            common_pb2.StatusRequest(), timeout=5, metadata=cluster_auth())


async def test_workers_answer_only_clients_with_a_live_certificate_of_the_cluster_ca(
        tls: TlsCluster) -> None:
    (decode,) = tls.cluster.workers("decode")
    ca = str(tls.certs.ca)
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
    callers = {
        "no client certificate": (None, None),
        "another CA's": tls.write("stranger", issue(make_ca("another CA"), "stranger")),
        "expired": tls.write("expired", issue(tls.ca, "old", days=1, not_before=long_ago)),
    }
    for who, (cert, key) in callers.items():
        with pytest.raises(aio.AioRpcError) as refused:
            await worker_status(decode.address, ca, cert, key)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE, who
    assert "Handshake failed" in decode.log()
    status = await worker_status(decode.address, ca, str(tls.certs.client_cert),
                                 str(tls.certs.client_key))
    assert status.load.kv_blocks_total == 64
    # a certificate is not enough: the internal services still want the cluster secret
    async with client_channel(decode.address, ca, cert=str(tls.certs.client_cert),
                              key=str(tls.certs.client_key)) as channel:
        with pytest.raises(aio.AioRpcError) as refused:
            await worker_pb2_grpc.WorkerStub(channel).Status(common_pb2.StatusRequest(),
                                                             timeout=5)
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_metrics_are_https_with_the_cluster_certificate(tls: TlsCluster) -> None:
    (prefill,) = tls.cluster.workers("prefill")
    context = ssl.create_default_context(cafile=str(tls.certs.ca))
    for process in (tls.cluster.router, prefill):
        url = f"https://{process.metrics_address}/metrics"
        with urllib.request.urlopen(url, timeout=5, context=context) as reply:
            assert b"# TYPE " in reply.read()
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://{prefill.metrics_address}/metrics", timeout=5)
