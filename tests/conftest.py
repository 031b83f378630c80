import os
import shutil
from pathlib import Path

import pytest

from tests.harness.stack import Stack

REPO = Path(__file__).resolve().parent.parent
# Beside the checkout (../shared/corpus), else $MAILTRESOR_CORPUS, else the
# workspace's shared folder (a clone elsewhere, as CI may make).
_CANDIDATES = [REPO.parent / "shared" / "corpus" / "spamassassin",
               Path(os.environ.get("MAILTRESOR_CORPUS", "/nonexistent")),
               Path("/work/shared/corpus/spamassassin")]
CORPUS = next((c for c in _CANDIDATES if c.is_dir()), _CANDIDATES[0])


def corpus_files() -> list[Path]:
    if not CORPUS.is_dir():
        pytest.skip(f"corpus not found at {CORPUS}")
    return sorted(p for p in CORPUS.rglob("*.eml"))


def corpus_message(path: Path) -> bytes:
    """A corpus file as an RFC 5322 message on the wire: the mbox 'From '
    line dropped, lines ending in CRLF (what an SMTP client sends)."""
    raw = path.read_bytes()
    if raw.startswith(b"From "):
        raw = raw.split(b"\n", 1)[1] if b"\n" in raw else b""
    raw = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if not raw.endswith(b"\r\n"):
        raw += b"\r\n"
    return raw


@pytest.fixture
def stack(tmp_path):
    s = Stack(tmp_path / "stack")
    yield s
    s.close()


@pytest.fixture
def running(stack):
    return stack.start()


def pytest_report_header(config):
    return [f"corpus: {CORPUS} ({'present' if CORPUS.is_dir() else 'missing'})",
            f"postfix: {shutil.which('postfix') or shutil.which('/usr/sbin/postfix') or 'missing'}"]


@pytest.fixture
def browser(world, tmp_path):
    """Headless Chromium on the module's `world` (a fixture of the web UI's
    test files: a daemon whose web UI is at world.base)."""
    from tests.harness.browser import Browser
    b = Browser(world.base, tmp_path)
    yield b
    b.close()
