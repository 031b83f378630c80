"""The appliance's one client to the control endpoint.

One class, `ControlClient`, holds the appliance's TLS identity ([control]
ca_file, cert_file, key_file: mutual TLS, the endpoint's host name checked
against ca_file) and speaks the control endpoint's API
(mailtresor.keys.ring documents it).  It has two faces over the same code:

- `fetch_blocking(name, version)` -> KeyMaterial: for threads that may
  block -- the archiver's batch thread, the CLI;
- `fetch(name, version)` -> Deferred firing with KeyMaterial: for the
  reactor (the spool key's KeyFetcher).  It runs `fetch_blocking` in the
  reactor's thread pool.

A fetch in the thread pool cannot be cancelled: at shutdown the reactor
waits for one in progress, at most `timeout` ([control] timeout) seconds.

Why a thread and not Twisted's Agent: a key fetch is rare (the spool key
at start and every refresh interval, a tenant key when first needed), so
a thread per fetch costs nothing that matters, and one HTTP/TLS code path
means one set of error messages and one TLS configuration for the daemon
and the CLI.  (The daemon had two clients, an Agent and this one, that
could drift apart.)  Both faces fail only with KeyUnavailable subclasses:
ControlUnreachable (no answer), KeyRefused (an answer other than 200, or
an unreadable one), IdentityUnusable (the appliance's own files).
"""

from __future__ import annotations

import http.client
import ssl
import threading
import urllib.parse
from pathlib import Path

from mailtresor.keys.ring import (ControlUnreachable, IdentityUnusable, KeyMaterial, KeyRefused, error_text,
                                  key_path, parse_key_response)


def client_context(ca_file: Path, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """The mTLS client context for the control endpoint; IdentityUnusable
    naming the [control] setting and file at fault."""
    for setting, path in (("ca_file", ca_file), ("cert_file", cert_file), ("key_file", key_file)):
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise IdentityUnusable(f"[control] {setting} {path}: {e.strerror or e}") from None
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file))
    except (ssl.SSLError, ValueError) as e:
        raise IdentityUnusable(f"[control] ca_file {ca_file}: not a usable CA certificate ({e})") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert_file), str(key_file))
    except (ssl.SSLError, ValueError) as e:
        raise IdentityUnusable(f"[control] cert_file {cert_file} and key_file {key_file}: "
                               f"not a certificate and its private key ({e})") from None
    return ctx


class ControlClient:
    """Key fetches over mutual TLS; see the module's docstring.  `reactor`
    is needed only for the Deferred face."""

    def __init__(self, url: str, ca_file: Path, cert_file: Path, key_file: Path, *,
                 timeout: float = 10.0, reactor=None):
        self.url = url.rstrip("/")
        self._parts = urllib.parse.urlsplit(url)
        self._files = (Path(ca_file), Path(cert_file), Path(key_file))
        self.timeout = timeout
        self._reactor = reactor
        self._ctx: ssl.SSLContext | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg, *, reactor=None) -> "ControlClient":
        """The client of the configuration's [control] section."""
        c = cfg.control
        return cls(c.url, c.ca_file, c.cert_file, c.key_file, timeout=c.timeout, reactor=reactor)

    def context(self) -> ssl.SSLContext:
        """The TLS context, made on first use (IdentityUnusable if the
        appliance's files do not make one) and kept: a new appliance
        certificate takes a restart, as a new relay certificate does.  The
        daemon calls it at start to fail there rather than at the first
        fetch."""
        with self._lock:
            if self._ctx is None:
                self._ctx = client_context(*self._files)
            return self._ctx

    def fetch_blocking(self, name: str, version: int | None = None) -> KeyMaterial:
        """Fetch one key; blocks for up to `timeout` seconds."""
        path = key_path(name, version)
        conn = http.client.HTTPSConnection(self._parts.hostname, self._parts.port or 443,
                                           context=self.context(), timeout=self.timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise ControlUnreachable(f"control endpoint {self.url} unreachable: {e}") from None
        finally:
            conn.close()
        if resp.status != 200:
            raise KeyRefused(f"control endpoint refused key {name!r}: {resp.status} {error_text(body)}",
                             resp.status)
        return parse_key_response(body, name)

    __call__ = fetch_blocking       # a FetchingKeys `fetch`

    def fetch(self, name: str, version: int | None = None):
        """Deferred firing with KeyMaterial, or failing with a KeyUnavailable."""
        from twisted.internet import threads

        if self._reactor is None:
            raise RuntimeError("ControlClient.fetch needs the reactor it was made with")
        return threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(),
                                         self.fetch_blocking, name, version)


def fetch_blocking(url: str, ca_file: Path, cert_file: Path, key_file: Path, name: str,
                   version: int | None = None, timeout: float = 10.0) -> KeyMaterial:
    """One key, with a client made for the call (tests, tools)."""
    return ControlClient(url, ca_file, cert_file, key_file, timeout=timeout).fetch_blocking(name, version)


def control_fetcher(cfg) -> ControlClient:
    """(name, version) -> KeyMaterial over the appliance's mTLS identity
    (its configuration's [control] section), blocking."""
    return ControlClient.from_config(cfg)
