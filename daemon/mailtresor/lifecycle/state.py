"""lifecycle.db: the tenants' retention rules, legal holds and deletion requests.

One encrypted JSON document (access/sealed.py, the same key as users.db,
another AAD), beside users.db in the access directory.  Per tenant a
section

    {"rules": {id: rule}, "holds": {name: hold}, "requests": {id: request}}

whose entries' fields are documented where they are made (lifecycle/
retention.py, holds.py, requests.py).  Nothing here decides anything: it
keeps the document and hands out private copies; changes go through
change(), which re-reads under the file lock, so the daemon's threads and a
command in another process never lose each other's updates.  Every change
is also an audit record, written by whoever calls change().
"""

from __future__ import annotations

import copy
import secrets
from pathlib import Path
from typing import Callable

from mailtresor.access.sealed import SealedFile, StoreError  # noqa: F401 - StoreError for callers

_AAD = b"mailtresor/lifecycle.db/1"
SECTIONS = ("rules", "holds", "requests")
FILE_NAME = "lifecycle.db"


def new_id() -> str:
    """A short random id for a rule or a request (not guessable, not secret)."""
    return secrets.token_hex(6)


def _section(doc: dict, tenant: str) -> dict:
    sec = doc.setdefault("tenants", {}).setdefault(tenant, {})
    for name in SECTIONS:
        sec.setdefault(name, {})
    return sec


class LifecycleDB:
    """lifecycle.db at `path`, encrypted under `key` (32 bytes: the access
    file key, keys/derive.py access_file_key)."""

    def __init__(self, path: Path, key: bytes):
        self._file = SealedFile(Path(path), key, _AAD, lambda: {"version": 1, "tenants": {}})
        self.path = self._file.path

    def __repr__(self) -> str:
        return f"LifecycleDB({str(self.path)!r})"

    def section(self, tenant: str) -> dict:
        """A private copy of the tenant's section (all three keys present)."""
        return _section(copy.deepcopy(self._file.load()), tenant)

    def tenants(self) -> list[str]:
        return sorted(self._file.load().get("tenants", {}))

    def change(self, tenant: str, fn: Callable[[dict], object]):
        """Run fn(section) on a fresh copy of the tenant's section under the
        lock; written back if fn returns without raising; fn's result is
        returned (an exception leaves the file as it was)."""
        return self._file.modify(lambda doc: fn(_section(doc, tenant)))


def open_lifecycle(access_dir: Path, file_key: bytes) -> LifecycleDB:
    return LifecycleDB(Path(access_dir) / FILE_NAME, file_key)


def open_for(cfg, fetch) -> LifecycleDB:
    """lifecycle.db in the [access] directory, under the key users.db has;
    `fetch(name, version)` -> KeyMaterial (as access.auth.open_databases)."""
    from mailtresor import config as configmod
    from mailtresor.access.sealed import ACCESS_KEY_NAME, ACCESS_KEY_VERSION, file_key
    return open_lifecycle(configmod.access_directory(cfg), file_key(fetch(ACCESS_KEY_NAME, ACCESS_KEY_VERSION).key))
