"""The audit trail (mailtresor.access.audit): append, read, encrypted
terms, tamper detection, torn tails, concurrency, and the CLI.

Every tamper test edits a real log on disk the way an intruder with the
disk would, and each names the defence it relies on: without it, the
edited log would verify as sound."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mailtresor.access import audit
from mailtresor.access.audit import AuditLog
from mailtresor.keys.ring import KeyMaterial, KeyRing
from mailtresor.archive.store import Keys
from tests.conftest import REPO
from tests.harness.stack import Stack


def ring(seal_versions: int = 1) -> KeyRing:
    r = KeyRing()
    for v in range(1, seal_versions + 1):
        r.put(KeyMaterial("seal", v, os.urandom(32)), current=True)
    for t in ("acme", "globex"):
        r.put(KeyMaterial(f"tenant.{t}", 1, os.urandom(32)), current=True)
    return r


@pytest.fixture
def keys():
    return Keys(ring())


def add(log: AuditLog, n: int = 1, *, tenant="acme", action="search", terms=None, principal="user:alice"):
    return [log.append(principal=principal, tenant=tenant, action=action, object=f"obj{i}", result="ok",
                       client="192.0.2.1", terms=terms) for i in range(n)]


def segment(d: Path) -> Path:
    (first, path), = audit.segments(d)
    return path


def log_lines(d: Path) -> list[bytes]:
    return segment(d).read_bytes().splitlines(keepends=True)


def write_lines(d: Path, lines: list[bytes]) -> None:
    segment(d).write_bytes(b"".join(lines))


def sealed_log(d: Path, keys, n: int = 10, seal_every: int = 4) -> None:
    log = AuditLog(d, keys, seal_every=seal_every)
    add(log, n, terms="merger")
    log.close()


# --- append and read ---------------------------------------------------------------

def test_append_read_round_trip(tmp_path, keys):
    log = AuditLog(tmp_path, keys)
    s1 = log.append(principal="user:alice", tenant="acme", action="login", object=None, result="ok",
                    client="192.0.2.1")
    s2 = log.append(principal="token:t1", tenant="acme", action="read", object="a" * 40, result="denied",
                    client="192.0.2.2", detail={"why": "scope"})
    s3 = log.append(principal="mailtresord", tenant=None, action="key-fetch", object="seal", result="ok",
                    client="daemon")
    assert (s1, s2, s3) == (1, 2, 3)
    recs, nxt = log.read(tenant="acme")
    assert [r["seq"] for r in recs] == [1, 2] and nxt == 3
    r = recs[1]
    assert r == {"seq": 2, "time": r["time"], "principal": "token:t1", "tenant": "acme", "action": "read",
                 "object": "a" * 40, "result": "denied", "client": "192.0.2.2", "detail": {"why": "scope"}}
    assert audit.parse_iso(r["time"]) >= audit.parse_iso(recs[0]["time"])
    # Paging by cursor, and the action filter.
    page, nxt = log.read(tenant="acme", limit=1)
    assert [x["seq"] for x in page] == [1] and nxt == 1
    page, nxt = log.read(tenant="acme", since=nxt, limit=1)
    assert [x["seq"] for x in page] == [2]
    assert [x["seq"] for x in log.read(tenant="acme", actions={"login"})[0]] == [1]
    assert log.read(tenant="acme", since=3) == ([], 3)
    log.close()
    assert audit.verify(tmp_path, keys) == []


def test_bad_fields_are_refused(tmp_path, keys):
    log = AuditLog(tmp_path, keys)
    for kw, msg in (({"result": "maybe"}, "bad audit result"), ({"action": "Drop Table"}, "bad audit action"),
                    ({"tenant": "*"}, "bad tenant"), ({"tenant": None, "terms": "x"}, "terms need a tenant"),
                    ({"detail": {"x": object()}}, "must be JSON"),
                    ({"detail": {"x": "y" * 70000}}, "too large")):
        args = dict(principal="p", tenant="acme", action="search", object=None, result="ok", client="c")
        args.update(kw)
        with pytest.raises(ValueError, match=msg):
            log.append(**args)
    assert audit.segments(tmp_path) and log.read(tenant=audit.ALL) == ([], 0)
    log.close()


def test_a_principal_is_named_by_kind_and_name(tmp_path, keys):
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class P:                  # the shape of access.principal.Principal
        kind: str
        name: str

    log = AuditLog(tmp_path, keys)
    log.append(principal=P("local", "uid=0"), tenant="acme", action="read", object="x", result="ok",
               client="unix:uid=0,pid=1")
    assert log.read(tenant="acme")[0][0]["principal"] == "local:uid=0"
    log.close()


def test_terms_are_encrypted_on_disk_and_open_for_the_tenant_only(tmp_path, keys):
    log = AuditLog(tmp_path, keys)
    add(log, 1, terms="subject:secret-merger from:ceo@acme.example")
    add(log, 1, tenant="globex", terms="globex-plans")
    log.close()
    disk = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert b"secret-merger" not in disk and b"ceo@acme" not in disk and b"globex-plans" not in disk
    # Without the key (an operator reading the file, or no --terms): "(encrypted)".
    assert audit.read(tmp_path, None, tenant="acme", with_terms=True)[0][0]["terms"] == "(encrypted)"
    assert audit.read(tmp_path, keys, tenant="acme")[0][0]["terms"] == "(encrypted)"
    assert audit.read(tmp_path, keys, tenant="acme", with_terms=True)[0][0]["terms"] == \
        "subject:secret-merger from:ceo@acme.example"
    # Another key for acme (another appliance, a wrong key): does not decrypt.
    other = Keys(ring())
    assert audit.read(tmp_path, other, tenant="acme", with_terms=True)[0][0]["terms"] == "(does not decrypt)"
    # A key ring without acme's key: still "(encrypted)", no error.
    r = KeyRing()
    r.put(KeyMaterial("seal", 1, os.urandom(32)), current=True)
    assert audit.read(tmp_path, Keys(r), tenant="acme", with_terms=True)[0][0]["terms"] == "(encrypted)"


def test_terms_are_bound_to_their_record(tmp_path, keys):
    """The AAD binds seq and tenant: ciphertext moved into another record
    (to pin a search on someone else) does not open there."""
    log = AuditLog(tmp_path, keys)
    add(log, 2, terms="innocent")
    log.close()
    lines = log_lines(tmp_path)
    docs = [audit.decode(x.rstrip(b"\n"))[0] for x in lines]
    docs[1]["terms"] = dict(docs[0]["terms"])
    forged, _ = audit.encode({k: v for k, v in docs[1].items() if k != "hash"})
    write_lines(tmp_path, [lines[0], forged])
    recs = audit.read(tmp_path, keys, tenant="acme", with_terms=True)[0]
    assert recs[0]["terms"] == "innocent" and recs[1]["terms"] == "(does not decrypt)"


def test_tenants_see_their_own_records_only(tmp_path, keys):
    log = AuditLog(tmp_path, keys)
    add(log, 2, tenant="acme")
    add(log, 3, tenant="globex")
    log.append(principal="mailtresord", tenant=None, action="anomaly", object="x", result="failed", client="")
    assert {r["tenant"] for r in log.read(tenant="acme")[0]} == {"acme"}
    assert len(log.read(tenant="globex")[0]) == 3
    assert [r["action"] for r in log.read(tenant=None)[0]] == ["anomaly"]
    assert len(log.read(tenant=audit.ALL)[0]) == 6
    assert log.read(tenant="initech") == ([], 6)
    log.close()


# --- seals --------------------------------------------------------------------------

def test_seals_every_n_records_and_at_close(tmp_path, keys):
    log = AuditLog(tmp_path, keys, seal_every=3)
    add(log, 7)
    assert log.status()["unsealed"] == 1
    log.close()
    types = [audit.decode(x.rstrip(b"\n"))[0]["type"] for x in log_lines(tmp_path)]
    assert types == ["event"] * 3 + ["seal"] + ["event"] * 3 + ["seal"] + ["event", "seal"]
    head = audit.read_head(tmp_path)
    assert head["seal_seq"] == 10 and head["covers"] == 9
    rep = audit.check(tmp_path, keys)
    assert rep.problems == [] and rep.notes == [] and (rep.records, rep.seals) == (7, 3)


def test_without_the_seal_key_records_are_kept_unsealed_until_it_comes(tmp_path):
    r = ring()
    held = r.current("seal")
    r.drop("seal")
    keys = Keys(r)
    log = AuditLog(tmp_path, keys, seal_every=2)
    add(log, 3)
    assert log.status()["unsealed"] == 3 and "seal" in log.status()["seal_problem"]
    r.put(KeyMaterial("seal", held[0], held[1]), current=True)
    add(log, 1)
    assert log.status()["unsealed"] == 0
    log.close()
    assert audit.verify(tmp_path, keys) == []


def test_seals_verify_across_seal_key_versions(tmp_path):
    r = ring()
    keys = Keys(r)
    log = AuditLog(tmp_path, keys, seal_every=2)
    add(log, 2)
    r.put(KeyMaterial("seal", 2, os.urandom(32)), current=True)      # rotated
    add(log, 2)
    log.close()
    pubs = {audit.decode(x.rstrip(b"\n"))[0].get("public") for x in log_lines(tmp_path)} - {None}
    assert len(pubs) == 2
    assert audit.verify(tmp_path, keys) == []
    # Someone else's seal key: the seals verify against their own public key
    # only, which is not the appliance's.
    problems = audit.verify(tmp_path, Keys(ring()))
    assert problems and all("another key than the appliance's seal key" in p for p in problems)


# --- tamper detection ------------------------------------------------------------------

def test_verify_finds_a_flipped_byte(tmp_path, keys):
    """Defence: each record's own hash (and the chain)."""
    sealed_log(tmp_path, keys)
    lines = log_lines(tmp_path)
    lines[5] = lines[5].replace(b'"obj4"', b'"obj9"')
    write_lines(tmp_path, lines)
    problems = audit.verify(tmp_path, keys)
    assert problems == ["seq 6: record altered or damaged (its hash does not match its bytes; "
                        f"{segment(tmp_path).name} at byte {sum(map(len, lines[:5]))})"]


def test_verify_finds_a_rehashed_edit(tmp_path, keys):
    """Defence: the chain and the seal.  An intruder who recomputes the
    edited record's hash breaks the next record's link."""
    sealed_log(tmp_path, keys)
    lines = log_lines(tmp_path)
    doc = audit.decode(lines[1].rstrip(b"\n"))[0]
    doc["result"] = "denied"
    lines[1], _ = audit.encode({k: v for k, v in doc.items() if k != "hash"})
    write_lines(tmp_path, lines)
    assert audit.verify(tmp_path, keys) == [
        "seq 3: does not link to the record before it (removed, inserted or reordered)"]
    # The whole chain re-made from there on: only the seals tell.
    rebuilt, prev = lines[:1], audit.decode(lines[0].rstrip(b"\n"))[1]
    for x in lines[1:]:
        d = {k: v for k, v in audit.decode(x.rstrip(b"\n"))[0].items() if k != "hash"}
        d["prev"] = prev
        line, prev = audit.encode(d)
        rebuilt.append(line)
    write_lines(tmp_path, rebuilt)
    problems = audit.verify(tmp_path, keys)
    assert problems[0] == "seq 5: seal covers seq 4, whose hash is not the one it signed (records changed)"
    assert "seq 13: the head file's seal is not in the log (rewritten or truncated)" in problems


def test_verify_finds_a_removed_record(tmp_path, keys):
    """Defence: consecutive seq and the chain."""
    sealed_log(tmp_path, keys)
    lines = log_lines(tmp_path)
    del lines[2]
    write_lines(tmp_path, lines)
    assert audit.verify(tmp_path, keys) == [
        "seq 4: record 3 is missing (removed)",
        "seq 4: does not link to the record before it (removed, inserted or reordered)"]


def test_verify_finds_two_records_swapped(tmp_path, keys):
    sealed_log(tmp_path, keys)
    lines = log_lines(tmp_path)
    lines[1], lines[2] = lines[2], lines[1]
    write_lines(tmp_path, lines)
    problems = audit.verify(tmp_path, keys)
    assert "seq 3: record 2 is missing (removed)" in problems
    assert "seq 2: comes after seq 3 (reordered, or appended out of order)" in problems


def test_verify_finds_a_record_appended_out_of_order(tmp_path, keys):
    """An old record copied to the end (seq goes back), and a forged record
    at the end with a correct chain but an earlier time (time goes back:
    the writer never lets it, whatever the clock does)."""
    sealed_log(tmp_path, keys)
    lines = log_lines(tmp_path)
    write_lines(tmp_path, lines + [lines[3]])
    problems = audit.verify(tmp_path, keys)
    assert problems[0] == "seq 4: comes after seq 13 (reordered, or appended out of order)"
    last, h = audit.decode(lines[-1].rstrip(b"\n"))
    first = audit.decode(lines[0].rstrip(b"\n"))[0]
    forged, _ = audit.encode({**{k: v for k, v in first.items() if k != "hash"}, "seq": last["seq"] + 1,
                              "prev": h, "time": audit.iso(audit.parse_iso(last["time"]) - 3_600_000_000)})
    write_lines(tmp_path, lines + [forged])
    problems = audit.verify(tmp_path, keys)
    assert len(problems) == 1 and problems[0].startswith("seq 14: its time ") and "out of order" in problems[0]


def test_writer_keeps_time_monotonic_when_the_clock_steps_back(tmp_path, keys):
    now = [1_800_000_000.0]
    log = AuditLog(tmp_path, keys, clock=lambda: now[0])
    add(log, 1)
    now[0] -= 3600
    add(log, 1)
    t = [r["time"] for r in log.read(tenant="acme")[0]]
    assert t[0] == t[1]
    log.close()
    assert audit.verify(tmp_path, keys) == []


def test_verify_finds_a_truncated_tail(tmp_path, keys):
    """A record cut short (a crash, or an edit): named, with its seq."""
    sealed_log(tmp_path, keys)
    data = segment(tmp_path).read_bytes()
    segment(tmp_path).write_bytes(data[:-40])
    problems = audit.verify(tmp_path, keys)
    assert problems[0].startswith("seq 13: truncated record at the end (")
    # The head file names seal 13, which is gone now.
    assert "the head file records a seal at seq 13" in problems[1]


def test_verify_finds_the_tail_removed_with_its_last_seal(tmp_path, keys):
    """Defence: the head file.  Whole records cut at a line end, the last
    seal among them, leave a log that is sound in itself."""
    sealed_log(tmp_path, keys)
    lines = log_lines(tmp_path)
    write_lines(tmp_path, lines[:8])               # seq 1..8: the seal at 5 survives, 10 and 13 are gone
    problems = audit.verify(tmp_path, keys)
    assert problems == ["seq 9: the log ends at seq 8, but the head file records a seal at seq 13: "
                        "records 9..13 or more were removed (truncated)"]
    # Without the head file, the same cut would pass (the limit the head closes).
    (tmp_path / "head").unlink()
    assert audit.verify(tmp_path, keys) == ["head: the head file is missing, yet the log has 1 seal(s) (removed?)"]


def test_unsealed_records_at_the_end_are_a_note_not_a_problem(tmp_path, keys):
    log = AuditLog(tmp_path, keys, seal_every=4)
    add(log, 6)
    rep = audit.check(tmp_path, keys)
    assert rep.problems == [] and rep.notes == ["2 unsealed records at the end (seq 6..7): sealed at the next seal"]
    log.close()


def test_a_resealed_forgery_is_caught_by_the_seal_key(tmp_path, keys):
    """Defence: the seal signature and its key.  An intruder who rewrites
    the log from seq 1 with his own seal key re-makes every hash and seal;
    only the appliance's seal key tells."""
    sealed_log(tmp_path, keys)
    (tmp_path / "head").unlink()
    for p in audit.segments(tmp_path):
        p[1].unlink()
    intruder = Keys(ring())
    sealed_log(tmp_path, intruder)
    problems = audit.verify(tmp_path, keys)
    assert problems and all("another key" in p for p in problems)


def test_rotation_continues_the_chain_and_a_removed_segment_shows(tmp_path, keys):
    log = AuditLog(tmp_path, keys, seal_every=1000, segment_bytes=2000)
    add(log, 30)
    log.close()
    segs = audit.segments(tmp_path)
    assert len(segs) >= 3
    assert audit.verify(tmp_path, keys) == []
    assert len(audit.read(tmp_path, keys, tenant="acme", limit=200)[0]) == 30
    # Cursor paging skips whole segments before it.
    mid = segs[1][0]
    assert audit.read(tmp_path, keys, tenant="acme", since=mid)[0][0]["seq"] == mid + 1
    segs[1][1].unlink()
    problems = audit.verify(tmp_path, keys)
    assert problems[0].startswith(f"seq {segs[2][0]}: records {segs[1][0]}..{segs[2][0] - 1} are missing")
    # The first segment removed: the log must begin at seq 1.
    sealed_dir = tmp_path / "b"
    log = AuditLog(sealed_dir, keys, segment_bytes=2000)
    add(log, 30)
    log.close()
    audit.segments(sealed_dir)[0][1].unlink()
    assert audit.verify(sealed_dir, keys)[0].startswith("seq ")
    assert "are missing (removed)" in audit.verify(sealed_dir, keys)[0]


# --- crash: torn tail ----------------------------------------------------------------

def test_a_torn_tail_is_cut_at_open_and_the_cut_recorded(tmp_path, keys):
    sealed_log(tmp_path, keys, n=3, seal_every=1000)       # 1..3 + seal 4
    path = segment(tmp_path)
    good = path.read_bytes()
    torn = b'{"action":"search","client":"192.0.2.1","obj'
    path.write_bytes(good + torn)
    assert audit.verify(tmp_path, keys)[0].startswith(f"seq 5: truncated record at the end ({len(torn)} bytes")
    log = AuditLog(tmp_path, keys)
    recs = log.read(tenant=None)[0]
    assert len(recs) == 1 and recs[0]["action"] == "anomaly" and recs[0]["seq"] == 5
    d = recs[0]["detail"]
    assert d["kind"] == "audit-tail-cut" and d["bytes"] == len(torn) and d["offset"] == len(good)
    assert (tmp_path / d["kept_in"]).read_bytes() == torn
    assert add(log, 1) == [6]
    log.close()
    assert audit.verify(tmp_path, keys) == []


def test_a_damaged_last_record_is_not_mended_silently(tmp_path, keys):
    sealed_log(tmp_path, keys, n=3)
    lines = log_lines(tmp_path)
    lines[-1] = lines[-1].replace(b'"seal"', b'"seaL"')
    write_lines(tmp_path, lines)
    with pytest.raises(audit.AuditError, match="the last record is damaged"):
        AuditLog(tmp_path, keys)


# --- concurrency ---------------------------------------------------------------------

def test_concurrent_appends_share_one_fsync(tmp_path, keys, monkeypatch):
    log = AuditLog(tmp_path, keys)
    fsyncs = []
    real = os.fsync
    monkeypatch.setattr(audit.os, "fsync", lambda fd: (fsyncs.append(fd), real(fd))[1])
    seqs = []
    with log._io:                             # a writer is busy: the others queue behind it
        threads = [threading.Thread(target=lambda: seqs.extend(add(log, 1))) for _ in range(8)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while len(log._queue) < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
    for t in threads:
        t.join(10)
    assert sorted(seqs) == list(range(1, 9))
    assert len(fsyncs) == 1
    log.close(seal=False)


CHILD = r"""
import os, sys
from mailtresor.access.audit import AuditLog
from mailtresor.keys.ring import KeyMaterial, KeyRing
from mailtresor.archive.store import Keys
seal, acme, directory, n = sys.stdin.readline().split()
r = KeyRing()
r.put(KeyMaterial("seal", 1, bytes.fromhex(seal)), current=True)
r.put(KeyMaterial("tenant.acme", 1, bytes.fromhex(acme)), current=True)
log = AuditLog(directory, Keys(r), seal_every=7)
print("ready", flush=True)
sys.stdin.readline()                   # "go": the parent's threads start with us
for i in range(int(n)):
    log.append(principal="local:uid=0", tenant="acme", action="admin", object=f"child{i}", result="ok",
               client="unix:uid=0,pid=%d" % os.getpid(), terms=f"child terms {i}")
log.close(seal=False)
"""


def test_threads_and_another_process_append_to_one_sound_chain(tmp_path):
    r = ring()
    keys = Keys(r)
    log = AuditLog(tmp_path, keys, seal_every=7)
    child = subprocess.Popen([sys.executable, "-c", CHILD], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env=dict(os.environ, PYTHONPATH=str(REPO / "daemon")))
    child.stdin.write(f"{r.current('seal')[1].hex()} {r.current('tenant.acme')[1].hex()} {tmp_path} 60\n")
    child.stdin.flush()
    assert child.stdout.readline() == "ready\n"
    errors = []

    def work(k):
        try:
            for i in range(30):
                log.append(principal=f"user:t{k}", tenant="acme", action="search", object=None, result="ok",
                           client="192.0.2.9", terms=f"thread {k} query {i}")
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    child.stdin.write("go\n")
    child.stdin.close()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert child.wait(60) == 0 and not errors
    log.close()
    rep = audit.check(tmp_path, keys)
    assert rep.problems == [] and rep.records == 180 and rep.notes == []
    recs = audit.read(tmp_path, keys, tenant="acme", limit=1000, with_terms=True)[0]
    assert len(recs) == 180 and len({r["seq"] for r in recs}) == 180
    assert sum(1 for r in recs if r["terms"].startswith("child terms")) == 60
    assert all(r["terms"] != "(does not decrypt)" for r in recs)


# --- the command line, with keys from a real control endpoint ------------------------

def mailtresor(stack, *args):
    return subprocess.run([sys.executable, "-m", "mailtresor", "--config", str(stack.config_path), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_verify_and_show(stack):
    from mailtresor.keys.client import control_fetcher
    from mailtresor.archive.store import FetchingKeys
    stack.start_control()
    d = stack.cfg.audit.directory
    p = mailtresor(stack, "audit", "verify")
    assert p.returncode == 1 and "no audit trail at" in p.stderr and "Traceback" not in p.stderr
    keys = FetchingKeys(KeyRing(), control_fetcher(stack.cfg))
    log = AuditLog(d, keys, seal_every=3)
    add(log, 4, terms="budget 2027")
    log.append(principal="mailtresord", tenant=None, action="key-fetch", object="seal", result="ok", client="daemon")
    p = mailtresor(stack, "audit", "verify")
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout == "" and "2 unsealed records at the end" in p.stderr and "sound" in p.stderr
    log.close()

    p = mailtresor(stack, "audit", "show", "--tenant", "acme")
    assert p.returncode == 0 and p.stdout.count("(encrypted)") == 4 and "budget" not in p.stdout
    p = mailtresor(stack, "audit", "show", "--appliance", "--json")
    doc = json.loads(p.stdout)
    assert [r["action"] for r in doc["records"]] == ["key-fetch"] and doc["next"] == 7
    p = mailtresor(stack, "audit", "show", "--tenant", "acme", "--terms", "--json")
    recs = json.loads(p.stdout)["records"]
    assert [r["terms"] for r in recs if r["action"] == "search"] == ["budget 2027"] * 4
    # ... and that read of the terms is itself in the trail (written before
    # the terms are shown: no record, no terms).
    assert [(r["seq"], r["action"], r["object"]) for r in recs[4:]] == [(8, "read", "audit-terms")]
    p = mailtresor(stack, "audit", "show", "--tenant", "nobody")
    assert p.returncode == 1 and "unknown tenant 'nobody'" in p.stderr

    # A flipped byte: exit 1, the problem on stdout naming its seq.
    path = audit.segments(d)[0][1]
    data = bytearray(path.read_bytes())
    data[data.index(b'"obj1"') + 4] ^= 0x01
    path.write_bytes(bytes(data))
    p = mailtresor(stack, "audit", "verify")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stdout.splitlines()[0].startswith("seq 2: record altered or damaged"), p.stdout


# --- the daemon's own records ----------------------------------------------------------

def test_the_daemon_records_key_fetches_and_archive_anomalies(tmp_path):
    """A real daemon: its key fetches (spool, seal, tenant keys) and two
    anomalies -- a journal report header on a message from an untrusted
    path, and extraction cut by the budget -- are in the trail, acme's
    in acme's view only; the trail verifies against the control
    endpoint's seal key after a stop (which seals)."""
    from mailtresor.keys.client import control_fetcher
    from mailtresor.archive.store import FetchingKeys
    from tests.harness.journalgen import make_forgery
    from tests.test_archive import wait_archived

    stack = Stack(tmp_path / "stack", {"archive": {"enabled": True, "extract_max_text": 1000},
                                       "audit": {"seal_every": 5}})
    try:
        stack.start()
        forged = make_forgery(sender="insider@acme.example", to="colleague@acme.example", subject="Plan x",
                              text="figures", attachment_name="a.txt", attachment=b"x", decoy=b"Subject: d\r\n\r\nd\r\n",
                              recipients=[("to", "victim@globex.example", None)], top_headers=[])
        long_text = (b"From: a@example.org\r\nTo: b@acme.example\r\nSubject: long\r\n\r\n"
                     + b"lorem ipsum dolor sit amet " * 400 + b"\r\n")
        with stack.smtp() as s:
            s.sendmail("insider@acme.example", ["colleague@acme.example"], forged)
            s.sendmail("a@example.org", ["b@acme.example"], long_text)
        wait_archived(stack)
        live = json.loads(mailtresor(stack, "status", "--json").stdout)["audit"]["daemon"]
        assert {"seq", "sealed", "unsealed"} <= set(live) and live["seal_problem"] == ""      # as last published
        assert "    Audit: up to seq " in mailtresor(stack, "status").stdout
        assert stack.stop_daemon() == 0
        d = stack.cfg.audit.directory
        st = json.loads(mailtresor(stack, "status", "--json").stdout)["audit"]
        assert st["last_seal"] == audit.read_head(d)["seal_seq"] and "daemon" not in st
        keys = FetchingKeys(KeyRing(), control_fetcher(stack.cfg))
        assert audit.verify(d, keys) == []
        every = audit.read(d, None, tenant=audit.ALL, limit=1000)[0]
        fetched = {(r["object"], r["result"]) for r in every if r["action"] == "key-fetch"}
        assert {("spool", "ok"), ("tenant.acme", "ok"), ("seal", "ok")} <= fetched, fetched
        assert all(r["principal"] == "mailtresord" for r in every)
        acme = audit.read(d, None, tenant="acme", actions={"anomaly"}, limit=1000)[0]
        kinds = sorted(r["detail"]["kind"] for r in acme)
        assert kinds == ["extraction-truncated", "journal-untrusted"], acme
        assert all(len(r["object"]) == 40 and r["detail"]["spool_id"] for r in acme)
        assert audit.read(d, None, tenant="globex", actions={"anomaly"})[0] == []
        assert audit.read_head(d) is not None           # sealed
    finally:
        stack.close()


def test_set_aside_mail_is_an_anomaly_of_the_appliance(tmp_path, keys, monkeypatch):
    """The pipeline on a real spool and store: a message that cannot be
    prepared is set aside after max_tries, and the trail says so."""
    from mailtresor.archive import archiver
    from mailtresor.config import Tenant
    from mailtresor.ingest.spool import Envelope, Spool
    from mailtresor.archive.store import Store

    r = keys.ring
    r.put(KeyMaterial("spool", 1, os.urandom(32)), current=True)
    trail = audit.DaemonTrail(AuditLog(tmp_path / "audit", keys))
    spool = Spool(tmp_path / "spool", r, max_tries=1, sync="fsync")
    store = Store(tmp_path / "store")
    pipe = archiver.Pipeline(spool, store, keys, archiver.Router([Tenant("acme", ("acme.example",))]))
    pipe.on_anomaly = trail.anomaly
    monkeypatch.setattr(archiver, "prepare", lambda *a, **k: 1 / 0)
    try:
        w = spool.open_writer(0)
        w.write(b"Subject: poison\r\n\r\nx\r\n")
        eid = w.commit(Envelope(source="relay", mail_from="a@x.example", rcpt_to=["b@acme.example"])).result()
        assert pipe.run_batch().set_aside == 1
    finally:
        store.close()
        spool.close()
    (rec,) = trail.log.read(tenant=None)[0]
    assert (rec["action"], rec["object"], rec["result"]) == ("anomaly", eid, "failed")
    assert rec["detail"] == {"kind": "set-aside", "reason": "cannot prepare: ZeroDivisionError"}


def test_key_fetch_records_and_an_outage_is_one_record(tmp_path, keys):
    from mailtresor.keys.ring import ControlUnreachable
    trail = audit.DaemonTrail(AuditLog(tmp_path, keys))
    answers = [ControlUnreachable("control endpoint down"), ControlUnreachable("control endpoint down"),
               KeyMaterial("tenant.acme", 3, os.urandom(32))]

    def fetch(name, version=None):
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a

    f = trail.audited_fetch(fetch)
    for _ in range(2):
        with pytest.raises(ControlUnreachable):
            f("tenant.acme")
    assert f("tenant.acme").version == 3
    trail.key_fetch("spool", 2)                       # the daemon's KeyFetcher, on the reactor's side
    recs = trail.log.read(tenant=audit.ALL)[0]
    assert [(r["tenant"], r["object"], r["result"], r["detail"].get("version")) for r in recs] == [
        ("acme", "tenant.acme", "failed", None), ("acme", "tenant.acme", "ok", 3), (None, "spool", "ok", 2)]
    assert "KeyMaterial" not in json.dumps(recs) and recs[0]["detail"]["error"] == "control endpoint down"


def test_a_trail_whose_files_were_removed_is_not_begun_again(tmp_path, keys):
    sealed_log(tmp_path, keys)
    for _, p in audit.segments(tmp_path):
        p.unlink()
    with pytest.raises(audit.AuditError, match="files in .* are gone .*seq 13"):
        AuditLog(tmp_path, keys)
    assert audit.segments(tmp_path) == []


# --- filters (the auditor's pages and GET /api/v1/audit) -------------------------------

def _mixed(log: AuditLog, clock: list[float]) -> None:
    """Records of alice, bob and another tenant, one minute apart."""
    rows = [("user:alice", "acme", "search", "ok"), ("user:bob", "acme", "read", "ok"),
            ("user:alice", "acme", "read", "ok"), ("user:alice", "globex", "read", "ok"),
            ("user:alice@acme", "acme", "login-failed", "failed"), ("user:alice", "acme", "read", "not-found"),
            ("token:alice", "acme", "search", "denied"), ("user:alicex", "acme", "read", "ok")]
    for principal, tenant, action, result in rows:
        log.append(principal=principal, tenant=tenant, action=action, object="x", result=result,
                   client="192.0.2.1")
        clock[0] += 60


def test_filters_match_while_scanning_and_the_cursor_pages_through_them(tmp_path, keys):
    """Every page of a filtered read, one record at a time, gives exactly
    the records a filter over the whole trail gives: none missed, none twice."""
    clock = [1_800_000_000.0]
    log = AuditLog(tmp_path, keys, clock=lambda: clock[0], seal_every=3)
    _mixed(log, clock)
    every = log.read(tenant="acme", limit=1000)[0]
    cases = {
        audit.Filter(principal="alice"): lambda r: r["principal"] in ("user:alice", "token:alice",
                                                                      "user:alice@acme"),
        audit.Filter(principal="user:alice"): lambda r: r["principal"] == "user:alice",
        audit.Filter(actions=frozenset({"read"})): lambda r: r["action"] == "read",
        audit.Filter(results=frozenset({"ok"}), actions=frozenset({"read"})):
            lambda r: r["action"] == "read" and r["result"] == "ok",
        audit.Filter(after=audit.parse_iso(every[2]["time"]), before=audit.parse_iso(every[5]["time"])):
            lambda r: every[2]["time"] <= r["time"] < every[5]["time"],
    }
    for flt, want in cases.items():
        expected = [r["seq"] for r in every if want(r)]
        assert expected, flt
        got, since = [], 0
        for _ in range(50):
            p = log.page(tenant="acme", since=since, limit=1, filter=flt)
            got += [r["seq"] for r in p.records]
            assert p.next >= since
            since = p.next
            if not p.more:
                break
        assert got == expected, flt
        assert log.read(tenant="acme", limit=1000, filter=flt)[0] == [r for r in every if want(r)]
    # Another tenant's records never come through a filter.
    assert all(r["tenant"] == "acme" for r in log.read(tenant="acme", limit=1000,
                                                        filter=audit.Filter(principal="alice"))[0])
    log.close()


def test_a_bounded_scan_stops_short_and_its_cursor_goes_on(tmp_path, keys):
    log = AuditLog(tmp_path, keys)
    add(log, 5, action="search")
    add(log, 1, action="read")
    flt = audit.Filter(actions=frozenset({"read"}))
    p = log.page(tenant="acme", limit=10, filter=flt, max_scan=2)
    assert (p.records, p.next, p.more) == ([], 2, True)
    seen, since = [], 0
    for _ in range(10):
        p = log.page(tenant="acme", since=since, limit=10, filter=flt, max_scan=2)
        seen += p.records
        since = p.next
        if not p.more:
            break
    assert [r["seq"] for r in seen] == [6] and not p.more
    log.close()


def test_the_window_ends_the_scan_and_stays_ended(tmp_path, keys):
    clock = [1_800_000_000.0]
    log = AuditLog(tmp_path, keys, clock=lambda: clock[0])
    for _ in range(4):
        add(log)
        clock[0] += 3600
    every = log.read(tenant="acme")[0]
    flt = audit.Filter(before=audit.parse_iso(every[2]["time"]))
    p = log.page(tenant="acme", limit=100, filter=flt)
    assert [r["seq"] for r in p.records] == [1, 2] and p.next == 2 and not p.more
    assert log.page(tenant="acme", since=p.next, filter=flt).records == []
    log.close()


def test_segments_wholly_before_the_window_are_skipped_unread(tmp_path, keys, monkeypatch):
    clock = [1_800_000_000.0]
    log = AuditLog(tmp_path, keys, clock=lambda: clock[0], segment_bytes=400, seal_every=2)
    for _ in range(12):
        add(log)
        clock[0] += 60
    log.close()
    segs = audit.segments(tmp_path)
    assert len(segs) >= 3
    every = audit.read(tmp_path, keys, tenant="acme", limit=1000)[0]
    after = audit.parse_iso(every[-2]["time"])
    opened = []
    real = audit.lines
    monkeypatch.setattr(audit, "lines", lambda path, start=0: opened.append(Path(path).name) or real(path, start))
    got = audit.read(tmp_path, keys, tenant="acme", limit=1000, filter=audit.Filter(after=after))[0]
    assert got == every[-2:]
    # The first segment was only looked at for its successor's first record's time.
    assert opened.count(segs[0][1].name) == 0


def test_core_audit_filters_are_checked_and_scoped(tmp_path, keys):
    """Core.audit_records: a bad filter is a BadRequest naming it (and
    audited as failed); the filters narrow the caller's tenant only; an
    auditor's terms are decrypted."""
    from mailtresor.access.core import BadRequest, Core, Forbidden, NotFound, audit_time
    from mailtresor.access.principal import Principal

    log = AuditLog(tmp_path / "audit", keys)
    core = Core(store=None, keys=keys, audit=log, exports_dir=tmp_path / "exports", tenants=["acme", "globex"])
    log.append(principal="user:alice", tenant="acme", action="search", object=None, result="ok",
               client="192.0.2.1", terms="merger plans")
    log.append(principal="user:alice", tenant="globex", action="read", object="x", result="ok", client="c")
    aud = Principal(kind="user", name="aud", tenant="acme", roles=frozenset({"auditor"}), client="192.0.2.9")
    got = core.audit_records(aud, principal="alice")
    assert [(r["action"], r.get("terms")) for r in got["records"]] == [("search", "merger plans")]
    assert got["more"] is False
    assert core.audit_records(aud, principal="alice", action="read")["records"] == []
    assert core.audit_records(aud, after="2999-01-01")["records"] == []
    assert len(core.audit_records(aud, before="2999-01-01T00:00:00Z")["records"]) >= 1
    for kw, words in (({"action": "delete"}, "action must be one of"), ({"result": "maybe"}, "result must be one of"),
                      ({"after": "yesterday"}, "after must be a date"), ({"before": "2026-13-45"}, "before: "),
                      ({"after": "2026-12-03", "before": "2026-12-01"}, "before must be later"),
                      ({"principal": "a\nb"}, "principal must be"), ({"principal": "x" * 300}, "principal must be")):
        with pytest.raises(BadRequest, match=words):
            core.audit_records(aud, **kw)
    last = log.read(tenant="acme", limit=1000)[0][-1]
    assert (last["action"], last["result"], last["principal"]) == ("audit-read", "failed", "user:aud")
    assert last["detail"]["filter"] == {"principal": "(invalid)"} and "reason" in last["detail"]
    with pytest.raises(NotFound):
        core.audit_records(aud, tenant="globex")
    user = Principal(kind="user", name="alice", tenant="acme", roles=frozenset({"user"}))
    for call in (core.audit_records, core.anomalies, core.audit_verify):
        with pytest.raises(Forbidden):
            call(user)
    assert audit_time("t", "2026-12-03") == audit.parse_iso("2026-12-03T00:00:00.000000Z")
    assert audit_time("t", "2026-12-03T01:00:00+01:00") == audit.parse_iso("2026-12-03T00:00:00.000000Z")
    log.close()


def test_core_anomalies_newest_first_counted_and_read_on_from_where_it_was(tmp_path, keys):
    from mailtresor.access.core import Core
    from mailtresor.access.principal import Principal

    log = AuditLog(tmp_path / "audit", keys)
    trail = audit.DaemonTrail(log)
    core = Core(store=None, keys=keys, audit=log, exports_dir=tmp_path / "exports", tenants=["acme", "globex"])
    aud = Principal(kind="user", name="aud", tenant="acme", roles=frozenset({"auditor"}))
    trail.anomaly("journal-untrusted", "acme", "a" * 40, {"spool_id": "s1", "source": "relay"})
    trail.anomaly("set-aside", None, "s2", {"reason": "cannot prepare"})
    trail.anomaly("extraction-truncated", "globex", "b" * 40, {"spool_id": "s3"})
    got = core.anomalies(aud)
    assert got["count"] == 1 and got["anomalies"][0]["detail"]["kind"] == "journal-untrusted"
    trail.anomaly("extraction-truncated", "acme", "c" * 40, {"spool_id": "s4"})
    got = core.anomalies(aud)
    assert got["count"] == 2 and [a["object"] for a in got["anomalies"]] == ["c" * 40, "a" * 40]


def test_core_audit_verify_reports_problems_and_notes(tmp_path, keys):
    from mailtresor.access.core import Core
    from mailtresor.access.principal import Principal

    d = tmp_path / "audit"
    sealed_log(d, keys)
    log = AuditLog(d, keys, seal_every=1000)
    core = Core(store=None, keys=keys, audit=log, exports_dir=tmp_path / "exports", tenants=["acme"])
    aud = Principal(kind="user", name="aud", tenant="acme", roles=frozenset({"auditor"}))
    rep = core.audit_verify(aud)
    assert rep["sound"] and rep["problem_count"] == 0 and rep["last_seal"]["seq"] >= 1 and rep["seals"] >= 1
    lines_ = log_lines(d)
    lines_[2] = lines_[2].replace(b"obj2", b"obj9")
    write_lines(d, lines_)
    rep = core.audit_verify(aud)
    assert not rep["sound"] and any("seq 3" in p for p in rep["problems"])
    log.close()
