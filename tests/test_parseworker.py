"""The archiver's parser processes (mailtresor/parseworker.py): real child
processes, real pipes; what comes back equals parsing in process, a child
that dies or hangs costs nothing but a retry, and only a message that kills
a parser by itself is set aside."""

import os
import signal
import sys
import time

import pytest

from mailtresor.archive import parseworker
from mailtresor.archive.archiver import Pipeline, Router
from mailtresor.config import Tenant
from mailtresor.keys.ring import KeyMaterial, KeyRing
from mailtresor.archive.parseworker import ParserDied, ParserPool, digest
from mailtresor.ingest.spool import Envelope, Spool
from mailtresor.archive.store import Keys, Store
from tests.conftest import corpus_files, corpus_message
from tests.harness.journalgen import make_report

POISON = b"X-Test-Poison: kill the parser\r\n"

# A parser program for these tests only: the real one, except that a message
# carrying POISON makes it exit at once (as a crash in a parser would), and
# one carrying HANG makes it sleep.
BROKEN_PARSER = r"""
import os, sys, time
from mailtresor.archive import parseworker
real = parseworker.digest
def digest(raw, journaling=None):
    if b"X-Test-Poison:" in raw:
        os._exit(70)
    if b"X-Test-Hang:" in raw:
        time.sleep(3600)
    return real(raw, journaling)
parseworker.digest = digest
sys.exit(parseworker.main())
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def broken_parser(monkeypatch):
    monkeypatch.setattr(parseworker, "COMMAND", [sys.executable, "-c", BROKEN_PARSER])


def test_answers_equal_parsing_in_process_corpus_and_journal_reports():
    files = corpus_files()[::23]
    raws = [corpus_message(f) for f in files]
    original = raws[0]
    report = make_report(original, sender="alice@globex.example",
                         recipients=[("to", "bob@acme.example", None),
                                     ("bcc", "carol@acme.example", "Expanded: team@acme.example")])
    raws += [report, b"", b"\x00\xff" * 100, b"X-MS-Journal-Report:\r\n\r\nnot multipart\r\n"]
    # Through a journaling connector (the trust travels with the request),
    # and the same report from anywhere else.
    journaling = [None] * (len(raws) - 4) + [{"tenant_id": ""}] * 4
    raws.append(report)
    journaling.append(None)
    pool = ParserPool(2)
    try:
        futures = [pool.submit(r, j) for r, j in zip(raws, journaling)]   # all handed over before any answer
        answers = [parseworker.wait(f, 60) for f in futures]
    finally:
        pool.close()
    assert len(answers) == len(raws) > 200
    for raw, j, got in zip(raws, journaling, answers):
        assert got == digest(raw, j)
    assert answers[-5]["original"] == original and answers[-5]["journal"]["recipients"]
    assert answers[-2]["journal_error"]
    untrusted = answers[-1]
    assert untrusted["original"] is None and untrusted["journal"] is None
    assert untrusted["journal_untrusted"] == "not from a journaling connector"
    assert untrusted["parsed"] == digest(report)["parsed"] != answers[-5]["parsed"]


def test_a_dead_child_fails_its_requests_and_is_replaced():
    raws = [corpus_message(f) for f in corpus_files()[:400]]
    pool = ParserPool(1)
    try:
        futures = [pool.submit(r) for r in raws]
        (pid,) = pool.pids()
        os.kill(pid, signal.SIGKILL)
        outcomes = []
        for f in futures:
            try:
                parseworker.wait(f, 60)
                outcomes.append("answered")
            except ParserDied:
                outcomes.append("died")
        assert "died" in outcomes                  # the kill came before the last answer
        assert outcomes == sorted(outcomes)        # answers in order, then every rest failed
        got = parseworker.wait(pool.submit(raws[0]), 60)
        assert got == digest(raws[0])
        assert pool.restarts == 1 and pool.pids() != [pid]
    finally:
        pool.close()
    assert pool.pids() == []


def test_children_end_with_the_pool_and_with_their_parent(tmp_path):
    pool = ParserPool(2)
    for _ in range(2):
        parseworker.wait(pool.submit(b"Subject: x\r\n\r\nbody\r\n"), 60)
    pids = pool.pids()
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    pool.close()
    assert not any(_alive(p) for p in pids)
    # kill -9 of the daemon: the kernel kills its parsers (PR_SET_PDEATHSIG)
    script = tmp_path / "parent.py"
    script.write_text("import sys\nfrom mailtresor.archive.parseworker import ParserPool, wait\n"
                      "p = ParserPool(1)\nwait(p.submit(b'Subject: x\\r\\n\\r\\nx\\r\\n'), 60)\n"
                      "print(p.pids()[0], flush=True)\nimport time\ntime.sleep(600)\n")
    import subprocess
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    try:
        child = int(parent.stdout.readline())
        assert _alive(child)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child)
    finally:
        if parent.poll() is None:
            parent.kill()


def _pipeline(tmp_path, parser, max_tries=2):
    ring = KeyRing()
    for name in ("spool", "tenant.acme", "seal"):
        ring.put(KeyMaterial(name, 1, os.urandom(32)), current=True)
    spool = Spool(tmp_path / "spool", ring, max_tries=max_tries, sync="fsync")
    store = Store(tmp_path / "store")
    pipe = Pipeline(spool, store, Keys(ring), Router([Tenant("acme", ("acme.example",))]),
                    seal_seed=lambda: b"s" * 32, batch_size=50, parser=parser)
    return spool, store, pipe


def _put(spool, raws):
    futs = []
    for raw in raws:
        w = spool.open_writer(len(raw))
        w.write(raw)
        futs.append(w.commit(Envelope(source="relay", mail_from="a@globex.example",
                                      rcpt_to=["b@acme.example"])))
    return [f.result() for f in futs]


def test_a_message_that_kills_the_parser_is_set_aside_alone(tmp_path, broken_parser):
    """Three batches' worth of mail with two poison messages among it: the
    poison is set aside after max_tries; every other message is archived,
    none of them charged a try."""
    raws = [corpus_message(f) for f in corpus_files()[:120]]
    poison_at = {17, 88}
    raws = [POISON + r if i in poison_at else r for i, r in enumerate(raws)]
    parser = ParserPool(1)
    spool, store, pipe = _pipeline(tmp_path, parser)
    try:
        ids = _put(spool, raws)
        for _ in range(20):
            r = pipe.run_batch()
            if r.archived + r.failed + r.unrouted == 0:
                break
        bad = sorted(n for n in os.listdir(spool.bad_dir) if not n.endswith(".why"))
        assert bad == sorted(ids[i] for i in poison_at)
        assert spool.ready() == []
        assert os.listdir(spool.tries_dir) == []
        assert pipe.totals.archived == len(raws) - len(poison_at)
        assert sum(store.shard("acme", m).count() for m in store.months("acme")) == len(raws) - len(poison_at)
        assert parser.restarts >= 2 * len(poison_at)     # every try killed a child, and it was replaced
    finally:
        parser.close()
        store.close()
        spool.close()


def test_a_hanging_parser_is_killed_and_the_message_set_aside(tmp_path, broken_parser):
    raws = [corpus_message(f) for f in corpus_files()[:10]]
    raws[3] = b"X-Test-Hang: yes\r\n" + raws[3]
    parser = ParserPool(1)
    spool, store, pipe = _pipeline(tmp_path, parser, max_tries=1)
    pipe.parse_timeout = 1.0
    try:
        ids = _put(spool, raws)
        started = time.monotonic()
        r = pipe.run_batch()
        assert r.archived == 9 and r.set_aside == 1
        assert time.monotonic() - started < 60
        assert [n for n in os.listdir(spool.bad_dir) if not n.endswith(".why")] == [ids[3]]
    finally:
        parser.close()
        store.close()
        spool.close()


def test_pipeline_with_and_without_parser_processes_store_the_same(tmp_path):
    raws = [corpus_message(f) for f in corpus_files()[1::50]]
    results = {}
    for n in (0, 1):
        parser = ParserPool(n) if n else None
        (tmp_path / str(n)).mkdir()
        spool, store, pipe = _pipeline(tmp_path / str(n), parser)
        try:
            _put(spool, raws)
            while pipe.run_batch().archived:
                pass
            results[n] = []
            for month in store.months("acme"):
                shard = store.shard("acme", month)
                results[n] += [repr(sorted(shard.get_meta(aid, pipe.keys)["summary"].items()))
                               for aid in shard.ids()]
        finally:
            if parser:
                parser.close()
            store.close()
            spool.close()
    assert len(results[0]) == len(raws)
    # Archive ids differ (each run has its own tenant key); the summaries,
    # made from the parse, must not.
    assert sorted(results[0]) == sorted(results[1])


def test_no_lmdb_map_outlives_a_batch(tmp_path):
    """Between batches the archiver holds no LMDB environment open, so what
    a batch touched is not counted in the daemon's memory ever after."""
    raws = [corpus_message(f) for f in corpus_files()[2::40]]
    spool, store, pipe = _pipeline(tmp_path, None)
    try:
        _put(spool, raws)
        assert pipe.run_batch().archived == 50
        mdb = [p for p in (tmp_path / "store").rglob("data.mdb")]
        assert any("catalog" in str(p) for p in mdb) and any("lmdb" in str(p) for p in mdb)
        with open("/proc/self/maps") as f:
            maps = f.read()
        assert [str(p) for p in mdb if str(p) in maps] == []
        assert store.open_shards() == []
        while pipe.run_batch().archived:
            pass
        assert sum(store.shard("acme", m).count() for m in store.months("acme")) == len(raws)
    finally:
        store.close()
        spool.close()


def test_no_parser_process_can_start_parsing_goes_on_in_process(tmp_path, monkeypatch, caplog):
    """fork/exec failing (out of memory, limits) does not stop archiving:
    the pool parses in process, says so, and starts a child again later."""
    raws = [corpus_message(f) for f in corpus_files()[3::200]]
    monkeypatch.setattr(parseworker, "COMMAND", [str(tmp_path / "no-such-program")])
    parser = ParserPool(1)
    spool, store, pipe = _pipeline(tmp_path, parser)
    try:
        _put(spool, raws)
        with caplog.at_level("ERROR", logger="mailtresor.archive.parseworker"):
            r = pipe.run_batch()
        assert (r.archived, r.set_aside, r.failed) == (len(raws), 0, 0)
        assert parser.in_process >= len(raws) and parser.pids() == []
        assert "cannot start a parser process (No such file or directory)" in caplog.text
        # The same digests as a child gives, and a child again once it can start.
        monkeypatch.setattr(parseworker, "COMMAND", [sys.executable, "-m", "mailtresor.archive.parseworker"])
        parser._spawn_after = 0.0
        before = parser.in_process
        assert parseworker.wait(parser.submit(raws[0]), 60) == parseworker.wait(parser._here(raws[0]), 60)
        assert parser.in_process == before + 1 and len(parser.pids()) == 1
    finally:
        parser.close()
        store.close()
        spool.close()
