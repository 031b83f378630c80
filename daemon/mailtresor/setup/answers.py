"""The answers `mailtresor setup` works from, and their checks.

Every check is a pure function from the text typed (or given as a flag) to
the value kept, raising ValueError with the reason a person can act on;
the command prints the reason and asks again (or, for a flag, stops).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path


# Names the control endpoint accepts for an appliance and a key
# (mailtresor.keys.ring.KEY_NAME); a tenant's name must also be a
# directory of the store (config._TENANT_NAME).
_TENANT = re.compile(r"^[a-z0-9][a-z0-9_-]{0,55}$")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
MTAS = ("postfix", "sendmail", "exchange", "none")


@dataclass
class Tenant:
    name: str
    domains: list[str]


@dataclass
class Answers:
    """Everything setup writes is derived from these (and the root)."""
    name: str
    hostname: str
    control_url: str                      # "" with trial
    trial: bool
    tenants: list[Tenant]
    mta: str
    listen_address: str = "0.0.0.0"
    smtp_port: int = 25
    smtps_port: int = 465
    mta_networks: list[str] = field(default_factory=lambda: ["127.0.0.0/8"])
    api_listen: str = "127.0.0.1:8443"
    milter: bool = True
    control_port: int = 8444               # the trial control endpoint's
    exchange_cert_name: str = "mail.protection.outlook.com"
    exchange_tenant_id: str = ""
    journal_address: str = ""
    volume_dirs: list[Path] = field(default_factory=list)


def appliance_name(text: str) -> str:
    """The appliance's name at the control endpoint (its keys' owner)."""
    from mailtresor.keys.ring import KEY_NAME     # not at import: the CLI's parser loads this module
    t = text.strip()
    if not KEY_NAME.match(t):
        raise ValueError(f"{t!r}: use lower-case letters, digits, '.', '_' and '-', starting with a "
                         "letter or digit, at most 63 characters")
    return t


def default_name(fqdn: str | None = None) -> str:
    """The short host name, made acceptable as an appliance name."""
    short = (fqdn or socket.gethostname()).split(".")[0].lower()
    short = re.sub(r"[^a-z0-9._-]", "-", short).strip("-._") or "archive1"
    return short[:63]


def hostname(text: str) -> str:
    """A fully qualified host name (the SMTP greeting, the relay certificate's name)."""
    t = text.strip().lower().rstrip(".")
    labels = t.split(".")
    if len(t) > 253 or len(labels) < 2 or not all(_LABEL.match(x) for x in labels) or labels[-1].isdigit():
        raise ValueError(f"{text.strip()!r} is not a fully qualified host name (e.g. archive1.example.org)")
    return t


def domain(text: str) -> str:
    """A mail domain of a tenant."""
    t = text.strip().lower().rstrip(".")
    if "@" in t:
        raise ValueError(f"{text.strip()!r} is an address: give the domain only (the part after @)")
    try:
        return hostname(t)
    except ValueError:
        raise ValueError(f"{text.strip()!r} is not a domain name (e.g. example.org)") from None


def domains(text: str) -> list[str]:
    """A comma- or space-separated list of domains, at least one, no repeats."""
    out = []
    for part in re.split(r"[,\s]+", text.strip()):
        if part:
            d = domain(part)
            if d not in out:
                out.append(d)
    if not out:
        raise ValueError("give at least one domain (e.g. example.org)")
    return out


def tenant_name(text: str) -> str:
    t = text.strip()
    if not _TENANT.match(t):
        raise ValueError(f"{t!r}: use lower-case letters, digits, '-' and '_', starting with a letter or "
                         "digit, at most 56 characters")
    return t


def tenant_spec(text: str) -> Tenant:
    """--tenant NAME=DOMAIN[,DOMAIN...]"""
    name, eq, rest = text.partition("=")
    if not eq:
        raise ValueError(f"{text!r}: write NAME=DOMAIN[,DOMAIN...] (e.g. acme=acme.example,acme.org)")
    return Tenant(tenant_name(name), domains(rest))


def default_domain(host: str) -> str:
    """The host name's parent domain (archive1.example.org -> example.org)."""
    parts = host.split(".")
    return ".".join(parts[1:]) if len(parts) > 2 else host


def control_url(text: str) -> str:
    t = text.strip().rstrip("/")
    m = re.match(r"^https://([^/:\s]+|\[[0-9a-fA-F:]+\])(?::(\d{1,5}))?$", t)
    if not m or (m.group(2) and not 0 < int(m.group(2)) < 65536):
        raise ValueError(f"{t!r} is not https://HOST[:PORT] (keys travel only over TLS)")
    return t


def port(text: str, *, allow_zero: bool = False) -> int:
    try:
        p = int(str(text).strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a port number") from None
    if not (0 if allow_zero else 1) <= p <= 65535:
        raise ValueError(f"{p} is not a port number (1-65535{', or 0 for none' if allow_zero else ''})")
    return p


def ip_address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise ValueError(f"{text.strip()!r} is not an IP address (e.g. 0.0.0.0 for all, or 192.0.2.10)") from None


def networks(text: str) -> list[str]:
    out = []
    for part in re.split(r"[,\s]+", text.strip()):
        if part:
            try:
                out.append(str(ipaddress.ip_network(part, strict=False)))
            except ValueError:
                raise ValueError(f"{part!r} is not a network (e.g. 192.0.2.0/24)") from None
    if not out:
        raise ValueError("give at least one network (e.g. 192.0.2.0/24)")
    return out


def host_port(text: str) -> str:
    """ADDRESS:PORT for the API (e.g. 127.0.0.1:8443)."""
    host, sep, p = text.strip().rpartition(":")
    if not sep:
        raise ValueError(f"{text.strip()!r}: write ADDRESS:PORT (e.g. 127.0.0.1:8443)")
    return f"{ip_address(host.strip('[]'))}:{port(p)}"


def mta(text: str) -> str:
    t = text.strip().lower()
    if t not in MTAS:
        raise ValueError(f"{t!r}: answer one of {', '.join(MTAS)}")
    return t


def yes_no(text: str) -> bool:
    t = text.strip().lower()
    if t in ("y", "yes"):
        return True
    if t in ("n", "no"):
        return False
    raise ValueError(f"{t!r}: answer yes or no")


def guid(text: str) -> str:
    t = text.strip().lower()
    if t and not re.match(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", t):
        raise ValueError(f"{t!r} is not a tenant id (a GUID such as 11111111-2222-3333-4444-555555555555), "
                         "or leave it empty for Exchange on premises")
    return t
