"""The rules of docs/ARCHITECTURE.md that a reader of the code relies on,
checked on the source so that a change that breaks one fails here."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "daemon" / "mailtresor"
SOURCES = sorted(PACKAGE.rglob("*.py")) + sorted((REPO / "milter").rglob("*.py"))

# (file, function) pairs allowed to take the global reactor: the top.
REACTOR_OWNERS = {("service.py", "main"), ("control/server.py", "main")}


def _functions_importing_the_reactor(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    found = []

    def visit(node, func):
        for child in ast.iter_child_nodes(node):
            f = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
            if isinstance(child, ast.ImportFrom) and child.module == "twisted.internet" and any(
                    a.name == "reactor" for a in child.names):
                found.append(func)
            elif isinstance(child, ast.Import) and any(a.name == "twisted.internet.reactor" for a in child.names):
                found.append(func)
            elif isinstance(child, ast.Attribute) and child.attr == "reactor" and isinstance(
                    child.value, ast.Attribute) and child.value.attr == "internet":
                found.append(func)
            visit(child, f)

    visit(tree, "<module>")
    return found


def test_only_the_top_takes_the_global_reactor():
    offenders = []
    for path in SOURCES:
        rel = path.relative_to(PACKAGE).as_posix() if PACKAGE in path.parents else path.name
        for func in _functions_importing_the_reactor(path):
            if (rel, func) not in REACTOR_OWNERS:
                offenders.append(f"{rel}: {func}")
    assert offenders == [], "the global reactor outside the top: " + ", ".join(offenders)


def test_the_rule_check_sees_a_function_local_import(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("def f():\n    from twisted.internet import reactor\n    return reactor\n")
    assert _functions_importing_the_reactor(p) == ["f"]


def test_the_control_endpoint_does_not_import_the_daemons_wiring():
    code = ("import sys, mailtresor.control.server\n"
            "bad = sorted(m for m in sys.modules if m in ('mailtresor.service', 'mailtresor.assemble') "
            "or m.startswith(('mailtresor.ingest', 'mailtresor.archive', 'mailtresor.access', 'mailtresor.cli')))\n"
            "print(' '.join(bad))\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                       env={"PYTHONPATH": str(REPO / "daemon"), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == ""


def test_key_derivation_has_one_home():
    """HKDF is called in keys/derive.py, nowhere else: every `info` is
    listed there."""
    callers = []
    for path in SOURCES:
        rel = path.relative_to(PACKAGE).as_posix() if PACKAGE in path.parents else path.name
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "derive" and isinstance(node.value, ast.Name) \
                    and node.value.id == "crypto":
                callers.append(rel)
    assert set(callers) == {"keys/derive.py"}, callers


def _referrers(name: str) -> set[str]:
    out = set()
    for path in SOURCES:
        rel = path.relative_to(PACKAGE).as_posix() if PACKAGE in path.parents else path.name
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr == name) or \
                    (isinstance(node, ast.Name) and node.id == name) or \
                    (isinstance(node, ast.FunctionDef) and node.name == name) or \
                    (isinstance(node, ast.alias) and node.name == name):
                out.add(rel)
    return out


def test_mail_leaves_the_archive_only_through_the_deleter():
    """docs/ARCHITECTURE.md: one module decides what may go
    (lifecycle/protect.py), one deletes (archive/deleter.py), and only a
    retention run and an approved four-eyes request call it.  A new caller
    of the deleter or of the shard's delete fails here until it is
    reviewed and listed."""
    assert _referrers("delete_messages") == {"archive/deleter.py", "lifecycle/retention.py", "access/holds.py"}
    assert _referrers("delete_many") == {"archive/store/shard.py", "archive/deleter.py"}
    assert _referrers("catalog_delete") == {"archive/store/shard.py", "archive/deleter.py"}
    # Both callers ask the precedence first.
    assert {"lifecycle/retention.py", "lifecycle/requests.py"} <= _referrers("protections")
