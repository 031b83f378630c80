"""`mailtresor`: the administrator's command line on the appliance.

This module builds the parser from the command modules named in
COMMAND_MODULES (each `mailtresor/cli/<name>.py` has `register(subparsers)`,
which adds its sub-commands with `set_defaults(func=run_xxx)`), loads the
configuration, and runs the command.  Commands the daemon answers (search,
show, status) ask it over its API socket (cli/client.py).

User errors (unknown tenant, bad query, no key, unreadable configuration)
print one line naming the problem and exit non-zero; no tracebacks.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys

from mailtresor import CONFIG_ENV_VAR, CONFIG_PATH, no_core_dumps, private_umask
# UserError and the exit codes live in cli/common.py; named here too for
# the command modules and tests that know them as cli.main's.
from mailtresor.cli.common import EXIT_FAIL, EXIT_USAGE, UserError  # noqa: F401

# The command modules, in the order their commands appear in --help.  A
# part that adds commands writes mailtresor/cli/<name>.py with register()
# and adds its name here.
COMMAND_MODULES = ["setup", "status", "read", "archive", "audit", "user", "gdpr", "retention", "tags", "holds",
                   "maintenance", "backup", "volume"]


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's, told the width it would use (the terminal's, less 2):
    argparse makes a formatter for every argument added and imports shutil
    to ask the terminal each time (about 2 ms of every command)."""

    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None):
        super().__init__(prog, indent_increment, max_help_position, _columns() - 2 if width is None else width)


@functools.cache
def _columns() -> int:
    """shutil.get_terminal_size().columns, asked once."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


class _Parser(argparse.ArgumentParser):
    """Uses _HelpFormatter; add_subparsers() makes its parsers of this class too."""

    def __init__(self, *args, formatter_class=_HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def build_parser(parser_class: type | None = None) -> argparse.ArgumentParser:
    """The parser of every command: each module of COMMAND_MODULES adds its own."""
    p = (parser_class or _Parser)(prog="mailtresor", description="mailtresor archive administration")
    p.add_argument("--config", help=f"configuration file (default ${CONFIG_ENV_VAR} or {CONFIG_PATH})")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"mailtresor.cli.{name}").register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """The console script's entry point: parse, load the configuration, run."""
    no_core_dumps()                       # some commands hold tenant keys and mail
    private_umask()                       # reindex/restore/import from a root shell: private files
    args = build_parser().parse_args(argv)
    if getattr(args, "without_config", False):
        # `mailtresor setup` writes the configuration: it cannot need one.
        return run(None, args)
    from mailtresor import config as configmod     # here: --help and usage errors need none of it
    try:
        cfg = configmod.load(configmod.locate(args.config))
    except configmod.ConfigError as e:
        print(f"mailtresor: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return run(cfg, args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


def run(cfg, args) -> int:
    """Run a parsed command; a user error becomes its line and exit code."""
    try:
        return args.func(cfg, args)
    except UserError as e:
        print(f"mailtresor: {e}", file=sys.stderr)
        return e.code
    except Exception as e:
        message = _failure(e)
        if message is None:
            raise
        print(f"mailtresor: {message}", file=sys.stderr)
        return EXIT_FAIL


def _failure(e: Exception) -> str | None:
    """The line to print for a missing key or a store problem; None for
    anything else.  Their classes are looked up only in modules already
    imported (an instance cannot exist otherwise): a search through the
    daemon imports neither the key client nor the store."""
    keys = sys.modules.get("mailtresor.keys.ring")
    if keys is not None and isinstance(e, keys.KeyUnavailable):
        return f"no key: {e}"
    store = sys.modules.get("mailtresor.archive.store")
    if store is not None and isinstance(e, store.StoreError):
        return str(e)
    audit = sys.modules.get("mailtresor.access.audit")
    if audit is not None and isinstance(e, audit.AuditError):
        # Reading the archive without the daemon appends to its audit
        # trail: no trail, no read.
        return f"audit trail: {e}"
    return None


if __name__ == "__main__":
    sys.exit(main())
