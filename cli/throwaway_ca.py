"""A throwaway certificate authority for local clusters: `tandem up` and the tests.

    certs = write_cluster_certs(Path(tmp))      # ca.pem, node.pem, node-key.pem, client*.pem
    router: --tls-cert certs.cert --tls-key certs.key --tls-ca certs.ca

One CA signs one node certificate that every process of the local cluster presents, as server
and as client (its SANs: localhost, 127.0.0.1, ::1 and `WORKER_NAME`), and a client
certificate for tools that want one. Keys are ECDSA P-256 (milliseconds to make; RSA-2048 takes
tens). Nothing here is meant for a real cluster: its keys sit unencrypted in a temporary
folder; a real cluster's certificates come from its own CA (cert-manager, a Secret).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# A name every worker certificate carries, for clients that dial workers by IP (pod IPs change;
# the router's `tls_server_name` checks this name instead).
WORKER_NAME = "tandem-worker"
LOCAL_NAMES = ("localhost", WORKER_NAME)
LOCAL_IPS = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class Issued:
    """A key and the certificate issued for it."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    def write(self, cert_path: Path, key_path: Path) -> None:
        cert_path.write_bytes(self.cert_pem())
        key_path.write_bytes(self.key_pem())
        key_path.chmod(0o600)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def make_ca(name: str = "tandem throwaway CA", days: float = 30) -> Issued:
    """A self-signed CA certificate valid from a minute ago for `days`."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start = _now() - datetime.timedelta(minutes=1)
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return Issued(key, cert)


def issue(ca: Issued, name: str, dns: tuple[str, ...] = LOCAL_NAMES,
          ips: tuple[str, ...] = LOCAL_IPS, days: float = 30,
          not_before: datetime.datetime | None = None) -> Issued:
    """A certificate signed by `ca` for `name` and the given SANs, usable as server and as
    client, valid from `not_before` (default: a minute ago) for `days` (a negative `days` with
    an old `not_before` makes an expired one, for tests)."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or _now() - datetime.timedelta(minutes=1)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(ca.cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(
                   [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                   critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return Issued(key, builder.sign(ca.key, hashes.SHA256()))


@dataclass(frozen=True)
class ClusterCerts:
    """The files of a local cluster's TLS: the CA, the node certificate every process presents,
    and a client certificate (for tools that dial workers)."""

    folder: Path
    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path

    def flags(self) -> list[str]:
        """The TLS flags of a router or worker process of this cluster."""
        return ["--tls-cert", str(self.cert), "--tls-key", str(self.key),
                "--tls-ca", str(self.ca)]


def write_cluster_certs(folder: Path, days: float = 30, ca: Issued | None = None) -> ClusterCerts:
    """Makes a CA (or takes `ca`, whose key a test keeps to issue more) and its certificates in
    `folder` (created; keys readable by the owner only; the CA's key is not written)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = ca or make_ca(days=days)
    certs = ClusterCerts(folder, folder / "ca.pem", folder / "node.pem", folder / "node-key.pem",
                         folder / "client.pem", folder / "client-key.pem")
    certs.ca.write_bytes(ca.cert_pem())
    issue(ca, "tandem node", days=days).write(certs.cert, certs.key)
    issue(ca, "tandem client", dns=(), ips=(), days=days).write(certs.client_cert,
                                                                 certs.client_key)
    return certs
