"""Encrypted volumes (mailtresor/volumes/, docs/VOLUMES.md) on real parts:
fscrypt v2 on loop-mounted ext4 images with the kernel's own ioctls, LUKS2
with the real cryptsetup (format, luksDump, --test-passphrase here; open,
close and mount only where the kernel has device-mapper), keys from a real
control endpoint over mutual TLS, the real CLI and daemon as processes.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mailtresor import config as configmod
from mailtresor.volumes import (ABSENT, BUSY, LOCKED, UNINITIALISED, UNLOCKED, Busy, VolumeError, WrongKey,
                                fscrypt, luks, open_volume, volume_secret)

from tests.harness.loopfs import loop_available, loop_ext4
from tests.harness.stack import Stack

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
TEST_PBKDF = ("--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")

needs_loop = pytest.mark.skipif(loop_available() is not None, reason=str(loop_available()))


def fs_volume(name, *dirs):
    return open_volume(SimpleNamespace(name=name, kind="fscrypt", directories=list(dirs)))


def kernel_identifier(master_key: bytes) -> bytes:
    """The kernel's key identifier of an fscrypt v2 master key, computed
    independently (fs/crypto/keyring.c: HKDF-SHA512, info "fscrypt\\0" +
    HKDF_CONTEXT_KEY_IDENTIFIER = 1)."""
    return HKDF(hashes.SHA512(), 16, None, b"fscrypt\x00\x01").derive(master_key)


@pytest.fixture
def disk(tmp_path):
    reason = loop_available()
    if reason:
        pytest.skip(reason)
    with loop_ext4(tmp_path / "disk.img", tmp_path / "mnt") as fs:
        yield fs


# --- pure: structs, ioctl numbers, key derivation, configuration ---------------------------------

def test_structs_and_ioctl_numbers_match_the_kernel_headers():
    # The values linux/fscrypt.h's macros expand to on x86-64 and arm64.
    assert fscrypt.FS_IOC_SET_ENCRYPTION_POLICY == 0x800C6613
    assert fscrypt.FS_IOC_GET_ENCRYPTION_POLICY_EX == 0xC0096616
    assert fscrypt.FS_IOC_ADD_ENCRYPTION_KEY == 0xC0506617
    assert fscrypt.FS_IOC_REMOVE_ENCRYPTION_KEY == 0xC0406618
    assert fscrypt.FS_IOC_GET_ENCRYPTION_KEY_STATUS == 0xC080661A
    p = fscrypt.policy_v2(b"\x11" * 16)
    assert p == bytes([2, 1, 4, 2, 0, 0, 0, 0]) + b"\x11" * 16     # v2, XTS, CTS, pad 16


def test_volume_secret_is_bound_to_kind_and_name():
    k = os.urandom(32)
    a = volume_secret(k, "fscrypt", "state")
    assert len(a) == 64 and a == volume_secret(k, "fscrypt", "state")
    assert a != volume_secret(k, "fscrypt", "other") and a != volume_secret(k, "luks", "state")
    assert bytes(k) not in bytes(a)
    with pytest.raises(VolumeError, match="16 bytes, not 32"):
        volume_secret(os.urandom(16), "fscrypt", "state")


BASE = {"appliance": {"name": "t1"}, "control": {"url": "https://x", "ca_file": "/a", "cert_file": "/b",
                                                  "key_file": "/c"}, "spool": {"directory": "/s"}}


@pytest.mark.parametrize("volumes, message", [
    ([{"name": "s", "kind": "luks", "directories": ["/x"]}], "a luks volume has device and mountpoint"),
    ([{"name": "s", "kind": "luks", "device": "/dev/x"}], "needs both device"),
    ([{"name": "s", "directories": ["/x"], "device": "/dev/x"}], "an fscrypt volume has directories, not device"),
    ([{"name": "s"}], "needs at least one directory"),
    ([{"name": "s", "kind": "zfs", "directories": ["/x"]}], "volume[0].kind: 'zfs' is not one of"),
    ([{"name": "Bad name", "directories": ["/x"]}], "volume[0].name: 'Bad name'"),
    ([{"name": "s", "directories": ["rel"]}], "'rel' is not an absolute path"),
    ([{"name": "s", "directories": ["/x"]}, {"name": "s", "directories": ["/y"]}], "defined twice"),
    ([{"name": "s", "directories": ["/x"]}, {"name": "t", "directories": ["/x"]}], "also in volume 's'"),
])
def test_config_names_each_wrong_combination(volumes, message):
    with pytest.raises(configmod.ConfigError) as e:
        configmod.parse(dict(BASE, volume=volumes), Path("m.toml"))
    assert message in str(e.value)


def test_config_accepts_both_kinds():
    cfg = configmod.parse(dict(BASE, volume=[{"name": "state", "directories": ["/var/lib/mailtresor"]},
                                             {"name": "data", "kind": "luks", "device": "/dev/sdb1",
                                              "mountpoint": "/srv/m"}]), Path("m.toml"))
    assert [(v.name, v.kind) for v in cfg.volume] == [("state", "fscrypt"), ("data", "luks")]
    assert cfg.volume[0].directories == (Path("/var/lib/mailtresor"),)


# --- fscrypt on a real ext4 image -----------------------------------------------------------------

def test_fscrypt_init_lock_unlock_names_and_contents(disk):
    a, b = disk.mountpoint / "spool", disk.mountpoint / "store"
    a.mkdir(), b.mkdir()
    v = fs_volume("state", a, b)
    assert v.status()["state"] == UNINITIALISED
    key = bytearray(os.urandom(32))
    v.init(key)
    assert v.status()["state"] == UNLOCKED
    (a / "Quarterly-Report-Zebra.pdf").write_bytes(b"PLAINTEXT-MARKER-" * 100)
    (b / "sub").mkdir()
    (b / "sub" / "Invoice-Nightingale.txt").write_text("hello")
    v.lock()
    st = v.status()
    assert st["state"] == LOCKED and "unlock state" in st["detail"]
    names = os.listdir(a) + os.listdir(b)
    assert "Quarterly-Report-Zebra.pdf" not in names and "sub" not in names and len(names) == 2
    with pytest.raises(OSError):                       # contents unreadable without the key (ENOKEY)
        (a / os.listdir(a)[0]).read_bytes()
    with pytest.raises(OSError):                       # no new plaintext in a locked directory
        (a / "new-file").write_text("x")
    disk.umount()
    raw = disk.raw()
    for secret in (b"PLAINTEXT-MARKER-", b"Quarterly-Report-Zebra", b"Invoice-Nightingale"):
        assert secret not in raw
    disk.mount()
    assert v.status()["state"] == LOCKED               # the key went with the unmount; still encrypted
    v.unlock(key)
    assert (a / "Quarterly-Report-Zebra.pdf").read_bytes() == b"PLAINTEXT-MARKER-" * 100
    assert (b / "sub" / "Invoice-Nightingale.txt").read_text() == "hello"
    v.unlock(key)                                      # again: a no-op, not an error
    assert v.status()["state"] == UNLOCKED


def test_control_check_a_plain_directory_shows_its_names_in_the_image(disk):
    # The search of the raw image above would find plaintext if it were there.
    d = disk.mountpoint / "plain"
    d.mkdir()
    (d / "Quarterly-Report-Zebra.pdf").write_bytes(b"PLAINTEXT-MARKER-" * 100)
    disk.umount()
    raw = disk.raw()
    assert b"PLAINTEXT-MARKER-" in raw and b"Quarterly-Report-Zebra" in raw
    disk.mount()


def test_fscrypt_wrong_key_is_refused_and_not_left_in_the_kernel(disk):
    d = disk.mountpoint / "spool"
    d.mkdir()
    v = fs_volume("state", d)
    v.init(os.urandom(32))
    v.lock()
    wrong = os.urandom(32)
    with pytest.raises(WrongKey, match="wrong key.*nothing was unlocked"):
        v.unlock(wrong)
    assert v.status()["state"] == LOCKED
    # The wrong key's identifier, computed here as the kernel does: absent.
    ident = kernel_identifier(bytes(volume_secret(wrong, "fscrypt", "state")))
    fd = os.open(disk.mountpoint, os.O_RDONLY)
    try:
        assert fscrypt.key_status(fd, ident) == fscrypt.KEY_STATUS_ABSENT
    finally:
        os.close(fd)


def test_fscrypt_init_refuses_what_it_must_not_encrypt(disk, tmp_path):
    full = disk.mountpoint / "full"
    full.mkdir()
    (full / "old-mail").write_text("x")
    with pytest.raises(VolumeError, match=r"full is not empty"):
        fs_volume("a", full).init(os.urandom(32))
    with pytest.raises(VolumeError, match="does not exist"):
        fs_volume("a", disk.mountpoint / "missing").init(os.urandom(32))
    st = fs_volume("a", disk.mountpoint / "missing").status()
    assert st["state"] == ABSENT and "does not exist" in st["detail"]
    done = disk.mountpoint / "done"
    done.mkdir()
    fs_volume("b", done).init(os.urandom(32))
    with pytest.raises(VolumeError, match="already encrypted"):
        fs_volume("b", done).init(os.urandom(32))
    # tmpfs: no fscrypt.
    t = tmp_path / "tmpfs"
    t.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(t)], check=True)
    try:
        with pytest.raises(VolumeError, match=r"not on an ext4 file system with the encrypt feature.*"
                                              r"mkfs.ext4 -O encrypt.*tune2fs -O encrypt"):
            fs_volume("c", t).init(os.urandom(32))
        assert fs_volume("c", t).status()["state"] == ABSENT
    finally:
        subprocess.run(["umount", str(t)], check=False)


def test_fscrypt_init_refuses_ext4_without_the_encrypt_feature(tmp_path):
    if loop_available():
        pytest.skip(loop_available())
    img = tmp_path / "noenc.img"
    img.write_bytes(b"")
    os.truncate(img, 32 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-O", "^encrypt", str(img)], check=True)
    from tests.harness.loopfs import LoopFS
    fs = LoopFS(img, tmp_path / "m")
    try:
        fs.mount()
        (fs.mountpoint / "d").mkdir()
        with pytest.raises(VolumeError, match="tune2fs -O encrypt"):
            fs_volume("x", fs.mountpoint / "d").init(os.urandom(32))
    finally:
        fs.umount()


def test_fscrypt_lock_while_a_file_is_open_is_busy(disk):
    d = disk.mountpoint / "spool"
    d.mkdir()
    v = fs_volume("state", d)
    key = os.urandom(32)
    v.init(key)
    (d / "entry").write_text("mail")
    f = open(d / "entry")
    try:
        with pytest.raises(Busy, match="busy: files on it are still open.*mailtresord"):
            v.lock()
        st = v.status()
        assert st["state"] == BUSY and "stop mailtresord" in st["detail"]
    finally:
        f.close()
    v.lock()                                            # finishes the removal
    assert v.status()["state"] == LOCKED
    v.unlock(key)
    assert (d / "entry").read_text() == "mail"


# --- LUKS2 with the real cryptsetup --------------------------------------------------------------

def _luks(tmp_path, name="data", size=32):
    img = tmp_path / f"{name}.img"
    with open(img, "wb") as f:
        f.truncate(size << 20)
    return luks.LuksVolume(SimpleNamespace(name=name, kind="luks", device=img, mountpoint=tmp_path / "lmnt"),
                           pbkdf_args=TEST_PBKDF)


def test_luks_format_dump_and_test_passphrase(tmp_path):
    v = _luks(tmp_path)
    assert v.status()["state"] == UNINITIALISED
    key = os.urandom(32)
    v.format(key)
    dump = v.dump()
    assert "Version:       \t2" in dump and "pbkdf2" in dump and "mailtresor-data" in dump
    assert v.test_key(key) is True
    assert v.test_key(os.urandom(32)) is False
    # The same control key under another volume name opens nothing.
    other = luks.LuksVolume(SimpleNamespace(name="other", kind="luks", device=v.device, mountpoint=v.mountpoint),
                            pbkdf_args=TEST_PBKDF)
    assert other.test_key(key) is False
    with pytest.raises(VolumeError, match="is a LUKS2 device already"):
        v.format(key)
    assert v.status()["state"] == LOCKED
    gone = luks.LuksVolume(SimpleNamespace(name="x", kind="luks", device=tmp_path / "nope", mountpoint=tmp_path),
                           pbkdf_args=TEST_PBKDF)
    assert gone.status()["state"] == ABSENT


def test_luks_unlock_with_a_wrong_key_opens_nothing(tmp_path):
    v = _luks(tmp_path)
    v.format(os.urandom(32))
    with pytest.raises(WrongKey, match="wrong key.*nothing was opened"):
        v.unlock(os.urandom(32))
    assert not v.mapper_path.exists()


def test_luks_key_goes_on_stdin_never_in_argv_or_environment(tmp_path, monkeypatch):
    # A wrapper records what cryptsetup is started with, then runs it.  If
    # the key went into an argument or a variable, this test finds it.
    log = tmp_path / "argv.log"
    wrapper = tmp_path / "cryptsetup"
    wrapper.write_text(f"#!/bin/sh\nprintf '%s\\0' \"$@\" >> {log}\nprintf '\\n' >> {log}\n"
                       f"env >> {log}\nexec {luks.CRYPTSETUP} \"$@\"\n")
    wrapper.chmod(0o700)
    monkeypatch.setattr(luks, "CRYPTSETUP", str(wrapper))
    v = _luks(tmp_path)
    key = os.urandom(32)
    v.format(key)
    assert v.test_key(key)                             # the real cryptsetup got the key: on stdin
    secret = bytes(volume_secret(key, "luks", "data"))
    recorded = log.read_bytes()
    assert b"--key-file=-" in recorded
    for form in (key, secret, key.hex().encode(), secret.hex().encode(), base64.b64encode(key),
                 base64.b64encode(secret)):
        assert form not in recorded
    for p in tmp_path.rglob("*"):                      # and in no file beside the image's header
        if p.is_file() and p.suffix != ".img":
            data = p.read_bytes()
            assert key not in data and secret not in data


@pytest.mark.skipif(not luks.device_mapper_available(),
                    reason="no device-mapper in this kernel (no 'device-mapper' in /proc/misc): "
                           "cryptsetup open/close and the mount cannot run here")
def test_luks_open_mount_lock(tmp_path):
    v = _luks(tmp_path, size=64)
    key = os.urandom(32)
    loopdev = subprocess.run(["losetup", "--find", "--show", str(v.device)], capture_output=True, text=True,
                             check=True).stdout.strip()
    v.device = Path(loopdev)
    try:
        v.init(key)
        assert v.status()["state"] == UNLOCKED
        (v.mountpoint / "file").write_text("x")
        v.lock()
        assert v.status()["state"] == LOCKED
        v.unlock(key)
        assert (v.mountpoint / "file").read_text() == "x"
        v.lock()
    finally:
        subprocess.run(["umount", str(v.mountpoint)], capture_output=True)
        subprocess.run([luks.CRYPTSETUP, "close", v.mapper], capture_output=True)
        subprocess.run(["losetup", "-d", loopdev], capture_output=True)


# --- the CLI, the control endpoint, the daemon ------------------------------------------------------

def cli(stack, *args, user=None):
    cmd = [str(VENV_BIN / "mailtresor"), "--config", str(stack.config_path), "volume", *args]
    if user:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--reset-env", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def create_key(stack, name):
    r = subprocess.run([str(VENV_BIN / "mailtresor-control"), "--config", str(stack.config_path), "keys",
                        "create", "t1", f"volume.{name}"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


@pytest.fixture
def vstack(tmp_path, disk):
    """A control endpoint (no daemon yet) and a configuration with one
    fscrypt volume of two directories on the loop image."""
    dirs = [disk.mountpoint / "spool", disk.mountpoint / "store"]
    for d in dirs:
        d.mkdir()
    s = Stack(tmp_path / "stack", {"volume": [{"name": "state", "directories": [str(d) for d in dirs]}]},
              milter=False)
    s.disk, s.vdirs = disk, dirs
    s.start_control()
    yield s
    s.close()


def test_cli_init_unlock_lock_status_and_the_audit_log(vstack):
    r = cli(vstack, "status")
    assert r.returncode == 1 and "uninitialised" in r.stdout
    r = cli(vstack, "init", "state")
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "cannot get its key volume.state" in r.stderr and "404" in r.stderr
    create_key(vstack, "state")
    r = cli(vstack, "init", "state")
    assert r.returncode == 0, r.stderr
    (vstack.vdirs[0] / "Secret-Name-Walrus").write_text("x")
    r = cli(vstack, "lock", "--all")
    assert r.returncode == 0 and "volume state: locked" in r.stdout
    r = cli(vstack, "status", "--json")
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert doc["volumes"][0]["state"] == "locked" and doc["volumes"][0]["kind"] == "fscrypt"
    assert "Secret-Name-Walrus" not in os.listdir(vstack.vdirs[0])
    r = cli(vstack, "unlock", "--all")
    assert r.returncode == 0 and "volume state: unlocked" in r.stdout, r.stderr
    assert (vstack.vdirs[0] / "Secret-Name-Walrus").read_text() == "x"
    r = cli(vstack, "unlock", "state")
    assert r.returncode == 0 and "already unlocked" in r.stdout
    r = cli(vstack, "status")
    assert r.returncode == 0 and "state" in r.stdout and "unlocked" in r.stdout
    r = cli(vstack, "unlock", "nosuch")
    assert r.returncode == 1 and "unknown volume 'nosuch' (configured: state)" in r.stderr
    # Every release is in the control endpoint's audit log (init + unlock).
    events = [json.loads(line) for line in vstack.cfg.control_server.audit_log.read_text().splitlines()]
    releases = [e for e in events if e["event"] == "release" and e["key"] == "volume.state"]
    assert len(releases) == 2 and all(e["appliance"] == "t1" and e["version"] == 1 for e in releases)
    # The key is in no file the appliance or the control endpoint wrote.
    key = vstack_key(vstack)
    for p in Path(vstack.dir).rglob("*"):
        if p.is_file() and not p.is_socket():
            assert key not in p.read_bytes(), p


def vstack_key(stack) -> bytes:
    from mailtresor.keys.client import ControlClient
    return ControlClient.from_config(stack.cfg).fetch_blocking("volume.state", 1).key


def test_cli_wrong_key_says_so_in_one_line(vstack):
    create_key(vstack, "state")
    # Encrypted with some other key than the control endpoint's volume.state.
    fs_volume("state", *vstack.vdirs).init(os.urandom(32))
    fs_volume("state", *vstack.vdirs).lock()
    r = cli(vstack, "unlock", "--all")
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("mailtresor: volume state: wrong key: the control endpoint's key volume.state")
    assert "Traceback" not in r.stderr


def test_cli_needs_root_and_unlock_all_without_volumes_is_fine(tmp_path):
    s = Stack(tmp_path / "stack", milter=False)
    try:
        r = cli(s, "unlock", "--all")
        assert r.returncode == 0 and "no volumes configured" in r.stdout
        r = cli(s, "status")
        assert r.returncode == 0 and "no volumes configured" in r.stdout
        # As an ordinary user (nobody) with a copy of the configuration it can read.
        import shutil
        import tempfile
        d = Path(tempfile.mkdtemp())
        try:
            os.chmod(d, 0o755)
            shutil.copy(s.config_path, d / "m.toml")
            os.chmod(d / "m.toml", 0o644)
            s.config_path = d / "m.toml"
            for action in ("unlock", "lock"):
                r = cli(s, action, "--all", user="65534")
                assert r.returncode == 1 and f"volume {action} must run as root" in r.stderr, r.stderr
                assert r.stderr.count("\n") == 1
        finally:
            shutil.rmtree(d)
    finally:
        s.close()


def test_daemon_refuses_to_start_on_a_locked_or_absent_volume(vstack):
    create_key(vstack, "state")
    assert cli(vstack, "init", "state").returncode == 0
    vstack.reconfigure({"spool": {"directory": str(vstack.vdirs[0] / "q")},
                        "archive": {"directory": str(vstack.vdirs[1] / "s"), "enabled": True}})
    assert cli(vstack, "lock", "--all").returncode == 0

    def start():
        p = subprocess.run([str(VENV_BIN / "mailtresord"), "--config", str(vstack.config_path)],
                           capture_output=True, text=True, timeout=60)
        return p.returncode, p.stdout + p.stderr

    rc, out = start()
    assert rc == 2 and "cannot start: volume state is locked" in out and "mailtresor volume unlock" in out
    assert out.count("\n") == 1
    # Absent: the file system is not mounted; the daemon must not write mail
    # into the empty mount point beneath.
    vstack.disk.umount()
    try:
        rc, out = start()
        assert rc == 2 and "volume state is absent" in out
        assert not (vstack.vdirs[0] / "q").exists() and not (vstack.vdirs[1] / "s").exists()
    finally:
        vstack.disk.mount()
    assert cli(vstack, "unlock", "--all").returncode == 0
    vstack.start_daemon()                               # READY=1 once unlocked
    assert vstack.stop_daemon() == 0


def test_units_order_the_unlock_before_the_daemon():
    from tests.test_packaging import PACKAGING, read_unit
    u = read_unit(PACKAGING / "mailtresor-unlock.service")
    assert u["Service.Type"] == ["oneshot"] and u["Service.RemainAfterExit"] == ["yes"]
    assert u["Service.ExecStart"] == ["/usr/bin/mailtresor --config /etc/mailtresor/mailtresor.toml volume unlock --all --wait 240"]
    assert u["Service.ExecStop"] == ["/usr/bin/mailtresor --config /etc/mailtresor/mailtresor.toml volume lock --all"]
    assert "mailtresor.service" in u["Unit.Before"] and "Service.User" not in u       # root
    d = read_unit(PACKAGING / "mailtresor.service")
    assert "mailtresor-unlock.service" in d["Unit.Requires"] and "mailtresor-unlock.service" in d["Unit.After"]
    assert "--name=mailtresor-unlock" in (REPO / "debian" / "rules").read_text()
    assert (REPO / "debian" / "mailtresor.mailtresor-unlock.service").read_bytes() == \
        (PACKAGING / "mailtresor-unlock.service").read_bytes()


def test_cli_unlock_waits_for_a_control_endpoint_that_comes_up_late(vstack):
    """At boot the control endpoint may start after the appliance:
    `unlock --wait` tries again (one line each time) and unlocks once it
    answers; without --wait it ends at once."""
    create_key(vstack, "state")
    assert cli(vstack, "init", "state").returncode == 0
    assert cli(vstack, "lock", "--all").returncode == 0
    vstack.stop_control()
    r = cli(vstack, "unlock", "--all")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "trying again" not in r.stderr
    cmd = [str(VENV_BIN / "mailtresor"), "--config", str(vstack.config_path), "volume", "unlock", "--all",
           "--wait", "60"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3)                       # it has failed and said so at least once by now
        assert p.poll() is None, p.communicate()
        vstack.start_control()
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert "volume state: unlocked" in out
    assert "trying again in" in err and "Traceback" not in err
    assert cli(vstack, "status").returncode == 0


def test_cli_unlock_does_not_wait_on_a_refusal(vstack):
    """--wait is for an endpoint that does not answer; a wrong key (or a
    403/404) is an answer, and ends the unlock at once."""
    create_key(vstack, "state")
    fs_volume("state", *vstack.vdirs).init(os.urandom(32))
    fs_volume("state", *vstack.vdirs).lock()
    r = subprocess.run([str(VENV_BIN / "mailtresor"), "--config", str(vstack.config_path), "volume", "unlock",
                        "--all", "--wait", "60"], capture_output=True, text=True, timeout=90)
    assert r.returncode == 1 and "wrong key" in r.stderr and "trying again" not in r.stderr
