"""Legal holds and four-eyes deletion requests, against a real daemon.

One daemon (tests/harness/stack.py) with two tenants; acme has two
auditors (aud, aud2), a user (alice) and an admin; globex an auditor.
Holds by query (covering mail that arrives later) and by ids, who may
place, see and lift them, hold:NAME in the search (and that users cannot
probe for it), the holds in the message view, and the four-eyes flow with
every refusal: the requester deciding, a hold, a retention minimum (a rule
put straight into lifecycle.db, protect.py's shape), approval deleting
(verify passes after) and rejection; every step in the audit trail; the
CLI over the daemon's socket.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.parse
from email.message import EmailMessage
from pathlib import Path

import pytest

from mailtresor.access.auth import open_databases
from mailtresor.keys.client import control_fetcher
from mailtresor.lifecycle.state import open_for

from tests.harness.stack import Stack
from tests.harness.web import api_login, wait_archived

REPO = Path(__file__).resolve().parents[1]
PW = {n: f"{n}-password-1" for n in ("alice", "aud", "aud2", "adm", "gaud")}


def mail(sender, to, subject, date="Fri, 01 Mar 2024 10:00:00 +0000") -> bytes:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"], m["Date"] = sender, to, subject, date
    m["Message-ID"] = f"<{subject.replace(' ', '.')}@test>"
    m.set_content(f"The body of {subject}.\n")
    return m.as_bytes()


def cli(stack, *args, check=None):
    p = subprocess.run([sys.executable, "-m", "mailtresor", "--config", str(stack.config_path), *args],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    if check is not None:
        assert p.returncode == check, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    return p


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("holds")
    stack = Stack(d, {"archive": {"enabled": True}, "api": {"timeout": 20}}, milter=False)
    stack.start_control()
    users, _tokens = open_databases(stack.cfg, control_fetcher(stack.cfg))
    users.add("acme", "alice", PW["alice"], {"user"}, ["alice@acme.example"])
    users.add("acme", "aud", PW["aud"], {"auditor"}, [])
    users.add("acme", "aud2", PW["aud2"], {"auditor"}, [])
    users.add("acme", "adm", PW["adm"], {"admin"}, [])
    users.add("globex", "gaud", PW["gaud"], {"auditor"}, [])
    stack.start_daemon()
    with stack.smtp() as s:
        for sender, to, subject, date in (
                ("bob@acme.example", "alice@acme.example", "alpha project kickoff", None),
                ("bob@acme.example", "dave@acme.example", "beta budget", None),
                ("carol@acme.example", "dave@acme.example", "gamma minutes", None),
                ("carol@acme.example", "dave@acme.example", "delta notes", None),
                ("old@acme.example", "dave@acme.example", "ledger 2020", "Wed, 01 Jul 2020 10:00:00 +0000"),
                ("hank@globex.example", "gina@globex.example", "globex alpha", None)):
            s.sendmail(sender, [to], mail(sender, to, subject, *(d for d in [date] if d)))
    c = {n: api_login(stack, "globex" if n == "gaud" else "acme", n, PW[n]) for n in PW}
    found = wait_archived(c["aud"], 5, stack)
    wait_archived(c["gaud"], 1, stack)
    ids = {r["subject"]: r["id"] for r in found["results"]}
    ids["globex alpha"] = c["gaud"].request("GET", "/api/v1/search?q=").json()["results"][0]["id"]
    yield type("World", (), {"stack": stack, "c": c, "ids": ids})
    for x in c.values():
        x.close()
    stack.close()


def post(client, path, body=None):
    return client.request("POST", path, body)


def audit(world, action, **match) -> list[dict]:
    """acme's audit records of ACTION whose fields (or detail fields) match."""
    r = world.c["aud"].request("GET", "/api/v1/audit?" + urllib.parse.urlencode({"action": action, "limit": 1000}))
    assert r.status == 200, r.data
    out = []
    for rec in r.json()["records"]:
        flat = {**rec, **(rec.get("detail") or {})}
        if all(flat.get(k) == v for k, v in match.items()):
            out.append(rec)
    return out


def search(client, q) -> dict:
    return client.request("GET", "/api/v1/search?" + urllib.parse.urlencode({"q": q, "limit": 100}))


# --- holds ---------------------------------------------------------------------------------

def test_hold_by_query_covers_mail_that_arrives_later(world):
    aud = world.c["aud"]
    r = post(aud, "/api/v1/holds", {"name": "case-alpha", "reason": "litigation Alpha v. Acme",
                                    "query": "subject:alpha"})
    assert r.status == 201, r.data
    assert r.getheader("Location") == "/api/v1/holds/case-alpha"
    assert r.json()["by"] == "aud" and r.json()["lifted"] is None
    assert aud.request("GET", "/api/v1/holds/case-alpha").json()["covers"] == 1
    # Mail that arrives after the hold and matches its query is covered.
    with world.stack.smtp() as s:
        s.sendmail("bob@acme.example", ["dave@acme.example"],
                   mail("bob@acme.example", "dave@acme.example", "alpha followup"))
    found = wait_archived(aud, 6, world.stack)
    world.ids.update({x["subject"]: x["id"] for x in found["results"]})
    assert aud.request("GET", "/api/v1/holds/case-alpha").json()["covers"] == 2
    got = search(aud, "hold:case-alpha").json()
    assert {x["subject"] for x in got["results"]} == {"alpha project kickoff", "alpha followup"}
    # ... and protected: a deletion request for it is refused (protect.held asked at approval).
    r = post(aud, "/api/v1/deletion-requests", {"reason": "erasure", "ids": [world.ids["alpha followup"]]})
    assert r.status == 201, r.data
    rid = r.json()["id"]
    shown = aud.request("GET", f"/api/v1/deletion-requests/{rid}").json()
    assert shown["would_refuse"] == {world.ids["alpha followup"]: [{"kind": "hold", "hold": "case-alpha"}]}
    r = post(world.c["aud2"], f"/api/v1/deletion-requests/{rid}/approve")
    assert r.status == 200, r.data
    assert r.json()["state"] == "refused"
    assert r.json()["decision"]["refusals"] == {world.ids["alpha followup"]: [{"kind": "hold", "hold": "case-alpha"}]}
    assert aud.request("GET", f"/api/v1/messages/{world.ids['alpha followup']}").status == 200
    assert audit(world, "deletion-request", object=rid, op="refuse", holds=["case-alpha"])
    assert not audit(world, "deletion", request=rid)
    # A refused request is decided: it cannot be approved again.
    assert post(world.c["aud2"], f"/api/v1/deletion-requests/{rid}/approve").status == 409


def test_hold_by_ids_and_what_is_refused(world):
    aud, ids = world.c["aud"], world.ids
    r = post(aud, "/api/v1/holds", {"name": "case.beta_1", "reason": "tax audit", "ids": [ids["beta budget"]]})
    assert r.status == 201, r.data
    assert aud.request("GET", "/api/v1/holds/case.beta_1").json()["covers"] == 1
    assert aud.request("GET", f"/api/v1/messages/{ids['beta budget']}").json()["holds"] == ["case.beta_1"]
    for body, status, words in (
            ({"name": "x", "reason": "r", "ids": ["0" * 40, "f" * 40]}, 400, "2 id(s) are not messages of this tenant"),
            ({"name": "x", "reason": "r", "ids": [ids["globex alpha"]]}, 400, "not messages of this tenant"),
            ({"name": "x", "reason": "r", "ids": ["nope"]}, 400, "is not an archive id"),
            ({"name": "x", "reason": "r", "query": "subject:(alpha"}, 400, "bad query: unbalanced parentheses"),
            ({"name": "x", "reason": "r", "query": "hold:case-alpha"}, 400, "cannot name a hold"),
            ({"name": "x", "reason": "r"}, 400, "needs a query, ids, or both"),
            ({"name": "x", "reason": " ", "query": "beta"}, 400, "a reason is required"),
            ({"name": "bad name!", "reason": "r", "query": "beta"}, 400, "1 to 64 letters"),
            ({"name": "case-alpha", "reason": "r", "query": "beta"}, 409, "already a hold named 'case-alpha'")):
        r = post(aud, "/api/v1/holds", body)
        assert r.status == status, (body, r.data)
        if words:
            assert words in r.json()["error"], r.json()
    # A bad query is audited as that, its text only encrypted (the reason
    # the caller gets quotes it).
    r = post(aud, "/api/v1/holds", {"name": "x", "reason": "r", "query": "date:2031-77"})
    assert r.status == 400 and "2031-77" in r.json()["error"]
    assert audit(world, "hold", object="x", op="place", result="failed", reason="bad query")
    trail = b"".join(f.read_bytes() for f in Path(world.stack.cfg.audit.directory).rglob("*") if f.is_file())
    assert b"2031-77" not in trail
    # A bounded list of the unknown ids.
    r = post(aud, "/api/v1/holds", {"name": "x", "reason": "r", "ids": [f"{i:040x}" for i in range(1, 30)]})
    assert r.status == 400 and "and 19 more" in r.json()["error"]
    assert [h["name"] for h in aud.request("GET", "/api/v1/holds").json()["holds"]] == ["case.beta_1", "case-alpha"]


def test_only_auditors_place_and_lift_and_other_tenants_see_nothing(world):
    c = world.c
    body = {"name": "case-user", "reason": "r", "query": "beta"}
    assert post(c["alice"], "/api/v1/holds", body).status == 403
    assert post(c["adm"], "/api/v1/holds", body).status == 403
    assert audit(world, "hold", principal="user:alice", result="denied")
    assert audit(world, "hold", principal="user:adm", result="denied")
    assert c["alice"].request("GET", "/api/v1/holds").status == 403
    assert c["adm"].request("GET", "/api/v1/holds").status == 200          # an admin sees why mail is kept
    assert post(c["adm"], "/api/v1/holds/case-alpha/lift", {"reason": "x"}).status == 403
    # Another tenant's auditor: not found, whether it exists or not.
    assert c["gaud"].request("GET", "/api/v1/holds/case-alpha").status == 404
    assert c["gaud"].request("GET", "/api/v1/holds?tenant=acme").status == 404
    assert post(c["gaud"], "/api/v1/holds/case-alpha/lift", {"reason": "x"}).status == 404
    assert c["gaud"].request("GET", "/api/v1/holds").json()["holds"] == []
    assert c["aud"].request("GET", "/api/v1/holds/case-alpha").json()["lifted"] is None


def test_lifting_is_audited_kept_and_the_name_not_reused(world):
    aud = world.c["aud"]
    assert post(aud, "/api/v1/holds", {"name": "case-gamma", "reason": "r", "query": "gamma OR zebrafinch"}
                ).status == 201
    assert post(aud, "/api/v1/holds/case-gamma/lift", {"reason": ""}).status == 400
    assert post(aud, "/api/v1/holds/no-such/lift", {"reason": "x"}).status == 404
    r = post(world.c["aud2"], "/api/v1/holds/case-gamma/lift", {"reason": "case settled"})
    assert r.status == 200, r.data
    lifted = r.json()["lifted"]
    assert lifted["by"] == "aud2" and lifted["reason"] == "case settled" and lifted["covered"] == 1
    assert post(aud, "/api/v1/holds/case-gamma/lift", {"reason": "again"}).status == 409
    r = post(aud, "/api/v1/holds", {"name": "case-gamma", "reason": "r", "query": "delta"})
    assert r.status == 409 and "lifted" in r.json()["error"]
    got = aud.request("GET", "/api/v1/holds/case-gamma").json()
    assert got["lifted"]["by"] == "aud2" and got["covers"] == 0
    assert search(aud, "hold:case-gamma").json()["total"] == 0
    placed = audit(world, "hold", object="case-gamma", op="place", principal="user:aud", result="ok")
    assert placed and placed[0]["terms"] == "gamma OR zebrafinch"     # decrypted for the auditor
    rec = audit(world, "hold", object="case-gamma", op="lift", principal="user:aud2", result="ok")
    assert rec and rec[0]["detail"]["covered"] == 1
    # The hold's query is in the trail encrypted only, never in clear.
    trail = b"".join(f.read_bytes() for f in Path(world.stack.cfg.audit.directory).rglob("*") if f.is_file())
    assert b"zebrafinch" not in trail


def test_hold_search_for_auditors_and_not_for_users(world):
    aud, alice = world.c["aud"], world.c["alice"]
    r = search(aud, "hold:no-such-case")
    assert r.status == 400 and r.json()["error"] == "bad query: no hold named no-such-case"
    assert search(aud, "hold:case.beta_1").json()["total"] == 1
    assert search(aud, "hold:case-alpha AND from:bob@acme.example").json()["total"] == 2
    # A user: hold: is no field -- the same answer for a hold that exists
    # and one that does not, as for any unknown field; no error naming it.
    for q in ("hold:case-alpha", "hold:no-such-case", "nosuchfield:case-alpha"):
        r = search(alice, q)
        assert r.status == 200 and r.json()["total"] == 0, (q, r.data)
    # Alice's own message is under case-alpha, but her view does not say so.
    m = alice.request("GET", f"/api/v1/messages/{world.ids['alpha project kickoff']}").json()
    assert "holds" not in m
    assert aud.request("GET", f"/api/v1/messages/{world.ids['alpha project kickoff']}").json()["holds"] == \
        ["case-alpha"]
    assert aud.request("GET", f"/api/v1/messages/{world.ids['delta notes']}").json()["holds"] == []


# --- four-eyes deletion --------------------------------------------------------------------

def test_the_requester_cannot_decide(world):
    aud = world.c["aud"]
    r = post(aud, "/api/v1/deletion-requests", {"reason": "Art. 17 erasure", "ids": [world.ids["delta notes"]]})
    assert r.status == 201, r.data
    rid = r.json()["id"]
    r = post(aud, f"/api/v1/deletion-requests/{rid}/approve")
    assert r.status == 403 and "four eyes" in r.json()["error"]
    r = post(aud, f"/api/v1/deletion-requests/{rid}/reject", {"reason": "changed my mind"})
    assert r.status == 403 and "four eyes" in r.json()["error"]
    assert audit(world, "deletion-request", object=rid, op="approve", result="denied", principal="user:aud")
    # Users and admins decide nothing; another tenant's auditor does not see it.
    assert post(world.c["alice"], f"/api/v1/deletion-requests/{rid}/approve").status == 403
    assert post(world.c["adm"], f"/api/v1/deletion-requests/{rid}/approve").status == 403
    assert post(world.c["gaud"], f"/api/v1/deletion-requests/{rid}/approve").status == 404
    assert world.c["gaud"].request("GET", f"/api/v1/deletion-requests/{rid}").status == 404
    assert post(world.c["alice"], "/api/v1/deletion-requests", {"reason": "x", "ids": [world.ids["delta notes"]]}
                ).status == 403
    assert aud.request("GET", f"/api/v1/deletion-requests/{rid}").json()["state"] == "pending"
    # Rejected by another auditor, with a reason.
    assert post(world.c["aud2"], f"/api/v1/deletion-requests/{rid}/reject", {"reason": " "}).status == 400
    r = post(world.c["aud2"], f"/api/v1/deletion-requests/{rid}/reject", {"reason": "legal says keep"})
    assert r.status == 200 and r.json()["state"] == "rejected"
    assert r.json()["decision"]["by"] == "aud2" and r.json()["decision"]["reason"] == "legal says keep"
    assert audit(world, "deletion-request", object=rid, op="reject", result="ok", principal="user:aud2")
    assert aud.request("GET", f"/api/v1/messages/{world.ids['delta notes']}").status == 200


def test_refused_under_a_retention_minimum(world):
    db = open_for(world.stack.cfg, control_fetcher(world.stack.cfg))
    rule = {"id": "r-hgb", "name": "HGB 10 years", "basis": "date", "match": {"senders": ["old@acme.example"]},
            "minimum": "10y", "maximum": None}
    db.change("acme", lambda section: section["rules"].__setitem__(rule["id"], rule))
    aud, aud2 = world.c["aud"], world.c["aud2"]
    r = post(aud, "/api/v1/deletion-requests", {"reason": "erasure", "query": "from:old@acme.example"})
    assert r.status == 201, r.data
    assert r.json()["ids"] == [world.ids["ledger 2020"]] and r.json()["query"] == "from:old@acme.example"
    rid = r.json()["id"]
    r = post(aud2, f"/api/v1/deletion-requests/{rid}/approve")
    assert r.status == 200 and r.json()["state"] == "refused", r.data
    (why,) = r.json()["decision"]["refusals"][world.ids["ledger 2020"]]
    assert why["kind"] == "minimum" and why["rule"] == "r-hgb" and why["name"] == "HGB 10 years"
    assert time.gmtime(why["until"]).tm_year == 2030
    assert aud.request("GET", f"/api/v1/messages/{world.ids['ledger 2020']}").status == 200
    assert audit(world, "deletion-request", object=rid, op="refuse", rules=["r-hgb"])


def test_bad_requests(world):
    aud = world.c["aud"]
    for body, words in (({"reason": "x"}, 'either "ids" or "query"'),
                        ({"reason": "x", "ids": [world.ids["beta budget"]], "query": "beta"}, "either"),
                        ({"reason": "", "ids": [world.ids["beta budget"]]}, "a reason is required"),
                        ({"reason": "x", "ids": ["0" * 40]}, "not messages of this tenant"),
                        ({"reason": "x", "query": "zzzznothing"}, "matches no message"),
                        ({"reason": "x", "query": "date:2024-13"}, "bad query"),
                        ({"reason": "x", "ids": []}, "at least one")):
        r = post(aud, "/api/v1/deletion-requests", body)
        assert r.status == 400 and words in r.json()["error"], (body, r.data)
    assert aud.request("GET", "/api/v1/deletion-requests/ffffffffffff").status == 404
    assert aud.request("GET", "/api/v1/deletion-requests/..").status == 404
    assert aud.request("GET", "/api/v1/deletion-requests?state=odd").status == 400


def test_approval_deletes_with_tombstones_and_verify_passes(world):
    aud, aud2, ids = world.c["aud"], world.c["aud2"], world.ids
    before = search(aud, "").json()["total"]
    r = post(aud, "/api/v1/deletion-requests", {"reason": "Art. 17 erasure of carol", "ids": [ids["gamma minutes"]]})
    rid = r.json()["id"]
    assert aud.request("GET", f"/api/v1/deletion-requests/{rid}").json()["would_refuse"] == {}
    r = post(aud2, f"/api/v1/deletion-requests/{rid}/approve")
    assert r.status == 200, r.data
    assert r.json()["state"] == "approved"
    assert r.json()["decision"]["deleted"] == 1 and r.json()["decision"]["by"] == "aud2"
    assert aud.request("GET", f"/api/v1/messages/{ids['gamma minutes']}").status == 404
    assert search(aud, "").json()["total"] == before - 1
    assert [x["id"] for x in aud.request("GET", "/api/v1/deletion-requests?state=approved").json()["requests"]] \
        == [rid]
    rec = audit(world, "deletion", object=rid, result="ok")
    assert rec and rec[0]["principal"] == "user:aud2" and rec[0]["detail"]["deleted"] == 1
    assert audit(world, "deletion-request", object=rid, op="approve", result="ok", principal="user:aud2")
    assert audit(world, "deletion-request", object=rid, op="request", result="ok", principal="user:aud")
    p = cli(world.stack, "verify", "--tenant", "acme")
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-2000:])
    # The tombstone, read back from the store (the evidence report): what,
    # by which request, by whom, why -- and its digest is the chain's.
    ev = aud.request("GET", "/api/v1/evidence").json()["deletions"]["recent"]
    (tomb,) = [t for t in ev if t["id"] == ids["gamma minutes"]]
    assert (tomb["kind"], tomb["request"], tomb["by"], tomb["reason"]) == \
        ("request", rid, "user:aud2", "Art. 17 erasure of carol")
    assert tomb["chain"]["matches"] and len(tomb["record_sha256"]) == 64


# --- the command line (the daemon's socket: a local principal, four eyes too) ----------------

def test_cli(world):
    s, ids = world.stack, world.ids
    p = cli(s, "hold", "place", "case-cli", "--tenant", "acme", "--reason", "cli case", "--id", ids["delta notes"],
            check=0)
    assert "case-cli" in p.stdout
    # `mailtresor search` through the daemon: the local principal sees holds.
    p = cli(s, "search", "--tenant", "acme", "--json", "hold:case-alpha", check=0)
    assert {x["subject"] for x in json.loads(p.stdout)["results"]} == {"alpha project kickoff", "alpha followup"}
    p = cli(s, "hold", "list", "--tenant", "acme", check=0)
    assert "case-cli" in p.stdout and "case-alpha" in p.stdout
    p = cli(s, "hold", "show", "case-cli", "--tenant", "acme", check=0)
    assert "covers 1" in p.stdout
    p = cli(s, "hold", "place", "case-bad", "--tenant", "acme", "--reason", "r", "--query", "subject:(x", check=2)
    assert "bad query" in p.stderr and "Traceback" not in p.stderr
    p = cli(s, "hold", "lift", "case-cli", "--tenant", "acme", check=2)       # --reason is required
    p = cli(s, "hold", "lift", "case-cli", "--tenant", "acme", "--reason", "done", check=0)
    assert "lifted" in p.stdout
    p = cli(s, "deletion", "request", "--tenant", "acme", "--reason", "erasure", "--id", ids["delta notes"], check=0)
    rid = p.stdout.split()[2]
    p = cli(s, "deletion", "show", rid, "--tenant", "acme", check=0)
    assert "pending" in p.stdout
    # The same local principal cannot approve its own request.
    p = cli(s, "deletion", "approve", rid, "--tenant", "acme", check=1)
    assert "four eyes" in p.stderr
    p = cli(s, "deletion", "list", "--tenant", "acme", check=0)
    assert rid in p.stdout
    r = post(world.c["aud2"], f"/api/v1/deletion-requests/{rid}/reject", {"reason": "keep"})
    assert r.status == 200
    p = cli(s, "deletion", "reject", rid, "--tenant", "acme", "--reason", "x", check=1)
    assert "rejected, not pending" in p.stderr


# --- the pure parts ------------------------------------------------------------------------

def test_the_hold_field_exists_only_where_the_caller_resolves_it():
    from mailtresor.archive import index
    from mailtresor.lifecycle import holds, requests

    # Without a resolver "hold:" is words, as any unknown field is.
    assert str(index.parse_query("hold:case-1")) == \
        str(index.parse_query("nosuchfield:case-1")).replace("nosuchfield@", "hold@")

    def resolve(name):
        if name != "case-1":
            raise index.QueryError(f"no hold named {name}")
        return holds.hold_query({"name": name, "query": "from:a@b.example", "ids": ["ab" * 20], "lifted": None})
    q = str(index.parse_query("hold:case-1 date:2024", resolvers={"hold": resolve}))
    assert "XFROMa@b.example" in q and "Q" + "ab" * 20 in q
    with pytest.raises(index.QueryError, match="no hold named case-2"):
        index.parse_query("hold:case-2", resolvers={"hold": resolve})
    with pytest.raises(ValueError):
        index.parse_query("x", resolvers={"from": resolve})         # no shadowing of the index's fields
    import xapian
    assert str(holds.hold_query({"name": "x", "query": "a", "ids": [], "lifted": {"by": "b"}})) == \
        str(xapian.Query.MatchNothing)                              # a lifted hold covers nothing
    assert requests.same_person("Aud", "aud") and not requests.same_person("aud", "aud2")
    for bad in ("", "a" * 65, "a b", "x/y", "ä", None):
        with pytest.raises(holds.LifecycleError):
            holds.check_name(bad)


def test_a_request_left_deleting_can_be_approved_again_later(tmp_path):
    """A daemon stopped between the decision and the deletion's end leaves
    the request "deleting": after STALE_DELETING it may be approved again
    (still not by its requester); before, it is decided."""
    import secrets
    import threading

    from mailtresor.lifecycle import requests
    from mailtresor.lifecycle.holds import LifecycleError
    from mailtresor.lifecycle.state import LifecycleDB

    db = LifecycleDB(tmp_path / "lifecycle.db", secrets.token_bytes(32))
    core = type("Core", (), {"_store_lock": threading.Lock(),
                             "store": type("Store", (), {"has_archive": lambda self, t: False})()})()
    req = {"id": "abc123", "ids": ["ab" * 20], "query": "", "reason": "r", "by": "aud", "at": 0.0,
           "state": "pending", "decision": None}
    db.change("acme", lambda s: s["requests"].__setitem__("abc123", req))
    assert requests.decide(db, core, "acme", "abc123", by="aud2", now=100.0)["state"] == "deleting"
    with pytest.raises(LifecycleError, match="deleting, not pending"):
        requests.decide(db, core, "acme", "abc123", by="aud2", now=200.0)
    later = 100.0 + requests.STALE_DELETING + 1
    with pytest.raises(LifecycleError, match="four eyes"):
        requests.decide(db, core, "acme", "abc123", by="AUD", now=later)
    assert requests.decide(db, core, "acme", "abc123", by="aud3", now=later)["decision"]["by"] == "aud3"
    with pytest.raises(LifecycleError, match="deleting, not pending"):
        requests.reject(db, "acme", "abc123", by="aud3", reason="x", now=later)
