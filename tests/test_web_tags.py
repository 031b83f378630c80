"""Case tags on the message page (web/tags.py, templates/message_tags.html)
in real headless Chromium against a real daemon: the auditor sees the
classification tag the tenant's rule gave (the customer's Exchange header),
adds a case tag, sees it, finds the message by tag:..., a bad tag is
refused by the field, removes it again; a user of the tenant sees the
classification but no case tags and no form, and a forged POST is 403;
the German page; axe on each."""

from __future__ import annotations

import http.client
import urllib.parse

import pytest

from mailtresor.access.auth import open_databases
from mailtresor.keys.client import control_fetcher

from tests.harness.stack import Stack
from tests.harness.web import api_login, wait_archived

pytestmark = pytest.mark.skipif(not __import__("shutil").which("chromedriver"),
                                reason="chromium-driver is not installed (make deps)")

PW = {n: f"{n}-password-1" for n in ("alice", "aud")}
MAIL = (b"From: <bob@globex.example>\r\nTo: <alice@acme.example>\r\nSubject: Board minutes\r\n"
        b"Date: Fri, 01 Mar 2024 10:00:00 +0000\r\nMessage-ID: <board-1@globex.example>\r\n"
        b"X-Acme-Classification: Confidential\r\n\r\nMinutes.\r\n")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("webtags"), {
        "archive": {"enabled": True}, "api": {"timeout": 20}, "access": {"session_idle": 3600},
        "tenant": [{"name": "acme", "domains": ["acme.example"],
                    "classify": [{"tag": "confidential", "header": "X-Acme-Classification",
                                  "equals": "Confidential"}]},
                   {"name": "globex", "domains": ["globex.example"]}]}, milter=False)
    stack.start_control()
    users, _ = open_databases(stack.cfg, control_fetcher(stack.cfg))
    users.add("acme", "alice", PW["alice"], {"user"}, ["alice@acme.example"])
    users.add("acme", "aud", PW["aud"], {"auditor"}, [])
    stack.start_daemon()
    with stack.smtp() as s:
        s.sendmail("bob@globex.example", ["alice@acme.example"], MAIL)
    aud = api_login(stack, "acme", "aud", PW["aud"])
    (hit,) = wait_archived(aud, 1, stack)["results"]
    yield type("World", (), {"stack": stack, "aid": hit["id"], "aud": aud,
                             "base": f"https://127.0.0.1:{stack.api_port}"})
    aud.close()
    stack.close()


def login(b, name, path):
    b.get(path)
    b.wait_path("/login")
    b.login(name, PW[name], "acme")
    b.wait_path(path)


def test_auditor_adds_finds_and_removes_a_case_tag(world, browser):
    b, aid = browser, world.aid
    login(b, "aud", f"/message/{aid}")
    assert b.find("#classification-tags").text.strip() == "confidential"
    assert b.find("#no-case-tags")
    assert b.axe("message with the tag form") == []
    field = b.find("#case-tag")
    field.clear()
    field.send_keys("case:acme-v-smith")
    b.find("#case-tag-add").click()
    # The same path again: wait for an element of the new page.
    tag = b.find("#case-tag-list .case-tag")
    assert tag.text == "case:acme-v-smith" and not b.all("#no-case-tags")
    b.screenshot("case-tag-added")
    # Found by tag:, and shown in the result row.
    b.get("/search?" + urllib.parse.urlencode({"q": "tag:case:acme-v-smith"}))
    assert b.find(f"#results a[href='/message/{aid}']").text == "Board minutes"
    # A tag outside the case namespace: refused by the field, typed value kept.
    b.get(f"/message/{aid}")
    field = b.find("#case-tag")
    field.clear()
    field.send_keys("review")
    b.find("#case-tag-add").click()
    err = b.find("#case-tag-error")
    assert "begins with case:" in err.text
    assert b.find("#case-tag").get_attribute("aria-invalid") == "true"
    assert b.find("#case-tag").get_attribute("value") == "review"
    assert b.axe("message with a tag error") == []
    # Removed again.
    b.find("#case-tag-list .remove-case-tag").click()
    b.find("#no-case-tags")
    assert world.aud.request("GET", f"/api/v1/messages/{aid}").json()["case_tags"] == []
    b.logs()
    # (The refused tag's 400 answer is the one error the console may hold.)
    assert not [e for e in b.console if e["level"] == "SEVERE" and "status of 400" not in e["message"]], b.console


def test_a_user_sees_no_case_tags_and_no_form(world, browser):
    b, aid = browser, world.aid
    r = world.aud.request("POST", f"/api/v1/messages/{aid}/tags", {"add": ["case:secret-probe"]})
    assert r.status == 200, r.data
    login(b, "alice", f"/message/{aid}")
    assert b.find("#subject").text == "Board minutes"
    assert b.find("#classification-tags").text.strip() == "confidential"
    assert not b.all("#case-tag-form") and not b.all("#case-tag-list")
    assert "secret-probe" not in b.driver.page_source
    assert b.axe("message as a user") == []
    # A forged form post with her own session and token: 403, nothing changed.
    alice = api_login(world.stack, "acme", "alice", PW["alice"])
    c = http.client.HTTPSConnection("127.0.0.1", world.stack.api_port, context=world.stack.client_context(),
                                    timeout=30)
    c.request("POST", f"/message/{aid}/tags",
              body=urllib.parse.urlencode({"csrf": alice.csrf, "op": "remove", "tag": "case:secret-probe"}),
              headers={"Cookie": f"mt_session={alice.cookie}",
                       "Content-Type": "application/x-www-form-urlencoded"})
    resp = c.getresponse()
    body = resp.read()
    assert resp.status == 403 and b"Traceback" not in body
    c.close()
    assert world.aud.request("GET", f"/api/v1/messages/{aid}").json()["case_tags"] == ["case:secret-probe"]
    # Without the session's CSRF token: refused before anything is looked at.
    c = http.client.HTTPSConnection("127.0.0.1", world.stack.api_port, context=world.stack.client_context(),
                                    timeout=30)
    aud = world.aud
    c.request("POST", f"/message/{aid}/tags",
              body=urllib.parse.urlencode({"csrf": "wrong", "op": "remove", "tag": "case:secret-probe"}),
              headers={"Cookie": f"mt_session={aud.cookie}", "Content-Type": "application/x-www-form-urlencoded"})
    assert c.getresponse().status == 403
    c.close()
    assert world.aud.request("GET", f"/api/v1/messages/{aid}").json()["case_tags"] == ["case:secret-probe"]


def test_german(world, browser):
    b, aid = browser, world.aid
    login(b, "aud", f"/message/{aid}")
    b.get(f"/language?set=de&next=/message/{aid}")
    assert b.find("#case-tags-h").text == "Klassifizierung und Fall-Schlagwörter"
    assert b.find("#case-tag-add").text == "Fall-Schlagwort hinzufügen"
    assert b.find("html").get_attribute("lang") == "de"
    assert b.axe("message, German") == []
    b.screenshot("case-tags-de")
