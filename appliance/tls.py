"""A self-signed TLS certificate for the API (`appliance init --tls`), so that keys do not
cross a LAN in clear on a site without its own PKI. Clients pin it by its SHA-256
fingerprint, which `init` prints, or trust the PEM file itself."""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALID_DAYS = 825  # the longest validity clients still accept for a server certificate


@dataclass(frozen=True, slots=True)
class CertificatePair:
    cert: Path
    key: Path
    fingerprint: str  # SHA-256 of the DER certificate, colon-separated hex

    @classmethod
    def load(cls, cert: Path, key: Path) -> CertificatePair:
        return cls(cert, key, fingerprint(x509.load_pem_x509_certificate(cert.read_bytes())))


def fingerprint(certificate: x509.Certificate) -> str:
    return certificate.fingerprint(hashes.SHA256()).hex(":").upper()


def make_self_signed(directory: Path, names: list[str]) -> CertificatePair:
    """A P-256 key (mode 0600) and a certificate for `names` (host names and addresses), plus
    this machine's name, localhost and the loopback addresses."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    hosts = {"localhost", "127.0.0.1", "::1", socket.gethostname(), *names}
    dns, ips = [], []
    for host in sorted(h for h in hosts if h):
        try:
            ips.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            dns.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, socket.gethostname() or "appliance")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=_VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName([*dns, *ips]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return CertificatePair(cert_path, key_path, fingerprint(certificate))
