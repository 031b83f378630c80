"""Remote backup: the backup directory mirrored to an SFTP target that
holds no keys (docs/BACKUP.md).

The backup directory (backup.py) is one append-only log per shard,
`DIR/TENANT/YYYY-MM.log`, whose frames are encrypted records, chain
entries and seals.  `RemoteBackup.push` makes the target's
`PATH/TENANT/YYYY-MM.log` equal to the local log, sending only what the
target lacks:

- a log that only grew since the last push gets its new tail appended at
  the offset where the last push ended (the target's size is checked
  against that first);
- a log that was rewritten (BackupDirectory.compact renames a new file
  over it) or that the target holds differently (truncated, altered, left
  half-written by a crash) is uploaded whole under a temporary name,
  fsynced, and renamed over the old one with posix-rename@openssh.com: the
  target holds the old log or the new one, never a mix;
- only whole frames are sent: a frame the archiver is appending right now
  waits for the next push.

What was pushed -- per log its size, the SHA-256 of those bytes and the
local file's inode -- is recorded in `STATE/backup-remote.json`, with the
last push, the last error and the lag.  `pull` downloads the logs for a
restore and checks every one (frames, chain, blobs, seals: verify_log; and
against that record when it is there), so a tampered or truncated remote
log is reported, never restored as if it were good.

SSH: strict host-key checking against a pinned known_hosts file (an
unknown or changed host key is refused, never added), public-key
authentication with an identity file (a path, or `credential:NAME` for a
systemd credential), bounded timeouts.  Blocking (paramiko): the daemon
runs it on a thread of the reactor's pool (`Scheduler`), never on the
reactor's own thread.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import socket
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mailtresor.archive.store.backup import _FRAME, FRAME_MAGIC, BackupDirectory, verify_log
from mailtresor.archive.store.fs import FILE_MODE, fsync_parent, private_dir
from mailtresor.durable import own_like_directory, write_all

log = logging.getLogger("mailtresor.archive.store.remote")
# paramiko logs its transport thread's failures with tracebacks; every
# failure is reported here as one line naming the target instead.
logging.getLogger("paramiko").setLevel(logging.CRITICAL)

CHUNK = 1 << 20                  # bytes read and written at a time
STATE_FILE = "backup-remote.json"
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MONTH = re.compile(r"[0-9]{4}-[0-9]{2}")


class RemoteError(Exception):
    """A push or pull that could not be done; the message is one line that
    names the target and the problem (no traceback, no secret)."""


class Busy(RemoteError):
    """Another process pushes or pulls right now (the lock is held)."""


# --- the target's address ----------------------------------------------------------------

@dataclass(frozen=True)
class RemoteURL:
    user: str
    host: str
    port: int
    path: str

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"sftp://{self.user}@{host}:{self.port}{self.path}"


def parse_remote(url: str) -> RemoteURL:
    """`sftp://user@host[:port]/path` -> RemoteURL; ValueError naming what
    is wrong.  Pure.  The path is absolute on the target (inside its
    chroot, if it has one); no password in the URL: keys only."""
    m = re.fullmatch(r"sftp://([^@/:\s]+)@(\[[0-9A-Fa-f:.]+\]|[^@/:\[\]\s]+)(?::([0-9]+))?(/[^\s]*)", url or "")
    if not m:
        if isinstance(url, str) and url.startswith("sftp://") and re.match(r"sftp://[^@/]*:[^@/]*@", url):
            raise ValueError("no password in the URL: the target is reached with a key (identity_file)")
        raise ValueError(f"{url!r} is not an SFTP URL: write sftp://USER@HOST:PORT/PATH")
    user, host, port, path = m.groups()
    port_n = int(port) if port else 22
    if not 0 < port_n < 65536:
        raise ValueError(f"port {port_n} is out of range")
    if any(p in ("..", ".") for p in path.split("/")):
        raise ValueError(f"{path!r}: no '.' or '..' in the path")
    path = path.rstrip("/") or "/"
    if path == "/":
        raise ValueError("give a directory of its own on the target, not its root (e.g. /backup)")
    return RemoteURL(user, host.strip("[]"), port_n, path)


def resolve_identity(spec: str) -> Path:
    """The identity file: a path, or `credential:NAME` for a systemd
    credential ($CREDENTIALS_DIRECTORY/NAME, from LoadCredential=)."""
    if spec.startswith("credential:"):
        name = spec[len("credential:"):]
        cred = os.environ.get("CREDENTIALS_DIRECTORY")
        if not cred:
            raise RemoteError(f"identity_file = {spec!r} but $CREDENTIALS_DIRECTORY is not set "
                              "(LoadCredential= in the unit)")
        return Path(cred) / name
    return Path(spec)


def fingerprint(key) -> str:
    """A host key's fingerprint as OpenSSH prints it (SHA256:base64)."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


# --- reading the local logs ------------------------------------------------------------------

def frame_end(f, start: int, size: int) -> tuple[int, int]:
    """(end of the last whole frame at or after `start`, frames in between)
    of an open log of `size` bytes, walking the frame headers only (the
    CRCs are verify_log's business).  A frame still being appended, or
    anything that is not a frame, ends the walk."""
    pos, frames = start, 0
    while pos + _FRAME.size <= size:
        f.seek(pos)
        head = f.read(_FRAME.size)
        if len(head) < _FRAME.size:
            break
        magic, _kind, _seq, n = _FRAME.unpack(head)
        nxt = pos + _FRAME.size + n + 4
        if magic != FRAME_MAGIC or nxt > size:
            break
        pos, frames = nxt, frames + 1
    return pos, frames


def _chunks(f, start: int, end: int):
    f.seek(start)
    left = end - start
    while left > 0:
        data = f.read(min(CHUNK, left))
        if not data:
            raise RemoteError(f"{f.name}: shorter than expected while reading it")
        left -= len(data)
        yield data


def _sha_local(f, end: int) -> str:
    h = hashlib.sha256()
    for data in _chunks(f, 0, end):
        h.update(data)
    return h.hexdigest()


# --- what was pushed -----------------------------------------------------------------------

class PushRecord:
    """STATE/backup-remote.json: per log what the target holds, and the
    last push.  Written atomically (temporary file, fsync, rename)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.doc = {"remote": "", "logs": {}, "last_push": None, "last_attempt": None, "last_error": None,
                    "last_summary": None, "lag": None}
        try:
            doc = json.loads(self.path.read_text())
            if isinstance(doc, dict) and isinstance(doc.get("logs"), dict):
                self.doc.update(doc)
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            log.warning("%s unreadable (%s): the next push compares the target's logs with the local ones",
                        self.path, e)

    def save(self) -> None:
        private_dir(self.path.parent)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
        try:
            write_all(fd, json.dumps(self.doc, indent=1, sort_keys=True).encode())
            os.fsync(fd)
            own_like_directory(fd, self.path.parent)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)

    @property
    def logs(self) -> dict:
        return self.doc["logs"]


@contextlib.contextmanager
def exclusive(state_dir: Path, wait: float):
    """One push or pull at a time per appliance (the daemon's and a
    `mailtresor backup` command's): a lock file beside the record.  Waits
    up to `wait` seconds, then RemoteError."""
    private_dir(state_dir)
    lock = Path(state_dir) / ".backup-remote.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        own_like_directory(fd, state_dir)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise Busy("another push or pull is under way (the daemon's, or a "
                               "`mailtresor backup` command's); try again when it is done") from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


# --- the SSH connection ------------------------------------------------------------------------

class SftpTarget:
    """How to reach the target: URL, pinned host keys, identity, timeouts."""

    def __init__(self, url: RemoteURL, known_hosts: Path, identity: str, *, connect_timeout: float = 10.0,
                 io_timeout: float = 30.0):
        self.url = url
        self.known_hosts = Path(known_hosts)
        self.identity = identity
        self.connect_timeout = connect_timeout
        self.io_timeout = io_timeout

    def _key(self):
        import paramiko
        path = resolve_identity(self.identity)
        try:
            text = path.read_text()
        except OSError as e:
            raise RemoteError(f"identity file {path}: {e.strerror or e}") from None
        for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
            try:
                return cls.from_private_key(io.StringIO(text))
            except paramiko.PasswordRequiredException:
                raise RemoteError(f"identity file {path} is protected by a passphrase: the daemon runs "
                                  "unattended; keep a key without one in a systemd credential") from None
            except (paramiko.SSHException, ValueError):
                continue
        raise RemoteError(f"identity file {path}: not an Ed25519, ECDSA or RSA private key in OpenSSH or PEM form")

    @contextlib.contextmanager
    def session(self):
        """An SFTP session (paramiko SFTPClient), closed on exit."""
        import paramiko
        u = self.url
        where = f"{u.host}:{u.port}"
        client = paramiko.SSHClient()
        try:
            client.get_host_keys().load(str(self.known_hosts))
        except OSError as e:
            raise RemoteError(f"known_hosts {self.known_hosts}: {e.strerror or e}") from None
        except paramiko.SSHException as e:
            raise RemoteError(f"known_hosts {self.known_hosts}: {e}") from None
        # Never add: a key that is not pinned is refused (RejectPolicy).
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        key = self._key()
        try:
            try:
                client.connect(u.host, u.port, username=u.user, pkey=key, look_for_keys=False, allow_agent=False,
                               timeout=self.connect_timeout, banner_timeout=self.connect_timeout,
                               auth_timeout=self.connect_timeout)
            except paramiko.BadHostKeyException as e:
                raise RemoteError(
                    f"the host key of {where} is not the one pinned in {self.known_hosts} "
                    f"(offered {e.key.get_name()} {fingerprint(e.key)}, pinned {fingerprint(e.expected_key)}): "
                    "refusing to connect; if the target was re-installed, check its new key out of band "
                    "and replace its line in that file") from None
            except paramiko.AuthenticationException:
                raise RemoteError(f"{where} refused the key of {resolve_identity(self.identity)} for user "
                                  f"{u.user!r} (is its public key in that account's authorized_keys?)") from None
            except paramiko.SSHException as e:
                text = str(e)
                if "banner" in text or "No existing session" in text:
                    raise RemoteError(f"{where}: no SSH answer within {self.connect_timeout:g} s "
                                      "(not an SSH server, or hung)") from None
                if "not found in known_hosts" in text:
                    raise RemoteError(f"{where} has no host key pinned in {self.known_hosts}: refusing to "
                                      "connect (add its key, checked out of band: ssh-keyscan, then compare "
                                      "the fingerprint with the target's)") from None
                raise RemoteError(f"{where}: SSH failed: {text}") from None
            except paramiko.ssh_exception.NoValidConnectionsError as e:
                why = sorted({x.strerror or str(x) for x in e.errors.values()})
                raise RemoteError(f"{where}: cannot connect: {'; '.join(why)}") from None
            except socket.timeout:
                raise RemoteError(f"{where}: no answer within {self.connect_timeout:g} s") from None
            except OSError as e:
                raise RemoteError(f"{where}: cannot connect: {e.strerror or e}") from None
            try:
                sftp = client.open_sftp()
            except paramiko.SSHException as e:
                raise RemoteError(f"{where}: no SFTP subsystem: {e}") from None
            sftp.get_channel().settimeout(self.io_timeout)
            yield sftp
        finally:
            client.close()


def _remote_size(sftp, path: str) -> int | None:
    try:
        return sftp.stat(path).st_size
    except FileNotFoundError:
        return None
    except OSError as e:
        if getattr(e, "errno", None) == errno.ENOENT:
            return None
        raise


def pulled_month(tenant: str, name: str) -> str | None:
    """The month of a file the target lists as `TENANT/NAME`, if it is a
    backup log that pull may write (`YYYY-MM.log` of a tenant whose name
    could be configured); None for anything else -- dot files, temporary
    uploads, and names a hostile target makes up to write outside the
    pull's directory (`..`, `/`).  Pure."""
    if not _TENANT.fullmatch(tenant):
        return None
    month = name[:-4] if name.endswith(".log") else ""
    return month if _MONTH.fullmatch(month) else None


# --- push and pull -----------------------------------------------------------------------------

class RemoteBackup:
    """The backup directory and its mirror on the target."""

    def __init__(self, backup: BackupDirectory, target: SftpTarget, state_dir: Path):
        self.backup = backup
        self.target = target
        self.state_dir = Path(state_dir)
        self.record = PushRecord(self.state_dir / STATE_FILE)
        self.fsync = None                 # whether the target did fsync@openssh.com (None: not asked yet)
        self.stopping = threading.Event()
        # Running SHA-256 of what the target holds, per log, so a push after
        # the first one in this process does not read each log again.
        self._hashers: dict[str, tuple[int, int, object]] = {}
        self._last_reason = ""            # why the last log was uploaded whole

    # --- the target's paths ---

    def _remote(self, tenant: str, month: str, temp: bool = False) -> str:
        name = f".{month}.log.uploading" if temp else f"{month}.log"
        return f"{self.target.url.path}/{tenant}/{name}"

    # --- lag, from the local side only ---

    def lag(self) -> dict:
        """What the target lacks, as far as the record says: frames and
        bytes not pushed yet, and the logs they are in.  No network."""
        frames = nbytes = logs = 0
        recorded = self.record.logs
        for tenant, month, path in self.backup.logs():
            rec = recorded.get(f"{tenant}/{month}")
            try:
                with open(path, "rb") as f:
                    st = os.fstat(f.fileno())
                    start = rec["size"] if rec and rec.get("inode") == st.st_ino and rec["size"] <= st.st_size else 0
                    end, n = frame_end(f, start, st.st_size)
            except FileNotFoundError:
                continue
            if end > start or (rec is None and end):
                frames, nbytes, logs = frames + n, nbytes + end - start, logs + 1
        return {"frames": frames, "bytes": nbytes, "logs": logs}

    # --- push ---

    def push(self) -> dict:
        """Make the target hold every local log, whole frames only.  Returns
        {"logs", "created", "appended", "replaced", "unchanged", "bytes_sent",
        "frames_sent", "repaired", "fsync", "seconds"} ("repaired": replaced
        because the target's copy differed); RemoteError when the
        target cannot be reached or refuses (what was pushed before that is
        recorded)."""
        t0 = time.monotonic()
        out = {"logs": 0, "created": 0, "appended": 0, "replaced": 0, "unchanged": 0, "bytes_sent": 0,
               "frames_sent": 0, "repaired": 0}
        # Read again: a `mailtresor backup push` may have pushed since.
        self.record = rec = PushRecord(self.state_dir / STATE_FILE)
        rec.doc["last_attempt"] = time.time()
        if rec.doc.get("remote") != str(self.target.url):
            if rec.logs:
                log.info("remote backup: the target is now %s; comparing its logs with the local ones",
                         self.target.url)
            rec.doc["remote"], rec.doc["logs"] = str(self.target.url), {}
            self._hashers.clear()
        try:
            with self.target.session() as sftp:
                self._mkdirs(sftp, self.target.url.path)
                for tenant, month, path in self.backup.logs():
                    if self.stopping.is_set():
                        raise RemoteError("stopped before the push was done")
                    what, sent, frames = self._push_log(sftp, tenant, month, path)
                    out["logs"] += 1
                    out[what] += 1
                    out["bytes_sent"] += sent
                    out["frames_sent"] += frames
                    if what == "replaced" and self._last_reason == "the target's copy differs":
                        out["repaired"] += 1
                    rec.save()
        except RemoteError as e:
            rec.doc["last_error"] = str(e)
            rec.doc["lag"] = self.lag()
            rec.save()
            raise
        except (OSError, EOFError) as e:
            # paramiko's SFTP errors are IOErrors; a dropped link is EOFError
            # or socket.timeout.  One line, the target named.
            msg = f"{self.target.url.host}:{self.target.url.port}: {_describe(e)}"
            rec.doc["last_error"] = msg
            rec.doc["lag"] = self.lag()
            rec.save()
            raise RemoteError(msg) from None
        out["fsync"] = self.fsync
        out["seconds"] = round(time.monotonic() - t0, 3)
        rec.doc.update(last_push=time.time(), last_error=None, last_summary=out, lag=self.lag())
        rec.save()
        return out

    def _mkdirs(self, sftp, path: str) -> None:
        try:
            if not stat.S_ISDIR(sftp.stat(path).st_mode):
                raise RemoteError(f"{self.target.url}: {path} is not a directory on the target")
        except FileNotFoundError:
            try:
                sftp.mkdir(path, 0o700)
            except OSError as e:
                raise RemoteError(f"{self.target.url}: cannot make {path} on the target: {_describe(e)}") from None

    def _push_log(self, sftp, tenant: str, month: str, path: Path) -> tuple[str, int, int]:
        key = f"{tenant}/{month}"
        rec = self.record.logs.get(key)
        rpath = self._remote(tenant, month)
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            # Whole frames only; the walk starts where the last push ended
            # when the file is the same one (appended to since).
            start = rec["size"] if rec and rec.get("inode") == st.st_ino and rec["size"] <= st.st_size else 0
            end, _ = frame_end(f, start, st.st_size)
            self._mkdirs(sftp, f"{self.target.url.path}/{tenant}")
            rsize = _remote_size(sftp, rpath)
            base = self._pushed_prefix(f, st, key, rec, rsize, end, sftp, rpath)
            if base is not None and base == end:
                self.record.logs[key] = self._entry(st, end, key)
                return "unchanged", 0, 0
            if base is not None:
                sent, frames = self._append(sftp, f, rpath, base, end)
                h = self._hashers[key][2]
                for data in _chunks(f, base, end):
                    h.update(data)
                self._hashers[key] = (st.st_ino, end, h)
                self.record.logs[key] = self._entry(st, end, key)
                return "appended", sent, frames
            sent, frames = self._replace(sftp, f, tenant, month, end)
            self.record.logs[key] = self._entry(st, end, key)
            if self._last_reason == "new on the target":
                return "created", sent, frames
            log.info("remote backup: %s replaced on the target (%s), %d bytes", key, self._last_reason, sent)
            return "replaced", sent, frames

    def _entry(self, st, size: int, key: str) -> dict:
        return {"size": size, "inode": st.st_ino, "sha256": self._hashers[key][2].hexdigest(), "time": time.time()}

    def _pushed_prefix(self, f, st, key, rec, rsize, end, sftp, rpath) -> int | None:
        """Where an append may start: the size of the target's copy, when it
        is a prefix of the local log; None when the log must be uploaded
        whole (new, rewritten locally, or the target's copy differs)."""
        if rsize is None:
            self._last_reason = "new on the target" if rec is None else "the target's copy differs"
            return self._reset(key)
        if rec is not None:
            size = rec["size"]
            cached = self._hashers.get(key)
            if cached is not None and cached[0] == st.st_ino and cached[1] == size and size <= end:
                same = True            # same file, only appended to since (BackupDirectory.ship)
            else:
                same = size <= end and _sha_local(f, size) == rec["sha256"]
                if same:
                    self._rehash(f, key, st, size)
            if not same:
                self._last_reason = "rewritten locally (compacted)"
                return self._reset(key)
            if rsize == size:
                return size
            if size < rsize <= end and self._remote_matches(sftp, rpath, f, size, rsize):
                # A push that wrote these bytes and stopped before recording them.
                self._hashers[key][2].update(b"".join(_chunks(f, size, rsize)))
                self._hashers[key] = (st.st_ino, rsize, self._hashers[key][2])
                return rsize
            log.warning("remote backup: %s on the target is %d bytes, %d were pushed: its copy differs; "
                        "uploading the local log whole", key, rsize, size)
            self._last_reason = "the target's copy differs"
            return self._reset(key)
        # Nothing recorded (first push to this target, or the record lost):
        # the target's copy is used if it is a prefix of the local log.
        if 0 < rsize <= end and self._remote_matches(sftp, rpath, f, 0, rsize):
            self._rehash(f, key, st, rsize)
            return rsize
        self._last_reason = "the target's copy differs" if rsize else "new on the target"
        return self._reset(key)

    def _reset(self, key: str) -> None:
        self._hashers.pop(key, None)
        return None

    def _rehash(self, f, key: str, st, size: int) -> None:
        h = hashlib.sha256()
        for data in _chunks(f, 0, size):
            h.update(data)
        self._hashers[key] = (st.st_ino, size, h)

    def _remote_matches(self, sftp, rpath: str, f, start: int, end: int) -> bool:
        """Whether the target's bytes [start, end) are the local ones (a
        download of that range, compared by SHA-256)."""
        hr, hl = hashlib.sha256(), hashlib.sha256()
        with sftp.open(rpath, "rb") as rf:
            rf.seek(start)
            left = end - start
            while left > 0:
                data = rf.read(min(CHUNK, left))
                if not data:
                    return False
                hr.update(data)
                left -= len(data)
        for data in _chunks(f, start, end):
            hl.update(data)
        return hr.digest() == hl.digest()

    def _send(self, sftp, rf, f, start: int, end: int) -> tuple[int, int]:
        sent = 0
        for data in _chunks(f, start, end):
            rf.write(data)
            sent += len(data)
        rf.flush()
        self._fsync(sftp, rf)
        _, frames = frame_end(f, start, end)
        return sent, frames

    def _append(self, sftp, f, rpath: str, start: int, end: int) -> tuple[int, int]:
        with sftp.open(rpath, "r+b") as rf:
            rf.set_pipelined(True)
            rf.seek(start)
            sent, frames = self._send(sftp, rf, f, start, end)
        got = _remote_size(sftp, rpath)
        if got != end:
            raise RemoteError(f"{rpath} on the target is {got} bytes after the append, not {end}")
        return sent, frames

    def _replace(self, sftp, f, tenant: str, month: str, end: int) -> tuple[int, int]:
        tmp, final = self._remote(tenant, month, temp=True), self._remote(tenant, month)
        key = f"{tenant}/{month}"
        try:
            with sftp.open(tmp, "wb") as rf:
                rf.set_pipelined(True)
                sent, frames = self._send(sftp, rf, f, 0, end)
            got = _remote_size(sftp, tmp)
            if got != end:
                raise RemoteError(f"{tmp} on the target is {got} bytes after the upload, not {end}")
        except BaseException:
            # The old log is untouched; the partial upload goes if the
            # link still allows (else the next replacement overwrites it).
            with contextlib.suppress(Exception):
                sftp.remove(tmp)
            raise
        try:
            sftp.posix_rename(tmp, final)
        except OSError as e:
            raise RemoteError(f"{self.target.url}: the target did not rename {tmp} over {final} "
                              f"(posix-rename@openssh.com: {_describe(e)}); an atomic replace is needed, "
                              "use OpenSSH's sftp-server") from None
        self._rehash(f, key, os.fstat(f.fileno()), end)
        return sent, frames

    def _fsync(self, sftp, rf) -> None:
        """fsync@openssh.com on the open file, where the target offers it."""
        if self.fsync is False:
            return
        from paramiko.sftp import CMD_EXTENDED
        try:
            sftp._request(CMD_EXTENDED, "fsync@openssh.com", rf.handle)
            self.fsync = True
        except OSError as e:
            if self.fsync is None:
                log.warning("remote backup: the target does not fsync (fsync@openssh.com: %s); what it "
                            "acknowledged may be lost if it crashes", _describe(e))
            self.fsync = False

    # --- pull ---

    def pull(self, dest: Path, seal_public=None) -> dict:
        """Download every log of the target into `dest` (empty or new), and
        check each: its frames, chain, blobs and seals (verify_log; seals
        against `seal_public` when given), and what was pushed (this
        appliance's record, when there is one).  A log with a problem is
        kept as `MONTH.log.damaged`, which restore does not read.  Returns
        {"logs", "bytes", "good", "problems": {"TENANT/MONTH": [..]}}."""
        dest = Path(dest)
        if dest.exists() and any(dest.iterdir()):
            raise RemoteError(f"{dest} is not empty: pull into a new or empty directory")
        private_dir(dest)
        out = {"logs": 0, "bytes": 0, "good": 0, "problems": {}}
        root = self.target.url.path
        pushed = self.record.logs if self.record.doc.get("remote") == str(self.target.url) else {}
        seen = set()
        try:
            with self.target.session() as sftp:
                try:
                    tenants = sorted(sftp.listdir(root))
                except FileNotFoundError:
                    raise RemoteError(f"{self.target.url}: no such directory on the target") from None
                for tenant in tenants:
                    if pulled_month(tenant, "0000-00.log") is None:
                        continue
                    try:
                        names = sorted(sftp.listdir(f"{root}/{tenant}"))
                    except OSError:
                        continue          # a file, not a tenant's directory
                    for name in names:
                        month = pulled_month(tenant, name)
                        if month is None:
                            continue
                        key = f"{tenant}/{month}"
                        seen.add(key)
                        problems, nbytes = self._pull_log(sftp, f"{root}/{tenant}/{name}", dest, tenant, month,
                                                          pushed.get(key), seal_public)
                        out["logs"] += 1
                        out["bytes"] += nbytes
                        if problems:
                            out["problems"][key] = problems
                        else:
                            out["good"] += 1
        except (OSError, EOFError) as e:
            raise RemoteError(f"{self.target.url.host}:{self.target.url.port}: {_describe(e)}") from None
        for key in sorted(set(pushed) - seen):
            out["problems"][key] = [f"pushed ({pushed[key]['size']} bytes) but not on the target"]
        return out

    def _pull_log(self, sftp, rpath, dest, tenant, month, pushed, seal_public) -> tuple[list[str], int]:
        d = private_dir(dest / tenant)
        part = d / f".{month}.log.part"
        h = hashlib.sha256()
        nbytes = 0
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
        try:
            with sftp.open(rpath, "rb") as rf:
                rf.prefetch()
                while True:
                    data = rf.read(CHUNK)
                    if not data:
                        break
                    if pushed is not None and nbytes < pushed["size"]:
                        h.update(data[:pushed["size"] - nbytes])
                    nbytes += len(data)
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        problems, _facts = verify_log(part, tenant, month, seal_public)
        if pushed is not None:
            if nbytes < pushed["size"]:
                problems.append(f"shorter on the target ({nbytes} bytes) than what was pushed ({pushed['size']})")
            elif h.hexdigest() != pushed["sha256"]:
                problems.append("differs on the target from what was pushed (SHA-256 of the first "
                                f"{pushed['size']} bytes)")
        final = d / (f"{month}.log.damaged" if problems else f"{month}.log")
        os.replace(part, final)
        fsync_parent(final)
        return problems, nbytes

    # --- status ---

    def status(self) -> dict:
        """What `mailtresor backup status` and status.json say."""
        d = self.record.doc
        return {"remote": str(self.target.url), "last_push": d.get("last_push"),
                "last_attempt": d.get("last_attempt"), "last_error": d.get("last_error"),
                "last_summary": d.get("last_summary"), "lag": d.get("lag"), "fsync": self.fsync,
                "logs_pushed": len(d.get("logs") or {})}


def _describe(e: BaseException) -> str:
    if isinstance(e, socket.timeout):
        return "no answer in time (io_timeout)"
    if isinstance(e, EOFError):
        return "the connection was closed"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror + (f": {e.filename}" if e.filename else "")
    return str(e) or type(e).__name__


def from_config(cfg) -> RemoteBackup:
    """The RemoteBackup of a configuration with a [backup] remote."""
    b = cfg.backup
    target = SftpTarget(parse_remote(b.remote), b.known_hosts, b.identity_file,
                        connect_timeout=b.connect_timeout, io_timeout=b.io_timeout)
    return RemoteBackup(BackupDirectory(cfg.archive.backup_directory), target, cfg.appliance.state_directory)


# --- the daemon's schedule -------------------------------------------------------------------

class Scheduler:
    """Pushes on a thread of the reactor's pool: `first` seconds after
    start, then every `interval`; after a failure again after
    `retry_initial`, doubling up to `interval`.  One push at a time; the
    reactor thread never waits on the network.  `on_change` is called (on
    the reactor thread) after each attempt."""

    def __init__(self, reactor, remote: RemoteBackup, interval: float, retry_initial: float, *,
                 first: float = 5.0, on_change=None):
        self.reactor = reactor
        self.remote = remote
        self.interval = interval
        self.retry_initial = min(retry_initial, interval)
        self.first = first
        self.on_change = on_change
        self.failures = 0
        self.running = False
        self._call = None
        self._stopped = False
        self._lag = remote.record.doc.get("lag")

    def start(self) -> None:
        self._schedule(self.first)

    def stop(self) -> None:
        self._stopped = True
        self.remote.stopping.set()
        if self._call is not None and self._call.active():
            self._call.cancel()

    def _schedule(self, delay: float) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        if not self._stopped:
            self._call = self.reactor.callLater(delay, self._tick)

    def _tick(self) -> None:
        from twisted.internet import threads
        if self.running or self._stopped:
            return
        self.running = True
        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self._attempt)
        d.addCallbacks(self._done, self._failed)

    def _attempt(self):
        try:
            with exclusive(self.remote.state_dir, wait=0):
                return self.remote.push()
        except Busy:
            return None                   # a `mailtresor backup` command is at it: not a failure

    def _done(self, summary) -> None:
        self.running = False
        if summary is None:
            self._schedule(self.retry_initial)
            return
        if self.failures:
            log.info("remote backup: %s reachable again; pushed %d bytes", self.remote.target.url,
                     summary["bytes_sent"])
        elif summary["bytes_sent"]:
            log.info("remote backup: pushed %d frame(s), %d bytes to %s", summary["frames_sent"],
                     summary["bytes_sent"], self.remote.target.url)
        self.failures = 0
        self._schedule(self.interval)
        self._changed()

    def _failed(self, failure) -> None:
        self.running = False
        self.failures += 1
        delay = min(self.interval, self.retry_initial * 2 ** (self.failures - 1))
        if failure.check(RemoteError):
            text = failure.getErrorMessage()
        else:
            text = f"{failure.type.__name__}: {failure.getErrorMessage()}"
            log.error("remote backup: unexpected failure", exc_info=(failure.type, failure.value, failure.tb))
        level = logging.WARNING if self.failures == 1 or self.failures % 10 == 0 else logging.DEBUG
        log.log(level, "remote backup: push failed (%s); trying again in %.0f s", text, delay)
        self._schedule(delay)
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def status(self) -> dict:
        st = self.remote.status()
        st["failures_in_a_row"] = self.failures
        st["pushing"] = self.running
        return st
