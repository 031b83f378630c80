"""Keys held in memory, and how they are fetched from the control endpoint.

Keys live only in this process: the `KeyRing` is a dict in memory, never
written anywhere, never logged (its `summary()` shows names, versions and
ages, not material).  `KeyFetcher` keeps the spool key: it asks the control
endpoint (through mailtresor.keys.client.ControlClient, the one client) and
retries with backoff while it is unreachable.  What is derived from the
keys is in mailtresor.keys.derive.

The control endpoint's API (mailtresor.control.server serves it):

    GET /v1/keys/NAME            -> {"name", "version", "key": base64, "created"}
    GET /v1/keys/NAME/VERSION    -> the same, for a given version

NAME lives in the asking appliance's own namespace: an appliance can only
ever name its own keys.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable

from mailtresor.keys import crypto

log = logging.getLogger("mailtresor.keys.ring")

KEY_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class KeyUnavailable(Exception):
    """A key could not be obtained; the message says why (never the key)."""


class ControlUnreachable(KeyUnavailable):
    pass


class KeyRefused(KeyUnavailable):
    """The control endpoint answered, but will not release this key.
    `status` is its HTTP status, if it gave one."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


# Answers that mean "this appliance may not have this key (any more)": a
# key held is then dropped, not kept as through an outage.
REVOKED = (403, 404)


class IdentityUnusable(KeyUnavailable):
    """The appliance's own TLS files ([control] ca_file, cert_file,
    key_file) cannot be read or do not fit together."""


@dataclass(frozen=True)
class KeyMaterial:
    name: str
    version: int
    key: bytes

    def __repr__(self) -> str:  # never print key material
        return f"KeyMaterial({self.name!r}, version={self.version})"


def parse_key_response(body: bytes, name: str) -> KeyMaterial:
    try:
        doc = json.loads(body)
        key = base64.b64decode(doc["key"], validate=True)
        version = int(doc["version"])
        got = doc["name"]
    except (ValueError, KeyError, TypeError):
        raise KeyRefused(f"control endpoint sent an unreadable answer for key {name!r}") from None
    if got != name or len(key) != crypto.KEY_SIZE or version < 1:
        raise KeyRefused(f"control endpoint sent a malformed key for {name!r}")
    return KeyMaterial(name, version, key)


def key_path(name: str, version: int | None) -> str:
    if not KEY_NAME.match(name):
        raise ValueError(f"invalid key name {name!r}")
    return f"/v1/keys/{name}" + ("" if version is None else f"/{int(version)}")


class KeyRing:
    """Thread-safe (the milter runs in libmilter's threads)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[tuple[str, int], tuple[bytes, float]] = {}
        self._current: dict[str, int] = {}

    def put(self, material: KeyMaterial, current: bool = False) -> None:
        with self._lock:
            self._keys[(material.name, material.version)] = (material.key, self._clock())
            if current:
                self._current[material.name] = material.version

    def current(self, name: str) -> tuple[int, bytes] | None:
        with self._lock:
            v = self._current.get(name)
            if v is None:
                return None
            entry = self._keys.get((name, v))
            return None if entry is None else (v, entry[0])

    def get(self, name: str, version: int) -> bytes | None:
        with self._lock:
            entry = self._keys.get((name, version))
            return None if entry is None else entry[0]

    def expire(self, prefix: str, max_age: float) -> int:
        """Drop keys named `prefix`* fetched more than max_age seconds ago."""
        now = self._clock()
        with self._lock:
            old = [k for k, (_, t) in self._keys.items() if k[0].startswith(prefix) and now - t > max_age]
            for k in old:
                del self._keys[k]
                if self._current.get(k[0]) == k[1]:
                    del self._current[k[0]]
        return len(old)

    def forget(self) -> None:
        with self._lock:
            self._keys.clear()
            self._current.clear()

    def drop(self, name: str) -> int:
        """Drop every version of the key `name`; how many there were."""
        with self._lock:
            gone = [k for k in self._keys if k[0] == name]
            for k in gone:
                del self._keys[k]
            self._current.pop(name, None)
        return len(gone)

    def summary(self) -> list[dict]:
        now = self._clock()
        with self._lock:
            return [{"name": n, "version": v, "current": self._current.get(n) == v,
                     "age": round(now - t)} for (n, v), (_, t) in sorted(self._keys.items())]


def error_text(body: bytes) -> str:
    """The control endpoint's reason in an error answer, if it gave one."""
    try:
        return str(json.loads(body)["error"])[:200]
    except (ValueError, KeyError, TypeError):
        return ""


# --- the spool key's keeper, on the reactor ----------------------------------------

class KeyFetcher:
    """Gets the spool key at start (retrying with backoff), refreshes the
    current version periodically (rotation), and fetches older versions and
    tenant keys on demand."""

    def __init__(self, reactor, client, ring: KeyRing, *, retry_initial: float = 1.0,
                 retry_max: float = 60.0, refresh_interval: float = 600.0,
                 on_status: Callable[[str], None] = lambda s: None,
                 on_key: Callable[[KeyMaterial], None] = lambda m: None,
                 on_revoke: Callable[[str], None] = lambda name: None,
                 on_fetch: Callable[[str, int | None, str | None], None] = lambda name, version, error: None,
                 rng: random.Random | None = None):
        self._reactor = reactor
        self._client = client
        self._ring = ring
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._refresh_interval = refresh_interval
        self._on_status = on_status
        self._on_key = on_key
        self._on_revoke = on_revoke
        self._on_fetch = on_fetch          # (name, version, error or None): the audit trail's key-fetch records
        self._rng = rng or random.Random()
        self._call = None
        self._stopped = False
        self.attempts = 0
        self.last_error = ""

    def start(self, name: str = "spool"):
        """Deferred that fires once the current `name` key is held."""
        from twisted.internet.defer import Deferred

        ready = Deferred()
        self._try(name, self._retry_initial, ready)
        return ready

    def _try(self, name, delay, ready):
        if self._stopped:
            return
        self.attempts += 1
        d = self._client.fetch(name)

        def ok(material):
            self._on_fetch(name, material.version, None)
            known = self._ring.current(name)
            self._ring.put(material, current=True)
            if known is None or known[0] != material.version:
                self._on_key(material)
            log.info("holding %s key version %d", name, material.version)
            self.last_error = ""
            if not ready.called:
                ready.callback(material.version)
            self._schedule(self._refresh_interval, lambda: self._try(name, self._retry_initial, ready))

        def failed(f):
            self.last_error = f.getErrorMessage() if f.check(KeyUnavailable) else repr(f.value)
            self._on_fetch(name, None, self.last_error)
            holding = self._ring.current(name) is not None
            if holding and f.check(KeyRefused) and f.value.status in REVOKED:
                # Not an outage: the control endpoint says this appliance
                # may no longer have the key.  Drop it (mail is then refused
                # with 4xx, as at a start without it) and ask again, as at
                # a start, in case it is released again.
                self._ring.drop(name)
                holding = False
                log.error("the control endpoint no longer releases the %s key (%s); dropped it",
                          name, self.last_error)
                self._on_revoke(name)
            if holding:
                # We hold the key; an outage or an error: keep it and ask again later.
                log.warning("could not refresh %s key: %s", name, self.last_error)
                self._schedule(self._refresh_interval, lambda: self._try(name, self._retry_initial, ready))
                return
            wait = min(delay, self._retry_max) * (0.8 + 0.4 * self._rng.random())
            self._on_status(f"waiting for the {name} key (attempt {self.attempts}): {self.last_error}; "
                            f"retrying in {wait:.0f}s")
            log.warning("no %s key yet (attempt %d): %s; retrying in %.1fs", name, self.attempts,
                        self.last_error, wait)
            self._schedule(wait, lambda: self._try(name, min(delay * 2, self._retry_max), ready))

        d.addCallbacks(ok, failed)

    def _schedule(self, delay, fn):
        if not self._stopped:
            self._call = self._reactor.callLater(delay, fn)

    def fetch(self, name: str, version: int | None = None):
        """Fetch a key into the ring (e.g. an older spool key version)."""
        def put(material):
            self._ring.put(material, current=version is None)
            return material
        return self._client.fetch(name, version).addCallback(put)

    def stop(self):
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
