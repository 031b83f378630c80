"""The web UI with directory (LDAP) accounts and the real session idle
timeout, in real headless Chromium (tests/harness/browser.py) against a real
daemon (tests/harness/stack.py) whose tenant acme logs in against a real
slapd (tests/harness/slapd.py) over LDAPS.

The idle timeout is the daemon's own ([access] session_idle), not a deleted
cookie.  config.py refuses less than 60 s, and tests cannot set it lower, so
the 60 s run alongside the other tests: two sessions are opened when the
module's daemon is up (one left idle in a browser, one kept alive by a request
50 s in), and the last test of the file waits until 62 s have passed."""

from __future__ import annotations

import http.client
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from tests.harness import slapd as slapdmod
from tests.harness.stack import Stack
from tests.test_api import mail

pytestmark = [
    pytest.mark.skipif(not __import__("shutil").which("chromedriver"),
                       reason="chromium-driver is not installed (make deps)"),
    pytest.mark.skipif(not Path(slapdmod.SLAPD).exists(), reason="slapd is not installed"),
]

IDLE = 60.0                 # the least [access] session_idle config.py allows
KEEPALIVE_AT = 50.0         # the kept-alive session's second request, seconds after the first
USERS = dict(slapdmod.USERS, dave=("dave-password", "dave@acme.example", ()))
GROUPS = dict(slapdmod.GROUPS, staff=["alice", "bob", "carol", "dave"])


def web_get(world, path: str, cookie: str) -> tuple[int, str, bytes]:
    """A page fetched with a session cookie, outside the browser: (status, Location, body)."""
    c = http.client.HTTPSConnection("127.0.0.1", world.stack.api_port, context=world.stack.client_context(),
                                    timeout=20)
    try:
        c.request("GET", path, headers={"Cookie": f"mt_session={cookie}"})
        r = c.getresponse()
        return r.status, r.getheader("Location") or "", r.read()
    finally:
        c.close()


def api_login(world, name: str) -> str:
    c = http.client.HTTPSConnection("127.0.0.1", world.stack.api_port, context=world.stack.client_context(),
                                    timeout=20)
    try:
        c.request("POST", "/api/v1/login", body=__import__("json").dumps(
            {"tenant": "acme", "username": name, "password": USERS[name][0]}),
            headers={"Content-Type": "application/json"})
        r = c.getresponse()
        r.read()
        assert r.status == 200, r.status
        cookie = [v for k, v in r.getheaders() if k.lower() == "set-cookie"][0]
        return cookie.split(";", 1)[0].split("=", 1)[1]
    finally:
        c.close()


def browser_for(world, directory):
    from tests.harness.browser import Browser
    return Browser(world.base, directory)


def log_in(b, name: str, next_path: str = "/search") -> None:
    b.get(next_path)
    b.wait_path("/login")
    b.login(name, USERS[name][0], "acme")
    b.wait_path(next_path)


def search(b, query: str) -> tuple[int, list[str]]:
    """Type QUERY into the search box and press Enter: (hit count, subjects shown)."""
    box = b.find("#q")
    box.clear()
    box.send_keys(query + "\n")
    b.wait_path("/search?")
    count = int(b.find("#hit-count").text)
    return count, sorted(e.text for e in b.all("#results td.subject a"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("webdir")
    ldap = slapdmod.Slapd(d / "slapd", users=USERS, groups=GROUPS)
    ldap.start()
    stack = Stack(d / "stack", {"archive": {"enabled": True}, "api": {"timeout": 20},
                                "access": {"session_idle": IDLE, "throttle_failures": 20},
                                "tenant": [{"name": "acme", "domains": ["acme.example"],
                                            "ldap": ldap.ldap_config()},
                                           {"name": "globex", "domains": ["globex.example"]}]}, milter=False)
    idle_browser = None
    try:
        stack.start_control()
        stack.start_daemon()
        with stack.smtp() as s:
            for to, subject in (("alice@acme.example", "for alice"), ("erin@acme.example", "for erin"),
                                ("dave@acme.example", "for dave")):
                s.sendmail("bob@acme.example", [to], mail("bob@acme.example", to, subject))
        w = type("World", (), {"stack": stack, "ldap": ldap, "base": f"https://127.0.0.1:{stack.api_port}"})
        # The directory auditor sees the whole tenant: wait until all three are archived.
        carol = api_login(w, "carol")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status, _, body = web_get(w, "/api/v1/search?q=", carol)
            if status == 200 and __import__("json").loads(body)["total"] == 3:
                break
            time.sleep(0.3)
        else:
            raise AssertionError(f"mail not archived: {body[:300]!r}\n{stack.log()[-3000:]}")
        # The two sessions of the idle-timeout test (see the module's docstring).
        idle_browser = browser_for(w, d / "idle-browser")
        log_in(idle_browser, "alice", "/search?q=body")
        assert idle_browser.find("#hit-count").text == "1"
        w.idle_browser, w.idle_since = idle_browser, time.monotonic()
        w.kept = api_login(w, "bob")
        w.kept_first = time.monotonic()
        w.kept_second = []

        def second():
            w.kept_second.append((time.monotonic(), web_get(w, "/search?q=bob", w.kept)[0]))
        timer = threading.Timer(KEEPALIVE_AT, second)
        timer.start()
        w.timer = timer
        yield w
        timer.cancel()
    finally:
        if idle_browser is not None:
            idle_browser.close()
        stack.close()
        ldap.close()


def test_directory_user_logs_in_and_sees_exactly_their_own_mail(world, tmp_path):
    b = browser_for(world, tmp_path)
    found = []
    try:
        b.get("/login")
        b.find("#username")
        found += b.axe("login")
        b.login("alice", USERS["alice"][0], "acme")
        b.wait_path("/search")
        found += b.axe("search (empty)")
        # Mail to her directory address (mail: Alice@Acme.Example) is hers; mail to others is not.
        assert search(b, "body") == (1, ["for alice"])
        assert "for erin" not in b.driver.page_source and "for dave" not in b.driver.page_source
        found += b.axe("search results")
        b.screenshot("directory-user-search")
        b.driver.find_element("link text", "for alice").click()
        b.wait_path("/message/")
        assert b.find("#subject").text == "for alice"
        b.driver.switch_to.frame(b.find("iframe#body-html"))
        assert "The body of for alice." in b.driver.find_element("tag name", "body").text
        b.driver.switch_to.default_content()
        found += b.axe("message")
        b.screenshot("directory-user-message")
        b.find("#logout").click()
        b.wait_path("/login")

        # A wrong directory password and an unknown user: the same page.
        pages = []
        for name, password in (("alice", "not-her-password"), ("nobody-here", "whatever-password")):
            b.get("/login")
            b.login(name, password, "acme")
            b.find("#login-error")
            pages.append(b.find("main").text)
        assert pages[0] == pages[1] and "wrong user name, password or code" in pages[0]
        found += b.axe("login error")
        b.screenshot("directory-login-error")

        # A directory auditor (group auditors -> auditor) sees the tenant's mail.
        b.login("carol", USERS["carol"][0], "acme")
        b.wait_path("/search")
        assert search(b, "body") == (3, ["for alice", "for dave", "for erin"])
        b.screenshot("directory-auditor-search")
        found += b.axe("auditor search")
        b.logs()
        # The refused logins' 401s are in the network log; no script error anywhere.
        assert not [e for e in b.console if e["level"] == "SEVERE" and e.get("source") != "network"], b.console
    finally:
        b.close()
    assert not found, found


def _delete_entry(ldap, dn: str) -> None:
    """Remove a directory entry (a leaver): slapd stopped, slapmodify, started again."""
    ldap.stop()
    ldif = ldap.dir / "delete.ldif"
    ldif.write_text(f"dn: {dn}\nchangetype: delete\n")
    r = subprocess.run(["/usr/sbin/slapmodify", "-f", str(ldap.conf), "-l", str(ldif)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    ldap.start()


def test_a_user_removed_from_the_directory_is_refused_at_the_next_login(world, tmp_path):
    b = browser_for(world, tmp_path)
    try:
        log_in(b, "dave")
        assert search(b, "body") == (1, ["for dave"])
        b.find("#logout").click()
        b.wait_path("/login")
        live = api_login(world, "dave")        # a session that is still open when he leaves
        _delete_entry(world.ldap, slapdmod.user_dn("dave"))
        b.get("/login")
        b.login("dave", USERS["dave"][0], "acme")
        # The same answer as for a user who never existed.
        assert "wrong user name, password or code" in b.find("#login-error").text
        assert b.path().startswith("/login")
        b.screenshot("directory-leaver-refused")
        assert not b.axe("leaver refused")
        # Known gap (docs/WEB.md, "Directory accounts"): the session he opened before
        # keeps working until its idle or absolute timeout; recorded here,
        # checked by the xfail test below.
        world.leaver_live_status = web_get(world, "/search?q=body", live)[0]
    finally:
        b.close()


@pytest.mark.xfail(strict=True, reason="known gap: a directory user's live session is not re-checked against "
                                       "the directory, it lasts until its timeout")
def test_a_removed_directory_users_live_session_ends(world):
    assert getattr(world, "leaver_live_status", None) == 303


def test_idle_session_expires_and_login_returns_to_the_page(world):
    """Last in the file: waits out the real idle timeout that began when
    the module's daemon came up."""
    b = world.idle_browser
    wait = world.idle_since + IDLE + 2 - time.monotonic()
    time.sleep(max(0.0, wait))
    # Kept alive: its second request came KEEPALIVE_AT s after the first,
    # the third now, each within the idle time of the one before, and the
    # first more than the idle time ago.
    world.timer.join(5)
    assert world.kept_second and world.kept_second[0][1] == 200, world.kept_second
    third = time.monotonic()
    assert third - world.kept_first > IDLE and third - world.kept_second[0][0] < IDLE, \
        "the other tests took too long for this timing"
    status, location, body = web_get(world, "/search?q=bob", world.kept)
    assert status == 200 and b'id="logout"' in body, (status, location)

    # Left idle: a reload goes to the login page with the notice, then back.
    old = b.driver.get_cookie("mt_session")["value"]
    b.driver.refresh()
    b.wait_path("/login")
    nxt = urllib.parse.parse_qs(urllib.parse.urlsplit(b.driver.current_url).query)["next"]
    assert nxt == ["/search?q=body"]
    assert "Please log in to continue." in b.find("main").text
    b.screenshot("session-expired")
    assert not b.axe("login after expiry")
    b.login("alice", USERS["alice"][0], "acme")
    b.wait_path("/search?q=body")
    assert b.find("#q").get_attribute("value") == "body"
    assert b.find("#hit-count").text == "1"
    # The session that expired stays expired: its cookie is refused.
    status, location, _ = web_get(world, "/search", old)
    assert status == 303 and location.startswith("/login?next=")
