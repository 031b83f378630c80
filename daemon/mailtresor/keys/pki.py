"""A small certificate authority for development and tests.

`make run` and the test suite generate a CA, server certificates for the
relay and the control endpoint, and client certificates for the appliance
and for connectors (an Exchange journaling sender), all at run time.
Production uses the organisation's own PKI; nothing here is needed there.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mailtresor development"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class CA:
    def __init__(self, cert: x509.Certificate, key):
        self.cert, self.key = cert, key

    @classmethod
    def create(cls, cn: str = "mailtresor development CA", days: int = 3650) -> "CA":
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder()
                .subject_name(_name(cn)).issuer_name(_name(cn))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        return cls(cert, key)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> "CA":
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), None)
        return cls(cert, key)

    def save(self, cert_path: Path, key_path: Path) -> None:
        _write(Path(cert_path), self.cert.public_bytes(serialization.Encoding.PEM), False)
        _write(Path(key_path), _key_pem(self.key), True)

    def issue(self, cn: str, *, server_names: tuple[str, ...] = (), client: bool = False,
              days: int = 825, not_before: datetime.datetime | None = None):
        """A leaf certificate: a server one when `server_names` (DNS names or
        IP addresses) are given, a client one when `client`, or both."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = not_before or datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1)
        usages = []
        if server_names:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        b = (x509.CertificateBuilder()
             .subject_name(_name(cn)).issuer_name(self.cert.subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=days))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                            critical=False))
        if server_names:
            sans = []
            for n in server_names:
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(n)))
                except ValueError:
                    sans.append(x509.DNSName(n))
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = b.sign(self.key, hashes.SHA256())
        return cert, key

    def issue_to(self, cert_path: Path, key_path: Path, cn: str, **kw) -> None:
        cert, key = self.issue(cn, **kw)
        _write(Path(cert_path), cert.public_bytes(serialization.Encoding.PEM), False)
        _write(Path(key_path), _key_pem(key), True)


def dev_pki(directory: Path, *, appliance: str = "dev", hostname: str = "localhost",
            connectors: tuple[str, ...] = ("exchange-acme",), outsider: bool = True) -> dict[str, Path]:
    """Create (if missing) everything `make run` and the tests need:

    ca.pem / ca.key                      development CA
    control.pem / control.key            control endpoint (127.0.0.1, localhost)
    relay.pem / relay.key                SMTP relay (127.0.0.1, localhost, hostname)
    appliance-NAME.pem / .key            the appliance's client certificate
    client-CONNECTOR.pem / .key          a connector's client certificate
    outsider.pem / outsider.key          a client certificate from another CA
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths = {"ca": d / "ca.pem", "ca_key": d / "ca.key"}
    if paths["ca"].exists() and paths["ca_key"].exists():
        ca = CA.load(paths["ca"], paths["ca_key"])
    else:
        ca = CA.create()
        ca.save(paths["ca"], paths["ca_key"])

    def leaf(stem: str, cn: str, **kw):
        cert, key = d / f"{stem}.pem", d / f"{stem}.key"
        if not (cert.exists() and key.exists()):
            ca.issue_to(cert, key, cn, **kw)
        paths[stem] = cert
        paths[stem + "_key"] = key

    leaf("control", "mailtresor-control", server_names=("127.0.0.1", "localhost"))
    leaf("relay", hostname, server_names=tuple(dict.fromkeys(("127.0.0.1", "localhost", hostname))))
    leaf(f"appliance-{appliance}", f"appliance-{appliance}", client=True)
    for c in connectors:
        leaf(f"client-{c}", c, client=True)
    if outsider:
        cert, key = d / "outsider.pem", d / "outsider.key"
        if not (cert.exists() and key.exists()):
            CA.create("someone else's CA").issue_to(cert, key, "exchange-acme", client=True)
        paths["outsider"], paths["outsider_key"] = cert, key
    return paths
