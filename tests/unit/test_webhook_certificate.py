"""The webhook's self-signed certificate: the names the API server calls it by, usable by Python's ssl."""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path

from cryptography import x509

from finetune_operator.adapters.webhook import WebhookServer, self_signed_certificate


def test_the_certificate_names_every_host_and_address_and_loads_into_ssl(tmp_path: Path) -> None:
    cert, key = WebhookServer.build_certificate(["127.0.0.1", "operator.local", "127.0.0.1"])
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
        tmp_path / "tls.crt", tmp_path / "tls.key"
    )
    parsed = x509.load_pem_x509_certificate(cert)
    names = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert names.get_values_for_type(x509.DNSName) == ["operator.local"]
    # Self-signed: it is its own CA bundle, which is what kopf puts into the webhook configuration.
    parsed.verify_directly_issued_by(parsed)


def test_each_start_makes_a_new_key() -> None:
    assert self_signed_certificate(["127.0.0.1"])[1] != self_signed_certificate(["127.0.0.1"])[1]
