"""The administration pages in real headless Chromium against a real daemon
(tests/harness/stack.py): a tenant admin adds a user through the form (who
then logs in), changes their roles, disables them; issues a token (shown
once, works with its scope, is nowhere in the log or the audit trail) and
revokes it; the directory settings without the bind password; the
appliance's status.  Over plain HTTPS with a session: tenant confinement
(another tenant's users and tokens by editing fields and URLs), CSRF, 403
for users and auditors, 400 pages that keep what was typed."""

from __future__ import annotations

import http.client
import time
import urllib.parse

import pytest

from mailtresor.access.auth import open_databases
from mailtresor.keys.client import control_fetcher

from tests.harness.stack import Stack
from tests.harness.web import api_login as web_api_login, wait_archived
from tests.test_api import Client, mail

pytestmark = pytest.mark.skipif(not __import__("shutil").which("chromedriver"),
                                reason="chromium-driver is not installed (make deps)")

PW = {n: f"{n}-password-1" for n in ("root", "adm", "aud", "alice", "gina", "victim", "gadm")}
BIND_SECRET = "bind-Secret-7f3a9c-never-shown"
ADMIN_PAGES = ("/admin", "/admin/users", "/admin/tokens", "/admin/directory", "/admin/status")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("webadmin")
    (d / "ldap-bind.password").write_text(BIND_SECRET + "\n")
    ldap = {"url": "ldaps://ldap.acme.invalid:636", "base": "dc=acme,dc=example",
            "ca_file": str(d / "pki" / "ca.pem"),
            "filter": "(&(objectClass=inetOrgPerson)(uid={username}))",
            "bind_dn": "cn=archive,ou=services,dc=acme,dc=example",
            "bind_password_file": str(d / "ldap-bind.password"),
            "roles": {"cn=Compliance,ou=groups,dc=acme,dc=example": "auditor",
                      "cn=IT Admins,ou=groups,dc=acme,dc=example": "admin"}}
    stack = Stack(d, {"archive": {"enabled": True}, "api": {"timeout": 120},
                      "access": {"session_idle": 3600, "throttle_failures": 50},
                      "tenant": [{"name": "acme", "domains": ["acme.example"], "ldap": ldap},
                                 {"name": "globex", "domains": ["globex.example"]}]}, milter=False)
    stack.start_control()
    users, tokens = open_databases(stack.cfg, control_fetcher(stack.cfg))
    users.add(None, "root", PW["root"], {"appliance-admin"}, [])
    users.add("acme", "adm", PW["adm"], {"admin"}, [])
    users.add("acme", "aud", PW["aud"], {"auditor"}, [])
    users.add("acme", "alice", PW["alice"], {"user"}, ["alice@acme.example"])
    users.add("acme", "victim", PW["victim"], {"user"}, ["victim@acme.example"])
    users.add("globex", "gina", PW["gina"], {"user"}, ["gina@globex.example"])
    users.add("globex", "gadm", PW["gadm"], {"admin"}, [])
    _, globex_token = tokens.issue("globex", "globex-siem", {"events"}, None)
    stack.start_daemon()
    with stack.smtp() as s:
        s.sendmail("bob@acme.example", ["alice@acme.example"],
                   mail("bob@acme.example", "alice@acme.example", "for alice"))
    aud = api_login(stack, "aud", "acme")
    got = wait_archived(aud, 1, stack)
    yield type("World", (), {"stack": stack, "users": users, "tokens": tokens, "aud": aud,
                             "globex_token": globex_token, "base": f"https://127.0.0.1:{stack.api_port}"})
    aud.close()
    stack.close()


def api_login(stack, name, tenant, password=None) -> Client:
    return web_api_login(stack, tenant, name, password or PW[name])


def login_status(stack, name, tenant, password) -> int:
    c = Client(stack)
    try:
        return c.request("POST", "/api/v1/login", {"tenant": tenant, "username": name, "password": password}).status
    finally:
        c.close()


class Page:
    """A web session over plain HTTPS (the API's login: the same session)."""

    def __init__(self, world, name, tenant):
        self.api = api_login(world.stack, name, tenant)
        self.csrf = self.api.csrf
        self.conn = http.client.HTTPSConnection("127.0.0.1", world.stack.api_port,
                                                context=world.stack.client_context(), timeout=20)

    def get(self, path):
        self.conn.request("GET", path, headers={"Cookie": f"mt_session={self.api.cookie}"})
        r = self.conn.getresponse()
        r.body = r.read().decode("utf-8", "replace")
        assert "Traceback" not in r.body
        return r

    def post(self, path, fields: dict, csrf=True):
        fields = dict(fields)
        if csrf is True:
            fields["csrf"] = self.csrf
        elif csrf:
            fields["csrf"] = csrf
        self.conn.request("POST", path, body=urllib.parse.urlencode(fields),
                          headers={"Cookie": f"mt_session={self.api.cookie}",
                                   "Content-Type": "application/x-www-form-urlencoded"})
        r = self.conn.getresponse()
        r.body = r.read().decode("utf-8", "replace")
        assert "Traceback" not in r.body
        return r

    def close(self):
        self.conn.close()
        self.api.close()


def web_login(b, name, tenant, landing):
    b.get("/login")
    b.login(name, PW[name], tenant)
    b.wait_path(landing)


def no_axe(b, name):
    found = b.axe(name)
    assert not found, found


def test_tenant_admin_adds_a_user_changes_roles_and_disables(world, browser):
    b = browser
    web_login(b, "adm", "acme", "/admin")          # an admin reads no mail: lands on the administration
    no_axe(b, "overview")
    b.screenshot("admin-overview")
    b.find("#link-users").click()
    b.wait_path("/admin/users")
    assert b.find("#tenant-fixed").text.endswith("acme") and not b.all("#tenant-select")
    assert "Directory (LDAP) users" in b.find("#directory-note").text
    no_axe(b, "users")
    # A weak password: refused beside the form, the name kept, no password.
    b.find("#name").send_keys("newbie")
    b.find("#password").send_keys("short")
    b.find("#password2").send_keys("short")
    b.find("#role-user").click()
    b.find("#addresses").send_keys("newbie@acme.example")
    b.find("#add-submit").click()
    assert "too short" in b.find("#form-error").text
    assert b.find("#name").get_attribute("value") == "newbie"
    assert b.find("#password").get_attribute("value") == ""
    assert b.find("#role-user").is_selected() and b.find("#addresses").get_attribute("value") == "newbie@acme.example"
    no_axe(b, "users with an error")
    b.find("#password").send_keys("newbie-password-1")
    b.find("#password2").send_keys("newbie-password-1")
    b.find("#add-submit").click()
    b.wait_path("/admin/users?tenant=acme&done=added")
    assert "added" in b.find("#done").text
    assert "done=added" in b.driver.current_url
    row = b.find("tr[data-user='newbie']")
    assert "user" in row.text and "newbie@acme.example" in row.text and "active" in row.text
    b.screenshot("admin-users")
    # The new user logs in with that password.
    newbie = api_login(world.stack, "newbie", "acme", "newbie-password-1")
    assert newbie.principal["roles"] == ["user"] and newbie.principal["addresses"] == ["newbie@acme.example"]
    # Roles: user -> auditor; the open session ends, a new login has the role.
    row.find_element("css selector", "a.user-link").click()
    b.wait_path("/admin/users/newbie")
    no_axe(b, "user")
    b.find("#role-user").click()
    b.find("#role-auditor").click()
    b.find("#roles-submit").click()
    b.wait_path("/admin/users/newbie?tenant=acme&done=updated")
    assert b.find("#user-roles").text == "auditor"
    assert newbie.request("GET", "/api/v1/me").status == 401
    again = api_login(world.stack, "newbie", "acme", "newbie-password-1")
    assert again.principal["roles"] == ["auditor"]
    assert again.request("GET", "/api/v1/audit?tenant=acme").status == 200
    b.screenshot("admin-user")
    # Disable: the login fails, the session ends.
    b.find("#disable-submit").click()
    b.wait_path("/admin/users/newbie?tenant=acme&done=disabled")
    assert b.find("#user-state").text == "disabled"
    assert again.request("GET", "/api/v1/me").status == 401
    assert login_status(world.stack, "newbie", "acme", "newbie-password-1") == 401
    # Enable and a new password: the new one works, the old one does not.
    b.find("#enable-submit").click()
    b.wait_path("/admin/users/newbie?tenant=acme&done=enabled")
    b.find("#password").send_keys("newbie-password-2")
    b.find("#password2").send_keys("newbie-password-2")
    b.find("#password-submit").click()
    b.wait_path("/admin/users/newbie?tenant=acme&done=password")
    assert login_status(world.stack, "newbie", "acme", "newbie-password-1") == 401
    assert login_status(world.stack, "newbie", "acme", "newbie-password-2") == 200
    # An admin does not lock themselves out.
    b.get("/admin/users/adm")
    assert not b.all("#disable-submit")
    b.find("#role-admin").click()
    b.find("#roles-submit").click()
    assert "own account" in b.find("#form-error").text
    assert world.users.get("acme", "adm").roles == {"admin"}
    for c in (newbie, again):
        c.close()


def test_token_is_shown_once_works_and_is_revoked(world, browser):
    b = browser
    web_login(b, "adm", "acme", "/admin")
    b.get("/admin/tokens")
    no_axe(b, "tokens")
    b.find("#token-name").send_keys("siem-pull")
    b.find("#scope-events").click()
    b.find("#issue-submit").click()
    secret = b.find("#token-secret").get_attribute("value")
    tid = b.find("#token-id").text
    assert secret.startswith(f"mt_{tid}_") and len(secret) > 40
    assert "cannot be shown again" in b.find("#once-note").text
    raw = secret[len(f"mt_{tid}_"):]
    no_axe(b, "token issued")
    b.screenshot("admin-token-issued")
    # It works with its scope, and only that.
    tok = Client(world.stack, token=secret)
    assert tok.request("GET", "/api/v1/events").status == 200
    assert tok.request("GET", "/api/v1/search?q=").status == 403
    tok.close()
    # Listed again without the secret; nowhere in the log or the audit trail.
    b.get("/admin/tokens")
    row = b.find(f"tr[data-token='{tid}']")
    assert "siem-pull" in row.text and "events" in row.text
    assert raw not in b.driver.page_source
    world.aud.close()
    world.aud.conn = None                       # idle too long: a new connection
    recs = world.aud.request("GET", "/api/v1/audit?tenant=acme&limit=1000")
    assert recs.status == 200
    assert any(r.get("object") == f"token:{tid}" for r in recs.json()["records"]), recs.data[-500:]
    assert raw not in recs.data.decode()
    raw_secret = raw.encode()
    for p in list(world.stack.dir.rglob("*")):
        if p.is_file() and p.stat().st_size < 50 << 20:
            assert raw_secret not in p.read_bytes(), p           # the log, the audit trail, any file
    # Revoke, with a confirmation page.
    row.find_element("css selector", "a.revoke-link").click()
    b.wait_path(f"/admin/tokens/{tid}/revoke")
    no_axe(b, "revoke")
    b.screenshot("admin-token-revoke")
    b.find("#revoke-submit").click()
    b.wait_path("/admin/tokens?")
    assert "revoked" in b.find("#done").text
    assert "revoked" in b.find(f"tr[data-token='{tid}'] td.state").text
    tok = Client(world.stack, token=secret)       # a new connection: the old one may have idled out
    assert tok.request("GET", "/api/v1/events").status == 401
    tok.close()


def test_issued_token_page_is_not_cacheable_and_needs_csrf(world):
    p = Page(world, "adm", "acme")
    try:
        before = len(world.tokens.list("acme"))
        assert p.post("/admin/tokens", {"name": "x", "scope-events": "1"}, csrf=False).status == 403
        assert p.post("/admin/tokens", {"name": "x", "scope-events": "1"}, csrf="A" * 43).status == 403
        assert len(world.tokens.list("acme")) == before
        r = p.post("/admin/tokens", {"name": "cache-check", "scope-search": "1", "expires": "30"})
        assert r.status == 201 and "mt_" in r.body
        assert r.getheader("Cache-Control") == "no-store"
        tok = next(t for t in world.tokens.list("acme") if t.name == "cache-check")
        assert tok.expires is not None and 29 * 86400 < tok.expires - time.time() <= 30 * 86400
        # Revoking needs the token too.
        for csrf in (False, "A" * 43):
            assert p.post(f"/admin/tokens/{tok.id}/revoke", {"tenant": "acme"}, csrf=csrf).status == 403
        assert not next(t for t in world.tokens.list("acme") if t.id == tok.id).revoked
        # No scope: a 400 beside the form, the label kept.
        r = p.post("/admin/tokens", {"name": "no-scope"})
        assert r.status == 400 and 'value="no-scope"' in r.body
    finally:
        p.close()


def test_user_forms_need_csrf_and_keep_input_on_400(world):
    p = Page(world, "adm", "acme")
    try:
        for csrf in (False, "A" * 43):
            r = p.post("/admin/users", {"name": "sneaky", "password": "sneaky-password-1",
                                        "password2": "sneaky-password-1", "role-user": "1"}, csrf=csrf)
            assert r.status == 403
            assert p.post("/admin/users/victim/disable", {}, csrf=csrf).status == 403
            assert p.post("/admin/users/victim/roles", {"role-admin": "1"}, csrf=csrf).status == 403
            assert p.post("/admin/users/victim/password", {"password": "taken-over-1",
                                                           "password2": "taken-over-1"}, csrf=csrf).status == 403
        assert world.users.get("acme", "sneaky") is None
        v = world.users.get("acme", "victim")
        assert not v.disabled and v.roles == {"user"}
        assert login_status(world.stack, "victim", "acme", PW["victim"]) == 200
        # 400s: the page again with what was typed, never the password.
        r = p.post("/admin/users", {"name": "bad name!", "password": "typed-password-9",
                                    "password2": "typed-password-9", "role-user": "1"})
        assert r.status == 400 and "bad name!" in r.body and "typed-password-9" not in r.body
        r = p.post("/admin/users", {"name": "twice", "password": "twice-password-1",
                                    "password2": "twice-password-2", "role-user": "1"})
        assert r.status == 400 and "differ" in r.body and world.users.get("acme", "twice") is None
        r = p.post("/admin/users", {"name": "norole", "password": "norole-password-1",
                                    "password2": "norole-password-1"})
        assert r.status == 400 and "at least one role" in r.body
        r = p.post("/admin/users", {"name": "victim", "password": "victim-password-9",
                                    "password2": "victim-password-9", "role-user": "1"})
        assert r.status == 400 and "exists already" in r.body
        # A confirmation is a fixed text chosen by key, never words from the URL.
        r = p.get("/admin/users?done=%3Cb%3Eowned%3C%2Fb%3E")
        # Not shown: no confirmation line at all (the language switch's link
        # back to this page carries the URL, percent-encoded, and nothing else).
        assert r.status == 200 and 'id="done"' not in r.body and "<b>owned" not in r.body
        assert "owned" not in r.body.replace("%253Cb%253Eowned%253C%252Fb%253E", "")
    finally:
        p.close()


def test_a_tenant_admin_cannot_reach_another_tenant(world):
    p = Page(world, "adm", "acme")
    try:
        for path in ("/admin/users?tenant=globex", "/admin/tokens?tenant=globex",
                     "/admin/directory?tenant=globex", "/admin/users/gina?tenant=globex",
                     "/admin/users/gina", "/admin/users?tenant=nosuch", "/admin/users/root?tenant="):
            r = p.get(path)
            assert r.status == 404, (path, r.status)
            assert "gina" not in r.body or path.startswith("/admin/users/gina")
        form = {"password": "gina-password-9", "password2": "gina-password-9", "role-admin": "1"}
        assert p.post("/admin/users", {"tenant": "globex", "name": "planted", **form}).status == 404
        assert world.users.get("globex", "planted") is None
        for op in ("disable", "password", "roles"):
            for tenant in ("globex", "acme"):
                r = p.post(f"/admin/users/gina/{op}", {"tenant": tenant, **form})
                assert r.status == 404, (op, tenant, r.status)
        g = world.users.get("globex", "gina")
        assert not g.disabled and g.roles == {"user"}
        assert login_status(world.stack, "gina", "globex", PW["gina"]) == 200
        gtid = next(t.id for t in world.tokens.list("globex"))
        for tenant in ("globex", "acme"):
            assert p.post(f"/admin/tokens/{gtid}/revoke", {"tenant": tenant}).status == 404
            assert p.get(f"/admin/tokens/{gtid}/revoke?tenant={tenant}").status == 404
        assert p.post("/admin/tokens", {"tenant": "globex", "name": "planted", "scope-events": "1"}).status == 404
        assert [t.name for t in world.tokens.list("globex")] == ["globex-siem"]
        ok = Client(world.stack, token=world.globex_token)
        assert ok.request("GET", "/api/v1/events").status == 200
        ok.close()
        # The acme admin's own tokens page does not list globex's.
        assert gtid not in p.get("/admin/tokens").body
    finally:
        p.close()


def test_users_and_auditors_get_403(world):
    for name in ("alice", "aud"):
        p = Page(world, name, "acme")
        try:
            for path in ADMIN_PAGES + ("/admin/users/alice",):
                r = p.get(path)
                assert r.status == 403, (name, path, r.status)
            r = p.post("/admin/users", {"name": "byuser", "password": "byuser-password-1",
                                        "password2": "byuser-password-1", "role-admin": "1"})
            assert r.status == 403
            assert p.post("/admin/tokens", {"name": "byuser", "scope-export": "1"}).status == 403
        finally:
            p.close()
    assert world.users.get("acme", "byuser") is None
    assert "byuser" not in [t.name for t in world.tokens.list("acme")]


def test_directory_page_shows_settings_not_the_bind_password(world, browser):
    b = browser
    web_login(b, "adm", "acme", "/admin")
    b.get("/admin/directory")
    assert b.find("#ldap-url").text == "ldaps://ldap.acme.invalid:636"
    assert b.find("#ldap-base").text == "dc=acme,dc=example"
    assert b.find("#ldap-bind-dn").text == "cn=archive,ou=services,dc=acme,dc=example"
    assert b.find("#ldap-bind-password").text.startswith("set")
    assert "configuration file" in b.find("#from-config").text
    assert "cn=Compliance,ou=groups,dc=acme,dc=example" in b.find("#group-roles").text
    src = b.driver.page_source
    assert BIND_SECRET not in src and "ldap-bind.password" not in src
    no_axe(b, "directory")
    b.screenshot("admin-directory")


def test_appliance_admin_chooses_the_tenant_and_reads_the_status(world, browser):
    b = browser
    web_login(b, "root", None, "/admin")
    b.find("#link-status").click()
    b.wait_path("/admin/status")
    for section in ("daemon", "listeners", "keys", "spool", "archiver", "shards", "audit"):
        assert b.find(f"#status-{section}").is_displayed(), section
    assert b.find("#daemon-state").text == "ready"
    text = b.find("main").text
    assert "Spool" in text and "acme/" in b.find("#shards").text
    assert int(b.find("#audit-seq").text) > 0
    assert "{'" not in text and "[{" not in text and '{"' not in text
    no_axe(b, "status")
    b.screenshot("admin-status")
    b.get("/admin/directory?tenant=globex")
    assert "no directory" in b.find("#no-directory").text
    no_axe(b, "no directory")
    b.get("/admin/users")
    sel = b.find("#tenant-select")
    from selenium.webdriver.support.ui import Select
    Select(sel).select_by_value("globex")
    b.find("#tenant-show").click()
    b.wait_path("/admin/users?tenant=globex")
    assert b.find("tr[data-user='gina']")
    assert not b.all("tr[data-user='alice']")
    no_axe(b, "users (appliance administrator)")
    b.find("#name").send_keys("gnew")
    b.find("#password").send_keys("gnew-password-1")
    b.find("#password2").send_keys("gnew-password-1")
    b.find("#role-admin").click()
    b.find("#add-submit").click()
    b.wait_path("/admin/users?tenant=globex&done=added")
    assert world.users.get("globex", "gnew").roles == {"admin"}
    # A tenant admin's status page says whose it is.
    b.find("#logout").click()
    b.wait_path("/login")
    web_login(b, "adm", "acme", "/admin")
    assert not b.all("#link-status")
    b.get("/admin/status")
    assert "appliance administrator" in b.find("#status-forbidden").text
    no_axe(b, "status (tenant admin)")


def test_landing_by_role(world, browser):
    b = browser
    web_login(b, "alice", "acme", "/search")
    b.get("/")
    b.wait_path("/search")
    assert not b.all("#nav-admin")
    b.get("/admin/users")
    assert b.find("#error-title").text == "Not allowed"
    no_axe(b, "403")


def test_phone_width(world, tmp_path):
    from tests.harness.browser import Browser
    b = Browser(world.base, tmp_path, width=390, height=844)
    try:
        web_login(b, "adm", "acme", "/admin")
        for path in ("/admin/users", "/admin/users/alice", "/admin/tokens", "/admin/directory"):
            b.get(path)
            b.find("main h1")
            width = b.driver.execute_script("return document.documentElement.scrollWidth")
            assert width <= 400, (path, width)
        b.get("/admin/users")
        b.screenshot("admin-users-phone")
    finally:
        b.close()
