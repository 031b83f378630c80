"""One table from internal failures to what the sender is told.

Both ingest paths use it: the relay sends the SMTP reply, the milter hands
the same code and text to the MTA with smfi_setreply().  Every storage
failure is temporary (4xx): the sender keeps the message and retries, so
nothing is lost.  The only permanent answer here is for a message larger
than the configured limit, which no retry can fix.
"""

from __future__ import annotations

from typing import NamedTuple

from mailtresor.ingest.spool import (MessageTooLarge, SpoolClosed, SpoolError, SpoolFull, SpoolIOError,
                    SpoolUnavailable)


class Reply(NamedTuple):
    code: int
    enhanced: str
    text: str

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    def line(self) -> bytes:
        return f"{self.code} {self.enhanced} {self.text}\r\n".encode()


NO_KEY = Reply(421, "4.3.0", "Service not available: archive keys not yet available, try again later")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, closing transmission channel")
STORAGE_FULL = Reply(452, "4.3.1", "Insufficient system storage")
WRITE_ERROR = Reply(451, "4.3.0", "Error: queue file write error, try again later")
INTERNAL = Reply(451, "4.3.0", "Error: internal error, try again later")
TOO_LARGE = Reply(552, "5.3.4", "Error: message size exceeds fixed maximum message size")

_TABLE: list[tuple[type, Reply]] = [
    (SpoolUnavailable, Reply(451, "4.3.0", "Archive keys not available yet, try again later")),
    (SpoolFull, STORAGE_FULL),
    (SpoolIOError, WRITE_ERROR),
    (SpoolClosed, SHUTTING_DOWN),
    (MessageTooLarge, TOO_LARGE),
    (SpoolError, WRITE_ERROR),
]


def for_failure(exc: BaseException) -> Reply:
    """The reply for a failure while admitting or committing a message."""
    for cls, reply in _TABLE:
        if isinstance(exc, cls):
            return reply
    return INTERNAL


def at_greeting(exc: BaseException) -> Reply | None:
    """The 421 a new connection gets when the spool cannot take mail at all;
    None when the failure may pass (a full spool is reported at MAIL FROM)."""
    if isinstance(exc, SpoolUnavailable):
        return NO_KEY
    if isinstance(exc, SpoolClosed):
        return SHUTTING_DOWN
    return None
