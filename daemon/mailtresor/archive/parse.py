"""What the index needs from a raw message: addresses, subject, date, text.

`parse_message(raw)` is pure and never raises: whatever is wrong with a
message becomes a flag, and whatever can still be read is returned.  It never
re-serialises `raw` (the archive keeps the bytes as they arrived; parsing only
extracts).

The MIME tree is split by the email package's parser under the compat32
policy, and headers are decoded with the `email.policy.default` header
classes, one header at a time.  (The parser under policy.default gives the
same tree, but builds a header object every time it, or we, look at a part's
Content-Type: a third of all parsing time.  Every Content-Type and
Content-Disposition parameter is read the compat32 way anyway, see _shell(),
because compat32's parameter parsing never raises.  tests/test_parse.py
checks that both give the same result over the corpus.)  When a header
class raises on a broken value (several do, see tests/test_parse.py), that
header is decoded the compat32 way instead
(`email.header.decode_header`, `email.utils.getaddresses`) and the message
gets the flag ``bad-header:NAME``.  Raw 8-bit bytes in headers (common in
spam) are read as UTF-8, else in the charset of the message's first text
part, else as windows-1252, before any decoding: the default policy would
turn them into U+FFFD.

Body text is the text of the inline text/plain and text/html parts (HTML
without tags, script and style; entities resolved), in message order; both
alternatives of a multipart/alternative are kept, as a reader may have seen
either.  Everything else is an attachment: a part with a file name, with
``Content-Disposition: attachment``, or of a non-text type.  Attachment text
comes from text/* parts, PDF (`pdftotext`), Office Open XML (.docx, .xlsx,
.pptx) and attached messages (message/rfc822: their From, To, Cc, Date,
Subject and body text; the attachments of an attached message are listed
after it, flattened, down to MAX_DEPTH levels).

Message flags:

    bad-header:NAME     the default policy raised on header NAME; decoded the compat32 way
    defects             the email parser recorded defects (bad MIME structure, bad base64...)
    unknown-charset     a text part or header declares a charset Python does not know
    undecodable-part    a text part's bytes are not valid in its charset; decoded with replacement
    text-truncated      body_text was cut at MAX_TEXT characters
    too-many-parts      more than MAX_PARTS MIME parts; the rest were not read
    too-deep            multiparts nested deeper than MAX_NESTING; the deeper ones were not read
    parse-error         the parser itself failed (e.g. its recursion limit); the headers
                        are read and the undivided body is taken as text
    extraction-truncated  the message's extraction budget (Limits: CPU time, total text,
                        total decoded/decompressed bytes) ran out: what was extracted
                        until then is kept, later parts are listed without their text

Attachment flags:

    undecodable         the transfer encoding or the charset is broken; partial text
    unsupported-type    no text extractor for this type (images, signatures...)
    too-large           not handed to an extractor (over PDF_MAX_BYTES, OOXML_MAX_BYTES)
    pdftotext-failed    pdftotext exited non-zero, timed out or is missing
    ooxml-failed        not a readable zip / OOXML package
    ooxml-limit         uncompressed size over OOXML_MAX_UNCOMPRESSED (zip bomb guard); partial text
    depth-limit         an attached message nested deeper than MAX_DEPTH; not read
    text-truncated      text cut at MAX_TEXT characters
    extraction-truncated  this attachment's text was cut, or not extracted, because the
                        message's extraction budget ran out

The budget (`Limits`, from [archive] in the configuration) bounds what one
message may cost, whatever it holds: zip and XML bombs in Office files, PDF
decompression bombs, a thousand parts, huge headers.  Extractors are checked
against it as they go (OOXML is read in chunks, HTML fed in chunks,
`pdftotext` runs with the time left as its CPU limit and timeout, in its own
process group, killed as a group, with PR_SET_PDEATHSIG so it never outlives
the parser).  A message over budget is still archived, flagged.

An attached message (message/rfc822) also carries the message flags of its
own headers and parts (``bad-header:NAME``, ``undecodable-part``...); its
``size`` is an estimate (the parser keeps no offsets into `raw`).
"""

from __future__ import annotations

import binascii
import calendar
import codecs
import email
import email.header
import email.message
import email.parser
import email.policy
import email.utils
import ctypes
import functools
import io
import os
import quopri
import re
import resource
import selectors
import signal
import subprocess
import threading
import time
import zipfile
from dataclasses import dataclass, field
from html import unescape
from html.parser import HTMLParser

MAX_TEXT = 1_000_000                 # characters of body_text, and of each attachment's text
MAX_DEPTH = 3                        # levels of attached messages read
MAX_PARTS = 1000                     # MIME parts read per message (nested messages included)
MAX_NESTING = 60                     # multipart levels followed (the parser recurses per level)
PDF_MAX_BYTES = 32 * 1024 * 1024     # larger PDFs are not handed to pdftotext
PDF_TIMEOUT = 20.0                   # seconds
PDF_MAX_PAGES = 2000
OOXML_MAX_BYTES = 64 * 1024 * 1024   # compressed package size
OOXML_MAX_UNCOMPRESSED = 64 * 1024 * 1024
_HTML_MAX_INPUT = 4 * MAX_TEXT       # characters of markup handed to the HTML stripper
# Header values longer than this are decoded the compat32 way: the default
# policy's header parser is superlinear (a 1 MB Subject of encoded words
# takes a minute), compat32's is not, and no real header comes near it.
HEADER_MAX = 32 * 1024
# Subject and address header values are cut here (and the message flagged
# extraction-truncated): even the compat32 way, a megabyte of addresses or
# encoded words costs seconds.  A To: of 5,000 addresses fits.
HEADER_CUT = 256 * 1024
EXTRACTOR_MAX_MEMORY = 1024 * 1024 * 1024   # RLIMIT_AS of pdftotext
_CHUNK = 1024 * 1024                 # bytes of a zip member read between budget checks
_HTML_CHUNK = 128 * 1024             # characters of markup fed between budget checks

_DEFAULT = email.policy.default      # header decoding
_TREE = email.policy.compat32        # splitting the MIME tree (see the module's docstring)


@dataclass(frozen=True)
class Limits:
    """The extraction budget of one message ([archive] extract_* in the
    configuration).  The defaults leave every message of the test corpus
    untouched, and hold a hostile one to about two seconds of CPU."""

    # CPU seconds of parsing and extraction (pdftotext's included) per
    # message: cpu_seconds, plus cpu_seconds_per_mib for each MiB of the
    # raw message (big attachments legitimately take longer; bombs are small).
    cpu_seconds: float = 2.0
    cpu_seconds_per_mib: float = 1.0
    # Characters of text per message: body and all attachments together.
    max_text: int = 4 * MAX_TEXT
    # Bytes decoded and decompressed per message (transfer encodings, zip
    # members, pdftotext output), beyond the size of the message itself.
    max_expanded: int = 128 * 1024 * 1024
    # Levels of attached messages, MIME parts, multipart nesting.
    max_depth: int = MAX_DEPTH
    max_parts: int = MAX_PARTS
    max_nesting: int = MAX_NESTING


LIMITS = Limits()   # what parse_message uses unless told otherwise; see configure()


def limits_of(archive) -> Limits:
    """The budget of a config.Archive ([archive] extract_*)."""
    return Limits(cpu_seconds=archive.extract_cpu_seconds,
                  cpu_seconds_per_mib=archive.extract_cpu_seconds_per_mib,
                  max_text=archive.extract_max_text, max_expanded=archive.extract_max_expanded,
                  max_depth=archive.extract_max_depth, max_parts=archive.extract_max_parts,
                  max_nesting=archive.extract_max_nesting)


def configure(limits: Limits) -> None:
    """Make `limits` the default budget of parse_message in this process."""
    global LIMITS
    LIMITS = limits


class _Budget:
    """What one message may still spend.  Once any part of it is spent,
    `over` is set and stays: the message gets ``extraction-truncated``."""

    def __init__(self, limits: Limits, raw_size: int):
        self.limits = limits
        self.cpu = limits.cpu_seconds + limits.cpu_seconds_per_mib * raw_size / (1024 * 1024)
        self.started = time.thread_time()
        self.extractors = 0.0        # CPU seconds of extractor processes
        self.text_left = limits.max_text
        self.bytes_left = limits.max_expanded + raw_size
        self.over = False

    def cpu_left(self) -> float:
        return self.cpu - (time.thread_time() - self.started) - self.extractors

    def out_of_time(self) -> bool:
        if self.cpu_left() <= 0:
            self.over = True
            return True
        return False

    def spent(self) -> bool:
        """No time, bytes or text left: nothing more is worth extracting."""
        return self.out_of_time() or self.bytes_left < 0 or self.text_left <= 0

    def spend_bytes(self, n: int) -> bool:
        """Count `n` decoded bytes; False (and over) if they did not fit."""
        self.bytes_left -= n
        if self.bytes_left < 0:
            self.over = True
        return self.bytes_left >= 0

    def take_text(self, s: str) -> str:
        """`s`, cut to the text the message may still have."""
        if len(s) > self.text_left:
            s = s[:max(0, self.text_left)]
            self.over = True
        self.text_left -= len(s)
        return s


@dataclass
class Attachment:
    filename: str          # decoded (RFC 2231/2047), "" if none
    content_type: str      # lowercased maintype/subtype
    size: int              # decoded payload bytes
    text: str              # extracted text ("" if none)
    flags: list[str] = field(default_factory=list)


@dataclass
class Parsed:
    message_id: str        # without <>, stripped, "" if none
    date: float | None     # unix time from Date:, None if absent/unparseable
    from_header: str       # the decoded From: header as display text
    from_: list[str]       # addresses, lowercased
    to: list[str]
    cc: list[str]
    bcc: list[str]         # header Bcc: (envelope-only recipients come from elsewhere)
    subject: str           # decoded, unfolded, "" if none
    body_text: str
    attachments: list[Attachment]
    flags: list[str]
    size: int              # len(raw)


def parse_message(raw: bytes, limits: Limits | None = None) -> Parsed:
    """Extract the indexable content of `raw` within the budget `limits`
    (default: LIMITS).  Never raises on bad input."""
    ctx = _Ctx(_Budget(limits or LIMITS, len(raw)))
    try:
        msg = _parse_bytes(raw, ctx)
        head = _headers(msg, ctx)
        body = _TextBuf(MAX_TEXT, ctx.budget)
        try:
            _walk(msg, ctx, body, depth=0, nesting=0)
        except Exception:   # a bug or a parser corner we did not foresee: keep what we have
            ctx.flag("parse-error")
        if body.truncated:
            ctx.flag("text-truncated")
        if ctx.budget.over:
            ctx.flag("extraction-truncated")
        return Parsed(message_id=head["message_id"], date=head["date"],
                      from_header=head["from_header"], from_=head["from"], to=head["to"],
                      cc=head["cc"], bcc=head["bcc"], subject=head["subject"],
                      body_text=_safe(body.text()), attachments=ctx.attachments,
                      flags=ctx.flags, size=len(raw))
    except Exception:
        ctx.flag("parse-error")
        return Parsed(message_id="", date=None, from_header="", from_=[], to=[], cc=[], bcc=[],
                      subject="", body_text="", attachments=ctx.attachments, flags=ctx.flags,
                      size=len(raw))


# ---------------------------------------------------------------- plumbing

class _Ctx:
    def __init__(self, budget: _Budget):
        self.budget = budget
        self.flags: list[str] = []
        self.attachments: list[Attachment] = []
        self.parts = 0
        self.hint: str | None = None     # charset of the first text part, for 8-bit headers

    def flag(self, f: str) -> None:
        if f not in self.flags:
            self.flags.append(f)


class _TextBuf:
    """Text pieces up to a limit of characters, and within the message's budget."""

    def __init__(self, limit: int, budget: _Budget):
        self.limit = limit
        self.budget = budget
        self.pieces: list[str] = []
        self.n = 0
        self.truncated = False

    def add(self, s: str) -> None:
        s = s.replace("\r\n", "\n").strip()
        if not s:
            return
        if self.n + len(s) > self.limit:
            s = s[:max(0, self.limit - self.n)]
            self.truncated = True
        s = self.budget.take_text(s)
        if not s:
            return
        self.pieces.append(s)
        self.n += len(s) + 2

    def text(self) -> str:
        return "\n\n".join(self.pieces)


def _parse_bytes(raw: bytes, ctx: _Ctx) -> email.message.Message:
    try:
        return email.parser.BytesParser(policy=_TREE).parsebytes(raw)
    except Exception:
        ctx.flag("parse-error")
    try:   # a nesting too deep for the parser's recursion, or a parser bug: headers only
        return email.parser.BytesParser(policy=_TREE).parsebytes(raw, headersonly=True)
    except Exception:
        return email.message.Message(policy=_TREE)


def _flag_defects(part, ctx: _Ctx) -> None:
    if getattr(part, "defects", None):
        ctx.flag("defects")


_SURROGATE = re.compile("[\udc80-\udcff]")
_NEWLINES = re.compile(r"[\r\n]+")
_WS_RUN = re.compile(r"[ \t\f\v\u00a0]+")
_BLANK_LINES = re.compile(r"\n[ \t]*(?:\n[ \t]*)+")


def _safe(s: str) -> str:
    """Any lone surrogate left (there should be none) would break UTF-8 encoding downstream."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "replace").decode("utf-8")


@functools.lru_cache(maxsize=256)
def _codec(charset: str) -> str | None:
    """Python's name for a MIME charset, None if unknown or not a text encoding."""
    try:
        name = codecs.lookup(charset).name
        b"a".decode(name, "replace")   # refuses bytes-to-bytes codecs (zlib, base64...)
        return name
    except Exception:
        return None


def _norm_charset(charset) -> str:
    if not charset or not isinstance(charset, str):
        return ""
    return charset.strip().strip("\"'").strip().lower()


def _decode(data: bytes, charset) -> tuple[str, list[str]]:
    """Decode text bytes in their declared charset; fall back to UTF-8, then
    windows-1252 (every byte but five maps).  Returns (text, problems) where
    problems are "unknown-charset" / "undecodable"."""
    problems: list[str] = []
    cs = _norm_charset(charset)
    codec = _codec(cs) if cs else None
    if cs and codec is None:
        problems.append("unknown-charset")
    if codec:
        try:
            return data.decode(codec), problems
        except Exception:
            pass
    try:
        text = data.decode("utf-8")
        if codec:   # declared something else, and it did not fit
            problems.append("undecodable")
        return text, problems
    except UnicodeDecodeError:
        pass
    if codec and codec != "ascii":
        try:
            return data.decode(codec, "replace"), problems + ["undecodable"]
        except Exception:
            pass
    # unlabelled, mislabelled or unknown 8-bit text: by far most often windows-1252
    text = data.decode("cp1252", "replace")
    if codec or "\ufffd" in text:
        problems.append("undecodable")
    return text, problems


def _unsurrogate(s: str, hint: str | None = None) -> str:
    """Header text as the parser left it (raw 8-bit bytes as surrogate
    escapes) to real text: UTF-8 if it is, else the hint charset, else cp1252."""
    if not _SURROGATE.search(s):
        return s
    b = s.encode("utf-8", "surrogateescape")
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        pass
    codec = _codec(hint) if hint else None
    if codec and codec != "ascii":
        try:
            return b.decode(codec)
        except Exception:
            pass
    return b.decode("cp1252", "replace")


# ---------------------------------------------------------------- headers

_ADDR_HEADERS = ("from", "to", "cc", "bcc")


def _raw_headers(msg) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in msg.raw_items():
        if not isinstance(value, str):
            value = str(value)
        out.setdefault(name.strip().lower(), []).append(value)
    return out


def _unfold(value: str) -> str:
    return _NEWLINES.sub("", value)


def _decode_words(text: str, hint: str | None) -> str:
    """compat32 decoding: RFC 2047 encoded words, each in its own charset."""
    try:
        chunks = email.header.decode_header(text)
    except Exception:
        return text
    out = []
    for chunk, charset in chunks:
        if isinstance(chunk, bytes):
            if charset is None:   # the plain stretches: raw, already text once
                out.append(_unsurrogate(chunk.decode("ascii", "surrogateescape"), hint))
            else:
                out.append(_decode(chunk, charset)[0])
        else:
            out.append(chunk)
    # decode_header drops the whitespace between an encoded word and plain text
    # inconsistently; join the way make_header() does
    return _join_words(out, chunks)


def _join_words(out: list[str], chunks) -> str:
    if len(out) <= 1:
        return "".join(out)
    res = out[0]
    for i in range(1, len(out)):
        prev_encoded = chunks[i - 1][1] is not None
        cur_encoded = chunks[i][1] is not None
        if prev_encoded and cur_encoded:
            res += out[i]
        elif res.endswith((" ", "\t")) or out[i].startswith((" ", "\t")):
            res += out[i]
        else:
            res += " " + out[i]
    return res


def _message_hint(msg) -> str | None:
    """The charset of the first part that declares one (for raw 8-bit headers)."""
    try:
        for n, part in enumerate(msg.walk()):
            if n > 20:
                break
            cs = _norm_charset(_shell(part).get_param("charset"))
            if cs and _codec(cs):
                return cs
    except Exception:
        pass
    return None


def _headers(msg, ctx: _Ctx) -> dict:
    raw = _raw_headers(msg)
    if any(_SURROGATE.search(v) for vs in raw.values() for v in vs):
        ctx.hint = _message_hint(msg)
    return _decode_headers(raw, ctx, ctx.hint)


def _decode_headers(raw: dict[str, list[str]], ctx: _Ctx, hint: str | None) -> dict:
    res: dict = {"from_header": ""}
    for name in ("subject", *_ADDR_HEADERS):   # cut what no real header needs (see HEADER_CUT)
        values = raw.get(name, ())
        if any(len(v) > HEADER_CUT for v in values):
            ctx.flag("extraction-truncated")
            raw[name] = [v[:HEADER_CUT] for v in values]
    for name in _ADDR_HEADERS:
        addrs: dict[str, None] = {}    # ordered, and a set: ten thousand addresses are not quadratic
        texts: list[str] = []
        for value in raw.get(name, ()):
            text, found = _address_header(name, value, ctx, hint)
            texts.append(text)
            for a in found:
                addrs.setdefault(a)
        res[name] = list(addrs)
        if name == "from":
            res["from_header"] = _safe(", ".join(t for t in texts if t))
    subj = raw.get("subject")
    res["subject"] = _safe(_unstructured("subject", subj[0], ctx, hint)) if subj else ""
    mid = raw.get("message-id")
    res["message_id"] = _message_id(_unsurrogate(_unfold(mid[0]), hint)) if mid else ""
    date = raw.get("date")
    res["date"] = _date(_unsurrogate(_unfold(date[0]), hint)) if date else None
    return res


def _unstructured(name: str, value: str, ctx: _Ctx, hint) -> str:
    text = _unsurrogate(_unfold(value), hint)
    if len(text) > HEADER_MAX:
        return _decode_words(text, hint).strip()
    try:
        return str(_DEFAULT.header_factory(name, text)).strip()
    except Exception:
        ctx.flag(f"bad-header:{name}")
        return _decode_words(text, hint).strip()


def _address_header(name: str, value: str, ctx: _Ctx, hint) -> tuple[str, list[str]]:
    text = _unsurrogate(_unfold(value), hint)
    if len(text) <= HEADER_MAX:   # (longer: the compat32 way below, not a broken header)
        try:
            h = _DEFAULT.header_factory(name, text)
            addrs = [a.addr_spec.strip().lower() for a in h.addresses]
            return str(h).strip(), [a for a in addrs if a and a != "<>"]
        except Exception:
            ctx.flag(f"bad-header:{name}")
    decoded = _decode_words(text, hint).strip()
    try:
        pairs = email.utils.getaddresses([text])
    except Exception:
        pairs = []
    addrs = []
    for _, addr in pairs:
        addr = _decode_words(addr, hint).strip().lower()
        if addr and addr != "<>":
            addrs.append(addr)
    return decoded, addrs


_MSGID = re.compile(r"<([^<>]*)>")


def _message_id(value: str) -> str:
    m = _MSGID.search(value)
    v = m.group(1) if m else value
    return _safe(v.strip().strip("<>").strip())


def _date(value: str) -> float | None:
    try:
        t = email.utils.parsedate_tz(value)
        if t is None:
            return None
        # no zone given: UTC, not the appliance's local time (parsedate's mktime_tz would use that)
        return float(calendar.timegm(t[:6]) - (t[9] or 0))
    except Exception:
        return None


# ---------------------------------------------------------------- MIME walk

def _shell(part) -> email.message.Message:
    """A compat32 view of a part's MIME headers: compat32's parameter parsing
    never raises, whatever the value."""
    m = email.message.Message()
    for name, value in part.raw_items():
        if name.lower() in ("content-type", "content-disposition", "content-transfer-encoding"):
            m[name] = value if isinstance(value, str) else str(value)
    try:
        m.set_default_type(part.get_default_type())
    except Exception:
        pass
    return m


def _filename(shell: email.message.Message, hint) -> str:
    try:
        name = shell.get_filename() or ""
    except Exception:
        name = ""
    if not name:
        return ""
    name = _unsurrogate(_unfold(name), hint)
    if "=?" in name:
        name = _decode_words(name, hint)
    return _safe(name.strip())


def _disposition(shell) -> str:
    try:
        return (shell.get_content_disposition() or "").lower()
    except Exception:
        return ""


def _content_type(shell) -> str:
    try:
        return shell.get_content_type().lower()
    except Exception:
        return "application/octet-stream"


def _cte(shell) -> str:
    return str(shell.get("content-transfer-encoding", "")).strip().lower()


def _payload_bytes(part) -> tuple[bytes, bool]:
    """The decoded payload and whether its transfer encoding was sound."""
    before = len(part.defects)
    try:
        data = part.get_payload(decode=True)
    except Exception:
        data = None
    if data is None:   # get_payload gave up: the raw payload as bytes
        try:
            p = part.get_payload()
            data = p.encode("ascii", "surrogateescape") if isinstance(p, str) else b""
        except Exception:
            data = b""
        return data, False
    return data, len(part.defects) == before


def _walk(part, ctx: _Ctx, body: _TextBuf, depth: int, nesting: int) -> None:
    budget = ctx.budget
    ctx.parts += 1
    if ctx.parts > budget.limits.max_parts:
        ctx.flag("too-many-parts")
        return
    _flag_defects(part, ctx)
    shell = _shell(part)
    ctype = _content_type(shell)
    maintype = ctype.split("/", 1)[0]
    payload = part.get_payload()
    if maintype == "multipart" and isinstance(payload, list):
        if nesting >= budget.limits.max_nesting:
            ctx.flag("too-deep")
            return
        for sub in payload:
            if isinstance(sub, email.message.Message):
                _walk(sub, ctx, body, depth, nesting + 1)
        return
    filename = _filename(shell, ctx.hint)
    disposition = _disposition(shell)
    if maintype == "message" and isinstance(payload, list):
        _attached_messages(part, shell, ctype, filename, ctx, depth, nesting)
        return
    is_body = (not filename and disposition != "attachment"
               and (ctype in ("text/plain", "text/html") or maintype == "multipart"))
    data, sound = _payload_bytes(part)
    fits = budget.spend_bytes(len(data)) and not budget.spent()
    if not fits:
        budget.over = True    # (text_left may have run out exactly: still, this part is not read)
    if is_body:
        if not fits:   # no time or room left: the text of this part is not read
            return
        # (a multipart without its boundary has its raw MIME body here: still the message's text)
        text, problems = _text_of(data, shell, ctype, budget)
        if not sound or "undecodable" in problems:
            ctx.flag("undecodable-part")
        if "unknown-charset" in problems:
            ctx.flag("unknown-charset")
        body.add(text)
        return
    att = Attachment(filename=filename, content_type=ctype, size=len(data), text="", flags=[])
    if not sound:
        att.flags.append("undecodable")
    if fits:
        _extract(att, data, shell, budget)
    else:
        att.flags.append("extraction-truncated")
    att.text = _safe(att.text)
    ctx.attachments.append(att)


def _text_of(data: bytes, shell, ctype: str, budget: _Budget) -> tuple[str, list[str]]:
    charset = None
    try:
        charset = shell.get_param("charset")
        if isinstance(charset, tuple):   # RFC 2231 form
            charset = email.utils.collapse_rfc2231_value(charset)
    except Exception:
        pass
    if ctype == "text/html" and not charset:
        charset = _meta_charset(data)
    text, problems = _decode(data, charset)
    if ctype == "text/html":
        text = html_to_text(text, budget)
    return text, problems


_META_CHARSET = re.compile(rb"<meta[^>]+charset\s*=\s*[\"']?([A-Za-z0-9_.:-]+)", re.I)


def _meta_charset(data: bytes) -> str | None:
    m = _META_CHARSET.search(data[:4096])
    return m.group(1).decode("ascii") if m else None


# ---------------------------------------------------------------- attached messages

def _attached_messages(part, shell, ctype, filename, ctx: _Ctx, depth: int, nesting: int) -> None:
    subs = part.get_payload()
    if ctype not in ("message/rfc822", "message/global"):
        # delivery-status and the like: header blocks; their lines are the text
        lines = []
        for sub in subs:
            try:
                for k, v in sub.raw_items():
                    lines.append(f"{k}: {_unsurrogate(_unfold(str(v)), ctx.hint)}")
            except Exception:
                pass
        text = "\n".join(lines)
        ctx.attachments.append(Attachment(filename=filename, content_type=ctype,
                                          size=len(text.encode("utf-8", "replace")),
                                          text=_safe(ctx.budget.take_text(text[:MAX_TEXT])), flags=[]))
        return
    att = Attachment(filename=filename, content_type=ctype, size=0, text="", flags=[])
    ctx.attachments.append(att)
    if not subs:
        att.flags.append("undecodable")
        return
    inner = subs[0]
    if _cte(shell) in ("base64", "quoted-printable"):
        # not allowed for message/rfc822, but sent: the parser took the encoded
        # text for a message; decode it and parse again
        inner = _reparse_encoded(inner, _cte(shell), att)
    att.size = _size_of(inner)
    if depth + 1 > ctx.budget.limits.max_depth:
        att.flags.append("depth-limit")
        return
    if att.size == 0:
        att.flags.append("undecodable")
    sub = _Ctx(ctx.budget)
    sub.parts = ctx.parts
    sub.hint = ctx.hint
    raw = _raw_headers(inner)
    if any(_SURROGATE.search(v) for vs in raw.values() for v in vs):
        sub.hint = _message_hint(inner) or ctx.hint
    head = _decode_headers(raw, sub, sub.hint)
    text = _TextBuf(MAX_TEXT, ctx.budget)
    lines = []
    if head["from_header"]:
        lines.append(f"From: {head['from_header']}")
    for name in ("to", "cc"):
        for value in raw.get(name, ()):
            decoded = _decode_words(_unsurrogate(_unfold(value), sub.hint), sub.hint)
            lines.append(f"{name.capitalize()}: {_safe(decoded.strip())}")
    if raw.get("date"):
        lines.append(f"Date: {_safe(_unsurrogate(_unfold(raw['date'][0]), sub.hint).strip())}")
    if head["subject"]:
        lines.append(f"Subject: {head['subject']}")
    text.add("\n".join(lines))
    try:
        _walk(inner, sub, text, depth + 1, nesting + 1)
    except Exception:   # as in parse_message: keep what was read, say so
        ctx.flag("parse-error")
    ctx.parts = sub.parts
    for f in sub.flags:
        if f in ("defects", "too-many-parts", "too-deep", "extraction-truncated"):
            ctx.flag(f)
        elif f not in att.flags:
            att.flags.append(f)
    if text.truncated:
        att.flags.append("text-truncated")
    att.text = _safe(text.text())
    ctx.attachments.extend(sub.attachments)


def _reparse_encoded(inner, cte: str, att: Attachment):
    """message/rfc822 with a base64 or quoted-printable body (not allowed, but
    sent): the parser took the encoded text for a message.  Put that text
    back together from what it parsed, decode it and parse the result."""
    payload = inner.get_payload()
    if not isinstance(payload, str):
        att.flags.append("undecodable")
        return inner
    try:
        head = "".join(f"{k}: {v}\r\n" for k, v in inner.raw_items())
        encoded = ((head + "\r\n" if head else "") + payload).encode("utf-8", "surrogateescape")
        if cte == "base64":
            data = binascii.a2b_base64(b"".join(encoded.split()))
        else:
            data = quopri.decodestring(encoded)
        return email.parser.BytesParser(policy=_TREE).parsebytes(data)
    except Exception:
        att.flags.append("undecodable")
        return inner


def _size_of(msg, depth: int = 0) -> int:
    """Size of an attached message, estimated from what the parser kept (it
    keeps no offsets, and rendering the message again is what parse must not
    do): header lines, payloads, boundary lines."""
    try:
        n = sum(len(k) + len(v) + 4 for k, v in msg.raw_items()) + 2
        payload = msg.get_payload()
        if isinstance(payload, str):
            return n + len(payload)
        if depth > MAX_NESTING:
            return n
        boundary = len(msg.get_boundary("") or "") + 6
        return n + sum(_size_of(p, depth + 1) + boundary for p in payload) + boundary
    except Exception:
        return 0


# ---------------------------------------------------------------- attachment text

_TEXT_EXTS = (".txt", ".csv", ".log", ".md", ".htm", ".html", ".xml", ".json", ".ics", ".vcf", ".tsv")
_OOXML_EXTS = (".docx", ".docm", ".dotx", ".xlsx", ".xlsm", ".pptx", ".pptm", ".ppsx")


def _extract(att: Attachment, data: bytes, shell, budget: _Budget) -> None:
    name = att.filename.lower()
    ctype = att.content_type
    late = budget.out_of_time()
    if ctype == "application/pdf" or name.endswith(".pdf") or data[:5] == b"%PDF-":
        att.text = pdf_text(data, att.flags, budget)
    elif ("openxmlformats-officedocument" in ctype or name.endswith(_OOXML_EXTS)
          or (data[:2] == b"PK" and ctype in ("application/octet-stream", "application/zip")
              and _is_ooxml(data))):
        att.text = ooxml_text(data, att.flags, budget)
    elif ctype.startswith("text/") or name.endswith(_TEXT_EXTS):
        kind = "text/html" if ctype == "text/html" or name.endswith((".htm", ".html")) else ctype
        text, problems = _text_of(data, shell, kind, budget)
        if problems and "undecodable" not in att.flags:
            att.flags.append("undecodable")
        att.text = text
    else:
        att.flags.append("unsupported-type")
    att.text = att.text.replace("\r\n", "\n").strip()
    if len(att.text) > MAX_TEXT:
        att.text = att.text[:MAX_TEXT]
        att.flags.append("text-truncated")
    text = budget.take_text(att.text)
    if ((len(text) < len(att.text) or (budget.out_of_time() and not late))
            and "extraction-truncated" not in att.flags):
        att.flags.append("extraction-truncated")   # the budget ran out on this one
    att.text = text


def pdf_text(data: bytes, flags: list[str], budget: _Budget | None = None) -> str:
    """Text of a PDF by `pdftotext` (poppler), or "" with a flag.  It gets
    the CPU time left in the message's budget (as its RLIMIT_CPU and, with
    a margin, as a timeout) and may write as many bytes as the budget has
    left; over that it is killed and what it wrote is kept."""
    budget = budget or _Budget(LIMITS, len(data))
    if len(data) > PDF_MAX_BYTES:
        flags.append("too-large")
        return ""
    seconds = min(PDF_TIMEOUT, budget.cpu_left())
    if seconds <= 0:
        budget.over = True
        flags.append("extraction-truncated")
        return ""
    cap = max(0, min(4 * MAX_TEXT, budget.bytes_left))
    try:
        status, out, cut = run_extractor(["pdftotext", "-q", "-l", str(PDF_MAX_PAGES), "-enc", "UTF-8", "-", "-"],
                                         data, seconds, cap, budget)
    except OSError:                      # missing binary, no processes left
        flags.append("pdftotext-failed")
        return ""
    budget.spend_bytes(len(out))
    if cut:                              # over budget: keep what it wrote until then
        budget.over = True
        flags.append("extraction-truncated")
    elif status != 0:
        flags.append("pdftotext-failed")
        return ""
    return out.decode("utf-8", "replace").replace("\f", "\n")


# The extractor's limits are set between fork and exec.  That runs Python in
# the forked child, which the subprocess documentation warns against in a
# threaded process: the parser processes are single-threaded and do so
# (setrlimit and prctl are single system calls, prctl's function pointer is
# looked up here, before any fork); a threaded process (the daemon with
# parse_processes = 0) has util-linux's setpriv and prlimit do it instead.
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _prctl = None
_PR_SET_PDEATHSIG = 1


def _limit_extractor(parent: int, cpu: int, memory: int) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))    # SIGXCPU, then SIGKILL
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)             # dies with the parser
    if os.getppid() != parent:                                 # the parser died before prctl
        os._exit(1)


def run_extractor(argv: list[str], data: bytes, seconds: float, max_out: int,
                  budget: _Budget | None = None) -> tuple[int | None, bytes, bool]:
    """Run an extractor on `data` in a process group of its own, with
    RLIMIT_CPU of `seconds` (rounded up), RLIMIT_AS of EXTRACTOR_MAX_MEMORY,
    no core file, and PR_SET_PDEATHSIG; killed as a group after `seconds`
    plus a margin, or once it wrote more than `max_out` bytes.  Returns
    (exit status or None when killed, output, whether it was cut short).
    Its CPU time is charged to `budget`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    cpu, mem = max(1, round(seconds)), EXTRACTOR_MAX_MEMORY
    preexec = functools.partial(_limit_extractor, os.getpid(), cpu, mem)
    if threading.active_count() > 1:
        argv = ["setpriv", "--pdeathsig", "KILL", "--", "prlimit", f"--cpu={cpu}:{cpu + 1}",
                f"--as={mem}:{mem}", "--core=0:0", "--", *argv]
        preexec = None
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, close_fds=True, process_group=0,
                            preexec_fn=preexec)
    out = bytearray()
    cut = False
    deadline = started + 1.5 * seconds + 0.5   # the CPU limit comes first; the margin is for a busy machine
    sel = selectors.DefaultSelector()
    try:
        os.set_blocking(proc.stdin.fileno(), False)
        os.set_blocking(proc.stdout.fileno(), False)
        view = memoryview(data)
        if view:
            sel.register(proc.stdin, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        sel.register(proc.stdout, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                cut = True
                break
            for key, _ in sel.select(left):
                if key.fileobj is proc.stdin:
                    try:
                        n = os.write(proc.stdin.fileno(), view[:65536])
                    except BrokenPipeError:   # it stopped reading: its exit status says why
                        n = len(view)
                    except BlockingIOError:
                        n = 0
                    view = view[n:]
                    if not view:
                        sel.unregister(proc.stdin)
                        proc.stdin.close()
                else:
                    chunk = os.read(proc.stdout.fileno(), 65536)
                    if not chunk:
                        sel.unregister(proc.stdout)
                        continue
                    out += chunk
                    if len(out) > max_out:
                        del out[max_out:]
                        cut = True
                        break
            if cut:
                break
    finally:
        sel.close()
        if cut:
            _kill_group(proc)
        for f in (proc.stdin, proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        try:
            status = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:   # closed its output but runs on
            cut = True
            _kill_group(proc)
            status = proc.wait()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if budget is not None:
            used = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
            # (another thread reaping a child of its own would confuse this; never charge less
            # than nothing, nor less than a tenth of the time it ran)
            budget.extractors += max(used, (time.monotonic() - started) / 10)
    if status in (-signal.SIGXCPU, -signal.SIGKILL):
        cut = True
    return (None if cut else status), bytes(out), cut


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:   # gone already
        pass


def _is_ooxml(data: bytes) -> bool:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            return "[Content_Types].xml" in z.namelist()
    except Exception:
        return False


# No part of a pattern may run past the next "<": with [^>]* a member of
# "<t <t <t ..." made every match attempt scan to its end (300 KB took two
# minutes, and compresses to a few hundred bytes).
_OOXML_TOKEN = re.compile(
    rb"<(?:w:t|a:t|t)(?:\s[^<>]*)?>([^<]*)</(?:w:t|a:t|t)>"   # a text node
    rb"|</(?:w:p|a:p|si|row)>|<(?:w:br|w:cr|a:br)\b[^<>]*/>"  # a paragraph, shared string, row, line break
    rb"|<(w:tab)\b[^<>]*/>|</(c)>")                           # a tab, a spreadsheet cell
_SLIDE = re.compile(r"ppt/slides/slide(\d+)\.xml$")
_OOXML_MAX_NODE = 4 * 1024 * 1024   # bytes of one text node kept whole (longer ones are cut)


def _ooxml_members(names: list[str]) -> list[str]:
    wanted = [n for n in ("word/document.xml", "xl/sharedStrings.xml") if n in names]
    slides = sorted((int(m.group(1)), n) for n in names if (m := _SLIDE.match(n)))
    return wanted + [n for _, n in slides]


def ooxml_text(data: bytes, flags: list[str], budget: _Budget | None = None) -> str:
    """Text nodes of a .docx / .xlsx / .pptx, reading at most
    OOXML_MAX_UNCOMPRESSED bytes in all (declared sizes are not trusted),
    in chunks, within the message's budget of time, bytes and text."""
    budget = budget or _Budget(LIMITS, len(data))
    if len(data) > OOXML_MAX_BYTES:
        flags.append("too-large")
        return ""
    out: list[str] = []
    room = OOXML_MAX_UNCOMPRESSED
    chars = 0
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            members = _ooxml_members(z.namelist())
            if not members:
                flags.append("ooxml-failed")
                return ""
            for name in members:
                pieces: list[str] = []
                with z.open(name) as f:
                    carry = b""
                    while True:
                        if budget.out_of_time():
                            flags.append("extraction-truncated")
                            break
                        want = min(_CHUNK, room + 1, max(0, budget.bytes_left) + 1)
                        chunk = f.read(want)
                        if not chunk:
                            break
                        if len(chunk) > room:
                            chunk = chunk[:room]
                            flags.append("ooxml-limit")
                        if not budget.spend_bytes(len(chunk)):
                            flags.append("extraction-truncated")
                        room -= len(chunk)
                        buf = carry + chunk
                        cut = buf.rfind(b"<")
                        if cut <= 0 and len(buf) > _OOXML_MAX_NODE:
                            # one giant text node: its text so far is what there is to read
                            text = unescape(buf[buf.find(b">") + 1:].decode("utf-8", "replace"))
                            pieces.append(text)
                            chars += len(text)
                            carry = b""
                            flags.append("ooxml-limit")
                            break
                        if cut > 0:
                            text = _ooxml_chunk_text(buf[:cut])
                            carry = buf[cut:]
                            if text:
                                pieces.append(text)
                                chars += len(text)
                        else:
                            carry = buf
                        if "ooxml-limit" in flags or "extraction-truncated" in flags:
                            break
                        if chars > MAX_TEXT or chars > budget.text_left:
                            break            # the text is cut to that later anyway
                    if carry and chars <= MAX_TEXT:
                        text = _ooxml_chunk_text(carry)
                        if text:
                            pieces.append(text)
                            chars += len(text)
                out.append(_BLANK_LINES.sub("\n", "".join(pieces)).strip())
                if room <= 0 and "ooxml-limit" not in flags:
                    flags.append("ooxml-limit")
                if "ooxml-limit" in flags or "extraction-truncated" in flags or chars > MAX_TEXT:
                    break
    except Exception:
        flags.append("ooxml-failed")
    return "\n\n".join(t for t in out if t)


def _ooxml_chunk_text(xml: bytes) -> str:
    """The text of a stretch of OOXML cut just before a "<": entities
    resolved, white space as it is (the member's text is tidied whole)."""
    pieces: list[bytes] = []
    for m in _OOXML_TOKEN.finditer(xml):
        if m.group(1) is not None:
            pieces.append(m.group(1))
        elif m.group(2):
            pieces.append(b"\t")
        elif m.group(3):
            pieces.append(b" ")
        else:
            pieces.append(b"\n")
    return unescape(b"".join(pieces).decode("utf-8", "replace"))


# ---------------------------------------------------------------- HTML

_BLOCK_TAGS = frozenset("""address article aside blockquote br caption center dd div dl dt
    fieldset figcaption figure footer form h1 h2 h3 h4 h5 h6 header hr li main nav ol p pre
    section table tbody thead tfoot title tr ul""".split())
_CELL_TAGS = frozenset(("td", "th"))
_DROP_TAGS = frozenset(("script", "style", "template"))


class _Stripper(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.drop = 0

    def handle_starttag(self, tag, attrs):
        if tag in _DROP_TAGS:
            self.drop += 1
        elif tag in _BLOCK_TAGS:
            self.out.append("\n")
        elif tag in _CELL_TAGS:
            self.out.append("\t")
        elif tag == "img":
            for k, v in attrs:
                if k == "alt" and v:
                    self.out.append(f" {v} ")

    def handle_startendtag(self, tag, attrs):
        if tag not in _DROP_TAGS:
            self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag):
        if tag in _DROP_TAGS:
            self.drop = max(0, self.drop - 1)
        elif tag in _BLOCK_TAGS:
            self.out.append("\n")

    def handle_data(self, data):
        if not self.drop:
            self.out.append(data)


_TAG = re.compile(r"<[^>]*>")
_DROP_BLOCK = re.compile(r"<(script|style)\b.*?</\1\s*>", re.I | re.S)


def html_to_text(markup: str, budget: _Budget | None = None) -> str:
    """Visible text of HTML: tags, script and style dropped, entities
    resolved; fed in chunks, so that the message's budget of time is
    checked as it goes (what was read when it ran out is kept)."""
    markup = markup[:_HTML_MAX_INPUT]
    try:
        p = _Stripper()
        for i in range(0, len(markup), _HTML_CHUNK):
            if budget is not None and budget.out_of_time():
                break
            p.feed(markup[i:i + _HTML_CHUNK])
        p.close()
        text = "".join(p.out)
    except Exception:   # the stdlib parser is lenient, but never trust that
        text = unescape(_TAG.sub(" ", _DROP_BLOCK.sub(" ", markup)))
    text = _WS_RUN.sub(" ", text.replace("\r", ""))
    return _BLANK_LINES.sub("\n\n", text).strip()


# ---------------------------------------------------------------- parts, for reading

@dataclass
class Part:
    """One leaf of a message's MIME tree, decoded, as a reader gets it
    (mime_parts())."""
    n: int                 # attachment number (1, 2, ...), 0 for a body part
    content_type: str      # lowercased maintype/subtype
    filename: str          # decoded, "" if none
    content_id: str        # without <>, "" if none (inline images: cid:)
    charset: str | None
    data: bytes            # the decoded payload (an attached message: its bytes)


def mime_parts(raw: bytes, limits: Limits | None = None) -> list[Part]:
    """The body parts (inline text/plain and text/html, as _walk() takes
    them) and the attachments of `raw`, in message order, decoded, within
    the budget's part, nesting and byte limits.  Attachments are numbered
    from 1: a message's own parts, an attached message counting as one (it
    is not descended into: it is downloaded whole, as a .eml; its bytes are
    the parser's rendering of it, which may differ from the original in
    line endings and folding).  Never raises on bad input."""
    budget = _Budget(limits or LIMITS, len(raw))
    ctx = _Ctx(budget)
    out: list[Part] = []
    try:
        msg = _parse_bytes(raw, ctx)
        _collect(msg, ctx, out, 0)
    except Exception:   # what was collected so far is still right
        pass
    return out


def _collect(part, ctx: _Ctx, out: list[Part], nesting: int) -> None:
    limits = ctx.budget.limits
    ctx.parts += 1
    if ctx.parts > limits.max_parts:
        return
    shell = _shell(part)
    ctype = _content_type(shell)
    payload = part.get_payload()
    if ctype.startswith("multipart/") and isinstance(payload, list):
        if nesting >= limits.max_nesting:
            return
        for sub in payload:
            if isinstance(sub, email.message.Message):
                _collect(sub, ctx, out, nesting + 1)
        return
    filename = _filename(shell, ctx.hint)
    disposition = _disposition(shell)
    cid = str(part.get("content-id", "") or "").strip().strip("<>").strip()
    try:
        charset = shell.get_param("charset")
        if isinstance(charset, tuple):
            charset = email.utils.collapse_rfc2231_value(charset)
    except Exception:
        charset = None
    charset = str(charset) if charset else None
    if ctype.startswith("message/") and isinstance(payload, list):
        try:
            data = payload[0].as_bytes() if payload else b""
        except Exception:
            data = b""
    else:
        data, _ = _payload_bytes(part)
    if not ctx.budget.spend_bytes(len(data)):
        data = b""          # over the message's budget of decoded bytes: listed, not handed out
    is_body = not filename and disposition != "attachment" and ctype in ("text/plain", "text/html")
    n = 0 if is_body else 1 + sum(1 for p in out if p.n)
    out.append(Part(n=n, content_type=ctype, filename=filename, content_id=cid, charset=charset, data=data))


def decode_text(part: Part) -> str:
    """A text part's payload as text, in its charset (replacement for what
    does not decode); HTML is left as markup."""
    charset = part.charset
    if part.content_type == "text/html" and not charset:
        charset = _meta_charset(part.data)
    return _safe(_decode(part.data, charset)[0])


def headers(raw: bytes) -> dict:
    """The decoded headers parse_message() reads (message_id, date,
    from_header, from, to, cc, bcc, subject), from the header block only:
    no body is parsed.  Never raises on bad input."""
    ctx = _Ctx(_Budget(LIMITS, len(raw)))
    try:
        msg = email.parser.BytesParser(policy=_TREE).parsebytes(raw, headersonly=True)
        return _headers(msg, ctx)
    except Exception:
        return {"message_id": "", "date": None, "from_header": "", "from": [], "to": [], "cc": [],
                "bcc": [], "subject": ""}
