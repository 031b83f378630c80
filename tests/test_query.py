"""The daemon's query socket and the `mailtresor` command that uses it.

`mailtresor search` and `show` are answered by the running daemon when it
runs with the same configuration file (mailtresor/query.py), and by the
command itself otherwise.  These tests run the command as installed
(daemon/bin/mailtresor.c as `make deps` builds it into the venv)
against a real daemon, and check that both ways give the same bytes, the
same errors and the same exit codes; that a daemon with another (or a
changed) configuration file declines; that the socket answers nobody but
root and the daemon's user; and that junk on the socket harms nothing.
The command's own handling of the socket, the answer and the hand-over
to Python: tests/test_command.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from mailtresor import query
from tests.conftest import REPO, corpus_files, corpus_message
from tests.harness.stack import Stack
from tests.test_archive import msg, wait_archived

COMMAND = Path(sys.executable).parent / "mailtresor"     # written by `make deps`
ON = {"archive": {"enabled": True}}


def run(config: Path, *args: str, daemon: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop(query.NO_DAEMON_ENV_VAR, None)
    if not daemon:
        env[query.NO_DAEMON_ENV_VAR] = "1"
    return subprocess.run([str(COMMAND), "--config", str(config), *args], env=env, capture_output=True,
                          timeout=timeout)


def answered(stack) -> int:
    """Requests the daemon answered (declined ones are logged otherwise)."""
    return len(re.findall(r"mailtresor\.query: query socket: uid 0 \(pid \d+\): \S+ --tenant \S+: exit \d+,",
                          stack.log()))


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A running daemon with a few messages archived, one of them from the
    corpus with 8-bit bytes in it."""
    s = Stack(tmp_path_factory.mktemp("query") / "stack", ON)
    s.start()
    eight_bit = next(m for m in map(corpus_message, corpus_files()[:400]) if any(b > 127 for b in m))
    try:
        with s.smtp() as c:
            for i in range(25):
                c.sendmail("alice@globex.example", ["bob@acme.example"], msg(f"Zebrafinch report {i}"))
            c.sendmail("carol@globex.example", ["bob@acme.example"], eight_bit)
        wait_archived(s)
        yield s, eight_bit
    finally:
        s.close()


def test_the_command_is_built_from_the_checkouts_source():
    assert COMMAND.read_bytes()[:4] == b"\x7fELF"
    assert COMMAND.stat().st_mtime >= (REPO / "daemon" / "bin" / "mailtresor.c").stat().st_mtime, "run make deps"


# search and show, both ways: the same stdout, stderr and exit code.
SAME_BOTH_WAYS = [
    ("search", "--tenant", "acme", "subject:zebrafinch"),
    ("search", "--tenant", "acme", "--json", "--limit", "5", "--offset", "3", "zebrafinch"),
    ("search", "--tenant", "acme", "--order", "date-asc", "--limit", "3", "from:alice@globex.example"),
    ("search", "--tenant", "acme", "--order", "relevance", "--limit", "3", "report"),
    ("search", "--tenant", "acme", "date:2002-08-01..2002-08-31", "subject:zebrafinch"),
    ("search", "--tenant", "acme", "subject:nothing-matches-this"),
    ("search", "--tenant", "initech", "x"),                          # unknown tenant
    ("search", "--tenant", "acme", "subject:(unbalanced"),            # bad query
    ("search", "--tenant", "acme", "a*"),                             # wildcard too short
    ("search", "--tenant", "acme", "--limit", "many", "x"),           # usage error
    ("search", "--tenant", "acme"),                                   # no query
    ("search", "--tenant", "acme", "--order", "random", "x"),
    ("show", "--tenant", "acme", "not-an-id"),
    ("show", "--tenant", "acme", "0" * 40),                           # no such message
    ("show", "--tenant", "acme", "--headers", "--envelope", "0" * 40),
]


@pytest.mark.parametrize("args", SAME_BOTH_WAYS, ids=lambda a: " ".join(a)[:60])
def test_the_daemon_answers_as_the_command_would(archive, args):
    stack, _ = archive
    before = answered(stack)
    served = run(stack.config_path, *args)
    assert answered(stack) == before + 1, "the daemon did not answer"
    local = run(stack.config_path, *args, daemon=False)
    assert answered(stack) == before + 1
    assert (served.returncode, served.stdout, served.stderr) == (local.returncode, local.stdout, local.stderr)
    assert served.returncode in (0, 1, 2)
    if served.returncode:
        assert served.stderr.startswith(b"usage:") or served.stderr.startswith(b"mailtresor: "), served.stderr
        assert b"Traceback" not in served.stderr


def test_show_through_the_daemon_is_byte_identical(archive):
    stack, eight_bit = archive
    p = run(stack.config_path, "search", "--tenant", "acme", "--json", "envelope:carol@globex.example")
    (hit,) = json.loads(p.stdout)["results"]
    before = answered(stack)
    raw = run(stack.config_path, "show", "--tenant", "acme", hit["id"])
    assert raw.returncode == 0 and raw.stdout == eight_bit
    head = run(stack.config_path, "show", "--tenant", "acme", "--headers", hit["id"])
    assert eight_bit.startswith(head.stdout[:-2]) and head.stdout.endswith(b"\r\n")
    env = run(stack.config_path, "show", "--tenant", "acme", "--envelope", hit["id"])
    (e,) = json.loads(env.stdout)["envelopes"].values()
    assert e["mail_from"] == "carol@globex.example"
    assert answered(stack) == before + 3


def test_the_log_names_who_asked_but_not_the_query(archive):
    stack, _ = archive
    run(stack.config_path, "search", "--tenant", "acme", "subject:Unmistakablequeryword")
    line = [ln for ln in stack.log().splitlines() if "query socket: uid 0" in ln][-1]
    assert re.search(r"uid 0 \(pid \d+\): search --tenant acme: exit 0, [\d.]+ ms$", line), line
    assert "nmistakable" not in stack.log()


def test_help_and_other_commands_are_not_sent_to_the_daemon(archive):
    stack, _ = archive
    before = answered(stack)
    p = run(stack.config_path, "search", "--help")
    assert p.returncode == 0 and b"--tenant" in p.stdout
    p = run(stack.config_path, "status", "--json")
    doc = json.loads(p.stdout)
    assert p.returncode == 0 and doc["daemon"] == "running"
    assert doc["query_socket"]["path"] == str(stack.cfg.appliance.runtime_directory / "query.sock")
    assert doc["query_socket"]["listening"] is True
    assert answered(stack) == before


def test_another_configuration_file_is_declined(archive, tmp_path):
    stack, _ = archive
    copy = tmp_path / "copy.toml"
    shutil.copy(stack.config_path, copy)          # same runtime directory, same socket
    served = run(stack.config_path, "search", "--tenant", "acme", "zebrafinch")
    p = run(copy, "search", "--tenant", "acme", "zebrafinch")
    assert "declined (another configuration file)" in stack.log()
    assert p.returncode == 0 and p.stdout == served.stdout and p.stdout.count(b"\n") == 25


@contextlib.contextmanager
def daemon_with(tmp_path, *subjects: str, overrides: dict = ON):
    """A daemon of the test's own, with one message per subject archived."""
    s = Stack(tmp_path / "stack", overrides)
    s.start()
    try:
        if subjects:
            with s.smtp() as c:
                for subject in subjects:
                    c.sendmail("alice@globex.example", ["bob@acme.example"], msg(subject))
            wait_archived(s)
        yield s
    finally:
        s.close()


def test_a_search_for_very_many_hits_runs_in_the_commands_own_process(archive):
    """Beyond query.MAX_SERVED_HITS the daemon declines: such a listing
    would be built in its memory, beside the archiver."""
    stack, _ = archive
    before = answered(stack)
    p = run(stack.config_path, "search", "--tenant", "acme", "--json", "--limit", "10001", "zebrafinch")
    assert "declined (more than 10000 hits asked for)" in stack.log()
    assert answered(stack) == before
    assert p.returncode == 0 and json.loads(p.stdout)["total"] == 25
    p = run(stack.config_path, "search", "--tenant", "acme", "--json", "--limit", "10000", "zebrafinch")
    assert answered(stack) == before + 1 and json.loads(p.stdout)["total"] == 25


def test_a_changed_configuration_file_is_declined(tmp_path):
    with daemon_with(tmp_path, "Before the change") as s:
        assert run(s.config_path, "search", "--tenant", "acme", "change").returncode == 0
        assert answered(s) == 1
        # A tenant added to the file while the daemon runs: the daemon does
        # not know it; the command, reading the file, does.
        s.reconfigure({"tenant": [{"name": "acme", "domains": ["acme.example"]},
                                  {"name": "globex", "domains": ["globex.example"]},
                                  {"name": "initech", "domains": ["initech.example"]}]})
        p = run(s.config_path, "search", "--tenant", "initech", "anything")
        assert "declined (the configuration file changed since the daemon read it)" in s.log()
        assert p.returncode == 0 and p.stdout == b"", p.stderr


def test_without_a_daemon_the_command_searches_itself(tmp_path):
    with daemon_with(tmp_path, "Kept after the stop") as s:
        served = run(s.config_path, "search", "--tenant", "acme", "kept")
        s.stop_daemon()
        assert not (s.cfg.appliance.runtime_directory / "query.sock").exists()
        local = run(s.config_path, "search", "--tenant", "acme", "kept")
        assert local.returncode == 0 and local.stdout == served.stdout and local.stdout.count(b"\n") == 1


def _ask(path: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(30)
        c.connect(str(path))
        c.sendall(data)
        c.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := c.recv(65536):
            out += chunk
        return out


def frames(data: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    while data:
        n = int.from_bytes(data[1:5], "big")
        out.append((data[:1], data[5:5 + n]))
        data = data[5 + n:]
    return out


def test_junk_on_the_socket_gets_no_answer_and_harms_nothing(archive):
    stack, _ = archive
    sock = stack.cfg.appliance.runtime_directory / "query.sock"
    assert oct(sock.stat().st_mode & 0o777) == "0o600"
    assert _ask(sock, b"EHLO there\r\n") == b""
    assert _ask(sock, query.MAGIC + (10 ** 9).to_bytes(4, "big")) == b""          # too long
    assert _ask(sock, query.MAGIC + (100).to_bytes(4, "big") + b"short") == b""    # cut off
    # Not a command the daemon answers.
    got = frames(_ask(sock, query.encode_request(os.path.realpath(stack.config_path), ["verify"])))
    assert got == [(b"o", b""), (b"e", b"mailtresor: the daemon answers only search and show\n"), (b"x", b"2")]
    got = frames(_ask(sock, query.encode_request(os.path.realpath(stack.config_path),
                                                  ["search", "--tenant", "acme", "zebrafinch"])))
    assert [k for k, _ in got] == [b"o", b"e", b"x"] and got[0][1].count(b"\n") == 25 and got[2][1] == b"0"
    assert "not a mailtresor query" in stack.log() and "request too long" in stack.log()
    assert stack.daemon.poll() is None


def test_only_root_and_the_daemons_user_are_answered(tmp_path):
    # The socket's mode (0600) keeps others out already; with a socket
    # opened up by mistake, the peer credentials still do.  A directory
    # every user can reach, for the socket.
    top = Path(tempfile.mkdtemp(prefix="mt-query-"))
    top.chmod(0o755)
    try:
        with daemon_with(tmp_path, overrides={**ON, "appliance": {"runtime_directory": str(top / "run")}}) as s:
            sock = top / "run" / "query.sock"
            (top / "run").chmod(0o755)
            sock.chmod(0o666)
            script = ("import socket, sys\nc = socket.socket(socket.AF_UNIX)\nc.connect(sys.argv[1])\n"
                      "c.sendall(bytes.fromhex(sys.argv[2]))\nout = b''\n"
                      "while (b := c.recv(65536)): out += b\nsys.stdout.buffer.write(out)\n")
            req = query.encode_request(os.path.realpath(s.config_path), ["search", "--tenant", "acme", "x"])
            p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                "/usr/bin/python3", "-c", script, str(sock), req.hex()],
                               capture_output=True, timeout=60)
            assert p.returncode == 0, p.stderr
            assert frames(p.stdout) == [
                (b"e", b"mailtresor: the daemon answers only root and its own user, not uid 65534\n"),
                (b"x", b"1")]
            assert "refused uid 65534" in s.log()
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_searches_are_answered_while_the_daemon_archives(tmp_path):
    """The query threads share the store with the archiver (behind its
    lock) and open indexes it keeps writing: every search while mail
    streams in succeeds, and sees no fewer messages than the one before."""
    with daemon_with(tmp_path) as s:
        stop = threading.Event()
        sent = []

        def send():
            with s.smtp() as c:
                for i in range(150):
                    if stop.is_set():
                        break
                    c.sendmail("alice@globex.example", ["bob@acme.example"], msg(f"Stream {i}"))
                    sent.append(i)

        t = threading.Thread(target=send)
        t.start()
        seen = []
        deadline = time.monotonic() + 120
        try:
            while t.is_alive() and time.monotonic() < deadline:
                p = run(s.config_path, "search", "--tenant", "acme", "--json", "--limit", "1000", "stream")
                assert p.returncode == 0, p.stderr
                seen.append(json.loads(p.stdout)["total"])
                p = run(s.config_path, "show", "--tenant", "acme", "--headers",
                        json.loads(p.stdout)["results"][0]["id"]) if seen[-1] else None
                assert p is None or (p.returncode == 0 and b"Subject: Stream " in p.stdout)
        finally:
            stop.set()
            t.join(60)
        wait_archived(s)
        final = json.loads(run(s.config_path, "search", "--tenant", "acme", "--json", "--limit", "1000",
                               "stream").stdout)["total"]
        assert final == len(sent) == 150
        assert len(seen) >= 3 and seen == sorted(seen), seen
        assert answered(s) >= len(seen) + 1
