"""LUKS2 volumes: a block device opened with cryptsetup and mounted.

cryptsetup does the cryptography; the key (derived from the control key,
see volumes.volume_secret) reaches it only on a pipe, `--key-file=-`
(stdin, read to its end: binary safe), never in a file, an argv or the
environment.  The device-mapper name is `mailtresor-NAME`.

    init    luksFormat --type luks2 (argon2id, cryptsetup's defaults), open,
            mkfs.ext4 on the mapper device, mount on the mount point
    unlock  open --test-passphrase first (a wrong key opens nothing), open,
            mount
    lock    umount ("target is busy": Busy), close
    status  mounted from /dev/mapper/mailtresor-NAME: unlocked (asked
            without privilege: the daemon checks it); else the device is
            missing (absent), not LUKS (uninitialised), or locked

`format`, `dump` and `test_key` are public for the tests: this machine has
no device-mapper, so open/close/mount are tested only where
/dev/mapper/control exists.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from mailtresor.volumes import (ABSENT, BUSY, LOCKED, UNINITIALISED, UNLOCKED, Busy, Volume, VolumeError,
                                WrongKey, volume_secret, wipe)

CRYPTSETUP = "/usr/sbin/cryptsetup"
PASSPHRASE_SIZE = 64
EXIT_NO_KEY = 2             # cryptsetup's "no key available with this passphrase"
UMOUNT_BUSY = 32            # umount(8)'s "mount failure" (target is busy)


def device_mapper_available() -> bool:
    """Whether this kernel has device-mapper.  Not just /dev/mapper/control:
    libdevmapper makes that node itself when it is missing (any failed
    `cryptsetup open` leaves one), so the kernel's own list of misc devices
    decides."""
    try:
        misc = Path("/proc/misc").read_text()
    except OSError:
        return False
    return Path("/dev/mapper/control").exists() and any(
        line.split()[-1:] == ["device-mapper"] for line in misc.splitlines())


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "(no message)"


class LuksVolume(Volume):
    """A LUKS2 device mounted on a mount point."""

    kind = "luks"

    def __init__(self, vcfg, *, pbkdf_args: tuple[str, ...] = ()):
        super().__init__(vcfg)
        self.device = Path(vcfg.device)
        self.mountpoint = Path(vcfg.mountpoint)
        self.mapper = f"mailtresor-{self.name}"
        self.mapper_path = Path("/dev/mapper") / self.mapper
        # Tests pass a cheap PBKDF (pbkdf2, 1000 iterations); production
        # keeps cryptsetup's default, argon2id.
        self.pbkdf_args = tuple(pbkdf_args)

    # --- cryptsetup, the key on stdin ---

    def _cryptsetup(self, args: list[str], key: bytearray | None = None) -> subprocess.CompletedProcess:
        try:
            return subprocess.run([CRYPTSETUP, *args], input=bytes(key) if key is not None else None,
                                  stdin=None if key is not None else subprocess.DEVNULL,
                                  capture_output=True, timeout=600)
        except FileNotFoundError:
            raise VolumeError(f"volume {self.name}: {CRYPTSETUP} is missing (apt install cryptsetup-bin)") from None

    def _secret(self, key) -> bytearray:
        return volume_secret(key, self.kind, self.name, PASSPHRASE_SIZE)

    def is_luks(self) -> bool:
        return self._cryptsetup(["isLuks", "--type", "luks2", str(self.device)]).returncode == 0

    def format(self, key) -> None:
        """luksFormat the device (refused if it is LUKS already)."""
        if not self.device.exists():
            raise VolumeError(f"volume {self.name}: device {self.device} does not exist")
        if self.is_luks():
            raise VolumeError(f"volume {self.name}: {self.device} is a LUKS2 device already")
        secret = self._secret(key)
        try:
            r = self._cryptsetup(["luksFormat", "--type", "luks2", "--batch-mode", *self.pbkdf_args,
                                  "--label", self.mapper, "--key-file=-", str(self.device)], secret)
        finally:
            wipe(secret)
        if r.returncode != 0:
            raise VolumeError(f"volume {self.name}: luksFormat {self.device} failed: {_last_line(r.stderr.decode())}")

    def test_key(self, key) -> bool:
        """Whether `key` opens a keyslot (cryptsetup open --test-passphrase)."""
        secret = self._secret(key)
        try:
            r = self._cryptsetup(["open", "--test-passphrase", "--key-file=-", str(self.device)], secret)
        finally:
            wipe(secret)
        if r.returncode == 0:
            return True
        if r.returncode == EXIT_NO_KEY:
            return False
        raise VolumeError(f"volume {self.name}: cannot test the key on {self.device}: "
                          f"{_last_line(r.stderr.decode())}")

    def dump(self) -> str:
        """luksDump's text (headers only: no key material)."""
        r = self._cryptsetup(["luksDump", str(self.device)])
        if r.returncode != 0:
            raise VolumeError(f"volume {self.name}: luksDump {self.device}: {_last_line(r.stderr.decode())}")
        return r.stdout.decode()

    def _open(self, key) -> None:
        if not device_mapper_available():
            raise VolumeError(f"volume {self.name}: this kernel has no device-mapper (no \"device-mapper\" "
                              "in /proc/misc): a LUKS volume cannot be opened here; use kind = \"fscrypt\"")
        secret = self._secret(key)
        try:
            r = self._cryptsetup(["open", "--type", "luks2", "--key-file=-", str(self.device), self.mapper],
                                 secret)
        finally:
            wipe(secret)
        if r.returncode == EXIT_NO_KEY:
            raise WrongKey(f"volume {self.name}: wrong key: volume.{self.name} does not open {self.device}")
        if r.returncode != 0:
            raise VolumeError(f"volume {self.name}: cannot open {self.device}: {_last_line(r.stderr.decode())}")

    def _mounted(self) -> bool:
        """Whether the mount point is the mapper device's file system."""
        try:
            return os.stat(self.mountpoint).st_dev == os.stat(self.mapper_path).st_rdev
        except OSError:
            return False

    def _mount(self) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "ext4", str(self.mapper_path), str(self.mountpoint)],
                           capture_output=True, stdin=subprocess.DEVNULL, timeout=120)
        if r.returncode != 0:
            raise VolumeError(f"volume {self.name}: cannot mount {self.mapper_path} on {self.mountpoint}: "
                              f"{_last_line(r.stderr.decode())}")

    # --- the interface ---

    def init(self, key) -> None:
        self.format(key)
        self._open(key)
        r = subprocess.run(["mkfs.ext4", "-q", "-L", self.mapper, str(self.mapper_path)],
                           capture_output=True, stdin=subprocess.DEVNULL, timeout=600)
        if r.returncode != 0:
            raise VolumeError(f"volume {self.name}: mkfs.ext4 {self.mapper_path}: {_last_line(r.stderr.decode())}")
        self._mount()

    def unlock(self, key) -> None:
        if self._mounted():
            return
        if not self.mapper_path.exists():
            if not self.device.exists():
                raise VolumeError(f"volume {self.name}: device {self.device} does not exist")
            if not self.test_key(key):
                raise WrongKey(f"volume {self.name}: wrong key: volume.{self.name} opens no keyslot of "
                               f"{self.device}; nothing was opened")
            self._open(key)
        self._mount()

    def lock(self) -> None:
        if self._mounted():
            r = subprocess.run(["umount", str(self.mountpoint)], capture_output=True,
                               stdin=subprocess.DEVNULL, timeout=120)
            if r.returncode != 0:
                err = _last_line(r.stderr.decode())
                if r.returncode == UMOUNT_BUSY or "busy" in err:
                    raise Busy(f"volume {self.name}: busy: {self.mountpoint} is in use (is mailtresord "
                               "still running? stop it, then lock again)")
                raise VolumeError(f"volume {self.name}: cannot umount {self.mountpoint}: {err}")
        if self.mapper_path.exists():
            r = self._cryptsetup(["close", self.mapper])
            if r.returncode != 0:
                raise Busy(f"volume {self.name}: busy: cannot close {self.mapper}: {_last_line(r.stderr.decode())}")

    def status(self) -> dict:
        if self._mounted():
            return self._status(UNLOCKED, f"{self.device} open as {self.mapper_path}, mounted on {self.mountpoint}")
        if self.mapper_path.exists():
            return self._status(BUSY if os.path.ismount(self.mountpoint) else LOCKED,
                                f"{self.device} is open as {self.mapper_path} but not mounted on {self.mountpoint}"
                                f" (`mailtresor volume unlock {self.name}` mounts it)")
        if not self.device.exists():
            return self._status(ABSENT, f"device {self.device} does not exist")
        try:
            luks = self.is_luks()
        except VolumeError as e:
            return self._status(ABSENT, str(e))
        if not luks:
            return self._status(UNINITIALISED, f"{self.device} is not a LUKS2 device "
                                               f"(`mailtresor volume init {self.name}`)")
        return self._status(LOCKED, f"{self.device} is closed (`mailtresor volume unlock {self.name}`)")
