"""Exchange journal reports ("envelope journaling", Exchange 2007 and later).

A journal report is a message with ``X-MS-Journal-Report:`` in its top-level
header (the value is often empty) and a multipart body:

    text/plain       the report body: one field per line
    message/rfc822   the journaled message, unaltered

The report body (Microsoft's "Journal report fields"):

    Sender: user@contoso.com
    Subject: the subject
    Message-Id: <id@contoso.com>
    To: a@contoso.com
    Cc: b@contoso.com
    Bcc: c@contoso.com
    Recipient: d@contoso.com                    (addressing Exchange could not verify)
    To: member@contoso.com, Expanded: dl@contoso.com
    Cc: alt@contoso.com, Forwarded: user@contoso.com
    On-Behalf-Of: boss@contoso.com              (and other fields: kept in `extra`)

The recipient lines are the message's envelope: they are what the archive
records as recipients, Bcc and distribution-group members included.

Who may have a report unwrapped is not decided here but at acceptance
(a journaling relay connector, spool.Envelope.journaling); `untrusted_reason()`
applies that decision and the Exchange Online tenant id check to a message.
From anywhere else a message with a journal-report header is an ordinary
message: archived as received, flagged "journal-untrusted".

`unwrap()` takes the journaled message out byte for byte: it finds the MIME
boundary lines in the raw bytes and returns what lies between the blank line
after the part's headers and the line break before the next boundary line,
decoded only if the part itself has a base64 or quoted-printable transfer
encoding (Exchange Online does that).  Nothing is re-serialised.

Decisions:

- The report's field names are case-insensitive; the report body may be
  quoted-printable or base64; lines may end in CRLF or LF; blank lines are
  skipped; a line starting with white space continues the field before it;
  a line that is not ``Name: value`` is kept in ``extra["(unparsed)"]``.
- Addresses (sender, recipients, Expanded/Forwarded sources) are lowercased
  addr-specs (``Name <addr>`` and ``<addr>`` forms are accepted).
  `message_id` has its angle brackets stripped, like `parse.Parsed.message_id`.
- `extra` is keyed by the lowercased field name.  A second Sender, Subject
  or Message-Id line is kept there too (the first one wins).
- More than one message/rfc822 part is a JournalError, not "take the first":
  Exchange never sends that, and taking one would silently leave the other
  message out of the archive; on a JournalError the caller keeps the whole
  report (the archiver archives it as received, flagged).
- A report without its closing boundary line is a JournalError (truncated:
  the attached message may be incomplete).
- The line break before a boundary line belongs to the boundary: CRLF if the
  report's first boundary line ends in CRLF, else LF (so an attached message
  that ends in a bare CR keeps it in a report with LF lines).
"""

from __future__ import annotations

import binascii
import codecs
import email.header
import email.message
import email.parser
import email.policy
import email.utils
import quopri
import re
from dataclasses import dataclass, field

_COMPAT = email.policy.compat32
_JOURNAL_HEADER = re.compile(rb"^x-ms-journal-report[ \t]*:", re.I | re.M)
_FIELD = re.compile(r"^([!-9;-~]+)[ \t]*:[ \t]*(.*)$")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_REDIRECT = re.compile(r"\s*,\s*(expanded|forwarded)\s*:\s*", re.I)
_ANGLE = re.compile(r"<([^<>]*)>")

RECIPIENT_KINDS = ("to", "cc", "bcc", "recipient")
UNPARSED = "(unparsed)"


class JournalError(Exception):
    """The report is unusable; the message is a reason, without message content."""


@dataclass
class JournalRecipient:
    address: str          # lowercased addr-spec
    kind: str             # "to" | "cc" | "bcc" | "recipient"
    expanded: str = ""    # group it was expanded from
    forwarded: str = ""   # original recipient it was forwarded from

    def key(self) -> tuple[str, str, str, str]:
        return (self.address, self.kind, self.expanded, self.forwarded)


@dataclass
class JournalReport:
    sender: str
    subject: str
    message_id: str
    recipients: list[JournalRecipient]
    original: bytes       # the attached message, byte for byte as it appears in the report
    extra: dict[str, list[str]] = field(default_factory=dict)


def is_journal_report(raw: bytes) -> bool:
    """True if the top-level header block (not an attached message's) has X-MS-Journal-Report."""
    head_end, _ = _split_head(raw, 0)
    return _JOURNAL_HEADER.search(raw, 0, head_end) is not None


def cross_tenant_ids(raw: bytes) -> list[str]:
    """The X-MS-Exchange-CrossTenant-Id values of the top-level header
    (Exchange Online stamps the sending organisation's tenant id there),
    lower case, without white space or braces."""
    head_end, _ = _split_head(raw, 0)
    values = _header_block(raw[:head_end]).get_all("x-ms-exchange-crosstenant-id") or []
    return ["".join(str(v).split()).strip("{}").lower() for v in values]


def untrusted_reason(raw: bytes, journaling: dict | None) -> str | None:
    """Why a message with a journal-report header must not be unwrapped, or
    None if it may be.  `journaling` is what the relay recorded for a
    journaling connector (spool.Envelope.journaling); anything else --
    the milter, a connector that is not journaling, an import without
    --journal -- is no journal source at all.  With a tenant id, the
    report's top-level X-MS-Exchange-CrossTenant-Id must be that id, once
    (two different ones are no answer).  The reason names no content."""
    if not isinstance(journaling, dict):
        return "not from a journaling connector"
    want = "".join(str(journaling.get("tenant_id") or "").split()).strip("{}").lower()
    if not want:
        return None
    found = set(cross_tenant_ids(raw))
    if not found:
        return "no X-MS-Exchange-CrossTenant-Id, the connector expects its organisation's"
    if found != {want}:
        return "X-MS-Exchange-CrossTenant-Id is not the connector's organisation"
    return None


def unwrap(raw: bytes) -> JournalReport:
    """The journaled message and its envelope; JournalError if the report is unusable."""
    head_end, body_start = _split_head(raw, 0)
    if not _JOURNAL_HEADER.search(raw, 0, head_end):
        raise JournalError("not a journal report: no X-MS-Journal-Report field in the top-level header")
    top = _header_block(raw[:head_end])
    ctype = top.get_content_type()
    if top.get_content_maintype() != "multipart":
        raise JournalError(f"journal report is {_printable(ctype)}, not multipart")
    boundary = top.get_boundary()
    if not boundary:
        raise JournalError("journal report is multipart without a boundary parameter")
    try:
        boundary_bytes = boundary.encode("utf-8", "surrogateescape")
    except UnicodeError:
        raise JournalError("journal report has an unusable boundary parameter") from None
    parts = _parts(raw, body_start, boundary_bytes)

    report_part = None
    originals = []
    for start, end in parts:
        h_end, b_start = _split_head(raw, start, end)
        headers = _header_block(raw[start:h_end])
        kind = headers.get_content_type()
        if kind == "message/rfc822":
            originals.append((headers, b_start, end))
        elif kind == "text/plain" and report_part is None:
            report_part = (headers, b_start, end)
    if not originals:
        raise JournalError("journal report has no message/rfc822 part: the journaled message is missing")
    if len(originals) > 1:
        raise JournalError(f"journal report has {len(originals)} message/rfc822 parts; expected exactly one")
    if report_part is None:
        raise JournalError("journal report has no text/plain report body")

    headers, b_start, end = originals[0]
    original = _transfer_decode(raw[b_start:end], _cte(headers), "attached message")
    if not original.strip():
        raise JournalError("the attached message is empty")

    headers, b_start, end = report_part
    body = _transfer_decode(raw[b_start:end], _cte(headers), "report body")
    text = _decode_text(body, headers.get_content_charset())
    report = _parse_fields(text)
    report.original = original
    return report


def merge_recipients(a: list[JournalRecipient], b: list[JournalRecipient]) -> list[JournalRecipient]:
    """Union of two recipient lists: order kept, duplicates (all four fields equal) dropped."""
    seen: set[tuple[str, str, str, str]] = set()
    out: list[JournalRecipient] = []
    for r in (*a, *b):
        k = r.key()
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out


# ---------------------------------------------------------------- MIME, on the raw bytes

def _split_head(data: bytes, start: int, end: int | None = None) -> tuple[int, int]:
    """(end of the header block, start of the body) of the entity at data[start:end]."""
    if end is None:
        end = len(data)
    if data.startswith(b"\r\n", start, end):
        return start, start + 2
    if data.startswith(b"\n", start, end):
        return start, start + 1
    crlf = data.find(b"\n\r\n", start, end)
    lf = data.find(b"\n\n", start, end)
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf + 1, crlf + 3
    if lf >= 0:
        return lf + 1, lf + 2
    return end, end


def _parts(raw: bytes, body_start: int, boundary: bytes) -> list[tuple[int, int]]:
    """Offsets of the body parts of a multipart entity: each part runs from
    after its boundary line's line break to before the line break that
    precedes the next boundary line (RFC 2046, 5.1.1)."""
    delimiter = re.compile(rb"^--" + re.escape(boundary) + rb"(--)?[ \t]*\r?$", re.M)
    parts: list[tuple[int, int]] = []
    start = None
    crlf = True   # the report's line ending, as its first boundary line has it
    for m in delimiter.finditer(raw, body_start):
        if start is None:
            crlf = m.group(0).endswith(b"\r")
        else:
            # the line break before a boundary line is the boundary's; in a
            # report with LF lines a CR before it belongs to the part
            end = m.start()
            if crlf and raw[end - 2:end] == b"\r\n" and end - 2 >= start:
                end -= 2
            elif raw[end - 1:end] == b"\n" and end - 1 >= start:
                end -= 1
            parts.append((start, end))
        if m.group(1):   # the close delimiter
            return parts
        start = m.end() + 1 if raw[m.end():m.end() + 1] == b"\n" else m.end()
    if start is None:
        raise JournalError("journal report has no MIME boundary line")
    raise JournalError("journal report has no closing MIME boundary line (truncated?)")


def _header_block(head: bytes) -> email.message.Message:
    return email.parser.BytesHeaderParser(policy=_COMPAT).parsebytes(head)


def _cte(headers: email.message.Message) -> str:
    return str(headers.get("content-transfer-encoding", "")).strip().lower()


def _transfer_decode(data: bytes, cte: str, what: str) -> bytes:
    if cte in ("", "7bit", "8bit", "binary"):
        return data
    if cte == "base64":
        try:
            return binascii.a2b_base64(b"".join(data.split()), strict_mode=True)
        except (binascii.Error, ValueError):
            raise JournalError(f"{what}: invalid base64") from None
    if cte == "quoted-printable":
        return quopri.decodestring(data)
    raise JournalError(f"{what}: unsupported Content-Transfer-Encoding {_printable(cte)}")


def _printable(s: str, limit: int = 40) -> str:
    s = "".join(c if " " <= c <= "~" else "?" for c in s[:limit])
    return repr(s)


def _decode_text(data: bytes, charset: str | None) -> str:
    for cs in (charset, "utf-8"):
        if not cs:
            continue
        try:
            return data.decode(codecs.lookup(cs).name)
        except (LookupError, UnicodeError, ValueError):
            pass
    return data.decode("cp1252", "replace")


# ---------------------------------------------------------------- the report body

def _parse_fields(text: str) -> JournalReport:
    fields: list[list[str]] = []   # [name, value]
    unparsed: list[str] = []
    for line in _LINE_BREAK.split(text):
        if not line.strip():
            continue
        if line[0] in " \t" and fields:
            fields[-1][1] += line
            continue
        m = _FIELD.match(line)
        if m:
            fields.append([m.group(1).lower(), m.group(2)])
        else:
            unparsed.append(line.strip())

    report = JournalReport(sender="", subject="", message_id="", recipients=[], original=b"", extra={})
    seen: set[str] = set()
    known = 0
    for name, value in fields:
        value = value.strip()
        if name in RECIPIENT_KINDS:
            known += 1
            report.recipients = merge_recipients(report.recipients, _recipients(name, value))
        elif name in ("sender", "subject", "message-id") and name not in seen:
            known += 1
            seen.add(name)
            if name == "sender":
                report.sender = _first_address(value)
            elif name == "subject":
                report.subject = _decode_words(value)
            else:
                m = _ANGLE.search(value)
                report.message_id = (m.group(1) if m else value).strip()
        else:
            report.extra.setdefault(name, []).append(value)
    if unparsed:
        report.extra[UNPARSED] = unparsed
    if not known:
        raise JournalError("journal report body has no journal report fields")
    if not report.recipients:
        raise JournalError("journal report body lists no recipients")
    return report


def _recipients(kind: str, value: str) -> list[JournalRecipient]:
    pieces = _REDIRECT.split(value)
    expanded = forwarded = ""
    for i in range(1, len(pieces) - 1, 2):
        source = _first_address(pieces[i + 1])
        if pieces[i].lower() == "expanded":
            expanded = expanded or source
        else:
            forwarded = forwarded or source
    return [JournalRecipient(address=a, kind=kind, expanded=expanded, forwarded=forwarded)
            for a in _addresses(pieces[0])]


def _addresses(value: str) -> list[str]:
    value = value.strip()
    if not value:
        return []
    if "<" in value or '"' in value:
        try:
            found = [a for _, a in email.utils.getaddresses([value]) if a]
        except Exception:
            found = []
        if not found:
            found = _ANGLE.findall(value) or [value]
    else:
        found = value.split(",")
    out = []
    for a in found:
        a = a.strip().strip("<>").strip().lower()
        if a and a not in out:
            out.append(a)
    return out


def _first_address(value: str) -> str:
    found = _addresses(value)
    return found[0] if found else ""


def _decode_words(value: str) -> str:
    if "=?" not in value:
        return value
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except Exception:
        return value
