"""Exchange journal reports: the journaled message comes out byte for byte,
the envelope (recipients, Bcc, expanded groups) comes out complete, and an
unusable report is a JournalError with a reason."""

import base64
import os
import random
import re

import pytest

from mailtresor.archive.journal import (JournalError, JournalRecipient, is_journal_report, merge_recipients,
                                unwrap)
from tests.conftest import corpus_files, corpus_message
from tests.harness.journalgen import make_report, original_fields

RECIPIENTS = [
    ("to", "Alice@Acme.example", None),
    ("cc", "bob@acme.example", None),
    ("bcc", "carol@acme.example", None),
    ("recipient", "dave@globex.example", None),
    ("to", "member1@acme.example", "Expanded: all-staff@acme.example"),
    ("bcc", "member2@acme.example", "Expanded: Board@Acme.example"),
    ("cc", "alt@acme.example", "Forwarded: erin@acme.example"),
]
EXPECTED = [
    JournalRecipient("alice@acme.example", "to"),
    JournalRecipient("bob@acme.example", "cc"),
    JournalRecipient("carol@acme.example", "bcc"),
    JournalRecipient("dave@globex.example", "recipient"),
    JournalRecipient("member1@acme.example", "to", expanded="all-staff@acme.example"),
    JournalRecipient("member2@acme.example", "bcc", expanded="board@acme.example"),
    JournalRecipient("alt@acme.example", "cc", forwarded="erin@acme.example"),
]


def as_published(path) -> bytes:
    """A corpus file's bytes as they are (LF, stray CRs, 8-bit), mbox line dropped."""
    raw = path.read_bytes()
    return raw.split(b"\n", 1)[1] if raw.startswith(b"From ") else raw


def hard_samples() -> list[tuple[str, bytes]]:
    """Corpus messages that stress byte-exactness: 8-bit headers and bodies,
    multipart bodies with their own boundary lines and lines starting with
    "--", as published (LF) and as sent over SMTP (CRLF)."""
    picked: list[tuple[str, bytes]] = []
    wants = {
        "8bit": lambda r: re.search(rb"[\x80-\xff]", r) is not None,
        "multipart": lambda r: b"multipart/" in r.lower(),
        "dash-lines": lambda r: re.search(rb"(?m)^--", r) is not None,
    }
    for folder in ("spam-1", "hard-ham-1"):
        files = [f for f in corpus_files() if f.parent.name == folder]
        for what, pred in wants.items():
            hits = [f for f in files if pred(as_published(f))][:3]
            for f in hits:
                picked.append((f"{folder}/{f.name}/{what}/published", as_published(f)))
                picked.append((f"{folder}/{f.name}/{what}/wire", corpus_message(f)))
    assert len(picked) >= 30
    return picked


# ------------------------------------------------------------- round trips

@pytest.mark.slow
def test_whole_corpus_round_trip_is_byte_exact():
    for f in corpus_files():
        original = corpus_message(f)
        assert not is_journal_report(original), f
        report = make_report(original, sender="Sender@Globex.example", recipients=RECIPIENTS)
        assert is_journal_report(report)
        r = unwrap(report)
        assert r.original == original, f
        assert r.recipients == EXPECTED
        assert r.sender == "sender@globex.example"
        subject, message_id = original_fields(original)
        assert r.subject == subject
        m = re.search(r"<([^<>]*)>", message_id)
        assert r.message_id == (m.group(1).strip() if m else message_id.strip())


@pytest.mark.parametrize("report_encoding", ["7bit", "quoted-printable", "base64"])
@pytest.mark.parametrize("attach_encoding", ["8bit", "base64"])
@pytest.mark.parametrize("line_ending", [b"\r\n", b"\n"], ids=["crlf", "lf"])
def test_variants_round_trip(report_encoding, attach_encoding, line_ending):
    for name, original in hard_samples():
        report = make_report(original, sender="s@globex.example", recipients=RECIPIENTS,
                             report_encoding=report_encoding, attach_encoding=attach_encoding,
                             line_ending=line_ending)
        r = unwrap(report)
        assert r.original == original, name
        assert r.recipients == EXPECTED, name


def test_odd_endings_bare_cr_and_nul_survive():
    """Messages derived from a corpus message: no final line break, extra
    blank lines, a bare CR at the very end (ambiguous next to a CRLF; the
    report's own line ending decides), NUL bytes, a bare CR mid-line."""
    base = corpus_message(corpus_files()[0])
    variants = [base.rstrip(b"\r\n"), base + b"\r\n\r\n", base.replace(b"\r\n", b"\n") + b"\n\n",
                base + b"tail\r", base.replace(b" ", b"\x00 ", 3), base.replace(b" ", b" \r ", 3)]
    for original in variants:
        for nl in (b"\r\n", b"\n"):
            if nl == b"\r\n" and original.endswith(b"\r"):
                continue   # CRLF report: original CR + delimiter CRLF reads as CRLF + delimiter LF
            r = unwrap(make_report(original, sender="a@b.example", recipients=[("to", "c@d.example", None)],
                                   line_ending=nl))
            assert r.original == original, (nl, original[-20:])


def test_qp_report_body_with_soft_line_breaks_and_8bit_subject():
    _, original = next((n, o) for n, o in hard_samples() if "8bit" in n)
    subject = "Quartalszahlen für das dritte Quartal – vertraulich, bitte nicht weiterleiten " * 2
    report = make_report(original, sender="s@globex.example", recipients=RECIPIENTS, subject=subject,
                         report_encoding="quoted-printable", charset="utf-8")
    body = report.split(b"Content-Transfer-Encoding: quoted-printable\r\n\r\n", 1)[1]
    assert b"=\r\n" in body and b"=C3=BC" in body   # soft breaks and encoded octets really are there
    r = unwrap(report)
    assert r.subject == subject.strip()
    assert r.original == original
    # and in a legacy charset, 8bit
    report = make_report(original, sender="s@globex.example", recipients=RECIPIENTS,
                         subject="Grüße", charset="iso-8859-1", report_encoding="8bit")
    assert "Grüße".encode("iso-8859-1") in report
    assert unwrap(report).subject == "Grüße"


def test_field_names_case_blank_lines_and_extra_fields():
    _, original = hard_samples()[0]
    extra = [("On-Behalf-Of", "Boss@Acme.example"), ("X-Custom-Field", "kept as is"),
             ("On-Behalf-Of", "second@acme.example")]
    for case in (str.upper, str.lower, lambda s: s.swapcase()):
        report = make_report(original, sender="s@globex.example", recipients=RECIPIENTS,
                             extra_fields=extra, field_case=case, blank_lines=True, message_id="<id-1@x>")
        r = unwrap(report)
        assert r.original == original
        assert r.recipients == EXPECTED
        assert r.sender == "s@globex.example" and r.message_id == "id-1@x"
        assert r.extra == {"on-behalf-of": ["Boss@Acme.example", "second@acme.example"],
                           "x-custom-field": ["kept as is"]}


def test_recipient_line_forms():
    _, original = hard_samples()[0]
    recipients = [
        ("to", "<Angle@Acme.example>", None),
        ("cc", '"Display, Name" <display@acme.example>', None),
        ("to", "both@acme.example", "Forwarded: orig@acme.example, Expanded: dl@acme.example"),
        ("bcc", "spaced@acme.example", "expanded:dl2@acme.example"),
        ("to", "alice@acme.example", None),   # listed twice: once in the result
        ("to", "ALICE@acme.example", None),
    ]
    r = unwrap(make_report(original, sender="<S@Globex.example>", recipients=recipients))
    assert r.sender == "s@globex.example"
    assert r.recipients == [
        JournalRecipient("angle@acme.example", "to"),
        JournalRecipient("display@acme.example", "cc"),
        JournalRecipient("both@acme.example", "to", expanded="dl@acme.example", forwarded="orig@acme.example"),
        JournalRecipient("spaced@acme.example", "bcc", expanded="dl2@acme.example"),
        JournalRecipient("alice@acme.example", "to"),
    ]


def test_preamble_epilogue_transport_padding_and_prefix_boundaries():
    """Boundary lines are found exactly: padding after them is allowed, a
    line that merely starts with the boundary is content."""
    boundary = "outer"
    original = (b"Subject: tricky\r\nContent-Type: multipart/mixed; boundary=\"outer-inner\"\r\n\r\n"
                b"--outer-inner\r\nContent-Type: text/plain\r\n\r\n--outerX not a boundary\r\n"
                b"--outer-inner--\r\n")
    report = make_report(original, sender="a@b.example", recipients=[("to", "c@d.example", None)],
                         boundary=boundary)
    report = report.replace(b"\r\n\r\n--outer\r\n", b"\r\n\r\nThis is a MIME preamble.\r\n--outer \t\r\n", 1)
    report += b"an epilogue\r\n--outer\r\nnot a part\r\n"
    r = unwrap(report)
    assert r.original == original
    assert r.recipients == [JournalRecipient("c@d.example", "to")]


# ------------------------------------------------------------- what is and is not a report

def test_journal_header_only_counts_in_the_top_level_header():
    _, original = hard_samples()[0]
    inner_report = make_report(original, sender="a@b.example", recipients=[("to", "c@d.example", None)])
    # an ordinary message forwarding a journal report: not a report itself
    forwarding = (b"From: someone@acme.example\r\nSubject: look at this\r\nMIME-Version: 1.0\r\n"
                  b"Content-Type: multipart/mixed; boundary=fw\r\n\r\n--fw\r\nContent-Type: text/plain\r\n\r\n"
                  b"X-MS-Journal-Report: in the body\r\n--fw\r\nContent-Type: message/rfc822\r\n\r\n"
                  + inner_report + b"\r\n--fw--\r\n")
    assert not is_journal_report(forwarding)
    with pytest.raises(JournalError, match="not a journal report"):
        unwrap(forwarding)
    # a journal report of a message that is itself a journal report: one level comes off
    outer = make_report(inner_report, sender="x@y.example", recipients=[("bcc", "z@y.example", None)])
    r = unwrap(outer)
    assert r.original == inner_report and r.recipients == [JournalRecipient("z@y.example", "bcc")]
    assert is_journal_report(r.original)
    assert unwrap(r.original).original == original


def test_corpus_message_mentioning_the_header_is_not_a_report():
    for f in corpus_files()[:200]:
        raw = corpus_message(f)
        head, body = raw.split(b"\r\n\r\n", 1)
        mentions = [
            head + b"\r\n\r\nX-MS-Journal-Report:\r\n" + body,              # first body line
            head + b"\r\nX-Note: see\r\n X-MS-Journal-Report: folded\r\n\r\n" + body,  # continuation line
            head + b"\r\nX-Not-MS-Journal-Report: x\r\n\r\n" + body,       # another field name
        ]
        for m in mentions:
            assert not is_journal_report(m), f
    raw = corpus_message(corpus_files()[0])
    assert is_journal_report(b"x-ms-journal-report :\r\n" + raw)      # case and space before colon
    assert is_journal_report(raw.replace(b"\r\n\r\n", b"\r\nX-MS-Journal-Report: \r\n\r\n", 1))


# ------------------------------------------------------------- unusable reports

def _report_text(nl=b"\r\n") -> bytes:
    return nl.join([b"Sender: secret-sender@acme.example", b"Subject: SECRET-SUBJECT-7731",
                    b"Message-Id: <m@acme.example>", b"To: x@acme.example"]) + nl


def handmade(parts: list[bytes], headers: bytes = b"", boundary: bytes = b"B", close: bool = True) -> bytes:
    out = (b"From: journal@acme.example\r\nX-MS-Journal-Report:\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=\"" + boundary + b"\"\r\n" + headers + b"\r\n")
    for p in parts:
        out += b"--" + boundary + b"\r\n" + p + b"\r\n"
    if close:
        out += b"--" + boundary + b"--\r\n"
    return out


TEXT_PART = b"Content-Type: text/plain\r\n\r\n" + _report_text()
ORIGINAL = b"Subject: SECRET-SUBJECT-7731\r\nFrom: secret-sender@acme.example\r\n\r\nconfidential body\r\n"
MSG_PART = b"Content-Type: message/rfc822\r\n\r\n" + ORIGINAL


@pytest.mark.parametrize("raw,reason", [
    (handmade([TEXT_PART, MSG_PART]), None),   # the control: this one is fine
    (b"Subject: hello\r\n\r\nX-MS-Journal-Report:\r\n", "not a journal report"),
    (b"X-MS-Journal-Report:\r\n\r\n" + os.urandom(2000), "not multipart"),
    (b"X-MS-Journal-Report:\r\nContent-Type: multipart/mixed\r\n\r\n" + TEXT_PART, "without a boundary"),
    (handmade([TEXT_PART, MSG_PART], boundary=b"B").replace(b"--B", b"--C"), "no MIME boundary line"),
    (handmade([TEXT_PART]), "no message/rfc822 part"),
    (handmade([TEXT_PART, MSG_PART, MSG_PART]), "2 message/rfc822 parts"),
    (handmade([MSG_PART]), "no text/plain report body"),
    (handmade([TEXT_PART, MSG_PART], close=False), "no closing MIME boundary"),
    (handmade([TEXT_PART, b"Content-Type: message/rfc822\r\n\r\n"]), "attached message is empty"),
    (handmade([TEXT_PART, b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n"
               + base64.b64encode(ORIGINAL)[:-3] + b"!@#"]), "invalid base64"),
    (handmade([TEXT_PART, b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\n"
               + ORIGINAL]), "unsupported Content-Transfer-Encoding"),
    (handmade([b"Content-Type: text/plain\r\n\r\nthis is no report\r\njust words: SECRET-SUBJECT-7731\r\n",
               MSG_PART]), "no journal report fields"),
    (handmade([b"Content-Type: text/plain\r\n\r\nSender: secret-sender@acme.example\r\n"
               b"Subject: SECRET-SUBJECT-7731\r\nMessage-Id: <m@x>\r\nTo: \r\n", MSG_PART]), "no recipients"),
    (handmade([b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n%%%%", MSG_PART]),
     "report body: invalid base64"),
])
def test_unusable_reports_raise_with_a_reason(raw, reason):
    if reason is None:
        r = unwrap(raw)
        assert r.original == ORIGINAL and r.subject == "SECRET-SUBJECT-7731"
        assert r.recipients == [JournalRecipient("x@acme.example", "to")]
        return
    with pytest.raises(JournalError) as e:
        unwrap(raw)
    assert reason in str(e.value)
    for secret in ("SECRET", "secret-sender", "confidential"):
        assert secret not in str(e.value)


def test_garbage_never_raises_anything_but_journal_error():
    rnd = os.urandom
    for i in range(300):
        junk = b"X-MS-Journal-Report:\r\nContent-Type: multipart/mixed; boundary=Z\r\n\r\n"
        junk += b"--Z\r\n".join(rnd(i % 50) + b"\r\n" + rnd(i % 7) for _ in range(i % 5)) + rnd(i)
        try:
            unwrap(junk)
        except JournalError:
            pass
        assert is_journal_report(junk)
        assert not is_journal_report(rnd(i) + b"\r\n\r\nX-MS-Journal-Report:\r\n")


# ------------------------------------------------------------- merge

def test_merge_recipients_is_an_ordered_union():
    a = [JournalRecipient("x@a", "to"), JournalRecipient("y@a", "bcc"), JournalRecipient("x@a", "to")]
    b = [JournalRecipient("y@a", "bcc"), JournalRecipient("y@a", "cc"),
         JournalRecipient("x@a", "to", expanded="dl@a"), JournalRecipient("x@a", "to", forwarded="f@a"),
         JournalRecipient("z@a", "recipient")]
    merged = merge_recipients(a, b)
    assert merged == [JournalRecipient("x@a", "to"), JournalRecipient("y@a", "bcc"), JournalRecipient("y@a", "cc"),
                      JournalRecipient("x@a", "to", expanded="dl@a"), JournalRecipient("x@a", "to", forwarded="f@a"),
                      JournalRecipient("z@a", "recipient")]
    assert merge_recipients(merged, merged) == merged
    assert merge_recipients([], b) == merge_recipients(b, [])
    # two reports of one message (bifurcation): each recipient once
    r1 = unwrap(handmade([TEXT_PART, MSG_PART]))
    r2 = unwrap(handmade([TEXT_PART.replace(b"To: x@acme.example", b"Bcc: h@acme.example\r\nTo: x@acme.example"),
                          MSG_PART]))
    assert merge_recipients(r1.recipients, r2.recipients) == [
        JournalRecipient("x@acme.example", "to"), JournalRecipient("h@acme.example", "bcc")]


def test_mutated_reports_unwrap_or_raise_journal_error_only():
    """Truncations, deletions and insertions anywhere in real reports."""
    rng = random.Random(7731)
    sources = [make_report(o, sender="a@b.example", recipients=RECIPIENTS, report_encoding=enc,
                           attach_encoding=att)
               for (_, o), enc, att in zip(hard_samples()[:6], ["7bit", "quoted-printable", "base64"] * 2,
                                           ["8bit", "base64"] * 3)]
    outcomes = {"ok": 0, "error": 0}
    for i in range(1500):
        raw = bytearray(rng.choice(sources))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(raw))
            op = rng.choice(("cut", "delete", "insert", "flip"))
            if op == "cut":
                del raw[at:]
            elif op == "delete":
                del raw[at:at + rng.randint(1, 200)]
            elif op == "insert":
                raw[at:at] = rng.choice([b"\r\n", b"\n--", b"\r\n\r\n", b":", os.urandom(5)])
            elif raw:
                raw[min(at, len(raw) - 1)] ^= 1 << rng.randrange(8)
            if not raw:
                raw = bytearray(b"X")
        try:
            r = unwrap(bytes(raw))
            assert r.recipients and isinstance(r.original, bytes)
            outcomes["ok"] += 1
        except JournalError:
            outcomes["error"] += 1
    assert outcomes["ok"] > 100 and outcomes["error"] > 100, outcomes


# ---------------------------------------------------------------- issue 12: who is trusted

TENANT_ID = "8d0f1d7c-1a2b-4c3d-9e8f-0a1b2c3d4e5f"
SIMPLE = (b"From: a@acme.example\r\nTo: b@acme.example\r\nSubject: real\r\n"
          b"Message-ID: <r1@acme.example>\r\n\r\nthe real text\r\n")


def _report(*top: bytes, original: bytes = SIMPLE) -> bytes:
    return make_report(original, sender="a@acme.example", recipients=[("bcc", "x@globex.example", None)],
                       top_headers=list(top))


@pytest.mark.parametrize("journaling,top,why", [
    (None, (), "not from a journaling connector"),
    ({"tenant_id": ""}, (), None),
    ({"tenant_id": ""}, (b"X-MS-Exchange-CrossTenant-Id: anything",), None),
    ({"tenant_id": TENANT_ID}, (f"X-MS-Exchange-CrossTenant-Id: {TENANT_ID.upper()}".encode(),), None),
    ({"tenant_id": TENANT_ID}, (f"x-ms-exchange-crosstenant-id:\r\n {{{TENANT_ID}}}".encode(),), None),
    ({"tenant_id": TENANT_ID}, (f"X-MS-Exchange-CrossTenant-Id: {TENANT_ID}".encode(),) * 2, None),
    ({"tenant_id": TENANT_ID}, (), "no X-MS-Exchange-CrossTenant-Id"),
    ({"tenant_id": TENANT_ID}, (b"X-MS-Exchange-CrossTenant-Id: f00dcafe-1234-4321-abcd-0123456789ab",),
     "not the connector's organisation"),
    ({"tenant_id": TENANT_ID}, (f"X-MS-Exchange-CrossTenant-Id: {TENANT_ID}".encode(),
                                b"X-MS-Exchange-CrossTenant-Id: f00dcafe-1234-4321-abcd-0123456789ab"),
     "not the connector's organisation"),
])
def test_untrusted_reason(journaling, top, why):
    from mailtresor.archive.journal import untrusted_reason
    got = untrusted_reason(_report(*top), journaling)
    assert got == why if why is None else why in got


def test_a_tenant_id_inside_the_attached_message_does_not_count():
    from mailtresor.archive.journal import untrusted_reason
    inner = f"X-MS-Exchange-CrossTenant-Id: {TENANT_ID}\r\n".encode() + SIMPLE
    assert "no X-MS-Exchange-CrossTenant-Id" in untrusted_reason(_report(original=inner), {"tenant_id": TENANT_ID})


def test_digest_unwraps_only_with_the_relays_word():
    from mailtresor.archive.parseworker import digest
    raw = _report()
    trusted = digest(raw, {"tenant_id": ""})
    assert trusted["original"] == SIMPLE and trusted["journal_untrusted"] is None
    assert trusted["parsed"].subject == "real"
    for journaling in (None, {"tenant_id": TENANT_ID}):
        d = digest(raw, journaling)
        assert d["original"] is None and d["journal"] is None and d["journal_error"] is None
        assert d["journal_untrusted"]
        assert d["parsed"].size == len(raw)          # the outer message, parsed as it is
    # Not a report at all: nothing to say.
    assert digest(SIMPLE)["journal_untrusted"] is None


def test_routing_follows_authority_not_addresses():
    from mailtresor.archive.archiver import Router
    from mailtresor.config import Tenant
    from mailtresor.ingest.spool import Envelope
    r = Router([Tenant("acme", ("acme.example",)), Tenant("globex", ("globex.example",))])
    # Bound: that tenant only, whatever the envelope names.
    assert r.tenants(Envelope("relay", "x@globex.example", ["y@globex.example"], tenant="acme")) == ["acme"]
    assert r.tenants(Envelope("import", tenant="globex")) == ["globex"]
    # Bound to a tenant no longer configured: held (no tenant), never another's.
    assert r.tenants(Envelope("relay", "x@acme.example", ["y@acme.example"], tenant="initech")) == []
    # Untrusted paths: MAIL FROM and RCPT TO.
    assert r.tenants(Envelope("milter", "x@globex.example", ["y@acme.example"])) == ["acme", "globex"]
    assert r.tenants(Envelope("milter", "x@nowhere.example", ["y@Acme.Example."])) == ["acme"]
    # A journal report's recipients in the envelope dict route nothing.
    env = dict(Envelope("milter", "x@nowhere.example", ["y@elsewhere.example"]).__dict__,
               journal={"sender": "a@acme.example", "recipients": [{"address": "b@globex.example"}]})
    assert r.tenants(env) == []


def test_prepare_refuses_an_unwrapped_digest_for_an_untrusted_entry():
    """A parser process answers from hostile input: it cannot make the
    archiver store an attached message instead of what was received."""
    from mailtresor.archive.archiver import Router, prepare
    from mailtresor.archive.parseworker import digest
    from mailtresor.ingest.spool import Envelope, SpoolEntry
    raw = _report()
    lying = digest(raw, {"tenant_id": ""})
    entry = SpoolEntry("01ARZ3NDEKTSV4RRFFQ69G5FAV", Envelope("milter", "a@acme.example", ["b@acme.example"]),
                       raw, 1)
    with pytest.raises(ValueError, match="untrusted source"):
        prepare(entry, Router([]), lying)
    p = prepare(entry, Router([]))
    assert p.raw == raw and "journal-untrusted" in p.parsed.flags and p.envelope["journal_untrusted"]
