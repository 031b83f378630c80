"""Run a private, throw-away Postfix instance for tests and benchmarks.

Standard library only.  Needs root and Debian's ``postfix`` package; the
system instance (``/etc/postfix``) does not have to be configured or running,
and several private instances can run at once (each with its own *workdir*
and port).

Layout under *workdir* (created on :meth:`PostfixInstance.start`)::

    etc/main.cf, etc/master.cf   config_directory (root, 0755)
    spool/                       queue_directory (root; Postfix creates the rest)
    data/                        data_directory (owned by ``postfix``, 0700)
    log/maillog                  maillog_file, written by postlogd

What the generated configuration does:

* ``smtpd`` listens on ``127.0.0.1:<smtpd_port>`` only; ``mynetworks`` is
  ``127.0.0.0/8`` so the test client may relay to any address.
* Every accepted message goes to the ``discard:`` transport (local, virtual,
  relay and default transports), so nothing is ever delivered anywhere.
  ``mydestination`` is empty, no alias maps, no local recipient checks.
* Every service in master.cf runs with ``chroot = n``.
* Logging goes to ``log/maillog`` through ``postlogd`` (``maillog_file``
  inside ``maillog_file_prefixes``), never to syslog.
* Queue-file durability is left at Postfix's defaults (cleanup fsyncs queue
  files before smtpd answers 250), so throughput numbers are honest.
* ``smtpd_milters`` / ``non_smtpd_milters`` / ``milter_default_action`` /
  ``milter_protocol`` are set from the constructor arguments.
* With ``tls_cert``/``tls_key`` smtpd offers STARTTLS
  (``smtpd_tls_security_level`` = ``tls_security_level``: ``may`` or
  ``encrypt``) and logs the negotiated protocol/cipher.

Traps (the first and third are handled here, the others are the caller's):

* the data directory (and a ``unix:`` milter socket) are reached by absolute
  path from processes running as ``postfix``; under a parent it cannot
  traverse, master dies with "open lock file .../data/master.lock: cannot
  open file: Permission denied".  :meth:`start` refuses such a *workdir*
  (pytest's ``tmp_path`` lives under ``/tmp/pytest-of-root``, mode 0700) --
  use :func:`make_workdir`.
* a ``unix:`` milter socket must be writable by the ``postfix`` user
  (libmilter creates it with the process umask, e.g. 0755), otherwise smtpd
  logs "connect to Milter service unix:...: Permission denied" and applies
  ``milter_default_action``.  Set ``os.umask(0o111)`` before
  ``Milter.runmilter()`` -- a chmod of the path races with runmilter(),
  which unlinks and re-creates the socket.
* ``postfix start`` prints nothing useful without a tty: on failure
  :meth:`start` raises with the tail of the maillog.
* Postfix spells milter sockets ``inet:127.0.0.1:PORT`` (libmilter/pymilter
  use ``inet:PORT@127.0.0.1``); the libmilter spelling makes smtpd die with
  "garbage after numerical service" and :meth:`start` times out.  A relative
  ``unix:milter/sock`` is resolved against ``queue_directory`` (smtpd's cwd).
* :meth:`start` probes smtpd with one connect/QUIT, which an attached milter
  sees as a connection without a transaction.

Example::

    from tests.harness.postfix import PostfixInstance, free_port, make_workdir

    with PostfixInstance(make_workdir(), free_port()) as pf:
        smtplib.SMTP("127.0.0.1", pf.smtpd_port).sendmail(...)
        pf.wait_for_log(r"/discard\\[\\d+\\]: \\w+: to=<.*status=sent")
"""

from __future__ import annotations

import os
import pathlib
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

__all__ = ["PostfixInstance", "PostfixError", "free_port", "make_workdir",
           "make_self_signed_cert"]

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"
SENDMAIL = "/usr/sbin/sendmail"
MAIL_OWNER = "postfix"

# Queue sub-directories that hold messages not yet delivered.
_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")

# name, type, private, unpriv, chroot, wakeup, maxproc, command
# (Debian's master.cf minus delivery agents we never use; chroot always n.)
_MASTER_CF = [
    ("pickup", "unix", "n", "-", "n", "60", "1", "pickup"),
    ("cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"),
    ("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"),
    ("tlsmgr", "unix", "-", "-", "n", "1000?", "1", "tlsmgr"),
    ("rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"),
    ("bounce", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("defer", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("trace", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("verify", "unix", "-", "-", "n", "-", "1", "verify"),
    ("flush", "unix", "n", "-", "n", "1000?", "0", "flush"),
    ("proxymap", "unix", "-", "-", "n", "-", "-", "proxymap"),
    ("proxywrite", "unix", "-", "-", "n", "-", "1", "proxymap"),
    ("showq", "unix", "n", "-", "n", "-", "-", "showq"),
    ("error", "unix", "-", "-", "n", "-", "-", "error"),
    ("retry", "unix", "-", "-", "n", "-", "-", "error"),
    ("discard", "unix", "-", "-", "n", "-", "-", "discard"),
    ("anvil", "unix", "-", "-", "n", "-", "1", "anvil"),
    ("scache", "unix", "-", "-", "n", "-", "1", "scache"),
    ("postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"),
]


class PostfixError(RuntimeError):
    """A Postfix command failed; the message includes the maillog tail."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_workdir(prefix: str = "mt-postfix-") -> pathlib.Path:
    """Create a fresh directory under /tmp that the ``postfix`` user can
    traverse (mode 0755).  The caller removes it (``shutil.rmtree``)."""
    path = pathlib.Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


def make_self_signed_cert(directory: pathlib.Path, common_name: str = "localhost",
                          days: int = 2) -> tuple[pathlib.Path, pathlib.Path]:
    """Write a throw-away RSA-2048 self-signed cert/key with the ``openssl``
    CLI (subjectAltName: *common_name* and IP 127.0.0.1, so a client can
    verify it with ``cafile=cert``); return ``(cert, key)``.  The key is mode 0600 (root-only is fine:
    smtpd reads it before dropping privileges)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256",
         "-days", str(days), "-subj", f"/CN={common_name}",
         "-addext", f"subjectAltName=DNS:{common_name},IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60)
    key.chmod(0o600)
    return cert, key


def _traversable_by(path: pathlib.Path, user: str) -> pathlib.Path | None:
    """Return the first ancestor of *path* that *user* cannot search, or None."""
    pw = pwd.getpwnam(user)
    for p in [*reversed(path.parents), path]:
        if not p.exists():  # created later by mkdir(parents=True), mode 0755
            break
        st = p.stat()
        if st.st_uid == pw.pw_uid:
            ok = st.st_mode & 0o100
        elif st.st_gid == pw.pw_gid:
            ok = st.st_mode & 0o010
        else:
            ok = st.st_mode & 0o001
        if not ok:
            return p
    return None


class PostfixInstance:
    """One private Postfix instance rooted at *workdir*.

    Nothing runs until :meth:`start`; use as a context manager to make sure
    :meth:`stop` runs.  ``extra_main_cf`` entries are written last and so
    override the generated settings, e.g. ``{"smtpd_forbid_bare_newline":
    "reject", "smtpd_forbid_bare_newline_exclusions": ""}`` -- the default
    exclusions are ``$mynetworks``, which contains the test client.

    ``local_header_rewrite_clients`` is empty, so SMTP clients on 127.0.0.1
    are treated like remote ones: Postfix neither qualifies header addresses
    nor adds Message-Id/Date/From (Postfix's default,
    ``permit_inet_interfaces``, would, because 127.0.0.1 is our interface).
    Mail submitted with :meth:`sendmail` is always rewritten.
    """

    def __init__(self, workdir: pathlib.Path, smtpd_port: int, *,
                 smtpd_milters: str | None = None,
                 non_smtpd_milters: str | None = None,
                 milter_default_action: str = "tempfail",
                 milter_protocol: int = 6,
                 tls_cert: pathlib.Path | None = None,
                 tls_key: pathlib.Path | None = None,
                 tls_security_level: str = "may",
                 extra_main_cf: dict[str, str] | None = None,
                 hostname: str = "mailtresor-test.localdomain") -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if tls_security_level not in ("may", "encrypt"):
            raise ValueError("tls_security_level must be 'may' or 'encrypt'")
        self.workdir = pathlib.Path(workdir).resolve()
        self.smtpd_port = int(smtpd_port)
        self.config_dir = self.workdir / "etc"
        self.queue_dir = self.workdir / "spool"
        self.data_dir = self.workdir / "data"
        self.log_file = self.workdir / "log" / "maillog"
        self.instance_name = f"postfix-mt{self.smtpd_port}"
        self.main_cf: dict[str, str] = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": MAIL_OWNER,
            "setgid_group": "postdrop",
            "multi_instance_name": self.instance_name,
            "syslog_name": self.instance_name,
            "maillog_file": str(self.log_file),
            "maillog_file_prefixes": str(self.log_file.parent),
            "myhostname": hostname,
            "mydomain": "localdomain",
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "relay_domains": "",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "local_header_rewrite_clients": "",
            "local_transport": "discard:",
            "virtual_transport": "discard:",
            "relay_transport": "discard:",
            "default_transport": "discard:",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "biff": "no",
            "milter_default_action": milter_default_action,
            "milter_protocol": str(milter_protocol),
        }
        if smtpd_milters:
            self.main_cf["smtpd_milters"] = smtpd_milters
        if non_smtpd_milters:
            self.main_cf["non_smtpd_milters"] = non_smtpd_milters
        if tls_cert is not None:
            self.main_cf.update({
                "smtpd_tls_cert_file": str(pathlib.Path(tls_cert).resolve()),
                "smtpd_tls_key_file": str(pathlib.Path(tls_key).resolve()),
                "smtpd_tls_security_level": tls_security_level,
                "smtpd_tls_loglevel": "1",
            })
        self.main_cf.update(extra_main_cf or {})
        self._master_pid: int | None = None

    # -- configuration ---------------------------------------------------

    def write_config(self) -> None:
        """(Re)write main.cf/master.cf and create the directory skeleton."""
        bad = _traversable_by(self.workdir.parent, MAIL_OWNER)
        if bad is not None:
            raise PostfixError(
                f"{bad} is not searchable by user {MAIL_OWNER!r}; Postfix "
                f"daemons could not reach {self.workdir} (use make_workdir())")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o755)
        for d in (self.config_dir, self.queue_dir, self.log_file.parent):
            d.mkdir(exist_ok=True)
            d.chmod(0o755)
        self.data_dir.mkdir(exist_ok=True)
        self.data_dir.chmod(0o700)
        shutil.chown(self.data_dir, MAIL_OWNER, MAIL_OWNER)
        main = "".join(f"{k} = {v}\n" for k, v in self.main_cf.items())
        (self.config_dir / "main.cf").write_text(main)
        rows = [(f"127.0.0.1:{self.smtpd_port}", "inet", "n", "-", "n", "-", "-",
                 "smtpd"), *_MASTER_CF]
        master = "".join("%-12s %-10s %-2s %-2s %-2s %-6s %-3s %s\n" % r for r in rows)
        (self.config_dir / "master.cf").write_text(master)

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAIL_")}
        env["MAIL_CONFIG"] = str(self.config_dir)
        return env

    def _postfix(self, *args: str, timeout: float = 60,
                 check: bool = True) -> subprocess.CompletedProcess:
        cp = subprocess.run([POSTFIX, "-c", str(self.config_dir), *args],
                            capture_output=True, text=True, timeout=timeout,
                            env=self._env(), stdin=subprocess.DEVNULL)
        if check and cp.returncode != 0:
            raise PostfixError(f"postfix {' '.join(args)} exited {cp.returncode}: "
                               f"{cp.stdout}{cp.stderr}\n--- maillog tail ---\n"
                               f"{self.maillog_tail()}")
        return cp

    def postconf(self, name: str) -> str:
        """Effective value of a main.cf parameter (``postconf -h``)."""
        return subprocess.run([POSTCONF, "-c", str(self.config_dir), "-h", name],
                              capture_output=True, text=True, check=True,
                              timeout=30).stdout.rstrip("\n")

    def check(self) -> str:
        """Run ``postfix check``; return its (warning) output."""
        cp = self._postfix("check")
        return cp.stdout + cp.stderr

    # -- lifecycle -------------------------------------------------------

    def master_pid(self) -> int | None:
        """PID of the running master daemon, or None."""
        try:
            pid = int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
            os.kill(pid, 0)
        except (FileNotFoundError, IndexError, ValueError, ProcessLookupError):
            return None
        return pid

    def start(self, timeout: float = 20) -> None:
        """Write the config, ``postfix start``, and return once smtpd
        answers ``220`` on the port.  Raises :class:`PostfixError` (with the
        maillog tail) otherwise."""
        if self.master_pid() is not None:
            raise PostfixError(f"an instance already runs in {self.workdir}")
        self.write_config()
        self._postfix("start", timeout=timeout + 30)
        self._master_pid = self.master_pid()
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.smtpd_port),
                                              timeout=5) as s:
                    s.settimeout(5)
                    banner = s.recv(512)
                    s.sendall(b"QUIT\r\n")
                if banner.startswith(b"220"):
                    return
                last = PostfixError(f"unexpected banner {banner!r}")
            except OSError as e:
                last = e
            time.sleep(0.1)
        self.stop()
        raise PostfixError(f"smtpd on 127.0.0.1:{self.smtpd_port} did not answer "
                           f"220 within {timeout}s ({last})\n--- maillog tail ---\n"
                           f"{self.maillog_tail()}")

    def reload(self, timeout: float = 20) -> None:
        """Rewrite main.cf from :attr:`main_cf`, ``postfix reload`` and wait
        for the master to log the reload.  New daemon processes use the new
        settings; sessions already running keep the old ones, and an idle
        old smtpd may still take a connection in the next moment."""
        offset = self.log_offset()
        self.write_config()
        self._postfix("reload")
        self.wait_for_log(r"/master\[\d+\]: reload -- version", timeout, start=offset)

    def stop(self, timeout: float = 20) -> None:
        """``postfix stop`` and wait until the master and all its children
        are gone.  Idempotent; a no-op if the instance never started."""
        pid = self.master_pid() or self._master_pid
        if self.master_pid() is not None:
            self._postfix("stop", timeout=timeout + 10, check=False)
        if pid is None:
            return
        # master runs setsid(); its children share its process group and
        # get SIGTERM when the master exits.  Wait for the whole group.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                self._master_pid = None
                return
            time.sleep(0.05)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._master_pid = None

    def __enter__(self) -> "PostfixInstance":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- observation -----------------------------------------------------

    def maillog(self) -> str:
        """The whole maillog so far ('' if none)."""
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def maillog_tail(self, lines: int = 40) -> str:
        return "\n".join(self.maillog().splitlines()[-lines:])

    def log_offset(self) -> int:
        """Current length of the maillog, for ``wait_for_log(..., start=)``."""
        return len(self.maillog())

    def wait_for_log(self, pattern: str, timeout: float = 20,
                     start: int = 0) -> re.Match:
        """Poll the maillog (from character offset *start*) until the regex
        *pattern* (``re.M``) matches; return the match or raise
        ``TimeoutError`` with the log tail."""
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.maillog(), start)
            if m:
                return m
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{pattern!r} not in maillog after {timeout}s"
                                   f"\n--- maillog tail ---\n{self.maillog_tail()}")
            time.sleep(0.05)

    def queue_is_empty(self) -> bool:
        """True if no message waits in maildrop/incoming/active/deferred/hold."""
        for q in _QUEUES:
            for _root, _dirs, files in os.walk(self.queue_dir / q):
                if files:
                    return False
        return True

    def wait_queue_empty(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not self.queue_is_empty():
            if time.monotonic() >= deadline:
                raise TimeoutError(f"queue not empty after {timeout}s"
                                   f"\n--- maillog tail ---\n{self.maillog_tail()}")
            time.sleep(0.05)

    # -- injection -------------------------------------------------------

    def sendmail(self, sender: str, recipients: list[str], data: bytes,
                 timeout: float = 30) -> None:
        """Submit *data* through Postfix's own ``sendmail -C <config_dir>``
        (postdrop -> maildrop -> pickup -> cleanup, i.e. the
        ``non_smtpd_milters`` path).  ``-i``: a lone "." line is data.
        Raises ``subprocess.CalledProcessError`` on failure."""
        if not recipients:
            raise ValueError("at least one recipient")
        subprocess.run([SENDMAIL, "-C", str(self.config_dir), "-i", "-f", sender,
                        "--", *recipients], input=data, capture_output=True,
                       check=True, timeout=timeout, env=self._env())
