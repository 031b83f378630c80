"""`mailtresor user` and `mailtresor token`, run as an administrator runs
them, against a real control endpoint that releases the "access" key."""

import json
import os
import subprocess
import sys

import pytest

from mailtresor import config as configmod
from mailtresor.access.auth import Authenticator, LoginFailed, open_databases
from mailtresor.keys.client import control_fetcher
from tests.conftest import REPO


@pytest.fixture
def control(stack):
    stack.start_control()
    return stack


def mt(stack, *args, stdin=None, check=None):
    p = subprocess.run([sys.executable, "-m", "mailtresor", "--config", str(stack.config_path), *args],
                       cwd=REPO, capture_output=True, text=True, timeout=120, input=stdin)
    if check is not None:
        assert p.returncode == check, (p.returncode, p.stdout, p.stderr)
    return p


def test_user_and_token_commands(control):
    s = control
    mt(s, "user", "add", "--tenant", "acme", "--role", "user", "--address", "Alice@acme.example",
       "--password-stdin", "alice", stdin="a good password\n", check=0)
    mt(s, "user", "add", "--appliance", "--password-stdin", "root", stdin="root password!\n", check=0)
    rows = json.loads(mt(s, "user", "list", "--tenant", "acme", "--json", check=0).stdout)
    assert [(r["name"], r["roles"], r["addresses"], r["disabled"]) for r in rows] == \
        [("alice", ["user"], ["alice@acme.example"], False)]
    assert "password" not in json.dumps(rows) and "hash" not in rows[0]
    assert "root" in mt(s, "user", "list", "--appliance", check=0).stdout
    assert "no local users" in mt(s, "user", "list", "--tenant", "globex", check=0).stdout

    # What the CLI wrote, the daemon's side reads (same key, same file).
    users, tokens = open_databases(s.cfg, control_fetcher(s.cfg))
    authn = Authenticator(s.cfg, users, tokens)
    p = authn.login(tenant="acme", username="alice", password="a good password", totp=None, client="c")
    assert p.addresses == {"alice@acme.example"}
    # The password is nowhere in the file, not even the name in clear.
    raw = users.path.read_bytes()
    assert b"alice" not in raw and b"a good password" not in raw

    mt(s, "user", "disable", "--tenant", "acme", "alice", check=0)
    with pytest.raises(LoginFailed):
        authn.login(tenant="acme", username="alice", password="a good password", totp=None, client="c")
    mt(s, "user", "enable", "--tenant", "acme", "alice", check=0)
    mt(s, "user", "passwd", "--tenant", "acme", "--password-stdin", "alice", stdin="another password\n", check=0)
    authn.login(tenant="acme", username="alice", password="another password", totp=None, client="c")

    out = mt(s, "user", "totp", "--tenant", "acme", "alice", check=0).stdout
    assert "otpauth://totp/" in out and out.count("\n  ") == 10
    with pytest.raises(LoginFailed) as e:
        authn.login(tenant="acme", username="alice", password="another password", totp=None, client="c")
    assert e.value.needs_totp
    code = out.splitlines()[-1].strip()
    authn.login(tenant="acme", username="alice", password="another password", totp=code, client="c")

    doc = json.loads(mt(s, "token", "issue", "--tenant", "acme", "--scope", "events", "--expires", "30",
                        "--json", "soc", check=0).stdout)
    assert authn.token(doc["token"], "c").scopes == {"events"}
    listed = mt(s, "token", "list", "--tenant", "acme", check=0).stdout
    assert doc["id"] in listed and doc["token"] not in listed and "soc" in listed
    assert mt(s, "token", "revoke", "--tenant", "globex", doc["id"], check=1).stderr.startswith(
        "mailtresor: no token")
    mt(s, "token", "revoke", "--tenant", "acme", doc["id"], check=0)
    with pytest.raises(LoginFailed):
        authn.token(doc["token"], "c")


@pytest.mark.parametrize("args,stdin,message", [
    (("user", "add", "--tenant", "acme", "--role", "user", "--address", "a@acme.example", "--password-stdin",
      "a"), "short\n", "too short"),
    (("user", "add", "--tenant", "acme", "--role", "boss", "--password-stdin", "a"), "long enough pw\n",
     "unknown role"),
    (("user", "add", "--tenant", "nosuch", "--role", "admin", "--password-stdin", "a"), "long enough pw\n",
     "unknown tenant 'nosuch'"),
    (("user", "add", "--tenant", "acme", "--role", "user", "--password-stdin", "a"), "long enough pw\n",
     "give --address"),
    (("user", "add", "--tenant", "acme", "--role", "admin", "a"), "", "use --password-stdin"),
    (("user", "passwd", "--tenant", "acme", "--password-stdin", "ghost"), "long enough pw\n", "no user 'ghost'"),
    (("user", "disable", "--tenant", "acme", "ghost"), None, "no user 'ghost'"),
    (("token", "issue", "--tenant", "acme", "--scope", "everything", "x"), None, "unknown scope"),
])
def test_refusals_are_one_line(control, args, stdin, message):
    p = mt(control, *args, stdin=stdin)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert p.stderr.startswith("mailtresor: ") and message in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_password_never_on_the_command_line(control):
    p = mt(control, "user", "add", "--tenant", "acme", "--role", "admin", "--password", "x", "a")
    assert p.returncode == 2 and "unrecognized arguments" in p.stderr


def test_no_access_key_at_the_control_endpoint(stack):
    from mailtresor.control.server import KeyStore, read_master_secret
    cs = stack.cfg.control_server
    store = KeyStore(cs.keystore, read_master_secret(cs.master_key))
    def drop(data):
        del data["t1"]["access"]
    store._modify(drop)
    stack.start_control()
    p = mt(stack, "user", "list", "--tenant", "acme")
    assert p.returncode == 1 and "no key 'access'" in p.stderr and "mailtresor-control keys create t1 access" in p.stderr
