"""The audit trail: every access to the archive, append-only, hash-chained,
fsynced, sealed.

One record per access (login, search, read, download, export, admin
change, denial) and per event of the appliance itself (key fetches,
anomalies).  The log is a directory (`[audit] directory`):

    audit-000000000001.log    segments: JSON lines, named by their first seq
    head                      the last seal: its seq and hash (see verify)
    lock                      flock(2) here serialises writers across processes
    torn-SEQ.bin              bytes cut from a torn tail at start (kept)

Each line is one record, canonical JSON (sorted keys, no spaces, ASCII
only, so a line end never occurs inside a record) with its own SHA-256 as
the last member; every record carries `seq` (1, 2, ...) and `prev`, the
hash of the record before it.  Every `seal_every` records, when a segment
is full, and at close, a seal record signs the hash of the record before
it with the appliance's Ed25519 seal key (the one that seals the shards).
Search terms are stored encrypted under a sub-key of the tenant's key with
the record's seq and tenant as associated data: auditors of the tenant read
them, an operator reading the file sees ciphertext.  The byte format is in
docs/FORMAT.md ("Audit trail"); what verify proves and what it cannot is in
docs/ACCESS.md.
"""

from __future__ import annotations

import base64
import calendar
import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mailtresor.durable import fsync_dir, own_like_directory, write_all
from mailtresor.keys import crypto
from mailtresor.keys.ring import KeyUnavailable
from mailtresor.archive.store import KeyMissing, private_dir

log = logging.getLogger("mailtresor.audit")

FORMAT = 1
GENESIS = "0" * 64
HASH_PREFIX = b"mailtresor/audit/1\0"
SEAL_PREFIX = b"mailtresor/audit-seal/1\0"
TERMS_AAD = b"mailtresor/audit-terms/1\0"
# A record line is at most this long: a tail can be found by reading this
# much from the end, and no caller can make one record swallow the disk.
MAX_RECORD = 64 * 1024
SEGMENT_BYTES = 64 << 20
SEGMENT = re.compile(r"^audit-(\d{12})\.log$")
HEAD = "head"
LOCK = "lock"

ACTIONS = ("login", "login-failed", "logout", "search", "read", "download", "export", "admin",
           "key-fetch", "anomaly",
           # The lifecycle (issue 15): rule changes and runs, holds placed and
           # lifted, four-eyes requests and decisions, each deletion batch,
           # case tags, GDPR exports and records, evidence reports.
           "retention-rule", "retention", "hold", "deletion-request", "deletion", "tag", "gdpr", "evidence")
EVENT_ACTIONS = frozenset(ACTIONS)          # what /api/v1/events serves
# Every action a record can have: ACTIONS and the core's reads of the trail itself.
RECORD_ACTIONS = ACTIONS + ("audit-read",)
RESULTS = ("ok", "denied", "failed", "not-found")
ALL = "*"              # read(tenant=ALL): every record (the CLI's operator view); no tenant is named "*"
ENCRYPTED = "(encrypted)"
_ACTION = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
# The hash is the last member of every line: `,"hash":"<64 hex>"}`.
_HASH_HEAD = b',"hash":"'
_TAIL = len(_HASH_HEAD) + 64 + 2


class AuditError(Exception):
    """The audit trail cannot take a record (its disk, its lock): the
    access it was to record must not happen."""


# --- the record format: pure functions --------------------------------------------

def iso(us: int) -> str:
    """Microseconds since the epoch as ISO 8601 UTC, e.g. 2026-12-03T05:52:06.123456Z."""
    s, frac = divmod(us, 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s)) + f".{frac:06d}Z"


def parse_iso(text: str) -> int:
    """The inverse of iso(); ValueError for anything else."""
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{6})Z", text)
    if m is None:
        raise ValueError(f"not a time: {text!r}")
    return calendar.timegm(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S")) * 1_000_000 + int(m.group(2))


def record_hash(body: bytes) -> str:
    return hashlib.sha256(HASH_PREFIX + body).hexdigest()


def encode(doc: dict) -> tuple[bytes, str]:
    """(line, hash) for a record without its hash."""
    body = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    h = record_hash(body)
    return body[:-1] + _HASH_HEAD + h.encode() + b'"}\n', h


class Malformed(ValueError):
    pass


def decode(line: bytes) -> tuple[dict, str]:
    """(record, its hash) of one line (without its line end); Malformed if
    the line is not a record as encode() writes it, or its hash does not
    match its bytes."""
    if len(line) < _TAIL or line[-_TAIL:-_TAIL + len(_HASH_HEAD)] != _HASH_HEAD or line[-2:] != b'"}':
        raise Malformed("not a record line")
    h = line[-66:-2].decode("ascii", "replace")
    body = line[:-_TAIL] + b"}"
    try:
        doc = json.loads(body)
    except ValueError:
        raise Malformed("not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("seq"), int):
        raise Malformed("no seq")
    if record_hash(body) != h:
        raise Malformed("its hash does not match its bytes")
    if json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode() != body:
        raise Malformed("not in canonical form")
    return doc, h


def seal_message(covers: int, head: str, when: str) -> bytes:
    """What a seal record signs: the seq and hash of the record it covers, and its time."""
    return SEAL_PREFIX + struct.pack(">Q", covers) + bytes.fromhex(head) + when.encode()


def terms_aad(tenant: str, seq: int) -> bytes:
    return TERMS_AAD + tenant.encode() + b"\0" + struct.pack(">Q", seq)


def principal_name(principal) -> str:
    """A Principal as the trail names it ("user:alice", "token:t1", "local:uid=0"), or a string as is."""
    if isinstance(principal, str):
        return principal
    return f"{principal.kind}:{principal.name}"


# --- reading a directory (no lock needed for writing; shared lock taken) -----------

def segments(directory: Path) -> list[tuple[int, Path]]:
    """(first seq, path) of every segment, in order."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        m = SEGMENT.match(n)
        if m:
            out.append((int(m.group(1)), Path(directory) / n))
    return sorted(out)


def segment_name(first_seq: int) -> str:
    return f"audit-{first_seq:012d}.log"


@dataclass
class Line:
    segment: Path
    offset: int
    raw: bytes               # without the line end
    complete: bool           # False: the file ends inside this line (torn)


def lines(path: Path, start: int = 0) -> Iterator[Line]:
    with open(path, "rb") as f:
        f.seek(start)
        offset = start
        for raw in f:
            complete = raw.endswith(b"\n")
            yield Line(path, offset, raw[:-1] if complete else raw, complete)
            offset += len(raw)


@contextlib.contextmanager
def _shared(directory: Path):
    """A shared flock on the log's lock file while reading: no half-written
    batch of a writer is seen as a torn tail."""
    try:
        fd = os.open(Path(directory) / LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def read_head(directory: Path) -> dict | None:
    """The head file ({"seal_seq", "seal_hash", "covers", "time"}); None if
    there is none; Malformed if it is not one."""
    try:
        raw = (Path(directory) / HEAD).read_bytes()
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(raw)
        if not (isinstance(doc, dict) and isinstance(doc.get("seal_seq"), int)
                and isinstance(doc.get("seal_hash"), str)):
            raise ValueError
    except ValueError:
        raise Malformed("the head file is not a head") from None
    return doc


@dataclass(frozen=True)
class Filter:
    """What a reader narrows the records to (all None: every record of
    the tenant).  `principal`: a login name ("alice": the record's
    principal "user:alice", "token:alice", and alice's failed logins
    "user:alice@<the record's tenant>") or a whole principal as the trail
    names it ("user:alice", "mailtresord"); `actions`, `results`: sets;
    `after` (inclusive) and `before` (exclusive): microseconds since the
    epoch, UTC."""
    principal: str | None = None
    actions: frozenset[str] | None = None
    results: frozenset[str] | None = None
    after: int | None = None
    before: int | None = None

    def matches(self, doc: dict) -> bool:
        if self.actions is not None and doc.get("action") not in self.actions:
            return False
        if self.results is not None and doc.get("result") not in self.results:
            return False
        if self.principal is not None and not principal_matches(self.principal, doc):
            return False
        return True


def principal_matches(wanted: str, doc: dict) -> bool:
    """Whether a record's principal is `wanted` (see Filter).  Pure."""
    got = doc.get("principal")
    if not isinstance(got, str):
        return False
    if ":" in wanted or got == wanted:
        return got == wanted
    _, _, name = got.partition(":")
    return name == wanted or (bool(doc.get("tenant")) and name == f"{wanted}@{doc['tenant']}")


@dataclass
class Page:
    """One page of read(): the records, the cursor to pass as `since`
    next (the last seq looked at), and whether there may be more after it
    (False: the end of the trail, or of the `before` window, was reached)."""
    records: list[dict]
    next: int
    more: bool


# Records looked at (decoded) by one read at most: a filter that matches
# little makes a page cost a bounded scan, and the cursor goes on from there.
MAX_SCAN = 200_000


def page(directory: Path, keys=None, *, tenant: str | None, since: int = 0, limit: int = 100,
         actions: set[str] | None = None, with_terms: bool = False, filter: Filter | None = None,  # noqa: A002
         max_scan: int = MAX_SCAN) -> Page:
    """Records after seq `since` (at most `limit`), of `tenant` only
    (None: the appliance's own records; ALL: every record), of `actions`
    if given, that `filter` matches.  Filtering happens while scanning;
    at most `max_scan` records after `since` are looked at, so the cursor
    may stop short of the end with fewer than `limit` records (`more`
    says so).  Records are in seq order, and their times never go back
    (the writer sees to it): a record at or after `filter.before` ends the
    scan, and a segment whose successor begins before `filter.after` is
    skipped unread.  Terms are "(encrypted)" unless `with_terms` and the
    tenant's key can be had.  Malformed lines are skipped (verify names
    them)."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
    f = filter or Filter()
    if actions is not None:
        f = Filter(f.principal, frozenset(actions) & f.actions if f.actions is not None else frozenset(actions),
                   f.results, f.after, f.before)
    out: list[dict] = []
    cursor, looked = since, 0
    with _shared(directory):
        segs = segments(directory)
        for i, (first, path) in enumerate(segs):
            if i + 1 < len(segs):
                if segs[i + 1][0] <= since + 1:
                    continue                     # wholly before the cursor
                if f.after is not None and _first_time(segs[i + 1][1]) < f.after:
                    # Every record here is older than the next segment's first.
                    cursor = max(cursor, segs[i + 1][0] - 1)
                    continue
            for ln in lines(path):
                if not ln.complete:
                    break
                try:
                    doc, _ = decode(ln.raw)
                except Malformed:
                    continue
                seq = doc["seq"]
                if seq <= since:
                    continue
                if f.before is not None and _time_of(doc) >= f.before:
                    # Nothing after this record is earlier: the window is
                    # done; the cursor stays before it (so stays done).
                    return Page(out, cursor, False)
                cursor = max(cursor, seq)
                looked += 1
                if doc.get("type") == "event" and (tenant == ALL or doc.get("tenant") == tenant) \
                        and (f.after is None or _time_of(doc) >= f.after) and f.matches(doc):
                    out.append(_public(doc, keys, with_terms))
                    if len(out) >= limit:
                        return Page(out, seq, True)
                if looked >= max_scan:
                    return Page(out, cursor, True)
    return Page(out, cursor, False)


def read(directory: Path, keys=None, *, tenant: str | None, since: int = 0, limit: int = 100,
         actions: set[str] | None = None, with_terms: bool = False,
         filter: Filter | None = None) -> tuple[list[dict], int]:  # noqa: A002
    """page() as (records, cursor): records after seq `since` (at most
    `limit`) of `tenant` (None: the appliance's own; ALL: every record),
    of `actions` if given, matching `filter`; the cursor to pass as
    `since` next time (the last seq looked at)."""
    p = page(directory, keys, tenant=tenant, since=since, limit=limit, actions=actions, with_terms=with_terms,
             filter=filter)
    return p.records, p.next


def _time_of(doc: dict) -> int:
    try:
        return parse_iso(doc.get("time", ""))
    except (TypeError, ValueError):
        return 0


def _first_time(path: Path) -> int:
    """The time of a segment's first record (0 if it has none that reads:
    then nothing is skipped on its account)."""
    for ln in lines(path):
        if not ln.complete:
            return 0
        try:
            return _time_of(decode(ln.raw)[0])
        except Malformed:
            return 0
    return 0


def _public(doc: dict, keys, with_terms: bool) -> dict:
    rec = {k: doc.get(k) for k in ("seq", "time", "principal", "tenant", "action", "object", "result", "client")}
    t = doc.get("terms")
    if t is not None:
        rec["terms"] = _open_terms(t, doc, keys) if with_terms else ENCRYPTED
    if doc.get("detail") is not None:
        rec["detail"] = doc["detail"]
    return rec


def _open_terms(t: dict, doc: dict, keys) -> str:
    if keys is None or not doc.get("tenant"):
        return ENCRYPTED
    try:
        _, key = keys.audit_key(doc["tenant"], int(t["v"]))
        return crypto.open_blob(key, base64.b64decode(t["ct"]), terms_aad(doc["tenant"], doc["seq"])).decode()
    except (KeyMissing, KeyUnavailable):
        return ENCRYPTED
    except (crypto.DecryptionError, KeyError, TypeError, ValueError):
        return "(does not decrypt)"


# --- verification ---------------------------------------------------------------------

@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)     # sound, but worth saying (unsealed tail)
    records: int = 0
    seals: int = 0
    last_seq: int = 0


def verify(directory: Path, keys) -> list[str]:
    """Problems with the trail in `directory`, one line each naming the
    seq and what is wrong; empty if it is sound.  `keys` gives every
    version of the seal key (None: seals are checked against the public
    key they carry only)."""
    return check(directory, keys).problems


def check(directory: Path, keys) -> Report:
    """verify(), with notes (unsealed records at the end) and counts."""
    directory = Path(directory)
    publics = None
    if keys is not None:
        publics = {crypto.ed25519_public(s) for s in keys.seal_seeds()}
    rep = Report()
    p = rep.problems.append
    hashes: dict[int, str] = {}
    seal_hash: dict[int, str] = {}           # seq of a seal record -> its hash
    expect, prev, prev_us = 1, GENESIS, 0
    last_seal = 0
    with _shared(directory):
        segs = segments(directory)
        try:
            head = read_head(directory)
        except Malformed as e:
            p(f"head: {e}")
            head = None
        for i, (first, path) in enumerate(segs):
            seg_first = True
            for ln in lines(path):
                where = f"{path.name} at byte {ln.offset}"
                if not ln.complete:
                    if i + 1 == len(segs):
                        p(f"seq {expect}: truncated record at the end ({len(ln.raw)} bytes without a line end, "
                          f"{where})")
                    else:
                        p(f"seq {expect}: truncated record at the end of segment {path.name}")
                    break
                try:
                    doc, h = decode(ln.raw)
                except Malformed as e:
                    p(f"seq {expect}: record altered or damaged ({e}; {where})")
                    expect += 1
                    prev, seg_first = None, False
                    continue
                seq = doc["seq"]
                if seg_first and seq != first:
                    p(f"seq {seq}: segment {path.name} should begin with seq {first} (renamed or cut)")
                seg_first = False
                if seq > expect:
                    p(f"seq {seq}: records {expect}..{seq - 1} are missing (removed)"
                      if seq > expect + 1 else f"seq {seq}: record {expect} is missing (removed)")
                elif seq < expect:
                    p(f"seq {seq}: comes after seq {expect - 1} (reordered, or appended out of order)")
                if prev is not None and doc.get("prev") != prev:
                    p(f"seq {seq}: does not link to the record before it (removed, inserted or reordered)")
                try:
                    us = parse_iso(doc.get("time", ""))
                except ValueError:
                    p(f"seq {seq}: has no valid time")
                    us = prev_us
                if us < prev_us:
                    p(f"seq {seq}: its time {doc.get('time')} is before the record before it "
                      "(appended out of order)")
                kind = doc.get("type")
                if kind == "seal":
                    _check_seal(doc, hashes, publics, p)
                    seal_hash[seq] = h
                    last_seal = seq
                    rep.seals += 1
                elif kind != "event":
                    p(f"seq {seq}: unknown record type {kind!r}")
                else:
                    rep.records += 1
                hashes[seq] = h
                prev, prev_us = h, max(us, prev_us)
                expect = max(expect, seq + 1)
        end = expect - 1
        rep.last_seq = end
        if head is not None:
            s = head["seal_seq"]
            if s > end:
                p(f"seq {end + 1}: the log ends at seq {end}, but the head file records a seal at seq {s}: "
                  f"records {end + 1}..{s} or more were removed (truncated)")
            elif seal_hash.get(s) != head["seal_hash"]:
                p(f"seq {s}: the head file's seal is not in the log (rewritten or truncated)")
        elif seal_hash:
            p(f"head: the head file is missing, yet the log has {len(seal_hash)} seal(s) (removed?)")
        if end > last_seal:
            n = end - last_seal
            rep.notes.append(f"{n} unsealed record{'s' if n != 1 else ''} at the end (seq {last_seal + 1}..{end}): "
                             "sealed at the next seal")
    return rep


def _check_seal(doc: dict, hashes: dict[int, str], publics, p) -> None:
    seq = doc["seq"]
    try:
        covers, head_hash = int(doc["covers"]), str(doc["head"])
        public, sig = base64.b64decode(doc["public"]), base64.b64decode(doc["signature"])
    except (KeyError, TypeError, ValueError):
        p(f"seq {seq}: seal record is malformed")
        return
    if hashes.get(covers) != head_hash:
        p(f"seq {seq}: seal covers seq {covers}, whose hash is not the one it signed (records changed)")
    if publics is not None and not any(hmac.compare_digest(public, k) for k in publics):
        p(f"seq {seq}: seal was made with another key than the appliance's seal key")
    try:
        crypto.ed25519_verify(public, sig, seal_message(covers, head_hash, doc.get("time", "")))
    except (crypto.SignatureError, ValueError):
        p(f"seq {seq}: seal signature does not verify")


# --- the writer ------------------------------------------------------------------------

@dataclass
class _Pending:
    fields: dict
    terms: tuple[str, int, bytes, str] | None = None     # tenant, key version, key, plaintext
    seq: int = 0
    done: bool = False
    error: BaseException | None = None

    def doc(self, seq: int, prev: str, when: str) -> dict:
        d = {"v": FORMAT, "type": "event", "seq": seq, "prev": prev, "time": when, **self.fields}
        if self.terms is not None:
            tenant, version, key, text = self.terms
            d["terms"] = {"v": version, "ct": base64.b64encode(
                crypto.seal_blob(key, text.encode(), terms_aad(tenant, seq))).decode()}
        return d


class AuditLog:
    """The appliance's audit trail, for writing (and reading).

    append() returns once the record is on disk (fsynced); threads that
    append at once share one fsync (group commit), and other processes
    (the CLI) append under the same flock.  Opening checks the tail: a
    record torn by a crash is cut off (its bytes kept in torn-SEQ.bin) and
    the cut is itself recorded as an anomaly."""

    def __init__(self, directory: Path, keys, *, seal_every: int = 1000, segment_bytes: int = SEGMENT_BYTES,
                 clock=time.time, name: str = "mailtresord"):
        if seal_every < 1:
            raise ValueError("seal_every must be at least 1")
        self.directory = Path(directory)
        self.keys = keys
        self.seal_every = seal_every
        self.segment_bytes = segment_bytes
        self.clock = clock
        self.name = name                 # the principal of the trail's own records (cuts)
        private_dir(self.directory)
        self._lock_fd = os.open(self.directory / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        own_like_directory(self._lock_fd, self.directory)
        self._mu = threading.Lock()      # the queue
        self._io = threading.Lock()      # one writer in this process
        self._queue: list[_Pending] = []
        self._local = threading.local()
        self._fd: int | None = None
        self._seg: Path | None = None
        self._size = 0                   # of the open segment, as this process last wrote or read it
        self._seq, self._hash, self._us, self._last_seal, self._last_type = 0, GENESIS, 0, 0, ""
        self.seal_problem = ""
        self.closed = False
        with self._io, self._exclusive():
            cut = self._sync()
            if cut is not None:
                self._write_locked([cut])

    # --- public ---

    def append(self, *, principal, tenant: str | None, action: str, object: str | None, result: str,
               client: str, terms: str | None = None, detail: dict | None = None) -> int:
        """Write one record; its seq once it is on disk.  Raises ValueError
        for a bad field, AuditError if the disk will not take it, and the
        key errors if terms are given and the tenant's key cannot be had
        (terms are never written in clear)."""
        if self.closed:
            raise AuditError("the audit log is closed")
        if not _ACTION.match(action or ""):
            raise ValueError(f"bad audit action {action!r}")
        if result not in RESULTS:
            raise ValueError(f"bad audit result {result!r} (one of {', '.join(RESULTS)})")
        if tenant is not None and (not isinstance(tenant, str) or not tenant or tenant == ALL):
            raise ValueError(f"bad tenant {tenant!r}")
        fields = {"principal": principal_name(principal), "tenant": tenant, "action": action,
                  "object": object, "result": result, "client": client}
        if detail is not None:
            fields["detail"] = detail
        pending = _Pending(fields)
        if terms is not None:
            if tenant is None:
                raise ValueError("terms need a tenant (they are kept under its key)")
            version, key = self.keys.audit_key(tenant)
            pending.terms = (tenant, version, key, terms)
        try:
            size = len(encode(pending.doc(1, GENESIS, iso(0)))[0])
        except (TypeError, ValueError):
            raise ValueError("audit detail must be JSON (strings, numbers, lists, tables)") from None
        if size > MAX_RECORD - 64:
            raise ValueError(f"audit record too large ({size} bytes; at most {MAX_RECORD - 64})")
        with self._mu:
            self._queue.append(pending)
        with self._io:
            if not pending.done:
                with self._mu:
                    batch, self._queue = self._queue, []
                try:
                    if self.closed:
                        raise AuditError("the audit log is closed")
                    with self._exclusive():
                        cut = self._sync()
                        self._write_locked(([cut] if cut else []) + batch)
                except BaseException as e:
                    for q in batch:
                        q.error, q.done = e, True
        if pending.error is not None:
            raise pending.error
        self._seal_if_due()
        return pending.seq

    def seal(self) -> int | None:
        """Seal now if any record is unsealed; the seal record's seq, or
        None (nothing to seal, or the seal key cannot be had: logged)."""
        return self._seal_if_due(force=True)

    def read(self, *, tenant: str | None, since: int = 0, limit: int = 100, actions: set[str] | None = None,
             with_terms: bool = False, filter: Filter | None = None) -> tuple[list[dict], int]:  # noqa: A002
        """See the module's read()."""
        return read(self.directory, self.keys, tenant=tenant, since=since, limit=limit, actions=actions,
                    with_terms=with_terms, filter=filter)

    def page(self, *, tenant: str | None, since: int = 0, limit: int = 100, actions: set[str] | None = None,
             with_terms: bool = False, filter: Filter | None = None, max_scan: int = MAX_SCAN) -> Page:  # noqa: A002
        """See the module's page()."""
        return page(self.directory, self.keys, tenant=tenant, since=since, limit=limit, actions=actions,
                    with_terms=with_terms, filter=filter, max_scan=max_scan)

    def status(self) -> dict:
        with self._mu:
            return {"directory": str(self.directory), "seq": self._seq, "sealed": self._last_seal,
                    "unsealed": self._seq - self._last_seal, "seal_problem": self.seal_problem}

    def close(self, *, seal: bool = True) -> None:
        if self.closed:
            return
        if seal:
            self.seal()
        self.closed = True
        with self._io:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            os.close(self._lock_fd)

    # --- inside ---

    @contextlib.contextmanager
    def _exclusive(self):
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        except OSError as e:
            raise AuditError(f"cannot lock the audit log {self.directory}: {e.strerror}") from None
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _sync(self) -> _Pending | None:
        """Under the flock: catch up with what other processes wrote (the
        last segment, its last record); cut a torn tail.  Returns the
        anomaly record of a cut, to be written first."""
        segs = segments(self.directory)
        if not segs:
            # A new trail -- unless there was one: never begin again at seq 1
            # over a trail whose files were removed.
            head = None
            with contextlib.suppress(Malformed):
                head = read_head(self.directory)
            if self._seq or head is not None:
                raise AuditError(f"the audit trail's files in {self.directory} are gone (it had records up to "
                                 f"seq {max(self._seq, head['seal_seq'] if head else 0)}); "
                                 "run `mailtresor audit verify`")
            self._open_segment(1, create=True)
            self._seq, self._hash, self._us, self._last_seal, self._last_type = 0, GENESIS, 0, 0, ""
            return None
        first, path = segs[-1]
        if path != self._seg:
            self._open_segment(first, create=False)
            self._size = -1
        size = os.fstat(self._fd).st_size
        if size == self._size:
            return None
        cut = self._load_tail(segs)
        # Where the last seal is, for "every seal_every records": the last
        # record, else the head file (which may lag a seal by a crash: then
        # the next seal comes a little early), else what this process knew.
        if self._last_type == "seal":
            self._last_seal = self._seq
        else:
            head = None
            with contextlib.suppress(Malformed):
                head = read_head(self.directory)
            known = head["seal_seq"] if head is not None and head["seal_seq"] <= self._seq else 0
            self._last_seal = max(known, self._last_seal if self._last_seal <= self._seq else 0)
        return cut

    def _open_segment(self, first: int, *, create: bool) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        path = self.directory / segment_name(first)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        try:
            self._fd = os.open(path, flags, 0o600)
        except OSError as e:
            raise AuditError(f"cannot open {path}: {e.strerror}") from None
        if create:
            own_like_directory(self._fd, self.directory)
            fsync_dir(self.directory)
        self._seg, self._size = path, os.fstat(self._fd).st_size

    def _load_tail(self, segs) -> _Pending | None:
        """Read the last record of the log (the open segment, or the one
        before if it is empty); cut a torn last line."""
        cut = None
        size = os.fstat(self._fd).st_size
        with open(self._seg, "rb") as f:
            f.seek(max(0, size - MAX_RECORD))
            tail = f.read()
        if tail and not tail.endswith(b"\n"):
            keep = tail.rfind(b"\n") + 1            # 0: the whole read part is torn
            torn = tail[keep:]
            new_size = size - len(torn)
            cut = self._cut(torn, new_size)
            tail, size = tail[:keep], new_size
        self._size = size
        last = tail[:-1].rsplit(b"\n", 1)[-1] if tail else b""
        if not last:
            # An empty segment (made just before a crash): the record before is in the one before.
            older = [p for _, p in segs if p != self._seg]
            if older:
                with open(older[-1], "rb") as f:
                    f.seek(0, os.SEEK_END)
                    f.seek(max(0, f.tell() - MAX_RECORD))
                    tail = f.read()
                last = tail[:-1].rsplit(b"\n", 1)[-1] if tail.endswith(b"\n") else b""
        if not last:
            self._seq, self._hash, self._us, self._last_type = 0, GENESIS, 0, ""
        else:
            try:
                doc, h = decode(last)
            except Malformed as e:
                # Not ours to mend: verify says so; the chain goes on from the
                # seq it claims so that nothing later hides the damage.
                raise AuditError(f"{self._seg}: the last record is damaged ({e}); "
                                 "run `mailtresor audit verify`") from None
            self._seq, self._hash, self._last_type = doc["seq"], h, doc.get("type", "")
            try:
                self._us = parse_iso(doc.get("time", ""))
            except ValueError:
                self._us = 0
        if cut is not None:
            cut.fields["detail"]["after_seq"] = self._seq
        return cut

    def _cut(self, torn: bytes, new_size: int) -> _Pending:
        """Move a torn tail out of the log into torn-SEQ.bin (kept for
        whoever looks into it) and say so in an anomaly record."""
        keep = self.directory / f"torn-{int(self.clock() * 1e6)}.bin"
        fd = os.open(keep, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, torn)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(self.directory)
        os.truncate(self._seg, new_size)
        os.fsync(self._fd)
        log.warning("audit log %s: cut a torn last record (%d bytes, kept in %s)", self._seg, len(torn), keep.name)
        return _Pending({"principal": self.name, "tenant": None, "action": "anomaly", "object": self._seg.name,
                         "result": "failed", "client": "",
                         "detail": {"kind": "audit-tail-cut", "offset": new_size, "bytes": len(torn),
                                    "sha256": hashlib.sha256(torn).hexdigest(), "kept_in": keep.name}})

    def _write_locked(self, batch: list[_Pending], seal: dict | None = None) -> None:
        """Under _io and the flock: give the batch its seqs and chain,
        write it at once, fsync once."""
        if (self._size >= self.segment_bytes and self._last_type == "seal" and self._size > 0):
            self._open_segment(self._seq + 1, create=True)
        seq, prev, us = self._seq, self._hash, self._us
        now = max(int(self.clock() * 1e6), us)
        out, last_type = [], self._last_type
        for q in batch:
            seq += 1
            line, prev = encode(q.doc(seq, prev, iso(now)))
            out.append(line)
            q.seq, last_type = seq, "event"
        if seal is not None:
            seq += 1
            line, prev = encode(_seal_doc(seal["seed"], seq, prev, iso(now)))
            out.append(line)
            last_type = "seal"
        data = b"".join(out)
        try:
            write_all(self._fd, data)
            os.fsync(self._fd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)       # no half batch stays behind
            raise AuditError(f"cannot write the audit log {self._seg}: {e.strerror}") from None
        with self._mu:
            self._seq, self._hash, self._us, self._last_type = seq, prev, now, last_type
            self._size += len(data)
            if seal is not None:
                self._last_seal = seq
        for q in batch:
            q.done = True
        if seal is not None:
            _write_head(self.directory, {"v": FORMAT, "seal_seq": seq, "seal_hash": prev, "covers": seq - 1,
                                         "time": iso(now)})

    def _due(self) -> bool:
        with self._mu:
            unsealed = self._seq - self._last_seal
            return unsealed >= self.seal_every or (unsealed > 0 and self._size >= self.segment_bytes)

    def _seal_if_due(self, force: bool = False) -> int | None:
        if getattr(self._local, "sealing", False):
            return None                     # fetching the seal key appended a record: no seal inside a seal
        if not (force or self._due()):       # force: whether anything is unsealed is seen under the lock
            return None
        self._local.sealing = True
        try:
            seed = self.keys.seal_seed()
        except (KeyMissing, KeyUnavailable) as e:
            # The records are on disk (nothing in them is secret: terms are
            # encrypted); the next seal covers them.
            if str(e) != self.seal_problem:
                log.warning("audit log: cannot seal (%s); records stay unsealed until the seal key is back", e)
            self.seal_problem = str(e)
            return None
        finally:
            self._local.sealing = False
        self.seal_problem = ""
        try:
            with self._io:
                if self.closed:
                    return None
                with self._exclusive():
                    cut = self._sync()
                    if self._seq == self._last_seal and cut is None:
                        return None
                    self._write_locked([cut] if cut else [], seal={"seed": seed})
                    return self._seq
        except (AuditError, OSError) as e:
            # The records it was to cover are on disk already; the next seal covers them.
            self.seal_problem = str(e)
            log.error("audit log: cannot seal: %s", e)
            return None


def _seal_doc(seed: bytes, seq: int, prev: str, when: str) -> dict:
    return {"v": FORMAT, "type": "seal", "seq": seq, "prev": prev, "time": when, "covers": seq - 1, "head": prev,
            "public": base64.b64encode(crypto.ed25519_public(seed)).decode(),
            "signature": base64.b64encode(crypto.ed25519_sign(seed, seal_message(seq - 1, prev, when))).decode()}


def _write_head(directory: Path, doc: dict) -> None:
    """The head file, replaced atomically and durably: a later removal of
    the log's tail (its last seal with it) shows against it."""
    tmp = directory / (HEAD + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, json.dumps(doc, sort_keys=True).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, directory / HEAD)
    fsync_dir(directory)


# --- the daemon's own records: key fetches and archive anomalies ----------------------

class DaemonTrail:
    """What the daemon itself records: every key it fetches from the
    control endpoint (and a failure when the reason changes), and the
    archive's anomalies (set-aside mail, untrusted journal reports,
    truncated extraction).  Blocking (call it from a thread); a record that
    cannot be written is logged, never a reason to stop archiving."""

    PRINCIPAL = "mailtresord"
    CLIENT = "daemon"

    def __init__(self, log_: AuditLog):
        self.log = log_
        self._failing: dict[str, str] = {}      # key name -> the failure last recorded

    def _append(self, **kw) -> None:
        try:
            self.log.append(principal=self.PRINCIPAL, client=self.CLIENT, **kw)
        except (AuditError, ValueError, KeyMissing, KeyUnavailable) as e:
            log.error("audit trail: cannot record %s %s: %s", kw.get("action"), kw.get("object"), e)

    def key_fetch(self, name: str, version: int | None, error: str | None = None) -> None:
        """A fetch of key `name` (a version, or None: the current one) and how it went."""
        tenant = name[len("tenant."):] if name.startswith("tenant.") else None
        if error is None:
            self._failing.pop(name, None)
            self._append(tenant=tenant, action="key-fetch", object=name, result="ok",
                         detail={"version": version})
        elif self._failing.get(name) != error:     # an outage retried every minute is one record
            self._failing[name] = error
            self._append(tenant=tenant, action="key-fetch", object=name, result="failed",
                         detail={"version": version, "error": error[:300]})

    def audited_fetch(self, fetch):
        """A blocking `fetch(name, version) -> KeyMaterial` that records each fetch."""
        def audited(name: str, version: int | None = None):
            try:
                material = fetch(name, version)
            except KeyUnavailable as e:
                self.key_fetch(name, version, str(e))
                raise
            self.key_fetch(name, material.version)
            return material
        return audited

    def anomaly(self, kind: str, tenant: str | None, obj: str, detail: dict | None = None) -> None:
        self._append(tenant=tenant, action="anomaly", object=obj, result="failed" if kind == "set-aside" else "ok",
                     detail={"kind": kind, **(detail or {})})
