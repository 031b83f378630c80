"""The man pages (docs/man/) against the code they describe.

The lists are built at test time from the parsers and the configuration's
dataclasses, so a command, option, section or key added anywhere fails
here until its page says what it is.  The pages keep one .SS per command
(mailtresor(1)) or section (mailtresor.toml(5)) and one .TP per option or
key, which is what these tests read.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import subprocess
import typing
from pathlib import Path

import pytest

from mailtresor import config as configmod

MAN = Path(__file__).resolve().parent.parent / "docs" / "man"
PAGES = ("mailtresor.1", "mailtresor.toml.5", "mailtresord.8", "mailtresor-control.8")
DEBIAN = Path(__file__).resolve().parent.parent / "debian"


def plain(roff: str) -> str:
    r"""Roff text with the escapes that matter here undone: \- is '-', font changes and \& go."""
    text = roff.replace("\\-", "-").replace("\\&", "")
    return re.sub(r"\\f[BIRP]", "", text)


def subsections(page: str) -> dict[str, str]:
    """.SS heading (unquoted, plain) -> the text up to the next .SS or .SH."""
    out: dict[str, str] = {}
    heading = None
    for line in plain((MAN / page).read_text()).splitlines():
        if line.startswith((".SS", ".SH")):
            heading = line[3:].strip().strip('"') if line.startswith(".SS") else None
            if heading is not None:
                out[heading] = ""
        elif heading is not None:
            out[heading] += line + "\n"
    return out


def tags(body: str) -> set[str]:
    """The first word of the line after each .TP (its tag), without the font macro and quotes."""
    lines = body.splitlines()
    found = set()
    for i, line in enumerate(lines[:-1]):
        if line.strip() == ".TP":
            words = lines[i + 1].split()
            if words and words[0].startswith("."):
                words = words[1:]
            if words:
                found.add(words[0].strip('"'))
            # A tag naming two spellings (.BR -o ", " --output FILE).
            found.update(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", lines[i + 1]))
    return found


@pytest.mark.parametrize("page", PAGES)
def test_pages_format_without_warnings(page):
    groff = shutil.which("groff")
    if groff is None:
        pytest.skip("groff is not installed")
    r = subprocess.run([groff, "-man", "-Tutf8", "-ww", "-z", str(MAN / page)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    text = (MAN / page).read_text()
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "FILES", "SEE ALSO"):
        assert re.search(rf"^\.SH \"?{section}\"?$", text, re.M), f"{page}: no {section}"
    if page != "mailtresor.toml.5":
        for section in ("OPTIONS", "EXIT STATUS", "ENVIRONMENT", "EXAMPLES"):
            assert re.search(rf"^\.SH \"?{section}\"?$", text, re.M), f"{page}: no {section}"


def test_man_warnings_from_man_itself():
    man = shutil.which("man")
    if man is None:
        pytest.skip("man is not installed")
    for page in PAGES:
        r = subprocess.run([man, "--warnings", "-l", str(MAN / page)], capture_output=True, text=True,
                           timeout=60, env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        assert r.returncode == 0 and not r.stderr.strip(), (page, r.stderr)


def test_pages_are_installed():
    listed = (DEBIAN / "mailtresor.manpages").read_text().split()
    assert sorted(listed) == sorted(f"docs/man/{p}" for p in PAGES) + sorted(
        f"docs/man/{p.name}" for p in MAN.iterdir() if p.name not in PAGES)


# --- mailtresor(1): every command and its options -------------------------------------------

def commands(parser: argparse.ArgumentParser, prefix: str = "mailtresor"):
    """(command path, its parser) for every leaf command, e.g. ("mailtresor user add", p)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                path = f"{prefix} {name}"
                if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                    yield from commands(sub, path)
                else:
                    yield path, sub


def options(parser: argparse.ArgumentParser) -> set[str]:
    """The long options a user can give (-h/--help and suppressed ones aside)."""
    return {o for a in parser._actions if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)
            for o in a.option_strings if o.startswith("--")}


def test_every_command_and_option_is_in_mailtresor_1():
    from mailtresor.cli import main
    parser = main.build_parser()
    sections = subsections("mailtresor.1")
    missing = []
    for path, sub in commands(parser):
        heading = next((h for h in sections if h == path or h.startswith(path + " ")), None)
        if heading is None:
            missing.append(f"{path}: no .SS \"{path} ...\"")
            continue
        for opt in sorted(options(sub)):
            if opt not in tags(sections[heading]):
                missing.append(f"{path}: option {opt} has no .TP")
    for opt in options(parser):
        if opt not in tags(subsection_of_sh("mailtresor.1", "OPTIONS")):
            missing.append(f"mailtresor: global option {opt} not under OPTIONS")
    assert not missing, "mailtresor(1) lacks:\n" + "\n".join(missing)


def subsection_of_sh(page: str, name: str) -> str:
    text = plain((MAN / page).read_text())
    m = re.search(rf"^\.SH \"?{name}\"?\n(.*?)(?=^\.SH )", text, re.M | re.S)
    return m.group(1) if m else ""


# --- mailtresord(8), mailtresor-control(8): every option of their parsers ---------------------

def parser_of(main) -> argparse.ArgumentParser:
    """The parser a main() builds inside itself, taken where it parses."""
    captured = {}

    class Stop(Exception):
        pass

    original = argparse.ArgumentParser.parse_args

    def grab(self, args=None, namespace=None):
        captured["parser"] = self
        raise Stop
    argparse.ArgumentParser.parse_args = grab
    try:
        with pytest.raises(Stop):
            main([])
    finally:
        argparse.ArgumentParser.parse_args = original
    return captured["parser"]


def test_every_command_and_option_of_mailtresor_control_is_in_its_page():
    from mailtresor.control import server
    parser = parser_of(server.main)
    sections = subsections("mailtresor-control.8")
    missing = []
    for path, sub in commands(parser, "mailtresor-control"):
        heading = next((h for h in sections if h == path or h.startswith(path + " ")), None)
        if heading is None:
            missing.append(f"{path}: no .SS")
            continue
        missing += [f"{path}: option {o} has no .TP" for o in sorted(options(sub) - tags(sections[heading]))]
    missing += [f"global option {o}" for o in options(parser) - tags(subsection_of_sh("mailtresor-control.8",
                                                                                     "OPTIONS"))]
    assert not missing, "mailtresor-control(8) lacks:\n" + "\n".join(missing)


def test_every_option_of_mailtresord_is_in_mailtresord_8():
    from mailtresor import service
    opts = options(parser_of(service.main))
    assert {"--config", "--check-config"} <= opts
    documented = tags(subsection_of_sh("mailtresord.8", "OPTIONS"))
    assert not opts - documented, f"mailtresord(8) OPTIONS lacks {sorted(opts - documented)}"
    signals = tags(subsection_of_sh("mailtresord.8", "SIGNALS"))
    assert {"SIGTERM", "SIGHUP"} <= signals
    statuses = tags(subsection_of_sh("mailtresord.8", "EXIT STATUS"))
    assert {"0", "1", "2", str(service.EXIT_ACTIVATION)} <= statuses


# --- mailtresor.toml(5): every section and key ----------------------------------------------

def config_sections(cls=configmod.Config, path: str = ""):
    """(dotted section, [keys]) for every dataclass reachable from Config; a
    key holding a section of its own is listed in its parent too."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if f.name == "source":
            continue
        keys.append(f.name)
        tp = hints[f.name]
        for candidate in (tp, *typing.get_args(tp)):
            if dataclasses.is_dataclass(candidate):
                yield from config_sections(candidate, f"{path}.{f.name}" if path else f.name)
    if path:
        yield path, keys
    else:
        for k in keys:
            # Every top-level key is a section: checked through the recursion.
            assert dataclasses.is_dataclass(hints[k]) or any(
                dataclasses.is_dataclass(a) for a in typing.get_args(hints[k])), k


def test_every_section_and_key_is_in_mailtresor_toml_5():
    by_name = {}
    for heading, body in subsections("mailtresor.toml.5").items():
        m = re.fullmatch(r"\[\[?([a-z_.]+)\]\]?", heading)
        if m:
            by_name[m.group(1)] = tags(body)
    missing = []
    for section, keys in config_sections():
        if section not in by_name:
            missing.append(f"section [{section}]: no .SS")
            continue
        for key in keys:
            if key not in by_name[section]:
                missing.append(f"[{section}] {key}: no .TP")
    assert not missing, "mailtresor.toml(5) lacks:\n" + "\n".join(missing)


def test_documented_defaults_match_the_code():
    """A default the page states for a plain key is the code's (a changed
    default must change the page)."""
    wrong = []
    sections = {re.sub(r"[\[\]]", "", h): b for h, b in subsections("mailtresor.toml.5").items()}
    for section, _keys in config_sections():
        cls = _section_class(section)
        body = sections.get(section, "")
        for f in dataclasses.fields(cls):
            m = re.search(rf"^\.BR {re.escape(f.name)} \"\s*\((?:[a-z ]+), default (-?[0-9.]+)\)\"$", body, re.M)
            if m and f.default is not dataclasses.MISSING and isinstance(f.default, (int, float)) \
                    and not isinstance(f.default, bool):
                stated = float(m.group(1))
                if stated != float(f.default):
                    wrong.append(f"[{section}] {f.name}: page says {m.group(1)}, code {f.default}")
    assert not wrong, "\n".join(wrong)


def _section_class(section: str):
    cls = configmod.Config
    for part in section.split("."):
        tp = typing.get_type_hints(cls)[part]
        cls = next(c for c in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(c))
    return cls
