"""`python -m cluster.health_probe --port 9000`: asks this pod's own server for its
`grpc.health.v1` status, over TLS, and exits 0 when it is SERVING (1 otherwise).

The Helm chart's probes when TLS is on: the kubelet's native gRPC probe speaks plaintext only,
and a worker's port requires a client certificate. The probe reads the process's own TLS
variables (`TANDEM_TLS_CERT`, `TANDEM_TLS_KEY`, `TANDEM_TLS_CA`, or
`TANDEM_INSECURE_PLAINTEXT`), presents the certificate and checks the server's against the CA
under `--server-name` (the name every certificate of the chart carries; 127.0.0.1 may not be
in one). It imports grpc and the health stubs only: a fraction of a second of CPU a probe.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.settings import ConfigFlags
from cluster.tls import TlsConfig


def tls_from_env(environ: Mapping[str, str]) -> TlsConfig:
    """The process's TLS choice from its `TANDEM_*` variables, as its own flags read them."""
    flags = ConfigFlags(TlsConfig)
    return flags.build(argparse.Namespace(), environ)


def check(port: int, tls: TlsConfig, server_name: str | None, timeout_s: float) -> int:
    """The health status of 127.0.0.1:`port` (health_pb2.HealthCheckResponse values)."""
    address = f"127.0.0.1:{port}"
    if tls.require_choice() == "plaintext":
        channel = grpc.insecure_channel(address)
    else:
        files = tls.files()
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        channel = grpc.secure_channel(
            address, grpc.ssl_channel_credentials(files.ca, files.key, files.cert), options)
    with channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=timeout_s)
    return int(reply.status)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.health_probe", description=__doc__)
    parser.add_argument("--port", type=int, required=True, help="the gRPC port on 127.0.0.1")
    parser.add_argument("--server-name", help="the name the server's certificate must carry "
                                              "(default: 127.0.0.1)")
    parser.add_argument("--timeout-s", type=float, default=4.0)
    args = parser.parse_args(argv)
    try:
        status = check(args.port, tls_from_env(os.environ), args.server_name, args.timeout_s)
    except (grpc.RpcError, ValueError) as error:
        print(f"health probe: {error}", file=sys.stderr)
        return 1
    if status != health_pb2.HealthCheckResponse.SERVING:
        print(f"health probe: {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
