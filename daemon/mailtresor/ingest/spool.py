"""The encrypted, durable spool: where ingest ends and archiving begins.

A spool is a directory:

    tmp/    messages being received; each file is flock()ed by its writer
    new/    committed messages, one file each, ready for the archiver
    bad/    entries set aside after repeated failures (kept, never deleted)
    tries/  failure counts of entries in new/

Accepting a message (SMTP 250, milter continue) happens only after
`SpoolWriter.commit()`'s future has resolved: the file was written, flushed
to stable storage, renamed into `new/` and `new/` itself was flushed.
Commits of concurrent sessions are batched by one committer thread, so a
batch shares its flushes (group commit).

The file format (docs/FORMAT.md has the byte-level description) is a magic
string followed by typed, length-prefixed records:

    H  header, plaintext JSON: id, key name and version, salt
    D  data chunk, AES-256-GCM           (the raw message, in order)
    E  envelope, AES-256-GCM, JSON
    Z  end, AES-256-GCM, JSON: record count, size, SHA-256 of the raw bytes

Each file has its own key, HKDF(spool key, salt, id); nonces are record
sequence numbers; every record's associated data binds the header, its type
and its position.  A file without a valid Z record, with a record out of
place, or with anything after Z, is torn or tampered with and is refused.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import queue
import re
import secrets
import struct
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from mailtresor.durable import fsync_dir, write_all
from mailtresor.keys import crypto
from mailtresor.keys.derive import SPOOL_KEY, spool_file_key

log = logging.getLogger("mailtresor.ingest.spool")

MAGIC = b"MTSPOOL1"
FORMAT_VERSION = 1
CHUNK_SIZE = 64 * 1024
_REC = struct.Struct(">cI")
_MAX_RECORD = CHUNK_SIZE + crypto.TAG_SIZE + 16 * 1024 * 1024  # envelopes may be large
_FLUSH_AT = 256 * 1024
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


# --- failures ---------------------------------------------------------------
# relay.py and the milter adapter turn these into replies through one table
# (mailtresor.ingest.replies); every one of them is temporary.

class SpoolError(Exception):
    """The spool cannot take this message now; the sender should retry."""


class SpoolUnavailable(SpoolError):
    """No spool key is held (control endpoint not reached yet)."""


class SpoolFull(SpoolError):
    """Not enough space or too many entries."""


class SpoolIOError(SpoolError):
    """Writing or flushing failed."""


class SpoolClosed(SpoolError):
    """The daemon is shutting down."""


class NotSetAside(Exception):
    """`Spool.requeue()` of an id that is not in bad/."""

    def __init__(self, entry_id: str, why: str):
        super().__init__(f"{entry_id!r}: {why}")
        self.entry_id, self.why = entry_id, why


class MessageTooLarge(Exception):
    """The message exceeds spool.max_message_size (permanent, 552 5.3.4)."""


class SpoolCorrupt(Exception):
    """A committed entry does not verify (torn, truncated or tampered)."""


class KeyNotHeld(Exception):
    """The key version an entry was written with is not in memory."""

    def __init__(self, name: str, version: int):
        super().__init__(f"key {name} version {version} is not held")
        self.name, self.version = name, version


class Keys(Protocol):
    """What the spool needs from the key ring (mailtresor.keys.ring.KeyRing)."""

    def current(self, name: str) -> tuple[int, bytes] | None: ...

    def get(self, name: str, version: int) -> bytes | None: ...


# --- envelope ---------------------------------------------------------------

@dataclass
class Envelope:
    """Everything known about a message besides its bytes.

    Addresses are text; bytes that are not UTF-8 are kept through
    surrogateescape, so `addr.encode('utf-8', 'surrogateescape')` gives the
    bytes the client sent.
    """

    source: str                       # "relay", "milter" or "import"
    mail_from: str = ""
    rcpt_to: list[str] = field(default_factory=list)
    connector: str = ""               # relay connector / milter name
    tenant: str = ""                  # the connector's tenant, if it names one: the only one it writes into
    client_address: str = ""
    client_port: int = 0
    client_name: str = ""
    helo: str = ""
    tls: dict | None = None           # version, cipher, client certificate facts
    mail_params: dict = field(default_factory=dict)
    rcpt_params: list[dict] = field(default_factory=list)
    macros: dict = field(default_factory=dict)
    queue_id: str = ""                # the MTA's queue id (milter)
    received_at: float = 0.0
    size: int = 0
    sha256: str = ""
    # What the ingest path noticed about the message, each searchable as
    # flag:NAME once archived (e.g. "bare-newline" from the relay).
    flags: list[str] = field(default_factory=list)
    # Set only by a journaling relay connector, at acceptance:
    # {"tenant_id": expected X-MS-Exchange-CrossTenant-Id, lower case, or ""}.
    # An entry without it is never unwrapped (archiver.prepare).
    journaling: dict | None = None

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, ensure_ascii=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "Envelope":
        data = json.loads(raw)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class SpoolEntry:
    id: str
    envelope: Envelope
    data: bytes
    key_version: int


# --- ids ----------------------------------------------------------------------

def new_id(now: float | None = None) -> str:
    """26 characters, sortable by time: 48-bit milliseconds + 80 random bits."""
    ms = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    n = (ms << 80) | secrets.randbits(80)
    return "".join(_CROCKFORD[(n >> (5 * i)) & 31] for i in range(25, -1, -1))


_ID = re.compile(f"[{_CROCKFORD}]{{26}}")


def is_id(name: str) -> bool:
    return _ID.fullmatch(name) is not None


# --- records ------------------------------------------------------------------

def _aad(header_digest: bytes, rtype: bytes, seq: int) -> bytes:
    return b"mailtresor-spool-v1\0" + header_digest + rtype + seq.to_bytes(4, "big")


def _record(rtype: bytes, payload: bytes) -> bytes:
    return _REC.pack(rtype, len(payload)) + payload


def _as_spool_error(e: OSError) -> SpoolError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpoolFull(f"no space left in the spool ({e.strerror})")
    return SpoolIOError(f"spool write failed: {e.strerror or e}")


class SpoolWriter:
    """One message being received.  Not thread-safe: one session owns it.

    `write()` never raises for I/O trouble: a session cannot answer in the
    middle of DATA, so the first failure is kept and reported by `commit()`.
    """

    def __init__(self, spool: "Spool", entry_id: str, key_version: int, key: bytes):
        self.id = entry_id
        self._spool = spool
        self._tmp = spool.tmp_dir / entry_id
        # The file is created at the first flush: for most messages that is
        # in the committer thread, so the session's thread (the reactor)
        # makes no file-system call at all.
        self._fd = -1
        salt = crypto.random_bytes(16)
        header = json.dumps({
            "v": FORMAT_VERSION, "id": entry_id, "key": SPOOL_KEY, "key_version": key_version,
            "alg": "AES-256-GCM;HKDF-SHA256", "salt": base64.b64encode(salt).decode(),
        }, separators=(",", ":")).encode()
        self._digest = hashlib.sha256(header).digest()
        self._aead = crypto.Aead(spool_file_key(key, salt, entry_id))
        self._out = bytearray(MAGIC + _record(b"H", header))
        self._buf = bytearray()
        self._seq = 0
        self._size = 0
        self._sha = hashlib.sha256()
        self.error: BaseException | None = None
        self.too_large = False
        self._state = "open"

    @property
    def size(self) -> int:
        return self._size

    def write(self, data: bytes) -> None:
        if self._state != "open" or self.error is not None or not data:
            return
        self._size += len(data)
        if self._size > self._spool.max_message_size:
            self.too_large = True
            return
        self._sha.update(data)
        self._buf += data
        if len(self._buf) >= CHUNK_SIZE:
            view = memoryview(self._buf)
            full = len(self._buf) - len(self._buf) % CHUNK_SIZE
            for off in range(0, full, CHUNK_SIZE):
                self._seal(b"D", view[off:off + CHUNK_SIZE])
            view.release()
            del self._buf[:full]
        if len(self._out) >= _FLUSH_AT:
            self._flush()

    def _seal(self, rtype: bytes, payload) -> None:
        ct = self._aead.seal(crypto.counter_nonce(self._seq), bytes(payload),
                             _aad(self._digest, rtype, self._seq))
        self._out += _record(rtype, ct)
        self._seq += 1

    def _flush(self) -> None:
        try:
            if self._fd < 0:
                self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                fcntl.flock(self._fd, fcntl.LOCK_EX)  # a live writer; recover() leaves it alone
            write_all(self._fd, self._out)
        except OSError as e:
            self.error = _as_spool_error(e)
        self._out.clear()

    def commit(self, envelope: Envelope) -> Future:
        """Hand the message to the committer.  The future gives the spool id
        once the entry is durable, or a SpoolError / MessageTooLarge."""
        fut: Future = Future()
        if self._state != "open":
            fut.set_exception(SpoolIOError("writer already finished"))
            return fut
        self._state = "committing"
        if self.too_large:
            self.abort()
            fut.set_exception(MessageTooLarge(f"message exceeds {self._spool.max_message_size} bytes"))
            return fut
        if self.error is not None:
            err = self.error
            self.abort()
            fut.set_exception(err)
            return fut
        envelope.size = self._size
        envelope.sha256 = self._sha.hexdigest()
        if not envelope.received_at:
            envelope.received_at = time.time()
        self._spool._submit(self, envelope, fut)
        return fut

    # called by the committer thread
    def _finish(self, envelope: Envelope, fsync: bool) -> None:
        if self._buf or self._seq == 0:
            self._seal(b"D", self._buf)
            self._buf.clear()
        data_records = self._seq
        self._seal(b"E", envelope.to_json())
        end = json.dumps({"records": data_records, "size": self._size,
                          "sha256": envelope.sha256}, separators=(",", ":")).encode()
        self._seal(b"Z", end)
        self._flush()
        if self.error is not None:
            raise self.error
        try:
            if fsync:
                os.fsync(self._fd)
        except OSError as e:
            raise _as_spool_error(e) from None

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def abort(self) -> None:
        """Forget this message (the session ended without a commit)."""
        if self._state == "done":
            return
        self._state = "done"
        if self._fd < 0:
            return
        self._close_fd()
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("could not remove %s: %s", self._tmp.name, e.strerror)


# --- the spool ----------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _syncfs(fd: int) -> None:
    if _libc.syncfs(fd) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class Spool:
    def __init__(self, directory: Path, keys: Keys, *, max_message_size: int = 50 << 20,
                 min_free_bytes: int = 64 << 20, max_entries: int = 200_000,
                 sync: str = "auto", max_tries: int = 5):
        self.directory = Path(directory)
        self.tmp_dir = self.directory / "tmp"
        self.new_dir = self.directory / "new"
        self.bad_dir = self.directory / "bad"
        self.tries_dir = self.directory / "tries"
        self.unrouted_dir = self.directory / "unrouted"
        self.keys = keys
        self.max_message_size = max_message_size
        self.min_free_bytes = min_free_bytes
        self.max_entries = max_entries
        self.max_tries = max_tries
        for d in (self.directory, self.tmp_dir, self.new_dir, self.bad_dir, self.tries_dir, self.unrouted_dir):
            d.mkdir(mode=0o700, exist_ok=True)
        if sync == "auto":
            sync = "syncfs" if os.path.ismount(self.directory) else "fsync"
        self.sync = sync
        self._lock = threading.Lock()
        self._count = sum(1 for n in os.listdir(self.new_dir) if is_id(n))
        self._closed = False
        self._free = (0.0, 0)          # (when, bytes available): statvfs at most once a second
        self._counted = time.monotonic()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._committer = threading.Thread(target=self._run, name="spool-committer", daemon=True)
        self._committer.start()
        self.commits = 0   # statistics: entries and flush batches
        self.batches = 0

    # --- ingest side ---

    def admit(self, size_hint: int = 0) -> None:
        """Raise the SpoolError a new message would meet now (or MessageTooLarge)."""
        if self._closed:
            raise SpoolClosed("the archive is shutting down")
        if size_hint > self.max_message_size:
            raise MessageTooLarge(f"message exceeds {self.max_message_size} bytes")
        if self.keys.current(SPOOL_KEY) is None:
            raise SpoolUnavailable("no spool key yet (control endpoint not reached)")
        now = time.monotonic()
        if now - self._counted > 10 or self._count >= self.max_entries:
            # Other processes (the archiver, `mailtresor import`) change new/ too.
            self._counted = now
            self.ready()
        if self._count >= self.max_entries:
            raise SpoolFull(f"spool holds {self._count} entries (limit {self.max_entries})")
        when, free = self._free
        if now - when > 1.0 or free < self.min_free_bytes + size_hint + (16 << 20):
            try:
                st = os.statvfs(self.directory)
            except OSError as e:
                raise _as_spool_error(e) from None
            free = st.f_bavail * st.f_frsize
            self._free = (now, free)
        if free < self.min_free_bytes + size_hint:
            raise SpoolFull("insufficient free space in the spool")

    def open_writer(self, size_hint: int = 0) -> SpoolWriter:
        self.admit(size_hint)
        current = self.keys.current(SPOOL_KEY)
        if current is None:
            raise SpoolUnavailable("no spool key yet (control endpoint not reached)")
        version, key = current
        try:
            return SpoolWriter(self, new_id(), version, key)
        except OSError as e:
            raise _as_spool_error(e) from None

    def _submit(self, writer: SpoolWriter, envelope: Envelope, fut: Future) -> None:
        self._queue.put((writer, envelope, fut))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            stop = False
            while True:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            try:
                self._commit_batch(batch)
            except BaseException as e:  # never leave a session waiting forever
                log.exception("spool committer failed")
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(SpoolIOError(f"spool committer failed: {e}"))
            if stop:
                return

    def _commit_batch(self, batch) -> None:
        per_file = self.sync == "fsync"
        written = []
        for writer, envelope, fut in batch:
            try:
                writer._finish(envelope, fsync=per_file)
                if not per_file:
                    writer._close_fd()
                written.append((writer, fut))
            except SpoolError as e:
                writer.abort()
                fut.set_exception(e)
            except Exception as e:  # noqa: BLE001 - reported to the session as temporary
                writer.abort()
                fut.set_exception(SpoolIOError(f"spool write failed: {e}"))
        if not written:
            return
        try:
            if not per_file:
                dfd = os.open(self.tmp_dir, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    _syncfs(dfd)
                finally:
                    os.close(dfd)
            done = []
            for writer, fut in written:
                os.rename(writer._tmp, self.new_dir / writer.id)
                writer._close_fd()
                writer._state = "done"
                done.append((writer, fut))
            dfd = os.open(self.new_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            err = _as_spool_error(e)
            # Whatever was renamed stays: it is complete, merely not known to
            # be durable.  The sender retries; the archive stores it once.
            for writer, fut in written:
                if writer._state != "done":
                    writer.abort()
                fut.set_exception(err)
            return
        with self._lock:
            self._count += len(done)
            self.commits += len(done)
            self.batches += 1
        for writer, fut in done:
            fut.set_result(writer.id)

    def close(self, timeout: float | None = None) -> None:
        """Refuse new messages; finish the commits already handed over."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._committer.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    def recover(self) -> int:
        """Remove files of receptions that ended without a commit (they were
        never acknowledged).  Files a live writer holds are left alone."""
        removed = 0
        for name in os.listdir(self.tmp_dir):
            path = self.tmp_dir / name
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                os.unlink(path)
                removed += 1
            finally:
                os.close(fd)
        return removed

    # --- archiver side ---

    def depth(self) -> int:
        with self._lock:
            return self._count

    def ready(self, limit: int | None = None) -> list[str]:
        """Committed entries, oldest first."""
        names = sorted(n for n in os.listdir(self.new_dir) if is_id(n))
        with self._lock:
            self._count = len(names)
        return names if limit is None else names[:limit]

    def read(self, entry_id: str) -> SpoolEntry:
        if not is_id(entry_id):
            raise SpoolCorrupt(f"{entry_id!r} is not a spool id")
        with open(self.new_dir / entry_id, "rb") as f:
            raw = f.read()
        return decode(raw, entry_id, self.keys)

    def done(self, entry_id: str) -> None:
        """The entry is safely archived: remove it.  Only the archiver calls
        this, and only after its records are committed."""
        self.done_many([entry_id])

    def done_many(self, entry_ids: list[str]) -> None:
        """`done()` for a batch: the tries directory (almost always empty) is
        listed once instead of an unlink that fails for each entry."""
        for entry_id in entry_ids:
            try:
                os.unlink(self.new_dir / entry_id)
            except FileNotFoundError:
                continue
            with self._lock:
                self._count = max(0, self._count - 1)
        try:
            tried = set(os.listdir(self.tries_dir))
        except FileNotFoundError:
            return
        for entry_id in tried.intersection(entry_ids):
            try:
                os.unlink(self.tries_dir / entry_id)
            except FileNotFoundError:
                pass

    def tries(self, entry_id: str) -> int:
        try:
            return json.loads((self.tries_dir / entry_id).read_bytes())["tries"]
        except (FileNotFoundError, ValueError, KeyError):
            return 0

    def failed(self, entry_id: str, reason: str) -> bool:
        """Count a failed attempt; after max_tries the entry is set aside.

        `reason` must not contain message content (use the exception class
        name or a fixed text): it is stored and logged in the clear.
        Returns True if the entry was set aside.
        """
        n = self.tries(entry_id) + 1
        if n >= self.max_tries:
            self.set_aside(entry_id, reason, tries=n)
            return True
        _atomic_write(self.tries_dir / entry_id, json.dumps(
            {"tries": n, "last": reason, "time": time.time()}).encode())
        return False

    def set_aside(self, entry_id: str, reason: str, tries: int | None = None) -> None:
        """Move an entry to bad/ with a note; it is kept, never deleted."""
        note = {"id": entry_id, "reason": reason, "time": time.time(),
                "tries": self.tries(entry_id) if tries is None else tries}
        _atomic_write(self.bad_dir / f"{entry_id}.why", json.dumps(note).encode())
        self._move_out(entry_id, self.bad_dir)
        log.warning("%s: set aside in bad/: %s", entry_id, reason)

    def requeue(self, entry_id: str) -> None:
        """Put a set-aside entry back in new/ (after the cause was mended),
        whatever it was set aside for, with its try count back at zero.

        Safe while a daemon archives from this spool: one rename(2) moves
        the entry, the archiver only reads new/ and lists it again at its
        next batch.  Raises NotSetAside for an id that is not in bad/."""
        if not is_id(entry_id):
            raise NotSetAside(entry_id, "not a spool entry id")
        try:
            os.unlink(self.tries_dir / entry_id)     # set_aside() forgot them; a crash may not have
        except FileNotFoundError:
            pass
        try:
            os.rename(self.bad_dir / entry_id, self.new_dir / entry_id)
        except FileNotFoundError:
            raise NotSetAside(entry_id, "not set aside") from None
        fsync_dir(self.new_dir)
        fsync_dir(self.bad_dir)
        try:
            os.unlink(self.bad_dir / f"{entry_id}.why")
        except FileNotFoundError:
            pass
        with self._lock:
            self._count += 1
        log.warning("%s: put back in the queue from bad/", entry_id)

    def set_aside_entries(self) -> list[str]:
        return sorted(n for n in os.listdir(self.bad_dir) if is_id(n))

    def set_aside_notes(self) -> dict[str, dict]:
        """Each set-aside entry's note: reason, time, tries (as written by
        set_aside(); {"reason": "(no note)"} when it cannot be read)."""
        out = {}
        for n in self.set_aside_entries():
            try:
                note = json.loads((self.bad_dir / f"{n}.why").read_bytes())
                if not isinstance(note, dict) or "reason" not in note:
                    raise ValueError
                out[n] = note
            except (OSError, ValueError):
                out[n] = {"id": n, "reason": "(no note)"}
        return out

    def set_aside_reasons(self) -> dict[str, str]:
        return {n: str(note["reason"]) for n, note in self.set_aside_notes().items()}

    # --- mail no tenant claims: kept, still under the spool key ---

    def hold_unrouted(self, entry_id: str) -> None:
        self._move_out(entry_id, self.unrouted_dir)

    def _move_out(self, entry_id: str, dest: Path) -> None:
        """Move an entry from new/ to `dest` durably; forget its tries."""
        os.rename(self.new_dir / entry_id, dest / entry_id)
        fsync_dir(dest)
        fsync_dir(self.new_dir)
        with self._lock:
            self._count = max(0, self._count - 1)
        try:
            os.unlink(self.tries_dir / entry_id)
        except FileNotFoundError:
            pass

    def unrouted_entries(self) -> list[str]:
        return sorted(n for n in os.listdir(self.unrouted_dir) if is_id(n))

    def reroute(self) -> int:
        """Put every unrouted entry back in new/ (after tenants changed)."""
        names = self.unrouted_entries()
        for n in names:
            os.rename(self.unrouted_dir / n, self.new_dir / n)
        if names:
            fsync_dir(self.new_dir)
            with self._lock:
                self._count += len(names)
        return len(names)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_dir(path.parent)


# --- reading ------------------------------------------------------------------

def header_of(raw: bytes) -> dict:
    """The plaintext header of a spool file (no key needed)."""
    if raw[:len(MAGIC)] != MAGIC:
        raise SpoolCorrupt("not a spool file (bad magic)")
    pos = len(MAGIC)
    if len(raw) < pos + _REC.size:
        raise SpoolCorrupt("truncated before the header")
    rtype, length = _REC.unpack_from(raw, pos)
    if rtype != b"H" or length > 4096 or len(raw) < pos + _REC.size + length:
        raise SpoolCorrupt("bad header record")
    try:
        return json.loads(raw[pos + _REC.size:pos + _REC.size + length])
    except ValueError:
        raise SpoolCorrupt("header is not JSON") from None


def decode(raw: bytes, entry_id: str, keys: Keys) -> SpoolEntry:
    """Verify and decrypt a whole spool file."""
    header = header_of(raw)
    pos = len(MAGIC)
    _, hlen = _REC.unpack_from(raw, pos)
    hbytes = raw[pos + _REC.size:pos + _REC.size + hlen]
    pos += _REC.size + hlen
    if header.get("v") != FORMAT_VERSION:
        raise SpoolCorrupt(f"unsupported spool format version {header.get('v')!r}")
    if header.get("id") != entry_id:
        raise SpoolCorrupt("file name and header id differ")
    version = header.get("key_version")
    if not isinstance(version, int):
        raise SpoolCorrupt("header lacks a key version")
    key = keys.get(SPOOL_KEY, version)
    if key is None:
        raise KeyNotHeld(SPOOL_KEY, version)
    try:
        salt = base64.b64decode(header["salt"], validate=True)
    except (KeyError, ValueError):
        raise SpoolCorrupt("header lacks a valid salt") from None
    aead = crypto.Aead(spool_file_key(key, salt, entry_id))
    digest = hashlib.sha256(hbytes).digest()
    chunks: list[bytes] = []
    envelope = end = None
    seq = 0
    while pos < len(raw):
        if end is not None:
            raise SpoolCorrupt("data after the end record")
        if len(raw) < pos + _REC.size:
            raise SpoolCorrupt("truncated record header")
        rtype, length = _REC.unpack_from(raw, pos)
        pos += _REC.size
        if length > _MAX_RECORD or len(raw) < pos + length:
            raise SpoolCorrupt(f"truncated record {seq}")
        try:
            plain = aead.open(crypto.counter_nonce(seq), raw[pos:pos + length],
                              _aad(digest, rtype, seq))
        except crypto.DecryptionError:
            raise SpoolCorrupt(f"record {seq} does not authenticate") from None
        pos += length
        if rtype == b"D":
            if envelope is not None:
                raise SpoolCorrupt("data after the envelope")
            chunks.append(plain)
        elif rtype == b"E":
            if envelope is not None:
                raise SpoolCorrupt("two envelopes")
            envelope = Envelope.from_json(plain)
        elif rtype == b"Z":
            end = json.loads(plain)
        else:
            raise SpoolCorrupt(f"unknown record type {rtype!r}")
        seq += 1
    if end is None:
        raise SpoolCorrupt("no end record (torn file)")
    if envelope is None:
        raise SpoolCorrupt("no envelope")
    data = b"".join(chunks)
    if end.get("records") != len(chunks) or end.get("size") != len(data):
        raise SpoolCorrupt("end record does not match the data")
    if hashlib.sha256(data).hexdigest() != end.get("sha256"):
        raise SpoolCorrupt("SHA-256 of the data does not match")
    return SpoolEntry(entry_id, envelope, data, version)
