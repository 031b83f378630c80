"""Remote backup to a real OpenSSH SFTP target (tests/harness/sshd.py): a
real daemon archives corpus mail, `mailtresor backup push` mirrors the
backup directory, the target holds the logs byte for byte and neither a
key nor plaintext; more mail appends only the tail; a compacted log is
replaced by rename; after the store and the backup directory are lost,
`backup pull` + `restore` + `reindex` give the archive back and `verify`
passes.  Refused or reported: a changed host key, a tampered or truncated
log on the target.  The target down: the daemon goes on archiving, reports
the lag, and catches up when it returns.

The tests run in order on one stack and one target (module fixture)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from mailtresor.archive.deleter import Victim, delete_messages
from mailtresor.archive.store import BackupDirectory, read_frames
from mailtresor.assemble import build_keys
from tests.conftest import corpus_files, corpus_message
from tests.harness.stack import Stack
from tests.test_archive import ON, cli, msg, search, wait_archived
from tests.test_deletion import Piped

MONTH = "2002-08"             # msg()'s Date
TOMB = {"kind": "request", "request": "q1", "by": "aud", "reason": "Art. 17", "at": 1.0}


def backup_section(target, **over) -> dict:
    b = {"remote": target.url, "known_hosts": str(target.known_hosts), "identity_file": str(target.identity),
         "interval": 3600.0, "retry_initial": 1.0, "connect_timeout": 5.0, "io_timeout": 10.0}
    b.update(over)
    return {"backup": b}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("sshd needs root (binds, chroots, changes user)")
    from tests.harness.sshd import Sshd
    target = Sshd().start()
    # The daemon starts without [backup]: the first tests push with the CLI
    # and measure what it sends; the last one gives the daemon the target.
    s = Stack(tmp_path_factory.mktemp("sftp") / "stack", ON)
    s.start()
    s.reconfigure(backup_section(target))
    s.target = target
    s.sent = {}
    try:
        yield s
    finally:
        s.close()
        target.close()


def local_logs(stack) -> dict[str, bytes]:
    d = stack.cfg.archive.backup_directory
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*.log"))}


def push(stack, check=0) -> dict:
    p = cli(stack, "backup", "push", "--json", check=check)
    return json.loads(p.stdout) if p.returncode == 0 else {"stderr": p.stderr.decode()}


def received(target, sessions_before: int, timeout: float = 10.0) -> int:
    """Bytes the target's sshd received in the sessions after the first
    `sessions_before` (its own count, logged when a session closes:
    everything on the wire, SSH handshake and SFTP requests included)."""
    deadline = time.monotonic() + timeout
    while True:
        counts = [int(n) for n in re.findall(r"Transferred: sent \d+, received (\d+) bytes", target.log())]
        if len(counts) > sessions_before or time.monotonic() > deadline:
            return sum(counts[sessions_before:])
        time.sleep(0.1)


def sessions(target) -> int:
    return target.log().count("Transferred: sent")


def test_push_mirrors_the_logs_byte_for_byte_with_no_key_and_no_plaintext(world):
    files = corpus_files()[::40][:30]
    needles = set()
    with world.smtp() as s:
        for p in files:
            raw = corpus_message(p)
            s.sendmail("alice@globex.example", ["bob@acme.example"], raw)
            for line in raw.split(b"\r\n"):
                if line.startswith((b"Subject: ", b"From: ")) and len(line) > 24:
                    needles.add(line.split(b": ", 1)[1])
        for i in range(10):
            s.sendmail("alice@globex.example", ["bob@acme.example"], msg(f"Doomed quarterly figures {i}"))
    wait_archived(world)
    world.stop_daemon()                                # seals shipped too
    needles |= {b"bob@acme.example", b"alice@globex.example", b"Doomed quarterly figures"}
    assert len(needles) > 30

    out = push(world)
    local = local_logs(world)
    assert out["created"] == len(local) >= 2 and out["bytes_sent"] == sum(map(len, local.values()))
    assert out["fsync"] is True
    remote = world.target.files()
    assert remote == local                             # byte for byte, nothing else on the target

    blob = b"".join(remote.values())
    control = b"".join(corpus_message(p) for p in files) + msg("Doomed quarterly figures 0")
    assert all(n in control for n in needles)          # the search would find them in clear
    assert [n for n in needles if n in blob] == []
    keys = build_keys(world.cfg)
    secrets = [keys.store_key(t, keys.current(t)[0]) for t in ("acme", "globex")] + [keys.seal_seed()]
    secrets.append(world.keyring().current("spool")[1])
    assert all(len(k) >= 32 and k not in blob for k in secrets)
    assert push(world)["unchanged"] == len(local)      # nothing new: nothing sent


def test_more_mail_appends_only_the_tail(world):
    before = local_logs(world)
    world.start_daemon()
    with world.smtp() as s:
        for i in range(5):
            s.sendmail("alice@globex.example", ["bob@acme.example"], msg(f"Later news {i}"))
    wait_archived(world)
    world.stop_daemon()
    after = local_logs(world)
    grown = {k for k in after if after[k] != before.get(k)}
    assert grown and all(after[k].startswith(before[k]) for k in grown if k in before)
    tail = sum(len(after[k]) - len(before.get(k, b"")) for k in grown)
    n0 = sessions(world.target)
    out = push(world)
    assert out["bytes_sent"] == tail and out["replaced"] == 0 and out["appended"] == len(grown), out
    # By the server's own count: the tail and the protocol's overhead (the
    # SSH handshake, a stat per log), far less than the logs themselves.
    got = received(world.target, n0)
    total = sum(map(len, after.values()))
    assert tail < got < tail + 16384 < total, (tail, got, total)
    assert world.target.files() == after


def test_a_compacted_log_is_replaced_by_rename(world):
    ids = {h["subject"]: h["id"] for h in search(world, "acme", "subject:doomed")}
    assert len(ids) == 10
    with Piped(world) as p:
        delete_messages(p, "acme", [Victim(a, MONTH, TOMB) for a in ids.values()])
        push(world)                                    # the tombstones: appended
        res = p.backup.compact("acme", MONTH)
    assert res["dropped"] >= 10 and res["bytes_after"] < res["bytes_before"]
    rlog = world.target.root / "acme" / f"{MONTH}.log"
    inode = rlog.stat().st_ino
    out = push(world)
    assert out["replaced"] == 1 and out["bytes_sent"] == res["bytes_after"], out
    assert world.target.files() == local_logs(world)
    assert rlog.stat().st_ino != inode                 # a new file renamed over, not rewritten in place
    assert not [p for p in world.target.root.rglob(".*")]      # no temporary file left


def test_after_losing_store_and_backup_pull_restore_gives_the_archive_back(world):
    subjects = sorted(h["subject"] for h in search(world, "acme", "subject:later"))
    assert len(subjects) == 5
    some = [h["id"] for h in search(world, "acme", "subject:later")][:2]
    shown = {a: cli(world, "show", "--tenant", "acme", a, check=0).stdout for a in some}
    store, backup = world.cfg.archive.directory, world.cfg.archive.backup_directory
    shutil.rmtree(store)
    shutil.rmtree(backup)                              # the appliance's disks are gone
    p = cli(world, "backup", "pull", str(backup), check=0)
    assert b"all good" in p.stderr
    assert world.target.files() == local_logs(world)
    cli(world, "restore", check=0)
    cli(world, "reindex", check=0)
    cli(world, "verify", check=0)
    assert sorted(h["subject"] for h in search(world, "acme", "subject:later")) == subjects
    assert search(world, "acme", "subject:doomed") == []          # the deletions came back too
    for a, raw in shown.items():
        assert cli(world, "show", "--tenant", "acme", a, check=0).stdout == raw


def test_a_changed_or_unknown_host_key_is_refused(world, tmp_path):
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True, timeout=30)
    wrong = tmp_path / "known_hosts.wrong"
    wrong.write_text(f"[127.0.0.1]:{world.target.port} {other.with_suffix('.pub').read_text()}")
    pinned = wrong.read_bytes()
    empty = tmp_path / "known_hosts.empty"
    empty.write_text("")
    before = world.target.files()
    try:
        world.reconfigure(backup_section(world.target, known_hosts=str(wrong)))
        p = cli(world, "backup", "push", check=1)
        err = p.stderr.decode()
        assert "is not the one pinned in" in err and "refusing to connect" in err and "Traceback" not in err
        world.reconfigure(backup_section(world.target, known_hosts=str(empty)))
        p = cli(world, "backup", "pull", str(tmp_path / "pulled"), check=1)
        assert "has no host key pinned" in p.stderr.decode()
        assert world.target.files() == before
        assert not (tmp_path / "pulled").exists() or not any((tmp_path / "pulled").rglob("*.log"))
        assert wrong.read_bytes() == pinned and empty.read_text() == ""       # nothing added, ever
        world.reconfigure(backup_section(world.target))
        p = cli(world, "backup", "push", "--identity", str(other), check=1)    # a key the target does not know
        assert f"refused the key of {other} for user 'nobody'" in p.stderr.decode()
        locked = tmp_path / "locked"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "a passphrase", "-f", str(locked)],
                       check=True, timeout=30)
        p = cli(world, "backup", "push", "--identity", str(locked), check=1)
        assert "is protected by a passphrase" in p.stderr.decode()
    finally:
        world.reconfigure(backup_section(world.target))


def test_one_push_at_a_time(world):
    """A push while another holds the lock (the daemon's, here this test's)
    waits, then says so; it does not push beside it."""
    from mailtresor.archive.store.remote import exclusive
    with exclusive(world.cfg.appliance.state_directory, wait=5):
        p = cli(world, "backup", "push", "--wait", "0.5", check=1)
    assert b"another push or pull is under way" in p.stderr
    assert push(world)["unchanged"] >= 2


def test_a_tampered_or_truncated_log_on_the_target_is_reported_on_pull(world, tmp_path):
    rlog = world.target.root / "acme" / f"{MONTH}.log"
    good = rlog.read_bytes()
    frames = list(read_frames(rlog))
    last = 17 + len(frames[-1][2]) + 4                 # the last frame's size
    mid = len(good) // 2
    other = sorted(p for p in (world.target.root / "acme").glob("*.log") if p != rlog)[0]
    cases = {"flipped": good[:mid] + bytes([good[mid] ^ 1]) + good[mid + 1:],
             "torn": good[:-7],
             "cut at a frame boundary": good[:-last],
             "another month's log under this name": other.read_bytes()}
    expected = {"flipped": "damaged", "torn": "damaged or torn", "cut at a frame boundary": "shorter on the target",
                "another month's log under this name": "signature does not verify"}
    try:
        for i, (name, data) in enumerate(cases.items()):
            rlog.write_bytes(data)
            dest = tmp_path / f"pulled{i}"
            p = cli(world, "backup", "pull", str(dest), check=1)
            out = p.stdout.decode()
            assert f"acme/{MONTH}:" in out and expected[name] in out, (name, out)
            assert (dest / "acme" / f"{MONTH}.log.damaged").exists()
            assert not (dest / "acme" / f"{MONTH}.log").exists()   # restore would not read it
            assert b"with problems" in p.stderr
    finally:
        rlog.write_bytes(good)


def test_a_replacement_cut_short_leaves_the_old_log_whole_on_the_target(world, tmp_path, monkeypatch):
    """The upload of a rewritten log fails half-way: the target still has
    the old log, byte for byte, and no partial file under its name."""
    from mailtresor.archive.store import remote
    before = world.target.files()
    local = tmp_path / "backup"
    (local / "acme").mkdir(parents=True)
    logs = sorted((world.cfg.archive.backup_directory / "acme").glob("*.log"))
    (local / "acme" / f"{MONTH}.log").write_bytes(b"".join(p.read_bytes() for p in reversed(logs)))
    rb = remote.RemoteBackup(BackupDirectory(local), remote.from_config(world.cfg).target, tmp_path / "state")
    real = remote.RemoteBackup._send

    def cut(self, sftp, rf, f, start, end):
        f.seek(start)
        rf.write(f.read((end - start) // 2))
        rf.flush()
        raise OSError(104, "Connection reset by peer (test)")

    monkeypatch.setattr(remote.RemoteBackup, "_send", cut)
    with pytest.raises(remote.RemoteError, match="Connection reset"):
        rb.push()
    assert world.target.files() == before
    monkeypatch.setattr(remote.RemoteBackup, "_send", real)


def scrape(stack) -> str:
    """/metrics over HTTPS from loopback (allowed without a login by default)."""
    import urllib.request
    ctx = stack.client_context()
    ctx.check_hostname = False
    with urllib.request.urlopen(f"https://127.0.0.1:{stack.api_port}/metrics", context=ctx, timeout=10) as r:
        return r.read().decode()


def status_remote(stack) -> dict | None:
    try:
        return json.loads((stack.cfg.appliance.runtime_directory / "status.json").read_text()).get("backup_remote")
    except (OSError, ValueError):
        return None


def wait_for(cond, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_target_down_the_daemon_archives_on_reports_the_lag_and_catches_up(world):
    world.reconfigure(backup_section(world.target, interval=1.0, retry_initial=1.0, connect_timeout=2.0))
    if world.daemon is not None:
        world.stop_daemon()                            # run alone: the fixture's daemon has no [backup]
    world.start_daemon()
    try:
        wait_for(lambda: (st := status_remote(world)) and st["last_push"] and not st["last_error"]
                 and st["lag"] and st["lag"]["frames"] == 0, "a first push by the daemon")
        # Hung first: connections accepted by the kernel, never answered.
        # The pushes wait on a pool thread, bounded by connect_timeout.
        world.target.pause()
        try:
            with world.smtp() as s:
                for i in range(2):
                    s.sendmail("alice@globex.example", ["bob@acme.example"], msg(f"While hung {i}"))
            wait_archived(world)                       # archiving goes on
            wait_for(lambda: (st := status_remote(world)) and "no SSH answer" in (st["last_error"] or ""),
                     "the hang reported")
        finally:
            world.target.resume()
        world.target.stop()                            # then down
        with world.smtp() as s:
            for i in range(4):
                s.sendmail("alice@globex.example", ["bob@acme.example"], msg(f"While down {i}"))
        wait_archived(world)                           # archiving goes on
        st = wait_for(lambda: (st := status_remote(world)) and st["last_error"] and st["lag"]["frames"] > 0
                      and st, "the lag reported")
        assert "127.0.0.1" in st["last_error"] and st["lag"]["bytes"] > 0
        p = cli(world, "status")
        assert b"Remote:" in p.stdout and b"FAILING" in p.stdout
        p = cli(world, "backup", "status", check=1)
        assert b"last error" in p.stdout and b"frame" in p.stdout
        metrics = scrape(world)
        assert "mailtresor_backup_remote_failing 1.0" in metrics
        assert re.search(r"mailtresor_backup_remote_lag_frames [1-9]", metrics), metrics
        world.target.start()
        wait_for(lambda: (st := status_remote(world)) and not st["last_error"] and st["lag"]["frames"] == 0,
                 "the daemon catching up")
        assert world.target.files() == local_logs(world)
        cli(world, "backup", "status", check=0)
    finally:
        world.stop_daemon()


# --- pure: the URL and the configuration's checks (no target needed) ---------------------------

def test_the_identity_file_may_be_a_systemd_credential(monkeypatch, tmp_path):
    from mailtresor.archive.store.remote import RemoteError, resolve_identity
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert resolve_identity("credential:backup-identity") == tmp_path / "backup-identity"
    assert resolve_identity("/etc/k") == Path("/etc/k")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(RemoteError, match="CREDENTIALS_DIRECTORY is not set"):
        resolve_identity("credential:backup-identity")


def test_pull_writes_only_backup_log_names_whatever_the_target_lists():
    """A hostile target lists names that would put files outside the pull's
    directory, or that are not logs: none is taken."""
    from mailtresor.archive.store.remote import pulled_month
    assert pulled_month("acme", "2002-08.log") == "2002-08"
    for tenant, name in [("..", "2002-08.log"), (".", "2002-08.log"), (".hidden", "2002-08.log"),
                         ("a/../..", "2002-08.log"), ("acme", "../2002-08.log"), ("acme", ".2002-08.log.uploading"),
                         ("acme", "2002-08.log.damaged"), ("acme", "2002-8.log"), ("acme", "/etc/passwd"),
                         ("", "2002-08.log"), ("acme\n", "2002-08.log")]:
        assert pulled_month(tenant, name) is None, (tenant, name)


def test_the_remote_url_is_parsed_strictly():
    from mailtresor.archive.store.remote import parse_remote
    u = parse_remote("sftp://mt-t1@backup.example.net:2222/srv/backup/")
    assert (u.user, u.host, u.port, u.path) == ("mt-t1", "backup.example.net", 2222, "/srv/backup")
    assert parse_remote("sftp://mt@[2001:db8::1]/b").port == 22
    assert str(parse_remote("sftp://mt@[2001:db8::1]/b")) == "sftp://mt@[2001:db8::1]:22/b"
    for bad, why in [("https://mt@h/b", "not an SFTP URL"), ("sftp://h/b", "not an SFTP URL"),
                     ("sftp://mt:secret@h/b", "no password in the URL"), ("sftp://mt@h:70000/b", "out of range"),
                     ("sftp://mt@h/", "not its root"), ("sftp://mt@h/a/../b", "no '.' or '..'")]:
        with pytest.raises(ValueError, match=re.escape(why)):
            parse_remote(bad)


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
[archive]
directory = "store"
backup_directory = "backup"
"""


@pytest.mark.parametrize("section, message", [
    ('remote = "sftp://mt@h/b"\nidentity_file = "k"', "backup.known_hosts: required with backup.remote"),
    ('remote = "sftp://mt@h/b"\nknown_hosts = "kh"', "backup.identity_file: required with backup.remote"),
    ('remote = "ftp://h/b"\nknown_hosts = "kh"\nidentity_file = "k"', "backup.remote: 'ftp://h/b' is not an SFTP URL"),
    ('remote = "sftp://mt@h/b"\nknown_hosts = "kh"\nidentity_file = "credential:"', "credential: needs a name"),
    ('interval = 0.5', "backup.interval: 0.5 seconds: must be between 1 and 86400"),
    ('io_timeout = 100000', "backup.io_timeout"),
    ('bogus = 1', "backup.bogus: unknown key"),
])
def test_backup_configuration_errors_name_the_key(tmp_path, section, message):
    from mailtresor import config
    p = tmp_path / "m.toml"
    p.write_text(BASE + "[backup]\n" + section + "\n")
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        config.load(p)
    p.write_text(BASE.replace('backup_directory = "backup"\n', "")
                 + '[backup]\nremote = "sftp://mt@h/b"\nknown_hosts = "kh"\nidentity_file = "k"\n')
    with pytest.raises(config.ConfigError, match="needs \\[archive\\] backup_directory"):
        config.load(p)


def test_a_target_that_never_answers_fails_within_the_timeout(world, tmp_path):
    """A port that accepts and then says nothing (a hung target, a tarpit):
    the push gives up after connect_timeout, with a line naming the target."""
    import socket
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        port = srv.getsockname()[1]
        try:
            world.reconfigure(backup_section(world.target, remote=f"sftp://nobody@127.0.0.1:{port}/backup",
                                             connect_timeout=2.0))
            t0 = time.monotonic()
            p = cli(world, "backup", "push", check=1)
            assert time.monotonic() - t0 < 30
            err = p.stderr.decode()
            assert f"127.0.0.1:{port}: no SSH answer within 2 s" in err and "Traceback" not in err, err
        finally:
            world.reconfigure(backup_section(world.target))
