"""Directory logins against a real slapd over LDAPS (tests/harness/slapd.py)."""

from pathlib import Path

import ldap3
import pytest

from mailtresor import config as configmod
from mailtresor.access import auth as authmod
from mailtresor.access.auth import Authenticator, LoginFailed
from mailtresor.access.ldap import Directory, DirectoryUnavailable, addresses_from, user_filter
from mailtresor.access.tokens import TokenDB
from mailtresor.access.users import UserDB
from tests.harness.slapd import Slapd, group_dn, user_dn
from tests.test_auth import KEY, make_cfg

pytestmark = pytest.mark.skipif(not Path("/usr/sbin/slapd").exists(), reason="slapd is not installed")


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    s = Slapd(tmp_path_factory.mktemp("slapd"))
    s.start()
    yield s
    s.close()


def ldap_cfg(tmp_path, slapd, **over):
    return make_cfg(tmp_path, {"throttle_failures": 100},
                    [{"name": "acme", "domains": ["acme.example"], "ldap": slapd.ldap_config(**over)},
                     {"name": "globex", "domains": ["globex.example"]}])


@pytest.fixture
def authn(tmp_path, slapd):
    a = Authenticator(ldap_cfg(tmp_path, slapd), UserDB(tmp_path / "users.db", KEY),
                      TokenDB(tmp_path / "tokens.db", KEY))
    yield a
    for d in a._dirs.values():
        d.close()


def login(a, name, password, tenant="acme"):
    return a.login(tenant=tenant, username=name, password=password, totp=None, client="192.0.2.9")


def test_good_login_roles_and_addresses(authn, slapd):
    p = login(authn, "alice", slapd.users["alice"])
    assert (p.kind, p.name, p.tenant) == ("user", "alice", "acme")
    assert p.roles == {"user"} and p.addresses == {"alice@acme.example"}
    carol = login(authn, "carol", slapd.users["carol"])
    assert carol.roles == {"user", "auditor"}
    bob = login(authn, "bob", slapd.users["bob"])
    assert bob.roles == {"user", "admin"}
    # mail + proxyAddresses: "smtp:" stripped, lower-cased, X500/SIP dropped.
    assert bob.addresses == {"bob@acme.example", "bob.builder@acme.example", "bob@old.acme.example"}


@pytest.mark.parametrize("name,password", [
    ("alice", "wrong-password"),
    ("alice", ""),                       # an empty simple bind is an anonymous bind: must not "succeed"
    ("nobody", "whatever-password"),
    ("*)(uid=*", "alice-password"),      # filter injection
    ("*", "alice-password"),
    ("al*", "alice-password"),           # unescaped, this finds exactly alice and logs in as "al*"
    ("alice)(|(uid=*", "alice-password"),
    ("alice\x00", "alice-password"),
])
def test_refused(authn, name, password):
    with pytest.raises(LoginFailed) as e:
        login(authn, name, password)
    assert str(e.value) == authmod.GENERIC


def test_escaped_filter_matches_nobody(slapd):
    """The filter built from "*)(uid=*" finds no entry (unescaped it finds everyone)."""
    tls = ldap3.Tls(validate=2, ca_certs_file=str(slapd.ca_file))
    c = ldap3.Connection(ldap3.Server(slapd.url, use_ssl=True, tls=tls), auto_bind=True)
    template = "(&(objectClass=inetOrgPerson)(uid={username}))"
    c.search(slapd.base, user_filter(template, "*)(uid=*"), attributes=[])
    assert c.entries == []
    c.search(slapd.base, template.replace("{username}", "*)(uid=*"), attributes=[])
    assert len(c.entries) == 3                          # what escaping prevents
    c.unbind()


def test_empty_password_never_reaches_the_directory(tmp_path, slapd, monkeypatch):
    d = Directory(ldap_cfg(tmp_path, slapd).tenant[0].ldap, tenant="acme")
    binds = []
    real = d._connect
    monkeypatch.setattr(d, "_connect", lambda user, pw: binds.append(user) or real(user, pw))
    assert d.authenticate("alice", "") is None
    assert binds == []
    d.close()


def test_unknown_user_costs_a_bind_like_a_wrong_password(tmp_path, slapd, monkeypatch):
    d = Directory(ldap_cfg(tmp_path, slapd).tenant[0].ldap, tenant="acme")
    d.authenticate("alice", slapd.users["alice"])        # the service connection is open now
    binds = []
    real = d._connect
    monkeypatch.setattr(d, "_connect", lambda user, pw: binds.append(user) or real(user, pw))
    assert d.authenticate("alice", "wrong-password") is None
    assert d.authenticate("nobody", "wrong-password") is None
    assert len(binds) == 2 and binds[0] == user_dn("alice") and binds[1].endswith(slapd.base)
    d.close()


def test_anonymous_search_without_service_account(tmp_path, slapd):
    a = Authenticator(ldap_cfg(tmp_path, slapd, bind_dn=None, bind_password_file=None),
                      UserDB(tmp_path / "u.db", KEY), TokenDB(tmp_path / "t.db", KEY))
    assert login(a, "carol", slapd.users["carol"]).roles == {"user", "auditor"}
    with pytest.raises(LoginFailed):
        login(a, "carol", "nope-nope")


def test_local_user_first(authn, slapd):
    authn.users.add("acme", "alice", "a local password", {"auditor"})
    assert login(authn, "alice", "a local password").roles == {"auditor"}
    with pytest.raises(LoginFailed):                # the local user shadows the directory's
        login(authn, "alice", slapd.users["alice"])


def test_other_tenant_has_no_directory(authn, slapd):
    with pytest.raises(LoginFailed):
        login(authn, "alice", slapd.users["alice"], tenant="globex")


def test_bad_ca_refused(tmp_path, slapd):
    cfg = ldap_cfg(tmp_path, slapd, ca_file=str(slapd.other_ca_file))
    d = Directory(cfg.tenant[0].ldap, tenant="acme")
    with pytest.raises(DirectoryUnavailable):
        d.authenticate("alice", slapd.users["alice"])
    a = Authenticator(cfg, UserDB(tmp_path / "u.db", KEY), TokenDB(tmp_path / "t.db", KEY))
    with pytest.raises(LoginFailed):
        login(a, "alice", slapd.users["alice"])


def test_wrong_service_password(tmp_path, slapd):
    pw = tmp_path / "wrong.pw"
    pw.write_text("not it\n")
    d = Directory(ldap_cfg(tmp_path, slapd, bind_password_file=str(pw)).tenant[0].ldap, tenant="acme")
    with pytest.raises(DirectoryUnavailable, match="refused the service bind"):
        d.authenticate("alice", slapd.users["alice"])


def test_reconnects_after_directory_restart(tmp_path, authn, slapd):
    login(authn, "alice", slapd.users["alice"])
    slapd.stop()
    slapd.start()
    assert login(authn, "alice", slapd.users["alice"]).name == "alice"


def test_addresses_from():
    assert addresses_from(["SMTP:A@B.example", "smtp:c@b.example", "x500:/o=x", "SIP:d@b.example",
                           "plain@B.Example", "not an address", b"bytes@b.example"]) == \
        {"a@b.example", "c@b.example", "plain@b.example", "bytes@b.example"}


def test_group_dns_compared_case_and_space_insensitively(tmp_path, slapd):
    spelled = group_dn("auditors").upper().replace(",", ", ")
    a = Authenticator(ldap_cfg(tmp_path, slapd, roles={spelled: "auditor"}),
                      UserDB(tmp_path / "u.db", KEY), TokenDB(tmp_path / "t.db", KEY))
    assert login(a, "carol", slapd.users["carol"]).roles == {"user", "auditor"}
    assert user_dn("carol")


def test_directory_outage_is_not_counted_against_the_user(tmp_path, slapd):
    """A wrong CA (or a dead directory) fails the login but throttles nobody."""
    cfg = make_cfg(tmp_path, {"throttle_failures": 2},
                   [{"name": "acme", "domains": ["acme.example"],
                     "ldap": slapd.ldap_config(ca_file=str(slapd.other_ca_file))}])
    a = Authenticator(cfg, UserDB(tmp_path / "u.db", KEY), TokenDB(tmp_path / "t.db", KEY))
    for _ in range(4):
        with pytest.raises(LoginFailed) as e:
            login(a, "alice", slapd.users["alice"])
        assert e.value.unavailable and str(e.value) == authmod.GENERIC


def test_start_tls(tmp_path, slapd):
    a = Authenticator(ldap_cfg(tmp_path, slapd, url=slapd.plain_url, start_tls=True),
                      UserDB(tmp_path / "u.db", KEY), TokenDB(tmp_path / "t.db", KEY))
    assert login(a, "bob", slapd.users["bob"]).roles == {"user", "admin"}
    bad = Directory(ldap_cfg(tmp_path, slapd, url=slapd.plain_url, start_tls=True,
                             ca_file=str(slapd.other_ca_file)).tenant[0].ldap, tenant="acme")
    with pytest.raises(DirectoryUnavailable):
        bad.authenticate("bob", slapd.users["bob"])
