"""Every key the appliance derives, in one place.

The control endpoint releases a few root keys by name (mailtresor.keys.ring
holds them in memory): `spool`, `seal`, and one `tenant.NAME` per tenant.
Everything the appliance encrypts or signs with is derived from those here,
with HKDF-SHA256 (mailtresor.keys.crypto.derive) and a fixed `info` per use:

    spool key    -> one AEAD key per spool file     info "mailtresor spool file v1 " + entry id,
                                                     salt: 16 random bytes in the file's header
    tenant key   -> archive ids (HMAC key)          info "mailtresor/archive-id" (key version 1, always)
    tenant key   -> records, metadata, listings     info "mailtresor/store/v1" (each key version)
    seal key     -> the Ed25519 seed of shard seals  (used as it is; every version kept for verify)

A new use gets a new `info` here, never a reuse of one (docs/FORMAT.md).
"""

from __future__ import annotations

import hmac
from typing import Callable

from mailtresor.keys import crypto
from mailtresor.keys.ring import KeyMaterial, KeyUnavailable

SPOOL_KEY = "spool"
SEAL_KEY = "seal"
ID_BYTES = 20
ID_INFO = b"mailtresor/archive-id"
STORE_INFO = b"mailtresor/store/v1"
AUDIT_INFO = b"mailtresor audit terms v1"
ACCESS_FILE_INFO = b"mailtresor access v1"      # users.db and tokens.db (access/sealed.py)
# The control endpoint's key for users.db and tokens.db.  Version 1 always:
# the files carry no key version, so a rotated "access" key would make them
# unreadable (re-encryption on rotation is future work; docs/ACCESS.md).
ACCESS_KEY_NAME = "access"
ACCESS_KEY_VERSION = 1      # search terms in the audit trail (access/audit.py)
SPOOL_FILE_INFO = b"mailtresor spool file v1 "


class KeyMissing(KeyUnavailable):
    """A tenant key (or a version of it) is not in the ring, and nothing
    fetches it."""

    def __init__(self, name: str, version: int | None = None):
        super().__init__(f"key {name}" + (f" version {version}" if version else "") + " is not held")
        self.name, self.version = name, version


def tenant_key_name(tenant: str) -> str:
    """The control endpoint's name of a tenant's root key."""
    return f"tenant.{tenant}"


def spool_file_key(spool_key: bytes, salt: bytes, entry_id: str) -> bytes:
    """The AEAD key of one spool file."""
    return crypto.derive(spool_key, salt, SPOOL_FILE_INFO + entry_id.encode())


def access_file_key(access_key: bytes) -> bytes:
    """The 32-byte key of users.db and tokens.db, from the control key "access"."""
    return crypto.derive(access_key, b"", ACCESS_FILE_INFO)


class Keys:
    """Tenant sub-keys from a key ring (mailtresor.keys.ring.KeyRing), derived
    once and cached in memory."""

    def __init__(self, ring):
        self.ring = ring
        self._cache: dict[tuple[str, int, bytes], bytes] = {}

    def _sub(self, tenant: str, version: int, info: bytes) -> bytes:
        k = (tenant, version, info)
        sub = self._cache.get(k)
        if sub is None:
            key = self.ring.get(tenant_key_name(tenant), version)
            if key is None:
                raise KeyMissing(tenant_key_name(tenant), version)
            sub = self._cache[k] = crypto.derive(key, b"", info)
        return sub

    def id_key(self, tenant: str) -> bytes:
        return self._sub(tenant, 1, ID_INFO)

    def current(self, tenant: str) -> tuple[int, bytes]:
        """(version, store key) of the tenant's current key version."""
        cur = self.ring.current(tenant_key_name(tenant))
        if cur is None:
            raise KeyMissing(tenant_key_name(tenant))
        return cur[0], self._sub(tenant, cur[0], STORE_INFO)

    def store_key(self, tenant: str, version: int) -> bytes:
        return self._sub(tenant, version, STORE_INFO)

    def archive_id(self, tenant: str, raw: bytes) -> str:
        """The archive id of a message: HMAC of its bytes under the
        tenant's id key, so equal messages share one record."""
        return hmac.digest(self.id_key(tenant), raw, "sha256")[:ID_BYTES].hex()

    def audit_key(self, tenant: str, version: int | None = None) -> tuple[int, bytes]:
        """(version, key) for the search terms the audit trail keeps of
        this tenant: the current version of its key, or `version`."""
        if version is None:
            version = self.current(tenant)[0]
        return version, self._sub(tenant, version, AUDIT_INFO)

    def seal_seed(self) -> bytes:
        """The current seal key (an Ed25519 seed) from the ring."""
        cur = self.ring.current(SEAL_KEY)
        if cur is None:
            raise KeyMissing(SEAL_KEY)
        return cur[1]

    def seal_seeds(self) -> list[bytes]:
        """Every version of the seal key the ring holds, oldest first."""
        cur = self.ring.current(SEAL_KEY)
        if cur is None:
            raise KeyMissing(SEAL_KEY)
        return [k for k in (self.ring.get(SEAL_KEY, v) for v in range(1, cur[0] + 1)) if k is not None]


class FetchingKeys(Keys):
    """Tenant keys fetched from the control endpoint when first needed
    (blocking: the archiver thread and the CLI), kept in memory only.
    `fetch(name, version|None) -> KeyMaterial` raises KeyUnavailable
    (mailtresor.keys.client.ControlClient.fetch_blocking is one)."""

    def __init__(self, ring, fetch: Callable[[str, int | None], KeyMaterial]):
        super().__init__(ring)
        self.fetch = fetch

    def _sub(self, tenant, version, info):
        name = tenant_key_name(tenant)
        if self.ring.get(name, version) is None:
            self.ring.put(self.fetch(name, version))
        return super()._sub(tenant, version, info)

    def current(self, tenant):
        name = tenant_key_name(tenant)
        if self.ring.current(name) is None:
            m = self.fetch(name, None)
            self.ring.put(m, current=True)
        return super().current(tenant)

    def seal_seed(self) -> bytes:
        cur = self.ring.current(SEAL_KEY)
        if cur is None:
            self.ring.put(self.fetch(SEAL_KEY, None), current=True)
            cur = self.ring.current(SEAL_KEY)
        return cur[1]

    def seal_seeds(self) -> list[bytes]:
        """Every version of the seal key, oldest first: seals made before a
        rotation stay verifiable."""
        self.seal_seed()
        version = self.ring.current(SEAL_KEY)[0]
        out = []
        for v in range(1, version + 1):
            if self.ring.get(SEAL_KEY, v) is None:
                self.ring.put(self.fetch(SEAL_KEY, v))
            out.append(self.ring.get(SEAL_KEY, v))
        return out

    def forget(self) -> None:
        self._cache.clear()
