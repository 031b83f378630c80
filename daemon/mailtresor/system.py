"""What a process of the appliance needs from the system: logging set up
for journald or a terminal, and sd_notify(3).

Used by the daemon (mailtresor.service) and the control endpoint
(mailtresor.control.server) alike, so that neither imports the other's
wiring.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("mailtresor")

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}
_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                    logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    """journald reads "<N>" prefixes as priorities; it adds the time itself."""

    def format(self, record):
        return f"<{_SYSLOG_PRIORITY.get(record.levelno, 6)}>{record.name}: {record.getMessage()}" + (
            "\n" + self.formatException(record.exc_info) if record.exc_info else "")


def setup_logging(level: str = "info") -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(_LEVELS.get(level, logging.INFO))
    # Twisted's own messages go the same way, at warning and above.
    from twisted.logger import (FilteringLogObserver, LogLevel, LogLevelFilterPredicate,
                                STDLibLogObserver, globalLogBeginner)
    pred = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(STDLibLogObserver(name="twisted"), [pred])],
                                     redirectStandardIO=False, discardBuffer=True)


def notify(*lines: str) -> None:
    """sd_notify(3); a no-op outside systemd."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    try:
        from systemd import daemon
        daemon.notify("\n".join(lines))
    except Exception as e:  # noqa: BLE001 - never fatal
        log.debug("sd_notify failed: %s", e)
