"""The web UI in real headless Chromium (tests/harness/browser.py) against a
real daemon (tests/harness/stack.py): log in, search, open a result,
download the original and compare it with the API's /raw, another user's
message by URL, an admin reading mail, a hostile HTML message (checked
through the browser's own console and network logs), an expired session,
the login's errors and its TOTP step, the pages' headers."""

from __future__ import annotations

import time
import urllib.parse
from email.message import EmailMessage

import pyotp
import pytest

from mailtresor.access.auth import open_databases
from mailtresor.keys.client import control_fetcher

from tests.harness import hostile
from tests.harness.stack import Stack
from tests.harness.web import api_login as web_api_login, wait_archived
from tests.test_api import Client, mail

pytestmark = pytest.mark.skipif(not __import__("shutil").which("chromedriver"),
                                reason="chromium-driver is not installed (make deps)")

PW = {n: f"{n}-password-1" for n in ("alice", "victim", "adm", "aud", "tina")}


def hostile_mail() -> bytes:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = "mallory@evil.example", "alice@acme.example", "hostile html"
    m["Message-ID"] = "<hostile@test>"
    m["Date"] = "Fri, 01 Mar 2024 11:00:00 +0000"
    m.set_content("plain part")
    m.add_alternative(hostile.html_attacks(), subtype="html")
    return m.as_bytes()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("web")
    stack = Stack(d, {"archive": {"enabled": True}, "api": {"timeout": 20},
                      "access": {"session_idle": 3600}}, milter=False)
    stack.start_control()
    users, _tokens = open_databases(stack.cfg, control_fetcher(stack.cfg))
    users.add("acme", "alice", PW["alice"], {"user"}, ["alice@acme.example"])
    users.add("acme", "victim", PW["victim"], {"user"}, ["victim@acme.example"])
    users.add("acme", "adm", PW["adm"], {"admin"}, [])
    users.add("acme", "aud", PW["aud"], {"auditor"}, [])
    users.add("acme", "tina", PW["tina"], {"user"}, ["tina@acme.example"])
    totp_uri, _codes = users.totp_enable("acme", "tina") if hasattr(users, "totp_enable") else (None, None)
    stack.start_daemon()
    with stack.smtp() as s:
        s.sendmail("bob@acme.example", ["alice@acme.example"],
                   mail("bob@acme.example", "alice@acme.example", "for alice", attachment=b"\x00\x01payload"))
        s.sendmail("bob@acme.example", ["victim@acme.example"],
                   mail("bob@acme.example", "victim@acme.example", "for victim"))
        s.sendmail("mallory@evil.example", ["alice@acme.example"], hostile_mail())
    aud = web_api_login(stack, "acme", "aud", PW["aud"])
    got = wait_archived(aud, 3, stack)
    ids = {r["subject"]: r["id"] for r in got["results"]}
    yield type("World", (), {"stack": stack, "ids": ids, "aud": aud, "users": users, "totp_uri": totp_uri,
                             "base": f"https://127.0.0.1:{stack.api_port}"})
    aud.close()
    stack.close()


def login(b, name, tenant="acme", next_path="/search"):
    b.get(next_path)
    b.wait_path("/login")
    b.login(name, PW[name], tenant)
    b.wait_path(next_path)


def test_login_search_open_and_download_the_original(world, browser):
    b = browser
    b.get("/")
    b.wait_path("/login")
    b.screenshot("login")
    b.login("alice", PW["alice"], "acme")
    b.wait_path("/search")
    q = b.find("#q")
    q.send_keys("alice\n")
    b.find("#results")
    assert b.find("#hit-count").text == "2"
    assert b.find("#took").text.endswith("ms")
    subjects = [e.text for e in b.all("#results td.subject a")]
    assert sorted(subjects) == ["for alice", "hostile html"]
    assert "for victim" not in b.driver.page_source
    b.screenshot("search")
    assert len(b.all("#results img[alt='has attachments']")) == 1
    # Each facet link narrows the search to as many messages as it said.
    links = [(a.get_attribute("href"), int(a.get_attribute("data-count"))) for a in b.all("a.facet")]
    assert len(links) >= 3, links
    for href, n in links:
        b.driver.get(href)
        assert b.find("#hit-count").text == str(n), href
    b.get("/search?q=alice")
    b.driver.find_element("link text", "for alice").click()
    b.wait_path("/message/")
    assert b.find("#subject").text == "for alice"
    assert "data.bin" in b.find("#attachments").text
    b.screenshot("message")
    aid = world.ids["for alice"]
    b.find("#download-eml").click()
    got = b.wait_download(f"{aid}.eml")
    api = world.aud.request("GET", f"/api/v1/messages/{aid}/raw")
    assert api.status == 200 and got == api.data
    b.logs()
    assert not [e for e in b.console if e["level"] == "SEVERE"], b.console


def test_paging_by_the_cores_cursor(world, browser):
    login(browser, "alice", next_path="/search?q=&limit=1")
    seen = [browser.find("#results td.subject a").text]
    assert browser.find("#hit-count").text == "2"
    browser.find("#next-page").click()
    browser.wait_path("/search?")
    browser.find("#first-page")
    seen.append(browser.find("#results td.subject a").text)
    assert sorted(seen) == ["for alice", "hostile html"]
    assert not browser.all("#next-page")
    # A cursor edited by hand is refused, not followed.
    browser.get("/search?q=&limit=1&cursor=AAAA")
    assert browser.all("#search-error") or browser.find("#error-title")


def test_phone_width(world, tmp_path):
    from tests.harness.browser import Browser
    b = Browser(world.base, tmp_path, width=390, height=844)
    try:
        login(b, "alice", next_path="/search?q=alice")
        b.find("#results")
        width = b.driver.execute_script("return document.documentElement.scrollWidth")
        wide = b.driver.execute_script(
            "return [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > 392)"
            ".map(e => e.tagName + '#' + e.id + '.' + e.className + ' ' + Math.round(e.getBoundingClientRect().right))")
        assert width <= 400, (width, wide)            # no sideways scrolling on a phone
        b.screenshot("search-phone")
    finally:
        b.close()


def test_another_users_message_by_url_is_not_found(world, browser):
    login(browser, "alice")
    browser.get(f"/message/{world.ids['for victim']}")
    assert browser.find("#error-title").text == "Not found"
    assert "for victim" not in browser.driver.page_source
    browser.get(f"/message/{world.ids['for victim']}/html")
    assert "The body of for victim" not in browser.driver.page_source
    browser.get("/message/..%2f..%2fetc")
    assert browser.find("#error-title").text == "Not found"


def test_an_admin_cannot_read_mail(world, browser):
    login(browser, "adm")
    browser.get(f"/message/{world.ids['for alice']}")
    assert browser.find("#error-title").text in ("Not allowed", "Not found")
    assert "The body of for alice" not in browser.driver.page_source
    browser.get("/search?q=alice")
    assert not browser.all("#results")


def test_hostile_html_runs_nothing_and_loads_nothing(world, browser):
    b = browser
    login(b, "alice")
    b.get(f"/message/{world.ids['hostile html']}")
    frame = b.find("iframe#body-html")
    assert frame.get_attribute("sandbox") == ""
    assert b.find("#remote-blocked").is_displayed()
    time.sleep(1.0)         # let anything that would load, load
    b.driver.switch_to.frame(frame)
    assert "visible text" in b.driver.find_element("tag name", "body").text
    b.driver.switch_to.default_content()
    b.screenshot("hostile")
    urls = b.requested_urls()
    # Every request the page made (chrome:// are the browser's own start page).
    foreign = [u for u in urls if not u.startswith((world.base + "/", "data:", "chrome:", "about:"))]
    assert not foreign, foreign
    assert not any("evil.example" in u for u in urls), urls
    # No script ran: no alert is open, and the console has no script output.
    assert not [e for e in b.console if "alert" in e["message"].lower() and "Blocked" not in e["message"]]
    assert b.driver.execute_script("return 1") == 1     # would raise UnexpectedAlertPresent


def test_expired_session_goes_to_login_and_back(world, browser):
    b = browser
    login(b, "alice")
    target = f"/message/{world.ids['for alice']}"
    b.driver.delete_cookie("mt_session")
    b.get(target)
    b.wait_path("/login")
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(b.driver.current_url).query)["next"] == [target]
    b.login("alice", PW["alice"], "acme")
    b.wait_path(target)
    assert b.find("#subject").text == "for alice"


def test_login_errors_do_not_tell_who_exists_and_logout_ends_the_session(world, browser):
    b = browser
    texts = []
    for name, pw in (("alice", "wrong-password"), ("nobody-here", "wrong-password")):
        b.get("/login")
        b.find("#username").send_keys(name)
        b.find("#tenant").send_keys("acme")
        b.find("#password").send_keys(pw)
        b.find("#login-submit").click()
        texts.append(b.find("#login-error").text)
    assert texts[0] == texts[1] and texts[0]
    login(b, "alice")
    b.find("#logout").click()
    b.wait_path("/login")
    b.get("/search")
    b.wait_path("/login")


def test_totp_step(world, browser):
    if world.totp_uri is None:
        pytest.skip("no UserDB.totp_enable")
    b = browser
    b.get("/login")
    b.login("tina", PW["tina"], "acme")
    code = pyotp.parse_uri(world.totp_uri).now()
    b.find("#totp").send_keys(code + "\n")
    b.wait_path("/search")


def test_pages_carry_the_csp_and_security_headers(world):
    import http.client
    c = http.client.HTTPSConnection("127.0.0.1", world.stack.api_port, context=world.stack.client_context(),
                                    timeout=10)
    for path in ("/login", "/static/style.css", "/nope"):
        c.request("GET", path)
        r = c.getresponse()
        r.read()
        csp = r.getheader("Content-Security-Policy")
        assert "default-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
        assert r.getheader("X-Frame-Options") == "DENY" and r.getheader("X-Content-Type-Options") == "nosniff"
        assert r.getheader("Strict-Transport-Security")
    # A form posted from elsewhere (no login form cookie) is refused.
    c.request("POST", "/login", body="username=alice&password=x&login_csrf=abc",
              headers={"Content-Type": "application/x-www-form-urlencoded"})
    r = c.getresponse()
    assert r.status == 403 and b"Traceback" not in r.read()
    c.close()


def test_every_page_passes_axe(world, browser):
    """No serious or critical accessibility violation on any page (axe-core)."""
    b = browser
    found = []
    b.get("/login")
    found += b.axe("login")
    b.login("alice", "wrong-password", "acme")
    b.find("#login-error")
    found += b.axe("login error")
    b.login("alice", PW["alice"], "acme")
    b.wait_path("/search")
    found += b.axe("search (empty)")
    b.get("/search?q=alice")
    b.find("#results")
    found += b.axe("search results")
    b.get("/search?q=%22unclosed")
    found += b.axe("search error")
    for view in ("", "?view=text"):
        b.get(f"/message/{world.ids['for alice']}{view}")
        b.find("#subject")
        found += b.axe("message" + view)
    b.get("/message/0000000000000000")
    b.find("#error-title")
    found += b.axe("not found")
    assert not found, found
    # The check itself works: an unlabelled field is a critical violation.
    b.driver.execute_script("document.querySelector('main').appendChild(document.createElement('input'))")
    assert any(v["id"] == "label" for v in b.axe("self-check")), "axe-core did not run"


def test_keyboard_only(world, browser):
    """Log in, search and open a result with the keyboard alone."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    b = browser
    b.get("/login")
    b.find("#username")

    def keys(*k):
        ActionChains(b.driver).send_keys(*k).perform()

    def focused():
        return b.driver.switch_to.active_element.get_attribute("id")
    assert focused() == "username"                  # autofocus
    ActionChains(b.driver).key_down(Keys.SHIFT).send_keys(Keys.TAB).key_up(Keys.SHIFT).perform()
    assert focused() == "tenant"
    keys("acme", Keys.TAB, "alice", Keys.TAB, PW["alice"], Keys.ENTER)
    b.wait_path("/search")
    assert focused() == "q"
    keys("bob", Keys.ENTER)
    b.find("#results")
    # Tab from the search box reaches the first result's link.
    link = b.find("#results td.subject a")
    for _ in range(12):
        keys(Keys.TAB)
        if b.driver.switch_to.active_element == link:
            break
    else:
        raise AssertionError("the first result cannot be reached with Tab")
    keys(Keys.ENTER)
    b.wait_path("/message/")
    assert b.find("#subject").text == "for alice"


def test_logout_form_needs_the_sessions_csrf_token(world):
    """An API login's session is the web's too; a cross-site logout form
    (no token, or a wrong one) is refused and ends nothing."""
    c = Client(world.stack)
    r = c.request("POST", "/api/v1/login", {"tenant": "acme", "username": "alice", "password": PW["alice"]})
    c.cookie = [v for k, v in r.getheaders() if k.lower() == "set-cookie"][0].split(";", 1)[0].split("=", 1)[1]
    csrf = r.json()["csrf"]
    form = {"Content-Type": "application/x-www-form-urlencoded", "Cookie": f"mt_session={c.cookie}"}
    conn = __import__("http.client").client.HTTPSConnection(
        "127.0.0.1", world.stack.api_port, context=world.stack.client_context(), timeout=10)

    def post(body):
        conn.request("POST", "/logout", body=body, headers=form)
        r = conn.getresponse()
        r.read()
        return r.status
    assert post("") == 403 and post("csrf=" + "A" * 43) == 403
    conn.request("GET", "/search", headers={"Cookie": f"mt_session={c.cookie}"})
    r = conn.getresponse()
    assert r.status == 200 and b"log out" in r.read().lower()       # still logged in
    assert post("csrf=" + csrf) == 303
    conn.request("GET", "/search", headers={"Cookie": f"mt_session={c.cookie}"})
    r = conn.getresponse()
    r.read()
    assert r.status == 303 and r.getheader("Location").startswith("/login?next=")
    conn.close()
    c.close()


def _sample_path(pattern: str) -> str:
    """A path the route's regex matches, each named group filled with the
    first candidate that fits."""
    import re as re_
    candidates = ("alice", "disable", "ab12", "0123456789abcdef0123456789abcdef")
    path = pattern
    for m in re_.finditer(r"\(\?P<(\w+)>([^()]*(?:\([^()]*\))?[^()]*)\)", pattern):
        sub = m.group(2)
        value = next(c for c in candidates if re_.fullmatch(sub, c))
        path = path.replace(m.group(0), value, 1)
    assert re_.fullmatch(pattern, path), (pattern, path)
    return path


def test_every_state_changing_page_route_needs_the_csrf_token(world):
    """site.py checks the session's CSRF token before any handler runs, for
    every route of every page module that takes more than GET: a page built
    later cannot forget it.  Posted with a live session and no token (or a
    wrong one): 403, whatever the route."""
    from mailtresor.web import site as sitemod
    import importlib
    routes = []
    for name in sitemod.PAGE_MODULES:
        for methods, pattern, _ in importlib.import_module(f"mailtresor.web.{name}").ROUTES:
            if set(methods.split()) - {"GET", "HEAD"}:
                routes.append(_sample_path(pattern))
    assert len(routes) >= 10, routes            # every section's forms are in the list
    c = Client(world.stack)
    r = c.request("POST", "/api/v1/login", {"tenant": "acme", "username": "adm", "password": PW["adm"]})
    cookie = [v for k, v in r.getheaders() if k.lower() == "set-cookie"][0].split(";", 1)[0].split("=", 1)[1]
    headers = {"Content-Type": "application/x-www-form-urlencoded", "Cookie": f"mt_session={cookie}"}
    conn = __import__("http.client").client.HTTPSConnection(
        "127.0.0.1", world.stack.api_port, context=world.stack.client_context(), timeout=10)
    try:
        for path in routes:
            for body in ("format=zip&q=x&name=x&password=x", "csrf=" + "A" * 43 + "&format=zip&q=x"):
                conn.request("POST", path, body=body, headers=headers)
                r = conn.getresponse()
                text = r.read().decode()
                assert r.status == 403 and "CSRF" in text, (path, body, r.status, text[:300])
    finally:
        conn.close()
        c.close()
