"""`mailtresor user …` and `mailtresor token …`: local users and API tokens.

They change users.db and tokens.db directly (under the file lock the daemon
uses too; the daemon re-reads them when they change), with the file key
derived from the control endpoint's key "access".  Passwords are read from
the terminal, or with --password-stdin from the first line of standard
input: never from the command line, where `ps` and shell history see them.
"""

from __future__ import annotations

import functools
import getpass
import json
import sys
import time

EXIT_FAIL = 1


class UserError(Exception):
    """A problem the administrator can fix: one line, exit status 1.
    (Our own class, caught by `_command`: under `python -m mailtresor.cli.main`
    the CLI's module is __main__, whose UserError is not mailtresor.cli.main's.)"""


def _command(fn):
    @functools.wraps(fn)
    def run(cfg, args):
        try:
            return fn(cfg, args)
        except UserError as e:
            print(f"mailtresor: {e}", file=sys.stderr)
            return EXIT_FAIL
    return run


def register(subparsers) -> None:
    """Add the `user` and `token` commands."""
    u = subparsers.add_parser("user", help="local users: add, passwd, disable, enable, list, totp")
    us = u.add_subparsers(dest="user_command", metavar="ACTION")
    us.required = True

    def who(p, name=True):
        g = p.add_mutually_exclusive_group(required=True)
        g.add_argument("--tenant", help="the tenant the user belongs to")
        g.add_argument("--appliance", action="store_true",
                       help="an appliance administrator (no tenant; manages tenants, reads no mail)")
        if name:
            p.add_argument("name", help="login name")

    s = us.add_parser("add", help="add a local user (asks for the password)")
    who(s)
    s.add_argument("--role", action="append", default=[], dest="roles",
                   help="user, auditor or admin (repeat for several); appliance-admin with --appliance")
    s.add_argument("--address", action="append", default=[], dest="addresses",
                   help="a mail address whose mail the user may read (role user; repeat for several)")
    s.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    s.set_defaults(func=cmd_user_add)

    s = us.add_parser("passwd", help="set a user's password")
    who(s)
    s.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    s.set_defaults(func=cmd_user_passwd)

    for action, text in (("disable", "refuse the user's logins (ends no session the daemon holds)"),
                         ("enable", "let a disabled user log in again")):
        s = us.add_parser(action, help=text)
        who(s)
        s.set_defaults(func=cmd_user_disable, disabled=(action == "disable"))

    s = us.add_parser("list", help="a tenant's local users (no secrets)")
    who(s, name=False)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_user_list)

    s = us.add_parser("totp", help="turn on a TOTP second factor: prints the otpauth URI and 10 recovery codes once")
    who(s)
    s.add_argument("--off", action="store_true", help="turn the second factor off (and drop the recovery codes)")
    s.set_defaults(func=cmd_user_totp)

    t = subparsers.add_parser("token", help="API tokens for machines: issue, revoke, list")
    ts = t.add_subparsers(dest="token_command", metavar="ACTION")
    ts.required = True
    s = ts.add_parser("issue", help="a new token, printed once")
    s.add_argument("--tenant", required=True)
    s.add_argument("--scope", action="append", default=[], dest="scopes", required=True,
                   help="events, search or export (repeat for several)")
    s.add_argument("--expires", metavar="DAYS", type=float, default=None,
                   help="days until the token expires (default: until revoked)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("name", help="what the token is for, e.g. soc or ediscovery")
    s.set_defaults(func=cmd_token_issue)
    s = ts.add_parser("revoke", help="revoke a token by its id")
    s.add_argument("--tenant", required=True)
    s.add_argument("id")
    s.set_defaults(func=cmd_token_revoke)
    s = ts.add_parser("list", help="a tenant's tokens (never their secrets)")
    s.add_argument("--tenant", required=True)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_token_list)


# --- plumbing -----------------------------------------------------------------------

def _tenant_of(cfg, args) -> str | None:
    if getattr(args, "appliance", False):
        return None
    names = [t.name for t in cfg.tenant]
    if args.tenant not in names:
        raise UserError(f"unknown tenant {args.tenant!r} (configured: {', '.join(names) or 'none'})")
    return args.tenant


def _databases(cfg):
    from mailtresor.access.auth import open_databases
    from mailtresor.keys.client import control_fetcher
    from mailtresor.keys.ring import KeyRefused
    try:
        return open_databases(cfg, control_fetcher(cfg))
    except KeyRefused as e:
        if e.status == 404:
            raise UserError(f"the control endpoint holds no key 'access' for appliance {cfg.appliance.name!r} "
                            f"(create it there: mailtresor-control keys create {cfg.appliance.name} access)")
        raise


def _errors():
    from mailtresor.access.sealed import StoreError
    from mailtresor.access.tokens import TokenError
    from mailtresor.access.users import UserError as DBUserError
    return StoreError, TokenError, DBUserError


def _run(fn):
    """Database refusals become the command's one-line error."""
    try:
        return fn()
    except _errors() as e:
        raise UserError(str(e)) from None


def _read_password(args, confirm: bool = True) -> str:
    if args.password_stdin:
        line = sys.stdin.readline()
        if not line:
            raise UserError("--password-stdin: standard input is empty")
        return line.rstrip("\r\n")
    if not sys.stdin.isatty():
        raise UserError("no terminal to ask for the password on; use --password-stdin")
    pw = getpass.getpass("Password: ")
    if confirm and getpass.getpass("Password again: ") != pw:
        raise UserError("the passwords differ")
    return pw


def _label(tenant, name) -> str:
    return f"{name} (appliance administrator)" if tenant is None else f"{name} of tenant {tenant}"


# --- user -------------------------------------------------------------------------------

@_command
def cmd_user_add(cfg, args) -> int:
    tenant = _tenant_of(cfg, args)
    roles = args.roles or (["appliance-admin"] if tenant is None else [])
    if not roles:
        raise UserError("give the user a role: --role user, --role auditor or --role admin")
    if "user" in roles and not args.addresses:
        raise UserError("a user with the role user reads the mail of their addresses: give --address")
    from mailtresor.access.users import check_addresses, check_name, check_roles
    _run(lambda: (check_name(args.name), check_roles(tenant, roles), check_addresses(args.addresses)))
    password = _read_password(args)
    users, _ = _databases(cfg)
    u = _run(lambda: users.add(tenant, args.name, password, roles, args.addresses))
    print(f"added {_label(tenant, u.name)}: roles {', '.join(sorted(u.roles))}"
          + (f"; addresses {', '.join(sorted(u.addresses))}" if u.addresses else ""))
    return 0


@_command
def cmd_user_passwd(cfg, args) -> int:
    tenant = _tenant_of(cfg, args)
    users, _ = _databases(cfg)
    if users.get(tenant, args.name) is None:
        raise UserError(f"no user {args.name!r} in {'the appliance' if tenant is None else 'tenant ' + repr(tenant)}")
    password = _read_password(args)
    _run(lambda: users.passwd(tenant, args.name, password))
    print(f"password of {_label(tenant, args.name)} changed")
    return 0


@_command
def cmd_user_disable(cfg, args) -> int:
    tenant = _tenant_of(cfg, args)
    users, _ = _databases(cfg)
    _run(lambda: users.set_disabled(tenant, args.name, args.disabled))
    print(f"{_label(tenant, args.name)}: {'disabled' if args.disabled else 'enabled'}")
    return 0


@_command
def cmd_user_list(cfg, args) -> int:
    tenant = _tenant_of(cfg, args)
    users, _ = _databases(cfg)
    rows = _run(lambda: users.list(tenant))
    if args.json:
        print(json.dumps([u.public() for u in rows], indent=1, sort_keys=True))
        return 0
    if not rows:
        print("no local users" + ("" if tenant is None else f" in tenant {tenant}"))
        return 0
    for u in rows:
        flags = [f for f, on in (("disabled", u.disabled), ("totp", u.totp)) if on]
        print(f"{u.name:20} {','.join(sorted(u.roles)):20} {' '.join(sorted(u.addresses)) or '-'}"
              + (f"  [{', '.join(flags)}]" if flags else ""))
    return 0


@_command
def cmd_user_totp(cfg, args) -> int:
    tenant = _tenant_of(cfg, args)
    users, _ = _databases(cfg)
    if args.off:
        _run(lambda: users.totp_disable(tenant, args.name))
        print(f"{_label(tenant, args.name)}: second factor off")
        return 0
    uri, codes = _run(lambda: users.totp_enable(tenant, args.name))
    print(f"{_label(tenant, args.name)}: second factor on. Add this to the authenticator app "
          "(or make it a QR code):")
    print(uri)
    print("Recovery codes, each good once (shown only now):")
    for c in codes:
        print(f"  {c}")
    return 0


# --- token ------------------------------------------------------------------------------

@_command
def cmd_token_issue(cfg, args) -> int:
    tenant = _tenant_of(cfg, args)
    if args.expires is not None and args.expires <= 0:
        raise UserError("--expires: a positive number of days")
    expires = None if args.expires is None else time.time() + args.expires * 86400
    _, tokens = _databases(cfg)
    tid, secret = _run(lambda: tokens.issue(tenant, args.name, args.scopes, expires))
    if args.json:
        print(json.dumps({"id": tid, "token": secret}))
    else:
        print(f"token {tid} for tenant {tenant} ({', '.join(sorted(set(args.scopes)))}); shown only now:")
        print(secret)
    return 0


@_command
def cmd_token_revoke(cfg, args) -> int:
    tenant = _tenant_of(cfg, args)
    _, tokens = _databases(cfg)
    _run(lambda: tokens.revoke(args.id, tenant))
    print(f"token {args.id} revoked")
    return 0


@_command
def cmd_token_list(cfg, args) -> int:
    tenant = _tenant_of(cfg, args)
    _, tokens = _databases(cfg)
    rows = [t.public() for t in _run(lambda: tokens.list(tenant))]
    if args.json:
        print(json.dumps(rows, indent=1, sort_keys=True))
        return 0
    if not rows:
        print(f"no tokens in tenant {tenant}")
    for r in rows:
        state = "revoked" if r["revoked"] else f"expires {r['expires']}" if r["expires"] else "no expiry"
        print(f"{r['id']}  {r['name']:20} {','.join(r['scopes']):20} {state}")
    return 0
