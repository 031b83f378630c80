"""The whole corpus (4,650 real, often broken messages) through each ingest
path: every message comes out of the spool byte-identical, and no spool file
carries a message's plaintext.

Messages go out as an SMTP client sends them (mbox line dropped, CRLF line
endings: conftest.corpus_message); the spool must hold exactly those bytes.
"""

import threading
from collections import Counter

import pytest

from tests.conftest import corpus_files, corpus_message
from tests.harness import hostile

pytestmark = pytest.mark.slow

SENDERS = 4


def _send_all(connect, messages: list[bytes], rcpt: str = "archive@acme.example",
              mail_from: str = "sender@globex.example") -> list[str]:
    """Send on SENDERS connections in parallel; return the queue ids."""
    ids: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(part):
        try:
            with connect() as s:
                for data in part:
                    s.mail(mail_from)
                    s.rcpt(rcpt)
                    code, text = s.data(data)
                    assert code == 250, (code, text)
                    with lock:
                        ids.append(text.decode().rsplit(" ", 1)[1])
        except BaseException as e:  # reported below, with the thread's error
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(messages[k::SENDERS],)) for k in range(SENDERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    assert not [t for t in threads if t.is_alive()], "a sender did not finish"
    assert errors == []
    return ids


def _subject(data: bytes) -> bytes | None:
    """The raw Subject: value, as bytes, if long enough to be telling."""
    head = data.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n"):
        if line[:8].lower() == b"subject:":
            value = line[8:].strip()
            return value if len(value) >= 12 else None
    return None


def _body_probe(data: bytes) -> bytes | None:
    body = data.split(b"\r\n\r\n", 1)[-1].strip()
    return body[:48] if len(body) >= 48 else None


def test_whole_corpus_through_relay_is_byte_identical_and_encrypted(running):
    files = corpus_files()
    messages = [corpus_message(p) for p in files]
    assert len(messages) == 4650
    ids = _send_all(running.smtp, messages)
    assert len(ids) == len(set(ids)) == len(messages)

    entries = running.entries()
    assert sorted(entries) == sorted(ids)
    # A multiset: the corpus holds a few identical messages; each copy counts.
    assert Counter(e.data for e in entries.values()) == Counter(messages)
    for e in entries.values():
        assert e.envelope.mail_from == "sender@globex.example"
        assert e.envelope.rcpt_to == ["archive@acme.example"]
        assert e.envelope.size == len(e.data)

    # No plaintext: each spool file against its own message's subject and
    # body, and every file against a sample of all subjects.
    probes = 0
    blob = bytearray()
    for qid, e in entries.items():
        raw = (running.spool_dir / "new" / qid).read_bytes()
        blob += raw
        for probe in (_subject(e.data), _body_probe(e.data)):
            if probe is not None:
                probes += 1
                assert probe not in raw, f"{qid} holds plaintext {probe[:30]!r}"
    assert probes > 8000
    subjects = [s for s in map(_subject, messages[::10]) if s is not None]
    assert len(subjects) > 300
    leaked = [s for s in subjects if s in blob]
    assert leaked == []
    # The envelope is encrypted too.
    assert b"archive@acme.example" not in blob and b"sender@globex.example" not in blob


def test_whole_corpus_through_postfix_milter_is_byte_identical():
    from tests.test_milter import MilterRig

    files = corpus_files()
    messages = [corpus_message(p) for p in files]
    rig = MilterRig()
    try:
        ids = _send_all(rig.smtp, messages)
        assert len(ids) == len(messages)
        entries = rig.stack.entries()
        assert len(entries) == len(messages)
        # Postfix with message_drop_headers empty passes the message through
        # unchanged; the milter must hand exactly that to the spool.
        assert Counter(e.data for e in entries.values()) == Counter(messages)
        qids = Counter(e.envelope.queue_id for e in entries.values())
        assert len(qids) > 0.99 * len(messages)   # Postfix reuses queue ids, rarely
        assert {e.envelope.source for e in entries.values()} == {"milter"}
    finally:
        rig.close()



def test_whole_corpus_archived_via_relay_and_milter_retrievable_and_searchable():
    """Relay -> acme, Postfix+milter -> globex, the whole corpus each way:
    every message comes back byte-identical from its tenant's store, and
    searches for known subjects, senders and attachment names find it."""
    import json
    import subprocess
    import sys
    import time
    from pathlib import Path

    from mailtresor.archive.parse import parse_message
    from mailtresor.assemble import build_keys, build_store
    from tests.conftest import REPO
    from tests.test_milter import MilterRig

    messages = [corpus_message(p) for p in corpus_files()]
    # The hostile generator's mail and a forged journal report go the same
    # two ways, among the corpus: each is archived (none set aside), flagged,
    # and holds up nothing.
    extras = [make() for make in hostile.ALL.values()] + [hostile.forged_journal_report()]
    rig = MilterRig({"archive": {"enabled": True}})
    st = rig.stack
    try:
        assert len(_send_all(st.smtp, messages, "archive@acme.example", "sender@example.net")) == len(messages)
        assert len(_send_all(st.smtp, extras, "archive@acme.example", "mallory@evil.example")) == len(extras)
        assert len(_send_all(rig.smtp, messages, "archive@globex.example", "sender@example.net")) == len(messages)
        assert len(_send_all(rig.smtp, extras, "archive@globex.example", "mallory@evil.example")) == len(extras)
        deadline = time.monotonic() + 900
        while any((st.spool_dir / "new").iterdir()):
            assert time.monotonic() < deadline, "archiver did not drain the spool"
            time.sleep(0.5)
        assert not any((st.spool_dir / "bad").iterdir())
        keys = build_keys(st.cfg)
        store = build_store(st.cfg, readonly=True)
        try:
            for tenant in ("acme", "globex"):
                ids = {keys.archive_id(tenant, m): m for m in messages}
                stored = {a: m for m in store.months(tenant) for a in store.shard(tenant, m).ids()}
                assert set(ids) <= set(stored), tenant            # distinct messages, each once
                for aid in ids:
                    assert store.shard(tenant, stored[aid]).get(aid, keys)[0] == ids[aid]
                # Each extra once: through the relay byte for byte; Postfix
                # may rewrite a huge header on the milter path (counted there).
                rest = set(stored) - set(ids)
                assert len(rest) == len(extras), tenant
                if tenant == "acme":
                    assert rest == {keys.archive_id(tenant, m) for m in extras}
        finally:
            store.close()

        # The `mailtresor` command as installed: the running daemon answers.
        command = [str(Path(sys.executable).parent / "mailtresor"), "--config", str(st.config_path)]

        def search(tenant, query):
            p = subprocess.run([*command, "search", "--json", "--limit", "10000", "--tenant", tenant, query],
                               cwd=REPO, capture_output=True, timeout=120)
            assert p.returncode == 0, p.stderr
            return {h["id"] for h in json.loads(p.stdout)["results"]}

        checked = {"subject": 0, "from": 0, "attachment": 0}
        for m in messages[::97]:
            p = parse_message(m)
            for tenant in ("acme", "globex"):
                aid = keys.archive_id(tenant, m)
                shown = subprocess.run([*command, "show", "--tenant", tenant, aid], capture_output=True, timeout=120)
                assert (shown.returncode, shown.stdout) == (0, m), shown.stderr
                words = [w for w in p.subject.split() if w.isalpha() and len(w) > 4][:2]
                if words:
                    assert aid in search(tenant, " ".join(f"subject:{w}" for w in words)), (p.subject, tenant)
                    checked["subject"] += 1
                if p.from_:
                    assert aid in search(tenant, f"from:{p.from_[0]}"), (p.from_, tenant)
                    checked["from"] += 1
        for m in messages:
            p = parse_message(m)
            names = [a.filename for a in p.attachments if a.filename and a.filename.replace(".", "").isalnum()]
            if names:
                assert keys.archive_id("acme", m) in search("acme", f"attachment:{names[0]}"), names
                checked["attachment"] += 1
                if checked["attachment"] >= 10:
                    break
        assert checked["subject"] > 40 and checked["from"] > 60 and checked["attachment"] >= 5, checked
        for tenant in ("acme", "globex"):
            # The forgery is kept as received (not unwrapped: neither path is a
            # journaling connector), and the bombs were cut, not set aside.
            assert len(search(tenant, "flag:journal-untrusted")) == 1, tenant
            assert len(search(tenant, "flag:extraction-truncated")) >= 3, tenant
            assert len(search(tenant, "from:mallory@evil.example")) >= len(extras) - 1, tenant
        # Every search and show went to the daemon's API socket (client
        # "unix:..."), none was read in the command's own process ("local:...").
        from mailtresor.access import audit as auditmod
        ways = [r["client"].split(":")[0] for r in auditmod.read(st.cfg.audit.directory, tenant=auditmod.ALL,
                                                                limit=1_000_000)[0]
                if r["action"] in ("search", "read")]
        assert len(ways) >= sum(checked.values()) and set(ways) == {"unix"}, ways[-20:]
    finally:
        rig.close()

