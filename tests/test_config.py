"""Strict configuration: errors name the file and the key; nothing starts
with a configuration it does not understand."""

import subprocess
import sys
from pathlib import Path

import pytest

from mailtresor import config
from tests.harness.stack import Stack

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def load_text(tmp_path, text: str):
    p = tmp_path / "m.toml"
    p.write_text(text)
    return config.load(p), p


BASE = """
[appliance]
name = "a"
[control]
url = "https://127.0.0.1:1"
ca_file = "ca.pem"
cert_file = "c.pem"
key_file = "c.key"
[spool]
directory = "spool"
"""


def test_minimal_config_loads_with_defaults(tmp_path):
    cfg, p = load_text(tmp_path, BASE)
    assert cfg.appliance.name == "a" and cfg.spool.max_tries == 5 and cfg.milter is None
    assert cfg.source == p and cfg.relay.listener == ()


def test_dev_config_loads():
    cfg = config.load(REPO / "conf" / "dev.toml")
    assert [t.name for t in cfg.tenant] == ["acme", "globex"]
    assert [lst.endpoint for lst in cfg.relay.listener] == ["tcp:10025:interface=127.0.0.1",
                                                             "tcp:10465:interface=127.0.0.1"]
    assert cfg.milter.listen == "unix:run/milter.sock"
    assert cfg.control.url == "https://127.0.0.1:8444"


def test_example_config_loads():
    cfg = config.load(REPO / "conf" / "mailtresor.toml")
    assert cfg.milter is not None and cfg.relay.listener


@pytest.mark.parametrize("extra,key,message", [
    ("[service]\nlog_levl = 'info'\n", "service.log_levl", "unknown key"),
    ("[bogus]\nx = 1\n", "bogus", "unknown key"),
    ("[service]\nshutdown_timeout = 'soon'\n", "service.shutdown_timeout", "expected a number"),
    ("[service]\nlog_level = 'loud'\n", "service.log_level", "is not one of"),
    ("[[tenant]]\nname = 'x'\n", "tenant[0].domains", "required key is missing"),
    ("[[tenant]]\nname = 'x'\ndomains = 'x.example'\n", "tenant[0].domains", "expected a list"),
    ("[[tenant]]\nname = 'x'\ndomains = ['X.Example']\n", "tenant[0].domains[0]", "lower-case"),
    ("[[tenant]]\nname = 'Acme'\ndomains = ['x.example']\n", "tenant[0].name", "'Acme': use lower-case letters"),
    ("[[tenant]]\nname = 'caf\u00e9'\ndomains = ['x.example']\n", "tenant[0].name", "use lower-case letters"),
    ("[[tenant]]\nname = '-x'\ndomains = ['x.example']\n", "tenant[0].name", "starting with a letter or digit"),
    ("[[tenant]]\nname = '" + "x" * 57 + "'\ndomains = ['x.example']\n", "tenant[0].name", "at most 56"),
    ("[[tenant]]\nname = 'x'\ndomains = ['x.example']\n[[tenant]]\nname = 'x'\ndomains = ['y.example']\n",
     "tenant[1].name", "defined twice"),
    ("[relay]\nmax_connections = -1\n", "relay.max_connections", "must not be negative"),
    ("[relay]\nmax_connections = true\n", "relay.max_connections", "expected an integer"),
    ("[[relay.listener]]\nendpoint = 'tcp:25'\ntls = 'none'\n", "relay.listener[0].tls", "is not one of"),
    ("[[relay.listener]]\nendpoint = 'tcp:25'\ntls = 'starttls'\n", "relay.listener", "[tls] section"),
    ("[[relay.connector]]\nname = 'x'\nnetworks = ['10.0.0.300/8']\n", "relay.connector[0].networks[0]",
     "is not a network"),
    ("[[relay.connector]]\nname = 'x'\n", "relay.connector[0]", "needs networks"),
    ("[[relay.connector]]\nname = 'x'\nnetworks = ['10.0.0.0/8']\ntenant = 'nobody'\n",
     "relay.connector[0].tenant", "unknown tenant"),
    ("[[relay.connector]]\nname = 'x'\nnetworks = ['10.0.0.0/8']\nrecipients = ['journal']\n",
     "relay.connector[0].recipients[0]", "'journal' is not an address"),
    ("[[relay.connector]]\nname = 'x'\nnetworks = ['10.0.0.0/8']\nrecipients = 'j@x.example'\n",
     "relay.connector[0].recipients", "expected a list"),
    # Issue 12: journaling only with a verified certificate and a tenant;
    # an Exchange Online tenant id only with its secret journal address.
    ("[[relay.connector]]\nname = 'x'\nnetworks = ['10.0.0.0/8']\njournal = true\n",
     "relay.connector[0].journal", "needs client_cert = \"required\""),
    ("[[relay.connector]]\nname = 'x'\nnetworks = ['10.0.0.0/8']\nclient_cert = 'optional'\n"
     "client_cert_names = ['exo']\njournal = true\n", "relay.connector[0].journal", "needs client_cert"),
    ("[tls]\ncert_file = 'r.pem'\nkey_file = 'r.key'\nclient_ca_file = 'ca.pem'\n"
     "[[relay.connector]]\nname = 'x'\nclient_cert = 'required'\njournal = true\n",
     "relay.connector[0].journal", "needs a tenant"),
    ("[relay]\n[[relay.connector]]\nname = 'x'\nnetworks = ['10.0.0.0/8']\njournal = 'yes'\n",
     "relay.connector[0].journal", "expected true or false"),
    ("[tls]\ncert_file = 'r.pem'\nkey_file = 'r.key'\nclient_ca_file = 'ca.pem'\n"
     "[[tenant]]\nname = 'acme'\ndomains = ['acme.example']\n"
     "[[relay.connector]]\nname = 'x'\nclient_cert = 'required'\ntenant = 'acme'\n"
     "exchange_tenant_id = '8d0f1d7c-1a2b-4c3d-9e8f-0a1b2c3d4e5f'\nrecipients = ['j@archive.example']\n",
     "relay.connector[0].exchange_tenant_id", "only a journaling connector"),
    ("[tls]\ncert_file = 'r.pem'\nkey_file = 'r.key'\nclient_ca_file = 'ca.pem'\n"
     "[[tenant]]\nname = 'acme'\ndomains = ['acme.example']\n"
     "[[relay.connector]]\nname = 'x'\nclient_cert = 'required'\ntenant = 'acme'\njournal = true\n"
     "exchange_tenant_id = 'contoso.onmicrosoft.com'\nrecipients = ['j@archive.example']\n",
     "relay.connector[0].exchange_tenant_id", "is not a tenant id"),
    ("[tls]\ncert_file = 'r.pem'\nkey_file = 'r.key'\nclient_ca_file = 'ca.pem'\n"
     "[[tenant]]\nname = 'acme'\ndomains = ['acme.example']\n"
     "[[relay.connector]]\nname = 'x'\nclient_cert = 'required'\ntenant = 'acme'\njournal = true\n"
     "exchange_tenant_id = '8d0f1d7c-1a2b-4c3d-9e8f-0a1b2c3d4e5f'\n",
     "relay.connector[0].recipients", "needs its journal address"),
    ("[milter]\nlisten = 'inet:25@x'\n", "milter.listen", "unix:PATH or tcp"),
    ("[milter]\nlisten = 'unix:/run/m.sock'\non_failure = 'ignore'\n", "milter.on_failure", "is not one of"),
])
def test_bad_configs_name_file_and_key(tmp_path, extra, key, message):
    with pytest.raises(config.ConfigError) as e:
        load_text(tmp_path, BASE + extra)
    text = str(e.value)
    assert text.startswith(str(tmp_path / "m.toml") + ": " + key + ":"), text
    assert message in text


def test_journaling_connectors_load(tmp_path):
    cfg, _ = load_text(tmp_path, BASE + """
[tls]
cert_file = "r.pem"
key_file = "r.key"
client_ca_file = "ca.pem"
[[tenant]]
name = "acme"
domains = ["acme.example"]
[[relay.connector]]
name = "exo-acme"
networks = ["40.92.0.0/15"]
client_cert = "required"
client_cert_names = ["mail.protection.outlook.com"]
tenant = "acme"
journal = true
exchange_tenant_id = "8D0F1D7C-1A2B-4C3D-9E8F-0A1B2C3D4E5F"
recipients = ["journal-7f3k9q@archive.example"]
[[relay.connector]]
name = "mta"
networks = ["192.0.2.0/28"]
""")
    exo, mta = cfg.relay.connector
    assert exo.journal and exo.exchange_tenant_id == "8D0F1D7C-1A2B-4C3D-9E8F-0A1B2C3D4E5F"
    assert not mta.journal and mta.exchange_tenant_id == ""
    # The shipped examples declare their journaling connectors as such.
    for name in ("mailtresor.toml", "dev.toml"):
        conf = config.load(REPO / "conf" / name)
        assert [c.name for c in conf.relay.connector if c.journal] == [conf.relay.connector[0].name]


def test_plaintext_control_url_is_refused(tmp_path):
    with pytest.raises(config.ConfigError, match="control.url: must be an https://"):
        load_text(tmp_path, BASE.replace("https://", "http://"))


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(config.ConfigError, match="no such configuration file"):
        config.load(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("[appliance\nname=")
    with pytest.raises(config.ConfigError, match="bad.toml: not valid TOML"):
        config.load(tmp_path / "bad.toml")


def test_config_location(monkeypatch):
    monkeypatch.delenv(config.ENV_VAR, raising=False)
    assert config.locate(None) == Path("/etc/mailtresor/mailtresor.toml")
    monkeypatch.setenv(config.ENV_VAR, "/x/y.toml")
    assert config.locate(None) == Path("/x/y.toml")
    assert config.locate("/a.toml") == Path("/a.toml")


@pytest.mark.parametrize("endpoint,expected", [
    ("unix:/run/mailtresor/milter.sock", "unix:/run/mailtresor/milter.sock"),
    ("unix:address=/run/m.sock", "unix:/run/m.sock"),
    ("tcp:8891:interface=127.0.0.1", "inet:8891@127.0.0.1"),
    ("tcp6:8891:interface=\\:\\:1", "inet6:8891@::1"),
])
def test_milter_socket_translation(endpoint, expected):
    assert config.milter_socket(endpoint) == expected


def test_daemon_refuses_a_bad_config(tmp_path):
    """The daemon does not start: exit 2, one line naming file and key."""
    p = tmp_path / "m.toml"
    p.write_text(BASE.replace('directory = "spool"', 'directory = "spool"\nmax_tries = "three"'))
    r = subprocess.run([str(VENV_BIN / "mailtresord"), "--config", str(p)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == f"mailtresord: {p}: spool.max_tries: expected an integer, got a string"
    r = subprocess.run([str(VENV_BIN / "mailtresord"), "--check-config"], capture_output=True, text=True,
                       env={"MAILTRESOR_CONFIG": str(REPO / "conf" / "dev.toml"), "PATH": "/usr/bin:/bin"},
                       timeout=60)
    assert r.returncode == 0 and "configuration OK" in r.stdout


def test_generated_test_config_round_trips(tmp_path):
    s = Stack(tmp_path / "s", milter=False)
    try:
        assert s.cfg.appliance.name == "t1" and s.cfg.milter is None
        assert s.cfg.relay.connector[0].tenant == "acme"
    finally:
        s.close()


# --- [audit] (issue 13: the audit trail) ---

def test_audit_defaults_to_the_state_directory(tmp_path):
    cfg, _ = load_text(tmp_path, BASE)
    assert cfg.audit.directory == Path("/var/lib/mailtresor/audit") and cfg.audit.seal_every == 1000
    cfg, _ = load_text(tmp_path, BASE.replace('name = "a"', 'name = "a"\nstate_directory = "st"'))
    assert cfg.audit.directory == Path("st/audit")
    cfg, _ = load_text(tmp_path, BASE + "[audit]\ndirectory = 'trail'\nseal_every = 5\n")
    assert cfg.audit.directory == Path("trail") and cfg.audit.seal_every == 5


@pytest.mark.parametrize("extra,key,message", [
    ("[audit]\nseal_every = 0\n", "audit.seal_every", "between 1 and 1000000"),
    ("[audit]\nseal_every = 2000000\n", "audit.seal_every", "between 1 and 1000000"),
    ("[audit]\nseal_every = 'often'\n", "audit.seal_every", "expected an integer"),
    ("[audit]\ndirectory = ''\n", "audit.directory", "expected a path"),
    ("[audit]\ndirectory = 'spool'\n", "audit.directory", "not the spool"),
    ("[audit]\ndirectory = 'store'\n[archive]\ndirectory = 'store'\n", "audit.directory", "not the store"),
    ("[audit]\nsealing = 3\n", "audit.sealing", "unknown key"),
])
def test_bad_audit_configs(tmp_path, extra, key, message):
    with pytest.raises(config.ConfigError) as e:
        load_text(tmp_path, BASE + extra)
    text = str(e.value)
    assert text.startswith(str(tmp_path / "m.toml") + ": " + key + ":"), text
    assert message in text



# --- issue 13: [access] and [tenant.ldap] ---------------------------------------------

ACME = "[[tenant]]\nname = 'acme'\ndomains = ['acme.example']\n"
LDAP = ACME + "[tenant.ldap]\nbase = 'dc=acme,dc=example'\n"


def test_access_and_ldap_load(tmp_path):
    cfg, _ = load_text(tmp_path, BASE + """
[access]
directory = "/var/lib/mailtresor/access"
session_idle = 900
session_absolute = 28800
throttle_failures = 10
[[tenant]]
name = "acme"
domains = ["acme.example"]
[tenant.ldap]
url = "ldaps://dc1.acme.example"
ca_file = "/etc/mailtresor/acme-ldap-ca.pem"
base = "dc=acme,dc=example"
filter = "(&(objectClass=user)(sAMAccountName={username}))"
bind_dn = "cn=archive,ou=services,dc=acme,dc=example"
bind_password_file = "/etc/mailtresor/acme-ldap.password"
address_attributes = ["mail", "proxyAddresses"]
[tenant.ldap.roles]
"cn=Compliance,ou=groups,dc=acme,dc=example" = "auditor"
"cn=IT Admins,ou=groups,dc=acme,dc=example" = "admin"
[[tenant]]
name = "globex"
domains = ["globex.example"]
""")
    a = cfg.access
    assert (a.session_idle, a.session_absolute, a.throttle_failures, a.throttle_window) == (900, 28800, 10, 300)
    assert config.access_directory(cfg) == Path("/var/lib/mailtresor/access")
    ld = cfg.tenant[0].ldap
    assert ld.url == "ldaps://dc1.acme.example" and ld.address_attributes == ("mail", "proxyAddresses")
    assert ld.roles == {"cn=Compliance,ou=groups,dc=acme,dc=example": "auditor",
                        "cn=IT Admins,ou=groups,dc=acme,dc=example": "admin"}
    assert ld.filter.endswith("(sAMAccountName={username}))") and ld.default_roles == ("user",)
    assert cfg.tenant[1].ldap is None


def test_access_defaults(tmp_path):
    cfg, _ = load_text(tmp_path, BASE + LDAP + "url = 'ldap://dc1'\nstart_tls = true\n")
    assert config.access_directory(cfg) == cfg.appliance.state_directory / "access"
    assert (cfg.access.session_idle, cfg.access.session_absolute) == (1800, 43200)
    ld = cfg.tenant[0].ldap
    assert ld.filter == "(&(objectClass=inetOrgPerson)(uid={username}))" and ld.address_attributes == ("mail",)
    assert ld.bind_dn == "" and ld.roles == {}


@pytest.mark.parametrize("extra,key,message", [
    ("[access]\nsession_idle = 10\n", "access.session_idle", "at least 60"),
    ("[access]\nsession_idle = 3600\nsession_absolute = 600\n", "access.session_absolute", "at least access.session_idle"),
    ("[access]\nthrottle_failures = 0\n", "access.throttle_failures", "at least 1"),
    ("[access]\nsesion_idle = 60\n", "access.sesion_idle", "unknown key"),
    (ACME + "[tenant.ldap]\nurl = 'ldaps://x'\n", "tenant[0].ldap.base", "required key is missing"),
    (LDAP + "url = 'ldap://dc1'\n", "tenant[0].ldap.url", "needs start_tls = true"),
    (LDAP + "url = 'ldaps://dc1'\nstart_tls = true\n", "tenant[0].ldap.start_tls", "not with an ldaps://"),
    (LDAP + "url = 'https://dc1'\n", "tenant[0].ldap.url", "use ldaps://"),
    (LDAP + "url = 'ldaps://dc1'\nfilter = '(uid=alice)'\n", "tenant[0].ldap.filter", "{username}"),
    (LDAP + "url = 'ldaps://dc1'\nbind_dn = 'cn=svc'\n", "tenant[0].ldap.bind_dn", "go together"),
    (LDAP + "url = 'ldaps://dc1'\naddress_attributes = []\n", "tenant[0].ldap.address_attributes", "at least one"),
    (LDAP + "url = 'ldaps://dc1'\n[tenant.ldap.roles]\n'cn=x' = 'boss'\n", "tenant[0].ldap.roles",
     "'boss' is not a tenant role"),
    (LDAP + "url = 'ldaps://dc1'\n[tenant.ldap.roles]\n'cn=x' = 'appliance-admin'\n", "tenant[0].ldap.roles",
     "not a tenant role"),
    (LDAP + "url = 'ldaps://dc1'\n[tenant.ldap.roles]\n'cn=x' = 3\n", "tenant[0].ldap.roles.'cn=x'",
     "expected a string"),
    (LDAP + "url = 'ldaps://dc1'\nroles = 'auditor'\n", "tenant[0].ldap.roles", "expected a table"),
    (LDAP + "url = 'ldaps://dc1'\ndefault_roles = ['root']\n", "tenant[0].ldap.default_roles", "not a tenant role"),
    (LDAP + "url = 'ldaps://dc1'\nurll = 'x'\n", "tenant[0].ldap.urll", "unknown key"),
])
def test_bad_access_configs_name_the_key(tmp_path, extra, key, message):
    with pytest.raises(config.ConfigError) as e:
        load_text(tmp_path, BASE + extra)
    text = str(e.value)
    assert text.startswith(str(tmp_path / "m.toml") + ": " + key + ":"), text
    assert message in text


# --- [api] (issue 13: the HTTPS API) ---

def test_api_defaults(tmp_path):
    cfg, _ = load_text(tmp_path, BASE)
    a = cfg.api
    assert a.enabled and a.listen == "ssl:8443:interface=127.0.0.1" and a.max_body == 1 << 20
    assert a.cert_file is None and a.metrics_networks == ("127.0.0.0/8", "::1/128")
    assert config.api_listen(a.listen) == (8443, "127.0.0.1")
    assert config.api_listen("ssl:port=443") == (443, "")


@pytest.mark.parametrize("extra,key,message", [
    ('[api]\nlisten = "tcp:8080:interface=127.0.0.1"\n', "api.listen", "TLS only"),
    ('[api]\nlisten = "ssl:http:interface=127.0.0.1"\n', "api.listen", "'http' is not understood"),
    ('[api]\nlisten = "ssl:interface=127.0.0.1"\n', "api.listen", "no port"),
    ('[api]\nlisten = "ssl:8443:privateKey=x.key"\n', "api.listen", "is not understood"),
    ('[api]\ncert_file = "c.pem"\n', "api.cert_file", "go together"),
    ('[api]\nmax_body = 10\n', "api.max_body", "at least 1024"),
    ('[api]\nmax_connections = 4\nmax_connections_per_client = 5\n', "api.max_connections_per_client", "at most"),
    ('[api]\nmetrics_networks = ["everywhere"]\n', "api.metrics_networks[0]", "not a network"),
    ('[api]\nthreads = 0\n', "api.threads", "between 1 and 64"),
])
def test_api_errors_name_the_key(tmp_path, extra, key, message):
    with pytest.raises(config.ConfigError) as e:
        load_text(tmp_path, BASE + extra)
    assert f": {key}: " in str(e.value) and message in str(e.value), str(e.value)


def test_api_disabled_is_not_checked(tmp_path):
    cfg, _ = load_text(tmp_path, BASE + '[api]\nenabled = false\nlisten = "tcp:80"\n')
    assert not cfg.api.enabled
