"""`mailtresor search` and `show`, both ways to the access core.

The command asks the running daemon over its API socket
(RUNTIME_DIRECTORY/api.sock, HTTP/1.1 + JSON, the peer a local principal);
where nobody answers there it builds a core in its own process.  These tests
run the installed command (the venv's console script) against a real daemon,
and each case both ways -- the second through a copy of the configuration
whose runtime directory has no socket -- and check the same stdout, stderr
and exit code, and that the audit trail has the one record of each, from
"unix:" (the socket) or "local:" (the command's own process).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mailtresor.access import audit as auditmod
from tests.conftest import corpus_files, corpus_message
from tests.harness import tomlw
from tests.harness.stack import Stack
from tests.test_archive import msg, wait_archived

COMMAND = Path(sys.executable).parent / "mailtresor"     # the console script `make deps` installs
ON = {"archive": {"enabled": True}}


def run(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(COMMAND), "--config", str(config), *args], capture_output=True, timeout=timeout)


def without_daemon(stack, where: Path) -> Path:
    """A copy of the stack's configuration whose runtime directory has no
    API socket: the command finds no daemon there."""
    doc = tomllib.loads(stack.config_path.read_text())
    doc["appliance"]["runtime_directory"] = str(where / "run")
    path = where / "no-daemon.toml"
    path.write_text(tomlw.dumps(doc))
    return path


def records(stack) -> list[dict]:
    return auditmod.read(stack.cfg.audit.directory, tenant=auditmod.ALL, since=0, limit=100_000)[0]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A running daemon with a few messages archived, one of them from the
    corpus with 8-bit bytes in it; and a configuration without it."""
    top = tmp_path_factory.mktemp("read")
    s = Stack(top / "stack", ON)
    s.start()
    eight_bit = next(m for m in map(corpus_message, corpus_files()[:400]) if any(b > 127 for b in m))
    try:
        with s.smtp() as c:
            for i in range(25):
                c.sendmail("alice@globex.example", ["bob@acme.example"], msg(f"Zebrafinch report {i}"))
            c.sendmail("carol@globex.example", ["bob@acme.example"], eight_bit)
        wait_archived(s)
        assert (s.cfg.appliance.runtime_directory / "api.sock").exists()
        yield s, without_daemon(s, top), eight_bit
    finally:
        s.close()


def test_the_command_is_the_console_script():
    text = COMMAND.read_text()
    assert text.startswith("#!") and "mailtresor.cli.main" in text


# search and show, both ways: the same stdout, stderr and exit code.
SAME_BOTH_WAYS = [
    ("search", "--tenant", "acme", "subject:zebrafinch"),
    ("search", "--tenant", "acme", "--json", "--limit", "5", "--offset", "3", "zebrafinch"),
    ("search", "--tenant", "acme", "--order", "date-asc", "--limit", "3", "from:alice@globex.example"),
    ("search", "--tenant", "acme", "--order", "relevance", "--limit", "3", "report"),
    ("search", "--tenant", "acme", "--json", "--limit", "250", "zebrafinch"),      # two pages of the core
    ("search", "--tenant", "acme", "date:2002-08-01..2002-08-31", "subject:zebrafinch"),
    ("search", "--tenant", "acme", "subject:nothing-matches-this"),
    ("search", "--tenant", "acme", "subject:(unbalanced"),            # bad query
    ("search", "--tenant", "acme", "a*"),                             # wildcard too short
    ("show", "--tenant", "acme", "0" * 40),                           # no such message
]
# Refused before either way is asked: no audit record, same answer.
REFUSED_BEFORE = [
    ("search", "--tenant", "initech", "x"),                          # unknown tenant
    ("search", "--tenant", "acme", "--limit", "many", "x"),           # usage errors
    ("search", "--tenant", "acme", "--limit", "0", "x"),
    ("search", "--tenant", "acme"),
    ("search", "--tenant", "acme", "--order", "random", "x"),
    ("show", "--tenant", "acme", "not-an-id"),
    ("show", "--tenant", "acme", "--headers", "--envelope", "0" * 40),
]


@pytest.mark.parametrize("args", SAME_BOTH_WAYS, ids=lambda a: " ".join(a)[:60])
def test_the_daemon_answers_as_the_command_would(archive, args):
    stack, alone, _ = archive
    before = len(records(stack))
    served = run(stack.config_path, *args)
    local = run(alone, *args)
    assert (served.returncode, served.stdout, served.stderr) == (local.returncode, local.stdout, local.stderr)
    assert served.returncode in (0, 1, 2)
    if served.returncode:
        assert served.stderr.startswith(b"mailtresor: "), served.stderr
        assert b"Traceback" not in served.stderr
    # One record each: the daemon's of its socket peer, the command's own.
    new = records(stack)[before:]
    assert [r["client"].split(":")[0] for r in new] == ["unix", "local"], new
    assert {r["principal"] for r in new} == {"local:uid=0"} and {r["tenant"] for r in new} == {"acme"}
    assert {r["action"] for r in new} == {"search" if args[0] == "search" else "download"}   # show: the .eml


@pytest.mark.parametrize("args", REFUSED_BEFORE, ids=lambda a: " ".join(a)[:60])
def test_what_the_command_refuses_itself_is_the_same_both_ways(archive, args):
    stack, alone, _ = archive
    before = len(records(stack))
    served = run(stack.config_path, *args)
    local = run(alone, *args)
    assert (served.returncode, served.stdout, served.stderr) == (local.returncode, local.stdout, local.stderr)
    assert served.returncode in (1, 2) and b"Traceback" not in served.stderr
    assert len(records(stack)) == before


def test_messages_of_the_results(archive):
    stack, alone, _ = archive
    p = run(stack.config_path, "search", "--tenant", "acme", "subject:zebrafinch")
    assert p.returncode == 0 and p.stderr == b"25 of about 25 message(s)\n"
    lines = p.stdout.decode().splitlines()
    assert len(lines) == 25 and all(len(ln.split("  ")[0]) == 40 for ln in lines)
    assert "Zebrafinch report" in lines[0] and "alice@globex.example" in lines[0]
    p = run(stack.config_path, "search", "--tenant", "acme", "subject:(unbalanced")
    assert p.returncode == 2 and p.stderr.startswith(b"mailtresor: bad query: ")
    p = run(stack.config_path, "search", "--tenant", "initech", "x")
    assert p.stderr == b"mailtresor: unknown tenant 'initech' (configured: acme, globex)\n"
    p = run(stack.config_path, "show", "--tenant", "acme", "0" * 40)
    assert (p.returncode, p.stderr) == (1, b"mailtresor: no message " + b"0" * 40 + b" in the archive of acme\n")


def test_show_is_byte_identical_both_ways(archive):
    stack, alone, eight_bit = archive
    p = run(stack.config_path, "search", "--tenant", "acme", "--json", "envelope:carol@globex.example")
    (hit,) = json.loads(p.stdout)["results"]
    for config in (stack.config_path, alone):
        raw = run(config, "show", "--tenant", "acme", hit["id"])
        assert raw.returncode == 0 and raw.stdout == eight_bit
        head = run(config, "show", "--tenant", "acme", "--headers", hit["id"])
        assert eight_bit.startswith(head.stdout[:-2]) and head.stdout.endswith(b"\r\n")
        env = json.loads(run(config, "show", "--tenant", "acme", "--envelope", hit["id"]).stdout)
        (e,) = env["envelopes"]
        assert env["id"] == hit["id"] and e["mail_from"] == "carol@globex.example"
        assert e["recipients"] == ["bob@acme.example"]


def test_a_socket_nobody_listens_on_means_no_daemon(archive, tmp_path):
    """A socket file a killed daemon left behind: connection refused, and
    the command reads the archive itself."""
    stack, alone, _ = archive
    stale = without_daemon(stack, tmp_path)
    (tmp_path / "run").mkdir()
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "run" / "api.sock"))          # bound, never listening
        before = len(records(stack))
        p = run(stale, "search", "--tenant", "acme", "--limit", "3", "zebrafinch")
        q = run(alone, "search", "--tenant", "acme", "--limit", "3", "zebrafinch")
    assert p.returncode == 0 and (p.stdout, p.stderr) == (q.stdout, q.stderr)
    assert [r["client"].split(":")[0] for r in records(stack)[before:]] == ["local", "local"]


def test_without_the_daemon_the_command_reads_itself(tmp_path):
    s = Stack(tmp_path / "stack", ON)
    s.start()
    try:
        with s.smtp() as c:
            c.sendmail("alice@globex.example", ["bob@acme.example"], msg("Kept after the stop"))
        wait_archived(s)
        served = run(s.config_path, "search", "--tenant", "acme", "kept")
        s.stop_daemon()
        assert not (s.cfg.appliance.runtime_directory / "api.sock").exists()
        local = run(s.config_path, "search", "--tenant", "acme", "kept")
        assert local.returncode == 0 and local.stdout == served.stdout and local.stdout.count(b"\n") == 1
        assert [r["client"].split(":")[0] for r in records(s) if r["action"] == "search"] == ["unix", "local"]
        # A problem of the command's own way is named, no traceback: no key.
        s.stop_control()
        p = run(s.config_path, "search", "--tenant", "acme", "kept")
        assert p.returncode == 1 and p.stderr.startswith(b"mailtresor: no key: control endpoint "), p.stderr
        assert b"unreachable" in p.stderr and b"Traceback" not in p.stderr
    finally:
        s.close()


def test_status_asks_the_daemon_and_says_it_in_words(archive):
    stack, _, _ = archive
    p = run(stack.config_path, "status")
    text = p.stdout.decode()
    assert p.returncode == 0 and f"Daemon: running (pid {stack.daemon.pid}), ready" in text, text
    (api,) = [ln for ln in text.splitlines() if ln.lstrip().startswith("API:")]
    assert str(stack.cfg.appliance.runtime_directory / "api.sock") in api, api
    assert any(ln.lstrip().startswith("Audit: up to seq ") for ln in text.splitlines()), text
    assert "{'" not in text and "[{" not in text, text
    doc = json.loads(run(stack.config_path, "status", "--json").stdout)
    assert doc["pid"] == stack.daemon.pid and doc["api"]["listening"] and doc["tenants"]["acme"]["records"] == 26


def test_the_client_path_imports_no_archive_code(archive):
    """What makes `search` through the daemon start fast: the command
    imports the configuration and the small HTTP client, nothing of the
    archive, the keys, Twisted or the email package's parsers beyond what
    http.client needs."""
    stack, _, _ = archive
    env = dict(os.environ, PYTHONPROFILEIMPORTTIME="1")
    p = subprocess.run([str(COMMAND), "--config", str(stack.config_path), "search", "--tenant", "acme",
                        "--limit", "3", "zebrafinch"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    names = {ln.rsplit("|", 1)[1].strip() for ln in p.stderr.splitlines() if ln.startswith("import time:")}
    assert "mailtresor.cli.client" in names
    heavy = {"mailtresor.archive.store", "mailtresor.archive.index", "mailtresor.keys.ring",
             "mailtresor.access.core", "mailtresor.access.audit", "xapian", "lmdb", "cryptography",
             "twisted", "zope.interface", "OpenSSL", "zstandard"}
    bad = sorted(n for n in names if any(n == h or n.startswith(h + ".") for h in heavy))
    assert not bad, f"search through the daemon imported {bad}"


def test_a_daemon_that_goes_away_between_pages_is_not_asked_for_its_cursor(monkeypatch):
    """The first page from the daemon, then it is gone: the command does
    not hand the daemon's cursor to a core of its own (it would be refused
    as tampered); it starts again in its own process."""
    from types import SimpleNamespace

    from mailtresor.cli import read

    calls = []

    class GoneAfterOnePage:
        def search(self, tenant, *, query, cursor, limit, order):
            if calls:
                raise read.Unavailable("went away")
            calls.append(("daemon", cursor))
            return {"total": 3, "results": [{"id": "a"}], "next_cursor": "daemon-cursor"}

        def close(self):
            pass

    class Own:
        def __init__(self, cfg):
            pass

        def search(self, tenant, *, query, cursor, limit, order):
            calls.append(("own", cursor))
            assert cursor in (None, "own-cursor")
            return {"total": 3, "results": [{"id": "a"}, {"id": "b"}, {"id": "c"}][:limit], "next_cursor": None}

        def close(self):
            pass

    monkeypatch.setattr(read, "Daemon", lambda runtime_directory: GoneAfterOnePage())
    monkeypatch.setattr(read, "InProcess", Own)
    reader = read.Reader(SimpleNamespace(appliance=SimpleNamespace(runtime_directory="/nonexistent")))
    rows, page = read._rows(reader, "acme", "x", "date-desc", 3)
    assert [r["id"] for r in rows] == ["a", "b", "c"] and calls == [("daemon", None), ("own", None)]
