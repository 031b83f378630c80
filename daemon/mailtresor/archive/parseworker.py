"""Parsing in helper processes.

Parsing is the largest part of the archiver's work (the email package is
pure Python), and it needs neither keys nor the store: its input is a
message's bytes, its output plain data.  So the archiver hands it to
`parse_processes` child processes (`python3 -m mailtresor.archive.parseworker`) and
meanwhile commits and indexes the previous batch on its own thread: the
work of a batch is spread over two cores instead of one.

It also keeps the parsing of hostile input out of the process that holds the
keys: a child gets message bytes on stdin and answers with JSON on stdout
(never pickle, so a child that went wrong cannot make the daemon run code).
A child never sees a key, has no store or spool open, and is killed by the
kernel when the daemon dies (PR_SET_PDEATHSIG).  It starts with a minimal
environment, in a process group of its own, without core files, and
confines itself before it reads the first message (mailtresor/confine.py:
Landlock and seccomp; it cannot open the keys, the spool or the store,
open a socket, or signal the daemon).  Each message is parsed within the
extraction budget of [archive] (parse.Limits), handed over at start.

Wire format: frames of a 4-byte big-endian length, then the payload.
Request: two frames, the options as JSON (`{"journaling": ...}`, the spool
envelope's trust in journal reports, see `digest()`), then the raw message.
Answer: one frame, JSON of `digest()`'s result.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import queue
import resource
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path

from mailtresor.archive import confine, journal, parse

log = logging.getLogger("mailtresor.archive.parseworker")

_LEN = struct.Struct(">I")
# Seconds a message may take in a parser process (pdftotext has its own,
# shorter limit); a child that takes longer is killed, and the message is
# tried again alone, then set aside like any other that cannot be prepared.
PARSE_TIMEOUT = 300.0
# Seconds to parse in process after a child could not be started.
SPAWN_RETRY = 30.0
# RLIMIT_AS of a parser process: the extraction budget keeps a hostile
# message far below it; it stops what the budget cannot foresee.
CHILD_MAX_MEMORY = 2 * 1024 * 1024 * 1024


class ParserDied(Exception):
    """The child process exited before it answered (a crash, OOM kill...)."""


# --------------------------------------------------------------- the work

def digest(raw: bytes, journaling: dict | None = None) -> dict:
    """Unwrap a journal report and parse: everything `archiver.prepare`
    needs from the bytes.  Pure; never raises on bad input.

    `journaling` is the spool envelope's `journaling` (set by the relay only
    for a journaling connector).  Without it nothing is unwrapped: a message
    that carries a journal-report header is parsed as it is (every part
    searchable) and `journal_untrusted` says why; so it is too when the
    report's `X-MS-Exchange-CrossTenant-Id` is not the connector's tenant id."""
    out: dict = {"original": None, "journal": None, "journal_error": None, "journal_untrusted": None}
    if journal.is_journal_report(raw):
        why = journal.untrusted_reason(raw, journaling)
        if why is not None:
            out["journal_untrusted"] = why
        else:
            try:
                rep = journal.unwrap(raw)
            except journal.JournalError as e:
                out["journal_error"] = str(e)
            else:
                out["original"] = rep.original
                out["journal"] = {"sender": rep.sender, "message_id": rep.message_id,
                                  "recipients": [r.__dict__ for r in rep.recipients],
                                  "extra": rep.extra, "report_size": len(raw)}
                raw = rep.original
    out["parsed"] = parse.parse_message(raw)
    return out


def request(raw: bytes, journaling: dict | None = None) -> list[bytes]:
    """One request as the child reads it (the module docstring), in pieces
    to write one after the other (the message is not copied)."""
    opts = json.dumps({"journaling": journaling}).encode("utf-8")
    return [_LEN.pack(len(opts)) + opts, _LEN.pack(len(raw)), raw]


def answer(opts: bytes, raw: bytes) -> bytes:
    """The child's answer to one request: its options frame and message."""
    o = json.loads(opts) if opts else {}
    j = o.get("journaling") if isinstance(o, dict) else None
    return _to_wire(digest(raw, journaling=j if isinstance(j, dict) else None))


def _to_wire(d: dict) -> bytes:
    p = d["parsed"]
    doc = dict(d, parsed=dict(p.__dict__, attachments=[a.__dict__ for a in p.attachments]))
    if d["original"] is not None:
        doc["original"] = base64.b64encode(d["original"]).decode("ascii")
    return json.dumps(doc).encode("utf-8")


def _from_wire(data: bytes) -> dict:
    doc = json.loads(data)
    p = doc["parsed"]
    p["attachments"] = [parse.Attachment(**a) for a in p["attachments"]]
    doc["parsed"] = parse.Parsed(**p)
    if doc["original"] is not None:
        doc["original"] = base64.b64decode(doc["original"])
    return doc


# --------------------------------------------------------------- the child

def _die_with_parent() -> None:
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)            # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the EOF on stdin still ends us
        pass


def _read_exactly(f, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = f.read(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


# Imported before the child confines itself: they are all readable after
# it too (read_paths()), but a warm start costs nothing later.
_WARM = ("email.feedparser", "email.headerregistry", "email._header_value_parser", "email.header",
         "email._parseaddr", "html.parser", "selectors", "zipfile", "zlib", "encodings.idna",
         "encodings.cp1252", "encodings.latin_1", "encodings.utf_16", "encodings.iso8859_15",
         "encodings.ascii")


def setup(argv: list[str]) -> parse.Limits:
    """Everything a parser child does before it reads a message: die with
    the daemon, no core files, a memory limit, the budget from `argv`
    (``--limits JSON``), then confine itself for good.  Tests run attacks
    after exactly this."""
    _die_with_parent()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        resource.setrlimit(resource.RLIMIT_AS, (CHILD_MAX_MEMORY, CHILD_MAX_MEMORY))
    except (ValueError, OSError):   # a lower hard limit already: keep it
        pass
    limits = parse.Limits()
    if "--limits" in argv:
        limits = parse.Limits(**json.loads(argv[argv.index("--limits") + 1]))
    parse.configure(limits)
    import importlib
    for name in _WARM:
        importlib.import_module(name)
    missing = confine.confine()
    if missing:
        print(f"mailtresor parser {os.getpid()}: running without {'; '.join(missing)}",
              file=sys.stderr, flush=True)
    return limits


def main(argv: list[str] | None = None) -> int:
    if os.getppid() == 1:                        # the parent is gone already
        return 1
    setup(sys.argv[1:] if argv is None else argv)
    if os.getppid() == 1:                        # the parent died before prctl
        return 1
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the daemon decides when we stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr                      # nothing else may write to the answer pipe
    while True:
        frames = []
        for _ in range(2):                       # options, message
            head = _read_exactly(inp, _LEN.size)
            frame = _read_exactly(inp, _LEN.unpack(head)[0]) if head is not None else None
            if frame is None:
                return 0
            frames.append(frame)
        data = answer(*frames)
        out.write(_LEN.pack(len(data)) + data)
        out.flush()


# --------------------------------------------------------------- the parent

COMMAND = [sys.executable, "-m", "mailtresor.archive.parseworker"]
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
_reported = False


def spawn_args() -> dict:
    """How a parser child is started (Popen keyword arguments but the
    command): its whole environment, its working directory, its own
    process group.  Tests start their attackers the same way."""
    return dict(env=confine.child_env(_PACKAGE_ROOT), cwd=_PACKAGE_ROOT, process_group=0,
                close_fds=True)


def command(limits: parse.Limits | None = None) -> list[str]:
    """The child's command line, with the extraction budget."""
    limits = limits or parse.LIMITS
    return COMMAND + ["--limits", json.dumps(dataclasses.asdict(limits))]


def _report_confinement() -> None:
    """Say once, loudly, when parser processes cannot be fully confined here."""
    global _reported
    if _reported:
        return
    _reported = True
    missing = confine.probe()
    if missing:
        log.error("parser processes run WITHOUT %s: a bug in a parser or in pdftotext could "
                  "reach what the daemon's user can (see docs/SECURITY.md, issue 12)", "; ".join(missing))


class _Child:
    """One child process.  A writer thread feeds it requests and a reader
    thread collects its answers, which come back in request order: so
    `submit()` never waits for the child (a batch is handed over at once and
    parsed while the archiver stores the previous one), and neither side
    can block the other on a full pipe."""

    def __init__(self, number: int, limits: parse.Limits | None = None):
        _report_confinement()
        self.proc = subprocess.Popen(command(limits), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     **spawn_args())
        self.pending: deque[Future] = deque()
        self.lock = threading.Lock()
        self.dead = False
        self.requests: queue.SimpleQueue[list[bytes] | None] = queue.SimpleQueue()
        self.reader = threading.Thread(target=self._read, name=f"parser-{number}-reader", daemon=True)
        self.writer = threading.Thread(target=self._write, name=f"parser-{number}-writer", daemon=True)
        self.reader.start()
        self.writer.start()

    def submit(self, raw: bytes, journaling: dict | None = None) -> Future:
        fut: Future = Future()
        fut.child = self
        with self.lock:
            if self.dead:
                fut.set_exception(ParserDied("parser process is gone"))
                return fut
            self.pending.append(fut)
        self.requests.put(request(raw, journaling))
        return fut

    def _write(self) -> None:
        f = self.proc.stdin
        try:
            while True:
                req = self.requests.get()
                if req is None:
                    break
                for piece in req:
                    f.write(piece)
                f.flush()
        except (OSError, ValueError):
            self._fail_all()
        finally:
            try:
                f.close()
            except OSError:
                pass

    def _read(self) -> None:
        f = self.proc.stdout
        while True:
            head = _read_exactly(f, _LEN.size)
            data = _read_exactly(f, _LEN.unpack(head)[0]) if head is not None else None
            if data is None:
                break
            with self.lock:
                fut = self.pending.popleft() if self.pending else None
            if fut is None:              # an answer nobody asked for: the child is not sane
                break
            try:
                result = _from_wire(data)
            except Exception as e:  # noqa: BLE001 - a malformed answer fails that message only
                fut.set_exception(ParserDied(f"malformed answer from the parser: {type(e).__name__}"))
            else:
                fut.set_result(result)
        self._fail_all()

    def _fail_all(self) -> None:
        with self.lock:
            self.dead = True
            pending, self.pending = list(self.pending), deque()
        for fut in pending:
            if not fut.done():
                fut.set_exception(ParserDied(f"parser process {self.proc.pid} exited"))
        try:
            self.proc.kill()
        except OSError:
            pass

    def kill(self) -> None:
        """Kill the process; its reader fails what it still had."""
        try:
            self.proc.kill()
        except OSError:
            pass

    def close(self) -> None:
        self.requests.put(None)              # the writer closes stdin: the child ends
        self.writer.join(timeout=5)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(timeout=5)
        self.writer.join(timeout=5)


def wait(fut: Future, timeout: float):
    """The future's result; a parser that takes longer than `timeout` is
    killed, and its unanswered requests (this one too) fail with ParserDied."""
    try:
        return fut.result(timeout=timeout)
    except TimeoutError:
        child = getattr(fut, "child", None)
        if child is not None:
            child.kill()
        try:
            return fut.result(timeout=10)
        except TimeoutError:
            raise ParserDied("parser process did not answer in time") from None


class ParserPool:
    """`size` child processes, started when first used and again after one
    died; requests are spread over them in turn."""

    def __init__(self, size: int, limits: parse.Limits | None = None):
        if size < 1:
            raise ValueError("a parser pool needs at least one process")
        self.size = size
        self.limits = limits
        self._children: list[_Child | None] = [None] * size
        self._next = 0
        self.restarts = 0
        self.in_process = 0          # messages parsed here because no child could be started
        self._spawn_after = 0.0

    def submit(self, raw: bytes, journaling: dict | None = None) -> Future:
        """The digest of `raw` (see `digest()`), as a future."""
        i = self._next
        self._next = (i + 1) % self.size
        child = self._children[i]
        if child is None or child.dead:
            if child is not None:
                self.restarts += 1
                log.warning("parser process %d exited; starting another", child.proc.pid)
                child.close()
                self._children[i] = None
            if time.monotonic() < self._spawn_after:
                return self._here(raw, journaling)
            try:
                child = self._children[i] = _Child(i, self.limits)
            except OSError as e:
                # fork/exec failed (out of memory, process or file limits):
                # parse in this process, as parse_processes = 0 does, rather
                # than stop archiving; try a child again after a while.
                self._spawn_after = time.monotonic() + SPAWN_RETRY
                log.error("cannot start a parser process (%s); parsing in the archiver itself "
                          "for the next %d s", e.strerror or e, SPAWN_RETRY)
                return self._here(raw, journaling)
        return child.submit(raw, journaling)

    def _here(self, raw: bytes, journaling: dict | None = None) -> Future:
        self.in_process += 1
        fut: Future = Future()
        try:
            fut.set_result(_from_wire(_to_wire(digest(raw, journaling))))     # the same types as a child's answer
        except Exception as e:  # noqa: BLE001 - stands for this message, like a child's error answer
            fut.set_exception(e)
        return fut

    def pids(self) -> list[int]:
        return [c.proc.pid for c in self._children if c is not None and not c.dead]

    def close(self) -> None:
        for i, c in enumerate(self._children):
            if c is not None:
                c.close()
                self._children[i] = None


if __name__ == "__main__":
    sys.exit(main())
