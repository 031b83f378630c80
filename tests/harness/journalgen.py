"""Exchange journal reports built around real messages, for tests.

`make_report(original, sender=..., recipients=[...])` wraps `original` the
way Exchange's journaling agent does (envelope journal report): a
multipart/mixed message with ``X-MS-Journal-Report:`` in its header, a
text/plain report body (Sender, Subject, Message-Id, then one line per
recipient) and the original as a message/rfc822 attachment.  Knobs give the
variants seen from different Exchange versions and gateways: report body
quoted-printable or base64, attachment base64 (Exchange Online), LF line
endings, extra fields, odd field-name case, blank lines.

Subject and Message-Id of the report body default to the original's own
(read with the compat32 parser, as Exchange copies them, decoded).
"""

from __future__ import annotations

import base64
import email.header
import email.parser
import email.policy
import email.utils
import quopri
import secrets

Recipient = tuple[str, str, "str | None"]   # (kind, address, suffix) e.g. ("to", "a@x", "Expanded: dl@x")


def original_fields(original: bytes) -> tuple[str, str]:
    """(subject, message-id) of a message as Exchange would copy them into a report."""
    msg = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(original)
    subject = str(msg.get("subject", "") or "")
    try:
        subject = str(email.header.make_header(email.header.decode_header(subject)))
    except Exception:
        pass
    subject = subject.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    subject = " ".join(subject.split())
    message_id = " ".join(str(msg.get("message-id", "") or "").split())
    return subject, message_id


def report_body_lines(*, sender: str, subject: str, message_id: str, recipients: list[Recipient],
                      extra_fields: list[tuple[str, str]] = (), field_case=None,
                      blank_lines: bool = False) -> list[str]:
    def name(n: str) -> str:
        return field_case(n) if field_case else n

    lines = [f"{name('Sender')}: {sender}", f"{name('Subject')}: {subject}",
             f"{name('Message-Id')}: {message_id}"]
    for k, v in extra_fields:
        lines.append(f"{name(k)}: {v}")
    if blank_lines:
        lines.append("")
    for kind, addr, suffix in recipients:
        kind = {"to": "To", "cc": "Cc", "bcc": "Bcc", "recipient": "Recipient"}.get(kind.lower(), kind)
        line = f"{name(kind)}: {addr}"
        if suffix:
            line += f", {suffix}"
        lines.append(line)
        if blank_lines:
            lines.append("")
    return lines


def make_report(original: bytes, *, sender: str, recipients: list[Recipient],
                subject: str | None = None, message_id: str | None = None,
                report_encoding: str = "7bit", attach_encoding: str = "8bit",
                line_ending: bytes = b"\r\n", extra_fields: list[tuple[str, str]] = (),
                field_case=None, blank_lines: bool = False, charset: str = "utf-8",
                boundary: str | None = None, journal_header: bytes = b"X-MS-Journal-Report:",
                top_headers: list[bytes] = ()) -> bytes:
    """A journal report around `original` (kept byte for byte unless
    attach_encoding="base64").  `line_ending` is used for everything the
    report adds; `original` is not touched."""
    nl = line_ending
    orig_subject, orig_id = original_fields(original)
    subject = orig_subject if subject is None else subject
    message_id = orig_id if message_id is None else message_id
    boundary = boundary or f"_journal_{secrets.token_hex(12)}_"

    lines = report_body_lines(sender=sender, subject=subject, message_id=message_id,
                              recipients=recipients, extra_fields=extra_fields,
                              field_case=field_case, blank_lines=blank_lines)
    body = "\r\n".join(lines).encode(charset) + b"\r\n"
    if report_encoding == "quoted-printable":
        body = quopri.encodestring(body.replace(b"\r\n", b"\n")).replace(b"\n", b"\r\n")
    elif report_encoding == "base64":
        body = base64.encodebytes(body).replace(b"\n", b"\r\n")
    elif report_encoding not in ("7bit", "8bit"):
        raise ValueError(report_encoding)
    body = body.replace(b"\r\n", nl)

    if attach_encoding == "base64":
        attached = base64.encodebytes(original).replace(b"\n", nl)
    elif attach_encoding in ("8bit", "7bit", "binary"):
        attached = original
    else:
        raise ValueError(attach_encoding)

    head = [
        b"From: Microsoft Exchange Journaling <journal@contoso.example>",
        b"To: archive@mailtresor.example",
        b"Subject: " + subject.encode("utf-8", "replace")[:200].decode("utf-8", "ignore").encode("ascii", "replace"),
        b"Date: " + email.utils.formatdate(1700000000).encode(),
        b"Message-ID: <" + secrets.token_hex(16).encode() + b"@journal.contoso.example>",
        b"MIME-Version: 1.0",
        b'Content-Type: multipart/mixed; boundary="' + boundary.encode() + b'"',
        journal_header,
        *top_headers,
    ]
    out = [nl.join(head), nl, nl,
           b"--", boundary.encode(), nl,
           b'Content-Type: text/plain; charset="' + charset.encode() + b'"', nl,
           b"Content-Transfer-Encoding: " + report_encoding.encode(), nl, nl,
           body, nl,
           b"--", boundary.encode(), nl,
           b"Content-Type: message/rfc822", nl,
           b"Content-Disposition: attachment", nl,
           b"Content-Transfer-Encoding: " + attach_encoding.encode(), nl, nl,
           attached, nl,
           b"--", boundary.encode(), b"--", nl]
    return b"".join(out)


def xlsx(*cells: str) -> bytes:
    """A minimal .xlsx whose shared strings are `cells` (enough for
    parse.py's Office text extraction)."""
    import io
    import zipfile
    from xml.sax.saxutils import escape
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("[Content_Types].xml", '<?xml version="1.0"?><Types xmlns='
                   '"http://schemas.openxmlformats.org/package/2006/content-types"/>')
        z.writestr("xl/sharedStrings.xml", '<?xml version="1.0"?><sst xmlns='
                   '"http://schemas.openxmlformats.org/spreadsheetml/2006/main">'
                   + "".join(f"<si><t>{escape(c)}</t></si>" for c in cells) + "</sst>")
    return buf.getvalue()


def make_forgery(*, sender: str, to: str, subject: str, text: str, attachment_name: str,
                 attachment: bytes, decoy: bytes, recipients: list[Recipient],
                 top_headers: list[bytes] = ()) -> bytes:
    """An insider's real message dressed as a journal report: its own
    header carries ``X-MS-Journal-Report:`` (and any `top_headers`, e.g. a
    forged X-MS-Exchange-CrossTenant-Id), its first text/plain part is a
    report body naming `recipients`, then come the real text, the real
    attachment, and a harmless `decoy` message/rfc822 part -- which is all
    an archive that trusts the header would keep."""
    boundary = f"_forged_{secrets.token_hex(8)}_"
    report = make_report(decoy, sender=sender, recipients=recipients, boundary=boundary,
                         top_headers=list(top_headers))
    head, _, rest = report.partition(b"\r\n\r\n")
    lines = []
    for ln in head.split(b"\r\n"):
        if ln.startswith(b"From: "):
            ln = f"From: <{sender}>".encode()
        elif ln.startswith(b"To: "):
            ln = f"To: <{to}>".encode()
        elif ln.startswith(b"Subject: "):
            ln = b"Subject: " + subject.encode()
        lines.append(ln)
    head = b"\r\n".join(lines)
    b = b"--" + boundary.encode() + b"\r\n"
    real = (b + b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + text.encode() + b"\r\n"
            + b + b"Content-Type: application/vnd.openxmlformats-officedocument.spreadsheetml.sheet\r\n"
            + b'Content-Disposition: attachment; filename="' + attachment_name.encode() + b'"\r\n'
            + b"Content-Transfer-Encoding: base64\r\n\r\n"
            + base64.encodebytes(attachment).replace(b"\n", b"\r\n") + b"\r\n")
    # The real parts go after the report body, before the decoy.
    decoy_at = rest.index(b"--" + boundary.encode() + b"\r\nContent-Type: message/rfc822")
    return head + b"\r\n\r\n" + rest[:decoy_at] + real + rest[decoy_at:]
