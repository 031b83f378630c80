"""fscrypt policy v2 volumes: ext4 native encryption of a few directories.

The kernel does the cryptography; this module only speaks its ioctls
(linux/fscrypt.h, documented in the kernel's
Documentation/filesystems/fscrypt.rst).  The structures, packed with
`struct` in native byte order (the kernel's):

    struct fscrypt_policy_v2 {            /* 24 bytes: POLICY_V2 */
        __u8 version;                     /* 2 */
        __u8 contents_encryption_mode;    /* 1 = AES-256-XTS */
        __u8 filenames_encryption_mode;   /* 4 = AES-256-CTS */
        __u8 flags;                       /* 0x02 = names padded to 16 bytes */
        __u8 log2_data_unit_size;         /* 0: the file system's block size */
        __u8 __reserved[3];
        __u8 master_key_identifier[16];   /* HKDF of the master key, by the kernel */
    };
    struct fscrypt_get_policy_ex_arg {    /* 32 bytes: POLICY_EX */
        __u64 policy_size;                /* in: sizeof policy; out: its size */
        union { __u8 version; struct fscrypt_policy_v2 v2; ... } policy;
    };
    struct fscrypt_key_specifier {        /* 40 bytes: KEY_SPEC */
        __u32 type;                       /* 2 = by identifier (v2) */
        __u32 __reserved;
        __u8 u[32];                       /* the 16-byte identifier */
    };
    struct fscrypt_add_key_arg {          /* 80 bytes + raw: ADD_KEY */
        struct fscrypt_key_specifier key_spec;   /* out: the identifier */
        __u32 raw_size; __u32 key_id; __u32 flags; __u32 __reserved[7];
        __u8 raw[];                       /* the 64-byte master key */
    };
    struct fscrypt_remove_key_arg {       /* 64 bytes: REMOVE_KEY */
        struct fscrypt_key_specifier key_spec;
        __u32 removal_status_flags;       /* out: 1 = files busy, 2 = other users */
        __u32 __reserved[5];
    };
    struct fscrypt_get_key_status_arg {   /* 128 bytes: KEY_STATUS */
        struct fscrypt_key_specifier key_spec;
        __u32 __reserved[6];
        __u32 status;                     /* out: 1 absent, 2 present, 3 incompletely removed */
        __u32 status_flags; __u32 user_count; __u32 __out_reserved[13];
    };

How it decides:
- `init`: every directory must exist, be empty, sit on a file system that
  supports encryption (ext4 with the `encrypt` feature: GET_POLICY_EX
  answers ENODATA, not EOPNOTSUPP/ENOTTY) and have no policy yet.  The key
  is added, the kernel answers its identifier, and that identifier goes
  into the v2 policy set on each directory.
- `unlock`: the policy of the first directory names the identifier; the
  derived key is added and the kernel's answer compared with it: a
  different identifier is a wrong key, which is removed again at once.
  Every directory must carry the same identifier.
- `lock`: REMOVE_KEY; the kernel evicts the volume's inodes and the
  names become encrypted again.  If a file is still open the removal is
  incomplete (flag FILES_BUSY, status INCOMPLETELY_REMOVED): `Busy`, and
  a second `lock` after the daemon stopped finishes it.
- `status`: from GET_POLICY_EX and GET_KEY_STATUS, which need no privilege
  (the daemon, not root, asks them before it starts).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from pathlib import Path

from mailtresor.volumes import (ABSENT, BUSY, LOCKED, UNINITIALISED, UNLOCKED, Busy, Volume, VolumeError,
                                WrongKey, volume_secret, wipe)

# --- linux/fscrypt.h ---------------------------------------------------------

POLICY_V2 = 2
MODE_AES_256_XTS = 1
MODE_AES_256_CTS = 4
POLICY_FLAGS_PAD_16 = 0x02
KEY_SPEC_TYPE_IDENTIFIER = 2
KEY_IDENTIFIER_SIZE = 16
KEY_STATUS_ABSENT, KEY_STATUS_PRESENT, KEY_STATUS_INCOMPLETELY_REMOVED = 1, 2, 3
REMOVAL_FLAG_FILES_BUSY = 0x1
REMOVAL_FLAG_OTHER_USERS = 0x2
MASTER_KEY_SIZE = 64            # AES-256-XTS wants 64 bytes of master key

POLICY = struct.Struct("=BBBBB3x16s")                 # fscrypt_policy_v2
POLICY_EX = struct.Struct("=Q24s")                    # fscrypt_get_policy_ex_arg (v2 in the union)
KEY_SPEC = struct.Struct("=II32s")                    # fscrypt_key_specifier
ADD_KEY = struct.Struct("=40sIII28x")                 # fscrypt_add_key_arg without raw[]
REMOVE_KEY = struct.Struct("=40sI20x")                # fscrypt_remove_key_arg
KEY_STATUS = struct.Struct("=40s24xIII52x")           # fscrypt_get_key_status_arg
assert (POLICY.size, POLICY_EX.size, KEY_SPEC.size, ADD_KEY.size, REMOVE_KEY.size, KEY_STATUS.size) == \
    (24, 32, 40, 80, 64, 128)


def _ioc(direction: int, nr: int, size: int) -> int:
    """The kernel's _IOC('f', nr, size) (asm-generic: x86, arm64)."""
    return (direction << 30) | (size << 16) | (ord("f") << 8) | nr


_W, _R = 1, 2
FS_IOC_SET_ENCRYPTION_POLICY = _ioc(_R, 19, 12)        # _IOR('f', 19, struct fscrypt_policy_v1)
FS_IOC_GET_ENCRYPTION_POLICY_EX = _ioc(_R | _W, 22, 9)  # _IOWR('f', 22, __u8[9])
FS_IOC_ADD_ENCRYPTION_KEY = _ioc(_R | _W, 23, ADD_KEY.size)
FS_IOC_REMOVE_ENCRYPTION_KEY = _ioc(_R | _W, 24, REMOVE_KEY.size)
FS_IOC_GET_ENCRYPTION_KEY_STATUS = _ioc(_R | _W, 26, KEY_STATUS.size)


def key_spec(identifier: bytes = b"") -> bytes:
    """A key specifier by identifier (v2)."""
    return KEY_SPEC.pack(KEY_SPEC_TYPE_IDENTIFIER, 0, identifier.ljust(32, b"\0"))


def policy_v2(identifier: bytes) -> bytes:
    """The policy every volume directory gets."""
    return POLICY.pack(POLICY_V2, MODE_AES_256_XTS, MODE_AES_256_CTS, POLICY_FLAGS_PAD_16, 0, identifier)


def get_policy(fd: int) -> bytes | None:
    """The directory's master key identifier; None if it has no policy.
    OSError(EOPNOTSUPP/ENOTTY) when the file system cannot encrypt."""
    buf = bytearray(POLICY_EX.pack(POLICY.size, b""))
    try:
        fcntl.ioctl(fd, FS_IOC_GET_ENCRYPTION_POLICY_EX, buf, True)
    except OSError as e:
        if e.errno == errno.ENODATA:
            return None
        raise
    _, raw = POLICY_EX.unpack(buf)
    if raw[0] != POLICY_V2:
        raise VolumeError(f"has an fscrypt policy of version {raw[0]}, not 2")
    return POLICY.unpack(raw)[5]


def add_key(fd: int, master_key: bytearray) -> bytes:
    """Add a master key to the file system; the kernel's identifier for it.
    The argument buffer holding the key is wiped after the call."""
    buf = bytearray(ADD_KEY.pack(key_spec(), len(master_key), 0, 0)) + master_key
    try:
        fcntl.ioctl(fd, FS_IOC_ADD_ENCRYPTION_KEY, buf, True)
        spec = buf[:KEY_SPEC.size]
    finally:
        wipe(buf)
    return bytes(KEY_SPEC.unpack(spec)[2][:KEY_IDENTIFIER_SIZE])


def remove_key(fd: int, identifier: bytes) -> int:
    """Remove a key; the removal status flags (REMOVAL_FLAG_FILES_BUSY...)."""
    buf = bytearray(REMOVE_KEY.pack(key_spec(identifier), 0))
    fcntl.ioctl(fd, FS_IOC_REMOVE_ENCRYPTION_KEY, buf, True)
    return REMOVE_KEY.unpack(buf)[1]


def key_status(fd: int, identifier: bytes) -> int:
    """KEY_STATUS_ABSENT, _PRESENT or _INCOMPLETELY_REMOVED."""
    buf = bytearray(KEY_STATUS.pack(key_spec(identifier), 0, 0, 0))
    fcntl.ioctl(fd, FS_IOC_GET_ENCRYPTION_KEY_STATUS, buf, True)
    return KEY_STATUS.unpack(buf)[1]


def set_policy(fd: int, identifier: bytes) -> None:
    fcntl.ioctl(fd, FS_IOC_SET_ENCRYPTION_POLICY, policy_v2(identifier))


# --- the volume -------------------------------------------------------------

NO_ENCRYPT = ("is not on an ext4 file system with the encrypt feature: make it with `mkfs.ext4 -O encrypt` "
              "or turn it on with `tune2fs -O encrypt DEVICE`")


class FscryptVolume(Volume):
    """A set of directories on one ext4 file system, encrypted with one key."""

    kind = "fscrypt"

    def __init__(self, vcfg):
        super().__init__(vcfg)
        self.directories = [Path(d) for d in vcfg.directories]

    def _open(self, d: Path) -> int:
        try:
            return os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise VolumeError(f"volume {self.name}: directory {d} does not exist") from None
        except NotADirectoryError:
            raise VolumeError(f"volume {self.name}: {d} is not a directory") from None
        except OSError as e:
            raise VolumeError(f"volume {self.name}: directory {d}: {e.strerror}") from None

    def _root(self) -> int:
        """An fd of the file system's mount point, for the key ioctls: the
        kernel counts an fd inside the volume as an open file (a lock
        through it would always be busy)."""
        d = self.directories[0]
        dev = os.stat(d).st_dev
        root = d.resolve()
        while root.parent != root and os.stat(root.parent).st_dev == dev:
            root = root.parent
        return self._open(root)

    def _policy(self, d: Path, fd: int) -> bytes | None:
        try:
            return get_policy(fd)
        except VolumeError as e:
            raise VolumeError(f"volume {self.name}: directory {d} {e}") from None
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                raise VolumeError(f"volume {self.name}: directory {d} {NO_ENCRYPT}") from None
            raise VolumeError(f"volume {self.name}: directory {d}: {e.strerror}") from None

    def _identifier(self) -> bytes:
        """The identifier all directories share; VolumeError if one is
        missing, unencrypted or on another key, or they span file systems."""
        ids, devs = set(), set()
        for d in self.directories:
            fd = self._open(d)
            try:
                ident = self._policy(d, fd)
                devs.add(os.fstat(fd).st_dev)
            finally:
                os.close(fd)
            if ident is None:
                raise VolumeError(f"volume {self.name}: directory {d} is not encrypted "
                                  f"(run `mailtresor volume init {self.name}`)")
            ids.add(ident)
        if len(ids) != 1:
            raise VolumeError(f"volume {self.name}: its directories are encrypted with different keys")
        if len(devs) != 1:
            raise VolumeError(f"volume {self.name}: its directories are on different file systems")
        return ids.pop()

    def init(self, key) -> None:
        if not self.directories:
            raise VolumeError(f"volume {self.name}: no directories")
        devs = set()
        for d in self.directories:
            fd = self._open(d)
            try:
                if self._policy(d, fd) is not None:
                    raise VolumeError(f"volume {self.name}: directory {d} is already encrypted")
                if os.listdir(fd):
                    raise VolumeError(f"volume {self.name}: directory {d} is not empty: only an empty "
                                      "directory can be encrypted (move its files out, init, move them back)")
                devs.add(os.fstat(fd).st_dev)
            finally:
                os.close(fd)
        if len(devs) != 1:
            raise VolumeError(f"volume {self.name}: its directories are on different file systems "
                              "(one volume, one file system)")
        secret = volume_secret(key, self.kind, self.name, MASTER_KEY_SIZE)
        fd = self._root()
        try:
            ident = add_key(fd, secret)
        except OSError as e:
            raise VolumeError(f"volume {self.name}: the kernel refused the key: {e.strerror}") from None
        finally:
            wipe(secret)
            os.close(fd)
        for d in self.directories:
            fd = self._open(d)
            try:
                set_policy(fd, ident)
            except OSError as e:
                raise VolumeError(f"volume {self.name}: cannot encrypt {d}: {e.strerror}") from None
            finally:
                os.close(fd)

    def unlock(self, key) -> None:
        want = self._identifier()
        secret = volume_secret(key, self.kind, self.name, MASTER_KEY_SIZE)
        fd = self._root()
        try:
            try:
                got = add_key(fd, secret)
            except OSError as e:
                raise VolumeError(f"volume {self.name}: the kernel refused the key: {e.strerror}") from None
            if got != want:
                # Not this volume's key: take it out again at once, so that
                # nothing but the right key is ever held.
                try:
                    remove_key(fd, got)
                except OSError:
                    pass
                raise WrongKey(f"volume {self.name}: wrong key: the control endpoint's key volume.{self.name} "
                               f"is not the one this volume was encrypted with (identifier {got.hex()[:8]}..., "
                               f"volume wants {want.hex()[:8]}...); nothing was unlocked")
        finally:
            wipe(secret)
            os.close(fd)

    def lock(self) -> None:
        ident = self._identifier()
        os.sync()                           # the volume's dirty pages go out before the key does
        fd = self._root()
        try:
            if key_status(fd, ident) == KEY_STATUS_ABSENT:
                return
            flags = remove_key(fd, ident)
        except OSError as e:
            raise VolumeError(f"volume {self.name}: cannot remove the key: {e.strerror}") from None
        finally:
            os.close(fd)
        if flags & REMOVAL_FLAG_FILES_BUSY:
            raise Busy(f"volume {self.name}: busy: files on it are still open (is mailtresord still "
                       "running? stop it, then lock again); the key is removed but open files stay readable "
                       "until they are closed")
        if flags & REMOVAL_FLAG_OTHER_USERS:
            raise Busy(f"volume {self.name}: busy: other users added the same key; they must remove it too")

    def status(self) -> dict:
        try:
            ident = self._identifier()
        except VolumeError as e:
            text = str(e)
            state = UNINITIALISED if "is not encrypted" in text else ABSENT
            return self._status(state, text.split(": ", 1)[1])
        try:
            fd = self._root()
        except VolumeError:
            # The daemon's user may not open the mount point (mode 0700):
            # for a status question the directory itself does as well.
            fd = self._open(self.directories[0])
        try:
            st = key_status(fd, ident)
        except OSError as e:
            return self._status(ABSENT, f"cannot ask the kernel for the key's status: {e.strerror}")
        finally:
            os.close(fd)
        where = ", ".join(str(d) for d in self.directories)
        if st == KEY_STATUS_PRESENT:
            return self._status(UNLOCKED, f"key in the kernel; {where} readable")
        if st == KEY_STATUS_INCOMPLETELY_REMOVED:
            return self._status(BUSY, f"key removed but files are still open on {where} "
                                      "(stop mailtresord, then `mailtresor volume lock` again)")
        return self._status(LOCKED, f"key not in the kernel; {where} unreadable "
                                    f"(`mailtresor volume unlock {self.name}`)")
