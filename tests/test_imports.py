"""What a `mailtresor` command imports: a guard on the CLI's start-up time.

`mailtresor search` runs as a process per query, and most of such a process
is the interpreter starting and importing (bench/cli_startup times it).
These tests time nothing: they run the CLI with `-X importtime` and check
that no module it does not need is imported -- the archiver and the message
parser, Twisted, the email package's policy machinery, cryptography's
OpenSSL backend (X.509 and all), logging -- so that a new top-level import
that would bring one of them back fails here rather than in a benchmark.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.harness.stack import Stack

# Never imported by a search, a status or --help.
NOT_FOR_THE_CLI = {
    "mailtresor.archive.archiver", "mailtresor.archive.parse", "mailtresor.archive.journal", "mailtresor.ingest.spool", "mailtresor.ingest.relay",
    "mailtresor.service", "mailtresor.control.server", "mailtresor.keys.pki", "mailtresor.archive.tsa", "mailtresor.ingest.replies",
    "mailtresor_milter", "twisted", "zope.interface", "OpenSSL", "email.policy", "email.headerregistry",
    "email.generator", "html.parser", "zipfile", "mailbox", "logging", "zstandard", "shutil",
}
# cryptography's OpenSSL backend: a search needs it (AESGCM imports it, and we
# do not replace a vetted AEAD for start-up time); status and --help must not.
CRYPTOGRAPHY_BACKEND = {"cryptography.x509", "cryptography.hazmat.backends.openssl",
                        "cryptography.hazmat.primitives.ciphers.aead"}
# Only search, show, verify and friends need these; status without an
# archive and --help do not.
ARCHIVE_ONLY = {"mailtresor.archive.store", "mailtresor.archive.index", "mailtresor.keys.ring", "mailtresor.keys.crypto", "xapian", "lmdb",
                "cryptography", "ssl", "http.client"}


def imported(cmd: list[str], **kw) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run a Python command with -X importtime; its result and every module
    it imported beyond what a bare interpreter imports here."""
    env = dict(os.environ, PYTHONPROFILEIMPORTTIME="1")
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, **kw)
    names = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \| +(\S+)$", p.stderr, re.M))
    bare = subprocess.run([sys.executable, "-c", "pass"], env=env, capture_output=True, text=True, timeout=60)
    names -= set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \| +(\S+)$", bare.stderr, re.M))
    assert names, p.stderr[-2000:]
    return p, names


def unwanted(names: set[str], prefixes: set[str]) -> list[str]:
    return sorted(n for n in names if any(n == x or n.startswith(x + ".") for x in prefixes))


def cli(stack, *args) -> list[str]:
    return [sys.executable, "-m", "mailtresor", "--config", str(stack.config_path), *args]


@pytest.fixture
def archive(tmp_path):
    """A control endpoint and an archive of a few messages (no daemon)."""
    s = Stack(tmp_path / "stack", {"archive": {"enabled": True}}, milter=False)
    s.start_control()
    box = tmp_path / "in.mbox"
    box.write_bytes(b"".join(
        f"From alice@globex.example Thu Aug 22 10:00:00 2002\nFrom: Alice <alice@globex.example>\n"
        f"To: bob@acme.example\nSubject: invoice {i}\nDate: Thu, 22 Aug 2002 10:0{i}:00 +0000\n"
        f"Message-ID: <{i}.imports@globex.example>\n\nbody {i}\n\n".encode() for i in range(3)))
    p = subprocess.run(cli(s, "import", "--tenant", "acme", str(box)), cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    yield s
    s.close()


def test_search_imports_only_what_it_needs(archive):
    p, names = imported(cli(archive, "search", "--tenant", "acme", "--json", "subject:invoice"))
    assert p.returncode == 0, p.stderr[-2000:]
    rows = json.loads(p.stdout)["results"]
    # The hits' metadata was decrypted: the tenant key came over mTLS.
    assert sorted(r["subject"] for r in rows) == ["invoice 0", "invoice 1", "invoice 2"]
    assert {"mailtresor.archive.store", "mailtresor.archive.index", "mailtresor.keys.ring", "http.client"} <= names
    bad = unwanted(names, NOT_FOR_THE_CLI)
    assert not bad, f"mailtresor search imported {bad} (a new top-level import?)"


def test_search_errors_still_named_without_traceback(archive):
    # main() maps the key client's and the store's errors without importing
    # their modules up front: check both mappings still work.
    p = subprocess.run(cli(archive, "show", "--tenant", "globex", "0" * 40), cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert (p.returncode, p.stderr) == (1, "mailtresor: no archive for tenant globex\n")
    archive.stop_control()
    p = subprocess.run(cli(archive, "search", "--tenant", "acme", "subject:invoice"), cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.startswith("mailtresor: no key: control endpoint ")
    assert "unreachable" in p.stderr and "Traceback" not in p.stderr


def test_help_and_status_import_no_archive_code(stack):
    # The stack's configuration has an archive section, which status reports
    # on (and imports the store for); without one it needs none of it.
    stack.reconfigure({"archive": None})
    for args in (["--help"], ["status"], ["search", "--help"]):
        p, names = imported(cli(stack, *args))
        assert p.returncode in (0, 3), (args, p.stderr[-2000:])
        # Help needs no configuration either.
        config = {"mailtresor.config", "tomllib", "dataclasses"} if "--help" in args else set()
        bad = unwanted(names, NOT_FOR_THE_CLI | CRYPTOGRAPHY_BACKEND | ARCHIVE_ONLY | config)
        assert not bad, f"mailtresor {' '.join(args)} imported {bad} (a new top-level import?)"


def test_status_of_an_archive_imports_no_key_client(archive):
    # Index lag and the like need the store and Xapian, but no key, no
    # TLS, no email package.
    p, names = imported(cli(archive, "status"))
    assert p.returncode == 3 and "Shards: acme/2002-08  3 records" in p.stdout, p.stdout + p.stderr[-2000:]
    bad = unwanted(names, NOT_FOR_THE_CLI | CRYPTOGRAPHY_BACKEND | {"mailtresor.keys.ring", "ssl", "http.client", "email"})
    assert not bad, f"mailtresor status imported {bad} (a new top-level import?)"
