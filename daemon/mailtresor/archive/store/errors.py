"""The store's exceptions: problems a user can act on, named in the message."""

from __future__ import annotations


class StoreError(Exception):
    """A problem with the store the user can act on (message says which)."""


class RecordCorrupt(StoreError):
    """A record, metadata or listing blob does not read back (bad magic,
    unknown format, does not decrypt, wrong SHA-256)."""


class StoreLocked(StoreError):
    """Another process holds the store's writer lock."""
