"""The web UI's export pages in real headless Chromium (tests/harness/browser.py)
against a real daemon (tests/harness/stack.py) with mail sent over SMTP:
an auditor runs a zip export of a search to completion through the
progress page and downloads it (manifest = the API's search, each .eml =
/raw); an mbox export of a selection; the list, newest first; another
user's export by URL and through the API; an administrator; the form
without its CSRF token; the page's refusals; axe-core and screenshots."""

from __future__ import annotations

import http.client
import io
import json
import time
import urllib.parse
import zipfile

import pytest

from mailtresor.access.auth import open_databases
from mailtresor.access.core import mbox_messages
from mailtresor.keys.client import control_fetcher

from tests.harness.stack import Stack
from tests.harness.web import api_login as web_api_login, wait_archived
from tests.test_api import Client, mail

pytestmark = pytest.mark.skipif(not __import__("shutil").which("chromedriver"),
                                reason="chromium-driver is not installed (make deps)")

PW = {n: f"{n}-password-1" for n in ("ann", "ben", "aud", "adm")}
# 16 messages: "report" in 9 subjects (6 to ann, 3 to ben), 7 others.
MAILS = ([("bob@acme.example", "ann@acme.example", f"report {i}") for i in range(6)]
         + [("bob@acme.example", "ben@acme.example", f"report for ben {i}") for i in range(3)]
         + [("carol@acme.example", "ann@acme.example", f"lunch {i}") for i in range(4)]
         + [("carol@acme.example", "dave@acme.example", f"minutes {i}") for i in range(3)])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("webexports")
    stack = Stack(d, {"archive": {"enabled": True}, "api": {"timeout": 20},
                      "access": {"session_idle": 3600}}, milter=False)
    stack.start_control()
    users, _tokens = open_databases(stack.cfg, control_fetcher(stack.cfg))
    users.add("acme", "ann", PW["ann"], {"user"}, ["ann@acme.example"])
    users.add("acme", "ben", PW["ben"], {"user"}, ["ben@acme.example"])
    users.add("acme", "aud", PW["aud"], {"auditor"}, [])
    users.add("acme", "adm", PW["adm"], {"admin"}, [])
    stack.start_daemon()
    with stack.smtp() as s:
        for frm, to, subject in MAILS:
            s.sendmail(frm, [to], mail(frm, to, subject, attachment=b"\x00att" if "report" in subject else None))
    aud = api_login(stack, "aud")
    got = wait_archived(aud, len(MAILS), stack, limit=100)
    ids = {r["subject"]: r["id"] for r in got["results"]}
    yield type("World", (), {"stack": stack, "ids": ids, "aud": aud,
                             "base": f"https://127.0.0.1:{stack.api_port}"})
    aud.close()
    stack.close()


def api_login(stack, name) -> Client:
    return web_api_login(stack, "acme", name, PW[name])


def login(b, name, next_path="/exports"):
    b.get(next_path)
    b.wait_path("/login")
    b.login(name, PW[name], "acme")
    b.wait_path(next_path)


def job_id(b) -> str:
    b.wait_path("/exports/")
    return b.path().split("/")[2].split("?")[0]


def wait_done(b, seen: list | None = None, timeout: float = 30.0) -> dict:
    """Watch the page's bar until the job is done (the page's own script
    updates it); every distinct (value, max) observed goes into `seen`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = b.driver.execute_script(
            "const p = document.getElementById('export-progress'), box = document.getElementById('export-job');"
            "return {value: p.value, max: p.max, state: box.dataset.state,"
            " download: !document.getElementById('export-download').hidden};")
        if seen is not None and (not seen or seen[-1] != (st["value"], st["max"])):
            seen.append((st["value"], st["max"]))
        if st["state"] in ("done", "failed"):
            return st
        time.sleep(0.05)
    raise AssertionError(f"the export did not finish: {st}")


def post_selection(b, ids, fmt="mbox"):
    """Post the export form of a selection as the search page does (fields
    csrf, format, one `id` per message), from a page of ours (the form's
    CSRF token is the page's)."""
    b.driver.execute_script(
        "const f = document.createElement('form'); f.method = 'post'; f.action = '/exports';"
        "const add = (n, v) => { const i = document.createElement('input'); i.type = 'hidden';"
        " i.name = n; i.value = v; f.appendChild(i); };"
        "add('csrf', document.querySelector('input[name=csrf]').value); add('format', arguments[1]);"
        "arguments[0].forEach(v => add('id', v)); document.body.appendChild(f); f.submit();", ids, fmt)


def test_auditor_exports_a_search_as_zip_through_the_progress_bar(world, browser):
    b = browser
    login(b, "aud")
    assert b.find("#no-exports")
    found = b.axe("exports (empty)")
    b.find("#export-q").send_keys("report")
    b.find("#export-format option[value=zip]").click()
    b.find("#export-submit").click()
    jid = job_id(b)
    seen = []
    st = wait_done(b, seen)
    assert st["state"] == "done" and st["value"] == st["max"] and st["download"], (st, seen)
    assert b.find("#export-state").text == "done"
    assert b.find("#export-what").text == "Search: report"
    assert not b.find("#export-refresh").is_displayed()
    b.screenshot("export-progress")
    found += b.axe("export job")
    # The script's own path: the page as it was while running; the script
    # polls the API and draws the bar to its end.
    b.driver.execute_script(
        "const p = document.getElementById('export-progress'); p.value = 0;"
        "document.getElementById('export-job').dataset.state = 'running';"
        "document.getElementById('export-download').hidden = true;"
        "document.getElementById('export-state').textContent = 'running';"
        "window.dispatchEvent(new PageTransitionEvent('pageshow'));")
    st = wait_done(b, seen)
    assert st["value"] == st["max"] and st["download"] and b.find("#export-state").text == "done", st
    polled = [u for u in b.requested_urls() if u.endswith(f"/api/v1/exports/{jid}")]
    assert polled, "the page's script did not ask the API"
    # Download it from the page and compare with what the API's search finds.
    b.find("#export-download").click()
    data = b.wait_download(f"export-{jid}.zip")
    api = world.aud.request("GET", "/api/v1/search?q=report&limit=100").json()
    want = {r["id"] for r in api["results"]}
    assert api["total"] == len(want) == 9
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        manifest = json.loads(z.read("manifest.json"))
        assert {m["id"] for m in manifest["messages"]} == want and manifest["missing"] == 0
        assert manifest["query"] == "report"
        assert sorted(z.namelist()) == sorted([f"{i}.eml" for i in want] + ["manifest.json"])
        for m in manifest["messages"]:
            raw = world.aud.request("GET", f"/api/v1/messages/{m['id']}/raw")
            assert raw.status == 200 and z.read(m["file"]) == raw.data, m["id"]
    assert max(v for v, _ in seen) == st["max"], seen
    b.logs()
    assert not [e for e in b.console if e["level"] == "SEVERE"], b.console
    assert not found, found


def test_selection_as_mbox_and_the_list_newest_first(world, browser):
    b = browser
    # An earlier export of the same auditor (through the API: the same owner).
    r = world.aud.request("POST", "/api/v1/exports", {"query": "lunch", "format": "zip"})
    assert r.status == 202, r.data
    earlier = r.json()["id"]
    deadline = time.monotonic() + 30
    while world.aud.request("GET", f"/api/v1/exports/{earlier}").json()["state"] != "done":
        assert time.monotonic() < deadline, "the earlier export did not finish"
        time.sleep(0.1)
    login(b, "aud")
    chosen = [world.ids[s] for s in ("lunch 0", "minutes 1", "report for ben 2")]
    post_selection(b, chosen + ["f" * 40], "mbox")       # one id that is not stored
    jid = job_id(b)
    st = wait_done(b)
    assert st["state"] == "done" and st["value"] == st["max"] == 4, st
    assert b.find("#export-what").text == "4 selected messages"
    assert b.find("#export-missing").text == "1"
    b.find("#export-download").click()
    data = b.wait_download(f"export-{jid}.mbox")
    got = mbox_messages(data)
    assert got == [world.aud.request("GET", f"/api/v1/messages/{i}/raw").data for i in chosen]
    b.find("#back").click()
    b.wait_path("/exports")
    rows = b.all("#export-list tbody tr")
    assert [r.get_attribute("data-id") for r in rows][:2] == [jid, earlier]
    assert [r.find_element("css selector", "td.what").text for r in rows[:2]] == \
        ["4 selected messages", "Search: lunch"]
    assert [r.find_element("css selector", "td.format").text for r in rows[:2]] == ["mbox", "zip"]
    assert all(r.find_element("css selector", "td.state").text == "done" for r in rows)
    assert len(b.all("#export-list a.download")) == len(rows)
    b.screenshot("exports-list")
    found = b.axe("exports list")
    # The page's list is the API's listing.
    api = world.aud.request("GET", "/api/v1/exports").json()["exports"]
    assert [r.get_attribute("data-id") for r in rows] == [j["id"] for j in api]
    # A phone's width: the list and the job page scroll no sideways.
    b.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                             {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
    for path in ("/exports", f"/exports/{jid}"):
        b.get(path)
        b.find("#export-list" if path == "/exports" else "#export-progress")
        width = b.driver.execute_script("return document.documentElement.scrollWidth")
        assert width <= 400, (path, width)
    b.screenshot("exports-phone")
    assert not found, found


def test_another_users_export_is_not_found(world, browser, tmp_path):
    b = browser
    login(b, "ann")
    post_selection(b, [world.ids["report 0"], world.ids["report for ben 0"]], "zip")
    jid = job_id(b)
    st = wait_done(b)
    assert st["state"] == "done" and b.find("#export-missing").text == "1"    # ben's is not hers
    b.find("#logout").click()
    b.wait_path("/login")
    login(b, "ben")
    assert jid not in b.driver.page_source
    b.get(f"/exports/{jid}")
    assert b.find("#error-title").text == "Not found"
    for bad in ("..%2f..%2fetc", "zzzz", "0" * 32, jid.upper()):
        b.get(f"/exports/{bad}")
        assert b.find("#error-title").text == "Not found", bad
    b.get(f"/api/v1/exports/{jid}/download")
    assert "no such export" in b.driver.page_source
    assert not list(b.downloads.glob("export-*"))
    ben = api_login(world.stack, "ben")
    for path in (f"/api/v1/exports/{jid}", f"/api/v1/exports/{jid}/download"):
        assert ben.request("GET", path).status == 404
    assert jid not in {j["id"] for j in ben.request("GET", "/api/v1/exports").json()["exports"]}
    # Not the auditor's either: exports belong to whoever started them.
    assert world.aud.request("GET", f"/api/v1/exports/{jid}/download").status == 404
    ben.close()


def _form_post(world, cookie, body):
    c = http.client.HTTPSConnection("127.0.0.1", world.stack.api_port, context=world.stack.client_context(),
                                    timeout=10)
    c.request("POST", "/exports", body=body, headers={"Content-Type": "application/x-www-form-urlencoded",
                                                      "Cookie": f"mt_session={cookie}"})
    r = c.getresponse()
    data = r.read()
    c.close()
    assert b"Traceback" not in data
    return r.status, r.getheader("Location"), data.decode()


def test_the_form_needs_the_sessions_csrf_token(world):
    ann = api_login(world.stack, "ann")
    before = ann.request("GET", "/api/v1/exports").json()["exports"]

    def starts():
        records = world.aud.request("GET", "/api/v1/audit?limit=1000").json()["records"]
        return [r for r in records if r["principal"] == "user:ann" and r["action"] == "export"
                and not (r.get("detail") or {}).get("list") and not (r.get("detail") or {}).get("status")]
    started = starts()
    form = urllib.parse.urlencode({"q": "", "format": "zip"})
    for body in (form, form + "&csrf=", form + "&csrf=" + "A" * 43):
        status, _, page = _form_post(world, ann.cookie, body)
        assert status == 403 and "CSRF" in page, status
    assert ann.request("GET", "/api/v1/exports").json()["exports"] == before        # no job started
    assert starts() == started                                                    # nor asked the core
    status, where, _ = _form_post(world, ann.cookie, form + "&csrf=" + urllib.parse.quote(ann.csrf))
    assert status == 303 and where.startswith("/exports/")
    assert len(ann.request("GET", "/api/v1/exports").json()["exports"]) == len(before) + 1
    assert len(starts()) == len(started) + 1
    ann.close()


def test_refusals_are_shown_on_the_exports_page(world):
    aud = api_login(world.stack, "aud")
    csrf = "&csrf=" + urllib.parse.quote(aud.csrf)
    for body, reason in (("format=pst&q=x", "format must be one of mbox, zip"),
                         ("format=zip", "Select messages or enter a search to export."),
                         ("format=zip&q=x&id=" + "a" * 40, "Export either a search or selected messages, not both."),
                         ("format=mbox&id=nope", "is not a message id"),
                         ("format=zip&q=%22unclosed", "bad query"),
                         # A reason that holds the user's "%" is shown as it is (not a format string).
                         ("format=zip&q=" + urllib.parse.quote("date:20%zz"), "bad date '20%zz'")):
        status, _, page = _form_post(world, aud.cookie, body + csrf)
        assert status == 400 and 'id="export-error"' in page and reason in page.replace("&#39;", "'"), (body, page)
        assert 'id="export-form"' in page
    # Not a form at all: a clear 415, not a crash.
    c = http.client.HTTPSConnection("127.0.0.1", world.stack.api_port, context=world.stack.client_context(),
                                    timeout=10)
    c.request("POST", "/exports", body="{}", headers={"Content-Type": "application/json",
                                                      "Cookie": f"mt_session={aud.cookie}"})
    r = c.getresponse()
    assert r.status == 415 and b"Traceback" not in r.read()
    c.close()
    aud.close()


def test_an_administrator_is_refused(world, browser):
    b = browser
    login(b, "adm", next_path="/search")
    assert not b.all("#nav-exports")
    b.get("/exports")
    assert b.find("#error-title").text == "Not allowed"
    assert b.find("#error-reason").text == "administrators do not read mail"
    found = b.axe("exports refused")
    adm = api_login(world.stack, "adm")
    status, _, page = _form_post(world, adm.cookie, "q=&format=zip&csrf=" + urllib.parse.quote(adm.csrf))
    assert status == 403 and "administrators do not read mail" in page
    adm.close()
    assert not found, found


# --- without a browser ------------------------------------------------------------------

def test_selection_of_the_form():
    from mailtresor.access.http import HttpError
    from mailtresor.web.exports import form_values, selection
    aid = "a" * 40
    assert selection(form_values(b"format=zip&q=report")) == ("zip", "report", None)
    assert selection(form_values(b"format=zip&q=")) == ("zip", "", None)
    assert selection(form_values(f"format=mbox&id={aid}&id={'b' * 40}&csrf=x".encode())) == \
        ("mbox", None, [aid, "b" * 40])
    for body, reason in ((b"format=zip", "Select messages"), (b"format=zip&id=", "Select messages"),
                         (f"format=zip&q=x&id={aid}".encode(), "not both"), (b"q=x", "format must be"),
                         (b"format=pst&q=x", "format must be"), (b"format=zip&id=../../x", "not a message id")):
        with pytest.raises(HttpError) as e:
            selection(form_values(body))
        assert e.value.status == 400 and reason in e.value.reason, body


def test_the_page_refreshes_itself_without_script_only_while_running():
    from mailtresor.web import exports
    from mailtresor.web.site import Web
    web = Web(type("Api", (), {})())
    who = type("Who", (), {"name": "aud", "tenant": "acme", "can": lambda self, verb: True})()
    job = {"id": "a" * 32, "done": 3, "total": 9, "format": "zip", "size": 10, "missing": 0, "query": "x",
           "created": "2026-01-01T00:00:00Z", "expires": "2026-01-02T00:00:00Z"}
    for state, refresh in (("queued", True), ("running", True), ("done", False), ("failed", False)):
        html = web.page("export.html", who, csrf="t", job=dict(job, state=state), states=exports.STATES,
                        formats=exports.FORMATS).decode()
        assert ('<noscript><meta http-equiv="refresh" content="2"></noscript>' in html) is refresh, state
        assert ('id="export-refresh" hidden' not in html) is refresh, state
        assert ('id="export-download" hidden' not in html) is (state == "done"), state
        assert '<script src="/static/exports.js" defer></script>' in html and "<script>" not in html
    # An empty job (every id left out) still draws a valid bar.
    html = web.page("export.html", who, csrf="t", job=dict(job, state="done", done=0, total=0),
                    states=exports.STATES, formats=exports.FORMATS).decode()
    assert '<progress id="export-progress" max="1" value="1">' in html


def test_every_string_has_its_german_translation():
    """Every msgid of the export pages (templates and exports.py) is in
    locale/de/exports.po, translated (plural forms too)."""
    from pathlib import Path

    from babel.messages.extract import extract_from_file
    from babel.messages.pofile import read_po
    web = Path(__file__).resolve().parents[1] / "daemon/mailtresor/web"
    with open(web / "locale/de/exports.po", "rb") as f:
        cat = read_po(f, locale="de")
    assert cat.plural_forms == "nplurals=2; plural=(n != 1);"
    have = {}
    for m in cat:
        if m.id:
            have[m.id if isinstance(m.id, str) else m.id[0]] = m.string
    keywords = {"_": None, "gettext": None, "ngettext": (1, 2), "N_": None}
    wanted = set()
    for name in ("templates/exports.html", "templates/export.html"):
        for _, msg, _, _ in extract_from_file("jinja2.ext:babel_extract", web / name, keywords=keywords,
                                              options={"extensions": "jinja2.ext.i18n", "newstyle_gettext": "true"}):
            wanted.add(msg if isinstance(msg, str) else msg[0])
    for _, msg, _, _ in extract_from_file("python", web / "exports.py", keywords=keywords):
        wanted.add(msg if isinstance(msg, str) else msg[0])
    assert len(wanted) > 30
    missing = sorted(m for m in wanted if not have.get(m) or (isinstance(have[m], tuple) and not all(have[m])))
    assert not missing, missing
