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
