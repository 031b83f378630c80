"""A real OpenSSH server as an SFTP backup target, for one test.

    target = Sshd().start()        # sshd -f CONFIG -D -e on 127.0.0.1:PORT
    target.url                     # sftp://nobody@127.0.0.1:PORT/backup
    target.known_hosts, target.identity
    target.files()                 # what the target holds: {relative path: bytes}
    target.stop(); target.start()  # the target down and back (same port, same key)
    target.close()

The account is set up the way docs/BACKUP.md tells an admin to: an
unprivileged user (here the system's `nobody`, so the test adds no user to
the machine) chrooted into a root-owned directory (`ChrootDirectory`),
`ForceCommand internal-sftp` (no shell, no forwarding), key-only
authentication from a test AuthorizedKeysFile, and a host key of its own
that the client pins in a known_hosts file.

The directory lives under /run, not the test's tmp_path: sshd refuses a
chroot any of whose path components is writable by others than root, and
/tmp is 1777.  Needs root (sshd binds, chroots and changes user); the
fixture skips elsewhere.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .stack import free_port

SSHD = "/usr/sbin/sshd"
USER = "nobody"


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(path)],
                   check=True, timeout=30, stdin=subprocess.DEVNULL)
    return path.with_suffix(".pub").read_text().split()[:2]


class Sshd:
    def __init__(self, user: str = USER):
        self.user = user
        pw = pwd.getpwnam(user)
        self.dir = Path(tempfile.mkdtemp(prefix="mt-sshd.", dir="/run"))
        os.chmod(self.dir, 0o755)            # sshd (as the user) reads the AuthorizedKeysFile
        self.port = free_port()
        self.host_key = self.dir / "host_key"
        kind, blob = _keygen(self.host_key)
        self.host_public = f"{kind} {blob}"
        self.identity = self.dir / "client_key"
        ckind, cblob = _keygen(self.identity)
        self.authorized_keys = self.dir / "authorized_keys"
        self.authorized_keys.write_text(f"{ckind} {cblob}\n")
        os.chmod(self.authorized_keys, 0o644)
        self.known_hosts = self.dir / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {self.host_public}\n")
        self.chroot = self.dir / "chroot"
        self.chroot.mkdir(mode=0o755)
        self.root = self.chroot / "backup"    # what the target holds, seen from here
        self.root.mkdir(mode=0o700)
        os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self.config = self.dir / "sshd_config"
        self.config.write_text(f"""\
ListenAddress 127.0.0.1:{self.port}
HostKey {self.host_key}
PidFile none
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
AuthenticationMethods publickey
AuthorizedKeysFile {self.authorized_keys}
StrictModes no
PermitRootLogin no
AllowUsers {user}
Subsystem sftp internal-sftp
ChrootDirectory {self.chroot}
ForceCommand internal-sftp
AllowTcpForwarding no
AllowAgentForwarding no
X11Forwarding no
PermitTunnel no
LoginGraceTime 20
LogLevel VERBOSE
""")
        self.log_path = self.dir / "sshd.log"
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"sftp://{self.user}@127.0.0.1:{self.port}/backup"

    def start(self, timeout: float = 10.0) -> "Sshd":
        # The privilege separation directory, made at boot by the package's
        # tmpfiles.d on a real system; a container may lack it.
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        subprocess.run([SSHD, "-t", "-f", str(self.config)], check=True, timeout=30, capture_output=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([SSHD, "-f", str(self.config), "-D", "-e"], stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited ({self.proc.returncode}): {self.log()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"sshd not listening after {timeout} s: {self.log()[-2000:]}")
                time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        # Sessions forked before the stop are children of their own: ended
        # by the terminate above only for the listener.  Wait until the
        # port no longer answers so "down" means down.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                time.sleep(0.05)
            except OSError:
                return

    def pause(self) -> None:
        """SIGSTOP the listener: a hung target (the kernel still accepts
        connections into the backlog; nothing answers)."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.resume()
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def files(self) -> dict[str, bytes]:
        """Every file the target holds under its backup directory."""
        return {str(p.relative_to(self.root)): p.read_bytes() for p in sorted(self.root.rglob("*")) if p.is_file()}
