"""The account pages in real headless Chromium (tests/harness/browser.py)
against a real daemon (tests/harness/stack.py): TOTP enrolment in two
steps (the QR code decoded by zbarimg, a wrong code enables nothing), the
TOTP and recovery-code logins that follow, new recovery codes and turning
TOTP off, a password change (wrong current password, a weak new one, the
other session logged out, the new password works and the old does not),
CSRF on every form, no secret in the daemon's log or the audit trail, axe
on every page, the phone width, and the re-authentication throttle (at the end:
it leaves 127.0.0.1 throttled)."""

from __future__ import annotations

import base64
import http.client
import json
import shutil
import subprocess
import time
import urllib.parse

import pyotp
import pytest

from mailtresor.access import users as usersmod
from mailtresor.access.auth import open_databases
from mailtresor.keys.client import control_fetcher

from tests.harness.stack import Stack
from tests.test_api import Client

pytestmark = pytest.mark.skipif(not shutil.which("chromedriver"),
                                reason="chromium-driver is not installed (make deps)")

NAMES = ("carol", "dave", "hank", "gina", "ivy")
PW = {n: f"{n}-password-1" for n in NAMES}
FAILURES = 8            # the throttle's free failures (per name and per address)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("web-account")
    stack = Stack(d, {"api": {"timeout": 20},
                      "access": {"session_idle": 3600, "throttle_failures": FAILURES, "throttle_base": 60.0}},
                  milter=False)
    stack.start_control()
    users, _tokens = open_databases(stack.cfg, control_fetcher(stack.cfg))
    for n in NAMES:
        users.add("acme", n, PW[n], {"user"}, [f"{n}@acme.example"])
    enrolled = {n: users.totp_enable("acme", n) for n in ("hank", "gina")}
    stack.start_daemon()
    yield type("World", (), {"stack": stack, "users": users, "enrolled": enrolled,
                             "base": f"https://127.0.0.1:{stack.api_port}"})
    stack.close()


def login(b, name, password=None, code=None, next_path="/account"):
    b.get(next_path)
    b.wait_path("/login")
    b.login(name, password or PW[name], "acme")
    if code is not None:
        b.find("#totp").send_keys(code + "\n")
    b.wait_path(next_path)


def logout(b):
    b.find("#logout").click()
    b.wait_path("/login")


def audit_records(world) -> list[dict]:
    out = []
    for seg in sorted(world.stack.cfg.audit.directory.glob("audit-*.log")):
        out += [json.loads(line) for line in seg.read_text().splitlines() if line.strip()]
    return out


def account_ops(world, name) -> list[tuple[str, str]]:
    return [(r["detail"]["op"], r["result"]) for r in audit_records(world)
            if r.get("action") == "admin" and r.get("object") == f"user:{name}"]


def assert_never_written(world, secrets_):
    """None of SECRETS_ (a TOTP secret, recovery codes) in the daemon's log
    or the audit trail, in any spelling the pages use."""
    blobs = [world.stack.log_path.read_bytes()]
    blobs += [p.read_bytes() for p in world.stack.cfg.audit.directory.iterdir() if p.is_file()]
    for s in secrets_:
        for form in {s, s.replace("-", ""), s.replace(" ", ""), usersmod.hash_recovery(s)}:
            assert not any(form.encode() in blob for blob in blobs), f"{form!r} was written"


def submit(b, button_css):
    """Click a form's button and wait for the answer's page (not the old one)."""
    old = b.find("html")
    b.find(button_css).click()
    b.wait_gone(old)


def no_sideways_scroll(b):
    width = b.driver.execute_script("return document.documentElement.scrollWidth")
    assert width <= 400, width


def wrong_code(secret: str) -> str:
    """A 6-digit code that is none of the codes valid around now."""
    t = pyotp.TOTP(secret)
    valid = {t.at(time.time() + d) for d in (-60, -30, 0, 30, 60)}
    return next(c for c in ("000000", "111111", "222222", "333333", "444444", "555555") if c not in valid)


def test_enrol_totp_then_log_in_with_a_code_and_a_recovery_code(world, browser):
    b = browser
    found = []
    login(b, "carol")
    assert b.find("#account-name").text == "carol"
    assert b.find("#account-tenant").text == "acme"
    assert "Local" in b.find("#account-kind").text
    assert b.find("#account-roles").text == "user"
    assert b.find("#account-addresses").text == "carol@acme.example"
    assert b.find("#totp-status").text.startswith("Off")
    found += b.axe("account (TOTP off)")
    b.screenshot("account")
    # Step 1: the password again, then the candidate secret and its QR code.
    b.find("#begin-password").send_keys(PW["carol"])
    b.find("#begin-submit").click()
    b.wait_path("/account/totp/begin")
    grouped = b.find("#totp-secret").text
    assert all(len(g) == 4 for g in grouped.split(" ")[:-1]), grouped
    secret = grouped.replace(" ", "")
    uri = usersmod.totp_uri("acme", "carol", secret)
    assert pyotp.parse_uri(uri).secret == secret
    assert urllib.parse.unquote(uri).startswith("otpauth://totp/mailtresor:carol@acme?")
    img = b.find("#totp-qr")
    src = img.get_attribute("src")
    assert src.startswith("data:image/svg+xml;base64,")
    svg = base64.b64decode(src.split(",", 1)[1]).decode()
    assert svg.startswith("<svg") and "<script" not in svg
    assert img.get_attribute("alt")
    # The image as the browser drew it, decoded by an independent reader.
    png = b.dir / "qr.png"
    # In view and still first: the code field's autofocus scrolls the page,
    # and an element screenshot taken mid-scroll is cut off.
    b.driver.execute_script("arguments[0].scrollIntoView({block: 'center', behavior: 'instant'})", img)
    png.write_bytes(img.screenshot_as_png)
    if shutil.which("zbarimg"):
        got = subprocess.run(["zbarimg", "--quiet", "--raw", str(png)], capture_output=True, text=True, timeout=30)
        assert got.stdout.strip() == uri, (got.returncode, got.stdout, got.stderr)
    else:       # zbar-tools missing: at least it is qrcode's drawing of exactly that URI
        from mailtresor.web.account import qr_data_uri
        assert qr_data_uri(uri) == src
    found += b.axe("TOTP enrolment")
    b.driver.execute_script("window.scrollTo(0, 0)")        # the code field's autofocus scrolled down
    b.screenshot("enrol")
    assert not world.users.get("acme", "carol").totp          # nothing stored yet
    # A wrong code: the page again, the candidate kept, TOTP still off.
    b.find("#confirm-code").send_keys(wrong_code(secret) + "\n")
    b.find("#confirm-error")
    assert b.find("#totp-secret").text == grouped
    found += b.axe("TOTP enrolment, wrong code")
    assert not world.users.get("acme", "carol").totp
    # The right code: stored, and the recovery codes shown once.
    confirm_step = int(time.time()) // 30
    b.find("#confirm-code").send_keys(pyotp.TOTP(secret).at(confirm_step * 30) + "\n")
    # The wrong code's answer was already at this path: wait for the new page.
    b.find("#recovery-codes code")
    codes = [e.text for e in b.all("#recovery-codes code")]
    assert len(codes) == usersmod.RECOVERY_CODES and len(set(codes)) == len(codes)
    found += b.axe("recovery codes")
    b.screenshot("codes")
    user = world.users.get("acme", "carol")
    assert user.totp and user.recovery_left == usersmod.RECOVERY_CODES
    b.find("#codes-saved").click()
    b.wait_at("/account")
    assert b.find("#totp-status").text.startswith("On")
    assert "10 recovery codes left" in b.find("#recovery-left").text
    assert not any(c in b.driver.page_source for c in codes)     # shown once only
    found += b.axe("account (TOTP on)")
    # The enrolment's own code was used up: the next login takes the next step's.
    logout(b)
    b.get("/account")
    b.login("carol", PW["carol"], "acme")
    # The step after the enrolment's, or the current one once the clock has
    # passed it: always newer than the code used and within the login's window
    # (time + 30 alone fails when a 30 s boundary falls between the two).
    step = max(int(time.time()) // 30, confirm_step + 1)
    b.find("#totp").send_keys(pyotp.TOTP(secret).at(step * 30) + "\n")
    b.wait_at("/account")
    logout(b)
    # A recovery code logs in once.
    login(b, "carol", code=codes[3])
    assert world.users.get("acme", "carol").recovery_left == usersmod.RECOVERY_CODES - 1
    logout(b)
    b.get("/account")
    b.login("carol", PW["carol"], "acme")
    b.find("#totp").send_keys(codes[3] + "\n")
    assert b.find("#login-error").text
    assert b.path().startswith("/login")
    assert ("totp-enable", "ok") in account_ops(world, "carol")
    assert_never_written(world, [secret, grouped, *codes])
    assert not found, found


def test_new_recovery_codes_and_turning_totp_off_at_a_phones_width(world, tmp_path):
    from tests.harness.browser import Browser
    uri, old_codes = world.enrolled["hank"]
    totp = pyotp.parse_uri(uri)
    b = Browser(world.base, tmp_path, width=390, height=844)
    found = []
    try:
        login(b, "hank", code=totp.now())
        assert b.find("#totp-status").text.startswith("On")
        no_sideways_scroll(b)
        # A new app: password and a (recovery) code, then the enrolment page; cancelled.
        b.find("#replace-password").send_keys(PW["hank"])
        b.find("#replace-code").send_keys(old_codes[0] + "\n")
        b.wait_path("/account/totp/begin")
        b.find("#totp-qr")
        no_sideways_scroll(b)
        b.screenshot("enrol-phone")
        b.find("#cancel-submit").click()
        b.wait_at("/account")
        b.get("/account/totp")                       # the candidate is gone
        b.wait_at("/account")
        assert world.users.get("acme", "hank").recovery_left == usersmod.RECOVERY_CODES - 1
        # New recovery codes: password and a current code.
        b.find("#codes-password").send_keys(PW["hank"])
        b.find("#codes-code").send_keys(totp.at(time.time() + 30) + "\n")
        b.wait_path("/account/totp/codes")
        b.find("#recovery-codes code")
        new_codes = [e.text for e in b.all("#recovery-codes code")]
        assert len(new_codes) == usersmod.RECOVERY_CODES and not set(new_codes) & set(old_codes)
        no_sideways_scroll(b)
        found += b.axe("new recovery codes")
        b.find("#codes-saved").click()
        b.wait_at("/account")
        # The old codes stopped working.
        b.find("#off-password").send_keys(PW["hank"])
        b.find("#off-code").send_keys(old_codes[1] + "\n")
        assert b.find("#totp-error").text
        found += b.axe("account, refused form")
        assert world.users.get("acme", "hank").totp
        b.find("#off-password").send_keys(PW["hank"])
        b.find("#off-code").send_keys(new_codes[0] + "\n")
        b.wait_path("/account?done=totp-off")
        assert b.find("#totp-status").text.startswith("Off")
        assert not world.users.get("acme", "hank").totp
        b.find("#account-done")
        ops = account_ops(world, "hank")
        assert ("recovery-codes", "ok") in ops and ("totp-disable", "failed") in ops \
            and ("totp-disable", "ok") in ops, ops
        assert_never_written(world, [*old_codes, *new_codes, totp.secret])
        assert not found, found
    finally:
        b.close()


def _session(world, name, code=None):
    c = Client(world.stack)
    body = {"tenant": "acme", "username": name, "password": PW[name]}
    if code:
        body["totp"] = code
    r = c.request("POST", "/api/v1/login", body)
    assert r.status == 200, r.data
    cookie = [v for k, v in r.getheaders() if k.lower() == "set-cookie"][0].split(";", 1)[0].split("=", 1)[1]
    return c, cookie, r.json()["csrf"]


def test_every_form_needs_the_sessions_csrf_token(world):
    uri, codes = world.enrolled["gina"]
    totp = pyotp.parse_uri(uri)
    c, cookie, csrf = _session(world, "gina", totp.now())
    conn = http.client.HTTPSConnection("127.0.0.1", world.stack.api_port, context=world.stack.client_context(),
                                       timeout=20)

    def post(path, fields):
        conn.request("POST", path, body=urllib.parse.urlencode(fields),
                     headers={"Content-Type": "application/x-www-form-urlencoded", "Cookie": f"mt_session={cookie}"})
        r = conn.getresponse()
        return r.status, r.read()
    before = (world.users.password_hash("acme", "gina"), world.users.get("acme", "gina"))
    forms = {
        "/account/password": {"current": PW["gina"], "new": "gina-new-password-2", "again": "gina-new-password-2"},
        "/account/totp/begin": {"password": PW["gina"], "code": codes[0]},
        "/account/totp/confirm": {"code": totp.at(time.time() + 30)},
        "/account/totp/cancel": {},
        "/account/totp/codes": {"password": PW["gina"], "code": codes[1]},
        "/account/totp/off": {"password": PW["gina"], "code": codes[2]},
    }
    for path, fields in forms.items():
        for token in (None, "A" * 43):
            status, body = post(path, fields if token is None else {**fields, "csrf": token})
            assert status == 403, (path, status, body[:300])
            assert b"Traceback" not in body
    after = (world.users.password_hash("acme", "gina"), world.users.get("acme", "gina"))
    assert after == before                    # no password, no secret, no code used
    conn.request("GET", "/account/totp", headers={"Cookie": f"mt_session={cookie}"})
    r = conn.getresponse()
    r.read()
    assert r.status == 303 and r.getheader("Location") == "/account"     # no candidate was made
    # With the token the same form works: the refusal above was the token's.
    status, body = post("/account/totp/begin", {**forms["/account/totp/begin"], "csrf": csrf})
    assert status == 200 and b'id="totp-secret"' in body
    # A page answer is not cacheable (it may hold a secret).
    conn.request("GET", "/account", headers={"Cookie": f"mt_session={cookie}"})
    r = conn.getresponse()
    r.read()
    assert r.status == 200 and r.getheader("Cache-Control") == "no-store"
    conn.close()
    c.close()


def test_a_directory_account_gets_no_password_or_totp_forms(world):
    """Rendered for a principal with no local user (a directory login)."""
    from mailtresor.access.principal import Principal
    from mailtresor.web.site import Web

    class Api:
        clock = time.time
    web = Web(Api())
    who = Principal(kind="user", name="dirk", tenant="acme", roles={"user"}, addresses={"dirk@acme.example"})
    page = web.page("account.html", who, csrf="x", user=None, done=None, error=None, error_args={},
                    error_section=None, min_password=8).decode()
    assert 'id="password-form"' not in page and 'id="begin-form"' not in page
    assert "managed by your directory" in page and "Directory account" in page


def test_a_candidate_secret_lives_ten_minutes_for_its_session_only():
    from mailtresor.access.account import ENROL_TTL, Enrolments
    now = [1_700_000_000.0]
    e = Enrolments(lambda: now[0], limit=3)
    c = e.begin("sid-1", "acme", "carol")
    assert ENROL_TTL == 600 and e.get("sid-1", "acme", "carol") is c
    assert e.get("sid-2", "acme", "carol") is None          # another session
    assert e.get("sid-1", "acme", "dave") is None           # another user (same sid)
    assert e.get("sid-1", "globex", "carol") is None
    now[0] += ENROL_TTL - 1
    assert e.get("sid-1", "acme", "carol") is c
    now[0] += 1
    assert e.get("sid-1", "acme", "carol") is None and len(e) == 0
    first = e.begin("a", "acme", "x")
    assert e.begin("a", "acme", "x").secret != first.secret  # a new begin replaces the candidate
    for sid in ("b", "c", "d"):
        e.begin(sid, "acme", sid)
    assert len(e) == 3 and e.get("a", "acme", "x") is None  # bounded: the oldest went first


def test_the_german_catalogue_covers_every_account_string():
    """Every msgid of the account templates, web/account.py and
    access/account.py has a German translation in locale/de/account.po."""
    from pathlib import Path

    from babel.messages.extract import extract_from_file
    from babel.messages.pofile import read_po

    web = Path(usersmod.__file__).parents[1] / "web"
    wanted = set()
    for t in sorted((web / "templates").glob("account*.html")):
        for _lineno, msg, _comments, _ctx in extract_from_file(
                "jinja2", str(t), keywords={"_": None, "ngettext": (1, 2)},
                options={"extensions": "jinja2.ext.i18n", "newstyle_gettext": "true"}):
            wanted.add(msg)
    for py in (web / "account.py", web.parent / "access" / "account.py"):
        for _lineno, msg, _comments, _ctx in extract_from_file("python", str(py), keywords={"N_": None}):
            wanted.add(msg)
    assert len(wanted) > 40
    with open(web / "locale" / "de" / "account.po", "rb") as f:
        cat = read_po(f, locale="de")
    missing = []
    for m in wanted:
        entry = cat.get(m[0] if isinstance(m, tuple) else m)
        got = entry.string if entry is not None else None
        if not got or (isinstance(got, tuple) and not all(got)):
            missing.append(m)
    assert not missing, missing


def test_the_same_through_the_api(world):
    """/api/v1/me/...: the code behind the pages, as JSON (validated
    against openapi.json), with the session's X-CSRF-Token."""
    from tests.harness import openapi
    c = Client(world.stack)
    r = c.request("POST", "/api/v1/login", {"tenant": "acme", "username": "ivy", "password": PW["ivy"]})
    c.cookie = [v for k, v in r.getheaders() if k.lower() == "set-cookie"][0].split(";", 1)[0].split("=", 1)[1]
    c.csrf = r.json()["csrf"]

    def call(path, body, status, csrf=True):
        r = c.request("POST", path, body, csrf=csrf)
        openapi.check("POST", path, r.status, r.getheader("Content-Type"), r.data)
        assert r.status == status, (path, r.status, r.data[:300])
        return r.json()
    call("/api/v1/me/totp/begin", {"password": PW["ivy"]}, 403, csrf=False)
    got = call("/api/v1/me/totp/begin", {"password": PW["ivy"]}, 200)
    assert got["uri"] == usersmod.totp_uri("acme", "ivy", got["secret"]) and 0 < got["expires_in"] <= 600
    assert not world.users.get("acme", "ivy").totp
    totp = pyotp.TOTP(got["secret"])
    assert "not right" in call("/api/v1/me/totp/confirm", {"code": wrong_code(got["secret"])}, 400)["error"]
    codes = call("/api/v1/me/totp/confirm", {"code": totp.now()}, 200)["recovery_codes"]
    assert len(codes) == usersmod.RECOVERY_CODES and world.users.get("acme", "ivy").totp
    call("/api/v1/me/totp/confirm", {"code": totp.now()}, 400)          # the candidate is gone
    fresh = call("/api/v1/me/totp/recovery-codes", {"password": PW["ivy"], "code": codes[0]}, 200)["recovery_codes"]
    assert not set(fresh) & set(codes)
    call("/api/v1/me/password", {"current": PW["ivy"], "new": "ivy-new-password-2"}, 200)
    assert c.request("GET", "/api/v1/me").status == 200                 # this session goes on
    call("/api/v1/me/totp/off", {"password": "ivy-new-password-2", "code": fresh[0]}, 200)
    assert not world.users.get("acme", "ivy").totp
    assert [op for op, result in account_ops(world, "ivy")] == ["totp-enable", "recovery-codes", "password",
                                                                 "totp-disable"]
    assert_never_written(world, [got["secret"], *codes, *fresh])
    c.close()


def test_password_change_and_its_throttle(world, browser, tmp_path):
    """Last in this file: its end leaves 127.0.0.1 throttled for the
    daemon's throttle_base seconds."""
    from tests.harness.browser import Browser
    b = browser
    other = Browser(world.base, tmp_path / "other")
    try:
        login(other, "dave")
        login(b, "dave")

        def change(current, new, again=None):
            b.find("#pw-current").send_keys(current)
            b.find("#pw-new").send_keys(new)
            b.find("#pw-again").send_keys(again if again is not None else new)
            submit(b, "#password-submit")
        change("not-the-password", "dave-new-password-2")
        assert "not right" in b.find("#password-error").text
        assert b.find("#pw-current").get_attribute("value") == ""       # nothing echoed back
        assert "not-the-password" not in b.driver.page_source
        change(PW["dave"], "short")
        assert "at least 8 characters" in b.find("#password-error").text
        change(PW["dave"], "dave-new-password-2", "dave-new-password-3")
        assert "not the same" in b.find("#password-error").text
        assert b.axe("account, password refused") == []
        change(PW["dave"], "dave-new-password-2")
        b.wait_path("/account?done=password")
        assert "other sessions were ended" in b.find("#account-done").text
        b.get("/account")                             # this session lives on
        assert b.find("#account-name").text == "dave"
        other.get("/account")                          # the other one is over
        other.wait_path("/login")
        c = Client(world.stack)
        r = c.request("POST", "/api/v1/login", {"tenant": "acme", "username": "dave", "password": PW["dave"]})
        assert r.status == 401
        r = c.request("POST", "/api/v1/login",
                      {"tenant": "acme", "username": "dave", "password": "dave-new-password-2"})
        assert r.status == 200
        c.close()
        changed = world.users.password_hash("acme", "dave")
        ops = account_ops(world, "dave")
        assert ops.count(("password", "failed")) == 1 and ops.count(("password", "ok")) == 1, ops
        rec = [r for r in audit_records(world) if r.get("object") == "user:dave" and r["result"] == "ok"][-1]
        assert rec["principal"].startswith("user:dave") and rec["action"] == "admin"
        assert_never_written(world, ["dave-new-password-2", "not-the-password"])
    finally:
        other.close()
    # Wrong current passwords fill the login's throttle: after the free
    # failures the page answers "too many", the right password is refused
    # too, and so is the login (the same counters).
    for attempt in range(FAILURES + 2):
        change("wrong-password", "dave-new-password-3")
        if "Too many" in b.find("#password-error").text:
            break
    else:
        raise AssertionError("never throttled")
    assert attempt >= FAILURES - 4, attempt       # the free failures were free (other tests used a few)
    change("dave-new-password-2", "dave-new-password-3")
    assert "Too many" in b.find("#password-error").text
    assert world.users.password_hash("acme", "dave") == changed
    c = Client(world.stack)
    r = c.request("POST", "/api/v1/login", {"tenant": "acme", "username": "dave", "password": "dave-new-password-2"})
    assert r.status == 429
    c.close()
    assert ("password", "denied") in account_ops(world, "dave")
