"""The admission webhook's HTTPS server: kopf's, with a self-signed certificate made by `cryptography`.

kopf serves the webhook and, on the local cluster, keeps a ValidatingWebhookConfiguration pointing at
it by URL (`https://HOST:PORT`); only its certificate generator needs kopf's dev extra, so
`build_certificate` is replaced. In a cluster the Helm chart renders the configuration (a Service in
front of the replicas) and the certificate they share (`cert_dir`), so kopf only serves.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Collection

import kopf
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from finetune_operator.settings import WebhookSettings

#: How long a self-signed certificate lasts; the operator makes a new one every start.
CERTIFICATE_DAYS = 365


def self_signed_certificate(hostnames: Collection[str]) -> tuple[bytes, bytes]:
    """A self-signed P-256 certificate (PEM) and its key for `hostnames` (IPs become IP SANs); the
    certificate is its own CA bundle."""
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for name in dict.fromkeys(hostnames):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, next(iter(hostnames)))])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERTIFICATE_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return (
        certificate.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


class WebhookServer(kopf.WebhookServer):
    """kopf's server; its self-signed certificate comes from `self_signed_certificate`."""

    @staticmethod
    def build_certificate(hostnames: Collection[str], password: str | None = None) -> tuple[bytes, bytes]:
        return self_signed_certificate(hostnames)


def build_server(settings: WebhookSettings) -> WebhookServer:
    """The server `settings` describe: its own certificate files when given, else a self-signed one."""
    certfile = f"{settings.cert_dir}/tls.crt" if settings.cert_dir else None
    pkeyfile = f"{settings.cert_dir}/tls.key" if settings.cert_dir else None
    return WebhookServer(
        addr=settings.address,
        port=settings.port,
        host=settings.host or None,
        certfile=certfile,
        pkeyfile=pkeyfile,
    )
