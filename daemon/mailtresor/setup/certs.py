"""The appliance's certificates: made by setup, or given and checked.

Made: a CA of the appliance's own (ca.pem, its key root's only) signs the
relay's server certificate (the host name, localhost, 127.0.0.1 and the
listen address) and the appliance's client certificate for the control
endpoint (CN appliance-NAME: the name the control endpoint looks up).
Given: each certificate must load, match its key, be valid today and,
for the relay, name the host.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mailtresor.keys.pki import CA, _key_pem

CA_NAME = "mailtresor appliance CA"


@dataclass
class Issued:
    """A certificate and its key, as PEM, to be written by the caller."""
    cert_pem: bytes
    key_pem: bytes | None        # None: a given file, not rewritten


def make_ca(name: str) -> CA:
    return CA.create(f"{CA_NAME} ({name})")


def issue(ca: CA, cn: str, **kw) -> Issued:
    cert, key = ca.issue(cn, **kw)
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def ca_pem(ca: CA) -> tuple[bytes, bytes]:
    return ca.cert.public_bytes(serialization.Encoding.PEM), _key_pem(ca.key)


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of the DER certificate, as Exchange and openssl x509 -fingerprint show it."""
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def common_name(cert_pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(cert_pem)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def _names_host(cert: x509.Certificate, host: str) -> bool:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = None
    dns = sans.get_values_for_type(x509.DNSName) if sans else []
    ips = [str(a) for a in sans.get_values_for_type(x509.IPAddress)] if sans else []
    try:
        return str(ipaddress.ip_address(host)) in ips
    except ValueError:
        pass
    for n in dns:
        n = n.lower().rstrip(".")
        if n == host or (n.startswith("*.") and host.split(".", 1)[-1] == n[2:] and host.count(".") >= 2):
            return True
    return False


def check_pair(cert_path: Path, key_path: Path, what: str, *, host: str | None = None,
               client: bool = False, now: datetime.datetime | None = None) -> Issued:
    """Load a given certificate and key; ValueError naming what is wrong."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    try:
        cert_pem = Path(cert_path).read_bytes()
    except OSError as e:
        raise ValueError(f"{what} certificate {cert_path}: {e.strerror}") from None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise ValueError(f"{what} certificate {cert_path}: not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), None)
    except OSError as e:
        raise ValueError(f"{what} key {key_path}: {e.strerror}") from None
    except (ValueError, TypeError):
        raise ValueError(f"{what} key {key_path}: not an unencrypted PEM private key "
                         "(the daemon starts unattended)") from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if (key.public_key().public_bytes(serialization.Encoding.DER, pub)
            != cert.public_key().public_bytes(serialization.Encoding.DER, pub)):
        raise ValueError(f"{what} key {key_path} does not belong to the certificate {cert_path}")
    # Debian 12's cryptography (38) has the naive-UTC properties only.
    after = cert.not_valid_after.replace(tzinfo=datetime.timezone.utc)
    before = cert.not_valid_before.replace(tzinfo=datetime.timezone.utc)
    if after <= now:
        raise ValueError(f"{what} certificate {cert_path} expired on {after:%Y-%m-%d}")
    if before > now:
        raise ValueError(f"{what} certificate {cert_path} is valid only from {before:%Y-%m-%d}")
    if host is not None and not _names_host(cert, host):
        raise ValueError(f"{what} certificate {cert_path} does not name {host} "
                         "(in its subjectAltName): senders checking the name would refuse it")
    if client:
        try:
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            eku = None
        if eku is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
            raise ValueError(f"{what} certificate {cert_path} is not for TLS clients (no clientAuth usage)")
        if not common_name(cert_pem):
            raise ValueError(f"{what} certificate {cert_path} has no common name (the control endpoint "
                             "identifies the appliance by it)")
    return Issued(cert_pem, None)


def check_ca(path: Path, what: str) -> bytes:
    try:
        pem = Path(path).read_bytes()
        x509.load_pem_x509_certificate(pem)         # the first one: enough to tell a PEM certificate
    except OSError as e:
        raise ValueError(f"{what} {path}: {e.strerror}") from None
    except ValueError:
        raise ValueError(f"{what} {path}: not a PEM certificate") from None
    return pem
