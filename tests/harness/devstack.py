"""The full local stack: control endpoint + daemon, with generated PKI and keys.

`make run` runs this module in the foreground; the end-to-end tests use the
same functions with a configuration of their own under a temporary
directory, so what the tests start is what a developer starts.

    python -m tests.harness.devstack --config conf/dev.toml
"""

from __future__ import annotations

import argparse
import base64
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from mailtresor import config as configmod
from mailtresor.control.server import AuditLog, KeyStore, read_master_secret
from mailtresor.keys.pki import dev_pki

VENV_BIN = Path(sys.executable).parent


def prepare(cfg: configmod.Config) -> None:
    """PKI, a development master secret, a key store with the keys the
    configuration needs.  Idempotent."""
    cs = cfg.control_server
    if cs is None:
        raise SystemExit(f"{cfg.source}: the dev stack needs a [control_server] section")
    pki_dir = Path(cs.client_ca_file).parent
    dev_pki(pki_dir, appliance=cfg.appliance.name, hostname=cfg.appliance.hostname,
            connectors=tuple(n for c in cfg.relay.connector for n in c.client_cert_names))
    for d in (cs.keystore.parent, cs.audit_log.parent, cfg.spool.directory.parent,
              cfg.appliance.runtime_directory):
        d.mkdir(parents=True, exist_ok=True)
    kind, _, path = cs.master_key.partition(":")
    if kind == "file" and not Path(path).exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(base64.b64encode(os.urandom(32)).decode() + "\n")
    store = KeyStore(cs.keystore, read_master_secret(cs.master_key))
    audit = AuditLog(cs.audit_log)
    if not store.exists():
        store.init()
        audit.append("init", keystore=str(cs.keystore))
    wanted = [(a.name, k) for a in cs.appliance for k in ("spool", "seal", "access")]
    wanted += [(a.name, f"tenant.{t.name}") for a in cs.appliance for t in cfg.tenant]
    for appliance, name in wanted:
        if store.get(appliance, name) is None:
            audit.append("create", appliance=appliance, key=name, version=store.create(appliance, name))


# Who `make run` lets in at once: (tenant, name, roles, addresses).  Made
# with the product's own user database (mailtresor.access.users), given a
# new random password at every start, which main() prints: this is a
# developer's sandbox, and a newcomer should be able to log in and search
# without reading how users are made.  (The product itself never prints
# or logs a password.)
SAMPLE_USERS = (
    ("acme", "alice", ("user",), ("alice@acme.example",)),
    ("acme", "audrey", ("auditor",), ()),
    # A second auditor: a deletion request needs another auditor's approval.
    ("acme", "arthur", ("auditor",), ()),
    ("acme", "adam", ("admin",), ()),
    ("globex", "gina", ("user",), ("gina@globex.example",)),
    # The appliance's administrator (no tenant: leave the login's
    # organisation empty): every tenant's users and the status page.
    (None, "olga", ("appliance-admin",), ()),
)


def sample_users(cfg: configmod.Config) -> list[tuple[str, str, tuple, tuple, str]]:
    """SAMPLE_USERS of the configured tenants, each with a new password:
    (tenant, name, roles, addresses, password).  The control endpoint must
    run (the user database's key comes from it)."""
    from mailtresor.access.auth import open_databases
    from mailtresor.keys.client import control_fetcher
    users, _tokens = open_databases(cfg, control_fetcher(cfg))
    tenants = {t.name for t in cfg.tenant}
    made = []
    for tenant, name, roles, addresses in SAMPLE_USERS:
        if tenant is not None and tenant not in tenants:
            continue
        password = secrets.token_urlsafe(12)
        if users.get(tenant, name) is None:
            users.add(tenant, name, password, roles, addresses)
        else:
            users.passwd(tenant, name, password)
            users.update(tenant, name, roles=roles, addresses=addresses)
            users.enable(tenant, name)
        made.append((tenant, name, roles, addresses, password))
    return made


def api_url(cfg: configmod.Config) -> str | None:
    """https://HOST:PORT of the API's TLS listener, if the daemon runs one."""
    if not cfg.api.enabled:
        return None
    port, host = configmod.api_listen(cfg.api.listen)
    return f"https://{host or '127.0.0.1'}:{port}"


def _port_of(endpoint: str) -> tuple[str, int] | None:
    parts = endpoint.split(":")
    if parts[0] != "tcp":
        return None
    host = next((p.split("=", 1)[1] for p in parts[2:] if p.startswith("interface=")), "127.0.0.1")
    return host, int(parts[1])


def wait_port(host: str, port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {host}:{port}")
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


class NotifySocket:
    """The receiving end of sd_notify(3), as systemd would hold it."""

    def __init__(self, path: Path):
        self.path = Path(path).absolute()   # sd_notify ignores relative paths
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.messages: list[str] = []
        self._cond = threading.Condition()
        self._on_message = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            with self._cond:
                for line in data.decode(errors="replace").splitlines():
                    self.messages.append(line)
                    if self._on_message:
                        self._on_message(line)
                self._cond.notify_all()

    def wait_for(self, line: str, timeout: float = 30.0, start: int = 0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while line not in self.messages[start:]:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self):
        self.sock.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def start_control(cfg: configmod.Config, **popen) -> subprocess.Popen:
    proc = subprocess.Popen([str(VENV_BIN / "mailtresor-control"), "--config", str(cfg.source), "serve"],
                            **popen)
    host, port = _port_of(cfg.control_server.listen)
    wait_port(host, port, proc=proc)
    return proc


def start_daemon(cfg: configmod.Config, notify: NotifySocket | None = None, *, wait_ready: bool = True,
                 timeout: float = 30.0, env: dict | None = None, **popen) -> subprocess.Popen:
    env = dict(env or os.environ)
    if notify is not None:
        env["NOTIFY_SOCKET"] = str(notify.path)
    start = len(notify.messages) if notify else 0
    proc = subprocess.Popen([str(VENV_BIN / "mailtresord"), "--config", str(cfg.source)], env=env, **popen)
    if wait_ready and notify is not None:
        deadline = time.monotonic() + timeout
        while not notify.wait_for("READY=1", 0.2, start):
            if proc.poll() is not None:
                raise RuntimeError(f"mailtresord exited with {proc.returncode} before READY=1")
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError("mailtresord did not become ready")
    return proc


def stop(proc: subprocess.Popen | None, timeout: float = 30.0) -> int | None:
    if proc is None or proc.poll() is not None:
        return None if proc is None else proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="conf/dev.toml")
    args = p.parse_args(argv)
    cfg = configmod.load(args.config)
    prepare(cfg)
    notify = NotifySocket(cfg.appliance.runtime_directory / "notify.sock")
    notify._on_message = lambda line: line.startswith("STATUS=") and print(
        f"[mailtresord] {line[7:]}", flush=True)
    control = start_control(cfg)
    print(f"[devstack] mailtresor-control serving on {cfg.control.url} (mutual TLS)", flush=True)
    users = sample_users(cfg)
    daemon = None
    stopping = threading.Event()

    def on_signal(signum, frame):
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        daemon = start_daemon(cfg, notify, timeout=120)
        pki = Path(cfg.tls.client_ca_file).parent
        lines = ["", "mailtresor is running.  Listening:"]
        for lst in cfg.relay.listener:
            hp = _port_of(lst.endpoint)
            where = f"{hp[0]}:{hp[1]}" if hp else lst.endpoint
            lines.append(f"  relay   {where:<22} SMTP, {'STARTTLS required' if lst.tls == 'starttls' else 'implicit TLS'}")
        if cfg.milter and cfg.milter.enabled:
            lines.append(f"  milter  {cfg.milter.listen:<22} smtpd_milters = {configmod.milter_socket(cfg.milter.listen)}")
        lines.append(f"  control {cfg.control.url:<22} key custody (mutual TLS)")
        api = api_url(cfg)
        if api:
            lines.append(f"  api     {api + '/api/v1/':<22} HTTPS, JSON; CA {pki}/ca.pem (docs/ACCESS.md)")
            lines.append(f"  web     {api + '/':<22} the web UI: log in with a user below (docs/WEB.md)")
            sock = cfg.appliance.runtime_directory / "api.sock"
            lines.append(f"  api     {str(sock):<22} the same for root and this user, no login "
                         "(the mailtresor command asks here)")
        lines += ["", "Sample users (new passwords at every start):"]
        for tenant, name, roles, addresses, password in users:
            lines.append(f"  {tenant or '(none)':<7} {name:<7} {password:<17} {', '.join(roles)}"
                         + (f" of {', '.join(addresses)}" if addresses else ""))
        lines += ["", "Try:",
                  "  swaks --server 127.0.0.1:10025 -tls --tls-ca-path "
                  f"{pki}/ca.pem --to alice@acme.example --from me@globex.example",
                  f"  {VENV_BIN / 'mailtresor'} --config {cfg.source} search --tenant acme from:me@globex.example"]
        alice = next((u for u in users if u[1] == "alice"), None)
        if api and alice:
            jar = cfg.appliance.runtime_directory / "alice.cookies"
            lines += [f"  curl --cacert {pki}/ca.pem -c {jar} -H 'Content-Type: application/json' \\",
                      f"       -d '{{\"tenant\": \"acme\", \"username\": \"alice\", \"password\": \"{alice[4]}\"}}' "
                      f"{api}/api/v1/login",
                      f"  curl --cacert {pki}/ca.pem -b {jar} '{api}/api/v1/search?q=from:me@globex.example'"]
        lines += ["Stop with Ctrl-C.", ""]
        print("\n".join(lines), flush=True)
        while not stopping.is_set():
            if daemon.poll() is not None:
                print(f"[devstack] mailtresord exited with {daemon.returncode}", flush=True)
                return daemon.returncode or 1
            if control.poll() is not None:
                print(f"[devstack] mailtresor-control exited with {control.returncode}", flush=True)
                return control.returncode or 1
            stopping.wait(0.5)
        return 0
    finally:
        rc = stop(daemon)
        stop(control)
        notify.close()
        print(f"[devstack] stopped (mailtresord exit status {rc})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
