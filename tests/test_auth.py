"""Logins and roles without a directory: local users (argon2id, TOTP,
recovery codes), API tokens, sessions, throttling, the encrypted files."""

import os
import stat
import subprocess
import sys
import textwrap
import urllib.parse
from pathlib import Path

import pyotp
import pytest

from mailtresor import config as configmod
from mailtresor.keys import crypto
from mailtresor.access import auth as authmod
from mailtresor.access import users as usersmod
from mailtresor.access.auth import Authenticator, LoginFailed
from mailtresor.access.principal import Principal
from mailtresor.access.sealed import StoreError
from mailtresor.access.sessions import Sessions, Throttle, Throttled
from mailtresor.access.tokens import TokenDB, TokenError, parse
from mailtresor.access.users import UserDB, UserError

KEY = crypto.derive(b"k" * 32, b"", b"mailtresor access v1")
PW = "correct horse battery"


class Clock:
    def __init__(self, t=1_700_000_000.0):
        self.t = t

    def __call__(self):
        return self.t


def make_cfg(tmp_path, access=None, tenants=None):
    raw = {"appliance": {"name": "a", "state_directory": str(tmp_path / "state")},
           "control": {"url": "https://127.0.0.1:1", "ca_file": "ca", "cert_file": "c", "key_file": "k"},
           "spool": {"directory": str(tmp_path / "spool")},
           "tenant": tenants or [{"name": "acme", "domains": ["acme.example"]},
                                 {"name": "globex", "domains": ["globex.example"]}],
           "access": access or {}}
    return configmod.parse(raw, Path("test.toml"))


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def db(tmp_path, clock):
    return UserDB(tmp_path / "access" / "users.db", KEY, clock=clock)


@pytest.fixture
def tokens(tmp_path, clock):
    return TokenDB(tmp_path / "access" / "tokens.db", KEY, clock=clock)


@pytest.fixture
def authn(tmp_path, db, tokens, clock):
    # Throttling has tests of its own; here it would get in the way.
    return Authenticator(make_cfg(tmp_path, {"throttle_failures": 100}), db, tokens, clock=clock)


# --- the principal and its role table ---------------------------------------------

def test_role_table():
    user = Principal("user", "u", "acme", frozenset({"user"}))
    auditor = Principal("user", "a", "acme", frozenset({"auditor"}))
    admin = Principal("user", "ad", "acme", frozenset({"admin"}))
    appl = Principal("user", "root", None, frozenset({"appliance-admin"}))
    local = Principal("local", "uid=0", None, frozenset())
    soc = Principal("token", "t", "acme", frozenset(), scopes=frozenset({"events"}))
    search = Principal("token", "t", "acme", frozenset(), scopes=frozenset({"search"}))
    assert user.can("read-own") and not user.can("read-tenant") and not user.can("audit-read")
    assert auditor.can("read-tenant") and auditor.can("audit-read") and auditor.can("events")
    assert not auditor.can("manage-users")
    # Administrators read no mail.
    for p in (admin, appl):
        assert p.can("manage-users") and p.can("manage-tokens")
        assert not p.can("read-own") and not p.can("read-tenant") and not p.can("export")
    assert appl.can("manage-tenants") and not admin.can("manage-tenants")
    assert local.can("read-tenant") and local.can("manage-users") and local.can("audit-read")
    assert soc.can("events") and not soc.can("read-tenant")
    assert search.can("read-tenant") and not search.can("export") and not search.can("events")
    with pytest.raises(ValueError):
        user.can("read-everything")
    with pytest.raises(ValueError):
        Principal("user", "x", "acme", frozenset({"root"}))


# --- users ---------------------------------------------------------------------------

def test_add_and_login(authn, db):
    db.add("acme", "alice", PW, {"user"}, ["Alice@Acme.Example"])
    p = authn.login(tenant="acme", username="alice", password=PW, totp=None, client="192.0.2.1")
    assert p == Principal("user", "alice", "acme", frozenset({"user"}),
                          addresses=frozenset({"alice@acme.example"}), client="192.0.2.1")
    with pytest.raises(LoginFailed) as e:
        authn.login(tenant="acme", username="alice", password="wrong one!", totp=None, client="c")
    assert str(e.value) == authmod.GENERIC and not e.value.needs_totp


def test_hash_is_argon2id_and_file_encrypted(db, tmp_path):
    db.add("acme", "alice", PW, {"user"}, ["alice@acme.example"])
    assert db.password_hash("acme", "alice").startswith("$argon2id$")
    raw = db.path.read_bytes()
    for needle in (b"alice", b"argon2", b"acme.example"):
        assert needle not in raw
    assert stat.S_IMODE(os.stat(db.path).st_mode) == 0o600
    with pytest.raises(StoreError, match="does not decrypt"):
        UserDB(db.path, b"x" * 32).list("acme")
    flipped = bytearray(raw)
    flipped[40] ^= 1
    db.path.write_bytes(bytes(flipped))
    with pytest.raises(StoreError, match="altered"):
        UserDB(db.path, KEY).list("acme")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to write as root into another user's directory")
def test_root_writes_the_file_for_the_directory_owner(tmp_path):
    """`mailtresor user add` runs as root; the daemon reads users.db as
    mailtresor: the file (and its lock) belong to the directory's owner."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, 65534, 65534)
    access = state / "access"               # made by root's first write
    db = UserDB(access / "users.db", KEY)
    db.add("acme", "alice", PW, {"user"}, ["alice@acme.example"])
    for name in ("", "users.db", "users.db.lock"):
        st = os.stat(access / name)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65534, 0o600 if name else 0o700), name


def test_tenants_are_separate(authn, db):
    db.add("acme", "bob", PW, {"user"})
    with pytest.raises(LoginFailed):
        authn.login(tenant="globex", username="bob", password=PW, totp=None, client="c")
    with pytest.raises(LoginFailed):
        authn.login(tenant=None, username="bob", password=PW, totp=None, client="c")
    with pytest.raises(LoginFailed):
        authn.login(tenant="nosuch", username="bob", password=PW, totp=None, client="c")


def test_appliance_admin(authn, db):
    db.add(None, "root", PW, {"appliance-admin"})
    p = authn.login(tenant=None, username="root", password=PW, totp=None, client="c")
    assert p.tenant is None and p.roles == {"appliance-admin"}
    with pytest.raises(UserError, match="appliance-admin and no other"):
        db.add(None, "x", PW, {"admin"})
    with pytest.raises(UserError, match="not a tenant role"):
        db.add("acme", "x", PW, {"appliance-admin"})


@pytest.mark.parametrize("args,message", [
    (("acme", "*)(uid=*", PW, {"user"}), "invalid user name"),
    (("acme", "", PW, {"user"}), "invalid user name"),
    (("acme", "x", "short", {"user"}), "too short"),
    (("acme", "x", PW, {"boss"}), "unknown role"),
    (("acme", "x", PW, set()), "at least one role"),
    (("acme", "x", PW, {"user"}, ["not-an-address"]), "not a mail address"),
])
def test_add_refuses(db, args, message):
    with pytest.raises(UserError, match=message):
        db.add(*args)


def test_duplicate_disable_enable_passwd(authn, db):
    db.add("acme", "carol", PW, {"auditor"})
    with pytest.raises(UserError, match="exists already"):
        db.add("acme", "carol", PW, {"user"})
    db.disable("acme", "carol")
    with pytest.raises(LoginFailed) as e:
        authn.login(tenant="acme", username="carol", password=PW, totp=None, client="c")
    assert str(e.value) == authmod.GENERIC
    db.enable("acme", "carol")
    authn.login(tenant="acme", username="carol", password=PW, totp=None, client="c")
    db.passwd("acme", "carol", "another good one")
    with pytest.raises(LoginFailed):
        authn.login(tenant="acme", username="carol", password=PW, totp=None, client="c")
    authn.login(tenant="acme", username="carol", password="another good one", totp=None, client="c")
    with pytest.raises(UserError, match="no user 'dave'"):
        db.passwd("acme", "dave", PW)
    assert [u.name for u in db.list("acme")] == ["carol"] and db.list("globex") == []
    assert "hash" not in db.list("acme")[0].public()


class CountingHasher:
    def __init__(self, inner):
        self.inner, self.verified = inner, []

    def verify(self, h, password):
        self.verified.append(h)
        return self.inner.verify(h, password)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_unknown_user_costs_one_verify_like_a_wrong_password(authn, db, monkeypatch):
    """Timing equalisation: an unknown name runs argon2 against the dummy
    hash, exactly once, as a wrong password runs it once against the real one."""
    db.add("acme", "alice", PW, {"user"})
    counting = CountingHasher(usersmod._hasher)
    monkeypatch.setattr(usersmod, "_hasher", counting)
    for tenant, name, pw in (("acme", "nobody", PW), ("acme", "alice", "wrong password"),
                             ("acme", "nobody", ""), ("acme", "alice", ""), ("nosuch", "alice", PW),
                             (None, "alice", PW)):
        counting.verified.clear()
        with pytest.raises(LoginFailed) as e:
            authn.login(tenant=tenant, username=name, password=pw, totp=None, client=f"c-{name}-{pw}")
        assert str(e.value) == authmod.GENERIC
        assert len(counting.verified) == 1, (tenant, name, pw)
        real = db.password_hash("acme", "alice")
        if name == "alice" and tenant == "acme" and pw:
            assert counting.verified == [real]
        else:
            assert counting.verified == [usersmod.DUMMY_HASH]


# --- TOTP and recovery codes ------------------------------------------------------------

def test_totp(authn, db, clock):
    db.add("acme", "erin", PW, {"auditor"})
    uri, codes = db.totp_enable("acme", "erin")
    q = urllib.parse.urlparse(uri)
    assert q.scheme == "otpauth" and q.netloc == "totp" and "erin%40acme" in q.path
    secret = urllib.parse.parse_qs(q.query)["secret"][0]
    assert secret.encode() not in db.path.read_bytes()
    totp = pyotp.TOTP(secret)
    # Password right, no code: distinguishable, after the password only.
    with pytest.raises(LoginFailed) as e:
        authn.login(tenant="acme", username="erin", password=PW, totp=None, client="c")
    assert e.value.needs_totp and str(e.value) == authmod.GENERIC
    with pytest.raises(LoginFailed) as e:
        authn.login(tenant="acme", username="erin", password="wrong password", totp=None, client="c")
    assert not e.value.needs_totp
    # A wrong code.
    good = totp.at(clock.t)
    bad = f"{(int(good) + 1) % 1000000:06d}"
    with pytest.raises(LoginFailed) as e:
        authn.login(tenant="acme", username="erin", password=PW, totp=bad, client="c")
    assert not e.value.needs_totp
    authn.login(tenant="acme", username="erin", password=PW, totp=good, client="c")
    # The same code again: replay refused (even within its 30 s).
    with pytest.raises(LoginFailed):
        authn.login(tenant="acme", username="erin", password=PW, totp=good, client="c")
    # ±1 step: the next step's code is accepted now; the previous one no longer (older than used).
    clock.t += 30
    authn.login(tenant="acme", username="erin", password=PW, totp=totp.at(clock.t + 30), client="c")
    with pytest.raises(LoginFailed):
        authn.login(tenant="acme", username="erin", password=PW, totp=totp.at(clock.t), client="c")
    # Two steps away: refused.
    clock.t += 300
    with pytest.raises(LoginFailed):
        authn.login(tenant="acme", username="erin", password=PW, totp=totp.at(clock.t + 60), client="c")
    authn.login(tenant="acme", username="erin", password=PW, totp=totp.at(clock.t - 30), client="c")


def test_recovery_codes_once_each(authn, db):
    db.add("acme", "frank", PW, {"user"})
    _, codes = db.totp_enable("acme", "frank")
    assert len(codes) == 10 and len(set(codes)) == 10
    raw = db.path.read_bytes()
    assert all(c.encode() not in raw for c in codes)
    authn.login(tenant="acme", username="frank", password=PW, totp=codes[3], client="c")
    with pytest.raises(LoginFailed):
        authn.login(tenant="acme", username="frank", password=PW, totp=codes[3], client="c")
    assert db.get("acme", "frank").recovery_left == 9
    authn.login(tenant="acme", username="frank", password=PW, totp=codes[4].upper().replace("-", ""),
                client="c")
    # Re-enrolling replaces the codes.
    _, fresh = db.totp_enable("acme", "frank")
    with pytest.raises(LoginFailed):
        authn.login(tenant="acme", username="frank", password=PW, totp=codes[5], client="c")
    authn.login(tenant="acme", username="frank", password=PW, totp=fresh[0], client="c")
    db.totp_disable("acme", "frank")
    authn.login(tenant="acme", username="frank", password=PW, totp=None, client="c")



def test_two_step_enrolment_stores_only_a_proven_secret(authn, db, clock):
    """The web's enrolment: a candidate secret is stored (totp_set) with the
    step of the code that proved it, so that code cannot log in again; new
    recovery codes replace the old ones."""
    db.add("acme", "gus", PW, {"user"})
    secret = usersmod.new_totp_secret()
    uri = usersmod.totp_uri("acme", "gus", secret)
    assert pyotp.parse_uri(uri).secret == secret and "gus%40acme" in uri and "issuer=mailtresor" in uri
    totp = pyotp.TOTP(secret)
    assert usersmod.totp_step(secret, "12345", clock.t) is None
    assert usersmod.totp_step(secret, totp.at(clock.t + 90), clock.t) is None       # two steps away
    step = usersmod.totp_step(secret, totp.at(clock.t), clock.t)
    assert step == int(clock.t // 30)
    assert not db.get("acme", "gus").totp                  # nothing stored by the check
    codes = db.totp_set("acme", "gus", secret, last_step=step)
    assert db.get("acme", "gus").totp and len(codes) == usersmod.RECOVERY_CODES
    assert secret.encode() not in db.path.read_bytes()
    with pytest.raises(LoginFailed):                       # the enrolment's code is used up
        authn.login(tenant="acme", username="gus", password=PW, totp=totp.at(clock.t), client="c")
    authn.login(tenant="acme", username="gus", password=PW, totp=totp.at(clock.t + 30), client="c")
    fresh = db.new_recovery_codes("acme", "gus")
    assert not set(fresh) & set(codes)
    with pytest.raises(LoginFailed):
        authn.login(tenant="acme", username="gus", password=PW, totp=codes[0], client="c")
    authn.login(tenant="acme", username="gus", password=PW, totp=fresh[0], client="c")
    db.totp_disable("acme", "gus")
    with pytest.raises(UserError):
        db.new_recovery_codes("acme", "gus")
    with pytest.raises(Exception):
        db.totp_set("acme", "gus", "not base32 !")
    assert not db.get("acme", "gus").totp


def test_reauthenticate_uses_the_logins_counters(tmp_path, db, tokens, clock):
    """The account page's password (and code) check: a wrong one counts
    like a failed login, a throttled name must wait there too, and the
    code is checked like at login (once)."""
    authn = Authenticator(make_cfg(tmp_path, {"throttle_failures": 3, "throttle_window": 60}), db, tokens,
                          clock=clock)
    db.add("acme", "hal", PW, {"user"})
    who = Principal(kind="user", name="hal", tenant="acme", roles={"user"}, client="10.1.1.1")
    authn.reauthenticate(who, PW)
    for i in range(3):
        with pytest.raises(LoginFailed):
            authn.reauthenticate(who, f"guess {i}xx")
    with pytest.raises(Throttled):                         # the page is throttled ...
        authn.reauthenticate(who, PW)
    with pytest.raises(Throttled):                         # ... and so is the login, same counter
        authn.login(tenant="acme", username="hal", password=PW, totp=None, client="10.2.2.2")
    clock.t += 3600
    uri, codes = db.totp_enable("acme", "hal")
    totp = pyotp.parse_uri(uri)
    with pytest.raises(LoginFailed):
        authn.reauthenticate(who, PW, "000000" if totp.at(clock.t) != "000000" else "111111")
    authn.reauthenticate(who, PW, totp.at(clock.t))
    with pytest.raises(LoginFailed):                       # replay
        authn.reauthenticate(who, PW, totp.at(clock.t))
    authn.reauthenticate(who, PW, codes[0])
    assert db.get("acme", "hal").recovery_left == usersmod.RECOVERY_CODES - 1
    with pytest.raises(LoginFailed):                       # a right code does not stand in for the password
        authn.reauthenticate(who, "wrong password", codes[1])
    nobody = Principal(kind="user", name="dirk", tenant="acme", roles={"user"}, client="10.3.3.3")
    with pytest.raises(LoginFailed):                       # no local user: nothing to check against
        authn.reauthenticate(nobody, PW)


def test_drop_user_keeps_the_session_that_made_the_change(clock):
    s = Sessions(clock=clock)
    alice = Principal(kind="user", name="alice", tenant="acme", roles={"user"})
    mine, _ = s.create(alice)
    other, _ = s.create(alice)
    bob, _ = s.create(Principal(kind="user", name="bob", tenant="acme", roles={"user"}))
    with s.sparing(mine):
        assert s.drop_user("acme", "alice") == 1           # the listener's drop, in this thread
    assert s.get(mine) is not None and s.get(other) is None and s.get(bob) is not None
    other, _ = s.create(alice)
    assert s.drop_user("acme", "alice", keep=mine) == 1 and s.get(mine) is not None
    assert s.drop_user("acme", "alice") == 1 and s.get(mine) is None     # sparing() is over

# --- tokens ------------------------------------------------------------------------------

def test_tokens(authn, tokens, clock):
    tid, secret = tokens.issue("acme", "soc", {"events"}, clock.t + 3600)
    assert secret.startswith(f"mt_{tid}_") and parse(secret) is not None
    raw = tokens.path.read_bytes()
    assert secret.split("_", 2)[2].encode() not in raw and b"soc" not in raw
    p = authn.token(secret, "198.51.100.7")
    assert p == Principal("token", tid, "acme", frozenset(), scopes=frozenset({"events"}), client="198.51.100.7")
    assert p.can("events") and not p.can("read-tenant")
    listed = tokens.list("acme")
    assert [t.id for t in listed] == [tid] and tokens.list("globex") == []
    assert "hash" not in listed[0].public() and secret not in str(listed[0].public())
    # A wrong secret with the right id, garbage, another token's prefix.
    wrong = secret[:-2] + ("AA" if not secret.endswith("AA") else "BB")
    for bad in (wrong, "mt_x_y", "", f"mt_{tid}_", secret + "x", "Bearer " + secret):
        with pytest.raises(LoginFailed):
            authn.token(bad, "c")
    # Expiry.
    clock.t += 3601
    with pytest.raises(LoginFailed):
        authn.token(secret, "c")


def test_token_revoke_and_refusals(authn, tokens, clock):
    tid, secret = tokens.issue("acme", "ediscovery", {"search", "export"}, None)
    authn.token(secret, "c")
    with pytest.raises(TokenError, match="no token"):
        tokens.revoke(tid, "globex")          # another tenant's id is "no such token"
    authn.token(secret, "c")
    tokens.revoke(tid, "acme")
    with pytest.raises(LoginFailed):
        authn.token(secret, "c")
    assert tokens.list("acme")[0].revoked
    with pytest.raises(TokenError, match="unknown scope"):
        tokens.issue("acme", "x", {"everything"}, None)
    with pytest.raises(TokenError, match="in the past"):
        tokens.issue("acme", "x", {"events"}, clock.t - 1)


# --- sessions --------------------------------------------------------------------------

def test_sessions_timeouts(clock):
    s = Sessions(idle=60, absolute=300, clock=clock)
    p = Principal("user", "u", "acme", frozenset({"user"}))
    sid, csrf = s.create(p)
    assert len(sid) >= 43 and len(csrf) >= 43 and sid != csrf
    assert s.get(sid) == (p, csrf)
    assert s.check_csrf(sid, csrf) and not s.check_csrf(sid, csrf[:-1] + "x") and not s.check_csrf(sid, None)
    # Idle timeout: activity keeps it alive...
    for _ in range(5):
        clock.t += 59
        assert s.get(sid) is not None
    # ... until the absolute timeout.
    clock.t += 59
    assert s.get(sid) is None
    sid, _ = s.create(p)
    clock.t += 61
    assert s.get(sid) is None
    sid, _ = s.create(p)
    s.drop(sid)
    assert s.get(sid) is None and s.get("nonsense") is None
    other, _ = s.create(p)
    assert s.drop_user("acme", "u") == 1 and s.get(other) is None


# --- throttling ------------------------------------------------------------------------

def test_throttle_backoff(clock):
    t = Throttle(failures=3, window=60, base=2, max_delay=20, clock=clock)
    k = ("user:acme/x", "addr:c")
    for _ in range(2):
        t.check(k)
        t.failure(k)
    t.check(k)
    t.failure(k)                       # the third: from now on, back-off
    with pytest.raises(Throttled) as e:
        t.check(k)
    assert e.value.retry_after == pytest.approx(2)
    delays = []
    for _ in range(6):
        try:
            t.check(k)
        except Throttled as exc:
            clock.t += exc.retry_after
            delays.append(exc.retry_after)
        t.check(k)
        t.failure(k)
    assert delays == [2, 4, 8, 16, 20, 20]      # doubling, capped
    # Quiet for the back-off plus the window: forgotten.
    clock.t += 20 + 61
    t.check(k)


def test_login_throttled_per_user_and_per_address(tmp_path, db, tokens, clock):
    authn = Authenticator(make_cfg(tmp_path, {"throttle_failures": 3, "throttle_window": 60}), db, tokens,
                          clock=clock)
    db.add("acme", "alice", PW, {"user"})
    for i in range(3):
        with pytest.raises(LoginFailed):
            authn.login(tenant="acme", username="alice", password=f"guess {i}xx", totp=None, client=f"10.0.0.{i}")
    # Per user: even the right password from a fresh address must wait.
    with pytest.raises(Throttled) as e:
        authn.login(tenant="acme", username="ALICE", password=PW, totp=None, client="10.9.9.9")
    assert e.value.retry_after > 0
    clock.t += e.value.retry_after
    authn.login(tenant="acme", username="alice", password=PW, totp=None, client="10.9.9.9")
    # Per address: one address guessing at many names.
    for i in range(3):
        with pytest.raises(LoginFailed):
            authn.login(tenant="acme", username=f"name{i}", password="whatever1", totp=None, client="203.0.113.5")
    with pytest.raises(Throttled):
        authn.login(tenant="acme", username="alice", password=PW, totp=None, client="203.0.113.5")
    # A good login from that address does not reset the address's count.
    authn.login(tenant="acme", username="alice", password=PW, totp=None, client="10.9.9.9")
    with pytest.raises(Throttled):
        authn.login(tenant="acme", username="someone", password="x", totp=None, client="203.0.113.5")


# --- one file, two processes -------------------------------------------------------------

def test_daemon_sees_cli_changes(tmp_path, clock):
    path = tmp_path / "users.db"
    daemon = UserDB(path, KEY)
    cli = UserDB(path, KEY)
    cli.add("acme", "gina", PW, {"user"})
    assert daemon.get("acme", "gina") is not None
    cli.disable("acme", "gina")
    assert daemon.get("acme", "gina").disabled


WRITER = textwrap.dedent("""
    import sys
    from mailtresor.access.users import UserDB
    from mailtresor.access.tokens import TokenDB
    path, key, who = sys.argv[1], bytes.fromhex(sys.argv[2]), sys.argv[3]
    db = UserDB(path + "/users.db", key)
    toks = TokenDB(path + "/tokens.db", key)
    for i in range(int(sys.argv[4])):
        db.update("acme", "h", addresses=None)
        toks.issue("acme", f"{who}-{i}", {"events"}, None)
""")


def test_concurrent_writers_lose_nothing(tmp_path):
    """Two processes (a CLI and the daemon, say) issuing tokens at once:
    every token is there afterwards (flock + re-read before modify)."""
    UserDB(tmp_path / "users.db", KEY).add("acme", "h", PW, {"user"})
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent / "daemon"))
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), KEY.hex(), who, "15"], env=env)
             for who in ("cli", "daemon", "api")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    names = {t.name for t in TokenDB(tmp_path / "tokens.db", KEY).list("acme")}
    assert names == {f"{w}-{i}" for w in ("cli", "daemon", "api") for i in range(15)}
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
