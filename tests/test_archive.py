"""The archive end to end: a real daemon archives what the relay spooled;
the `mailtresor` CLI, run as a subprocess, finds, shows and verifies it."""

import json
import shutil
import struct
import subprocess
import sys
import time

import pytest

from mailtresor.archive.store import Keys, RecordCorrupt, Store, open_record
from tests.conftest import REPO, corpus_files, corpus_message
from tests.harness.stack import Stack

ON = {"archive": {"enabled": True}}


def msg(subject: str, frm="alice@globex.example", to="bob@acme.example", body="Hello there.\r\n",
        extra=b"") -> bytes:
    return (f"From: Alice <{frm}>\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Date: Thu, 22 Aug 2002 10:00:00 +0000\r\nMessage-ID: <{abs(hash(subject))}@globex.example>\r\n"
            ).encode() + extra + b"\r\n" + body.encode()


def cli(stack, *args, check=None, stdin=None):
    p = subprocess.run([sys.executable, "-m", "mailtresor", "--config", str(stack.config_path), *args],
                       cwd=REPO, capture_output=True, timeout=600, input=stdin)
    if check is not None:
        assert p.returncode == check, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    return p


def wait_archived(stack, timeout=120.0, expect_unrouted=0):
    deadline = time.monotonic() + timeout
    new = stack.spool_dir / "new"
    while time.monotonic() < deadline:
        if not any(new.iterdir()):
            return
        time.sleep(0.1)
    raise AssertionError(f"spool not drained: {len(list(new.iterdir()))} entries left")


def search(stack, tenant, query, check=0) -> list[dict]:
    p = cli(stack, "search", "--tenant", tenant, "--json", "--limit", "10000", query, check=check)
    return json.loads(p.stdout)["results"] if p.returncode == 0 else []


def archive_then_stop(stack, subject: str, n: int) -> None:
    """n messages to acme ("SUBJECT 0", ...) through the relay, archived,
    then the daemon stopped (its shards sealed) for the test to work on."""
    with stack.smtp() as s:
        for i in range(n):
            s.sendmail("alice@globex.example", ["bob@acme.example"], msg(f"{subject} {i}"))
    wait_archived(stack)
    stack.stop_daemon()


@pytest.fixture
def arch(tmp_path):
    s = Stack(tmp_path / "stack", ON)
    s.start()
    yield s
    s.close()


def keys_of(stack) -> Keys:
    from mailtresor.assemble import build_keys
    return build_keys(stack.cfg)


def test_relay_to_archive_search_show_verify(arch):
    m1 = msg("Quarterly figures 7f3a", extra=b"X-Latin1: caf\xe9\r\n")
    m2 = msg("Lunch on friday", frm="carol@acme.example", to="dave@acme.example")
    with arch.smtp() as s:
        s.sendmail("alice@globex.example", ["bob@acme.example"], m1)
        s.sendmail("carol@acme.example", ["dave@acme.example", "eve@elsewhere.example"], m2)
    wait_archived(arch)
    hits = search(arch, "acme", "subject:quarterly")
    assert [h["subject"] for h in hits] == ["Quarterly figures 7f3a"]
    assert hits[0]["from"].endswith("<alice@globex.example>")
    aid = hits[0]["id"]
    assert cli(arch, "show", "--tenant", "acme", aid, check=0).stdout == m1
    assert cli(arch, "show", "--tenant", "acme", "--headers", aid, check=0).stdout == m1.split(b"\r\n\r\n")[0] + b"\r\n"
    env = json.loads(cli(arch, "show", "--tenant", "acme", "--envelope", aid, check=0).stdout)
    (e,) = env["envelopes"]
    assert e["mail_from"] == "alice@globex.example" and e["recipients"] == ["bob@acme.example"]
    assert env["id"] == aid and env["tenant"] == "acme" and env["subject"] == "Quarterly figures 7f3a"
    assert [h["id"] for h in search(arch, "acme", "from:carol@acme.example")] != []
    assert search(arch, "acme", "envelope:eve@elsewhere.example")[0]["subject"] == "Lunch on friday"
    assert search(arch, "acme", "date:2002-08-01..2002-08-31") and not search(arch, "acme", "date:2003-01-01..")
    # Both tenants hold m1 (globex is the sender's domain); each its own copy.
    g = search(arch, "globex", "subject:quarterly")
    assert len(g) == 1 and g[0]["id"] != aid
    assert search(arch, "globex", "subject:lunch") == []
    p = cli(arch, "verify", check=0)
    assert b"all good" in p.stderr
    st = json.loads(cli(arch, "status", "--json", check=0).stdout)
    assert st["spool"]["ready"] == 0
    shards = {s["shard"]: s for s in st["shards"]}
    assert shards["acme/2002-08"]["records"] == 2 and shards["acme/2002-08"]["index_lag"] == 0
    assert shards["acme/2002-08"]["backup_lag"] == 0
    assert st["tenants"]["acme"] == {"records": 2, "shards": 1, "index_lag": 0, "backup_lag": 0,
                                     "unsealed": shards["acme/2002-08"]["unsealed"]}
    # The same in words: aligned lines, names and numbers, no Python reprs.
    text = cli(arch, "status", check=0).stdout.decode()
    assert "\n  Tenants: acme    2 messages in 1 shard\n" in text, text
    assert "\n   Shards: acme/2002-08    2 records, chain at " in text, text
    (keys,) = [ln for ln in text.splitlines() if ln.startswith("     Keys: ")]
    assert {"spool v1", "tenant.acme v1"} <= set(keys[11:].split(", ")), keys
    assert "{'" not in text and "[{" not in text and "'name'" not in text, text


def test_a_tenant_reads_its_copy_with_its_own_key_only(arch):
    m = msg("Shared board minutes", frm="ann@acme.example", to="ben@globex.example")
    with arch.smtp() as s:
        s.sendmail("ann@acme.example", ["ben@globex.example"], m)
    wait_archived(arch)
    keys = keys_of(arch)
    st = Store(arch.cfg.archive.directory, readonly=True)
    try:
        ids = {}
        for t in ("acme", "globex"):
            ids[t] = keys.archive_id(t, m)
            month = st.locate(t, ids[t])
            assert st.shard(t, month).get(ids[t], keys)[0] == m
        acme = st.shard("acme", "2002-08")
        with acme.env.begin() as txn:
            blob = bytes(txn.get(bytes.fromhex(ids["acme"]), db=acme.records))
        # globex's key, even presenting the record as globex's, opens nothing.
        with pytest.raises(RecordCorrupt):
            open_record(blob, "globex", "2002-08", bytes.fromhex(ids["acme"]), keys)
        with pytest.raises(RecordCorrupt):
            open_record(blob, "acme", "2002-08", bytes.fromhex(ids["acme"]),
                        _swapped(keys, "acme", "globex"))
    finally:
        st.close()


class _swapped(Keys):
    """acme's records asked with globex's key material."""

    def __init__(self, keys, tenant, other):
        super().__init__(keys.ring)
        self.other = other

    def store_key(self, tenant, version):
        return Keys.store_key(self, self.other, version)


def test_same_message_twice_is_stored_once_with_both_envelopes(arch):
    m = msg("Sent twice")
    with arch.smtp() as s:
        s.sendmail("alice@globex.example", ["bob@acme.example"], m)
        s.sendmail("alice@globex.example", ["carol@acme.example"], m)
    wait_archived(arch)
    (hit,) = search(arch, "acme", "subject:twice")
    env = json.loads(cli(arch, "show", "--tenant", "acme", "--envelope", hit["id"], check=0).stdout)
    assert sorted(e["recipients"][0] for e in env["envelopes"]) == ["bob@acme.example", "carol@acme.example"]
    assert [h["id"] for h in search(arch, "acme", "envelope:carol@acme.example")] == [hit["id"]]


def test_journal_reports_are_unwrapped_and_merged(arch):
    from tests.harness.journalgen import make_report
    original = corpus_message(corpus_files()[7])
    r1 = make_report(original, sender="zed@globex.example",
                     recipients=[("to", "amy@acme.example", None), ("bcc", "hidden@acme.example", None)])
    r2 = make_report(original, sender="zed@globex.example",
                     recipients=[("to", "list-member@acme.example", "Expanded: staff@acme.example")],
                     report_encoding="base64", attach_encoding="base64")
    with arch.smtp(implicit=True, cert="client-exchange-acme") as s:
        s.sendmail("", ["journal@archive.test"], r1)
        s.sendmail("", ["journal@archive.test"], r2)
    wait_archived(arch)
    hits = search(arch, "acme", "bcc:hidden@acme.example")
    assert len(hits) == 1
    aid = hits[0]["id"]
    assert cli(arch, "show", "--tenant", "acme", aid, check=0).stdout == original
    env = json.loads(cli(arch, "show", "--tenant", "acme", "--envelope", aid, check=0).stdout)
    rcpts = sorted(r["address"] for e in env["envelopes"] for r in e["journal"]["recipients"])
    assert rcpts == ["amy@acme.example", "hidden@acme.example", "list-member@acme.example"]
    assert [h["id"] for h in search(arch, "acme", "envelope:staff@acme.example")] == [aid]
    assert [h["id"] for h in search(arch, "acme", "tag:journal")] == [aid]


def test_mail_no_tenant_claims_is_held_not_dropped(arch):
    with arch.smtp() as s:
        s.sendmail("x@nowhere.example", ["y@elsewhere.example"], msg("Nobody's mail", "x@nowhere.example",
                                                                      "y@elsewhere.example"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any((arch.spool_dir / "unrouted").iterdir()):
        time.sleep(0.1)
    st = json.loads(cli(arch, "status", "--json", check=0).stdout)
    assert st["spool"]["unrouted"] == 1 and st["spool"]["ready"] == 0
    assert "no tenant claims" in arch.log()
    assert cli(arch, "reroute", check=0).stdout.startswith(b"reroute: 1 ")


def test_cli_user_errors(arch):
    for args, needle in ((("search", "--tenant", "initech", "x"), b"unknown tenant 'initech'"),
                         (("search", "--tenant", "acme", "subject:(unbalanced"), b"bad query"),
                         (("show", "--tenant", "acme", "not-an-id"), b"is not an archive id"),
                         (("show", "--tenant", "acme", "0" * 40), b"no message " + b"0" * 40 + b" in the archive of acme")):
        p = cli(arch, *args)
        assert p.returncode != 0 and needle in p.stderr and b"Traceback" not in p.stderr, (args, p.stderr)
    # The appliance's own TLS key unusable: named, no traceback.
    text = arch.config_path.read_text()
    key_file = str(arch.cfg.control.key_file)
    assert text.count(key_file) == 1
    garbage = arch.config_path.parent / "garbage.key"
    garbage.write_text("not a key\n")
    for bad, needle in ((arch.config_path.parent, b"Is a directory"), (garbage, b"not a certificate and its private key")):
        edited = arch.config_path.with_name("edited.toml")
        edited.write_text(text.replace(key_file, str(bad)))
        for args in (("verify",), ("verify", "--tenant", "acme")):
            p = subprocess.run([sys.executable, "-m", "mailtresor", "--config", str(edited), *args],
                               cwd=REPO, capture_output=True, timeout=120)
            assert p.returncode == 1 and b"Traceback" not in p.stderr, (args, p.stderr)
            assert b"[control] " in p.stderr and needle in p.stderr and str(bad).encode() in p.stderr, p.stderr
    arch.stop_control()
    with arch.smtp() as s:
        s.sendmail("alice@globex.example", ["bob@acme.example"], msg("Before the outage"))
    p = cli(arch, "verify")
    assert p.returncode == 1 and b"seal key" in p.stderr and b"unreachable" in p.stderr
    assert b"Traceback" not in p.stderr
    p = cli(arch, "search", "--tenant", "acme", "anything")
    assert p.returncode in (0, 1) and b"Traceback" not in p.stderr


def test_tamper_is_reported_by_verify(arch):
    archive_then_stop(arch, "Tamper", 5)
    keys = keys_of(arch)
    st = Store(arch.cfg.archive.directory)
    shard = st.shard("acme", "2002-08")
    ids = shard.ids()
    with shard.env.begin(write=True) as txn:
        blob = bytearray(txn.get(bytes.fromhex(ids[0]), db=shard.records))
        blob[len(blob) // 2] ^= 0x20
        txn.put(bytes.fromhex(ids[0]), bytes(blob), db=shard.records)
        txn.delete(bytes.fromhex(ids[1]), db=shard.records)
        k3, k4 = struct.pack(">Q", 3), struct.pack(">Q", 4)
        v3, v4 = bytes(txn.get(k3, db=shard.chain)), bytes(txn.get(k4, db=shard.chain))
        txn.put(k3, v4, db=shard.chain)
        txn.put(k4, v3, db=shard.chain)
    st.close()
    del keys
    p = cli(arch, "verify", "--tenant", "acme", check=1)
    out = p.stdout.decode()
    assert f"acme/2002-08: {ids[0]}: record differs" in out
    assert f"acme/2002-08: {ids[1]}: record is missing" in out
    assert "chain entry 3 does not link" in out
    assert b"problem(s)" in p.stderr


def test_index_gap_is_reported_and_mended(arch):
    archive_then_stop(arch, "Indexed", 3)
    shutil.rmtree(arch.cfg.archive.directory / "acme" / "2002-08" / "xapian")
    p = cli(arch, "verify", "--tenant", "acme", check=1)
    assert p.stdout.count(b"not in the index") == 3
    cli(arch, "reindex", "--missing", "--tenant", "acme", check=0)
    cli(arch, "verify", "--tenant", "acme", check=0)
    assert len(search(arch, "acme", "subject:indexed")) == 3


def _rewrite_index_data(index_dir, change) -> list[str]:
    """Apply change(aid, listing, docs) -> new data to every document; the ids."""
    import xapian

    from mailtresor.archive.index import split_data
    db = xapian.WritableDatabase(str(index_dir), xapian.DB_OPEN)
    try:
        docs = [(p.docid, db.get_document(p.docid)) for p in db.postlist("")]
        out = []
        for docid, doc in docs:
            aid, listing = split_data(doc.get_data())
            doc.set_data(change(aid, listing, docs))
            db.replace_document(docid, doc)
            out.append(aid)
        db.commit()
        return out
    finally:
        db.close()


def test_search_lists_from_the_index_and_checks_it(arch):
    archive_then_stop(arch, "Listed", 3)
    want = {h["id"]: h for h in search(arch, "acme", "subject:listed")}
    assert sorted(h["subject"] for h in want.values()) == ["Listed 0", "Listed 1", "Listed 2"]
    index_dir = arch.cfg.archive.directory / "acme" / "2002-08" / "xapian"
    docs = {}

    def keep(aid, listing, _):
        docs[aid] = listing
        return aid.encode() + listing
    _rewrite_index_data(index_dir, keep)
    assert all(v.startswith(b"MTL1") for v in docs.values()) and set(want) <= set(docs)
    # Not one subject in clear in the index's document data.
    docdata = (index_dir / "docdata.glass").read_bytes()
    assert b"Listed" not in docdata and b"alice@globex.example" not in docdata

    # Listings moved to the wrong documents: they do not open there, verify
    # names each, and search shows the truth from the store.
    aids = sorted(docs)
    swap = {a: docs[aids[(i + 1) % len(aids)]] for i, a in enumerate(aids)}
    _rewrite_index_data(index_dir, lambda aid, listing, _: aid.encode() + swap[aid])
    assert {h["id"]: h for h in search(arch, "acme", "subject:listed")} == want
    p = cli(arch, "verify", "--tenant", "acme", check=1)
    assert p.stdout.decode().count("the index's listing is damaged") == len(aids)
    cli(arch, "reindex", "--tenant", "acme", check=0)
    cli(arch, "verify", "--tenant", "acme", check=0)

    # An index from before listings (the id alone): search reads the store.
    _rewrite_index_data(index_dir, lambda aid, listing, _: aid.encode())
    assert {h["id"]: h for h in search(arch, "acme", "subject:listed")} == want
    assert b"all good" in cli(arch, "verify", "--tenant", "acme", check=0).stderr


def test_backup_restore_bit_for_bit(arch):
    files = corpus_files()[::150]
    with arch.smtp() as s:
        for p in files:
            s.sendmail("alice@globex.example", ["bob@acme.example"], corpus_message(p))
    wait_archived(arch)
    arch.stop_daemon()                     # seals every changed shard and ships the seals
    root = arch.cfg.archive.directory
    st = Store(root, readonly=True)
    before = {(t, m): st.shard(t, m).dump() for t in st.tenants() for m in st.months(t)}
    st.close()
    assert sum(len(d["records"]) for d in before.values()) == 2 * len(files)
    shown = {}
    for (t, m), d in before.items():
        for k in list(d["records"])[:3]:
            shown[(t, k.hex())] = cli(arch, "show", "--tenant", t, k.hex(), check=0).stdout
    shutil.rmtree(root)
    cli(arch, "restore", check=0)
    cli(arch, "reindex", check=0)
    st = Store(root, readonly=True)
    after = {(t, m): st.shard(t, m).dump() for t in st.tenants() for m in st.months(t)}
    st.close()
    assert after == before
    for (t, aid), raw in shown.items():
        assert cli(arch, "show", "--tenant", t, aid, check=0).stdout == raw
    cli(arch, "verify", check=0)
    p = cli(arch, "restore")
    assert p.returncode == 1 and b"restore only into an empty store" in p.stderr


def test_no_plaintext_in_store_backup_or_logs(arch):
    files = corpus_files()[::60]
    subjects = []
    with arch.smtp() as s:
        for p in files:
            raw = corpus_message(p)
            s.sendmail("alice@globex.example", ["bob@acme.example"], raw)
            for line in raw.split(b"\r\n"):
                if line.startswith(b"Subject: ") and len(line) > 24:
                    subjects.append(line[9:])
                    break
    wait_archived(arch)
    assert len(subjects) > 30
    assert search(arch, "acme", f"subject:\"{subjects[0].decode('latin-1').split()[0]}\"", check=None) is not None
    blobs = {"lmdb": b"".join(p.read_bytes() for p in arch.cfg.archive.directory.rglob("*.mdb")),
             "backup": b"".join(p.read_bytes() for p in arch.cfg.archive.backup_directory.rglob("*")
                                if p.is_file()),
             "log": arch.log().encode("utf-8", "replace")}
    for where, blob in blobs.items():
        assert len(blob) > 1000
        leaked = [s for s in subjects if s in blob]
        assert leaked == [], where


def test_import_mbox_maildir_and_eml(arch, tmp_path):
    import mailbox
    files = corpus_files()[:12]
    raws = [corpus_message(p) for p in files]
    mb = mailbox.mbox(tmp_path / "box.mbox")
    for r in raws[:4]:
        mb.add(r.replace(b"\r\n", b"\n"))
    mb.close()
    md = mailbox.Maildir(tmp_path / "Maildir", create=True)
    for r in raws[4:8]:
        md.add(r)
    md.close()
    (tmp_path / "eml").mkdir()
    for i, r in enumerate(raws[8:]):
        (tmp_path / "eml" / f"{i}.eml").write_bytes(r)
    (tmp_path / "eml" / "dup.eml").write_bytes(raws[9])
    p = cli(arch, "import", "--tenant", "globex", str(tmp_path / "box.mbox"), str(tmp_path / "Maildir"),
            str(tmp_path / "eml"), str(tmp_path / "missing.mbox"))
    out = p.stdout.decode()
    assert p.returncode == 1, (out, p.stderr)
    assert "12 imported, 1 duplicate(s), 0 set aside, 1 skipped" in out
    assert "missing.mbox: no such file or directory" in out
    # Maildir and .eml bytes are kept exactly; mbox messages as mailbox gives them.
    st = Store(arch.cfg.archive.directory, readonly=True)
    keys = keys_of(arch)
    try:
        for r in raws[4:]:
            aid = keys.archive_id("globex", r)
            assert st.shard("globex", st.locate("globex", aid)).get(aid, keys)[0] == r
    finally:
        st.close()


def test_searchable_within_5s_of_250_under_steady_load(arch):
    """The issue's promise, measured per message under a steady load of
    four senders for 20 s: every probe message is found by search within
    5 s of its 250."""
    import threading
    stop = time.monotonic() + 20
    errors = []

    def load(k):
        try:
            with arch.smtp() as s:
                i = 0
                while time.monotonic() < stop:
                    s.sendmail("alice@globex.example", ["bob@acme.example"],
                               msg(f"Load {k} {i}", body="steady load\r\n" * 200))
                    i += 1
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=load, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    late = []
    probes = 0
    with arch.smtp() as s:
        while time.monotonic() < stop - 2:
            probes += 1
            token = f"probe{probes}x{int(time.time())}"
            s.sendmail("alice@globex.example", ["bob@acme.example"], msg(f"Probe {token}"))
            acked = time.monotonic()
            while True:
                if search(arch, "acme", f"subject:{token}"):
                    break
                if time.monotonic() - acked > 5.0:
                    late.append(token)
                    break
                time.sleep(0.1)
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert probes >= 3 and late == []
