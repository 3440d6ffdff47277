"""The throwaway CA of `tandem up`: what it writes, who signed what, the names and the dates."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from cli.throwaway_ca import WORKER_NAME, issue, make_ca, write_cluster_certs


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_the_cluster_certificates_are_signed_by_their_ca_and_name_loopback(
        tmp_path: Path) -> None:
    certs = write_cluster_certs(tmp_path / "certs", days=2)
    ca, node, client = load(certs.ca), load(certs.cert), load(certs.client_cert)
    node.verify_directly_issued_by(ca)
    client.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = node.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", WORKER_NAME}
    assert set(sans.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
    usages = node.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usages)
    lifetime = node.not_valid_after_utc - node.not_valid_before_utc
    assert datetime.timedelta(days=2) == lifetime
    for key in (certs.key, certs.client_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600  # keys: the owner only
    # what Python's own TLS stack (uvicorn, httpx) makes of them: a server context loads them
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.cert, certs.key)
    assert certs.flags() == ["--tls-cert", str(certs.cert), "--tls-key", str(certs.key),
                             "--tls-ca", str(certs.ca)]


def test_an_old_not_before_and_a_short_life_make_an_expired_certificate() -> None:
    ca = make_ca()
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=3)
    old = issue(ca, "old", days=1, not_before=long_ago)
    assert old.cert.not_valid_after_utc < datetime.datetime.now(datetime.UTC)
    other = make_ca("another CA")
    with pytest.raises(ValueError):  # signed by `ca`, not by `other`
        old.cert.verify_directly_issued_by(other.cert)
