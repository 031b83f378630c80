"""The auditor's pages of the web UI (mailtresor/web/audit.py) in real
headless Chromium against a real daemon: alice searches and reads, the
auditor finds it in the trail (terms decrypted), filters by who/what/when
(the same records as the API's filtered GET /api/v1/audit), pages by the
core's cursor, reads the events view and the anomalies page (a real
untrusted journal report sent over SMTP), verifies the trail; values an
attacker put into the trail (a login name, search terms, a user name)
render as text and run nothing; users and administrators get 403 pages;
axe on every page, screenshots, a phone's width.  The API's filters are
checked here too (every answer validated against openapi.json by
tests.test_api.Client)."""

from __future__ import annotations

import http.client
import time
import urllib.parse

import pytest

from mailtresor.access.auth import open_databases
from mailtresor.keys.client import control_fetcher

from tests.harness.journalgen import make_forgery
from tests.harness.stack import Stack
from tests.harness.web import api_login as web_api_login, wait_archived
from tests.test_api import Client, mail

pytestmark = pytest.mark.skipif(not __import__("shutil").which("chromedriver"),
                                reason="chromium-driver is not installed (make deps)")

PW = {n: f"{n}-password-1" for n in ("alice", "aud", "adm", "gina", "gaud")}
# What an attacker writes into the trail: a login name at the login form,
# search terms, a user name an unprivileged caller asks to create.
HOSTILE_LOGIN = "<img src=x onerror=alert(1)>\n\x1b[31mX\u202e"
HOSTILE_TERMS = "<script>alert(2)</script> 100% %(x)s"
HOSTILE_USER = "<svg onload=alert(3)>"


def api_login(stack, name, tenant):
    return web_api_login(stack, tenant, name, PW[name])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("webaudit")
    stack = Stack(d, {"archive": {"enabled": True}, "api": {"timeout": 20},
                      "access": {"session_idle": 3600}}, milter=False)
    stack.start_control()
    users, _tokens = open_databases(stack.cfg, control_fetcher(stack.cfg))
    users.add("acme", "alice", PW["alice"], {"user"}, ["alice@acme.example"])
    users.add("acme", "aud", PW["aud"], {"auditor"}, [])
    users.add("acme", "adm", PW["adm"], {"admin"}, [])
    users.add("globex", "gina", PW["gina"], {"user"}, ["gina@globex.example"])
    users.add("globex", "gaud", PW["gaud"], {"auditor"}, [])
    stack.start_daemon()
    # A real anomaly: an insider's message dressed as a journal report,
    # sent over the plain relay (not the trusted journal connector).
    forged = make_forgery(sender="insider@acme.example", to="alice@acme.example", subject="Plan x",
                          text="figures", attachment_name="a.txt", attachment=b"x",
                          decoy=b"Subject: d\r\n\r\nd\r\n", recipients=[("to", "victim@globex.example", None)])
    with stack.smtp() as s:
        s.sendmail("bob@acme.example", ["alice@acme.example"],
                   mail("bob@acme.example", "alice@acme.example", "for alice"))
        s.sendmail("insider@acme.example", ["alice@acme.example"], forged)
        s.sendmail("gus@globex.example", ["gina@globex.example"],
                   mail("gus@globex.example", "gina@globex.example", "for gina"))
    aud = api_login(stack, "aud", "acme")
    got = wait_archived(aud, 2, stack)
    ids = {r["subject"]: r["id"] for r in got["results"]}
    # The attacker's entries in acme's trail.
    nobody = Client(stack)
    r = nobody.request("POST", "/api/v1/login", {"tenant": "acme", "username": HOSTILE_LOGIN, "password": "x"})
    assert r.status == 401
    nobody.close()
    alice = api_login(stack, "alice", "acme")
    alice.request("GET", "/api/v1/search?" + urllib.parse.urlencode({"q": HOSTILE_TERMS}))
    r = alice.request("POST", "/api/v1/users", {"name": HOSTILE_USER, "password": "p" * 12, "roles": ["admin"]})
    assert r.status == 403, r.data
    alice.close()
    yield type("World", (), {"stack": stack, "ids": ids, "aud": aud,
                             "base": f"https://127.0.0.1:{stack.api_port}"})
    aud.close()
    stack.close()


@pytest.fixture(scope="module")
def shared_browser(world, tmp_path_factory):
    # One Chromium for the module (each start costs seconds); every test
    # begins logged out, with empty logs.
    from tests.harness.browser import Browser
    b = Browser(world.base, tmp_path_factory.mktemp("chromium"))
    yield b
    b.close()


@pytest.fixture
def browser(shared_browser):
    b = shared_browser
    b.get("/login")
    b.driver.delete_all_cookies()
    b.logs()
    b.console, b.network = [], []
    return b


def login(b, name, tenant="acme", next_path="/audit"):
    b.get(next_path)
    b.wait_path("/login")
    b.login(name, PW[name], tenant)
    b.wait_path(next_path)


def seqs(b, table="#audit-records"):
    return [int(tr.get_attribute("data-seq")) for tr in b.all(f"{table} tbody tr")]


def api_records(world, **filters):
    """Every record the API gives the auditor for `filters`, paged by `next`."""
    out, since = [], 0
    world.aud.close()           # a fresh connection: the API closes idle ones (a browser step may be long)
    world.aud.conn = None
    for _ in range(50):
        r = world.aud.request("GET", "/api/v1/audit?" + urllib.parse.urlencode({**filters, "since": since}))
        assert r.status == 200, r.data
        doc = r.json()
        out += doc["records"]
        since = doc["next"]
        if not doc["more"]:
            return out
    raise AssertionError("the API's audit pages did not end")


def test_the_auditor_finds_alices_search_and_read(world, browser):
    b = browser
    # alice searches and opens a message in the browser.
    login(b, "alice", next_path="/search")
    b.find("#q").send_keys("alice\n")
    b.find("#results")
    b.get(f"/message/{world.ids['for alice']}")
    assert b.find("#subject").text == "for alice"
    b.find("#logout").click()
    b.wait_path("/login")
    # The auditor: the trail, filtered by who and what.
    login(b, "aud", next_path="/audit?who=alice&action=read")
    rows = b.all("#audit-records tbody tr")
    assert rows, b.driver.page_source[:2000]
    for tr in rows:
        assert tr.find_element("css selector", "td.who .name").text == "alice"
        assert tr.find_element("css selector", "td.action").get_attribute("data-action") == "read"
    want = [r["seq"] for r in api_records(world, principal="alice", action="read")]
    assert seqs(b) == want
    assert any(tr.find_element("css selector", "td.object").text == world.ids["for alice"] for tr in rows)
    b.screenshot("audit-filtered")
    # Her search, with its terms decrypted.
    b.get("/audit?who=alice&action=search")
    terms = [e.text for e in b.all("#audit-records td.terms")]
    assert "alice" in terms, terms
    # The filter form keeps its values; the message link opens the message (itself recorded).
    assert b.find("#f-who").get_attribute("value") == "alice"
    assert b.find("#f-action").get_attribute("value") == "search"
    assert "recorded in the trail" in b.find("#audit-order").text
    b.get("/audit?who=alice&action=read")
    link = b.find("#audit-records a.object-link")
    aid = link.text
    link.click()
    b.wait_path("/message/")
    b.find("#subject")
    own = api_records(world, principal="aud", action="read")
    assert own and own[-1]["object"] == aid
    b.logs()
    assert not [e for e in b.console if e["level"] == "SEVERE"], b.console


def test_date_filters_and_a_bad_date(world, browser):
    b = browser
    login(b, "aud", next_path="/audit?from=2999-01-01")
    assert b.find("#audit-empty") and not b.all("#audit-records")
    today = time.strftime("%Y-%m-%d", time.gmtime())
    tomorrow = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 86400))
    b.get(f"/audit?from={today}&to={today}&who=alice")
    assert seqs(b) == [r["seq"] for r in api_records(world, principal="alice", after=today, before=tomorrow)]
    assert seqs(b)
    b.get("/audit?from=2026-99-99")
    assert "not a date" in b.find("#filter-error").text and not b.all("#audit-records")
    b.screenshot("audit-bad-date")
    # A filter the core refuses is said on the page (not a 500).
    b.get("/audit?who=" + urllib.parse.quote("a\nb"))
    assert "principal must be" in b.find("#filter-reason").text
    b.get("/audit?action=delete-everything")
    assert "action must be one of" in b.find("#filter-reason").text


def test_paging_by_the_cores_cursor_keeps_the_filter(world, browser):
    b = browser
    login(b, "aud", next_path="/audit?limit=2&result=ok")
    got = seqs(b)
    assert len(got) == 2
    for _ in range(3):
        nxt = b.find("#next-page")
        assert "result=ok" in nxt.get_attribute("href")
        nxt.click()
        b.find("#first-page")
        page = seqs(b)
        assert page and min(page) > max(got), (got, page)
        got += page
    assert got == [r["seq"] for r in api_records(world, result="ok")][:len(got)]
    assert all(e.get_attribute("data-result") == "ok" for e in b.all("#audit-records td.result"))
    b.find("#first-page").click()
    assert seqs(b) == got[:2]


def test_events_anomalies_and_verify(world, browser):
    b = browser
    login(b, "aud", next_path="/audit/events")
    assert seqs(b, "#audit-events")
    assert not b.all("#audit-events td.terms")         # the SOC's view: terms stay encrypted
    assert b.find("#audit-nav-anomalies").text == "Anomalies"      # counted on /audit and its own page
    b.screenshot("audit-events")
    b.get("/audit")
    nav = b.find("#audit-nav-anomalies").text
    b.get("/audit/anomalies")
    items = b.all("#anomalies li.anomaly")
    kinds = [li.get_attribute("data-kind") for li in items]
    assert "journal-untrusted" in kinds, b.driver.page_source[:3000]
    assert nav == f"Anomalies ({len(items)})"
    li = items[kinds.index("journal-untrusted")]
    assert "Untrusted journal report" in li.text and "may be forged" in li.text
    assert li.find_element("css selector", "a.object-link").text == world.ids["Plan x"]
    b.screenshot("audit-anomalies")
    b.find("#verify-submit").click()
    b.wait_path("/audit/verify")
    assert b.find("#verify-verdict").text == "The trail is sound", b.driver.page_source[:3000]
    assert int(b.find("#verify-records").text) > 10
    b.screenshot("audit-verify")


def test_hostile_trail_values_render_as_text(world, browser):
    b = browser
    login(b, "aud", next_path="/audit?action=login-failed")
    names = [e.get_attribute("title") or e.get_attribute("textContent") for e in b.all("#audit-records td.who .name")]
    spelled = "<img src=x onerror=alert(1)>\\n\\x1b[31mX\\u202e@acme"
    assert spelled in names, names
    b.get("/audit?action=search&who=alice")
    terms = [(e.text, e.get_attribute("title")) for e in b.all("#audit-records td.terms span")]
    assert any(HOSTILE_TERMS in (t, title) for t, title in terms), terms
    b.get("/audit?action=admin&result=denied")
    objects = [e.text for e in b.all("#audit-records td.object")]
    assert f"user:{HOSTILE_USER}" in objects, objects
    for path in ("/audit?action=login-failed", "/audit?action=search&who=alice", "/audit?action=admin",
                 "/audit/events"):
        b.get(path)
        b.find("#audit-count")
        injected = b.driver.execute_script(
            "return document.querySelectorAll('main img, main script, main svg, main [onerror], main [onload]')"
            ".length")
        assert injected == 0, path
    time.sleep(0.5)
    b.logs()
    assert not [e for e in b.console if "alert" in e["message"].lower()], b.console
    assert b.driver.execute_script("return 1") == 1         # would raise UnexpectedAlertPresent
    # Nothing loaded from src=x.
    assert not [u for u in b.requested_urls() if u.rstrip("/").endswith("/x")]
    b.screenshot("audit-hostile")


@pytest.mark.parametrize("name", ["alice", "adm"])
def test_users_and_admins_get_403_pages(world, browser, name):
    b = browser
    login(b, name, next_path="/search")
    assert not b.all("#nav-audit")
    for path in ("/audit", "/audit/events", "/audit/anomalies", "/audit?who=alice"):
        b.get(path)
        assert b.find("#error-title").text == "Not allowed", path
        assert not b.all("#audit-records")
    # The refusal is in the trail, as denied.
    denied = api_records(world, principal=name, action="audit-read", result="denied")
    assert len(denied) >= 4


def test_verify_is_a_post_with_the_sessions_csrf_token(world):
    c = api_login(world.stack, "aud", "acme")
    conn = http.client.HTTPSConnection("127.0.0.1", world.stack.api_port, context=world.stack.client_context(),
                                       timeout=30)
    form = {"Content-Type": "application/x-www-form-urlencoded", "Cookie": f"mt_session={c.cookie}"}
    before = len(api_records(world, principal="aud", action="audit-read"))
    for body in ("", "csrf=" + "A" * 43):
        conn.request("POST", "/audit/verify", body=body, headers=form)
        r = conn.getresponse()
        assert r.status == 403 and b"Traceback" not in r.read()
    # Refused before the core: no verification ran (the next read is the API's own).
    assert len(api_records(world, principal="aud", action="audit-read")) == before + 1
    conn.request("POST", "/audit/verify", body="csrf=" + c.csrf, headers=form)
    r = conn.getresponse()
    assert r.status == 200 and b"verify-verdict" in r.read()
    conn.request("GET", "/audit/verify", headers={"Cookie": f"mt_session={c.cookie}"})
    r = conn.getresponse()
    r.read()
    assert r.status == 303 and r.getheader("Location") == "/audit/anomalies#verify"
    conn.close()
    c.close()


def test_the_apis_filters_and_their_scope(world):
    reads = api_records(world, principal="alice", action="read")
    assert all(r["principal"] == "user:alice" and r["action"] == "read" for r in reads)
    for query, words in (("action=delete", "action must be one of"), ("result=maybe", "result must be one of"),
                         ("after=yesterday", "after must be a date"), ("before=2026-02-30", "before: "),
                         ("after=2026-12-03&before=2026-12-01", "before must be later"),
                         ("principal=" + urllib.parse.quote("x" * 300), "principal must be")):
        r = world.aud.request("GET", "/api/v1/audit?" + query)
        assert r.status == 400 and words in r.json()["error"], (query, r.data)
    assert api_records(world, after="2999-01-01") == []
    # globex's auditor: the same filters, globex's records only.
    g = api_login(world.stack, "gaud", "globex")
    try:
        for q in ("principal=alice", "action=anomaly", "action=login-failed", ""):
            r = g.request("GET", "/api/v1/audit?limit=1000&" + q)
            assert r.status == 200
            recs = r.json()["records"]
            assert all(x["tenant"] == "globex" for x in recs), q
            assert not [x for x in recs if "alice" in x["principal"]], q
        r = g.request("GET", "/api/v1/audit?tenant=acme")
        assert r.status == 404
    finally:
        g.close()


def test_every_audit_page_passes_axe(world, browser):
    b = browser
    found = []
    login(b, "aud")
    found += b.axe("audit")
    b.get("/audit?from=2026-99-99")
    found += b.axe("audit bad date")
    b.get("/audit?from=2999-01-01")
    found += b.axe("audit empty")
    b.get("/audit/events")
    found += b.axe("events")
    b.get("/audit/anomalies")
    found += b.axe("anomalies")
    b.find("#verify-submit").click()
    b.wait_path("/audit/verify")
    found += b.axe("verify")
    assert not found, found


def test_phone_width(world, tmp_path):
    from tests.harness.browser import Browser
    b = Browser(world.base, tmp_path, width=390, height=844)
    try:
        login(b, "aud")
        for path in ("/audit", "/audit/events", "/audit/anomalies"):
            b.get(path)
            b.find("#audit-title")
            width = b.driver.execute_script("return document.documentElement.scrollWidth")
            assert width <= 400, (path, width)            # the table scrolls in its box, not the page
        b.get("/audit")
        b.screenshot("audit-phone")
    finally:
        b.close()


def test_every_string_of_the_audit_pages_has_its_german_translation():
    """Every msgid of templates/audit*.html and web/audit.py (N_) is in
    locale/de/audit.po, translated, with the same %(placeholders)s."""
    import re
    from pathlib import Path

    from babel.messages.extract import extract_from_file
    from babel.messages.pofile import read_po

    web = Path(__file__).resolve().parents[1] / "daemon/mailtresor/web"
    keywords = {"_": None, "gettext": None, "ngettext": (1, 2), "N_": None}
    wanted = set()
    for f in sorted((web / "templates").glob("audit*.html")):
        wanted |= {m for _, m, _, _ in extract_from_file("jinja2", str(f), keywords=keywords,
                                                        options={"extensions": "jinja2.ext.i18n"})}
    wanted |= {m for _, m, _, _ in extract_from_file("python", str(web / "audit.py"), keywords=keywords)}
    assert len(wanted) > 80
    with open(web / "locale/de/audit.po", "rb") as f:
        cat = read_po(f, locale="de")
    for m in wanted:
        msg = cat.get(m[0] if isinstance(m, tuple) else m)
        assert msg is not None and msg.string, m
        strings = msg.string if isinstance(msg.string, tuple) else (msg.string,)
        ids = m if isinstance(m, tuple) else (m,)
        for s in strings:
            assert s and set(re.findall(r"%\(\w+\)", s)) == set(re.findall(r"%\(\w+\)", ids[-1])), (m, s)


def test_the_pages_pure_helpers():
    from mailtresor.access.principal import Principal
    from mailtresor.web import audit as page

    assert page.visible("a\nb\x1b[1m\u202e\u200bc") == "a\\nb\\x1b[1m\\u202e\\u200bc"
    assert page.visible(None) == "" and page.visible(5) == "5"
    assert page.cell("x" * 10, 5) == ("xxxx…", "x" * 10) and page.cell("abc", 5) == ("abc", None)
    assert page.who_of("user:alice") == ("user", "alice")
    assert page.who_of("mailtresord") == ("daemon", "mailtresord")
    assert page.who_of("evil:<b>") == ("daemon", "evil:<b>")
    assert page.detail_text({"reason": "x\ny", "filter": {"principal": "a"}}) == "reason: x\\ny; filter: principal=a"
    aud = Principal(kind="user", name="aud", tenant="acme", roles=frozenset({"auditor"}))
    form, kw, errors = page.filters_of({"who": " alice ", "action": "read", "from": "2026-12-01",
                                        "to": "2026-12-31", "tenant": "globex"}, aud)
    # "to" is inclusive: the core's `before` is the next day; a tenant is not asked for by a tenant's auditor.
    assert kw == {"principal": "alice", "action": "read", "after": "2026-12-01", "before": "2027-01-01"}
    assert not errors and form["who"] == "alice"
    _, kw, errors = page.filters_of({"from": "2026-02-30", "to": "12/01/2026"}, aud)
    assert kw == {} and [label for _, label in errors] == ["From (UTC)", "To (UTC, inclusive)"]
    r = page.row({"seq": 1, "time": "2026-12-03T09:00:00.000001Z", "principal": "user:a", "object": "a" * 40,
                  "action": "read", "result": "ok", "client": "c"}, can_read=False)
    assert r["link"] is None and r["time"] == "2026-12-03 09:00:00"
    assert page.row({"object": "a" * 40}, can_read=True)["link"] == "/message/" + "a" * 40
    assert page.row({"object": "../" + "a" * 40}, can_read=True)["link"] is None
