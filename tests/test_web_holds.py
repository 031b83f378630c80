"""The legal holds and deletion request pages in real headless Chromium
against a real daemon: an auditor places a hold through the form and sees
it as a badge on a message and through the hold:NAME search; a deletion is
requested from the search page's selection by one auditor and approved by
another (the requester is offered no buttons); a request under a hold is
refused with its reasons shown; the pages in German; axe on every page.
Over plain HTTPS: a user gets no holds pages and no link to them, and the
web's four-eyes refusal for a requester who posts the approval anyway."""

from __future__ import annotations

import http.client
import urllib.parse

import pytest

from mailtresor.access.auth import open_databases
from mailtresor.keys.client import control_fetcher

from tests.harness.stack import Stack
from tests.harness.web import api_login, wait_archived
from tests.test_api import mail

pytestmark = pytest.mark.skipif(not __import__("shutil").which("chromedriver"),
                                reason="chromium-driver is not installed (make deps)")

PW = {n: f"{n}-password-1" for n in ("aud", "aud2", "alice")}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("webholds")
    stack = Stack(d, {"archive": {"enabled": True}, "api": {"timeout": 120},
                      "access": {"session_idle": 3600, "throttle_failures": 50}}, milter=False)
    stack.start_control()
    users, _ = open_databases(stack.cfg, control_fetcher(stack.cfg))
    users.add("acme", "aud", PW["aud"], {"auditor"}, [])
    users.add("acme", "aud2", PW["aud2"], {"auditor"}, [])
    users.add("acme", "alice", PW["alice"], {"user"}, ["alice@acme.example"])
    stack.start_daemon()
    with stack.smtp() as s:
        for subject in ("merger plans", "merger followup", "lunch menu", "old newsletter"):
            s.sendmail("bob@acme.example", ["alice@acme.example"],
                       mail("bob@acme.example", "alice@acme.example", subject))
    aud = api_login(stack, "acme", "aud", PW["aud"])
    got = wait_archived(aud, 4, stack)
    ids = {r["subject"]: r["id"] for r in got["results"]}
    yield type("World", (), {"stack": stack, "aud": aud, "ids": ids,
                             "base": f"https://127.0.0.1:{stack.api_port}"})
    aud.close()
    stack.close()


def login(b, name):
    b.get("/login")
    b.login(name, PW[name], "acme")
    b.wait_path("/search")


def logout(b):
    b.find("#logout").click()
    b.wait_path("/login")


def no_axe(b, name):
    found = b.axe(name)
    assert not found, found


def test_place_a_hold_and_see_it_on_the_message_and_in_the_search(world, browser):
    b = browser
    login(b, "aud")
    b.find("#nav-holds").click()
    b.wait_at("/holds")
    assert b.find("#no-holds")
    no_axe(b, "holds")
    # A bad query: refused beside the form, what was typed kept.
    b.find("#hold-name").send_keys("case-merger")
    b.find("#hold-reason").send_keys("Merger litigation")
    b.find("#hold-query").send_keys("subject:(merger")
    b.find("#place-submit").click()
    assert "bad query" in b.find("#form-error").text
    assert b.find("#hold-name").get_attribute("value") == "case-merger"
    no_axe(b, "holds with an error")
    b.find("#hold-query").clear()
    b.find("#hold-query").send_keys("subject:merger")
    b.find("#place-submit").click()
    b.wait_at("/holds/case-merger")
    assert b.find("#done").text and b.find("#hold-covers").text == "2"
    no_axe(b, "hold")
    b.screenshot("hold")
    b.find("#hold-search").click()
    b.wait_at("/search")
    b.find("#results")
    assert {e.text for e in b.all("#results td.subject a")} == {"merger plans", "merger followup"}
    b.get(f"/message/{world.ids['merger plans']}")
    badge = b.find("#holds a.hold")
    assert badge.text == "case-merger"
    no_axe(b, "message with a hold")
    badge.click()
    b.wait_at("/holds/case-merger")
    b.get(f"/message/{world.ids['lunch menu']}")
    b.find("#subject")
    assert not b.all("#holds")


def test_request_from_the_selection_and_approve_as_another_auditor(world, browser):
    b = browser
    login(b, "aud")
    b.get("/search?q=" + urllib.parse.quote("subject:newsletter"))
    b.find(f"#sel-{world.ids['old newsletter']}").click()
    b.find("#request-deletion-selected").click()
    b.wait_at("/deletion-requests/new")
    assert b.find("#request-ids").get_attribute("value").strip() == world.ids["old newsletter"]
    no_axe(b, "new request")
    b.find("#request-reason").send_keys("Art. 17 erasure, ticket 4711")
    b.find("#request-submit").click()
    b.find("#request-title")
    assert b.find("#request-state").get_attribute("data-state") == "pending"
    rid = b.path().split("?")[0].rsplit("/", 1)[1]
    # The requester is offered no decision, only the note.
    assert b.find("#own-request") and not b.all("#approve")
    no_axe(b, "own pending request")
    logout(b)
    login(b, "aud2")
    b.get("/deletion-requests")
    b.find(f'tr[data-request="{rid}"] a.request-link').click()
    b.wait_at(f"/deletion-requests/{rid}")
    no_axe(b, "pending request")
    b.find("#approve").click()
    b.find("#done")
    assert b.find("#request-state").get_attribute("data-state") == "approved"
    assert b.find("#request-deleted").text.startswith("1")
    no_axe(b, "approved request")
    b.get(f"/message/{world.ids['old newsletter']}")
    assert b.find("#error-title")


def test_a_refused_request_shows_its_reasons(world, browser):
    r = world.aud.request("POST", "/api/v1/deletion-requests",
                          {"reason": "erasure", "ids": [world.ids["merger followup"], world.ids["lunch menu"]]})
    assert r.status == 201, r.data
    rid = r.json()["id"]
    b = browser
    login(b, "aud2")
    b.get(f"/deletion-requests/{rid}")
    # While pending: what would refuse it now.
    assert b.find("#reasons-title") and b.find(f'#refusals tr[data-message="{world.ids["merger followup"]}"]')
    b.find("#approve").click()
    b.find("#done")
    assert b.find("#request-state").get_attribute("data-state") == "refused"
    row = b.find(f'#refusals tr[data-message="{world.ids["merger followup"]}"]')
    assert row.find_element("css selector", "a.refusal-hold").text == "case-merger"
    assert len(b.all("#refusals tbody tr")) == 1
    no_axe(b, "refused request")
    b.screenshot("refused")
    # Nothing was deleted.
    b.get(f"/message/{world.ids['lunch menu']}")
    assert b.find("#subject").text == "lunch menu"


def test_german_pages(world, browser):
    b = browser
    login(b, "aud")
    b.get("/language?set=de&next=/holds")
    b.wait_at("/holds")
    assert b.find("h1").text.startswith("Aufbewahrungssperren")
    assert b.find("#place-title").text == "Aufbewahrungssperre setzen"
    no_axe(b, "holds (de)")
    b.get("/holds/case-merger")
    assert "Erfasst derzeit" in b.find("#hold-facts").text
    no_axe(b, "hold (de)")
    b.get("/deletion-requests")
    assert b.find("h1").text.startswith("Löschanträge")
    no_axe(b, "requests (de)")
    b.find("#new-request").click()
    b.wait_at("/deletion-requests/new")
    assert b.find("#request-submit").text == "Löschung beantragen"
    no_axe(b, "new request (de)")
    b.get("/language?set=en&next=/search")


def _http(world, cookie, method, path, fields=None):
    conn = http.client.HTTPSConnection("127.0.0.1", world.stack.api_port, context=world.stack.client_context(),
                                       timeout=20)
    try:
        headers = {"Cookie": f"mt_session={cookie}"}
        body = None
        if fields is not None:
            body = urllib.parse.urlencode(fields)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        r.body = r.read().decode("utf-8", "replace")
        assert "Traceback" not in r.body
        return r
    finally:
        conn.close()


def test_users_get_no_holds_pages_and_the_requester_cannot_approve(world):
    alice = api_login(world.stack, "acme", "alice", PW["alice"])
    try:
        r = _http(world, alice.cookie, "GET", "/search")
        assert r.status == 200 and 'id="nav-holds"' not in r.body
        for path in ("/holds", "/holds/case-merger", "/deletion-requests", "/deletion-requests/new"):
            assert _http(world, alice.cookie, "GET", path).status == 403, path
        m = _http(world, alice.cookie, "GET", f"/message/{world.ids['merger plans']}")
        assert m.status == 200 and "case-merger" not in m.body and 'id="request-deletion"' not in m.body
    finally:
        alice.close()
    aud = world.aud
    r = aud.request("POST", "/api/v1/deletion-requests", {"reason": "x", "ids": [world.ids["lunch menu"]]})
    rid = r.json()["id"]
    # The page offers no button; a hand-made POST is refused all the same (and CSRF first).
    assert _http(world, aud.cookie, "POST", f"/deletion-requests/{rid}/approve", {"csrf": "wrong"}).status == 403
    r = _http(world, aud.cookie, "POST", f"/deletion-requests/{rid}/approve", {"csrf": aud.csrf})
    assert r.status == 403 and "four eyes" in r.body
    assert aud.request("GET", f"/api/v1/deletion-requests/{rid}").json()["state"] == "pending"
