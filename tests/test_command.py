"""The `mailtresor` command itself (daemon/bin/mailtresor.c), against a
stand-in for the daemon's query socket.

The command hands `search` and `show` to the daemon and runs the Python
command for everything else.  Here a build of it of the test's own (its
default configuration file and runtime directory inside the test's
directory, and a stand-in for Python that prints how it was run) talks to
a listener that records each request and sends back frames chosen by the
test: which socket it finds for which configuration file, what it sends,
how it copies the answer, and when it leaves the command to Python.  The
real daemon answering the installed command is tests/test_query.py.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
from pathlib import Path

import pytest

import mailtresor
from mailtresor import config, query
from mailtresor.query import frame
from tests.conftest import REPO

SOURCE = REPO / "daemon" / "bin" / "mailtresor.c"
FALLBACK_EXIT = 42


HIT = frame(b"o", b"hit\n") + frame(b"x", b"0")


class FakeDaemon:
    """A listener on a query socket: records each request, sends `answer`."""

    def __init__(self, path: Path, answer: bytes = HIT):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.answer, self.requests = path, answer, []
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.sock.settimeout(0.1)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                c, _ = self.sock.accept()
            except socket.timeout:
                continue
            with c:
                c.settimeout(10)
                data = b""
                try:
                    while len(data) < 8 or len(data) < 8 + int.from_bytes(data[4:8], "big"):
                        chunk = c.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    self.requests.append(data)
                    c.sendall(self.answer)
                except OSError:
                    pass                        # the command closed: what the test checks

    def close(self):
        self.stop.set()
        self.thread.join(10)
        self.sock.close()
        self.path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    top = tmp_path_factory.mktemp("command")
    python = top / "python"
    python.write_text(f'#!/bin/sh\nfor a in "$@"; do printf "python:%s\\n" "$a"; done\nexit {FALLBACK_EXIT}\n')
    python.chmod(0o755)
    (top / "default.toml").write_text("")           # the default socket, then
    exe = top / "mailtresor"
    subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-Werror",
                    f'-DMAILTRESOR_PYTHON="{python}"',
                    f'-DCONFIG_PATH="{top / "default.toml"}"',
                    f'-DRUNTIME_DIRECTORY="{top / "default-run"}"',
                    "-o", str(exe), str(SOURCE)], check=True, capture_output=True, timeout=120)
    return exe


@pytest.fixture
def daemons(build, tmp_path):
    """The stand-in at the test build's default socket, and one at tmp_path/srv-run."""
    default = FakeDaemon(build.parent / "default-run" / "query.sock")
    other = FakeDaemon(tmp_path / "srv-run" / "query.sock")
    try:
        yield default, other
    finally:
        default.close()
        other.close()


def run(build: Path, *args, env: dict | None = None, cwd=None, **kw) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in (query.NO_DAEMON_ENV_VAR, mailtresor.CONFIG_ENV_VAR)}
    e.update(env or {})
    return subprocess.run([str(build), *args], env=e, cwd=cwd, capture_output=True, timeout=60, **kw)


def ran_python(p: subprocess.CompletedProcess, *args: str) -> bool:
    """Whether the command handed over to Python, with these arguments."""
    want = "".join(f"python:{a}\n" for a in ("-I", "-m", "mailtresor", *args))
    return p.returncode == FALLBACK_EXIT and p.stdout.decode() == want and p.stderr == b""


def test_the_names_agree_with_the_python_package():
    src = SOURCE.read_text()
    strings = dict(re.findall(r'^#define (\w+) "([^"]*)"', src, re.M))
    chars = dict(re.findall(r"^#define (\w+) '(.)'", src, re.M))
    assert strings["CONFIG_PATH"] == mailtresor.CONFIG_PATH == str(config.DEFAULT_PATH)
    assert strings["RUNTIME_DIRECTORY"] == mailtresor.RUNTIME_DIRECTORY
    assert strings["CONFIG_ENV_VAR"] == mailtresor.CONFIG_ENV_VAR
    assert strings["MAILTRESOR_PYTHON"] == "/usr/bin/python3"
    assert strings["SOCKET_NAME"] == query.SOCKET_NAME
    assert strings["NO_DAEMON_ENV_VAR"] == query.NO_DAEMON_ENV_VAR
    assert strings["MAGIC"].encode() == query.MAGIC
    assert (chars["FRAME_OUT"], chars["FRAME_ERR"], chars["FRAME_EXIT"], chars["FRAME_DECLINE"]) \
        == tuple(k.decode() for k in (query.OUT, query.ERR, query.EXIT, query.DECLINE))
    served = re.search(r"served\[\] = \{ (.*), NULL \};", src).group(1)
    assert tuple(s.strip('"') for s in served.split(", ")) == query.SERVED


# Where the socket is, by the configuration file's [appliance]
# runtime_directory: "default" (the build's default directory), "srv" (the
# one the text names), or None: written in a way the scan does not read,
# so no guess and the Python command runs.
SCANS = [
    ("", "default"),
    ('[appliance]\nname = "a"\n', "default"),
    ('[appliance]\nruntime_directory = "{srv}"\n', "srv"),
    ("[appliance]\nruntime_directory = '{srv}'   # ours\n", "srv"),
    ('[appliance]  # this box\n  runtime_directory="{srv}"\n', "srv"),
    ('[appliance]\r\nruntime_directory = "{srv}"\r\n', "srv"),
    ('[spool]\nruntime_directory = "/elsewhere"\n[appliance]\nname = "a"\n', "default"),
    ('[appliance]\nruntime_directory = "{srv}"\n[spool]\nruntime_directory = "/elsewhere"\n', "srv"),
    ('[appliance]\nruntime_directory_x = "/x"\n', "default"),
    ('[appliance.x]\nruntime_directory = "/x"\n', "default"),
    ('[appliance]\nruntime_directory = "{srv}\\u0072"\n', None),
    ('[appliance]\nruntime_directory = """{srv}"""\n', None),
    ('[appliance]\nruntime_directory = "{srv}"\nruntime_directory = "/b"\n', None),
    ('[appliance]\nruntime_directory = {srv}\n', None),
    ('[appliance]\nruntime_directory = "{srv}" x\n', None),
    ('[appliance]\nruntime_directory = ""\n', None),
    ('[appliance]\nruntime_directory = "{srv}\n', None),
    ('[appliance]\nname = "a\0"\n', None),
]


@pytest.mark.parametrize("text, where", SCANS, ids=lambda x: repr(x)[:50] if isinstance(x, str) else str(x))
def test_the_socket_is_found_through_the_configuration_or_not_at_all(build, daemons, tmp_path, text, where):
    default, srv = daemons
    cfg = tmp_path / "c.toml"
    cfg.write_text(text.replace("{srv}", str(srv.path.parent)))
    p = run(build, "--config", str(cfg), "search", "--tenant", "acme", "x")
    asked = {"default": default, "srv": srv}.get(where)
    if asked is None:
        assert ran_python(p, "--config", str(cfg), "search", "--tenant", "acme", "x"), p
        assert default.requests == srv.requests == []
    else:
        assert (p.returncode, p.stdout, p.stderr) == (0, b"hit\n", b"")
        assert [d for d in (default, srv) if d.requests] == [asked]


def test_a_relative_runtime_directory_is_relative_to_the_current_one(build, daemons, tmp_path):
    _, srv = daemons
    cfg = tmp_path / "c.toml"
    cfg.write_text('[appliance]\nruntime_directory = "srv-run"\n')
    p = run(build, "--config", "c.toml", "show", "--tenant", "acme", "1234", cwd=tmp_path)
    assert (p.returncode, p.stdout) == (0, b"hit\n") and len(srv.requests) == 1


@pytest.mark.parametrize("name", ["mailtresor.toml", "dev.toml"])
def test_the_scan_agrees_with_the_configuration_loader_on_the_shipped_files(build, daemons, tmp_path, name):
    """Run from a directory where the file's runtime directory is the stand-in's."""
    default, _ = daemons
    path = REPO / "conf" / name
    where = config.load(path).appliance.runtime_directory
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    if where.is_absolute():
        # The test build's own default stands for /run/mailtresor.
        text = path.read_text().replace(f'"{where}"', f'"{default.path.parent}"')
        assert text != path.read_text()
        path = tmp_path / name
        path.write_text(text)
        answered_by = default
    else:
        answered_by = FakeDaemon(cwd / where / "query.sock")
    try:
        p = run(build, "--config", str(path), "search", "--tenant", "acme", "x", cwd=cwd)
        assert (p.returncode, p.stdout) == (0, b"hit\n") and len(answered_by.requests) == 1
    finally:
        if answered_by is not default:
            answered_by.close()


def test_the_request_is_the_configuration_files_real_path_and_the_command_line(build, daemons, tmp_path):
    default, _ = daemons
    (tmp_path / "real.toml").write_text("")
    (tmp_path / "link.toml").symlink_to("real.toml")
    args = ["search", "--tenant", "acme", "--json", "subject:\"two words\"", "", "ünï", os.fsdecode(b"\xff\xfe")]
    p = run(build, f"--config={tmp_path / 'link.toml'}", *args)
    assert p.returncode == 0
    assert default.requests == [query.encode_request(str(tmp_path / "real.toml"), args)]
    assert query.decode_request(default.requests[0][8:]) == (str(tmp_path / "real.toml"), args)


def test_the_configuration_file_comes_from_the_option_the_variable_or_the_default(build, daemons, tmp_path):
    default, _ = daemons
    for f in ("option.toml", "variable.toml"):
        (tmp_path / f).write_text("")
    env = {mailtresor.CONFIG_ENV_VAR: str(tmp_path / "variable.toml")}
    run(build, "--config", str(tmp_path / "option.toml"), "show", "--tenant", "t", "i", env=env)
    run(build, "show", "--tenant", "t", "i", env=env)
    run(build, "--config=", "show", "--tenant", "t", "i", env={mailtresor.CONFIG_ENV_VAR: ""})
    got = [query.decode_request(r[8:])[0] for r in default.requests]
    assert got == [str(tmp_path / "option.toml"), str(tmp_path / "variable.toml"), str(build.parent / "default.toml")]


def test_no_configuration_file_means_python_says_so(build, daemons, tmp_path):
    missing = str(tmp_path / "missing.toml")
    p = run(build, "--config", missing, "search", "--tenant", "acme", "x")
    assert ran_python(p, "--config", missing, "search", "--tenant", "acme", "x")
    assert all(not d.requests for d in daemons)


@pytest.mark.parametrize("args", [
    [],
    ["--help"],
    ["status", "--json"],
    ["verify", "--tenant", "acme"],
    ["search", "--help"],
    ["show", "--tenant", "acme", "-h"],
    ["--config"],                                     # usage error: Python says it
    ["--verbose", "search", "x"],                     # an option the command does not know
])
def test_other_commands_and_help_are_pythons(build, daemons, args):
    p = run(build, *args)
    assert ran_python(p, *args), p
    assert all(not d.requests for d in daemons)


def test_the_variable_keeps_the_command_from_asking(build, daemons):
    p = run(build, "search", "--tenant", "acme", "x", env={query.NO_DAEMON_ENV_VAR: "1"})
    assert ran_python(p, "search", "--tenant", "acme", "x")
    p = run(build, "search", "--tenant", "acme", "x", env={query.NO_DAEMON_ENV_VAR: ""})
    assert p.stdout == b"hit\n" and len(daemons[0].requests) == 1


def _with_answer(daemon: FakeDaemon, answer: bytes) -> None:
    daemon.answer = answer


def test_the_answer_is_copied_to_stdout_stderr_and_the_exit_code(build, daemons):
    big = os.urandom(3 << 20)                           # more than any one read
    _with_answer(daemons[0], frame(b"e", b"note 1\n") + frame(b"o", big[:100]) + frame(b"o", b"")
                 + frame(b"o", big[100:]) + frame(b"e", b"note 2\n") + frame(b"x", b"3"))
    p = run(build, "search", "--tenant", "acme", "x")
    assert (p.returncode, p.stderr) == (3, b"note 1\nnote 2\n") and p.stdout == big


@pytest.mark.parametrize("code", [b"0", b"1", b"2", b"130", b"255"])
def test_exit_codes(build, daemons, code):
    _with_answer(daemons[0], frame(b"x", code))
    assert run(build, "show", "--tenant", "acme", "i").returncode == int(code)


@pytest.mark.parametrize("answer", [
    frame(b"d", b"another configuration file"),
    b"",                                                # closed without a word (a refused peer, a full request)
    b"o\0\0",                                           # cut off in the first frame's head
])
def test_declined_or_unanswered_before_any_output_the_command_runs_itself(build, daemons, answer):
    _with_answer(daemons[0], answer)
    p = run(build, "search", "--tenant", "acme", "x")
    assert ran_python(p, "search", "--tenant", "acme", "x"), p
    assert len(daemons[0].requests) == 1


@pytest.mark.parametrize("answer", [
    frame(b"o", b"partial\n"),                          # closed with no exit frame
    frame(b"o", b"partial\n") + b"o\0\0\0\x10short",   # cut off in a frame
    frame(b"o", b"partial\n") + frame(b"d", b"late"),  # a decline after output
    frame(b"o", b"partial\n") + frame(b"?", b"what"),  # an unknown frame
    frame(b"o", b"partial\n") + frame(b"x", b"abc"),
    frame(b"o", b"partial\n") + frame(b"x", b"256"),
    frame(b"o", b"partial\n") + frame(b"x", b"-1"),
    frame(b"o", b"partial\n") + frame(b"x", b""),
])
def test_an_answer_broken_after_output_is_an_error_not_a_second_run(build, daemons, answer):
    _with_answer(daemons[0], answer)
    p = run(build, "search", "--tenant", "acme", "x")
    assert (p.returncode, p.stdout, p.stderr) == (1, b"partial\n", b"mailtresor: the daemon stopped answering half way\n")


def test_a_closed_stdout_ends_the_command_quietly(build, daemons):
    """As `mailtresor search ... | head` does with the Python command."""
    _with_answer(daemons[0], frame(b"o", b"x" * (4 << 20)) + frame(b"x", b"0"))
    r, w = os.pipe()
    os.close(r)
    env = {k: v for k, v in os.environ.items() if k != query.NO_DAEMON_ENV_VAR}
    try:
        p = subprocess.run([str(build), "search", "--tenant", "acme", "x"], env=env, stdout=w,
                           stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(w)
    assert (p.returncode, p.stderr) == (0, b"")
    assert len(daemons[0].requests) == 1


def test_a_socket_path_too_long_for_unix_sockets_means_python(build, daemons, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[appliance]\nruntime_directory = "/{"d" * 120}"\n')
    p = run(build, "--config", str(cfg), "search", "x")
    assert ran_python(p, "--config", str(cfg), "search", "x")


def test_a_listener_gone_means_python(build, daemons):
    default, _ = daemons
    default.close()                                     # the socket file is gone
    p = run(build, "search", "--tenant", "acme", "x")
    assert ran_python(p, "search", "--tenant", "acme", "x")
    stale = socket.socket(socket.AF_UNIX)               # a socket file nobody listens on
    stale.bind(str(default.path))
    stale.close()
    p = run(build, "search", "--tenant", "acme", "x")
    assert ran_python(p, "search", "--tenant", "acme", "x")
