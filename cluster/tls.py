"""TLS on every port: the certificate files a process is given, and the credentials each kind of
port is built from.

One `TlsConfig` (flattened into every role's flags: `--tls-cert`, `--tls-key`, `--tls-ca`,
`--insecure-plaintext`, or `TANDEM_TLS_*`) says either "TLS with these PEM files" or, chosen
explicitly, "plaintext". A process that is given neither refuses to start (`require_choice`):
there is no silent plaintext.

    worker gRPC      server cert, client cert REQUIRED, signed by `tls_ca` (mutual TLS)
    router → worker  the router's cert as client cert; the worker's cert checked against tls_ca
    router gRPC      server cert; client certs not asked (bearer tokens are the auth)
    OpenAI HTTP      same as the router's gRPC (uvicorn's ssl options, `uvicorn_options`)
    /metrics         same cert, https, no client cert (Prometheus needs only the CA)

The CA is the cluster's trust root: every router and worker certificate is signed by it, and a
worker answers any client whose certificate it signed (plus the cluster secret, which the
internal services still require, `cluster.cluster_secret`). Files are read when a server or
channel is built: rotating certificates means restarting the process (a Kubernetes rollout).
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

_FILES = ("tls_cert", "tls_key", "tls_ca")


@dataclass(frozen=True)
class TlsConfig:
    """Certificate files, or plaintext chosen explicitly; `mode` says which."""

    tls_cert: str | None = field(default=None, metadata={
        "help": "PEM certificate (chain) this process presents: as server on every port, and "
                "as client to the workers (the router); with --tls-key and --tls-ca"})
    tls_key: str | None = field(default=None, metadata={
        "help": "PEM private key of --tls-cert"})
    tls_ca: str | None = field(default=None, metadata={
        "help": "PEM CA bundle of the cluster: workers accept only client certificates it "
                "signed (mutual TLS), and clients check servers against it"})
    insecure_plaintext: bool = field(default=False, metadata={
        "help": "serve and call without TLS (local runs only; anyone on the network can read "
                "and forge the traffic); without it, --tls-cert/--tls-key/--tls-ca are "
                "required"})

    def __post_init__(self) -> None:
        for name in _FILES:
            if getattr(self, name) == "":
                raise ValueError(f"{name}: must not be empty (a PEM file's path)")
        given = [n for n in _FILES if getattr(self, n) is not None]
        if self.insecure_plaintext and given:
            raise ValueError(f"insecure_plaintext: conflicts with {', '.join(given)} "
                             f"(choose TLS or plaintext, not both)")
        if given and len(given) != len(_FILES):
            missing = [n for n in _FILES if n not in given]
            raise ValueError(f"{', '.join(missing)}: required with {', '.join(given)} (TLS "
                             f"needs a certificate, its key and the cluster CA)")

    @property
    def mode(self) -> str:
        """"tls", "plaintext" (chosen), or "unset" (neither: refused by `require_choice`)."""
        if self.insecure_plaintext:
            return "plaintext"
        return "tls" if self.tls_cert is not None else "unset"

    @property
    def enabled(self) -> bool:
        """TLS is on (`require_choice` has been met with files)."""
        return self.require_choice() == "tls"

    @property
    def scheme(self) -> str:
        """"https" or "http": how to write an HTTP URL of this process."""
        return "https" if self.enabled else "http"

    def require_choice(self) -> str:
        """`mode`, "tls" or "plaintext"; ValueError naming the flags when neither was chosen."""
        if self.mode == "unset":
            raise ValueError("tls_cert: TLS is required: give --tls-cert, --tls-key and "
                             "--tls-ca (TANDEM_TLS_CERT, TANDEM_TLS_KEY, TANDEM_TLS_CA), or "
                             "choose plaintext explicitly with --insecure-plaintext "
                             "(TANDEM_INSECURE_PLAINTEXT=1)")
        return self.mode

    def files(self) -> TlsFiles:
        """The three files, read (TLS must be on)."""
        assert self.tls_cert and self.tls_key and self.tls_ca, "TLS is not on"
        return TlsFiles.read(self.tls_cert, self.tls_key, self.tls_ca)

    # ---- gRPC ----------------------------------------------------------------------------

    def server_credentials(self, require_client_cert: bool) -> grpc.ServerCredentials | None:
        """Credentials of a gRPC server port (None: plaintext); `require_client_cert`: mutual
        TLS, only clients whose certificate the CA signed get through the handshake."""
        if not self.enabled:
            return None
        files = self.files()
        return grpc.ssl_server_credentials(
            [(files.key, files.cert)],
            root_certificates=files.ca if require_client_cert else None,
            require_client_auth=require_client_cert)

    def channel(self, address: str, *, server_name: str | None = None,
                interceptors: Sequence[aio.ClientInterceptor] = (),
                options: Sequence[tuple[str, Any]] = ()) -> aio.Channel:
        """A channel to `address` presenting this process's certificate (mutual TLS) and
        checking the server's against the CA; plaintext when chosen. `server_name`: the name
        the server's certificate must carry, when not the address's host (pod IPs)."""
        if not self.enabled:
            return aio.insecure_channel(address, options=options, interceptors=interceptors)
        files = self.files()
        credentials = grpc.ssl_channel_credentials(files.ca, files.key, files.cert)
        return aio.secure_channel(address, credentials,
                                  options=[*options, *_name_override(server_name)],
                                  interceptors=interceptors)

    # ---- HTTP ----------------------------------------------------------------------------

    def uvicorn_options(self) -> dict[str, Any]:
        """uvicorn.Config's TLS options (empty: plaintext); client certs are not asked."""
        if not self.enabled:
            return {}
        return {"ssl_certfile": self.tls_cert, "ssl_keyfile": self.tls_key}

    def metrics_options(self) -> dict[str, Any]:
        """prometheus_client.start_http_server's TLS options (empty: plaintext)."""
        if not self.enabled:
            return {}
        return {"certfile": self.tls_cert, "keyfile": self.tls_key}


PLAINTEXT = TlsConfig(insecure_plaintext=True)


@dataclass(frozen=True)
class TlsFiles:
    """The PEM bytes of a certificate, its key and the CA bundle."""

    cert: bytes
    key: bytes
    ca: bytes

    @classmethod
    def read(cls, cert: str, key: str, ca: str) -> TlsFiles:
        """Reads the three files; ValueError naming the field of one that is missing."""
        found: dict[str, bytes] = {}
        for name, path in (("tls_cert", cert), ("tls_key", key), ("tls_ca", ca)):
            try:
                found[name] = Path(path).read_bytes()
            except OSError as error:
                raise ValueError(f"{name}: cannot read {path}: {error.strerror}") from None
            if b"-----BEGIN " not in found[name]:
                raise ValueError(f"{name}: {path} is not a PEM file")
        return cls(found["tls_cert"], found["tls_key"], found["tls_ca"])


def client_channel(address: str, ca: str | None, *, cert: str | None = None,
                   key: str | None = None, server_name: str | None = None,
                   interceptors: Sequence[aio.ClientInterceptor] = ()) -> aio.Channel:
    """A client's channel to a Tandem server (the router's public API): TLS checked against
    `ca` (with `cert`/`key` presented when given), plaintext when `ca` is None."""
    if ca is None:
        return aio.insecure_channel(address, interceptors=interceptors)
    if (cert is None) != (key is None):
        raise ValueError("tls_cert, tls_key: give both or neither")
    credentials = grpc.ssl_channel_credentials(
        _read("tls_ca", ca), _read("tls_key", key) if key else None,
        _read("tls_cert", cert) if cert else None)
    return aio.secure_channel(address, credentials, options=_name_override(server_name),
                              interceptors=interceptors)


def client_ssl_context(ca: str | None) -> ssl.SSLContext | bool:
    """For an HTTP client (httpx `verify=`): a context trusting `ca`, or the system's CAs."""
    if ca is None:
        return True
    _read("ca", ca)  # a clear error naming the file before any connection
    return ssl.create_default_context(cafile=ca)


def _name_override(server_name: str | None) -> list[tuple[str, Any]]:
    return [] if server_name is None else [("grpc.ssl_target_name_override", server_name)]


def _read(name: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"{name}: cannot read {path}: {error.strerror}") from None
