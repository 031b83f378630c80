"""What every command module of the CLI shares: the user error, exit
codes, the checks of a configured tenant and archive, formatting helpers.

Light on purpose (no store, index or key client): every command imports it.
"""

from __future__ import annotations

import time

EXIT_FAIL = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3      # `status` of a stopped daemon, as LSB status actions say it


class UserError(Exception):
    """A problem the user can fix; printed as one line, no traceback."""

    def __init__(self, message: str, code: int = EXIT_FAIL):
        super().__init__(message)
        self.code = code


def archive_section(cfg):
    """The configuration's [archive], or a UserError saying there is none."""
    if cfg.archive is None:
        raise UserError(f"{cfg.source}: no [archive] section: this appliance keeps no archive")
    return cfg.archive


def backup_source(a, given):
    """The backup directory a command reads: --from, else [archive]
    backup_directory; UserError naming what is missing."""
    from pathlib import Path
    src = Path(given) if given else a.backup_directory
    if src is None:
        raise UserError("no backup directory: give --from or set archive.backup_directory")
    if not Path(src).is_dir():
        raise UserError(f"{src}: no such backup directory")
    return Path(src)


def known_tenant(cfg, name: str) -> str:
    """`name` if the configuration has that tenant, else a UserError that
    lists the configured ones."""
    names = [t.name for t in cfg.tenant]
    if name not in names:
        raise UserError(f"unknown tenant {name!r} (configured: {', '.join(names) or 'none'})")
    return name


def fetching_keys(cfg):
    """Keys fetched from the control endpoint as they are needed (this
    process's own, held in memory until it exits)."""
    from mailtresor.assemble import build_keys
    return build_keys(cfg)


def minute(t) -> str:
    """A time (epoch seconds, or ISO 8601 text) as `YYYY-MM-DD HH:MM` UTC; "-" if none."""
    if t is None or t == "":
        return "-"
    if isinstance(t, str):
        # ISO 8601 as the access core gives it ("2002-08-22T10:00:00Z"): cut, do not parse.
        return t[:16].replace("T", " ") if len(t) >= 16 and t[10] == "T" else t
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(float(t)))


def clip(text, n: int) -> str:
    """One line of at most n characters (an ellipsis where cut)."""
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n - 1] + "…"


def plural(n: int, one: str, many: str | None = None) -> str:
    """`1 record`, `2 records` (`many` where the plural is not one + "s")."""
    return f"{n} {one if n == 1 else (many or one + 's')}"


def size(n: int) -> str:
    """A byte count for people: "512 B", "3.2 MiB"."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
