"""GDPR subject access (Art. 15/20), Art. 30 records and the evidence report,
against a real daemon (tests/harness/stack.py) with a local RFC 3161 TSA
(tests/test_tsa.py's), real TLS, real LMDB/Xapian and the real trail.

The archive: acme mail where subj@acme.example is the sender, a Cc and
only an envelope recipient (a Bcc), mail of a near-miss address
(xsubj@acme.example), a globex message naming subj@acme.example, and one
acme message deleted through archive/deleter.py (the daemon stopped, the
store opened here, as the archiver's exclusive() would run it) so that
evidence has a tombstone to show."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import types
import zipfile
from email.message import EmailMessage
from pathlib import Path

import pytest

from mailtresor import config as configmod
from mailtresor.access.auth import open_databases
from mailtresor.access.core import mbox_messages
from mailtresor.keys.client import control_fetcher
from mailtresor.lifecycle import gdpr, state

from tests.harness.stack import Stack
from tests.harness.web import api_login, wait_archived
from tests.test_tsa import local_tsa  # noqa: F401 - the module's TSA fixture

REPO = Path(__file__).resolve().parent.parent
PW = {n: f"{n}-password-1" for n in ("aud", "aud2", "alice", "adm", "gaud")}
SUBJ = "subj@acme.example"


def mail(frm, to, subject, *, cc=None, date="Fri, 01 Mar 2024 10:00:00 +0000", body=None) -> bytes:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"], m["Date"] = frm, to, subject, date
    if cc:
        m["Cc"] = cc
    m["Message-ID"] = f"<{subject.replace(' ', '.')}@test>"
    m.set_content(body or f"The body of {subject}.\nFrom the start of a line: nothing.\n")
    return m.as_bytes()


@pytest.fixture(scope="module")
def world(tmp_path_factory, local_tsa):  # noqa: F811 - the fixture imported above
    url, ca = local_tsa
    d = tmp_path_factory.mktemp("gdpr")
    stack = Stack(d, {"archive": {"enabled": True, "seal_interval": 0.5, "tsa_url": url, "tsa_ca_file": str(ca)},
                      "tenant": [{"name": "acme", "domains": ["acme.example"], "controller": "ACME GmbH",
                                  "contact": "dpo@acme.example"},
                                 {"name": "globex", "domains": ["globex.example"]}]}, milter=False)
    stack.start_control()
    users, _tokens = open_databases(stack.cfg, control_fetcher(stack.cfg))
    users.add("acme", "aud", PW["aud"], {"auditor"}, [])
    users.add("acme", "aud2", PW["aud2"], {"auditor"}, [])
    users.add("acme", "alice", PW["alice"], {"user"}, ["alice@acme.example"])
    users.add("acme", "adm", PW["adm"], {"admin"}, [])
    users.add("globex", "gaud", PW["gaud"], {"auditor"}, [])
    stack.start_daemon()
    with stack.smtp() as s:
        s.sendmail(SUBJ, ["bob@acme.example"], mail(SUBJ, "bob@acme.example", "from subj",
                                                    date="Wed, 01 Jan 2020 10:00:00 +0000",
                                                    body="From here on: a line an mbox must quote.\n"))
        s.sendmail("bob@acme.example", ["carol@acme.example", SUBJ],
                   mail("bob@acme.example", "carol@acme.example", "cc subj", cc=SUBJ))
        s.sendmail("bob@acme.example", ["carol@acme.example", SUBJ],
                   mail("bob@acme.example", "carol@acme.example", "bcc subj"))
        s.sendmail("bob@acme.example", ["xsubj@acme.example"],
                   mail("bob@acme.example", "xsubj@acme.example", "near miss"))
        s.sendmail("bob@acme.example", ["dave@acme.example"],
                   mail("bob@acme.example", "dave@acme.example", "to be deleted"))
        s.sendmail("hank@globex.example", ["gina@globex.example"],
                   mail(SUBJ, "gina@globex.example", "globex names subj"))
    aud = api_login(stack, "acme", "aud", PW["aud"])
    gaud = api_login(stack, "globex", "gaud", PW["gaud"])
    rows = wait_archived(aud, 5, stack)["results"]
    grows = wait_archived(gaud, 1, stack)["results"]
    ids = {r["subject"]: r["id"] for r in rows + grows}
    # Seals (0.5 s after the last change) with their time stamps.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if "sealed at chain entry" in stack.log() and "time stamp" in stack.log():
            break
    time.sleep(1.0)

    # One deletion, with its tombstone, as the archiver's exclusive() runs it.
    stack.stop_daemon()
    from mailtresor.archive.deleter import Victim, delete_messages
    from mailtresor.archive.store import Store
    store = Store(stack.cfg.archive.directory)
    try:
        pipeline = types.SimpleNamespace(store=store, backup=None, _dirty={}, clock=time.time,
                                         _seal_due=lambda: None)
        gone = delete_messages(pipeline, "acme", [Victim(ids["to be deleted"], None, {
            "kind": "request", "request": "r1", "by": "user:aud", "reason": "Art. 17 erasure", "at": time.time()})])
        assert [a for a, _ in gone.deleted] == [ids["to be deleted"]]
    finally:
        store.close()

    # A rule and holds straight into lifecycle.db (shapes: lifecycle/protect.py).
    db = state.open_for(stack.cfg, control_fetcher(stack.cfg))
    now = time.time()

    def setup(sec):
        sec["rules"]["r-max"] = {"id": "r-max", "name": "subject's mail 2y", "basis": "date",
                                 "match": {"senders": [SUBJ]}, "minimum": None, "maximum": "2y"}
        sec["rules"]["r-min"] = {"id": "r-min", "name": "all mail 10y", "basis": "date", "match": {},
                                 "minimum": "10y", "maximum": None}
        sec["holds"]["case-7"] = {"name": "case-7", "query": "", "ids": [ids["cc subj"]], "reason": "litigation",
                                  "by": "user:aud", "at": now, "lifted": None}
        sec["holds"]["old-case"] = {"name": "old-case", "query": "from:bob@acme.example", "ids": [],
                                    "reason": "audit 2023", "by": "user:aud", "at": now - 100,
                                    "lifted": {"by": "user:aud2", "at": now - 50, "reason": "settled"}}
    db.change("acme", setup)
    stack.start_daemon()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:      # logins wait for the access key
        try:
            aud = api_login(stack, "acme", "aud", PW["aud"])
            break
        except AssertionError:
            time.sleep(0.2)
    gaud = api_login(stack, "globex", "gaud", PW["gaud"])
    yield types.SimpleNamespace(stack=stack, aud=aud, gaud=gaud, ids=ids)
    stack.close()


def _job_file(client, job) -> bytes:
    deadline = time.monotonic() + 30
    while job["state"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
        job = client.request("GET", f"/api/v1/exports/{job['id']}").json()
    assert job["state"] == "done", job
    r = client.request("GET", f"/api/v1/exports/{job['id']}/download")
    assert r.status == 200
    return r.data


def _raw(client, aid) -> bytes:
    r = client.request("GET", f"/api/v1/messages/{aid}/raw")
    assert r.status == 200, r.data
    return r.data


def test_subject_access_zip_has_exactly_the_subjects_mail_byte_identical_with_the_report(world):
    ids, aud = world.ids, world.aud
    mine = [ids["from subj"], ids["cc subj"], ids["bcc subj"]]
    raws = {aid: _raw(aud, aid) for aid in mine}          # also: downloads the report must list
    r = aud.request("POST", "/api/v1/gdpr/subject-access", {"address": "Subj@ACME.example", "format": "zip"})
    assert r.status == 202, r.data
    ans = r.json()
    assert ans["messages"] == 3 and ans["report"]["subject"] == SUBJ
    z = zipfile.ZipFile(io.BytesIO(_job_file(aud, ans["export"])))
    emls = {n[:-4] for n in z.namelist() if n.endswith(".eml")}
    assert emls == set(mine)                               # not the near miss, not globex's, not the deleted one
    for aid in mine:
        assert z.read(f"{aid}.eml") == raws[aid]           # byte for byte as stored
    manifest = json.loads(z.read("manifest.json"))
    assert {f["file"] for f in manifest["files"]} == {"report.json", "report.txt", "report.html"}
    rep = json.loads(z.read("report.json"))
    assert rep["controller"] == {"tenant": "acme", "name": "ACME GmbH", "contact": "dpo@acme.example"}
    assert rep["messages"]["count"] == 3 and rep["messages"]["first"].startswith("2020-01-01")
    rules = {x["rule"]: x for x in rep["retention"]}
    assert rules["r-max"]["matches"] == 1 and rules["r-max"]["deleted"]["first"].startswith("2022-01-01")
    assert rules["r-min"]["matches"] == 3 and rules["r-min"]["kept_until"]["first"].startswith("2030-01-01")
    assert rep["holds"] == {"count": 1, "names": ["case-7"]}          # the lifted hold covers nothing
    seen = {(a["principal"], a["object"]) for a in rep["accesses"]["records"] if a["action"] == "download"}
    assert {("user:aud", aid) for aid in mine} <= seen
    assert all(a["object"] in mine for a in rep["accesses"]["records"])
    text = z.read("report.txt").decode()
    assert "ACME GmbH" in text and "case-7" in text and "subject's mail 2y" in text
    html = z.read("report.html").decode()
    assert "<script" not in html and "ACME GmbH" in html


def test_subject_access_mbox_round_trips(world):
    ids, aud = world.ids, world.aud
    r = aud.request("POST", "/api/v1/gdpr/subject-access", {"address": SUBJ, "format": "mbox"})
    assert r.status == 202, r.data
    data = _job_file(aud, r.json()["export"])
    got = mbox_messages(data)
    want = [_raw(aud, ids[s]) for s in ("from subj", "cc subj", "bcc subj")]      # oldest first
    assert sorted(got) == sorted(want)


@pytest.mark.parametrize("address", ["*@acme.example", "subj*", "from:subj@acme.example", "subj@acme.*",
                                     "(subj@acme.example)", "\"subj@acme.example\""])
def test_an_address_is_one_literal_address_not_a_query(world, address):
    r = world.aud.request("POST", "/api/v1/gdpr/subject-access", {"address": address, "format": "zip"})
    if r.status == 400:
        assert r.json()["error"]
        return
    assert r.status == 202, r.data
    assert r.json()["messages"] == 0, address


@pytest.mark.parametrize("address", ["subj@acme.example OR bob@acme.example", "Subj <subj@acme.example>",
                                     "", "no-at-sign", "a@b@", "x" * 400 + "@acme.example", "subj@acme.example\nBcc: x@y.example", "subj@acme\u202e.example"])
def test_bad_addresses_are_refused_with_a_reason(world, address):
    r = world.aud.request("POST", "/api/v1/gdpr/subject-access", {"address": address, "format": "zip"})
    assert r.status == 400 and r.json()["error"] and "Traceback" not in r.json()["error"]


def test_format_is_checked(world):
    r = world.aud.request("POST", "/api/v1/gdpr/subject-access", {"address": SUBJ, "format": "pdf"})
    assert r.status == 400 and "format" in r.json()["error"]


def test_another_tenant_finds_nothing_of_theirs(world):
    aud, gaud, ids = world.aud, world.gaud, world.ids
    r = aud.request("POST", "/api/v1/gdpr/subject-access", {"address": "gina@globex.example", "format": "zip"})
    assert r.status == 202 and r.json()["messages"] == 0
    z = zipfile.ZipFile(io.BytesIO(_job_file(aud, r.json()["export"])))
    assert not [n for n in z.namelist() if n.endswith(".eml")]
    # globex's auditor asking about subj@acme.example sees globex's mail only.
    r = gaud.request("POST", "/api/v1/gdpr/subject-access", {"address": SUBJ, "format": "zip"})
    assert r.status == 202 and r.json()["messages"] == 1
    z = zipfile.ZipFile(io.BytesIO(_job_file(gaud, r.json()["export"])))
    assert [n for n in z.namelist() if n.endswith(".eml")] == [f"{ids['globex names subj']}.eml"]
    # ... and its report lists no acme access, rule or hold.
    rep = json.loads(z.read("report.json"))
    assert rep["retention"] == [] and rep["holds"]["count"] == 0 and rep["accesses"]["count"] == 0
    r = gaud.request("POST", "/api/v1/gdpr/subject-access", {"address": SUBJ, "format": "zip", "tenant": "acme"})
    assert r.status == 404
    assert gaud.request("GET", "/api/v1/gdpr/records?tenant=acme").status == 404
    assert gaud.request("GET", "/api/v1/evidence?tenant=acme").status == 404


def test_users_and_admins_are_refused_and_audited(world):
    alice = api_login(world.stack, "acme", "alice", PW["alice"])
    adm = api_login(world.stack, "acme", "adm", PW["adm"])
    for c in (alice, adm):
        assert c.request("POST", "/api/v1/gdpr/subject-access", {"address": SUBJ}).status == 403
        assert c.request("GET", "/api/v1/gdpr/records").status == 403
    assert alice.request("GET", "/api/v1/evidence").status == 403
    assert adm.request("GET", "/api/v1/evidence").status == 200          # evidence shows no mail
    recs = world.aud.request("GET", "/api/v1/audit?action=gdpr&result=denied&limit=100").json()["records"]
    assert {r["principal"] for r in recs} >= {"user:alice", "user:adm"}


def test_the_address_is_kept_encrypted_in_the_trail(world):
    aud = world.aud
    assert aud.request("POST", "/api/v1/gdpr/subject-access", {"address": SUBJ, "format": "zip"}).status == 202
    recs = aud.request("GET", "/api/v1/audit?action=gdpr&result=ok&limit=100").json()["records"]
    mine = [r for r in recs if (r.get("detail") or {}).get("op") == "subject-access"]
    assert mine and all(r["terms"] for r in mine)            # decrypted for the auditor
    assert any(r["terms"] == SUBJ for r in mine)
    assert all(SUBJ not in json.dumps(r.get("detail")) for r in mine)
    # On disk: no record holds the address in clear.
    for p in Path(world.stack.cfg.audit.directory).glob("audit-*.log"):
        assert SUBJ.encode() not in p.read_bytes(), p


def test_records_of_processing_reflect_the_configuration(world):
    doc = world.aud.request("GET", "/api/v1/gdpr/records").json()
    assert doc["controller"] == {"tenant": "acme", "name": "ACME GmbH", "contact": "dpo@acme.example"}
    measures = {m["measure"]: m for m in doc["measures"]}
    assert measures["trusted time stamps (RFC 3161)"]["on"] is True
    assert measures["backup"]["on"] is True
    roles = {r["recipient"]: r["count"] for r in doc["recipients"]}
    assert roles["the tenant's auditors"] == 2 and roles["the tenant's users"] == 1
    assert any("keys only" in r["what"] for r in doc["recipients"])
    assert any("subject's mail 2y" in t and "2y" in t for t in doc["retention"])
    assert doc["transfers"] == []
    # The same configuration without a TSA or a backup says so.
    cfg = configmod.load(world.stack.config_path)
    import dataclasses
    off = dataclasses.replace(cfg, archive=dataclasses.replace(cfg.archive, tsa_url="", backup_directory=None))
    m = {x["measure"]: x for x in gdpr.records(off, "acme", roles={}, section={}, now=0)["measures"]}
    assert m["trusted time stamps (RFC 3161)"]["on"] is False and m["backup"]["on"] is False
    assert "records" in gdpr.records_text(doc).lower() and "ACME GmbH" in gdpr.records_text(doc)


def test_evidence_lists_seals_tombstones_holds_key_releases_and_verify(world):
    r = world.aud.request("GET", "/api/v1/evidence?verify=1")
    assert r.status == 200, r.data
    ev = r.json()
    sealed = [s for s in ev["shards"] if s["seal"]]
    assert sealed, ev["shards"]
    assert all(len(s["seal"]["key"]) == 64 for s in sealed)
    assert any(s["seal"]["tsa"] and "GMT" in s["seal"]["tsa"]["time"] for s in sealed), sealed
    tomb = [t for t in ev["deletions"]["recent"] if t["id"] == world.ids["to be deleted"]]
    assert tomb and tomb[0]["kind"] == "request" and tomb[0]["request"] == "r1" and tomb[0]["by"] == "user:aud"
    assert tomb[0]["chain"]["matches"] is True and tomb[0]["record_sha256"]
    assert ev["deletions"]["by"] == {"request:r1": 1}
    holds = {h["name"]: h for h in ev["holds"]}
    assert holds["old-case"]["lifted"] == {"by": "user:aud2", "at": holds["old-case"]["lifted"]["at"],
                                           "reason": "settled"}
    assert holds["case-7"]["lifted"] is None and holds["old-case"]["query"] is True
    assert "from:bob" not in r.data.decode()            # a hold's query stays out of the evidence
    assert any(k["object"] == "tenant.acme" for k in ev["key_releases"])
    assert ev["verify"]["sound"] is True, ev["verify"]
    assert ev["verify"]["timestamps_checked"] >= 1          # against [archive] tsa_ca_file
    assert {s["shard"] for s in ev["verify"]["shards"]} == {s["shard"] for s in ev["shards"]}
    recs = world.aud.request("GET", "/api/v1/audit?action=evidence&limit=100").json()["records"]
    assert any((x.get("detail") or {}).get("verify") is True and x["detail"]["sound"] is True for x in recs)


def test_verify_finds_a_tampered_shard(world):
    """The verify the evidence runs is the real one: a changed chain entry fails it."""
    from mailtresor.lifecycle import evidence
    from mailtresor.archive.store import Store
    import shutil
    import tempfile
    tmp = Path(tempfile.mkdtemp(prefix="gdpr-tamper-"))
    try:
        src = Path(world.stack.cfg.archive.directory) / "acme"
        month = sorted(p.name for p in src.iterdir() if p.name[:4].isdigit())[0]
        shutil.copytree(src / month, tmp / "acme" / month)
        store = Store(tmp)
        shard = store.shard("acme", month)
        with shard.env.begin(write=True) as txn:
            k, v = next(iter(txn.cursor(db=shard.chain)))
            txn.put(k, bytes(v[:-1]) + bytes([v[-1] ^ 1]), db=shard.chain)
        import threading
        res = evidence.run_verify(store=store, store_lock=threading.Lock(), keys=None, tenant="acme")
        store.close()
        assert res["sound"] is False and res["problem_count"] >= 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cli(stack, *args):
    return subprocess.run([sys.executable, "-m", "mailtresor", "--config", str(stack.config_path), *args],
                          cwd=REPO, capture_output=True, timeout=300)


def test_cli_subject_access_records_and_evidence(world, tmp_path):
    out = tmp_path / "sa.zip"
    p = _cli(world.stack, "gdpr", "subject-access", SUBJ, "--tenant", "acme", "-o", str(out))
    assert p.returncode == 0, p.stderr
    z = zipfile.ZipFile(out)
    assert len([n for n in z.namelist() if n.endswith(".eml")]) == 3 and "report.txt" in z.namelist()
    p = _cli(world.stack, "gdpr", "subject-access", "a b", "--tenant", "acme", "-o", str(tmp_path / "x"))
    assert p.returncode != 0 and b"Traceback" not in p.stderr and b"mail address" in p.stderr
    p = _cli(world.stack, "gdpr", "records", "--tenant", "acme")
    assert p.returncode == 0 and b"ACME GmbH" in p.stdout and b"RFC 3161" in p.stdout
    p = _cli(world.stack, "evidence", "--tenant", "acme", "--verify")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert b"Verify" in p.stdout and b"PASS" in p.stdout and b"RFC 3161 time" in p.stdout
    assert b"request:r1" in p.stdout
    p = _cli(world.stack, "evidence", "--json")
    assert p.returncode == 0 and {d["tenant"] for d in json.loads(p.stdout)} == {"acme", "globex"}
    p = _cli(world.stack, "evidence", "--tenant", "nope")
    assert p.returncode != 0 and b"Traceback" not in p.stderr


@pytest.mark.parametrize("extra, fmt", [
    ({"manifest.json": b"{}"}, "zip"),                         # would replace the manifest
    ({"../evil.txt": b"x"}, "zip"), ({"dir/report.txt": b"x"}, "zip"), ({".hidden": b"x"}, "zip"),
    ({"7607ccfaa5d5e88b7ee42c82c95247a8254ed4b6.eml": b"x"}, "zip"),   # would shadow a message
    ({"report.txt": "not bytes"}, "zip"),
    ({"report.txt": b"x"}, "mbox"),                            # an mbox carries messages only
])
def test_extra_files_of_an_export_are_plain_names_in_a_zip_only(tmp_path, extra, fmt):
    from mailtresor.access.audit import AuditLog
    from mailtresor.access.core import BadRequest, Core
    from mailtresor.access.principal import Principal
    audit = AuditLog(tmp_path / "audit", None)
    core = Core(store=None, keys=None, audit=audit, exports_dir=tmp_path / "exports", tenants=["acme"])
    who = Principal(kind="user", name="aud", tenant="acme", roles=frozenset({"auditor"}))
    try:
        with pytest.raises(BadRequest, match="extra files"):
            core.export_start(who, ids=["7607ccfaa5d5e88b7ee42c82c95247a8254ed4b6"], format=fmt, extra=extra)
    finally:
        audit.close(seal=False)


def test_verify_checks_time_stamps_against_the_configured_ca(world, tmp_path):
    """A seal's RFC 3161 token that does not verify against the CA named is
    a problem (here: the stack's own CA, which did not issue the TSA's)."""
    import shutil
    import threading
    from mailtresor.archive.store import Store
    from mailtresor.lifecycle import evidence
    src = Path(world.stack.cfg.archive.directory) / "acme"
    for m in (p.name for p in src.iterdir() if p.name[:4].isdigit()):
        shutil.copytree(src / m, tmp_path / "acme" / m)
    store = Store(tmp_path)
    try:
        good = evidence.run_verify(store=store, store_lock=threading.Lock(), keys=None, tenant="acme",
                                   tsa_ca_file=world.stack.cfg.archive.tsa_ca_file)
        bad = evidence.run_verify(store=store, store_lock=threading.Lock(), keys=None, tenant="acme",
                                  tsa_ca_file=world.stack.pki / "ca.pem")
    finally:
        store.close()
    assert good["timestamps_checked"] >= 1
    assert not [p for p in good["problems"] if "time stamp" in p], good
    assert any("time stamp does not verify" in p for p in bad["problems"]), bad
