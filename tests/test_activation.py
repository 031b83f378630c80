"""Socket activation with the real LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES
protocol: the daemon is started by systemd's own systemd-socket-activate,
which binds the relay, API and milter sockets and starts the daemon on the
first connection, as a .socket unit with Accept=no does.

The pure parts (endpoint names, what a wrong socket is told) are tested
here too, on sockets the test makes itself.
"""

import os
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import time

import pytest

from mailtresor import activation, config
from tests.harness.postfix import PostfixInstance, free_port, make_workdir
from tests.harness.stack import Stack

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/bin/systemd-socket-activate"),
                                reason="systemd-socket-activate is not installed")

MESSAGE = b"From: alice@globex.example\r\nTo: bob@acme.example\r\nSubject: activated\r\n\r\nthrough a socket systemd bound\r\n"


def activated_stack(workdir, *, milter=True):
    """A stack whose relay (STARTTLS), API and milter sockets are systemd's;
    implicit TLS stays an ordinary endpoint (both kinds side by side)."""
    ov = {"relay": {"processes": 2,
                    "listener": [{"name": "smtp", "endpoint": "systemd:name=smtp", "tls": "starttls"}]},
          "api": {"listen": "systemd:name=api"},
          "archive": {"enabled": True, "parse_processes": 1}}
    if milter:
        ov["milter"] = {"listen": "systemd:name=milter", "timeout": 30}
    st = Stack(workdir, ov, milter=False)
    st.milter_socket = st.dir / "milter-activated.sock"
    sockets = [(f"127.0.0.1:{st.smtp_port}", "smtp"), (f"127.0.0.1:{st.api_port}", "api")]
    if milter:
        sockets.append((str(st.milter_socket), "milter"))
    return st, sockets


def early_connections(st):
    """Connections made before the daemon exists (systemd-socket-activate
    starts it on the first of them): the relay's and the API's."""
    relay = socket.create_connection(("127.0.0.1", st.smtp_port), timeout=60)
    api = socket.create_connection(("127.0.0.1", st.api_port), timeout=60)
    return relay, api


def metric(body: str, name: str) -> float:
    m = re.search(rf"^{name}(?:_total)? ([0-9.e+]+)$", body, re.M)
    return float(m.group(1)) if m else -1


def https_get(st, path: str, sock=None) -> tuple[int, str]:
    ctx = st.client_context()
    raw = sock or socket.create_connection(("127.0.0.1", st.api_port), timeout=30)
    with ctx.wrap_socket(raw, server_hostname="archive.test") as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: archive.test\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode(errors="replace")


@pytest.fixture
def workdir():
    # Postfix (user postfix) must reach the milter socket: not pytest's 0700 tmp_path.
    d = make_workdir("mt-activation-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_relay_api_and_milter_on_activated_sockets(workdir):
    st, sockets = activated_stack(workdir / "stack")
    pf = None
    try:
        st.start_control()
        st.start_activated(sockets)
        # The socket lets Postfix (another user) in, as SocketMode= would.
        os.chmod(st.milter_socket, 0o666)
        assert st.daemon.poll() is None and "mailtresord" not in st.log()
        relay, api = early_connections(st)
        # Both were made while no daemon was there: each is answered.
        banner = relay.makefile("rb").readline()
        assert banner[:3] in (b"220", b"421"), banner
        relay.close()
        code, _ = https_get(st, "/healthz", sock=api)
        assert code in (200, 503)
        deadline = time.monotonic() + 30
        while not st.notify.wait_for("READY=1", 0.2):
            assert st.daemon.poll() is None and time.monotonic() < deadline, st.log()[-3000:]
        assert "systemd-socket-activate" not in open(f"/proc/{st.daemon.pid}/cmdline").read()

        # SMTP over STARTTLS on the activated socket.
        with st.smtp() as s:
            s.sendmail("alice@globex.example", ["bob@acme.example"], MESSAGE)
        # A milter client (a real Postfix) through the activated milter socket.
        pf = PostfixInstance(workdir / "postfix", free_port(), smtpd_milters=f"unix:{st.milter_socket}",
                             milter_default_action="tempfail", tls_cert=st.pki / "relay.pem",
                             tls_key=st.pki / "relay.key")
        pf.start()
        with smtplib.SMTP("127.0.0.1", pf.smtpd_port, timeout=60) as s:
            s.ehlo("client.test")
            s.mail("carol@globex.example")
            s.rcpt("dave@acme.example")
            code, text = s.data(MESSAGE.replace(b"activated", b"via the milter"))
        assert code == 250, (text, pf.maillog_tail())
        qid = text.decode().rsplit(" ", 1)[1]
        # The API answers over TLS (the daemon's own TLS on systemd's
        # socket), and both messages are archived.
        deadline = time.monotonic() + 60
        while True:
            code, body = https_get(st, "/metrics")
            assert code == 200, body
            if metric(body, "mailtresor_messages_archived") >= 2:
                break
            assert time.monotonic() < deadline, (body[-2000:], st.log()[-3000:])
            time.sleep(0.3)
        assert re.search(rf"{qid}: \S+: from=<carol@globex.example>", st.log())
        assert os.stat(st.cfg.appliance.runtime_directory / "milter.private.sock").st_mode & 0o777 == 0o600

        # No child (relay worker, parse worker) inherited the variables.
        children = [p for p in st.daemon_processes() if p != st.daemon.pid]
        assert len(children) >= 2, children            # one relay worker, one parse worker
        for pid in children:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            assert not [v for v in env if v.startswith(b"LISTEN_")], (pid, env)
        assert any(b"--worker" in open(f"/proc/{p}/cmdline", "rb").read() for p in children)
        # The relay worker accepts on systemd's socket as on one the daemon bound.
        assert "relay worker 1 accepting on systemd:name=smtp (starttls TLS)" in st.log()
        assert st.stop_daemon() == 0
    finally:
        if pf is not None:
            pf.stop()
        st.close()


def run_failing(st, sockets, wrapper=()) -> tuple[int, str]:
    st.start_activated(sockets, wrapper=list(wrapper))
    trigger = socket.create_connection(("127.0.0.1", st.smtp_port), timeout=30)
    try:
        rc = st.daemon.wait(30)
    finally:
        trigger.close()
    return rc, st.log()


def test_a_missing_name_is_a_clear_startup_error(tmp_path):
    st, sockets = activated_stack(tmp_path, milter=False)
    try:
        rc, log = run_failing(st, [s for s in sockets if s[1] != "api"])
        assert rc == 6, log
        assert "cannot start: api.listen = 'systemd:name=api': no socket named 'api' was passed by systemd" in log
        assert "Traceback" not in log
    finally:
        st.close()


def test_a_wrong_listen_pid_is_ignored(tmp_path):
    st, sockets = activated_stack(tmp_path, milter=False)
    try:
        # The shell keeps the process (exec): only LISTEN_PID is wrong.
        rc, log = run_failing(st, sockets, ["/bin/sh", "-c", 'LISTEN_PID=1 exec "$@"', "sh"])
        assert rc == 6, log
        assert re.search(r"no socket named 'smtp' was passed by systemd \(the sockets systemd passed were "
                         r"meant for process 1 \(LISTEN_PID\), not this one", log), log
        assert "Traceback" not in log
    finally:
        st.close()


# --- the pure parts ------------------------------------------------------------

@pytest.mark.parametrize("endpoint, error", [
    ("systemd:domain=INET:index=0", "index= is not supported"),
    ("systemd:name=", "is not a socket name"),
    ("systemd:name=a:b", "is not a socket name"),
    ("systemd:relay", "write systemd:name=NAME"),
])
def test_endpoint_names(endpoint, error):
    with pytest.raises(ValueError, match=re.escape(error)):
        activation.endpoint_name(endpoint)
    assert activation.endpoint_name("systemd:name=relay-1") == "relay-1"


def test_check_config_accepts_activated_endpoints(tmp_path):
    st, _ = activated_stack(tmp_path)
    cfg = config.load(st.config_path)
    assert cfg.api.listen == "systemd:name=api" and cfg.milter.listen == "systemd:name=milter"
    out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "mailtresord"), "--config",
                          str(st.config_path), "--check-config"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "configuration OK" in out.stdout, out


def test_check_config_refuses_an_index(tmp_path):
    st, _ = activated_stack(tmp_path)
    with pytest.raises(config.ConfigError, match=r"api\.listen: .*index= is not supported"):
        st.reconfigure({"api": {"listen": "systemd:domain=INET:index=1"}})


def test_wrong_kinds_of_socket_are_named(tmp_path):
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(tmp_path / "s"))
    unix.listen()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    idle = socket.socket()
    idle.bind(("127.0.0.1", 0))
    pipe_r, pipe_w = os.pipe()
    a = activation.Activated({"unix": [unix.fileno()], "udp": [udp.fileno()], "idle": [idle.fileno()],
                              "pipe": [pipe_r], "two": [unix.fileno(), idle.fileno()]})
    try:
        for name, error in (("unix", "is a unix socket; this setting needs IPv4 or IPv6"),
                            ("udp", "is not a stream socket"), ("idle", "is not listening (Accept=no"),
                            ("pipe", "is not a socket"), ("two", "passed 2 sockets named 'two'")):
            with pytest.raises(activation.ActivationError, match=re.escape(error)):
                a.take(f"systemd:name={name}", activation.INET, "relay.listener[0].endpoint")
        assert a.take("systemd:name=unix", activation.INET + (socket.AF_UNIX,), "milter.listen")[1] == socket.AF_UNIX
        with pytest.raises(activation.ActivationError, match="already used by another setting"):
            a.take("systemd:name=unix", activation.INET + (socket.AF_UNIX,), "api.listen")
    finally:
        for s in (unix, udp, idle):
            s.close()
        os.close(pipe_r)
        os.close(pipe_w)


def test_the_variables_are_unset_even_when_ignored():
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x", "OTHER": "y"}
    a = activation.from_environment(env)
    assert env == {"OTHER": "y"} and a.names == {} and "meant for process 1" in a.note


def test_ipv4_clients_on_a_dual_stack_socket_match_ipv4_networks():
    from mailtresor.ingest.relay import _ip
    assert str(_ip("::ffff:192.0.2.7")) == "192.0.2.7" and str(_ip("2001:db8::1")) == "2001:db8::1"


def test_a_child_started_plainly_sees_no_variables(tmp_path):
    """from_environment() under the real protocol: the socket is found by
    name, and a child started with the default environment (C environ and
    os.environ alike) sees none of the variables.  The daemon's own children
    get a filtered (relay worker) or minimal (parse worker) environment
    anyway; this is what keeps anything else it starts clean."""
    port = free_port()
    script = ("import os, subprocess, sys; from mailtresor import activation; "
              "a = activation.from_environment(); "
              "fd, fam = a.take('systemd:name=probe', activation.INET, 'probe'); "
              "print('fd', fd, flush=True); "
              "subprocess.run(['/usr/bin/env'], check=True); "
              "print('py', sorted(k for k in os.environ if k.startswith('LISTEN_')), flush=True)")
    proc = subprocess.Popen(["/usr/bin/systemd-socket-activate", "-l", f"127.0.0.1:{port}", "--fdname=probe",
                             sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    text = out.decode()
    assert "fd 3" in text and "py []" in text, text
    assert "LISTEN_" not in text, text


def test_the_unit_can_drop_its_capability(tmp_path):
    """With every port below 1024 from a .socket unit the daemon needs no
    capability: the drop-in docs/SYSTEMD.md gives (taken from the doc
    itself) empties both lists, and the unit still verifies."""
    from pathlib import Path
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    repo = Path(__file__).resolve().parent.parent
    doc = (repo / "docs" / "SYSTEMD.md").read_text()
    dropin = re.search(r"drop-in \(`systemctl edit mailtresor`\):\n\s*```ini\n(.*?)```", doc, re.S).group(1)
    dropin = "\n".join(line.strip() for line in dropin.splitlines()) + "\n"
    (tmp_path / "bin").mkdir()
    for name in ("mailtresord", "mailtresor"):
        stub = tmp_path / "bin" / name
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    # mailtresor.service Requires= the unlock unit: verify needs it beside it.
    for name in ("mailtresor.service", "mailtresor-unlock.service"):
        unit = (repo / "packaging" / name).read_text()
        for key in ("ExecStart", "ExecStop"):
            unit = unit.replace(f"{key}=/usr/bin/", f"{key}={tmp_path}/bin/")
        (tmp_path / name).write_text(unit)

    def capabilities():
        import json
        r = subprocess.run([analyze, "security", "--offline=yes", "--json=short", "mailtresor.service"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return {e["json_field"]: e["set"] for e in json.loads(r.stdout)
                if e["json_field"] in ("AmbientCapabilities", "CapabilityBoundingSet_CAP_NET_BIND_SERVICE_BROADCAST_RAW)")}

    assert capabilities() == {"AmbientCapabilities": False,
                              "CapabilityBoundingSet_CAP_NET_BIND_SERVICE_BROADCAST_RAW)": False}
    (tmp_path / "mailtresor.service.d").mkdir()
    (tmp_path / "mailtresor.service.d" / "activated.conf").write_text(dropin)
    assert capabilities() == {"AmbientCapabilities": True,
                              "CapabilityBoundingSet_CAP_NET_BIND_SERVICE_BROADCAST_RAW)": True}
    r = subprocess.run([analyze, "verify", "--man=no", "mailtresor.service"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr


def test_malformed_variables_are_an_error_not_a_crash(monkeypatch):
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "x")
    with pytest.raises(activation.ActivationError, match="LISTEN_FDS='x'"):
        activation.from_environment()
    assert "LISTEN_FDS" not in os.environ and "LISTEN_PID" not in os.environ
