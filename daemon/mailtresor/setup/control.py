"""The control endpoint, as setup meets it.

- `make_trial_keys`: the --trial control endpoint's key store, made with
  mailtresor-control's own KeyStore and AuditLog (the code behind
  `mailtresor-control init` and `keys create`), under a fresh master secret;
- `check_enrolment`: `mailtresor setup --check`, every key the appliance
  needs fetched over mutual TLS as the daemon will, each failure named;
- `init_volumes`: the volume step, `mailtresor volume init NAME` (the
  volumes part's command), with the trial control endpoint running for it.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from mailtresor.keys.client import ControlClient
from mailtresor.keys.ring import ControlUnreachable, IdentityUnusable, KeyRefused


def new_master_secret(path: Path, write) -> None:
    """A random master secret for the trial key store (`write` makes the file 0600)."""
    write(path, base64.b64encode(os.urandom(32)) + b"\n", private=True)


def make_trial_keys(keystore: Path, audit_log: Path, master_key: Path, appliance: str,
                    names: list[str]) -> list[str]:
    """Create the key store (if new) and every missing key; the names created."""
    from mailtresor.control.server import AuditLog, KeyStore, read_master_secret
    store = KeyStore(keystore, read_master_secret(f"file:{master_key}"))
    audit = AuditLog(audit_log)
    if not store.exists():
        store.init()
        audit.append("init", keystore=str(keystore))
    made = []
    for name in names:
        if store.get(appliance, name) is None:
            audit.append("create", appliance=appliance, key=name, version=store.create(appliance, name))
            made.append(name)
    return made


# --- the check of an enrolment ----------------------------------------------------------

@dataclass
class CheckResult:
    ok: bool
    lines: list[str]


def _diagnose_connection(cfg) -> str | None:
    """Why a TLS session with the control endpoint cannot be had, or None."""
    parts = urllib.parse.urlsplit(cfg.control.url)
    host, port = parts.hostname, parts.port or 443
    try:
        sock = socket.create_connection((host, port), timeout=cfg.control.timeout)
    except OSError as e:
        return (f"unreachable: cannot connect to {host}:{port} ({e.strerror or e}); is mailtresor-control "
                "running there, and does a firewall let this host in?")
    try:
        ctx = ControlClient.from_config(cfg).context()
        with ctx.wrap_socket(sock, server_hostname=host) as tls:
            # TLS 1.3: a refused client certificate shows at the first read.
            tls.settimeout(cfg.control.timeout)
            tls.sendall(b"GET /v1/health HTTP/1.0\r\nHost: " + host.encode() + b"\r\n\r\n")
            tls.recv(1)
    except ssl.SSLCertVerificationError as e:
        return (f"TLS refused by this appliance: the control endpoint's certificate does not verify against "
                f"{cfg.control.ca_file} or does not name {host} ({e.verify_message})")
    except ssl.SSLError as e:
        return (f"TLS refused by the control endpoint: it does not accept this appliance's certificate "
                f"{cfg.control.cert_file} (its client_ca_file must hold the CA that signed it) ({e.reason or e})")
    except (OSError, ValueError) as e:
        return f"unreachable: the TLS session with {host}:{port} failed ({e})"
    finally:
        sock.close()
    return None


def check_enrolment(cfg, names: list[str], appliance_cn: str) -> CheckResult:
    """Fetch every key in `names` over mutual TLS (nothing printed but names)."""
    client = ControlClient.from_config(cfg)
    try:
        client.context()
    except IdentityUnusable as e:
        return CheckResult(False, [f"this appliance's identity is unusable: {e}"])
    lines, ok = [], True
    for name in names:
        try:
            km = client.fetch_blocking(name)
        except ControlUnreachable:
            why = _diagnose_connection(cfg) or f"unreachable: {cfg.control.url} did not answer"
            return CheckResult(False, lines + [why])
        except KeyRefused as e:
            if e.status == 403:
                return CheckResult(False, lines + [
                    f"certificate unknown: the control endpoint knows no appliance with the certificate name "
                    f"{appliance_cn!r}; its admin must add the [[control_server.appliance]] entry "
                    f"(name = {cfg.appliance.name!r}, cert_names = [{appliance_cn!r}]) and restart it"])
            if e.status == 404:
                ok = False
                lines.append(f"key missing: {name}: the control host's admin must run "
                             f"mailtresor-control keys create {cfg.appliance.name} {name}")
                continue
            return CheckResult(False, lines + [f"refused: {e}"])
        lines.append(f"key {name}: released (version {km.version})")
    return CheckResult(ok, lines)


# --- the volume step ----------------------------------------------------------------------

def volumes_supported() -> str | None:
    """None if this installation has `mailtresor volume` and [[volume]]; else why not."""
    from mailtresor import config as configmod
    if (importlib.util.find_spec("mailtresor.cli.volume") is None
            or "volume" not in configmod.Config.__dataclass_fields__):
        return ("this installation has no encrypted volumes (no `mailtresor volume` command, no [[volume]] "
                "configuration)")
    return None


def start_trial_control(control_config: Path, master_dir: Path, port: int, timeout: float = 20.0):
    """mailtresor-control serve, as its unit would (the master secret as a
    credential), until stop_trial_control; for setup's own steps only."""
    env = dict(os.environ, CREDENTIALS_DIRECTORY=str(master_dir))
    proc = subprocess.Popen([sys.executable, "-m", "mailtresor.control", "--config", str(control_config), "serve"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace").strip().splitlines()
            raise RuntimeError(f"the trial control endpoint did not start: {err[-1] if err else proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"the trial control endpoint did not listen on 127.0.0.1:{port} within {timeout:g} s")


def stop_trial_control(proc) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def init_volumes(config: Path, names: list[str]) -> list[str]:
    """`mailtresor --config CONFIG volume init NAME` for each volume (the
    volumes part's command, INTERFACES16.md); the problems, one line each."""
    problems = []
    for name in names:
        r = subprocess.run([sys.executable, "-m", "mailtresor", "--config", str(config), "volume", "init", name],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
            problems.append(f"volume {name}: {last}")
    return problems
