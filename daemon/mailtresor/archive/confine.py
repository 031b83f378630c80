"""Confinement of the parser processes: what hostile mail could make them do.

A parser child (`python3 -m mailtresor.archive.parseworker`) and the extractors it
runs (`pdftotext`) read attacker-controlled bytes with code that has had
bugs (poppler, zip, XML).  Whatever such a bug lets an attacker run must
find nothing worth stealing and nobody to talk to.  Before it reads its
first message the child calls `confine()`, which applies, in this order:

1. ``PR_SET_NO_NEW_PRIVS`` (required by both of the next two; also set by
   the packaged unit's NoNewPrivileges=yes).
2. Landlock (Linux >= 5.13; the kernel's ABI version decides how much):
   file system access is read and execute only, and only beneath
   `read_paths()` -- /usr (the interpreter, the standard library, Debian's
   packages, pdftotext and its libraries and data), the dynamic loader's
   files in /etc, the venv and the mailtresor package's own directory -- and
   read/write to /dev/null.  Nothing else: not /etc/mailtresor (TLS and
   control client keys), not the spool, the store, /run/mailtresor or a
   checkout's run/ directory, not /proc.  With ABI >= 4 no TCP bind or
   connect; with ABI >= 6 no abstract unix sockets and no signals to
   processes outside the sandbox (the daemon).
3. seccomp (libseccomp's own binding, Debian's python3-seccomp): socket(),
   socketpair(), connect() and the rest of the socket calls, ptrace,
   process_vm_readv/writev, pidfd_getfd, io_uring (which would do socket
   calls past the filter), namespaces, mount, bpf, perf_event_open,
   userfaultfd and the kernel keyring fail with EPERM; so does kill() of the
   parent.  Landlock does not cover connecting to a unix socket by its path
   (the control and query sockets): socket() failing is the guard there.

Both stay in force across execve, so pdftotext is confined the same way.
The child also gets a minimal environment (`child_env()`: no
CREDENTIALS_DIRECTORY, NOTIFY_SOCKET or anything else of the daemon's),
its own process group, RLIMIT_CORE 0, and dies with the daemon
(PR_SET_PDEATHSIG).

Where the kernel lacks Landlock (or an ABI feature) or python3-seccomp is
missing, the parser runs with what could be applied; `probe()` says what,
and the daemon logs it once, loudly (see parseworker).
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
import sysconfig
from pathlib import Path

_SYS_LANDLOCK_CREATE_RULESET = 444
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
_LANDLOCK_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

# LANDLOCK_ACCESS_FS_*
_EXECUTE = 1 << 0
_WRITE_FILE = 1 << 1
_READ_FILE = 1 << 2
_READ_DIR = 1 << 3
_TRUNCATE = 1 << 14
_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}
_FILE_RIGHTS = _EXECUTE | _WRITE_FILE | _READ_FILE | _TRUNCATE | (1 << 15)
# LANDLOCK_ACCESS_NET_* (ABI 4) and LANDLOCK_SCOPE_* (ABI 6)
_NET_BIND_TCP = 1 << 0
_NET_CONNECT_TCP = 1 << 1
_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
_SCOPE_SIGNAL = 1 << 1

# Landlock's system call numbers (444-446) are the same on every architecture
# Debian supports (they came after the numbering was unified), but not mips (an
# offset per ABI) or alpha.
_UNIFIED = os.uname().machine in ("x86_64", "aarch64", "armv7l", "armv8l", "ppc64le", "s390x",
                                  "riscv64", "loongarch64", "i686", "i386")


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _syscall(*args) -> int:
    r = _libc.syscall(*args)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 if it has none (or it is off)."""
    if not _UNIFIED:
        return 0
    try:
        return _syscall(_SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                        ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION))
    except OSError:
        return 0


def seccomp_available() -> bool:
    try:
        import seccomp  # noqa: F401
        return True
    except ImportError:
        return False


def probe() -> list[str]:
    """What confine() could not apply here (empty: everything)."""
    missing = []
    abi = landlock_abi()
    if abi == 0:
        missing.append("Landlock (file system confinement)")
    else:
        if abi < 4:
            missing.append(f"Landlock network rules (kernel ABI {abi} < 4)")
        if abi < 6:
            missing.append(f"Landlock signal and abstract socket scopes (kernel ABI {abi} < 6)")
    if not seccomp_available():
        missing.append("seccomp (python3-seccomp is not installed)")
    return missing


def read_paths() -> list[str]:
    """What a parser may read: the interpreter and its standard library, the
    packages it imports (Debian's and the venv's), the mailtresor package's
    own directory, pdftotext with its libraries and data, the loader's
    files.  Directories are read beneath, recursively."""
    package = Path(__file__).resolve().parent
    paths = ["/usr", "/lib", "/lib64", "/bin", "/etc/ld.so.cache", "/etc/ld.so.conf",
             "/etc/ld.so.conf.d", "/etc/localtime", "/etc/fonts", "/etc/poppler",
             sys.prefix, sys.base_prefix, str(package),
             sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"],
             sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    out: list[str] = []
    for p in paths:
        if p and os.path.exists(p) and p not in out:
            out.append(p)
    return out


def _landlock(abi: int, readable: list[str], writable_files: list[str]) -> None:
    fs = _FS_BY_ABI[min(abi, 5)]
    attr = _RulesetAttr(handled_access_fs=fs,
                        handled_access_net=(_NET_BIND_TCP | _NET_CONNECT_TCP) if abi >= 4 else 0,
                        scoped=(_SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL) if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = _syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size),
                       ctypes.c_uint32(0))
    try:
        for path, rights in [(p, _EXECUTE | _READ_FILE | _READ_DIR) for p in readable] + \
                            [(p, _READ_FILE | _WRITE_FILE | _TRUNCATE) for p in writable_files]:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if not os.path.isdir(path):
                    rights &= _FILE_RIGHTS
                rule = _PathBeneathAttr(allowed_access=rights & fs, parent_fd=fd)
                _syscall(_SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset),
                         ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(rule), ctypes.c_uint32(0))
            finally:
                os.close(fd)
        _syscall(_SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0))
    finally:
        os.close(ruleset)


# Denied with EPERM (a parser needs none of them; pdftotext neither).
_DENIED = ("socket", "socketpair", "connect", "bind", "listen", "accept", "accept4",
           "sendto", "sendmsg", "sendmmsg", "recvfrom", "recvmsg", "recvmmsg",
           "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp",
           "io_uring_setup", "io_uring_enter", "io_uring_register",
           "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "open_tree",
           "move_mount", "fsopen", "fsmount", "fsconfig", "fspick",
           "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
           "personality", "quotactl", "syslog")


def _seccomp(parent: int) -> None:
    import seccomp
    f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    deny = seccomp.ERRNO(errno.EPERM)
    for name in _DENIED:
        try:
            f.add_rule(deny, name)
        except (RuntimeError, ValueError, OSError):   # a call this architecture does not have
            pass
    # the daemon, whatever Landlock's signal scope (ABI >= 6) did or did not stop
    for name in ("kill", "tgkill"):
        f.add_rule(deny, name, seccomp.Arg(0, seccomp.MASKED_EQ, 0xFFFFFFFF, parent))
    f.add_rule(deny, "pidfd_open", seccomp.Arg(0, seccomp.MASKED_EQ, 0xFFFFFFFF, parent))
    f.load()


def confine(parent: int | None = None) -> list[str]:
    """Confine this process (and what it will exec) for good.  `parent` is
    the daemon's pid (default: getppid()).  Returns what could not be
    applied, as `probe()` words it; never raises for a missing feature."""
    parent = os.getppid() if parent is None else parent
    missing = []
    if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        missing.append("no_new_privs")
    abi = landlock_abi()
    if abi:
        try:
            _landlock(abi, read_paths(), ["/dev/null"])
        except OSError as e:
            missing.append(f"Landlock ({e.strerror})")
        else:
            if abi < 4:
                missing.append(f"Landlock network rules (kernel ABI {abi} < 4)")
            if abi < 6:
                missing.append(f"Landlock signal and abstract socket scopes (kernel ABI {abi} < 6)")
    else:
        missing.append("Landlock (file system confinement)")
    try:
        _seccomp(parent)
    except ImportError:
        missing.append("seccomp (python3-seccomp is not installed)")
    except (OSError, RuntimeError, ValueError) as e:
        missing.append(f"seccomp ({e})")
    return missing


def child_env(pythonpath: str) -> dict[str, str]:
    """The whole environment of a parser child: nothing of the daemon's
    (no CREDENTIALS_DIRECTORY, NOTIFY_SOCKET, configuration paths...)."""
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONPATH": pythonpath,
            "PYTHONDONTWRITEBYTECODE": "1"}
