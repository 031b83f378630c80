"""The reference control endpoint: key custody, release rules, audit."""

import http.client
import json
import os
import resource
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mailtresor.keys import crypto
from mailtresor.control.server import (AuditLog, ConnectionGuard, ControlError, KeyStore, parse_key_path,
                                read_master_secret)
from mailtresor.keys.client import fetch_blocking
from mailtresor.keys.ring import KeyRefused
from mailtresor.keys.pki import CA
from tests.harness import devstack
from tests.harness.stack import Stack

VENV_BIN = Path(sys.executable).parent
SECRET = b"correct horse battery staple 1234"


def test_keystore_create_rotate_get(tmp_path):
    ks = KeyStore(tmp_path / "ks.json", SECRET)
    ks.init()
    assert ks.create("dev", "spool") == 1
    v1 = ks.get("dev", "spool")
    assert ks.rotate("dev", "spool") == 2
    v2 = ks.get("dev", "spool")
    assert v2[0] == 2 and v2[1] != v1[1]
    assert ks.get("dev", "spool", 1)[1] == v1[1]           # the old version stays readable
    assert ks.get("other", "spool") is None and ks.get("dev", "spool", 3) is None
    rows = ks.listing()
    assert rows == [{"appliance": "dev", "name": "spool", "current": 2, "versions": [1, 2],
                     "created": v2[2]}]
    with pytest.raises(ControlError, match="already has a key"):
        ks.create("dev", "spool")
    with pytest.raises(ControlError, match="has no key"):
        ks.rotate("dev", "nope")
    with pytest.raises(ControlError, match="invalid key name"):
        ks.create("dev", "../etc")
    # A second handle (another process) sees the changes.
    assert KeyStore(tmp_path / "ks.json", SECRET).get("dev", "spool")[1] == v2[1]


def test_keystore_is_encrypted_and_needs_the_secret(tmp_path):
    ks = KeyStore(tmp_path / "ks.json", SECRET)
    ks.init()
    ks.create("dev", "tenant.acme")
    key = ks.get("dev", "tenant.acme")[1]
    raw = (tmp_path / "ks.json").read_bytes()
    assert b"tenant.acme" not in raw and key not in raw
    import base64
    assert base64.b64encode(key) not in raw
    with pytest.raises(ControlError, match="wrong master secret"):
        KeyStore(tmp_path / "ks.json", b"not the right secret at all").load()


def test_master_secret_sources(tmp_path, monkeypatch):
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "master-key").write_bytes(SECRET + b"\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds"))
    assert read_master_secret("credential:master-key") == SECRET
    r, w = os.pipe()
    os.write(w, SECRET)
    os.close(w)
    assert read_master_secret(f"fd:{r}") == SECRET
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(ControlError, match="CREDENTIALS_DIRECTORY is not set"):
        read_master_secret("credential:master-key")
    (tmp_path / "short").write_bytes(b"short")
    with pytest.raises(ControlError, match="shorter than 16"):
        read_master_secret(f"file:{tmp_path / 'short'}")


def test_audit_log_chain_detects_tampering(tmp_path):
    log = AuditLog(tmp_path / "audit.log")
    for i in range(5):
        log.append("release", appliance="dev", key="spool", version=i + 1)
    assert log.verify() == []
    lines = (tmp_path / "audit.log").read_text().splitlines()
    altered = lines[:]
    altered[2] = altered[2].replace('"version": 3', '"version": 9')
    (tmp_path / "audit.log").write_text("\n".join(altered) + "\n")
    assert any("line 3: record altered" in p for p in log.verify())
    (tmp_path / "audit.log").write_text("\n".join(lines[:2] + lines[3:]) + "\n")
    assert any("line 3: chain broken" in p for p in log.verify())


@pytest.fixture
def control(tmp_path):
    s = Stack(tmp_path / "c", milter=False)
    s.start_control()
    yield s
    s.close()


def test_release_only_to_the_owner_and_audited(control, tmp_path):
    c = control.cfg.control
    m = fetch_blocking(c.url, c.ca_file, c.cert_file, c.key_file, "spool")
    assert m.version == 1 and len(m.key) == crypto.KEY_SIZE
    assert fetch_blocking(c.url, c.ca_file, c.cert_file, c.key_file, "tenant.acme").key != m.key
    assert "key=" not in repr(m) and m.key.hex() not in repr(m)
    # A certificate from the same CA that belongs to no appliance.
    with pytest.raises(KeyRefused, match="403"):
        fetch_blocking(c.url, c.ca_file, control.pki / "client-exchange-acme.pem",
                       control.pki / "client-exchange-acme.key", "spool")
    with pytest.raises(KeyRefused, match="404"):
        fetch_blocking(c.url, c.ca_file, c.cert_file, c.key_file, "tenant.initech")
    audit = [json.loads(line) for line in (control.dir / "control" / "audit.log").read_text().splitlines()]
    releases = [a for a in audit if a["event"] == "release"]
    denials = [a for a in audit if a["event"] == "deny"]
    assert [(a["appliance"], a["key"], a["version"]) for a in releases] == [("t1", "spool", 1),
                                                                            ("t1", "tenant.acme", 1)]
    assert {a["reason"] for a in denials} == {"unknown client certificate", "no such key"}
    assert AuditLog(control.dir / "control" / "audit.log").verify() == []
    assert m.key.hex() not in (control.dir / "control" / "audit.log").read_text()


def test_another_appliance_never_gets_these_keys(control):
    """Namespaces are per appliance: 'spool' asked by appliance B is B's own
    (none here), never A's."""
    ca = CA.load(control.pki / "ca.pem", control.pki / "ca.key")
    ca.issue_to(control.dir / "b.pem", control.dir / "b.key", "appliance-b", client=True)
    c = control.cfg.control
    with pytest.raises(KeyRefused, match="403"):
        fetch_blocking(c.url, c.ca_file, control.dir / "b.pem", control.dir / "b.key", "spool")


def test_tls_without_client_certificate_is_refused(control):
    ctx = ssl.create_default_context(cafile=str(control.pki / "ca.pem"))
    with pytest.raises((ssl.SSLError, ConnectionError, urllib.error.URLError)):
        urllib.request.urlopen(f"{control.cfg.control.url}/v1/health", context=ctx, timeout=10).read()
    ctx.load_cert_chain(str(control.cfg.control.cert_file), str(control.cfg.control.key_file))
    assert json.loads(urllib.request.urlopen(f"{control.cfg.control.url}/v1/health", context=ctx,
                                             timeout=10).read()) == {"status": "ok"}


def cli(stack, *args, input=None):
    return subprocess.run([str(VENV_BIN / "mailtresor-control"), "--config", str(stack.config_path), *args],
                          capture_output=True, text=True, timeout=60, input=input)


def test_cli_rotate_then_the_appliance_sees_both_versions(control):
    r = cli(control, "keys", "rotate", "t1", "spool")
    assert r.returncode == 0 and "current version is now 2" in r.stdout
    c = control.cfg.control
    new = fetch_blocking(c.url, c.ca_file, c.cert_file, c.key_file, "spool")
    old = fetch_blocking(c.url, c.ca_file, c.cert_file, c.key_file, "spool", 1)
    assert (new.version, old.version) == (2, 1) and new.key != old.key
    r = cli(control, "keys", "list", "--json")
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert rows["spool"]["versions"] == [1, 2] and rows["spool"]["current"] == 2
    listing = cli(control, "keys", "list").stdout
    assert "tenant.acme" in listing and new.key.hex() not in listing
    assert cli(control, "audit", "verify").returncode == 0


def test_cli_errors_are_clear(control, tmp_path):
    r = cli(control, "keys", "create", "t1", "spool")
    assert r.returncode == 1 and r.stderr.strip() == \
        "mailtresor-control: appliance 't1' already has a key 'spool' (use rotate)"
    assert cli(control, "keys", "create", "--if-missing", "t1", "spool").returncode == 0
    r = cli(control, "keys", "create", "t1", "Bad Name")
    assert r.returncode == 1 and "invalid key name" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "wrong-secret.toml"
    bad.write_text(control.config_path.read_text().replace(
        str(control.dir / "control" / "DEV-ONLY-master-secret"), str(tmp_path / "other-secret")))
    (tmp_path / "other-secret").write_text("another secret that is long enough\n")
    r = subprocess.run([str(VENV_BIN / "mailtresor-control"), "--config", str(bad), "keys", "list"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "wrong master secret" in r.stderr


def test_serve_refuses_a_damaged_audit_log(control):
    control.stop_control()
    path = control.dir / "control" / "audit.log"
    path.write_text(path.read_text().replace('"event": "create"', '"event": "created"', 1))
    r = cli(control, "serve")
    assert r.returncode == 1 and "audit log" in r.stderr and "damaged" in r.stderr


def test_serve_names_an_unreadable_or_broken_tls_file(control):
    """A wrong client_ca_file (missing, unreadable to the service's user,
    not a certificate) is one line naming the setting, not a traceback."""
    control.stop_control()
    text = control.config_path.read_text()
    at = text.rindex("client_ca_file = ")             # [control_server]'s, after [tls]'s
    line = text[at:text.index("\n", at)]
    garbage = control.dir / "not-a-cert.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    try:
        for bad, why in ((control.dir / "missing-ca.pem", "cannot read"), (garbage, "not a PEM certificate")):
            control.config_path.write_text(text[:at] + f'client_ca_file = "{bad}"' + text[at + len(line):])
            r = cli(control, "serve")
            assert r.returncode == 1, r.stderr
            assert "control_server.client_ca_file" in r.stderr and why in r.stderr and str(bad) in r.stderr
            assert "Traceback" not in r.stderr
    finally:
        control.config_path.write_text(text)


# --- issue 12: the control endpoint under attack ------------------------------------------------


def appliance_get(stack, path: str, method: str = "GET", cert: str = "appliance-t1") -> tuple[int, dict]:
    ctx = ssl.create_default_context(cafile=str(stack.pki / "ca.pem"))
    ctx.load_cert_chain(str(stack.pki / f"{cert}.pem"), str(stack.pki / f"{cert}.key"))
    conn = http.client.HTTPSConnection("127.0.0.1", stack.control_port, context=ctx, timeout=10)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        body = r.read()
        assert r.getheader("content-type") == "application/json", (r.status, body[:200])
        return r.status, json.loads(body)
    finally:
        conn.close()


def audit_records(stack) -> list[dict]:
    return [json.loads(line) for line in (stack.dir / "control" / "audit.log").read_text().splitlines()]


@pytest.mark.parametrize("parts,expected", [
    ([b"spool"], ("spool", None)),
    ([b"tenant.acme", b"3"], ("tenant.acme", 3)),
    ([b"spool", b""], ("spool", None)),
    ([b"spool", "²".encode()], "a key name and version are ASCII"),
    ([b"spool", "١".encode()], "a key name and version are ASCII"),
    ([b"spool", b"1_0"], "invalid key version (a positive number)"),
    ([b"spool", b"0"], "invalid key version (a positive number)"),
    ([b"spool", b"9" * 5000], "invalid key version (a positive number)"),
    ([b"spool\n"], "invalid key name (lower-case letters, digits, '.', '_', '-'; at most 63)"),
    ([b"\xff"], "a key name and version are ASCII"),
    ([b"../etc"], "invalid key name (lower-case letters, digits, '.', '_', '-'; at most 63)"),
    ([b"a", b"1", b"2"], "use /v1/keys/NAME or /v1/keys/NAME/VERSION"),
    ([], "use /v1/keys/NAME or /v1/keys/NAME/VERSION"),
])
def test_key_paths_are_parsed_or_refused_with_a_reason(parts, expected):
    assert parse_key_path(parts) == expected


def test_malformed_key_requests_get_400_json_and_are_audited(control):
    """`/v1/keys/spool/²` was a 500 with a traceback in the log; every refusal
    is now a JSON reason and an audit record saying who, what and why."""
    cases = [("/v1/keys/spool/%C2%B2", 400, "ASCII"),
             ("/v1/keys/spool/0", 400, "invalid key version"),
             ("/v1/keys/spool%0A", 400, "invalid key name"),
             ("/v1/keys/%FF", 400, "ASCII"),
             ("/v1/keys/a/1/2", 400, "use /v1/keys/NAME"),
             ("/v1/nothing-here", 404, "no such endpoint"),
             ("/v1/keys/tenant.initech", 404, "has no key")]
    for path, code, reason in cases:
        status, doc = appliance_get(control, path)
        assert status == code and reason in doc["error"], (path, status, doc)
    status, doc = appliance_get(control, "/v1/keys/spool", method="POST")
    assert status == 405 and doc == {"error": "method not allowed"}
    status, doc = appliance_get(control, "/v1/keys/spool", cert="client-exchange-acme")
    assert status == 403
    assert appliance_get(control, "/v1/keys/spool")[0] == 200          # and the endpoint still serves
    denials = [a for a in audit_records(control) if a["event"] == "deny"]
    assert [(d["status"], d["path"]) for d in denials] == [(code, path) for path, code, _ in cases] + [
        (405, "/v1/keys/spool"), (403, "/v1/keys/spool")]
    assert all(d["cert"] == ["appliance-t1"] and d["appliance"] == "t1" for d in denials[:-1])
    assert denials[-1]["cert"] == ["exchange-acme"] and denials[-1]["appliance"] is None
    assert all(d["peer"].startswith("127.0.0.1:") and d["reason"] for d in denials)
    assert AuditLog(control.dir / "control" / "audit.log").verify() == []
    text = control.control_log_path.read_text()
    assert "Traceback" not in text and "refused 127.0.0.1" in text


def test_a_silent_connection_is_dropped_after_the_handshake_timeout(control):
    """A TCP connection that never starts TLS held its socket for twelve
    hours (twisted.web's default timeout); now handshake_timeout (10 s)."""
    s = socket.create_connection(("127.0.0.1", control.control_port), timeout=30)
    started = time.monotonic()
    try:
        assert s.recv(1) == b""
    except ConnectionResetError:
        pass
    assert time.monotonic() - started < 25
    s.close()


def test_an_idle_authenticated_connection_is_closed(tmp_path):
    st = Stack(tmp_path / "i", {"control_server": {"idle_timeout": 2.0}}, milter=False)
    try:
        st.start_control()
        ctx = ssl.create_default_context(cafile=str(st.pki / "ca.pem"))
        ctx.load_cert_chain(str(st.cfg.control.cert_file), str(st.cfg.control.key_file))
        s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", st.control_port), timeout=30),
                            server_hostname="127.0.0.1")
        started = time.monotonic()
        try:
            assert s.recv(1) == b""
        except (ConnectionResetError, ssl.SSLError):
            pass
        assert time.monotonic() - started < 15
        s.close()
    finally:
        st.close()


def test_a_thousand_idle_sockets_cannot_lock_the_appliance_out(tmp_path):
    """The control endpoint runs with 512 file descriptors (a tight
    LimitNOFILE); an attacker opens 1000 idle TCP connections from a
    hundred addresses and says nothing.  The appliance still gets its key
    at once, and the endpoint never holds more than its cap."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 1200
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"ulimit -n is {soft} (hard {hard}); this test needs {need}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    st = Stack(tmp_path / "f", milter=False)
    attackers = []
    try:
        log = open(st.control_log_path, "ab")
        st._logs.append(log)
        st.control = devstack.start_control(
            st.cfg, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (512, 512)))
        deadline = time.monotonic() + 60
        for i in range(1000):
            if time.monotonic() > deadline:
                break
            try:
                attackers.append(socket.create_connection(
                    ("127.0.0.1", st.control_port), timeout=2, source_address=(f"127.0.1.{1 + i % 100}", 0)))
            except OSError:
                pass                                         # refused or no room: still an attack
        fds = len(os.listdir(f"/proc/{st.control.pid}/fd"))
        c = st.cfg.control
        started = time.monotonic()
        m = fetch_blocking(c.url, c.ca_file, c.cert_file, c.key_file, "spool")
        assert m.version == 1 and time.monotonic() - started < 20
        assert fds <= 256 + 64, f"{fds} descriptors open in the control endpoint"
        assert st.control.poll() is None
    finally:
        for s in attackers:
            s.close()
        st.close()


class _FakeConn:
    def __init__(self):
        self.aborted = False

    def abortConnection(self):
        self.aborted = True


def test_guard_evicts_the_oldest_unauthenticated_connection():
    from twisted.internet.task import Clock
    clock = Clock()
    g = ConnectionGuard(clock, max_connections=3, max_per_client=2, handshake_timeout=10.0)
    a, b, c, d = (_FakeConn() for _ in range(4))
    assert g.admit("10.0.0.1") is None
    g.track(a, "10.0.0.1")
    assert g.admit("10.0.0.1") is None
    g.track(b, "10.0.0.1")
    assert "limit 2 per client" in g.admit("10.0.0.1")
    g.authenticated(a)                                   # an appliance: never evicted
    assert g.admit("10.0.0.2") is None
    g.track(c, "10.0.0.2")
    assert g.admit("10.0.0.3") is None and b.aborted and not a.aborted   # b made room
    g.track(d, "10.0.0.3")
    clock.advance(10.1)
    assert c.aborted and d.aborted and not a.aborted     # handshake timeout
    assert len(g) == 1 and g.per_client == {"10.0.0.1": 1}
    g.forget(a)
    assert len(g) == 0 and g.per_client == {}
