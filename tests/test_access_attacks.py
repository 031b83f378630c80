"""The access layer played by its attackers: a user after another user's
mail, a tenant after another tenant's, an administrator or a tenant-less
token after mail, an insider who wants mail out without a trace, a hostile
message, a guesser at the login.  Each finding of the review has a test
here that fails without its fix (docs/ACCESS.md, "### Security")."""

import base64
import hashlib
import zipfile

import pytest

from mailtresor.access import core as coremod
from mailtresor.access import render
from mailtresor.access.audit import AuditLog
from mailtresor.access.auth import Authenticator, LoginFailed
from mailtresor.access.core import BadRequest, Core, Forbidden, NotFound
from mailtresor.access.ldap import within
from mailtresor.access.principal import Principal
from mailtresor.access.sessions import Sessions, Throttled
from mailtresor.access.tokens import TokenDB, TokenError
from mailtresor.access.users import UserDB
from mailtresor.archive import index
from mailtresor.archive.index import ShardIndex
from tests.harness.stack import Stack
from tests.test_archive import keys_of, wait_archived
from tests.test_auth import KEY, PW, Clock, make_cfg
from tests.test_index import add as index_add
from tests.test_index import msg as index_msg


def plain(subject, frm, to, body="Hello.\r\n"):
    return (f"From: {frm}\r\nTo: {to}\r\nSubject: {subject}\r\nDate: Thu, 22 Aug 2002 10:00:00 +0000\r\n"
            f"Message-ID: <{hashlib.sha1(subject.encode()).hexdigest()[:12]}@attack>\r\n\r\n{body}").encode()


def nasty_names(frm, to):
    long_name = "x" * 1000 + ".pdf"
    return (f"From: {frm}\r\nTo: {to}\r\nSubject: Nasty names\r\nDate: Fri, 07 Mar 2003 09:00:00 +0000\r\n"
            "Message-ID: <names@attack>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
            "--B\r\nContent-Type: text/plain\r\n\r\nsee\r\n"
            "--B\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; "
            "filename*=UTF-8''..%2F..%2F.ssh%2Fauthorized_keys%0D%0ASet-Cookie%3A%20a%3Db%E2%80%AE.pdf\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n"
            f"{base64.b64encode(b'one').decode()}\r\n"
            f"--B\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename=\"{long_name}\"\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n"
            f"{base64.b64encode(b'two').decode()}\r\n"
            "--B\r\nContent-Type: text/html\r\n x-injected: 1\r\nContent-Disposition: attachment; filename=c.html\r\n\r\n"
            "<p>three</p>\r\n"
            "--B\r\nContent-Type: \"image/png\\\"><x\"\r\nContent-Disposition: attachment; filename=d.png\r\n\r\n"
            "four\r\n--B--\r\n").encode()


MAILS = {
    "carol": ("carol@acme.example", ["dave@acme.example"],
              plain("Salary review q7z", "carol@acme.example", "dave@acme.example")),
    "frank": ("erin@acme.example", ["frank@acme.example"],
              plain("For frank", "erin@acme.example", "frank@acme.example")),
    "names": ("erin@acme.example", ["frank@acme.example"],
              nasty_names("erin@acme.example", "frank@acme.example")),
    "globex": ("gina@globex.example", ["hank@globex.example"],
               plain("Globex plans", "gina@globex.example", "hank@globex.example")),
}


@pytest.fixture(scope="module")
def arch(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("attacks") / "stack", {"archive": {"enabled": True}})
    s.start()
    try:
        with s.smtp() as c:
            for frm, rcpts, raw in MAILS.values():
                c.sendmail(frm, rcpts, raw)
        wait_archived(s)
        s.stop_daemon()
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def world(arch, tmp_path_factory):
    from mailtresor.archive.store import Store
    d = tmp_path_factory.mktemp("access")
    keys = keys_of(arch)
    store = Store(arch.cfg.archive.directory, readonly=True)
    audit = AuditLog(d / "audit", keys)
    core = Core(store=store, keys=keys, audit=audit, exports_dir=d / "exports", tenants=["acme", "globex"])
    ids = {n: keys.archive_id("globex" if n == "globex" else "acme", raw) for n, (_, _, raw) in MAILS.items()}
    yield core, ids, audit, d
    core.wait_exports()
    audit.close()
    store.close()


def P(kind="user", name="u", tenant="acme", roles=(), scopes=(), addresses=()):
    return Principal(kind=kind, name=name, tenant=tenant, roles=frozenset(roles), scopes=frozenset(scopes),
                     addresses=frozenset(addresses), client="192.0.2.7")


AUDITOR = P(name="aud", roles=["auditor"])
FRANK = P(name="frank", roles=["user"], addresses=["frank@acme.example"])


def found(core, who, q, **kw):
    return {r["id"] for r in core.search(who, query=q, limit=200, **kw)["results"]}


# --- a user after another user's mail ------------------------------------------------

@pytest.mark.parametrize("q", ["", "NOT frank", "-frank@acme.example", "NOT frank@acme.example", "salary",
                               "salary OR frank", "(salary OR NOT x) OR frank", "address:dave@acme.example",
                               "dave@acme.example OR frank@acme.example", "to:dave*", "envelope:d*",
                               "from:carol@acme.example", "aid:{carol}", "NOT aid:{frank}", "q7z",
                               "subject:salary OR (NOT subject:salary)"])
def test_query_tricks_stay_in_the_users_scope(world, q):
    core, ids, _, _ = world
    q = q.format(**ids)
    mine = {ids["frank"], ids["names"]}
    doc = core.search(FRANK, query=q, limit=200, facets=True)
    assert {r["id"] for r in doc["results"]} <= mine
    assert doc["total"] <= len(mine)
    assert sum(doc["facets"]["month"].values()) <= len(mine)
    assert "acme.example" not in doc["facets"]["sender_domain"] or \
        doc["facets"]["sender_domain"]["acme.example"] <= len(mine)


def test_cursors_are_bound_to_principal_query_and_tenant(world):
    core, ids, _, _ = world
    doc = core.search(AUDITOR, query="", limit=1)
    assert doc["next_cursor"]
    for who, q in ((FRANK, ""), (AUDITOR, "salary"), (P(name="aud", tenant="globex", roles=["auditor"]), "")):
        with pytest.raises((BadRequest, NotFound)):
            core.search(who, query=q, cursor=doc["next_cursor"], limit=1)


class CountingStore:
    """The real store, counting the shard reads (a read decrypts a message)."""

    def __init__(self, store):
        self._store = store
        self.shard_reads = 0

    def shard(self, *a, **kw):
        self.shard_reads += 1
        return self._store.shard(*a, **kw)

    def __getattr__(self, name):
        return getattr(self._store, name)


def test_not_yours_costs_what_not_there_costs(world, tmp_path):
    """Finding: another user's message was read from the store, decrypted
    and parsed before the 404; one that does not exist was not: the time
    told which ids exist.  Now the index (with the user's scope) is asked
    first, the store only for the caller's own mail."""
    core, ids, audit, _ = world
    counting = CountingStore(core.store)
    c = Core(store=counting, keys=core.keys, audit=audit, exports_dir=tmp_path / "ex", tenants=["acme", "globex"])
    answers = []
    for aid in (ids["carol"], "0" * 40, ids["globex"]):
        with pytest.raises(NotFound) as e:
            c.message(FRANK, aid)
        answers.append((e.value.status, e.value.reason))
    assert len(set(answers)) == 1
    assert counting.shard_reads == 0
    assert c.message(FRANK, ids["frank"])["id"] == ids["frank"]
    assert counting.shard_reads == 1


def test_export_of_ids_out_of_scope_is_missing_without_reading(world, tmp_path):
    core, ids, audit, _ = world
    counting = CountingStore(core.store)
    c = Core(store=counting, keys=core.keys, audit=audit, exports_dir=tmp_path / "ex", tenants=["acme", "globex"])
    job = c.export_start(FRANK, ids=[ids["carol"], ids["globex"], "f" * 40, ids["frank"]], format="zip")
    c.wait_exports()
    st = c.export_status(FRANK, job["id"])
    assert st["state"] == "done" and st["missing"] == 3
    with zipfile.ZipFile(c.export_path(FRANK, job["id"])) as z:
        assert sorted(z.namelist()) == sorted([f"{ids['frank']}.eml", "manifest.json"])
    assert counting.shard_reads == 1


def test_address_filter_takes_whole_addresses_only(tmp_path):
    """Finding: a local part with an @ of its own ("frank@acme.example"@evil,
    frank@acme.example@evil) was indexed whole, as the term of another
    address: frank's scope matched mail that is not his (its subject in
    his results, its count in his facets).  And a scope "address" without
    an @ (a domain, a word) matched parts of everybody's addresses."""
    path = tmp_path / "ix"
    ix = ShardIndex(path)
    index_add(ix, "a1", index_msg(to=['"frank@acme.example"@evil.example'], subject="one"))
    index_add(ix, "a2", index_msg(to=["frank@acme.example@evil.example"], subject="two"),
              envelope=["frank@acme.example@evil.example"])
    index_add(ix, "a3", index_msg(to=["frank@acme.example"], subject="three"))
    index_add(ix, "a4", index_msg(to=["dave@acme.example"], subject="four"))

    def scoped(addresses):
        p = index.restrict(index.prepare(""), index.address_filter(addresses))
        return sorted(h.archive_id for h in index.search([path], p, limit=10)[1])
    assert scoped(["frank@acme.example"]) == ["a3"]
    assert scoped(["acme.example"]) == []
    assert scoped(["frank"]) == []


def test_tenantless_principals_read_no_tenant(world, tmp_path):
    """Finding: a principal without a tenant that had a read right (a token
    issued with tenant None, which TokenDB accepted) could name any tenant
    and read it: only a local administrator names the tenant it reads."""
    core, ids, _, _ = world
    for who in (P(kind="token", name="t0", tenant=None, scopes=["search", "export", "events"]),
                P(name="x", tenant=None, roles=["auditor"]),
                P(name="root", tenant=None, roles=["appliance-admin", "auditor"])):
        with pytest.raises(Forbidden):
            core.search(who, tenant="acme", query="")
        with pytest.raises(Forbidden):
            core.raw(who, ids["carol"], tenant="acme")
        with pytest.raises(Forbidden):
            core.events(who, tenant="acme")
        with pytest.raises(Forbidden):
            core.audit_records(who, tenant="acme")
    tokens = TokenDB(tmp_path / "tokens.db", KEY)
    with pytest.raises(TokenError):
        tokens.issue(None, "soc", {"events"}, None)
    # the local administrator still does
    assert ids["carol"] in found(core, P(kind="local", name="uid=0", tenant=None), "", tenant="acme")


def test_other_tenant_names_and_ids(world):
    core, ids, _, _ = world
    for t in ("ACME", "acme ", "ａｃｍｅ", "../acme", "acme/../globex", "globex"):
        with pytest.raises(NotFound):
            core.search(P(name="aud", tenant="globex", roles=["auditor"]) if t != "globex" else AUDITOR,
                        tenant=t, query="")
    with pytest.raises(NotFound):
        core.raw(AUDITOR, ids["globex"])
    with pytest.raises(NotFound):
        core.raw(AUDITOR, ids["carol"], tenant="globex")


# --- mail out without a trace -------------------------------------------------------------

def test_bad_query_terms_never_in_clear_in_the_trail(world):
    """Finding: a query that did not parse was refused with a reason that
    quotes it, and that reason went into the audit record's detail in
    clear: the terms an operator must not read."""
    core, _, audit, d = world
    for q in ("date:topsecretmerger", "size:topsecretmerger", "(topsecretmerger", "to:topsecretmerger*x*"):
        with pytest.raises(BadRequest) as e:
            core.search(AUDITOR, query=q)
        if q.startswith(("date", "size")):
            assert "topsecretmerger" in e.value.reason     # the caller is told what to fix
    with pytest.raises(BadRequest):
        core.export_start(AUDITOR, query="date:topsecretmerger", format="mbox")
    with pytest.raises(BadRequest):
        core.search(AUDITOR, query="x", order="topsecretmerger")
    audit.seal()
    for f in (d / "audit").iterdir():
        assert b"topsecretmerger" not in f.read_bytes(), f
    records, _ = audit.read(tenant="acme", limit=1000, with_terms=True)
    assert any(r.get("terms") == "date:topsecretmerger" for r in records)    # kept, encrypted


class FailingExportAudit:
    def __init__(self, audit):
        self._audit = audit

    def append(self, **kw):
        if kw["action"] == "export":
            raise OSError("disk full")
        return self._audit.append(**kw)

    def __getattr__(self, name):
        return getattr(self._audit, name)


def test_an_export_the_trail_cannot_record_never_runs(world, tmp_path):
    """Finding: the export job was started before its audit record was
    written; when the append failed the caller got an error but the file
    was written all the same."""
    core, ids, audit, _ = world
    c = Core(store=core.store, keys=core.keys, audit=FailingExportAudit(audit), exports_dir=tmp_path / "ex",
             tenants=["acme", "globex"])
    with pytest.raises(OSError):
        c.export_start(AUDITOR, ids=[ids["carol"]], format="mbox")
    c.wait_exports()
    assert list((tmp_path / "ex").iterdir()) == []
    assert c._jobs == {}


def test_no_log_line_holds_a_secret_or_terms(world, tmp_path, caplog):
    core, ids, _, _ = world
    caplog.set_level("DEBUG")
    clock = Clock()
    db = UserDB(tmp_path / "users.db", KEY, clock=clock)
    authn = Authenticator(make_cfg(tmp_path), db, TokenDB(tmp_path / "tokens.db", KEY), clock=clock)
    db.add("acme", "alice", PW, {"user"})
    with pytest.raises(LoginFailed):
        authn.login(tenant="acme", username="alice", password="wrongpassword9", totp="123456", client="c")
    authn.login(tenant="acme", username="alice", password=PW, totp=None, client="c")
    core.search(AUDITOR, query="salary q7z")
    core.message(AUDITOR, ids["carol"])
    text = caplog.text
    for secret in (PW, "wrongpassword9", "123456", "q7z", "Salary review"):
        assert secret not in text


# --- a hostile message ------------------------------------------------------------------------

def test_attachment_names_cannot_escape_or_inject(world):
    """Finding: an attachment's file name was handed out as the message
    gave it: path separators (a client saving it leaves its directory),
    CR/LF (a Content-Disposition header that splits), bidi overrides,
    a name of any length."""
    core, ids, _, _ = world
    meta = core.message(FRANK, ids["names"])
    names = [a["filename"] for a in meta["attachments"]]
    for n in (1, 2):
        name, ctype, data = core.attachment(FRANK, ids["names"], n)
        assert name == names[n - 1]
        assert not any(c in name for c in "/\\\r\n\"\u202e") and not name.startswith(".")
        assert 0 < len(name) <= coremod.FILENAME_MAX
    assert names[0].endswith(".pdf") and names[1].endswith(".pdf")
    assert "\r" not in core.text(FRANK, ids["names"])


def test_attachment_content_types_are_tokens(world):
    """Finding: an attachment's content type was handed out as the message
    folded it ("text/html\r\n x-injected: 1") or quoted it, for the API to
    put into a Content-Type header.  Now a type/subtype token pair, else
    application/octet-stream."""
    core, ids, _, _ = world
    meta = core.message(FRANK, ids["names"])
    types = [a["content_type"] for a in meta["attachments"]]
    assert types[:2] == ["application/pdf", "application/pdf"]
    assert types[2:] == ["application/octet-stream", "application/octet-stream"]
    for n in range(1, len(types) + 1):
        assert core.attachment(FRANK, ids["names"], n)[1] == types[n - 1]
    assert "x-injected" not in core.text(FRANK, ids["names"])


@pytest.mark.parametrize("markup", [
    '<svg><script>alert(1)</script></svg>', '<math><mtext><table><mglyph><style><img src=x onerror=alert(1)>',
    '<noscript><p title="</noscript><img src=x onerror=alert(1)>">', '<a href="jav&#x09;ascript:alert(1)">x</a>',
    '<a href="data:text/html,<script>alert(1)</script>">x</a>', '<img srcset="http://evil.test/x 1x">',
    '<base href="http://evil.test/">', '<meta http-equiv="refresh" content="0;url=http://evil.test">',
    '<form action="http://evil.test"><input name=a></form>', '<object data="http://evil.test/x"></object>',
    '<p style="width:expression(alert(1))">x</p>', '<table background="http://evil.test/b"><tr><td>x</td></tr></table>',
    '<!--><img src=x onerror=alert(1)>-->', '<img src="cid:doc">', '<svg><a xlink:href="javascript:alert(1)">x</a></svg>',
])
def test_renderer_against_hostile_markup(markup):
    out = render.sanitise(markup, {"logo": "data:image/png;base64,AAAA"}).lower()
    for bad in ("<script", "onerror", "javascript:", "evil.test", "style", "srcset", "<base", "<meta", "<form",
                "<input", "<object", "expression", "background", "data:text"):
        assert bad not in out


# --- logins and sessions -----------------------------------------------------------------------------

def test_throttle_counts_every_spelling_of_a_name(tmp_path):
    """Finding: the per-user throttle counted "alice", " alice" and
    "ａｌｉｃｅ" apart, while a directory takes them for one entry: a
    guesser got the free failures once per spelling."""
    clock = Clock()
    db = UserDB(tmp_path / "users.db", KEY, clock=clock)
    authn = Authenticator(make_cfg(tmp_path, {"throttle_failures": 3, "throttle_window": 60}), db,
                          TokenDB(tmp_path / "tokens.db", KEY), clock=clock)
    db.add("acme", "alice", PW, {"user"})
    for i in range(3):
        with pytest.raises(LoginFailed):
            authn.login(tenant="acme", username="alice", password=f"guess {i}xx", totp=None, client=f"10.0.0.{i}")
    for n, spelling in enumerate((" alice", "alice ", "ＡＬＩＣＥ", "Alice")):
        with pytest.raises(Throttled):
            authn.login(tenant="acme", username=spelling, password="another guess", totp=None,
                        client=f"10.1.0.{n}")


def test_a_disabled_user_loses_the_open_session(tmp_path):
    """Finding: Sessions.drop_user existed but nothing called it: a user
    disabled (or given a new password, or other roles) kept a session open
    until its timeouts.  UserDB.on_change is the hook the API registers;
    Authenticator.still_valid answers for a change made by another process
    (`mailtresor user disable`)."""
    clock = Clock()
    db = UserDB(tmp_path / "users.db", KEY, clock=clock)
    authn = Authenticator(make_cfg(tmp_path), db, TokenDB(tmp_path / "tokens.db", KEY), clock=clock)
    sessions = Sessions(clock=clock)
    db.on_change(lambda tenant, name, change: sessions.drop_user(tenant, name))
    db.add("acme", "alice", PW, {"user"}, ["alice@acme.example"])
    db.add("acme", "bob", PW, {"user"}, ["bob@acme.example"])
    alice = authn.login(tenant="acme", username="alice", password=PW, totp=None, client="c")
    bob = authn.login(tenant="acme", username="bob", password=PW, totp=None, client="c")
    sid_a, _ = sessions.create(alice)
    sid_b, _ = sessions.create(bob)
    db.disable("acme", "alice")
    assert sessions.get(sid_a) is None
    assert sessions.get(sid_b) is not None
    # another process (the CLI) changes bob: this process learns it from the file
    cli = UserDB(tmp_path / "users.db", KEY)
    assert authn.still_valid(bob)
    cli.update("acme", "bob", roles={"user", "auditor"})
    assert not authn.still_valid(bob)
    cli.disable("acme", "bob")
    assert not authn.still_valid(bob)
    assert authn.still_valid(P(kind="token", name="t", scopes=["events"]))


def test_expired_and_revoked_tokens(tmp_path):
    clock = Clock()
    tokens = TokenDB(tmp_path / "tokens.db", KEY, clock=clock)
    authn = Authenticator(make_cfg(tmp_path), UserDB(tmp_path / "users.db", KEY), tokens, clock=clock)
    tid, secret = tokens.issue("acme", "soc", {"events"}, clock.t + 60)
    assert authn.token(secret, "c").scopes == {"events"}
    clock.t += 61
    with pytest.raises(LoginFailed):
        authn.token(secret, "c")
    tid, secret = tokens.issue("acme", "soc2", {"search"}, None)
    tokens.revoke(tid)
    with pytest.raises(LoginFailed):
        authn.token(secret, "c")


def test_events_token_cannot_search(world):
    core, _, _, _ = world
    with pytest.raises(Forbidden):
        core.search(P(kind="token", name="t3", scopes=["events"]), query="")
    with pytest.raises(Forbidden):
        core.search(P(name="adm", roles=["admin"]), query="")


# --- LDAP ------------------------------------------------------------------------------------------

def test_a_directory_entry_outside_the_base_is_nobody():
    """Finding: the entry the user search returned was taken whatever its DN:
    an alias dereferenced to an entry elsewhere (or a directory that ignores
    the base) made a user of another tenant's subtree log in here."""
    assert within("uid=a,ou=People,dc=acme,dc=example", "dc=acme,dc=example")
    assert within("UID=a, OU=people,DC=Acme,dc=example", "ou=people,dc=acme,dc=example")
    assert not within("uid=a,ou=people,dc=globex,dc=example", "dc=acme,dc=example")
    assert not within("uid=a,dc=evilacme,dc=example", "dc=acme,dc=example")
    assert not within("dc=example", "dc=acme,dc=example")


# --- resource abuse ------------------------------------------------------------------------------

def test_huge_limits_and_wildcards(world):
    core, _, _, _ = world
    for limit in (0, coremod.MAX_PAGE + 1, 10 ** 12, -1, True, "50"):
        with pytest.raises(BadRequest):
            core.search(AUDITOR, query="", limit=limit)
    for since, limit in ((-1, 10), (0, 10 ** 9)):
        with pytest.raises(BadRequest):
            core.audit_records(AUDITOR, since=since, limit=limit)
    with pytest.raises(BadRequest):
        core.search(AUDITOR, query="from:*")
    # a one-letter wildcard over the tenant: expanded within WILDCARD_LIMIT, or refused; never unbounded
    for q in ("*", "a*", "a*b*", "to:a*"):
        try:
            core.search(FRANK, query=q, facets=True)
        except BadRequest as e:
            assert "wildcard" in e.reason


def test_exports_kept_per_principal_are_bounded(world, tmp_path, monkeypatch):
    """Finding: a principal could start export after export (two at a
    time, each finished one kept for EXPORT_TTL): the files filled the
    disk.  Now the oldest finished ones go once there are EXPORTS_KEPT."""
    core, ids, audit, _ = world
    monkeypatch.setattr(coremod, "EXPORTS_KEPT", 3)
    c = Core(store=core.store, keys=core.keys, audit=audit, exports_dir=tmp_path / "ex", tenants=["acme", "globex"])
    jobs = []
    for _ in range(6):
        jobs.append(c.export_start(FRANK, ids=[ids["frank"]], format="mbox")["id"])
        c.wait_exports()
    assert len(list((tmp_path / "ex").iterdir())) <= 3
    with pytest.raises(NotFound):
        c.export_status(FRANK, jobs[0])
    assert c.export_status(FRANK, jobs[-1])["state"] == "done"


def test_a_megabyte_query_is_refused_and_audited(world):
    """Finding: a query had no length limit: a megabyte of words was parsed
    into one huge Xapian query, and its audit record (terms included) was
    over the trail's record limit, so the caller got an internal error
    instead of a 400 and the attempt left no record."""
    core, _, audit, _ = world
    before = audit.read(tenant="acme", since=0, limit=1000)[1]
    with pytest.raises(BadRequest) as e:
        core.search(AUDITOR, query="word " * 200_000)
    assert "over" in e.value.reason
    recs, _ = audit.read(tenant="acme", since=before, limit=1000)
    assert [(r["action"], r["result"]) for r in recs] == [("search", "failed")]


def test_audit_show_lines_cannot_be_forged():
    """Finding: `mailtresor audit show` printed the principal, object and
    client as the caller sent them: a login name or an id with a newline
    forged a record line, an escape sequence rewrote the auditor's terminal."""
    from mailtresor.cli.audit import format_record
    forged = "x\n       9 2026-01-01T00:00:00Z alice acme read 00 ok 10.0.0.1"
    r = {"seq": 7, "time": "2026-01-01T00:00:00Z", "principal": "mallory\x1b]0;owned\x07", "tenant": "acme",
         "action": "read", "object": forged, "result": "not-found", "client": "192.0.2.1 10.0.0.1",
         "detail": {"reason": "no such message\n"}}
    line = format_record(r)
    assert "\n" not in line and "\x1b" not in line and "\x07" not in line
    assert line.split()[1:5] == ["2026-01-01T00:00:00Z", '"mallory\\u001b]0;owned\\u0007"', "acme", "read"]
    plain = dict(r, principal="alice", object="0" * 40, client="192.0.2.1", detail={})
    assert f" alice acme read {'0' * 40} not-found 192.0.2.1" in format_record(plain)


def test_an_alias_to_an_entry_outside_the_base_logs_nobody_in(tmp_path):
    """The same against a real slapd: the tenant's base is ou=people; an
    alias there points at an entry under ou=system (another tenant's
    subtree, say).  ldap3 dereferences aliases in searches, so the search
    returned the outside entry, and its password bound."""
    import subprocess
    from pathlib import Path
    from tests.harness import slapd as slapdmod
    if not Path(slapdmod.SLAPD).exists():
        pytest.skip("slapd is not installed")
    s = slapdmod.Slapd(tmp_path / "slapd")
    base = slapdmod.BASE
    extra = s.dir / "extra.ldif"
    extra.write_text(
        f"dn: uid=eve,ou=system,{base}\nobjectClass: inetOrgPerson\nuid: eve\ncn: Eve\nsn: Eve\n"
        f"mail: eve@globex.example\nuserPassword: {slapdmod.ssha('eve-password')}\n\n"
        f"dn: uid=eve,ou=people,{base}\nobjectClass: alias\nobjectClass: extensibleObject\nuid: eve\n"
        f"aliasedObjectName: uid=eve,ou=system,{base}\n")
    r = subprocess.run([slapdmod.SLAPADD, "-f", str(s.conf), "-l", str(extra)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    s.start()
    try:
        cfg = make_cfg(tmp_path, {"throttle_failures": 100},
                       [{"name": "acme", "domains": ["acme.example"],
                         "ldap": s.ldap_config(base=f"ou=people,{base}")}])
        a = Authenticator(cfg, UserDB(tmp_path / "users.db", KEY), TokenDB(tmp_path / "tokens.db", KEY))
        try:
            with pytest.raises(LoginFailed):
                a.login(tenant="acme", username="eve", password="eve-password", totp=None, client="c")
            p = a.login(tenant="acme", username="alice", password=s.users["alice"], totp=None, client="c")
            assert p.addresses == {"alice@acme.example"}
        finally:
            for d in a._dirs.values():
                d.close()
    finally:
        s.close()


def test_wildcards_per_query_are_bounded(world):
    """Finding: each wildcard may expand to WILDCARD_LIMIT terms in each
    field it names, but a query could hold hundreds of them (address:x*
    is five): seconds of work per request for any user."""
    core, _, _, _ = world
    q = " OR ".join(f"address:{c}{d}*" for c in "abcdefgh" for d in "ae")
    with pytest.raises(BadRequest) as e:
        core.search(FRANK, query=q)
    assert "wildcards" in e.value.reason
    core.search(FRANK, query="subject:sal* OR from:car*")         # a few are fine
    core.search(FRANK, query='"a* b* c* d* e* f* g* h* i*"')      # inside a phrase: no wildcard


def test_throttle_takes_an_ipv6_client_by_its_64(tmp_path):
    """Finding: the per-address throttle counted every IPv6 address apart;
    a host has a /64 to pick from, so it never reached the back-off (and
    every try cost an argon2 verify)."""
    clock = Clock()
    db = UserDB(tmp_path / "users.db", KEY, clock=clock)
    authn = Authenticator(make_cfg(tmp_path, {"throttle_failures": 3, "throttle_window": 60}), db,
                          TokenDB(tmp_path / "tokens.db", KEY), clock=clock)
    for i in range(3):
        with pytest.raises(LoginFailed):
            authn.login(tenant="acme", username=f"name{i}", password="whatever1", totp=None,
                        client=f"2001:db8:1:2::{i + 1:x}")
    with pytest.raises(Throttled):
        authn.login(tenant="acme", username="other", password="whatever1", totp=None,
                    client="2001:db8:1:2:dead:beef:0:1")
    with pytest.raises(LoginFailed):           # the next /64 is someone else
        authn.login(tenant="acme", username="other", password="whatever1", totp=None, client="2001:db8:1:3::1")


def test_argon2_checks_at_once_are_bounded(monkeypatch):
    """Finding: every login thread ran its argon2 verify at once (100 MiB
    and 8 lanes each): logins from many addresses, each within its
    throttle, could take the appliance's memory.  At most VERIFY_SLOTS run
    at once; the others wait."""
    import threading
    import time
    from mailtresor.access import users as usersmod
    real = usersmod._hasher
    state = {"now": 0, "peak": 0}
    lock = threading.Lock()

    class Counting:
        def verify(self, h, pw):
            with lock:
                state["now"] += 1
                state["peak"] = max(state["peak"], state["now"])
            try:
                time.sleep(0.05)
                return real.verify(h, pw)
            finally:
                with lock:
                    state["now"] -= 1

    monkeypatch.setattr(usersmod, "_hasher", Counting())
    threads = [threading.Thread(target=usersmod.dummy_verify, args=("guess",)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert 1 <= state["peak"] <= usersmod.VERIFY_SLOTS


def test_one_account_cannot_push_out_the_others_sessions():
    """Finding: the session table evicted the least recently used session
    when full, whoever's it was: one account logging in again and again
    (a right password is never throttled) logged everybody else out."""
    clock = Clock()
    s = Sessions(clock=clock, max_sessions=10, per_principal=3)
    bob, _ = s.create(P(name="bob", roles=["user"]))
    mallory = P(name="mallory", roles=["user"])
    sids = []
    for _ in range(25):
        clock.t += 1
        sids.append(s.create(mallory)[0])
    assert s.get(bob) is not None
    assert [x for x in sids if s.get(x) is not None] == sids[-3:]


def _html_part(markup):
    from mailtresor.archive import parse
    return parse.Part(n=0, content_type="text/html", filename="", content_id="", charset="utf-8",
                      data=markup.encode())


@pytest.mark.parametrize("markup", ["<div>" * 3000, "<b><i>" * 2000, "<span>x</span>" * (render.MAX_TAGS + 1)])
def test_html_too_deep_or_too_large_is_shown_as_text(markup):
    """Finding: html5lib builds its tree in (elements) x (depth) steps:
    8,000 nested <div>s took ten seconds, the 4 MB a message may hold
    hours of a request thread, for anyone who opens the message.  Markup
    nested deeper than MAX_DEPTH or with more than MAX_TAGS tags is shown
    as its text (escaped, in <pre>), measured by a linear tokenizer."""
    out = render.message_html([_html_part(markup + "<script>alert(1)</script>")])
    assert "too deeply nested or too large" in out
    assert "<script" not in out and "<div" not in out and "<span" not in out


def test_ordinary_html_is_still_rendered_as_html():
    markup = "<table>" + "<tr><td><b>x</b> <a href='https://example.com/'>y</a></td></tr>" * 500 + "</table>"
    out = render.message_html([_html_part("<div>" * 50 + markup + "</div>" * 50)])
    assert "too deeply" not in out and "<table>" in out and 'href="https://example.com/"' in out


def test_audit_show_terms_is_recorded_for_the_tenant(tmp_path):
    """Finding: `mailtresor audit show --terms` without --tenant decrypted
    every tenant's search terms and recorded that read once, as an
    appliance record (tenant None): no tenant's auditor was shown that the
    operator had read their terms."""
    import argparse
    from mailtresor.cli.audit import run_show
    from mailtresor.cli.main import UserError
    args = argparse.Namespace(tenant=None, appliance=False, terms=True, limit=10, since=0, json=False, action=None)
    cfg = make_cfg(tmp_path)
    cfg.audit.directory.mkdir(parents=True)
    with pytest.raises(UserError) as e:
        run_show(cfg, args)
    assert "--tenant" in str(e.value)


@pytest.mark.parametrize("name", ["*", "*)(uid=*", "a\\2a", "alice)(|(uid=*", "ali(ce", "ａｌｉｃｅ*", "\\", "x\x00y"])
def test_ldap_filter_values_are_escaped(name):
    from mailtresor.access.ldap import user_filter
    flt = user_filter("(&(objectClass=inetOrgPerson)(uid={username}))", name)
    value = flt[len("(&(objectClass=inetOrgPerson)(uid="):-2]
    assert not any(c in value for c in "*()\x00")
    assert value.count("\\") == sum(name.count(c) for c in "*()\\\x00")


def test_zip_export_names_and_manifest(world):
    import json
    import re
    core, ids, _, _ = world
    job = core.export_start(AUDITOR, query="", format="zip")
    core.wait_exports()
    with zipfile.ZipFile(core.export_path(AUDITOR, job["id"])) as z:
        names = z.namelist()
        manifest = json.loads(z.read("manifest.json"))
    assert all(re.fullmatch(r"[0-9a-f]{40}\.eml", n) for n in names if n != "manifest.json")
    assert set(manifest) == {"tenant", "created", "query", "messages", "missing"}
    assert {m["id"] for m in manifest["messages"]} == {ids[n] for n in ("carol", "frank", "names")}
