"""Retention against a real daemon (tests/harness/stack.py): a corpus of
real messages (SpamAssassin's easy ham) with their Date: and From:
rewritten to years ago, rules with minimums and maximums, a legal hold put
into lifecycle.db (protect.py's shape), and the run through the API and
`mailtresor retention` over the daemon's socket.

Checked: the dry run deletes nothing and lists exactly the set the run then
deletes; the run deletes exactly the expected messages and none under the
hold or a minimum; a changed rule applies to mail archived long before;
`mailtresor verify` passes after the deletions; one audit record per run
(dry runs too) and one per rule change, the rule's addresses/query only in
the encrypted terms; who may do what (a user or an admin cannot change
rules: 403; another tenant's rule: 404); bad rules are a 400 naming the
problem; a hold placed during a run wins over the batches still to come."""

from __future__ import annotations

import email.utils
import json
import re
import subprocess
import sys
import time

import pytest
from twisted.internet import defer

from mailtresor.access.auth import open_databases
from mailtresor.keys.client import control_fetcher
from mailtresor.lifecycle import retention
from mailtresor.lifecycle.state import open_for

from tests.conftest import REPO, corpus_files, corpus_message
from tests.harness.stack import Stack
from tests.harness.web import api_login, wait_archived

PW = {n: f"{n}-password-1" for n in ("alice", "aud", "adm", "gaud")}
YEAR = 365.25 * 86400
NOW = time.time()

# name -> (sender, years ago): what the corpus becomes.
CORPUS = {
    "news-old-1": ("news@lists.example", 9),
    "news-old-2": ("news@lists.example", 9),
    "news-3y": ("digest@lists.example", 3),
    "news-recent": ("news@lists.example", 1),
    "news-held": ("news@lists.example", 9),
    "other-old": ("someone@other.example", 9),
    "other-recent": ("someone@other.example", 2),
    "invoice-old-1": ("billing@vendor.example", 9.1),
    "invoice-old-2": ("billing@vendor.example", 9.1),
    "invoice-recent": ("billing@vendor.example", 1),
}
RULES = {
    "newsletters": {"name": "Newsletters", "match": {"senders": ["lists.example"]}, "maximum": "2y"},
    "everything": {"name": "All mail", "maximum": "8y"},
    "invoices": {"name": "Invoices (HGB)", "match": {"senders": ["vendor.example"]}, "minimum": "10y"},
}
FIRST_RUN = {"news-old-1", "news-old-2", "news-3y", "other-old"}


def rewrite(raw: bytes, name: str, sender: str, years: float) -> bytes:
    """A corpus message with our From:, To:, Date:, Subject: and Message-ID."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    keep = []
    skip = False
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if not skip:
                keep.append(line)
            continue
        field = line.split(b":", 1)[0].strip().lower()
        skip = field in (b"from", b"to", b"cc", b"date", b"subject", b"message-id", b"received")
        if not skip:
            keep.append(line)
    date = email.utils.formatdate(NOW - years * YEAR, usegmt=True)
    ours = [f"From: {sender}", "To: team@acme.example", f"Date: {date}", f"Subject: {name}",
            f"Message-ID: <{name}@retention.test>"]
    return b"\r\n".join([h.encode() for h in ours] + keep) + sep + body


def cli(stack, *args):
    return subprocess.run([sys.executable, "-m", "mailtresor", "--config", str(stack.config_path), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("retention")
    # The daily job at a time far from now: this module runs retention by hand.
    far = time.gmtime(NOW + 12 * 3600)
    stack = Stack(d, {"archive": {"enabled": True}, "api": {"timeout": 30},
                      "lifecycle": {"run_at": f"{far.tm_hour:02d}:{far.tm_min:02d}"}}, milter=False)
    stack.start_control()
    users, _tokens = open_databases(stack.cfg, control_fetcher(stack.cfg))
    users.add("acme", "alice", PW["alice"], {"user"}, ["team@acme.example"])
    users.add("acme", "aud", PW["aud"], {"auditor"}, [])
    users.add("acme", "adm", PW["adm"], {"admin"}, [])
    users.add("globex", "gaud", PW["gaud"], {"auditor"}, [])
    stack.start_daemon()
    files = [p for p in corpus_files() if "easy-ham" in str(p)][:len(CORPUS)]
    with stack.smtp() as s:
        for path, (name, (sender, years)) in zip(files, CORPUS.items()):
            s.sendmail(sender, ["team@acme.example"], rewrite(corpus_message(path), name, sender, years))
    aud = api_login(stack, "acme", "aud", PW["aud"])
    got = wait_archived(aud, len(CORPUS), stack)
    ids = {r["subject"]: r["id"] for r in got["results"]}
    assert set(ids) == set(CORPUS), ids
    clients = {"aud": aud, "adm": api_login(stack, "acme", "adm", PW["adm"]),
               "alice": api_login(stack, "acme", "alice", PW["alice"]),
               "gaud": api_login(stack, "globex", "gaud", PW["gaud"])}
    db = open_for(stack.cfg, control_fetcher(stack.cfg))
    yield type("World", (), {"stack": stack, "ids": ids, "c": clients, "db": db, "rules": {}})
    for c in clients.values():
        c.close()
    stack.close()


def names(world, items) -> set[str]:
    back = {v: k for k, v in world.ids.items()}
    return {back[i["id"]] for i in items}


def present(world) -> set[str]:
    r = world.c["aud"].request("GET", "/api/v1/search?q=&limit=100")
    assert r.status == 200
    back = {v: k for k, v in world.ids.items()}
    return {back[x["id"]] for x in r.json()["results"]}


def test_bad_rules_are_refused_naming_the_problem(world):
    aud = world.c["aud"]
    for body, words in (({"name": "x"}, "minimum, a maximum"),
                        ({"name": "x", "minimum": "10y", "maximum": "7y"}, "longer than the maximum"),
                        ({"name": "x", "maximum": "7 years"}, "not a period"),
                        ({"name": "x", "maximum": "7y", "match": {"query": "subject:(unclosed"}}, "query"),
                        ({"name": "x", "maximum": "7y", "match": {"senders": ["a b"]}}, "no spaces"),
                        ({"name": "x" * 200, "maximum": "7y"}, "longer than 120"),
                        ({"name": "x", "maximum": "7y", "match": {"senders": ["a"] * 101}}, "more than 100"),
                        ({"name": "x", "maximum": "7y", "basis": "received"}, "basis"),
                        ({"name": "x", "maximum": "7y", "match": {"subject": ["a"]}}, "unknown field")):
        r = aud.request("POST", "/api/v1/retention/rules", body)
        assert r.status == 400 and words in r.json()["error"], (body, r.data)
    r = aud.request("POST", "/api/v1/retention/run", {})
    assert r.status == 400 and "dry_run" in r.json()["error"]
    assert aud.request("GET", "/api/v1/retention/rules").json()["rules"] == []


def test_roles_and_tenants(world):
    c = world.c
    body = {"name": "x", "maximum": "1d"}
    for who in ("alice", "adm"):
        r = c[who].request("POST", "/api/v1/retention/rules", body)
        assert r.status == 403, (who, r.data)
        assert c[who].request("POST", "/api/v1/retention/run", {"dry_run": True}).status == 403
        assert c[who].request("POST", "/api/v1/retention/preview", body).status == 403
    assert c["alice"].request("GET", "/api/v1/retention/rules").status == 403
    assert c["adm"].request("GET", "/api/v1/retention/rules").status == 200      # admins see why mail goes
    assert c["gaud"].request("GET", "/api/v1/retention/rules?tenant=acme").status == 404
    assert c["gaud"].request("POST", "/api/v1/retention/rules", {**body, "tenant": "acme"}).status == 404
    # The refusals are in the audit trail.
    recs = c["aud"].request("GET", "/api/v1/audit?tenant=acme&action=retention-rule&result=denied").json()
    assert {r["principal"] for r in recs["records"]} >= {"user:alice", "user:adm"}


def test_rules_preview_and_hold_mid_run(world):
    aud, ids = world.c["aud"], world.ids
    for key, body in RULES.items():
        r = aud.request("POST", "/api/v1/retention/rules", body)
        assert r.status == 201, r.data
        world.rules[key] = r.json()["rule"]["id"]
        assert r.json()["rule"]["created_by"] == "user:aud"
    # The last save's preview is the whole plan as the run will see it.
    p = r.json()["preview"]
    assert names(world, p["items"]["go"]) == FIRST_RUN | {"news-held"}
    assert names(world, p["items"]["kept"]) == {"invoice-old-1", "invoice-old-2"}
    assert all(i["why"][0]["kind"] == "minimum" and i["why"][0]["rule"] == world.rules["invoices"]
               for i in p["items"]["kept"])
    assert p["rule"]["keeps"] == 2
    # Another tenant's rule is "not found", for reading, changing and removing.
    rid = world.rules["newsletters"]
    g = world.c["gaud"]
    assert g.request("PUT", f"/api/v1/retention/rules/{rid}", RULES["newsletters"]).status == 404
    assert g.request("DELETE", f"/api/v1/retention/rules/{rid}").status == 404
    assert rid not in json.dumps(g.request("GET", "/api/v1/retention/rules").json())
    # A preview of a rule counted from the arrival: everything arrived today.
    r = aud.request("POST", "/api/v1/retention/preview", {**RULES["newsletters"], "basis": "arrival",
                                                           "id": rid})
    assert r.status == 200 and r.json()["preview"]["rule"]["go"] == 0, r.data
    assert "news-3y" not in names(world, r.json()["preview"]["items"]["go"])

    # A hold placed while a run is under way wins over the batches still to
    # come: a run in this process over the daemon's indexes, one message a
    # batch, whose "deleter" records the batches and, after the first,
    # places a hold on everything the plan has left.  (Nothing is deleted.)
    stack = world.stack
    def paths(t):
        months = sorted(p.name for p in (stack.cfg.archive.directory / t).iterdir()
                        if re.fullmatch(r"\d{4}-\d\d", p.name))
        return [str(stack.cfg.archive.directory / t / m / "xapian") for m in months]
    batches = []

    def exclusive(fn, tenant, victims):
        batches.append([v.aid for v in victims])
        if len(batches) == 1:
            def hold(sec):
                sec["holds"]["mid-run"] = {"name": "mid-run", "query": "from:lists.example OR from:other.example",
                                           "ids": [], "reason": "test", "by": "test", "at": NOW, "lifted": None}
            world.db.change("acme", hold)
        return defer.succeed(type("D", (), {"deleted": [(a, None) for a in batches[-1]], "missing": []})())
    ctx = retention.Context(lifecycle=world.db, paths=paths, blocking=lambda fn, *a: defer.succeed(fn(*a)),
                            exclusive=exclusive, audit=None)
    d = defer.ensureDeferred(retention.run(ctx, "acme", "test", dry_run=False, batch=1))
    rep = d.result
    assert len(batches) == 1 and rep["deleted"] == 1, batches
    kept_mid = [i for i in rep["items"]["kept"] if any(w.get("hold") == "mid-run" for w in i.get("why", []))]
    assert len(kept_mid) == len(FIRST_RUN | {"news-held"}) - 1
    world.db.change("acme", lambda sec: sec["holds"].pop("mid-run"))

    # A daemon that stops ends the run after the batch in hand.
    batches.clear()
    stop = retention.Context(lifecycle=world.db, paths=paths, blocking=ctx.blocking, audit=None,
                             exclusive=lambda fn, tenant, victims: batches.append(victims) or defer.succeed(
                                 type("D", (), {"deleted": [], "missing": []})()),
                             stopping=lambda: bool(batches))
    rep = defer.ensureDeferred(retention.run(stop, "acme", "test", dry_run=False, batch=2)).result
    assert len(batches) == 1 and len(batches[0]) == 2 and rep["deleted"] == 0
    # One run of a tenant at a time: a second, while the first waits for
    # the archiver, is refused (RunBusy: the API's 409) and deletes nothing.
    waiting = defer.Deferred()
    slow = retention.Context(lifecycle=world.db, paths=paths, blocking=ctx.blocking,
                             exclusive=lambda fn, tenant, victims: waiting, audit=None)
    first = defer.ensureDeferred(retention.run(slow, "acme", "test", dry_run=False))
    second = defer.ensureDeferred(retention.run(slow, "acme", "test", dry_run=True))
    assert isinstance(second.result.value, retention.RunBusy)
    second.addErrback(lambda f: None)
    waiting.callback(type("D", (), {"deleted": [], "missing": []})())
    assert first.called and first.result["deleted"] == 0


def test_dry_run_then_run_delete_exactly_the_expected(world):
    stack, ids = world.stack, world.ids
    # The legal hold, as holds.py will make it (protect.py's shape).
    world.db.change("acme", lambda sec: sec["holds"].__setitem__("case-1", {
        "name": "case-1", "query": "", "ids": [ids["news-held"]], "reason": "litigation", "by": "test",
        "at": NOW, "lifted": None}))
    p = cli(stack, "retention", "run", "--dry-run", "--tenant", "acme", "--json")
    assert p.returncode == 0, p.stderr
    dry = json.loads(p.stdout)["reports"][0]
    assert dry["dry_run"] and names(world, dry["items"]["go"]) == FIRST_RUN
    assert names(world, dry["items"]["kept"]) == {"news-held", "invoice-old-1", "invoice-old-2"}
    held = next(i for i in dry["items"]["kept"] if i["id"] == ids["news-held"])
    assert held["why"] == [{"kind": "hold", "hold": "case-1"}]
    assert present(world) == set(CORPUS), "the dry run deleted something"

    p = cli(stack, "retention", "run", "--tenant", "acme")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert out.startswith("acme: 4 messages deleted, 3 kept"), out
    assert 'rule "Newsletters"' in out and 'rule "All mail"' in out
    assert 'kept by legal hold "case-1": 1' in out and 'kept by the minimum of "Invoices (HGB)"' in out
    assert present(world) == set(CORPUS) - FIRST_RUN

    p = cli(stack, "verify", "--tenant", "acme")
    assert p.returncode == 0, (p.stdout, p.stderr)

    recs = world.c["aud"].request("GET", "/api/v1/audit?tenant=acme&action=retention").json()["records"]
    runs = [r for r in recs if r["action"] == "retention"]
    assert [r["detail"]["dry_run"] for r in runs[-2:]] == [True, False], runs
    last = runs[-1]["detail"]
    assert last["deleted"] == 4 and last["kept_by"]["holds"] == {"case-1": 1}
    assert last["kept_by"]["minimums"] == {world.rules["invoices"]: 2}
    assert last["rules"][world.rules["newsletters"]]["go"] == 3
    assert runs[-1]["principal"].startswith("local:")
    # Rule changes: one record each, addresses and queries only in the terms.
    rr = world.c["aud"].request("GET", "/api/v1/audit?tenant=acme&action=retention-rule&result=ok").json()
    adds = [r for r in rr["records"] if r["detail"]["op"] == "add"]
    assert len(adds) == 3
    assert "lists.example" not in json.dumps([r["detail"] for r in rr["records"]])
    assert any("lists.example" in (r.get("terms") or "") for r in adds)
    # The tombstones, read back from the store (the evidence report): each
    # names the shortest maximum that deleted it and who ran it; its digest
    # is the chain's.
    tombs = world.c["aud"].request("GET", "/api/v1/evidence?tenant=acme").json()["deletions"]["recent"]
    assert {t["id"] for t in tombs} >= {ids[n] for n in FIRST_RUN}
    for t in (t for t in tombs if t["id"] in {ids[n] for n in FIRST_RUN}):
        assert t["kind"] == "retention" and t["rule"] in world.rules.values() and t["by"].startswith("local:")
        assert t["chain"]["matches"] and len(t["record_sha256"]) == 64
    assert any(t["rule"] == world.rules["newsletters"] for t in tombs)


def test_a_changed_rule_applies_to_old_mail(world):
    aud, rid = world.c["aud"], world.rules["invoices"]
    r = aud.request("PUT", f"/api/v1/retention/rules/{rid}", {**RULES["invoices"], "minimum": "5y"})
    assert r.status == 200, r.data
    assert r.json()["rule"]["minimum"] == "5y" and r.json()["rule"]["changed_by"] == "user:aud"
    assert names(world, r.json()["preview"]["items"]["go"]) == {"invoice-old-1", "invoice-old-2"}
    r = aud.request("POST", "/api/v1/retention/run", {"dry_run": False})
    assert r.status == 200 and r.json()["deleted"] == 2, r.data
    assert present(world) == set(CORPUS) - FIRST_RUN - {"invoice-old-1", "invoice-old-2"}
    # The hold still keeps its message; the next run has nothing to do.
    assert r.json()["kept"] == 1
    r = aud.request("POST", "/api/v1/retention/run", {"dry_run": False})
    assert r.json()["deleted"] == 0 and r.json()["go"] == 0
    # Removing a rule: audited, gone from the list, and unknown afterwards.
    r = aud.request("DELETE", f"/api/v1/retention/rules/{world.rules['newsletters']}")
    assert r.status == 200
    assert aud.request("DELETE", f"/api/v1/retention/rules/{world.rules['newsletters']}").status == 404
    p = cli(world.stack, "retention", "rules", "--tenant", "acme")
    assert p.returncode == 0 and "2 rules" in p.stdout and "Newsletters" not in p.stdout, p.stdout
    p = cli(world.stack, "retention", "remove", "0123456789ab")
    assert p.returncode != 0 and "no retention rule" in p.stderr and "Traceback" not in p.stderr
    p = cli(world.stack, "retention", "add", "--tenant", "acme", "--name", "bad", "--minimum", "9y",
            "--maximum", "2y")
    assert p.returncode != 0 and p.stderr.count("\n") == 1 and "longer than the maximum" in p.stderr
    p = cli(world.stack, "verify", "--tenant", "acme")
    assert p.returncode == 0, (p.stdout, p.stderr)
    # The daily job is scheduled (once, with a callLater).
    assert re.search(r"lifecycle job: next run at \d{4}-\d\d-\d\d \d\d:\d\d UTC", world.stack.log())


def test_daily_job_schedules_skips_while_paused_and_runs_every_tenant(world, caplog):
    """The job in this process on a task.Clock, over the daemon's indexes
    and lifecycle.db (its deleter only records: nothing is left to delete)."""
    import logging
    from types import SimpleNamespace

    from twisted.internet import task

    from mailtresor.config import Lifecycle
    from mailtresor.lifecycle import job as jobmod

    day = 86400 * int(NOW // 86400)
    assert jobmod.next_run("03:00", day + 3 * 3600 - 1) == day + 3 * 3600
    assert jobmod.next_run("03:00", day + 3 * 3600) == day + 86400 + 3 * 3600
    assert jobmod.next_run("23:59", day) == day + 86400 - 60
    with pytest.raises(ValueError):
        jobmod.next_run("3 am", day)

    root = world.stack.cfg.archive.directory
    store = SimpleNamespace(
        months=lambda t, check=False: sorted(p.name for p in (root / t).iterdir()
                                             if re.fullmatch(r"\d{4}-\d\d", p.name)) if (root / t).is_dir() else [],
        index_paths=lambda t, months: [str(root / t / m / "xapian") for m in months])
    deleted = []
    archiver = SimpleNamespace(paused="disk full", store=store,
                               exclusive=lambda fn, *a, **kw: deleted.append(fn.__name__) or defer.succeed(None))
    api = SimpleNamespace(lifecycle=world.db, archiver=archiver, audit=None, core=None,
                          tenant_names=("acme", "globex"), run=lambda fn, *a, **kw: defer.succeed(fn(*a, **kw)))
    clock = task.Clock()
    clock.advance(day + 3 * 3600 - 10)
    job = jobmod.DailyJob(api, Lifecycle(run_at="03:00"), clock, clock=clock.seconds)
    job.start()
    [call] = clock.getDelayedCalls()
    assert call.getTime() == day + 3 * 3600
    caplog.set_level(logging.INFO, logger="mailtresor.lifecycle.job")
    clock.advance(10)                                   # 03:00, archiving paused: skipped, again in an hour
    assert "lifecycle job skipped: archiving is paused (disk full)" in caplog.text
    [call] = clock.getDelayedCalls()
    assert call.getTime() == day + 4 * 3600 and job.last is None
    archiver.paused = ""
    clock.advance(3600)
    when, results = job.last
    # Nothing to delete; then the compaction of closed months, on the archiver's thread.
    assert set(results) == {"acme", "globex"} and deleted == ["compact_closed"]
    assert results["acme"]["kept"] == 1 and results["acme"]["kept_by"]["holds"] == [{"hold": "case-1", "kept": 1}]
    assert "retention acme: 0 deleted by 0 rule(s), 1 kept (legal hold 1, minimum 0)" in caplog.text
    assert "retention globex: 0 deleted by 0 rule(s), 0 kept" in caplog.text
    [call] = clock.getDelayedCalls()                    # tomorrow, 03:00
    assert call.getTime() == day + 86400 + 3 * 3600
    job.stop()
    assert clock.getDelayedCalls() == []
