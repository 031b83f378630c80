"""Parser children hold nothing worth stealing, and leave nothing behind
(issue 12, parts 3 and 4).

A parser child reads attacker-controlled bytes (poppler, zip, XML).  Here a
real child -- started the way the daemon starts one (parseworker.command's
interpreter, spawn_args(): environment, working directory, process group)
and set up by parseworker.setup(), the very function its main() runs before
the first message -- runs attacker code: it tries to open a control client
key, a spool entry and a store file, to connect to a unix socket, an
abstract unix socket and a TCP listener the test opened, to read its
parent's environment, to trace it and to signal it.  Every try fails.  The
same code without setup() succeeds, so the test would notice confinement
going away.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mailtresor.archive import confine, parse, parseworker
from tests.harness import hostile

pytestmark = pytest.mark.skipif(confine.landlock_abi() < 6 or not confine.seccomp_available(),
                                reason="needs Landlock ABI >= 6 and python3-seccomp (this machine has both)")

ATTACK = r"""
import ctypes, json, os, socket, sys
args = json.loads(sys.argv[1])
if args["confine"]:
    from mailtresor.archive import parseworker
    parseworker.setup([])
res = {}
for name, path in args["files"].items():
    try:
        with open(path, "rb") as f:
            res[name] = "read " + f.read().decode()
    except OSError as e:
        res[name] = type(e).__name__
def attempt(name, fn):
    try:
        fn()
        res[name] = "ok"
    except OSError as e:
        res[name] = type(e).__name__
def unix():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.settimeout(2); s.connect(args["unix"])
def abstract():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.settimeout(2); s.connect("\0" + args["abstract"])
def tcp():
    socket.create_connection(("127.0.0.1", args["tcp"]), timeout=2)
def environ():
    open(f"/proc/{os.getppid()}/environ", "rb").read()
def signal_parent():
    os.kill(os.getppid(), 0)
def trace_parent():
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.ptrace(0x4206, os.getppid(), None, None) != 0:   # PTRACE_SEIZE: stops nothing
        raise OSError(ctypes.get_errno(), "ptrace")
    libc.ptrace(17, os.getppid(), None, None)                # PTRACE_DETACH
for name, fn in [("unix", unix), ("abstract", abstract), ("tcp", tcp), ("environ", environ),
                 ("signal", signal_parent), ("ptrace", trace_parent)]:
    attempt(name, fn)
from mailtresor.archive import parse
res["parse"] = parse.parse_message(args["message"].encode()).attachments[0].text
print(json.dumps(res))
"""


def _secrets(tmp_path: Path) -> dict[str, str]:
    files = {"client_key": tmp_path / "etc/mailtresor/tls/appliance.key",
             "spool": tmp_path / "var/spool/mailtresor/new/0001.msg",
             "store": tmp_path / "var/lib/mailtresor/store/acme/2026-12/lmdb/data.mdb"}
    for name, p in files.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"secret {name}")
        p.chmod(0o600)          # readable by this uid: only confinement stands in the way
    return {k: str(v) for k, v in files.items()}


def _attack(tmp_path: Path, confined: bool) -> tuple[dict, list[socket.socket]]:
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(tmp_path / "query.sock"))
    unix.listen(5)
    abstract_name = f"mailtresor-test-{os.getpid()}-{confined}"
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind("\0" + abstract_name)
    abstract.listen(5)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(5)
    pdf = hostile.pdf(1, b"BT /F1 18 Tf 72 700 Td (Quarterly 7731) Tj ET")
    args = {"confine": confined, "files": _secrets(tmp_path), "unix": str(tmp_path / "query.sock"),
            "abstract": abstract_name, "tcp": tcp.getsockname()[1],
            "message": hostile.mixed("pdf", [hostile.attachment(pdf, "application/pdf", "q.pdf")]).decode()}
    cmd = parseworker.command()[:1] + ["-c", ATTACK, json.dumps(args)]
    r = subprocess.run(cmd, capture_output=True, timeout=60, **parseworker.spawn_args())
    assert r.returncode == 0, r.stderr.decode()
    return json.loads(r.stdout), [unix, abstract, tcp]


def _accepted(listeners: list[socket.socket]) -> int:
    n = 0
    for s in listeners:
        s.setblocking(False)
        try:
            s.accept()[0].close()
            n += 1
        except BlockingIOError:
            pass
        s.close()
    return n


def test_a_confined_parser_reaches_no_key_spool_store_socket_or_parent(tmp_path):
    res, listeners = _attack(tmp_path, confined=True)
    assert res["client_key"] == res["spool"] == res["store"] == "PermissionError", res
    assert res["unix"] == res["abstract"] == res["tcp"] == "PermissionError", res   # socket(): EPERM
    assert res["environ"] == "PermissionError", res
    assert res["signal"] == "PermissionError" and res["ptrace"] == "PermissionError", res
    assert _accepted(listeners) == 0
    # and it still does its work: Python, the package, pdftotext
    assert res["parse"] == "Quarterly 7731"


def test_the_same_attack_unconfined_succeeds(tmp_path):
    """The control: without setup() every try above works, so the test
    above fails if confinement is ever lost."""
    res, listeners = _attack(tmp_path, confined=False)
    assert res["client_key"] == "read secret client_key" and res["spool"] == "read secret spool"
    assert res["store"] == "read secret store"
    assert res["unix"] == res["abstract"] == res["tcp"] == "ok", res
    assert res["environ"] == "ok" and res["signal"] == "ok", res
    assert _accepted(listeners) == 3


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def test_the_daemons_parser_children_are_confined_with_a_minimal_environment(monkeypatch):
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/mailtresor.service")
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("MAILTRESOR_CONFIG", "/etc/mailtresor/mailtresor.toml")
    pool = parseworker.ParserPool(1, parse.Limits(max_text=12345))
    try:
        d = parseworker.wait(pool.submit(hostile.ordinary("confined")), 60)
        assert "confined" in d["parsed"].body_text
        (pid,) = pool.pids()
        st = _status(pid)
        assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        names = {e.split(b"=", 1)[0].decode() for e in env if e}
        assert names == set(confine.child_env("").keys())
        assert os.getpgid(pid) == pid                 # a process group of its own
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert json.loads(cmdline[cmdline.index(b"--limits") + 1])["max_text"] == 12345
    finally:
        pool.close()


def _children(pid: int, comm: str) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if ppid == pid and name == comm:
            out.append(int(p.name))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def test_no_pdftotext_survives_a_killed_parser():
    """Kill the parser child while pdftotext works on a hostile PDF (with a
    budget that would let it run for a minute): pdftotext goes too."""
    pool = parseworker.ParserPool(1, parse.Limits(cpu_seconds=60))
    try:
        # quiet: it writes nothing while it works, so no SIGPIPE would end it either
        fut = pool.submit(hostile.pdf_busy(pages=2000, quiet=True))
        (child,) = pool.pids()
        deadline = time.monotonic() + 20
        while not (kids := _children(child, "pdftotext")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert kids, "pdftotext never started"
        os.kill(child, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(_alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(k) for k in kids), "pdftotext outlived its parser"
        with pytest.raises(parseworker.ParserDied):
            parseworker.wait(fut, 10)
    finally:
        pool.close()


def test_an_extractor_is_killed_with_its_whole_process_group():
    """The timeout kills the group: what the extractor started goes too."""
    started = time.monotonic()
    status, out, cut = parse.run_extractor(["sh", "-c", "sleep 60 & echo $!; wait"], b"", 1.0, 1000)
    assert cut and status is None
    grandchild = int(out.split()[0])
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)
    assert time.monotonic() - started < 30


def test_an_extractor_runs_with_cpu_memory_and_core_limits():
    status, out, cut = parse.run_extractor(["sh", "-c", "ulimit -t; ulimit -v; ulimit -c"], b"", 3.0, 1000)
    assert status == 0 and not cut
    cpu, mem, core = out.decode().split()
    assert cpu == "3" and int(mem) * 1024 == parse.EXTRACTOR_MAX_MEMORY and core == "0"


def _effective_filter(unit: Path) -> set[str]:
    """The system calls a unit's SystemCallFilter= lines allow, in order
    (the first line an allow list, later ~lines taking away, later plain
    lines adding), groups expanded by systemd-analyze."""
    def expand(words: list[str]) -> set[str]:
        out = set()
        for w in words:
            if w.startswith("@"):
                r = subprocess.run(["systemd-analyze", "syscall-filter", w], capture_output=True,
                                   text=True, check=True)
                out |= expand([x.strip() for x in r.stdout.splitlines()[1:]
                               if x.strip() and not x.strip().startswith("#")])
            else:
                out.add(w)
        return out
    allowed: set[str] = set()
    for line in unit.read_text().splitlines():
        if line.startswith("SystemCallFilter="):
            value = line.split("=", 1)[1]
            if value.startswith("~"):
                allowed -= expand(value[1:].split())
            else:
                allowed |= expand(value.split())
    return allowed


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing (DEV_DEBS)")
def test_the_packaged_unit_lets_parsers_confine_themselves():
    unit = Path(__file__).resolve().parent.parent / "packaging/mailtresor.service"
    text = unit.read_text()
    assert "NoNewPrivileges=yes" in text       # what Landlock and seccomp need anyway
    allowed = _effective_filter(unit)
    needed = {"landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self", "seccomp",
              "prctl", "prlimit64", "setpgid", "kill", "execve", "wait4", "pipe2"}
    assert needed <= allowed, needed - allowed


def test_without_landlock_the_child_goes_on_and_says_so():
    """An old kernel: the child parses on, seccomp still applied, and says
    on stderr (the daemon's journal) what it lacks."""
    code = ("from mailtresor.archive import confine, parseworker, parse\n"
            "confine.landlock_abi = lambda: 0\n"
            "parseworker.setup([])\n"
            "import socket\n"
            "try:\n    socket.socket()\n    print('socket ok')\nexcept OSError:\n    print('socket denied')\n"
            "print(parse.parse_message(b'Subject: x\\r\\n\\r\\nstill parsing\\r\\n').body_text)\n")
    r = subprocess.run(parseworker.command()[:1] + ["-c", code], capture_output=True, timeout=60,
                       **parseworker.spawn_args())
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().split("\n")[:2] == ["socket denied", "still parsing"]
    assert "running without Landlock (file system confinement)" in r.stderr.decode()


def test_the_daemon_logs_missing_confinement_once(monkeypatch, caplog):
    monkeypatch.setattr(parseworker, "_reported", False)
    monkeypatch.setattr(confine, "probe", lambda: ["Landlock (file system confinement)"])
    pool = parseworker.ParserPool(2)
    try:
        with caplog.at_level("ERROR", logger="mailtresor.archive.parseworker"):
            for word in ("one", "two"):
                assert word in parseworker.wait(pool.submit(hostile.ordinary(word)), 60)["parsed"].body_text
        errors = [r for r in caplog.records if "WITHOUT Landlock" in r.getMessage()]
        assert len(errors) == 1
    finally:
        pool.close()


def test_an_extractor_started_from_a_threaded_process_has_the_same_limits():
    """With other threads running (the daemon with parse_processes = 0) the
    limits come from setpriv and prlimit, not from code run after fork."""
    import threading
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        status, out, cut = parse.run_extractor(
            ["sh", "-c", "ulimit -t; ulimit -v; ulimit -c"],
            b"", 3.0, 10000)
        assert status == 0 and not cut, out
        cpu, mem, core = out.decode().split()
        assert cpu == "3" and int(mem) * 1024 == parse.EXTRACTOR_MAX_MEMORY and core == "0"
        pdf = hostile.pdf(1, b"BT /F1 18 Tf 72 700 Td (Threaded 4411) Tj ET")
        assert parse.pdf_text(pdf, []).strip() == "Threaded 4411"
    finally:
        stop.set()
        t.join()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing (DEV_DEBS)")
def test_a_parser_confines_itself_under_the_units_system_call_filter():
    """systemd is not PID 1 here: apply the unit's SystemCallFilter= (its
    effective allow list, EPERM for the rest, as SystemCallErrorNumber= says)
    with libseccomp to a child, then run the parser's setup() in it: all of
    the confinement applies, and it still parses a PDF through pdftotext."""
    unit = Path(__file__).resolve().parent.parent / "packaging/mailtresor.service"
    assert "SystemCallErrorNumber=EPERM" in unit.read_text()
    allowed = sorted(_effective_filter(unit))
    pdf = hostile.pdf(1, b"BT /F1 18 Tf 72 700 Td (Unit 5150) Tj ET")
    message = hostile.mixed("pdf", [hostile.attachment(pdf, "application/pdf", "u.pdf")]).decode()
    code = r"""
import ctypes, errno, json, sys, seccomp
allowed, message = json.loads(sys.argv[1])
ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)                    # NoNewPrivileges=yes
f = seccomp.SyscallFilter(defaction=seccomp.ERRNO(errno.EPERM))
for name in allowed:
    try:
        f.add_rule(seccomp.ALLOW, name)
    except Exception:
        pass                                               # a name this libseccomp does not know
f.load()
from mailtresor.archive import confine, parse, parseworker
missing = confine.confine()
print(json.dumps({"missing": missing, "text": parse.parse_message(message.encode()).attachments[0].text}))
"""
    r = subprocess.run(parseworker.command()[:1] + ["-c", code, json.dumps([allowed, message])],
                       capture_output=True, timeout=60, **parseworker.spawn_args())
    assert r.returncode == 0, r.stderr.decode()
    res = json.loads(r.stdout)
    assert res == {"missing": [], "text": "Unit 5150"}, res
