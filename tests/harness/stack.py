"""A private mailtresor stack for one test: its own directory, ports, PKI,
control endpoint and daemon, as real processes.

    stack = Stack(tmp_path)                 # config written, PKI and keys made
    stack.start()                           # control endpoint + daemon, READY=1
    with stack.smtp() as s: s.sendmail(...) # smtplib over STARTTLS
    stack.entries()                         # what the spool holds, decrypted
"""

from __future__ import annotations

import copy
import os
import signal
import smtplib
import socket
import ssl
import subprocess
from pathlib import Path

from mailtresor import config as configmod
from mailtresor import assemble
from mailtresor.ingest.spool import Spool
from mailtresor.keys.derive import SPOOL_KEY
from mailtresor.keys.ring import KeyRing

from . import devstack, tomlw


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


class Stack:
    def __init__(self, directory: Path, overrides: dict | None = None, *, milter: bool = True):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.smtp_port, self.smtps_port, self.control_port = free_port(), free_port(), free_port()
        self.api_port = free_port()
        d, pki = self.dir, self.dir / "pki"
        self.pki = pki
        self.spool_dir = d / "spool"
        self.milter_socket = d / "run" / "milter.sock"
        doc = {
            "appliance": {"name": "t1", "hostname": "archive.test", "runtime_directory": str(d / "run"),
                          "state_directory": str(d / "state")},
            "control": {"url": f"https://127.0.0.1:{self.control_port}", "ca_file": str(pki / "ca.pem"),
                        "cert_file": str(pki / "appliance-t1.pem"), "key_file": str(pki / "appliance-t1.key"),
                        "retry_initial": 0.2, "retry_max": 1.0, "timeout": 5.0},
            "spool": {"directory": str(self.spool_dir), "min_free_bytes": 1 << 20},
            "tls": {"cert_file": str(pki / "relay.pem"), "key_file": str(pki / "relay.key"),
                    "client_ca_file": str(pki / "ca.pem")},
            "relay": {
                "timeout": 30.0,
                "listener": [{"name": "smtp", "endpoint": f"tcp:{self.smtp_port}:interface=127.0.0.1",
                              "tls": "starttls"},
                             {"name": "smtps", "endpoint": f"tcp:{self.smtps_port}:interface=127.0.0.1",
                              "tls": "implicit"}],
                "connector": [{"name": "exchange-acme", "networks": ["127.0.0.0/8"], "client_cert": "required",
                               "client_cert_names": ["exchange-acme"], "tenant": "acme", "journal": True},
                              {"name": "local", "networks": ["127.0.0.1/32"]}],
            },
            "service": {"shutdown_timeout": 10.0, "log_level": "info"},
            "api": {"listen": f"ssl:{self.api_port}:interface=127.0.0.1"},
            # Off unless a test turns it on: the ingest tests look at the spool.
            "archive": {"directory": str(d / "store"), "backup_directory": str(d / "backup"),
                        "enabled": False, "interval": 0.2},
            "tenant": [{"name": "acme", "domains": ["acme.example"]},
                       {"name": "globex", "domains": ["globex.example"]}],
            "control_server": {"listen": f"tcp:{self.control_port}:interface=127.0.0.1",
                               "cert_file": str(pki / "control.pem"), "key_file": str(pki / "control.key"),
                               "client_ca_file": str(pki / "ca.pem"),
                               "keystore": str(d / "control" / "keystore.json"),
                               "audit_log": str(d / "control" / "audit.log"),
                               "master_key": f"file:{d / 'control' / 'DEV-ONLY-master-secret'}",
                               "appliance": [{"name": "t1", "cert_names": ["appliance-t1"]}]},
        }
        if milter:
            doc["milter"] = {"listen": f"unix:{self.milter_socket}", "timeout": 30}
        self.doc = merge(doc, overrides or {})
        self.config_path = d / "mailtresor.toml"
        self.config_path.write_text(tomlw.dumps(self.doc) + "\n")
        self.cfg = configmod.load(self.config_path)
        self.spool_dir = self.cfg.spool.directory
        devstack.prepare(self.cfg)
        self.control = None
        self.daemon = None
        self.notify = devstack.NotifySocket(d / "notify.sock")
        self.log_path = d / "mailtresord.log"
        self.control_log_path = d / "control.log"
        self._logs = []
        self._ring = None

    def reconfigure(self, overrides: dict) -> None:
        """Change the configuration file (takes effect at the next daemon start)."""
        self.doc = merge(self.doc, overrides)
        self.config_path.write_text(tomlw.dumps(self.doc) + "\n")
        self.cfg = configmod.load(self.config_path)

    # --- processes ---

    def start_control(self):
        f = open(self.control_log_path, "ab")
        self._logs.append(f)
        self.control = devstack.start_control(self.cfg, stdout=f, stderr=subprocess.STDOUT)

    def stop_control(self):
        devstack.stop(self.control)
        self.control = None

    def start_daemon(self, wait_ready: bool = True, env: dict | None = None):
        f = open(self.log_path, "ab")
        self._logs.append(f)
        # A session of its own: kill_daemon() can kill it with its relay
        # workers, as systemd kills the unit's cgroup.
        self.daemon = devstack.start_daemon(self.cfg, self.notify, wait_ready=wait_ready, env=env,
                                            stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        if not wait_ready:
            devstack.wait_port("127.0.0.1", self.smtp_port, proc=self.daemon)
        return self.daemon

    def start_activated(self, sockets: list[tuple[str, str]], *, wrapper: list[str] = ()) -> subprocess.Popen:
        """mailtresord under systemd's own systemd-socket-activate: the real
        LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES protocol.  `sockets` are
        (address, FileDescriptorName) pairs; the tool binds them all, then
        (as a .socket unit with Accept=no) starts the daemon on the first
        connection to any of them, in its own process (`wrapper`, e.g. a
        shell that changes the environment, is exec'd first).  Returns once
        the sockets are bound; the daemon is not waited for."""
        import time
        f = open(self.log_path, "ab")
        self._logs.append(f)
        start = self.log_path.stat().st_size
        cmd = ["/usr/bin/systemd-socket-activate"]
        for address, _ in sockets:
            cmd += ["-l", address]
        cmd += ["--fdname=" + ":".join(name for _, name in sockets), "-E", f"NOTIFY_SOCKET={self.notify.path}",
                *wrapper, str(devstack.VENV_BIN / "mailtresord"), "--config", str(self.config_path)]
        self.daemon = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        deadline = time.monotonic() + 10
        while self.log_path.read_bytes()[start:].count(b"Listening on ") < len(sockets):
            if self.daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"systemd-socket-activate did not bind: {self.log()[start:]}")
            time.sleep(0.02)
        return self.daemon

    def stop_daemon(self, timeout: float = 30.0) -> int | None:
        rc = devstack.stop(self.daemon, timeout)
        self.daemon = None
        return rc

    def kill_daemon(self):
        """SIGKILL the daemon and its relay workers at once (a crash)."""
        if self.daemon is not None and self.daemon.poll() is None:
            os.killpg(self.daemon.pid, signal.SIGKILL)
            self.daemon.wait()
        self.daemon = None

    def daemon_processes(self) -> list[int]:
        """PIDs of the daemon and its workers (its session)."""
        if self.daemon is None:
            return []
        sid = self.daemon.pid
        pids = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    if os.getsid(int(d)) == sid:
                        pids.append(int(d))
                except OSError:
                    pass
        return sorted(pids)

    def start(self):
        self.start_control()
        self.start_daemon()
        return self

    def close(self):
        devstack.stop(self.daemon, 15)
        devstack.stop(self.control, 15)
        self.notify.close()
        for f in self._logs:
            f.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # --- clients ---

    def client_context(self, cert: str | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.pem"))
        if cert is not None:
            ctx.load_cert_chain(str(self.pki / f"{cert}.pem"), str(self.pki / f"{cert}.key"))
        return ctx

    def smtp(self, *, implicit: bool = False, cert: str | None = None, source: str | None = None,
             starttls: bool = True, timeout: float = 30.0) -> smtplib.SMTP:
        src = (source, 0) if source else None
        if implicit:
            s = smtplib.SMTP_SSL("127.0.0.1", self.smtps_port, context=self.client_context(cert),
                                 timeout=timeout, source_address=src)
            s.ehlo("client.test")
            return s
        s = smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=timeout, source_address=src)
        s.ehlo("client.test")
        if starttls:
            s.starttls(context=self.client_context(cert))
            s.ehlo("client.test")
        return s

    # --- what the spool holds ---

    def keyring(self) -> KeyRing:
        """The spool keys, fetched the way the archiver will: over mTLS."""
        ring = assemble.build_ring()
        client = assemble.build_control_client(self.cfg)
        cur = client.fetch_blocking(SPOOL_KEY)
        ring.put(cur, current=True)
        for v in range(1, cur.version):
            ring.put(client.fetch_blocking(SPOOL_KEY, v))
        return ring

    def open_spool(self) -> Spool:
        return assemble.build_spool(self.cfg, self.keyring(), tool=True)

    def entries(self) -> dict:
        spool = self.open_spool()
        try:
            return {i: spool.read(i) for i in spool.ready()}
        finally:
            spool.close()

    def spool_ids(self) -> list[str]:
        return sorted(p.name for p in (self.spool_dir / "new").iterdir())
