"""The retention pages (mailtresor/web/retention.py) in real headless
Chromium against a real daemon with back-dated mail: an auditor adds a
rule through its preview (exactly what the dry run would delete and keep,
and why: a legal hold, a minimum), saves it, changes it, sees the dry run,
removes a rule after a confirmation; the German pages; an administrator
sees the rules and no form; a user gets 403; another tenant's rule is
"not found"; the forms need CSRF and keep what was typed on a 400; axe on
every page; nothing is deleted by any of it."""

from __future__ import annotations

import email.utils
import http.client
import time
import urllib.parse
from email.message import EmailMessage

import pytest

from mailtresor.access.auth import open_databases
from mailtresor.keys.client import control_fetcher
from mailtresor.lifecycle.state import open_for

from tests.harness.stack import Stack
from tests.harness.web import api_login, wait_archived

pytestmark = pytest.mark.skipif(not __import__("shutil").which("chromedriver"),
                                reason="chromium-driver is not installed (make deps)")

PW = {n: f"{n}-password-1" for n in ("alice", "aud", "adm", "gaud")}
NOW = time.time()
YEAR = 365.25 * 86400
MAIL = {"old-news": ("news@lists.example", 6), "held-news": ("news@lists.example", 6),
        "new-news": ("news@lists.example", 0.5), "old-invoice": ("billing@vendor.example", 6)}


def message(name, sender, years) -> bytes:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = sender, "team@acme.example", name
    m["Date"] = email.utils.formatdate(NOW - years * YEAR, usegmt=True)
    m["Message-ID"] = f"<{name}@web-retention.test>"
    m.set_content(f"The body of {name}.\n")
    return m.as_bytes()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("webretention")
    far = time.gmtime(NOW + 12 * 3600)
    stack = Stack(d, {"archive": {"enabled": True}, "api": {"timeout": 30}, "access": {"session_idle": 3600},
                      "lifecycle": {"run_at": f"{far.tm_hour:02d}:{far.tm_min:02d}"}}, milter=False)
    stack.start_control()
    users, _tokens = open_databases(stack.cfg, control_fetcher(stack.cfg))
    users.add("acme", "alice", PW["alice"], {"user"}, ["team@acme.example"])
    users.add("acme", "aud", PW["aud"], {"auditor"}, [])
    users.add("acme", "adm", PW["adm"], {"admin"}, [])
    users.add("globex", "gaud", PW["gaud"], {"auditor"}, [])
    stack.start_daemon()
    with stack.smtp() as s:
        for name, (sender, years) in MAIL.items():
            s.sendmail(sender, ["team@acme.example"], message(name, sender, years))
    aud = api_login(stack, "acme", "aud", PW["aud"])
    got = wait_archived(aud, len(MAIL), stack)
    ids = {r["subject"]: r["id"] for r in got["results"]}
    db = open_for(stack.cfg, control_fetcher(stack.cfg))
    db.change("acme", lambda sec: sec["holds"].__setitem__("case-7", {
        "name": "case-7", "query": "", "ids": [ids["held-news"]], "reason": "litigation", "by": "test",
        "at": NOW, "lifted": None}))
    # A minimum that keeps the invoice (a rule made through the API).
    r = aud.request("POST", "/api/v1/retention/rules", {"name": "Invoices", "minimum": "10y",
                                                        "match": {"senders": ["vendor.example"]}})
    assert r.status == 201, r.data
    yield type("World", (), {"stack": stack, "ids": ids, "aud": aud, "invoices": r.json()["rule"]["id"],
                             "base": f"https://127.0.0.1:{stack.api_port}"})
    aud.close()
    stack.close()


def web_login(b, name, tenant, landing):
    b.get("/login")
    b.login(name, PW[name], tenant)
    b.wait_path(landing)


def no_axe(b, name):
    found = b.axe(name)
    assert not found, found


def ids_in(b, table) -> set[str]:
    return {row.get_attribute("data-id") for row in b.all(f"#{table} tbody tr")}


def fill(b, **fields):
    for key, value in fields.items():
        el = b.find(f"#rule-{key}")
        el.clear()
        el.send_keys(value)


def test_auditor_adds_a_rule_through_its_preview(world, browser):
    b, ids = browser, world.ids
    web_login(b, "aud", "acme", "/search")
    b.find("#nav-retention").click()
    b.wait_at("/retention")
    assert "Invoices" in b.find("#rules").text
    no_axe(b, "rules")
    b.screenshot("retention-rules")
    # A bad rule: refused beside the form, what was typed kept.
    fill(b, name="Newsletters", minimum="9y", maximum="2y", senders="lists.example")
    b.find("#preview-submit").click()
    assert "longer than the maximum" in b.find("#form-error").text
    assert b.find("#rule-name").get_attribute("value") == "Newsletters"
    assert b.find("#rule-senders").get_attribute("value") == "lists.example"
    no_axe(b, "rules with an error")
    # The preview: exactly what the dry run would delete and keep, and why.
    b.find("#rule-minimum").clear()
    b.find("#rule-senders").send_keys("\nNews.Example")      # two lines: both carried to the save
    b.find("#preview-submit").click()
    b.find("#preview-title")
    assert ids_in(b, "plan-go") == {ids["old-news"]}
    assert ids_in(b, "plan-kept") == {ids["held-news"]}
    assert "legal hold case-7" in b.find("#plan-kept").text
    assert "1 message would be deleted" in b.find("#plan-counts").text
    no_axe(b, "preview")
    b.screenshot("retention-preview")
    api_dry = world.aud.request("POST", "/api/v1/retention/preview",
                                {"name": "Newsletters", "maximum": "2y",
                                 "match": {"senders": ["lists.example", "news.example"]}})
    assert {i["id"] for i in api_dry.json()["preview"]["items"]["go"]} == ids_in(b, "plan-go")
    # Nothing saved yet.
    assert len(world.aud.request("GET", "/api/v1/retention/rules").json()["rules"]) == 1
    b.find("#save-submit").click()
    b.wait_path("/retention?tenant=acme&done=added")
    assert "saved" in b.find("#done").text
    row = [r for r in b.all("#rules tbody tr") if "Newsletters" in r.text][0]
    assert "lists.example" in row.text and "2y" in row.text
    rules = world.aud.request("GET", "/api/v1/retention/rules").json()["rules"]
    new = next(r for r in rules if r["name"] == "Newsletters")
    assert new["match"] == {"senders": ["lists.example", "news.example"]}, new
    assert new["maximum"] == "2y" and new["basis"] == "date"

    # The dry run page: the same set; nothing deleted.
    b.find("#dry-run-link").click()
    b.find("#dry-run-title")
    assert ids_in(b, "plan-go") == {ids["old-news"]}
    assert ids_in(b, "plan-kept") == {ids["held-news"]}
    no_axe(b, "dry run")
    assert world.aud.request("GET", "/api/v1/search?q=").json()["total"] == len(MAIL)

    # Change the rule: a minimum of the invoices rule now also in the preview.
    b.get(f"/retention/rules/{new['id']}?tenant=acme")
    assert b.find("#rule-maximum").get_attribute("value") == "2y"
    no_axe(b, "change")
    fill(b, maximum="3m")
    b.find("#preview-submit").click()
    b.find("#preview-title")
    assert ids_in(b, "plan-go") == {ids["old-news"], ids["new-news"]}
    b.find("#save-submit").click()
    b.wait_path("/retention?tenant=acme&done=changed")
    assert "3m" in [r for r in b.all("#rules tbody tr") if "Newsletters" in r.text][0].text

    # Remove, after a confirmation.
    b.find(f"tr[data-rule='{new['id']}'] a.rule-remove").click()
    b.find("#remove-submit")
    no_axe(b, "remove")
    b.find("#remove-submit").click()
    b.wait_path("/retention?tenant=acme&done=removed")
    assert "removed" in b.find("#done").text
    assert not b.all(f"tr[data-rule='{new['id']}']")


def test_german_pages(world, browser):
    b = browser
    web_login(b, "aud", "acme", "/search")
    b.get("/language?set=de&next=/retention")
    b.wait_at("/retention")
    assert b.find("h1").text == "Aufbewahrung"
    assert b.find("#preview-submit").text == "Vorschau"
    no_axe(b, "rules (de)")
    fill(b, name="Alles", maximum="5y")
    b.find("#preview-submit").click()
    b.find("#preview-title")
    assert "Vorschau" in b.find("#preview-title").text
    assert "Mindestfrist von Invoices" in b.find("#plan-kept").text
    assert "Rechtliche Aufbewahrungspflicht case-7" in b.find("#plan-kept").text or \
        "case-7" in b.find("#plan-kept").text
    no_axe(b, "preview (de)")
    b.get("/retention/dry-run")
    b.find("#dry-run-title")
    assert b.find("#dry-run-title").text.startswith("Probelauf")
    no_axe(b, "dry run (de)")
    b.screenshot("retention-dry-run-de")
    b.get("/language?set=en&next=/retention")
    b.wait_at("/retention")


def test_admin_reads_user_refused_other_tenant_not_found(world, browser):
    b = browser
    web_login(b, "adm", "acme", "/admin")
    b.find("#nav-retention").click()
    b.wait_at("/retention")
    assert "Invoices" in b.find("#rules").text
    assert not b.all("#rule-form") and not b.all("#dry-run-link") and not b.all("a.rule-remove")
    no_axe(b, "rules (admin)")
    b.get("/retention/dry-run")
    assert b.find("#error-title").text == "Not allowed"

    def page(name, tenant, path, form=None):
        c = api_login(world.stack, tenant, name, PW[name])
        conn = http.client.HTTPSConnection("127.0.0.1", world.stack.api_port,
                                           context=world.stack.client_context(), timeout=20)
        try:
            headers = {"Cookie": f"mt_session={c.cookie}"}
            if form is not None:
                headers["Content-Type"] = "application/x-www-form-urlencoded"
                form = urllib.parse.urlencode({"csrf": c.csrf, **form} if "csrf" not in form else form)
            conn.request("POST" if form is not None else "GET", path, body=form, headers=headers)
            r = conn.getresponse()
            body = r.read().decode()
            assert "Traceback" not in body
            return r.status, body
        finally:
            conn.close()
            c.close()
    assert page("alice", "acme", "/retention")[0] == 403
    rid = world.invoices
    assert page("gaud", "globex", f"/retention/rules/{rid}?tenant=acme")[0] == 404
    assert page("gaud", "globex", f"/retention/rules/{rid}")[0] == 404
    assert page("gaud", "globex", f"/retention/rules/{rid}/remove", {"tenant": "acme"})[0] == 404
    assert page("adm", "acme", "/retention/save", {"name": "x", "maximum": "1d"})[0] == 403
    # CSRF: a form without the session's token changes nothing.
    status, _ = page("aud", "acme", "/retention/save", {"csrf": "x", "name": "all", "maximum": "1d"})
    assert status == 403
    assert [r["name"] for r in world.aud.request("GET", "/api/v1/retention/rules").json()["rules"]] == ["Invoices"]


def test_phone_width(world, tmp_path):
    from tests.harness.browser import Browser
    b = Browser(world.base, tmp_path, width=390, height=844)
    try:
        web_login(b, "aud", "acme", "/search")
        for path in ("/retention", f"/retention/rules/{world.invoices}", "/retention/dry-run"):
            b.get(path)
            b.find("main h1")
            width = b.driver.execute_script("return document.documentElement.scrollWidth")
            assert width <= 400, (path, width)
        b.screenshot("retention-dry-run-phone")
    finally:
        b.close()
