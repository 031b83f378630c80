"""`mailtresor setup`, run as the admin runs it (the console script in a
subprocess), into a scratch root (--root): the trial brought up with the
real control endpoint and daemon on the written files, a message through
the relay over STARTTLS found through the API; interactive answers on
stdin; the refusal to overwrite; `--check` naming each enrolment failure;
and no private key or secret in anything it prints."""

from __future__ import annotations

import datetime
import http.client
import json
import os
import re
import smtplib
import ssl
import subprocess
import time
import tomllib
from email.message import EmailMessage
from pathlib import Path

import pytest

from mailtresor import config as configmod
from mailtresor.keys.pki import CA
from mailtresor.setup import certs
from tests.harness import devstack
from tests.harness.stack import free_port

MAILTRESOR = str(devstack.VENV_BIN / "mailtresor")


def setup(*args, stdin: str | None = None, timeout: float = 60):
    return subprocess.run([MAILTRESOR, "setup", *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=timeout)


def secrets_in(root: Path) -> list[str]:
    """Every private key body and the master secret setup wrote under root."""
    found = []
    for p in root.rglob("*"):
        if p.is_file() and (p.suffix == ".key" or p.name == "master-key"):
            text = p.read_text()
            body = "".join(line for line in text.splitlines() if "-----" not in line)
            found += [body[i:i + 32] for i in range(0, len(body) - 31, 32)] or [text.strip()]
    assert found
    return found


def assert_no_secret(root: Path, *outputs: str):
    for out in outputs:
        assert "PRIVATE KEY" not in out
        for s in secrets_in(root):
            assert s not in out


def trial_args(root: Path, ports: dict) -> list:
    return ["--root", root, "--trial", "--yes", "--hostname", "archive.test", "--name", "trial1",
            "--tenant", "acme=acme.example", "--listen-address", "127.0.0.1", "--smtp-port", ports["smtp"],
            "--smtps-port", 0, "--api-listen", f"127.0.0.1:{ports['api']}", "--control-port", ports["control"],
            # pytest's tmp_path is too deep for a unix socket (108 bytes) in the root's
            # /var/spool/postfix; the relay is what this test drives.
            "--no-milter"]


class Https:
    def __init__(self, port: int, ca: Path):
        self.port, self.ctx, self.cookie, self.csrf = port, ssl.create_default_context(cafile=str(ca)), None, None

    def request(self, method, path, body=None):
        c = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx, timeout=30)
        h = {"Content-Type": "application/json"}
        if self.cookie:
            h["Cookie"] = f"mt_session={self.cookie}"
            h["X-CSRF-Token"] = self.csrf
        c.request(method, path, json.dumps(body) if body is not None else None, h)
        r = c.getresponse()
        data = r.read()
        c.close()
        return r, data


@pytest.fixture
def trial(tmp_path):
    """setup --trial --yes, then the control endpoint and the daemon on
    what it wrote, as their units would start them."""
    root = tmp_path / "root"
    ports = {"smtp": free_port(), "api": free_port(), "control": free_port()}
    r = setup(*trial_args(root, ports))
    assert r.returncode == 0, r.stdout + r.stderr
    conf = root / "etc/mailtresor/mailtresor.toml"
    cfg = configmod.load(conf)
    ccfg = configmod.load(root / "etc/mailtresor/control.toml")
    logs = open(tmp_path / "logs", "ab")
    env = dict(os.environ, CREDENTIALS_DIRECTORY=str(root / "etc/mailtresor/control/credentials"))
    notify = devstack.NotifySocket(tmp_path / "notify.sock")
    ctl = daemon = None
    try:
        ctl = devstack.start_control(ccfg, env=env, stdout=logs, stderr=subprocess.STDOUT)
        daemon = devstack.start_daemon(cfg, notify, stdout=logs, stderr=subprocess.STDOUT)
        yield {"root": root, "conf": conf, "cfg": cfg, "ports": ports, "out": r.stdout, "err": r.stderr,
               "logs": tmp_path / "logs"}
    finally:
        devstack.stop(daemon, 15)
        devstack.stop(ctl, 15)
        notify.close()
        logs.close()


def test_trial_to_first_archived_message(trial):
    root, conf, ports = trial["root"], trial["conf"], trial["ports"]
    out = trial["out"]
    # The trial says plainly what it costs, in the output and the files.
    assert "defeats its" in out and "stolen disk" in out
    for f in (conf, root / "etc/mailtresor/control.toml"):
        assert "# TRIAL: the control endpoint runs on this same machine" in f.read_text()
    # Private keys: 0600; the secret store's master secret too.
    for p in [*root.rglob("*.key"), root / "etc/mailtresor/control/credentials/master-key"]:
        assert p.stat().st_mode & 0o777 == 0o600, p
    # The enrolment check passes against the trial control endpoint.
    r = setup("--check", "--config", conf)
    assert r.returncode == 0 and "enrolment: OK" in r.stdout, r.stdout + r.stderr
    # A user, made the way the output says (the password on stdin).
    r = subprocess.run([MAILTRESOR, "--config", str(conf), "user", "add", "--tenant", "acme", "--role", "auditor",
                        "--password-stdin", "auditor"], input="Trial-pass-4711\n", capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    # A message through the relay over STARTTLS, verified with the written CA.
    ca = root / "etc/mailtresor/tls/ca.pem"
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "setup-test@acme.example", "postmaster@acme.example", "firstarchived"
    msg.set_content("the first archived message\n")
    with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=30) as s:
        s.starttls(context=ssl.create_default_context(cafile=str(ca)))
        s.send_message(msg)
    api = Https(ports["api"], ca)
    deadline = time.monotonic() + 30
    while True:
        r, data = api.request("POST", "/api/v1/login", {"tenant": "acme", "username": "auditor",
                                                        "password": "Trial-pass-4711"})
        if r.status != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.status == 200, data
    api.cookie = re.search(r"mt_session=([^;]+)", r.getheader("Set-Cookie")).group(1)
    api.csrf = json.loads(data)["csrf"]
    deadline = time.monotonic() + 45
    while True:
        r, data = api.request("GET", "/api/v1/search?q=subject:firstarchived")
        if r.status == 200 and json.loads(data)["total"] == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert r.status == 200 and json.loads(data)["total"] == 1, (data, trial["logs"].read_text()[-2000:])
    assert_no_secret(root, out, trial["err"], trial["logs"].read_text())


def test_check_names_each_enrolment_failure(trial, tmp_path):
    """--check against the running trial endpoint with identities it does
    not know: each failure gets its own clear line, no traceback."""
    root, conf = trial["root"], trial["conf"]
    doc = tomllib.loads(conf.read_text())
    text = conf.read_text()
    tls = root / "etc/mailtresor/tls"
    ca = CA.load(tls / "ca.pem", tls / "ca.key")

    def variant(name, **control):
        t = text
        for k, v in control.items():
            t = t.replace(f'{k} = "{doc["control"][k]}"', f'{k} = "{v}"')
        p = tmp_path / f"{name}.toml"
        p.write_text(t)
        return p

    # A certificate from the trusted CA that no [[control_server.appliance]] names.
    ca.issue_to(tmp_path / "stranger.pem", tmp_path / "stranger.key", "appliance-stranger", client=True)
    r = setup("--check", "--config", variant("unknown", cert_file=tmp_path / "stranger.pem",
                                                key_file=tmp_path / "stranger.key"))
    assert r.returncode == 1 and "certificate unknown" in r.stderr and "appliance-stranger" in r.stderr, r.stderr
    # A certificate from another CA: the control endpoint refuses the TLS session.
    CA.create("another CA").issue_to(tmp_path / "other.pem", tmp_path / "other.key", "appliance-trial1",
                                     client=True)
    r = setup("--check", "--config", variant("otherca", cert_file=tmp_path / "other.pem",
                                                key_file=tmp_path / "other.key"))
    assert r.returncode == 1 and "TLS refused by the control endpoint" in r.stderr, r.stderr
    # The control endpoint's certificate not signed by the CA we were given.
    CA.create("a third CA").save(tmp_path / "third.pem", tmp_path / "third-ca.key")
    r = setup("--check", "--config", variant("badca", ca_file=tmp_path / "third.pem"))
    assert r.returncode == 1 and "TLS refused by this appliance" in r.stderr, r.stderr
    # Nobody listening.
    r = setup("--check", "--config", variant("down", url=f"https://127.0.0.1:{free_port()}"))
    assert r.returncode == 1 and "unreachable" in r.stderr, r.stderr
    # A tenant whose key the control admin has not created.
    p = tmp_path / "missing.toml"
    p.write_text(text + '\n[[tenant]]\nname = "globex"\ndomains = ["globex.example"]\n')
    r = setup("--check", "--config", p)
    assert r.returncode == 1 and "key missing: tenant.globex" in r.stdout + r.stderr, r.stdout + r.stderr
    assert "keys create trial1 tenant.globex" in r.stdout + r.stderr
    for r_ in (r,):
        assert "Traceback" not in r_.stderr


def test_interactive_answers_and_enrolment_steps(tmp_path):
    root = tmp_path / "root"
    CA.create("control CA").save(tmp_path / "control-ca.pem", tmp_path / "control-ca.key")
    answers = "\n".join([
        "http://control.example.org",          # refused: not https
        "https://control.example.org:8444",
        "",                                    # name: the default from the host name
        "archive1.acme.example",
        "",                                    # tenant: default "acme"
        "acme.example, user@globex.example",   # refused: an address, not a domain
        "acme.example, acme.org",
        "no",                                  # another tenant?
        "sendmail",
        "",                                    # listen address 0.0.0.0
        "192.0.2.0/33",                        # refused
        "192.0.2.0/28",
        "",                                    # API
        "yes",                                 # make the certificates
        str(tmp_path / "missing.pem"),         # refused: no such file
        str(tmp_path / "control-ca.pem"),
    ]) + "\n"
    r = setup("--root", root, stdin=answers)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "Control endpoint URL" in out and "is not https://HOST[:PORT]" in out
    assert "'user@globex.example' is an address: give the domain only" in out
    assert "'192.0.2.0/33' is not a network" in out and "No such file" in out
    assert "Mail domains of tenant acme (comma-separated) [acme.example]:" in out
    cfg = configmod.load(root / "etc/mailtresor/mailtresor.toml")
    assert cfg.appliance.name == "archive1" and cfg.appliance.hostname == "archive1.acme.example"
    assert [(t.name, t.domains) for t in cfg.tenant] == [("acme", ("acme.example", "acme.org"))]
    assert cfg.control.url == "https://control.example.org:8444"
    assert cfg.milter.listen == f"unix:{root}/run/mailtresor/milter.sock"
    assert cfg.relay.connector[0].networks == ("192.0.2.0/28",)
    # What the control host's admin runs, and what Sendmail needs.
    for k in ("spool", "seal", "access", "tenant.acme"):
        assert f"keys create --if-missing archive1 {k}\n" in out
    assert 'cert_names = ["appliance-archive1"]' in out
    assert "INPUT_MAIL_FILTER(`mailtresor'" in out
    assert certs.common_name((root / "etc/mailtresor/tls/appliance.pem").read_bytes()) == "appliance-archive1"
    assert (root / "etc/mailtresor/tls/control-ca.pem").read_bytes() == (tmp_path / "control-ca.pem").read_bytes()
    assert_no_secret(root, out, r.stderr)
    # Standard input ending before the answers do: a clear stop.
    r = setup("--root", tmp_path / "other", stdin="https://control.example.org\n")
    assert r.returncode == 2 and "no answer (standard input ended)" in r.stderr and "Traceback" not in r.stderr


def test_refuses_to_overwrite_and_force_keeps_a_copy(tmp_path):
    root = tmp_path / "root"
    args = ["--root", root, "--yes", "--control-url", "https://control.example.org:8444", "--hostname",
            "archive1.example.org", "--mta", "exchange", "--exchange-tenant-id",
            "11111111-2222-3333-4444-555555555555"]
    CA.create("control CA").save(tmp_path / "c.pem", tmp_path / "c.key")
    r = setup(*args, "--control-ca", tmp_path / "c.pem")
    assert r.returncode == 0, r.stderr
    assert "New-JournalRule" in r.stdout and "exchange_tenant_id" in (root / "etc/mailtresor/mailtresor.toml").read_text()
    conf = root / "etc/mailtresor/mailtresor.toml"
    conf.write_text(conf.read_text() + "# the admin's edit\n")
    before = conf.read_bytes()
    r = setup(*args, "--control-ca", tmp_path / "c.pem")
    assert r.returncode == 2 and f"{conf} exists: not overwritten" in r.stderr and "--force" in r.stderr
    assert conf.read_bytes() == before
    # --dry-run writes nothing and shows the configuration.
    r = setup(*args, "--control-ca", tmp_path / "c.pem", "--dry-run")
    assert r.returncode == 0 and "Dry run: nothing is written" in r.stdout and "[appliance]" in r.stdout
    assert conf.read_bytes() == before
    assert_no_secret(root, r.stdout)
    r = setup(*args, "--control-ca", tmp_path / "c.pem", "--force")
    assert r.returncode == 0, r.stderr
    backups = list(conf.parent.glob("mailtresor.toml.bak-*"))
    assert len(backups) == 1 and backups[0].read_bytes() == before
    assert list((conf.parent / "tls").glob("relay.key.bak-*"))[0].stat().st_mode & 0o777 == 0o600


def test_bad_flags_are_named(tmp_path):
    for args, message in ((["--tenant", "Acme=acme.example"], "--tenant: 'Acme': use lower-case"),
                          (["--tenant", "acme=acme"], "--tenant: 'acme' is not a domain name"),
                          (["--control-url", "https://x.example:99999"], "--control-url: "),
                          (["--trial", "--control-url", "https://x.example"], "choose one"),
                          ([], "no default; give --control-url or --trial")):
        extra = [] if "--control-url" in args or not args else ["--trial"]
        r = setup("--root", tmp_path / "r", "--yes", *extra, *args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_given_certificates_are_checked(tmp_path):
    """Taken certificates: the key must match, the dates hold, the relay's
    name the host, the appliance's be a client certificate with a CN."""
    ca = CA.create()
    ca.issue_to(tmp_path / "r.pem", tmp_path / "r.key", "archive1.example.org", server_names=("archive1.example.org",))
    ca.issue_to(tmp_path / "o.pem", tmp_path / "o.key", "other", server_names=("other.example.org",))
    old = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=900)
    ca.issue_to(tmp_path / "x.pem", tmp_path / "x.key", "archive1.example.org",
                server_names=("archive1.example.org",), not_before=old)
    ca.issue_to(tmp_path / "a.pem", tmp_path / "a.key", "appliance-a1", client=True)
    assert certs.check_pair(tmp_path / "r.pem", tmp_path / "r.key", "relay", host="archive1.example.org")
    with pytest.raises(ValueError, match="does not belong to the certificate"):
        certs.check_pair(tmp_path / "r.pem", tmp_path / "o.key", "relay")
    with pytest.raises(ValueError, match="expired on"):
        certs.check_pair(tmp_path / "x.pem", tmp_path / "x.key", "relay")
    with pytest.raises(ValueError, match="does not name archive1.example.org"):
        certs.check_pair(tmp_path / "o.pem", tmp_path / "o.key", "relay", host="archive1.example.org")
    with pytest.raises(ValueError, match="not for TLS clients"):
        certs.check_pair(tmp_path / "r.pem", tmp_path / "r.key", "appliance", client=True)
    assert certs.check_pair(tmp_path / "a.pem", tmp_path / "a.key", "appliance", client=True)
    # Through the command: a relay certificate for another host is refused before anything is written.
    r = setup("--root", tmp_path / "root", "--yes", "--no-milter", "--control-url", "https://control.example.org",
              "--control-ca", tmp_path / "r.pem", "--hostname", "archive1.example.org",
              "--relay-cert", tmp_path / "o.pem", "--relay-key", tmp_path / "o.key",
              "--appliance-cert", tmp_path / "a.pem", "--appliance-key", tmp_path / "a.key")
    assert r.returncode == 2 and "does not name archive1.example.org" in r.stderr, r.stderr
    assert not (tmp_path / "root/etc/mailtresor/mailtresor.toml").exists()


def test_volume_step(tmp_path):
    """--volume-dir calls `mailtresor volume init` (the volumes part's
    command, INTERFACES16.md) with the trial control endpoint up for it, on
    a loop-mounted ext4 image with -O encrypt."""
    from mailtresor.setup import control
    why = control.volumes_supported()
    if why:
        pytest.skip(f"no volumes part in this tree: {why}")
    if os.geteuid() != 0:
        pytest.skip("needs root for a loop mount")
    image, mnt = tmp_path / "vol.img", tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", "32M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-O", "encrypt", str(image)], check=True)
    loop = subprocess.run(["losetup", "--find", "--show", str(image)], check=True, capture_output=True,
                          text=True).stdout.strip()
    root = Path("/tmp") / f"mt-setup-{os.getpid()}"     # short: the API socket lives under it
    try:
        subprocess.run(["mount", loop, str(mnt)], check=True)
        (mnt / "state").mkdir()
        (mnt / "spool").mkdir()
        ports = {"smtp": free_port(), "api": free_port(), "control": free_port()}
        r = setup(*trial_args(root, ports), "--state-dir", mnt / "state", "--spool-dir", mnt / "spool",
                  "--volume-dir", mnt / "state", mnt / "spool", timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "volumes encrypted: state" in r.stdout
        cfg = tomllib.loads((root / "etc/mailtresor/mailtresor.toml").read_text())
        assert cfg["volume"] == [{"name": "state", "kind": "fscrypt",
                                  "directories": [str(mnt / "state"), str(mnt / "spool")]}]
        assert_no_secret(root, r.stdout, r.stderr)
    finally:
        subprocess.run([str(devstack.VENV_BIN / "mailtresor"), "--config", str(root / "etc/mailtresor/mailtresor.toml"),
                        "volume", "lock", "--all"], capture_output=True, timeout=60)
        subprocess.run(["umount", str(mnt)], capture_output=True)
        subprocess.run(["losetup", "-d", loop], capture_output=True)
        subprocess.run(["rm", "-rf", str(root)])
