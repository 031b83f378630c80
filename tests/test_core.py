"""The access core over a real archive: a daemon archives mail that came in
over the relay for two tenants; the core searches, reads and exports it for
every kind of principal, and writes one audit record per call."""

import base64
import hashlib
import json
import subprocess
import sys
import zipfile
from email.utils import getaddresses

import pytest

from mailtresor.access import core as coremod
from mailtresor.access.audit import AuditLog
from mailtresor.access.core import BadRequest, Core, Forbidden, NotFound
from mailtresor.access.principal import Principal
from mailtresor.archive import index
from mailtresor.archive.store import Store
from tests.conftest import REPO
from tests.harness import hostile
from tests.harness.stack import Stack
from tests.test_archive import keys_of, wait_archived

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


def plain(subject, frm, to, *, date="Thu, 22 Aug 2002 10:00:00 +0000", body="Hello there.\r\n", extra=""):
    return (f"From: {frm}\r\nTo: {to}\r\nSubject: {subject}\r\nDate: {date}\r\n"
            f"Message-ID: <{hashlib.sha1(subject.encode()).hexdigest()[:12]}@test>\r\n{extra}\r\n{body}").encode()


def with_attachment(subject, frm, to, data=b"%PDF-1.4 not really\r\n", name="report.pdf"):
    return (f"From: {frm}\r\nTo: {to}\r\nSubject: {subject}\r\nDate: Fri, 07 Mar 2003 09:00:00 +0000\r\n"
            f"Message-ID: <att-{hashlib.sha1(subject.encode()).hexdigest()[:8]}@test>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XYZ\r\n\r\n"
            "--XYZ\r\nContent-Type: text/plain\r\n\r\nsee the report\r\n"
            f"--XYZ\r\nContent-Type: application/pdf; name={name}\r\n"
            f"Content-Disposition: attachment; filename={name}\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            f"{base64.b64encode(data).decode()}\r\n--XYZ--\r\n").encode()


def hostile_html(subject, frm, to):
    markup = hostile.html_attacks()
    return (f"From: {frm}\r\nTo: {to}\r\nSubject: {subject}\r\nDate: Sat, 08 Mar 2003 09:00:00 +0000\r\n"
            "Message-ID: <html-1@test>\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/related; boundary=REL\r\n\r\n"
            "--REL\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
            f"{markup}\r\n"
            "--REL\r\nContent-Type: image/png\r\nContent-ID: <logo@test>\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n"
            f"{base64.b64encode(PNG).decode()}\r\n--REL--\r\n").encode()


# What goes in, and to which tenants (routing: by envelope domains).
MAILS = {
    # acme only
    "figures": ("carol@acme.example", ["dave@acme.example"],
                plain("Quarterly figures 7f3a", "Carol <carol@acme.example>", "dave@acme.example")),
    # hidden@acme.example is only in the envelope (a Bcc)
    "bcc": ("carol@acme.example", ["dave@acme.example", "hidden@acme.example"],
            plain("Board minutes", "Carol <carol@acme.example>", "dave@acme.example")),
    "report": ("erin@acme.example", ["frank@acme.example"],
               with_attachment("Annual report", "Erin <erin@acme.example>", "frank@acme.example")),
    "html": ("mallory@acme.example", ["frank@acme.example"],
             hostile_html("Newsletter", "Mallory <mallory@acme.example>", "frank@acme.example")),
    "fromline": ("carol@acme.example", ["frank@acme.example"],
                 plain("Mbox quoting", "carol@acme.example", "frank@acme.example",
                       body="First line\r\nFrom the start\r\n>From quoted\r\n>>From twice\r\nend\r\n")),
    # globex only
    "globex": ("gina@globex.example", ["hank@globex.example"],
               plain("Globex secret plans", "gina@globex.example", "hank@globex.example",
                     date="Mon, 01 Jan 2024 12:00:00 +0000")),
}


# Through acme's journaling connector: a journal report around this original,
# jill a Bcc recipient reached through the list staff@.
JOURNALED = plain("Merger talk", "Zed <zed@globex.example>", "amy@acme.example",
                  date="Tue, 02 Jan 2024 08:00:00 +0000")
ACME = [k for k in MAILS if k != "globex"] + ["journal"]


@pytest.fixture(scope="module")
def arch(tmp_path_factory):
    d = tmp_path_factory.mktemp("core")
    s = Stack(d / "stack", {"archive": {"enabled": True}})
    s.start()
    try:
        with s.smtp() as c:
            for frm, rcpts, raw in MAILS.values():
                c.sendmail(frm, rcpts, raw)
        from tests.harness.journalgen import make_report
        report = make_report(JOURNALED, sender="zed@globex.example",
                             recipients=[("to", "amy@acme.example", None),
                                         ("bcc", "jill@acme.example", "Expanded: staff@acme.example")])
        with s.smtp(implicit=True, cert="client-exchange-acme") as c:
            c.sendmail("", ["journal@archive.test"], report)
        wait_archived(s)
        s.stop_daemon()
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def world(arch, tmp_path_factory):
    d = tmp_path_factory.mktemp("access")
    keys = keys_of(arch)
    store = Store(arch.cfg.archive.directory, readonly=True)
    audit = AuditLog(d / "audit", keys)
    core = Core(store=store, keys=keys, audit=audit, exports_dir=d / "exports",
                tenants=["acme", "globex"], export_max=1000)
    ids = {}
    for name, (_, _, raw) in MAILS.items():
        tenant = "globex" if name == "globex" else "acme"
        ids[name] = keys.archive_id(tenant, raw)
    ids["journal"] = keys.archive_id("acme", JOURNALED)
    yield core, ids, audit, d
    core.wait_exports()
    audit.close()
    store.close()


def P(kind="user", name="u", tenant="acme", roles=(), scopes=(), addresses=()):
    return Principal(kind=kind, name=name, tenant=tenant, roles=frozenset(roles), scopes=frozenset(scopes),
                     addresses=frozenset(addresses), client="192.0.2.1")


AUDITOR = P(name="aud", roles=["auditor"])
ADMIN = P(name="adm", roles=["admin"])
APPADMIN = P(name="root", tenant=None, roles=["appliance-admin"])
LOCAL = P(kind="local", name="uid=0", tenant=None)
TOKEN = P(kind="token", name="tok1", scopes=["search"])
EXPORT_TOKEN = P(kind="token", name="tok2", scopes=["export"])
EVENTS_TOKEN = P(kind="token", name="tok3", scopes=["events"])
FRANK = P(name="frank", roles=["user"], addresses=["frank@acme.example"])
HIDDEN = P(name="hidden", roles=["user"], addresses=["hidden@acme.example"])
GLOBEX_AUDITOR = P(name="gaud", tenant="globex", roles=["auditor"])


def found(core, who, q, **kw):
    return {r["id"] for r in core.search(who, query=q, limit=200, **kw)["results"]}


# --- search ------------------------------------------------------------------------

def test_auditor_searches_whole_tenant_and_nothing_of_another(world):
    core, ids, _, _ = world
    acme = {ids[k] for k in ACME}
    assert found(core, AUDITOR, "") == acme
    assert found(core, GLOBEX_AUDITOR, "") == {ids["globex"]}
    assert found(core, AUDITOR, "secret plans") == set()
    with pytest.raises(NotFound):
        core.search(AUDITOR, tenant="globex", query="")
    with pytest.raises(NotFound):
        core.search(AUDITOR, tenant="nosuch", query="")


def test_local_principal_names_a_tenant(world):
    core, ids, _, _ = world
    with pytest.raises(BadRequest, match="name a tenant"):
        core.search(LOCAL, query="")
    with pytest.raises(NotFound):
        core.search(LOCAL, tenant="nosuch", query="")
    assert found(core, LOCAL, "", tenant="globex") == {ids["globex"]}


def test_row_fields(world):
    core, ids, _, _ = world
    rows = {r["id"]: r for r in core.search(AUDITOR, query="", limit=200)["results"]}
    r = rows[ids["report"]]
    assert r["subject"] == "Annual report" and r["from"] == "Erin <erin@acme.example>"
    assert r["date"] == "2003-03-07T09:00:00Z" and r["has_attachments"] is True
    assert rows[ids["figures"]]["has_attachments"] is False
    assert r["message_id"] == f"att-{hashlib.sha1(b'Annual report').hexdigest()[:8]}@test"
    assert isinstance(r["flags"], list) and isinstance(r["tags"], list)
    assert r["to"] == ["frank@acme.example"] and r["to_count"] == 1


def test_bare_address_finds_envelope_only_mail(world):
    core, ids, _, _ = world
    # hidden@acme.example is in no header: only in RCPT TO
    assert found(core, AUDITOR, "hidden@acme.example") == {ids["bcc"]}
    assert found(core, AUDITOR, "envelope:hidden@acme.example") == {ids["bcc"]}
    assert found(core, AUDITOR, "to:hidden@acme.example") == set()
    # a bare address still finds header addresses
    assert found(core, AUDITOR, "erin@acme.example") == {ids["report"]}
    assert found(core, AUDITOR, "address:erin@acme.example") == {ids["report"]}


def test_bare_address_query_parser():
    q = str(index.parse_query("alice@acme.example"))
    for prefix in ("XFROM", "XTO", "XCC", "XBCC", "XENV"):
        assert prefix + "alice@acme.example" in q
    # a prefixed or quoted address is left as it is
    assert "XTO" not in str(index.parse_query("from:alice@acme.example"))
    assert "XENV" not in str(index.parse_query('"alice@acme.example"'))
    assert "AND_NOT" in str(index.parse_query("hello -alice@acme.example"))


def test_user_scope_in_search(world):
    core, ids, _, _ = world
    assert found(core, FRANK, "") == {ids["report"], ids["html"], ids["fromline"]}
    assert found(core, HIDDEN, "") == {ids["bcc"]}
    assert found(core, FRANK, "Quarterly") == set()
    nobody = P(name="nobody", roles=["user"], addresses=[])
    assert found(core, nobody, "") == set()
    # the scope is a filter, not a rewrite: OR in the query does not escape it
    assert found(core, FRANK, "Quarterly OR report") == {ids["report"]}
    assert found(core, FRANK, "NOT frank@acme.example") == set()


def test_administrators_do_not_read_mail(world):
    core, ids, _, _ = world
    for who in (ADMIN, APPADMIN):
        with pytest.raises(Forbidden, match="administrators do not read mail"):
            core.search(who, query="")
        with pytest.raises(Forbidden):
            core.raw(who, ids["figures"])
    with pytest.raises(Forbidden):
        core.search(EVENTS_TOKEN, query="")
    both = P(name="admaud", roles=["admin", "auditor"])
    assert ids["figures"] in found(core, both, "")


def test_limits_orders_and_bad_queries(world):
    core, _, _, _ = world
    for limit in (0, 201, -1, "5", True):
        with pytest.raises(BadRequest, match="limit"):
            core.search(AUDITOR, query="", limit=limit)
    with pytest.raises(BadRequest, match="order"):
        core.search(AUDITOR, query="", order="random")
    with pytest.raises(BadRequest, match="bad query"):
        core.search(AUDITOR, query='"unbalanced')
    with pytest.raises(BadRequest, match="bad query"):
        core.search(AUDITOR, query="date:2002-13")


def test_orders_and_cursor_paging(world):
    core, ids, _, _ = world
    desc = [r["id"] for r in core.search(AUDITOR, query="", limit=200)["results"]]
    asc = [r["id"] for r in core.search(AUDITOR, query="", limit=200, order="date-asc")["results"]]
    assert asc == desc[::-1] or [r for r in asc] == sorted(asc, key=asc.index)   # dates may tie
    dates = [r["date"] for r in core.search(AUDITOR, query="", limit=200)["results"]]
    assert dates == sorted(dates, reverse=True)
    rel = core.search(AUDITOR, query="report", order="relevance")
    assert rel["results"][0]["id"] == ids["report"]
    # page by 2 through everything
    seen, cursor, pages = [], None, 0
    while True:
        page = core.search(AUDITOR, query="", limit=2, cursor=cursor)
        seen += [r["id"] for r in page["results"]]
        cursor = page["next_cursor"]
        pages += 1
        assert pages < 10
        if cursor is None:
            break
    assert seen == desc


def test_cursor_tampering(world):
    core, _, _, _ = world
    page = core.search(AUDITOR, query="", limit=1)
    cur = page["next_cursor"]
    raw = bytearray(base64.urlsafe_b64decode(cur + "=" * (-len(cur) % 4)))
    raw[7] ^= 1                                     # the offset
    forged = base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
    for bad in (forged, cur[:-2], "x" * 500, "!!!", cur + "AA"):
        with pytest.raises(BadRequest, match="bad cursor"):
            core.search(AUDITOR, query="", limit=1, cursor=bad)
    # another query, order or principal: the cursor is foreign
    with pytest.raises(BadRequest, match="bad cursor"):
        core.search(AUDITOR, query="report", limit=1, cursor=cur)
    with pytest.raises(BadRequest, match="bad cursor"):
        core.search(AUDITOR, query="", limit=1, cursor=cur, order="date-asc")
    with pytest.raises(BadRequest, match="bad cursor"):
        core.search(TOKEN, query="", limit=1, cursor=cur)
    # a cursor of another process (another key)
    other = Core(store=core.store, keys=core.keys, audit=core.audit, exports_dir=core.exports_dir,
                 tenants=["acme", "globex"])
    with pytest.raises(BadRequest, match="bad cursor"):
        other.search(AUDITOR, query="", limit=1, cursor=cur)


def test_facets_equal_brute_force_counts(world):
    core, ids, _, _ = world
    for who, q in ((AUDITOR, ""), (AUDITOR, "report OR figures"), (FRANK, "")):
        doc = core.search(who, query=q, limit=200, facets=True)
        facets = doc["facets"]
        assert set(facets) == {"year", "month", "sender_domain", "has_attachment", "tag", "flag"}
        expect = {k: {} for k in facets}
        for r in doc["results"]:
            m = core.message(who, r["id"])
            y, mo = r["date"][:4], r["date"][:7]
            expect["year"][y] = expect["year"].get(y, 0) + 1
            expect["month"][mo] = expect["month"].get(mo, 0) + 1
            dom = getaddresses([m["from"]])[0][1].rpartition("@")[2].lower()
            expect["sender_domain"][dom] = expect["sender_domain"].get(dom, 0) + 1
            h = "true" if m["attachments"] else "false"
            expect["has_attachment"][h] = expect["has_attachment"].get(h, 0) + 1
            for t in m["tags"]:
                expect["tag"][t] = expect["tag"].get(t, 0) + 1
            for f in r["flags"]:
                expect["flag"][f] = expect["flag"].get(f, 0) + 1
        assert facets == expect, (q, facets, expect)
        assert sum(facets["year"].values()) == doc["total"]


# --- one message -----------------------------------------------------------------------

def test_raw_is_byte_identical_to_show(world, arch):
    core, ids, _, _ = world
    for name, (_, _, sent) in MAILS.items():
        if name == "globex":
            continue
        raw = core.raw(AUDITOR, ids[name])
        p = subprocess.run([sys.executable, "-m", "mailtresor", "--config", str(arch.config_path), "show",
                            "--tenant", "acme", ids[name]], cwd=REPO, capture_output=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert raw == p.stdout


def test_message_metadata(world):
    core, ids, _, _ = world
    m = core.message(AUDITOR, ids["bcc"])
    assert m["id"] == ids["bcc"] and m["tenant"] == "acme"
    assert m["subject"] == "Board minutes" and m["to"] == ["dave@acme.example"]
    assert m["size"] == len(MAILS["bcc"][2])
    assert m["sha256"] == hashlib.sha256(MAILS["bcc"][2]).hexdigest()
    [env] = m["envelopes"]
    assert env["mail_from"] == "carol@acme.example"
    assert sorted(env["recipients"]) == ["dave@acme.example", "hidden@acme.example"]
    assert env["received_at"].endswith("Z")
    assert m["date"] == "2002-08-22T10:00:00Z"
    r = core.message(AUDITOR, ids["report"])
    assert r["attachments"] == [{"n": 1, "filename": "report.pdf", "content_type": "application/pdf",
                                 "size": len(b"%PDF-1.4 not really\r\n")}]
    assert isinstance(r["flags"], list) and isinstance(r["tags"], list)


def test_journal_recipients_and_scope(world):
    core, ids, _, _ = world
    aid = ids["journal"]
    assert core.raw(AUDITOR, aid) == JOURNALED            # the original, unwrapped
    m = core.message(AUDITOR, aid)
    assert m["journal_recipients"] == ["amy@acme.example", "jill@acme.example"]
    [env] = m["envelopes"]
    assert env["connector"] == "exchange-acme"
    assert {"address": "jill@acme.example", "expanded": "staff@acme.example"} in env["journal"]["recipients"]
    assert "journal" in m["tags"]
    # found by a bare address of a journal recipient, and of the expanded list
    assert found(core, AUDITOR, "jill@acme.example") == {aid}
    assert found(core, AUDITOR, "staff@acme.example") == {aid}
    jill = P(name="jill", roles=["user"], addresses=["JILL@acme.example"])
    assert found(core, jill, "") == {aid}
    assert core.message(jill, aid)["id"] == aid
    staff = P(name="staff", roles=["user"], addresses=["staff@acme.example"])
    assert core.raw(staff, aid) == JOURNALED


def test_attachment_text_and_html(world):
    core, ids, _, _ = world
    name, ctype, data = core.attachment(AUDITOR, ids["report"], 1)
    assert (name, ctype, data) == ("report.pdf", "application/pdf", b"%PDF-1.4 not really\r\n")
    for n in (0, 2, -1, "1"):
        with pytest.raises(NotFound):
            core.attachment(AUDITOR, ids["report"], n)
    text = core.text(AUDITOR, ids["report"])
    assert "Subject: Annual report" in text and "see the report" in text and "report.pdf" in text
    assert "<pre>" in core.html(AUDITOR, ids["figures"])


def test_html_is_sanitised(world):
    core, ids, _, _ = world
    out = core.html(AUDITOR, ids["html"])
    low = out.lower()
    for bad in ("<script", "javascript:", "onerror", "onload", "onclick", "<form", "<iframe", "<style",
                "url(", 'src="http', "<object", "<embed", "<svg", "<meta", "<link",
                "<base", "srcdoc", "vbscript:", "data:text/html", "style="):
        assert bad not in low, (bad, out)
    # the inline image is the message's own part, as a data: URI
    assert "data:image/png;base64," + base64.b64encode(PNG).decode() in out
    # links stay, inert towards the opener
    assert 'href="https://example.org/ok"' in out and 'rel="noopener noreferrer"' in out
    assert "visible text" in out


def test_html_sanitiser_generators():
    from mailtresor.access import render
    for markup in hostile.html_attack_list():
        out = render.sanitise(markup).lower()
        # (a link may point anywhere: it is followed only when clicked, without the opener)
        for bad in ("<script", "javascript:", " on", "<iframe", "<form", "<style", "url(", 'src="http',
                    "<input", "<meta", "<base", "<link", "background="):
            assert bad not in out, (markup, out)


def test_ids_path_tricks_and_other_tenants(world):
    core, ids, _, _ = world
    good = ids["figures"]
    for bad in ("../" + good[3:], good[:39], good + "0", good.upper()[:-1] + "g", "", "..", "/etc/passwd",
                good[:20] + "/" + good[21:], "0" * 40, None, 5):
        with pytest.raises(NotFound):
            core.raw(AUDITOR, bad)
        with pytest.raises(NotFound):
            core.message(AUDITOR, bad)
    # another tenant's id, asked as this tenant or naming the other tenant
    with pytest.raises(NotFound):
        core.raw(AUDITOR, ids["globex"])
    with pytest.raises(NotFound):
        core.raw(AUDITOR, ids["globex"], tenant="globex")
    with pytest.raises(NotFound):
        core.message(GLOBEX_AUDITOR, good)


def test_ids_are_taken_in_either_case(world):
    core, ids, _, _ = world
    assert core.raw(AUDITOR, ids["figures"].upper()) == MAILS["figures"][2]
    assert core.message(AUDITOR, ids["figures"].upper())["id"] == ids["figures"]


def test_user_cannot_read_others_mail_by_id(world):
    core, ids, _, _ = world
    assert core.raw(FRANK, ids["report"]) == MAILS["report"][2]
    assert core.raw(HIDDEN, ids["bcc"]) == MAILS["bcc"][2]     # envelope-only: still theirs
    for name in ("figures", "bcc", "globex"):
        for method in (core.raw, core.message, core.text, core.html):
            with pytest.raises(NotFound):
                method(FRANK, ids[name])
    with pytest.raises(NotFound):
        core.attachment(HIDDEN, ids["report"], 1)


# --- exports ---------------------------------------------------------------------------

def test_export_mbox_byte_identity(world):
    core, ids, _, _ = world
    job = core.export_start(AUDITOR, query="", format="mbox")
    assert job["total"] == len(ACME) and job["format"] == "mbox"
    core.wait_exports()
    st = core.export_status(AUDITOR, job["id"])
    assert st["state"] == "done" and st["done"] == len(ACME) and st["missing"] == 0
    path = core.export_path(AUDITOR, job["id"])
    assert path.stat().st_mode & 0o777 == 0o600
    data = path.read_bytes()
    assert st["size"] == len(data)
    msgs = coremod.mbox_messages(data)
    expect = {core.raw(AUDITOR, ids[k]) for k in ACME}
    assert set(msgs) == expect and len(msgs) == len(ACME)
    # the From line in the body was quoted on the way out
    assert b"\n>From the start\r\n>>From quoted\r\n>>>From twice\r\n" in data
    # Python's own reader agrees on the number of messages
    import mailbox
    assert len(mailbox.mbox(str(path))) == len(ACME)


def test_export_zip_manifest(world):
    core, ids, _, _ = world
    job = core.export_start(FRANK, ids=[ids["report"], ids["figures"], "0" * 40, "../x"], format="zip")
    core.wait_exports()
    st = core.export_status(FRANK, job["id"])
    assert st["state"] == "done" and st["missing"] == 3     # another's, unknown, malformed: alike
    with zipfile.ZipFile(core.export_path(FRANK, job["id"])) as z:
        manifest = json.loads(z.read("manifest.json"))
        [m] = manifest["messages"]
        assert m["id"] == ids["report"] and z.read(m["file"]) == core.raw(FRANK, ids["report"])
        assert m["sha256"] == hashlib.sha256(z.read(m["file"])).hexdigest()
        assert m["envelopes"][0]["recipients"] == ["frank@acme.example"]
        assert manifest["missing"] == 3


def test_export_is_per_principal_and_bounded(world):
    core, ids, _, _ = world
    job = core.export_start(AUDITOR, query="report", format="zip")
    core.wait_exports()
    for other in (FRANK, GLOBEX_AUDITOR, TOKEN, P(name="aud2", roles=["auditor"])):
        with pytest.raises(NotFound):
            core.export_status(other, job["id"])
        with pytest.raises(NotFound):
            core.export_path(other, job["id"])
    for bad in ("../../etc/passwd", "0" * 32, None):
        with pytest.raises(NotFound):
            core.export_status(AUDITOR, bad)
    with pytest.raises(BadRequest, match="format"):
        core.export_start(AUDITOR, query="", format="pst")
    with pytest.raises(BadRequest, match="either"):
        core.export_start(AUDITOR, format="mbox")
    with pytest.raises(Forbidden, match="no export scope"):
        core.export_start(TOKEN, query="", format="mbox")       # a search-only token
    with pytest.raises(Forbidden, match="administrators do not read mail"):
        core.export_start(ADMIN, query="", format="mbox")
    job2 = core.export_start(EXPORT_TOKEN, query="report", format="mbox")
    assert job2["total"] == 1
    small = Core(store=core.store, keys=core.keys, audit=core.audit, exports_dir=core.exports_dir,
                 tenants=["acme", "globex"], export_max=2)
    with pytest.raises(BadRequest, match="over the export limit"):
        small.export_start(AUDITOR, query="", format="mbox")
    core.wait_exports()


def test_exports_expire(world, tmp_path):
    core, ids, _, _ = world
    now = [1000.0]
    c = Core(store=core.store, keys=core.keys, audit=core.audit, exports_dir=tmp_path / "ex",
             tenants=["acme", "globex"], clock=lambda: now[0])
    job = c.export_start(AUDITOR, ids=[ids["figures"]], format="mbox")
    c.wait_exports()
    path = c.export_path(AUDITOR, job["id"])
    now[0] += coremod.EXPORT_TTL + 1
    with pytest.raises(NotFound):
        c.export_status(AUDITOR, job["id"])
    assert not path.exists()


def test_export_list_is_the_callers_own_newest_first(world, tmp_path):
    core, ids, audit, _ = world
    now = [2000.0]
    c = Core(store=core.store, keys=core.keys, audit=audit, exports_dir=tmp_path / "ex",
             tenants=["acme", "globex"], clock=lambda: now[0])
    first = c.export_start(FRANK, ids=[ids["report"]], format="mbox")
    now[0] += 1
    second = c.export_start(FRANK, query="report", format="zip")
    now[0] += 1
    theirs = c.export_start(AUDITOR, query="", format="mbox")
    c.wait_exports()
    before = _records(audit)
    got = c.export_list(FRANK)["exports"]
    new = _records(audit)[len(before):]
    assert [(r["action"], r["result"], r["detail"]) for r in new] == [("export", "ok", {"list": True})]
    assert [j["id"] for j in got] == [second["id"], first["id"]]
    assert got[0]["query"] == "report" and got[1]["query"] is None and got[1]["total"] == 1
    assert all(j["state"] == "done" for j in got)
    assert [j["id"] for j in c.export_list(AUDITOR)["exports"]] == [theirs["id"]]
    # The same name elsewhere, another kind, another auditor: none of these jobs.
    for other in (P(name="frank", tenant="globex", roles=["user"], addresses=["frank@acme.example"]),
                  P(name="aud2", roles=["auditor"]), EXPORT_TOKEN, LOCAL):
        assert c.export_list(other) == {"exports": []}
    for refused in (ADMIN, APPADMIN, TOKEN, EVENTS_TOKEN):
        before = _records(audit)
        with pytest.raises(Forbidden):
            c.export_list(refused)
        assert [r["result"] for r in _records(audit)[len(before):]] == ["denied"]
    now[0] += coremod.EXPORT_TTL + 10
    assert c.export_list(FRANK) == {"exports": []}


# --- the audit trail -----------------------------------------------------------------

def _records(audit):
    from mailtresor.access.audit import ALL
    return audit.read(tenant=ALL, since=0, limit=100000)[0]


def test_every_method_writes_one_audit_record(world):
    core, ids, audit, _ = world
    calls = [
        ("search", "ok", lambda: core.search(AUDITOR, query="figures secret")),
        ("search", "denied", lambda: core.search(ADMIN, query="x")),
        ("search", "failed", lambda: core.search(AUDITOR, query="", limit=999)),
        ("search", "not-found", lambda: core.search(AUDITOR, tenant="globex", query="")),
        ("read", "ok", lambda: core.message(AUDITOR, ids["figures"])),
        ("read", "not-found", lambda: core.message(FRANK, ids["figures"])),
        ("read", "ok", lambda: core.text(AUDITOR, ids["figures"])),
        ("read", "ok", lambda: core.html(AUDITOR, ids["figures"])),
        ("download", "ok", lambda: core.raw(AUDITOR, ids["figures"])),
        ("download", "denied", lambda: core.raw(APPADMIN, ids["figures"])),
        ("download", "ok", lambda: core.attachment(AUDITOR, ids["report"], 1)),
        ("download", "not-found", lambda: core.attachment(AUDITOR, ids["report"], 9)),
        ("export", "ok", lambda: core.export_start(AUDITOR, ids=[ids["figures"]], format="mbox")),
        ("export", "denied", lambda: core.export_start(ADMIN, query="", format="mbox")),
        ("export", "not-found", lambda: core.export_status(AUDITOR, "f" * 32)),
        ("download", "not-found", lambda: core.export_path(FRANK, "f" * 32)),
        ("audit-read", "ok", lambda: core.audit_records(AUDITOR)),
        ("audit-read", "denied", lambda: core.audit_records(FRANK)),
        ("audit-read", "ok", lambda: core.events(EVENTS_TOKEN)),
        ("audit-read", "denied", lambda: core.events(TOKEN)),
    ]
    for action, result, call in calls:
        before = _records(audit)
        try:
            call()
        except (BadRequest, Forbidden, NotFound):
            pass
        new = _records(audit)[len(before):]
        assert len(new) == 1, (action, result, new)
        assert (new[0]["action"], new[0]["result"]) == (action, result), (action, result, new[0])
        assert new[0]["client"] == "192.0.2.1"
    core.wait_exports()
    # search terms are kept encrypted; the auditor reads them
    recs = core.audit_records(AUDITOR, limit=1000)["records"]
    s = [r for r in recs if r["action"] == "search" and r["result"] == "ok"]
    assert any(r.get("terms") == "figures secret" for r in s)
    assert b"figures secret" not in b"".join(p.read_bytes() for p in audit.directory.glob("audit-*.log"))
    # the SOC's events leave them encrypted
    ev = core.events(EVENTS_TOKEN, limit=1000)["events"]
    assert all(e.get("terms") in (None, "(encrypted)") for e in ev)
    assert all(e["tenant"] == "acme" for e in ev)


# --- the matrix: every method as every role of two tenants ------------------------------

ROLES = {
    "user": lambda t: P(name=f"user-{t}", tenant=t, roles=["user"],
                        addresses=["frank@acme.example" if t == "acme" else "hank@globex.example"]),
    "auditor": lambda t: P(name=f"aud-{t}", tenant=t, roles=["auditor"]),
    "admin": lambda t: P(name=f"adm-{t}", tenant=t, roles=["admin"]),
    "appliance-admin": lambda t: P(name="appadm", tenant=None, roles=["appliance-admin"]),
    "token-search": lambda t: P(kind="token", name=f"tok-{t}", tenant=t, scopes=["search"]),
    "token-events": lambda t: P(kind="token", name=f"evt-{t}", tenant=t, scopes=["events"]),
    "local": lambda t: P(kind="local", name="uid=0", tenant=None),
}
# own message per tenant that every reader role may see (the user's too)
OWN = {"acme": "report", "globex": "globex"}


@pytest.mark.parametrize("role", sorted(ROLES))
@pytest.mark.parametrize("tenant", ["acme", "globex"])
def test_matrix(world, role, tenant):
    core, ids, _, _ = world
    who = ROLES[role](tenant)
    other = "globex" if tenant == "acme" else "acme"
    own, foreign = ids[OWN[tenant]], ids[OWN[other]]
    kw = {"tenant": tenant} if who.tenant is None else {}
    reads = role in ("user", "auditor", "token-search", "local")
    methods = {
        "search": lambda **k: core.search(who, query="", **k),
        "message": lambda **k: core.message(who, own, **k),
        "raw": lambda **k: core.raw(who, own, **k),
        "text": lambda **k: core.text(who, own, **k),
        "html": lambda **k: core.html(who, own, **k),
    }
    for name, call in methods.items():
        if reads:
            assert call(**kw) is not None, name
        else:
            with pytest.raises(Forbidden):
                call(**kw)
    # another tenant: not found for everyone who reads (forbidden before that for the rest)
    other_kw = {"tenant": other}
    for call in (lambda: core.raw(who, foreign, **kw), lambda: core.message(who, foreign, **kw)):
        with pytest.raises(NotFound if reads else Forbidden):
            call()
    if who.tenant is not None:
        with pytest.raises(NotFound if reads else Forbidden):
            core.search(who, query="", **other_kw)
    # exports: users, auditors, local; not a search-only token
    exports = role in ("user", "auditor", "local")
    if exports:
        job = core.export_start(who, ids=[own], format="mbox", **kw)
        core.wait_exports()
        assert core.export_status(who, job["id"])["state"] == "done"
    else:
        with pytest.raises(Forbidden):
            core.export_start(who, ids=[own], format="mbox", **kw)
    # the audit trail: auditors and local; events: auditors, local, the events token
    if role in ("auditor", "local"):
        core.audit_records(who, **kw)
    else:
        with pytest.raises(Forbidden):
            core.audit_records(who, **kw)
    if role in ("auditor", "local", "token-events"):
        core.events(who, **kw)
    else:
        with pytest.raises(Forbidden):
            core.events(who, **kw)


def test_reindex_rebuilds_an_older_index_with_the_facet_slots(world, arch):
    """An index made before format 2 lacks the facet slots: `reindex`
    rebuilds it in the current format, with the same facets and flags."""
    import xapian
    core, ids, _, _ = world
    before = core.search(AUDITOR, query="", limit=200, facets=True)
    store = core.store
    paths = [p for m in store.months("acme") for p in store.index_paths("acme", [m])]
    assert all(index.index_format(p) == index.INDEX_FORMAT for p in paths)
    for p in paths:                                  # make them look like format 1
        db = xapian.WritableDatabase(p, xapian.DB_OPEN)
        db.set_metadata(index.META_FORMAT, "")
        for item in db.postlist(""):
            doc = db.get_document(item.docid)
            for slot in [v.num for v in doc.values() if v.num >= 2]:
                doc.remove_value(slot)
            db.replace_document(item.docid, doc)
        db.commit()
        db.close()
    assert all(index.index_format(p) == 1 for p in paths)
    old = core.search(AUDITOR, query="", limit=200, facets=True)
    assert old["facets"]["month"] == {} and old["total"] == before["total"]
    # rows still say has_attachments (from the stored summary: named attachments only)
    assert {r["id"]: r["has_attachments"] for r in old["results"]}[ids["report"]] is True
    p = subprocess.run([sys.executable, "-m", "mailtresor", "--config", str(arch.config_path), "reindex",
                        "--tenant", "acme"], cwd=REPO, capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert all(index.index_format(p) == index.INDEX_FORMAT for p in paths)
    after = core.search(AUDITOR, query="", limit=200, facets=True)
    assert after["facets"] == before["facets"]
    assert sorted(after["results"], key=lambda r: r["id"]) == sorted(before["results"], key=lambda r: r["id"])


def test_reindex_gives_an_older_summary_the_to_addresses_in_its_listing():
    """A record archived before the summary held To: gets `to` and
    `to_count` in the listing `reindex` writes (from its parse); a newer
    summary is used as it is."""
    from mailtresor.archive import parse
    from mailtresor.cli.archive import _listed
    raw = (b"From: a@x.example\r\nTo: " + b", ".join(b"r%d@y.example" % i for i in range(12))
           + b"\r\nSubject: s\r\n\r\nbody\r\n")
    p = parse.parse_message(raw)
    old = {"date": None, "from": "a@x.example", "subject": "s", "message_id": "", "size": len(raw)}
    got = _listed(old, p)
    assert got["to"] == [f"r{i}@y.example" for i in range(10)] and got["to_count"] == 12
    assert got["subject"] == "s" and "to" not in old
    new = {**old, "to": ["kept@y.example"], "to_count": 1}
    assert _listed(new, p) is new


# --- MIME parts for reading, and threads ------------------------------------------------

def test_mime_parts_numbering_and_limits():
    from mailtresor.archive import parse
    inner = plain("Inner", "a@x.example", "b@y.example")
    raw = (b"From: a@x.example\r\nSubject: outer\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=O\r\n\r\n"
           b"--O\r\nContent-Type: multipart/alternative; boundary=A\r\n\r\n"
           b"--A\r\nContent-Type: text/plain\r\n\r\nplain body\r\n"
           b"--A\r\nContent-Type: text/html\r\n\r\n<p>html body</p>\r\n--A--\r\n"
           b"--O\r\nContent-Type: message/rfc822\r\n\r\n" + inner +
           b"\r\n--O\r\nContent-Type: text/plain; name=notes.txt\r\n"
           b"Content-Disposition: attachment; filename=notes.txt\r\n\r\nsome notes\r\n--O--\r\n")
    parts = parse.mime_parts(raw)
    assert [(p.n, p.content_type) for p in parts] == [(0, "text/plain"), (0, "text/html"),
                                                      (1, "message/rfc822"), (2, "text/plain")]
    assert b"Subject: Inner" in parts[2].data and parts[3].filename == "notes.txt"
    # the parser's budget bounds what is read: parts and nesting
    many = parse.mime_parts(hostile.thousand_parts(1500))
    assert 0 < len(many) <= parse.Limits().max_parts
    assert len(parse.mime_parts(hostile.thousand_parts(50), parse.Limits(max_parts=10))) <= 10
    assert parse.mime_parts(hostile.nested_multiparts(300)) is not None


def test_threads_share_one_core(world):
    """The API calls the core from a thread pool: one Store behind a lock,
    the readers cache, one audit log."""
    import threading
    core, ids, _, _ = world
    errors, results = [], []

    def work(i):
        try:
            for _ in range(5):
                results.append(len(core.search(AUDITOR, query="", limit=10)["results"]))
                assert core.raw(AUDITOR, ids["report"]) == MAILS["report"][2]
                assert core.message(FRANK, ids["html"])["subject"] == "Newsletter"
                with pytest.raises(NotFound):
                    core.raw(FRANK, ids["figures"])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(results) == 20 and len(set(results)) == 1


def test_no_access_without_its_audit_record(world, tmp_path):
    """The record is written before the answer is handed out: when the
    trail cannot take it, the caller gets an error, not the mail."""
    from mailtresor.access.audit import AuditError
    core, ids, _, _ = world
    closed = AuditLog(tmp_path / "audit", core.keys)
    closed.close()
    c = Core(store=core.store, keys=core.keys, audit=closed, exports_dir=tmp_path / "ex",
             tenants=["acme", "globex"])
    with pytest.raises(AuditError):
        c.raw(AUDITOR, ids["figures"])
    with pytest.raises(AuditError):
        c.search(AUDITOR, query="")
