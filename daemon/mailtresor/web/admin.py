"""The administration pages: a tenant's users and API tokens, its directory
settings (read-only, from the configuration) and the appliance's status.

No check is made here that the API does not make: every page calls the
same Api method as the API's route (Api.users_list, user_add, user_change,
user_update, tokens_list, token_issue, token_revoke, directory_settings,
status_for), which checks the role and the tenant (_manage_tenant: another
tenant is "not found"), validates, changes and writes the one audit record.
What this module adds is the form handling: CSRF on every POST,
post/redirect/get with a fixed confirmation key, a 400 page that keeps what
was typed (never a password), and a token's secret shown once.

Who sees what (the API's methods refuse, and audit the refusal, for
anyone else: a 403 page): `manage-users` (users, directory) and `manage-tokens`
(tokens) - a tenant's admins for their tenant, the appliance administrator
for any (a selector); status is the appliance administrator's (as
GET /api/v1/status).
"""

from __future__ import annotations

import time
import urllib.parse

from mailtresor.access.http import HttpError
from mailtresor.access.principal import ROLES, SCOPES
from mailtresor.web.i18n import N_

# Roles as the forms offer them, with what each may do.
ROLE_LABELS = {
    "user": N_("User: reads their own mail"),
    "auditor": N_("Auditor: reads the whole tenant and the audit trail"),
    "admin": N_("Administrator: users and tokens (reads no mail)"),
    "appliance-admin": N_("Appliance administrator"),
}
SCOPE_LABELS = {
    "search": N_("search: search and read the tenant's mail"),
    "export": N_("export: export the tenant's mail"),
    "events": N_("events: pull the audit events (SIEM)"),
}
# Token lifetimes offered (days; 0: until revoked).
EXPIRY_DAYS = (30, 90, 365, 0)
# The confirmations a redirect may ask for (?done=KEY): fixed texts, never
# words from the URL.
DONE = {
    "added": N_("The user was added."),
    "updated": N_("The user's roles and addresses were saved; their sessions have ended."),
    "disabled": N_("The user was disabled; their sessions have ended."),
    "enabled": N_("The user was enabled."),
    "password": N_("The password was set; the user's sessions have ended."),
    "revoked": N_("The token was revoked."),
}
USER_OPS = {"roles": None, "disable": "disabled", "enable": "enabled", "password": "password"}
MISMATCH = N_("The two passwords differ.")
APPLIANCE = ""      # the selector's value for the appliance's own administrators (tenant None)


# --- helpers ------------------------------------------------------------------------------

def _asked_tenant(web, who, value: str | None, *, appliance_ok: bool) -> str | None:
    """The tenant a page or form names.  A tenant's admin is fixed to
    theirs (a different name is passed on, for the API's check to refuse);
    the appliance administrator picks one ("" = the appliance's own
    administrators where that makes sense, else the first tenant)."""
    value = (value or "").strip()
    if who.tenant is not None:
        return value or who.tenant
    if value == APPLIANCE:
        if appliance_ok:
            return None
        return web.api.tenant_names[0] if web.api.tenant_names else None
    return value


def _tenant_choices(web, who, *, appliance_ok: bool) -> list[tuple[str, str]]:
    """(value, label) of the selector: only the appliance administrator has one."""
    if who.tenant is not None:
        return []
    out = [(APPLIANCE, N_("Appliance administrators"))] if appliance_ok else []
    return out + [(t, t) for t in web.api.tenant_names]


def _link(path: str, tenant: str | None, **more) -> str:
    args = {"tenant": tenant or "", **more}
    return path + "?" + urllib.parse.urlencode({k: v for k, v in args.items() if v is not None})


def _done(q: dict) -> str | None:
    return DONE.get(q.get("done", ""))


def _roles_for(tenant: str | None) -> list[tuple[str, str]]:
    names = ("appliance-admin",) if tenant is None else tuple(r for r in ROLES if r != "appliance-admin")
    return [(r, ROLE_LABELS[r]) for r in names]


def _checked(f: dict, prefix: str, names) -> list[str]:
    return [n for n in names if f.get(f"{prefix}-{n}")]


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.replace(",", "\n").splitlines() if ln.strip()]


def _user_name(name: str) -> str:
    return urllib.parse.unquote(name)


def _http_400(e: Exception) -> str | None:
    """The reason of a 400/409 refusal to show beside the form, or None
    (anything else goes to the error page)."""
    if getattr(e, "status", None) in (400, 409) and isinstance(getattr(e, "reason", None), str):
        return e.reason
    return None


# --- overview -----------------------------------------------------------------------------

async def overview(web, request, who, csrf):
    if not (who.can("manage-users") or who.can("manage-tokens")):
        raise HttpError(403, N_("this page is for administrators"))
    web.render(request, "admin.html", who, csrf, appliance=who.tenant is None and who.can("manage-tenants"))


# --- users --------------------------------------------------------------------------------

async def users(web, request, who, csrf):
    if request.method == b"POST":
        return await _user_add(web, request, who, csrf)
    q = web.query(request)
    tenant = _asked_tenant(web, who, q.get("tenant"), appliance_ok=True)
    await _users_page(web, request, who, csrf, tenant, done=_done(q))


async def _users_page(web, request, who, csrf, tenant, *, status=200, error=None, entered=None, done=None):
    listed = await web.api.run(web.api.users_list, who, tenant)
    has_directory = tenant is not None and web.api.directories.get(tenant) is not None
    web.render(request, "admin_users.html", who, csrf, status=status, tenant=tenant or "", users=listed,
               tenants=_tenant_choices(web, who, appliance_ok=True), roles=_roles_for(tenant),
               role_labels=ROLE_LABELS, error=error, entered=entered or {}, done=done,
               has_directory=has_directory)


async def _user_add(web, request, who, csrf):
    f = web.form(request)
    web.check_csrf(f, csrf)
    tenant = _asked_tenant(web, who, f.get("tenant"), appliance_ok=True)
    name = f.get("name", "").strip()
    roles = _checked(f, "role", ROLES)
    addresses = _lines(f.get("addresses", ""))
    # What the page shows again after a refusal: never the password.
    entered = {"name": name, "roles": roles, "addresses": "\n".join(addresses)}
    error = None
    if f.get("password", "") != f.get("password2", ""):
        error = MISMATCH
    else:
        try:
            await web.api.run(web.api.user_add, who, tenant, name, f.get("password", ""), roles, addresses)
        except Exception as e:  # noqa: BLE001 - a refusal is shown beside the form
            error = _http_400(e)
            if error is None:
                raise
    if error is not None:
        return await _users_page(web, request, who, csrf, tenant, status=400, error=error, entered=entered)
    web.redirect(request, _link("/admin/users", tenant, done="added"))


async def user(web, request, who, csrf, name):
    q = web.query(request)
    tenant = _asked_tenant(web, who, q.get("tenant"), appliance_ok=True)
    await _user_page(web, request, who, csrf, tenant, _user_name(name), done=_done(q))


async def _user_page(web, request, who, csrf, tenant, name, *, status=200, error=None, entered=None, done=None):
    listed = await web.api.run(web.api.users_list, who, tenant)
    found = next((u for u in listed if u["name"] == name), None)
    if found is None:
        raise HttpError(404, "no such user")
    web.render(request, "admin_user.html", who, csrf, status=status, tenant=tenant or "", u=found,
               roles=_roles_for(tenant), role_labels=ROLE_LABELS, error=error, entered=entered, done=done,
               is_self=who.kind == "user" and who.tenant == tenant and who.name == name)


async def user_op(web, request, who, csrf, name, op):
    f = web.form(request)
    web.check_csrf(f, csrf)
    name = _user_name(name)
    tenant = _asked_tenant(web, who, f.get("tenant"), appliance_ok=True)
    api = web.api
    entered, error = None, None
    try:
        if op == "roles":
            roles, addresses = _checked(f, "role", ROLES), _lines(f.get("addresses", ""))
            entered = {"roles": roles, "addresses": "\n".join(addresses)}
            await api.run(lambda: api.user_update(who, tenant, name, roles=roles, addresses=addresses))
            done = "updated"
        elif op == "password":
            if f.get("password", "") != f.get("password2", ""):
                error = MISMATCH
            else:
                await api.run(api.user_change, who, tenant, name, "password", f.get("password", ""))
            done = "password"
        else:
            await api.run(api.user_change, who, tenant, name, op)
            done = USER_OPS[op]
    except Exception as e:  # noqa: BLE001 - a refusal is shown beside the form
        error = _http_400(e)
        if error is None:
            raise
    if error is not None:
        return await _user_page(web, request, who, csrf, tenant, name, status=400, error=error, entered=entered)
    web.redirect(request, _link(f"/admin/users/{urllib.parse.quote(name, safe='@+')}", tenant, done=done))


# --- tokens -------------------------------------------------------------------------------

async def tokens(web, request, who, csrf):
    if request.method == b"POST":
        return await _token_issue(web, request, who, csrf)
    q = web.query(request)
    tenant = _asked_tenant(web, who, q.get("tenant"), appliance_ok=False)
    await _tokens_page(web, request, who, csrf, tenant, done=_done(q))


async def _tokens_page(web, request, who, csrf, tenant, *, status=200, error=None, entered=None, done=None):
    listed = await web.api.run(web.api.tokens_list, who, tenant)
    web.render(request, "admin_tokens.html", who, csrf, status=status, tenant=tenant or "", tokens=listed,
               tenants=_tenant_choices(web, who, appliance_ok=False), scopes=[(s, SCOPE_LABELS[s]) for s in SCOPES],
               expiry_days=EXPIRY_DAYS, error=error, entered=entered or {}, done=done)


async def _token_issue(web, request, who, csrf):
    f = web.form(request)
    web.check_csrf(f, csrf)
    tenant = _asked_tenant(web, who, f.get("tenant"), appliance_ok=False)
    label = f.get("name", "").strip()
    scopes = _checked(f, "scope", SCOPES)
    days = f.get("expires", "0")
    days = int(days) if days.isdigit() and int(days) in EXPIRY_DAYS else 0
    try:
        issued = await web.api.run(web.api.token_issue, who, tenant, label, scopes, days * 86400 or None)
    except Exception as e:  # noqa: BLE001 - a refusal is shown beside the form
        error = _http_400(e)
        if error is None:
            raise
        return await _tokens_page(web, request, who, csrf, tenant, status=400, error=error,
                                  entered={"name": label, "scopes": scopes, "expires": days})
    # The secret, once: on this answer only (Cache-Control: no-store, as on
    # every page), never in a redirect's URL, a log or the audit record.
    web.render(request, "admin_token_issued.html", who, csrf, status=201, tenant=tenant, token=issued)


async def token_revoke(web, request, who, csrf, tid):
    if request.method == b"POST":
        f = web.form(request)
        web.check_csrf(f, csrf)
        tenant = _asked_tenant(web, who, f.get("tenant"), appliance_ok=False)
        await web.api.run(web.api.token_revoke, who, tenant, tid)
        return web.redirect(request, _link("/admin/tokens", tenant, done="revoked"))
    q = web.query(request)
    tenant = _asked_tenant(web, who, q.get("tenant"), appliance_ok=False)
    listed = await web.api.run(web.api.tokens_list, who, tenant)
    found = next((t for t in listed if t["id"] == tid and not t["revoked"]), None)
    if found is None:
        raise HttpError(404, "no such token")
    web.render(request, "admin_token_revoke.html", who, csrf, tenant=tenant, token=found)


# --- directory ----------------------------------------------------------------------------

async def directory(web, request, who, csrf):
    q = web.query(request)
    tenant = _asked_tenant(web, who, q.get("tenant"), appliance_ok=False)
    settings = await web.api.run(web.api.directory_settings, who, tenant)
    web.render(request, "admin_directory.html", who, csrf, tenant=tenant or "", settings=settings,
               tenants=_tenant_choices(web, who, appliance_ok=False))


# --- status -------------------------------------------------------------------------------

def ago(seconds) -> str:
    """'12 s', '5 min', '3.1 h', '2.0 d': how long, in a few characters."""
    s = max(0.0, float(seconds or 0))
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def when(t) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(t))) if t else ""


async def status(web, request, who, csrf):
    if not (who.can("manage-users") or who.can("manage-tenants")):
        raise HttpError(403, N_("this page is for administrators"))
    try:
        doc = await web.api.run(web.api.status_for, who)
    except HttpError as e:
        if e.status != 403:
            raise
        # A tenant's admin: the API shows the appliance's status to the
        # appliance administrator only (the refusal is audited there).
        return web.render(request, "admin_status.html", who, csrf, status=403, doc=None)
    web.render(request, "admin_status.html", who, csrf, doc=doc, ago=ago, when=when, now=time.time())


ROUTES = (
    ("GET", r"/admin", overview),
    ("GET POST", r"/admin/users", users),
    ("GET", r"/admin/users/(?P<name>[^/]+)", user),
    ("POST", r"/admin/users/(?P<name>[^/]+)/(?P<op>roles|disable|enable|password)", user_op),
    ("GET POST", r"/admin/tokens", tokens),
    ("GET POST", r"/admin/tokens/(?P<tid>[0-9a-f]{1,64})/revoke", token_revoke),
    ("GET", r"/admin/directory", directory),
    ("GET", r"/admin/status", status),
)
