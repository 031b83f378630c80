"""`mailtresor`: the administrator's command line, working on the local
appliance (its configuration, spool and store).

User errors (unknown tenant, bad query, no key, unreadable configuration)
print one line naming the problem and exit non-zero; no tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import config as configmod

EXIT_USAGE = 2
EXIT_FAIL = 1


class UserError(Exception):
    """A problem the user can fix; printed without a traceback."""

    def __init__(self, message: str, code: int = EXIT_FAIL):
        super().__init__(message)
        self.code = code


def _count(d: Path) -> int:
    try:
        return sum(1 for n in os.listdir(d) if not n.startswith("."))
    except FileNotFoundError:
        return 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def daemon_status(cfg) -> dict:
    """What the daemon last published (status.json in the runtime
    directory), checked against the process table, plus what the spool
    directory shows right now."""
    doc: dict = {"daemon": "not running"}
    path = cfg.appliance.runtime_directory / "status.json"
    try:
        published = json.loads(path.read_text())
    except FileNotFoundError:
        published = None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable status file: {e}")
    if published is not None:
        alive = _pid_alive(int(published.get("pid", 0))) and published.get("state") != "stopped"
        doc["daemon"] = "running" if alive else "not running"
        doc["state"] = published.get("state")
        doc["status"] = published.get("status")
        doc["status_age_seconds"] = round(time.time() - float(published.get("time", 0)), 1)
        doc["keys"] = published.get("keys")
        doc["listeners"] = published.get("listeners")
        doc["milter"] = published.get("milter")
        doc["relay_processes"] = published.get("relay_processes")
    spool = cfg.spool.directory
    doc["spool"] = {"directory": str(spool), "ready": _count(spool / "new"),
                    "in_progress": _count(spool / "tmp"), "set_aside": _count(spool / "bad")}
    return doc


def cmd_status(cfg, args) -> int:
    doc = daemon_status(cfg)
    if args.json:
        print(json.dumps(doc, indent=1, sort_keys=True))
    else:
        print(f"daemon:   {doc['daemon']}" + (f" ({doc['state']}: {doc['status']})" if doc.get("state") else ""))
        for lst in doc.get("listeners") or []:
            print(f"relay:    {lst}")
        if doc.get("milter"):
            print(f"milter:   {doc['milter']}")
        if doc.get("keys"):
            print(f"keys:     {doc['keys']}")
        sp = doc["spool"]
        print(f"spool:    {sp['ready']} ready, {sp['in_progress']} being written, "
              f"{sp['set_aside']} set aside ({sp['directory']})")
    return 0 if doc["daemon"] == "running" else 3   # 3: "not running", as LSB status actions


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mailtresor", description="mailtresor archive administration")
    p.add_argument("--config", help=f"configuration file (default ${configmod.ENV_VAR} or {configmod.DEFAULT_PATH})")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    s = sub.add_parser("status", help="daemon state, keys held, spool depth")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_status)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = configmod.load(configmod.locate(args.config))
    except configmod.ConfigError as e:
        print(f"mailtresor: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(cfg, args)
    except UserError as e:
        print(f"mailtresor: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
