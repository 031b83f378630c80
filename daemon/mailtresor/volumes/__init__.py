"""Encrypted volumes: the spool, store, index, backup and access
directories on file systems whose key the control endpoint holds.

One interface, `Volume`, two kinds:

- `fscrypt` (the default, volumes/fscrypt.py): ext4 native encryption
  (fscrypt policy v2) of a few empty directories; unlocking adds the key to
  the kernel (FS_IOC_ADD_ENCRYPTION_KEY), locking removes it.  File names
  are encrypted too.
- `luks` (volumes/luks.py): a LUKS2 block device opened with cryptsetup
  (the key on a pipe) and mounted on a mount point.

The key of volume NAME is the appliance's key `volume.NAME` at the control
endpoint, version 1 always (a rotation there cannot lock a volume out: a
volume's key is changed by making a new volume and copying), fetched over
mutual TLS by `mailtresor.keys.client.ControlClient`; every release is in
the control endpoint's audit log.  The 32 control bytes are never given to
the kernel or cryptsetup as they are: `volume_secret` derives the kind's
secret from them (HKDF-SHA512, info naming the kind and the volume), so the
same control key can never unlock a volume of another name.

Keys are held only in memory, in bytearrays wiped after use where Python
lets us (the HKDF output is an immutable bytes object for a moment: it is
copied into a bytearray at once and dropped); never in a file, an argv or
the environment.

Pure parts (`state` names, `volume_secret`) are tested without a kernel;
the kinds are tested on real loop-mounted ext4 images (tests/test_volumes.py).
"""

from __future__ import annotations

import abc

# The states `status()` reports.
UNINITIALISED = "uninitialised"     # not encrypted yet (`mailtresor volume init`)
LOCKED = "locked"                   # encrypted, key not in the kernel / device closed
UNLOCKED = "unlocked"               # usable
ABSENT = "absent"                   # a directory or device is missing, or not what it should be
BUSY = "busy"                       # a lock could not finish: files are still open
STATES = (UNINITIALISED, LOCKED, UNLOCKED, ABSENT, BUSY)

KEY_VERSION = 1                     # see the module's docstring


class VolumeError(Exception):
    """A problem with a volume the admin can act on; one line naming it."""


class WrongKey(VolumeError):
    """The key does not open this volume (nothing was left added or opened)."""


class Busy(VolumeError):
    """A lock that could not finish because files are open."""


def key_name(name: str) -> str:
    """The control endpoint's name of a volume's key."""
    return f"volume.{name}"


def volume_secret(control_key: bytes | bytearray, kind: str, name: str, length: int = 64) -> bytearray:
    """The secret given to the kernel (fscrypt: the 64-byte master key) or
    cryptsetup (luks: the passphrase) for volume `name`, derived from the
    32-byte control key with HKDF-SHA512.  Pure."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    if len(control_key) != 32:
        raise VolumeError(f"volume {name}: the control key has {len(control_key)} bytes, not 32")
    info = f"mailtresor volume {kind} {name}".encode()
    out = HKDF(algorithm=hashes.SHA512(), length=length, salt=None, info=info).derive(bytes(control_key))
    return bytearray(out)


def wipe(buf: bytearray | None) -> None:
    """Overwrite a key buffer in place."""
    if buf is not None:
        for i in range(len(buf)):
            buf[i] = 0


class Volume(abc.ABC):
    """One encrypted volume of the configuration ([[volume]])."""

    kind: str = ""

    def __init__(self, vcfg):
        self.cfg = vcfg
        self.name: str = vcfg.name

    @property
    def key_name(self) -> str:
        return key_name(self.name)

    @abc.abstractmethod
    def init(self, key: bytes | bytearray) -> None:
        """Encrypt the (empty) volume with the control key; VolumeError if
        it cannot be (not empty, not an encrypting file system, already
        encrypted).  Leaves it unlocked."""

    @abc.abstractmethod
    def unlock(self, key: bytes | bytearray) -> None:
        """Make the volume usable; WrongKey if `key` is not its key (and
        nothing is left added), VolumeError for other problems.  Unlocking
        an unlocked volume is a no-op."""

    @abc.abstractmethod
    def lock(self) -> None:
        """Forget the key; Busy if files are still open (the daemon still
        runs).  Locking a locked volume is a no-op."""

    @abc.abstractmethod
    def status(self) -> dict:
        """{"name", "kind", "state" (one of STATES), "detail" (a line for a
        human)}: never raises for a missing or odd volume, says so."""

    def _status(self, state: str, detail: str) -> dict:
        return {"name": self.name, "kind": self.kind, "state": state, "detail": detail}


def open_volume(vcfg) -> Volume:
    """The Volume of a [[volume]] configuration entry."""
    if vcfg.kind == "luks":
        from mailtresor.volumes.luks import LuksVolume
        return LuksVolume(vcfg)
    if vcfg.kind == "fscrypt":
        from mailtresor.volumes.fscrypt import FscryptVolume
        return FscryptVolume(vcfg)
    raise VolumeError(f"volume {vcfg.name}: unknown kind {vcfg.kind!r} (fscrypt or luks)")


def fetch_key(client, name: str) -> bytearray:
    """Volume `name`'s control key (version KEY_VERSION) from the control
    endpoint through `client` (a mailtresor.keys.client.ControlClient: mutual
    TLS).  KeyUnavailable subclasses on failure."""
    material = client.fetch_blocking(key_name(name), KEY_VERSION)
    return bytearray(material.key)


def unlocked_problems(cfg) -> list[str]:
    """One line per configured volume that is not unlocked; empty when all
    are (or none is configured).  What the daemon checks before it writes
    anything (service.main)."""
    problems = []
    for v in getattr(cfg, "volume", ()):
        try:
            st = open_volume(v).status()
        except VolumeError as e:
            problems.append(str(e))
            continue
        if st["state"] != UNLOCKED:
            problems.append(f"volume {v.name} is {st['state']}: {st['detail']}")
    return problems
