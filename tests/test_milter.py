"""The milter path against a real Postfix started by the tests.

Postfix runs as user `postfix`, so the stack lives in a directory it can
traverse (make_workdir, not pytest's 0700 tmp_path) and the milter socket is
world-connectable in these tests (root owns it here; in production the unit
gives it to the mailtresor group, which postfix joins: docs/OPERATIONS.md).
"""

import os
import re
import shutil
import smtplib
import socket
import time

import pytest

from tests.conftest import corpus_files, corpus_message
from tests.harness.postfix import PostfixInstance, free_port, make_workdir
from tests.harness.stack import Stack

MESSAGE = (b"Return-Path: <ignored@globex.example>\r\nFrom: Alice <alice@globex.example>\r\n"
           b"To: bob@acme.example\r\nSubject:  two spaces and\r\n\tfolded with a tab\r\n"
           b"X-Latin1: caf\xe9\r\nX-Empty:\r\nMessage-ID: <m1@globex.example>\r\n\r\n"
           b"body line\r\n.leading dot\r\n\xe9t\xe9\r\n")


class MilterRig:
    def __init__(self, overrides=None, *, start_control=True, pf_main_cf=None):
        self.workdir = make_workdir("mt-milter-")
        ov = {"milter": {"socket_mode": 0o666, "timeout": 30}}
        for k, v in (overrides or {}).items():
            ov.setdefault(k, {}).update(v)
        self.stack = Stack(self.workdir / "stack", ov)
        sock = f"unix:{self.stack.milter_socket}"
        main_cf = {"message_drop_headers": ""}   # keep Return-Path: for byte comparisons
        main_cf.update(pf_main_cf or {})
        self.pf = PostfixInstance(self.workdir / "postfix", free_port(), smtpd_milters=sock,
                                  non_smtpd_milters=sock, milter_default_action="tempfail",
                                  tls_cert=self.stack.pki / "relay.pem", tls_key=self.stack.pki / "relay.key",
                                  extra_main_cf=main_cf)
        if start_control:
            self.stack.start()
        self.pf.start()

    def start_daemon_without_key(self):
        """The daemon with no control endpoint to ask: its milter socket is
        there, but it holds no spool key."""
        self.stack.start_daemon(wait_ready=False)
        deadline = time.monotonic() + 10
        while not self.stack.milter_socket.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)

    def smtp(self, tls=True):
        s = smtplib.SMTP("127.0.0.1", self.pf.smtpd_port, timeout=60)
        s.ehlo("client.test")
        if tls:
            s.starttls(context=self.stack.client_context())
            s.ehlo("client.test")
        return s

    def close(self):
        self.pf.stop()
        self.stack.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture
def rig():
    r = MilterRig()
    yield r
    r.close()


def queued_as(text: bytes) -> str:
    return text.decode().rsplit(" ", 1)[1]


def test_postfix_to_spool_byte_identical_with_envelope(rig):
    with rig.smtp() as s:
        s.mail("alice@globex.example", ["SIZE=%d" % len(MESSAGE)])
        s.rcpt("bob@acme.example")
        s.rcpt("carol@globex.example")
        code, text = s.data(MESSAGE)
    assert code == 250, text
    qid = queued_as(text)
    (entry,) = rig.stack.entries().values()
    assert entry.data == MESSAGE
    env = entry.envelope
    assert env.source == "milter" and env.connector == "milter"
    assert env.mail_from == "alice@globex.example"
    assert env.rcpt_to == ["bob@acme.example", "carol@globex.example"]
    assert env.queue_id == qid                      # Postfix's queue id, macro i
    assert env.client_address == "127.0.0.1" and env.helo == "client.test"
    assert env.tls["version"] in ("TLSv1.2", "TLSv1.3") and env.tls["cipher"]
    assert env.macros["j"] and env.macros["{daemon_name}"]
    assert env.mail_params["SIZE"] == str(len(MESSAGE))
    # our log names Postfix's queue id next to the spool id
    assert re.search(rf"{qid}: {entry.id}: from=<alice@globex.example> nrcpt=2", rig.stack.log())


def test_sendmail_path_through_non_smtpd_milters(rig):
    body = b"Subject: from cron\n\nlocal submission\n"
    rig.pf.sendmail("cron@globex.example", ["ops@acme.example"], body)
    deadline = time.monotonic() + 30
    while not rig.stack.spool_ids():
        assert time.monotonic() < deadline, rig.pf.maillog_tail()
        time.sleep(0.1)
    (entry,) = rig.stack.entries().values()
    assert entry.envelope.mail_from == "cron@globex.example"
    assert entry.envelope.rcpt_to == ["ops@acme.example"]
    assert entry.envelope.queue_id
    # Postfix adds Date/Message-Id/From on this path and converts to CRLF.
    assert entry.data.endswith(b"\r\n\r\nlocal submission\r\n")
    assert b"Subject: from cron\r\n" in entry.data


def test_rset_and_aborted_transactions_leave_nothing(rig):
    with rig.smtp() as s:
        s.mail("a@globex.example")
        s.rcpt("b@acme.example")
        s.rset()
        s.sendmail("a@globex.example", ["b@acme.example"], b"Subject: kept\r\n\r\nkept\r\n")
    assert [e.data for e in rig.stack.entries().values()] == [b"Subject: kept\r\n\r\nkept\r\n"]
    assert os.listdir(rig.stack.spool_dir / "tmp") == []


def test_garbage_on_the_milter_socket(rig):
    for junk in (b"\x00\x00\x00\x05Ojunk", b"\xff" * 64, b"GET / HTTP/1.0\r\n\r\n", b""):
        c = socket.socket(socket.AF_UNIX)
        c.connect(str(rig.stack.milter_socket))
        c.sendall(junk)
        c.close()
    time.sleep(0.5)
    assert rig.stack.daemon.poll() is None
    with rig.smtp() as s:
        s.sendmail("a@globex.example", ["b@acme.example"], MESSAGE)
    assert len(rig.stack.spool_ids()) == 1


def test_no_key_tempfails_then_flows():
    """No spool key: the sender gets a temporary failure with our text;
    once the control endpoint answers, the same mail is accepted."""
    r = MilterRig(start_control=False)
    try:
        r.start_daemon_without_key()
        # The milter tempfails at connect; Postfix then greets with 421.
        with pytest.raises(smtplib.SMTPConnectError) as e:
            r.smtp()
        assert e.value.smtp_code == 421
        assert "archive keys not yet available" in r.stack.log()
        assert r.stack.spool_ids() == []
        r.stack.start_control()
        assert r.stack.notify.wait_for("READY=1", timeout=30)
        with r.smtp() as s:
            s.sendmail("a@globex.example", ["b@acme.example"], MESSAGE)
        assert len(r.stack.spool_ids()) == 1
    finally:
        r.close()


def test_spool_full_is_a_4xx_with_our_reply():
    r = MilterRig({"spool": {"min_free_bytes": 1 << 60}})
    try:
        with r.smtp() as s:
            with pytest.raises(smtplib.SMTPSenderRefused) as e:
                s.sendmail("a@globex.example", ["b@acme.example"], MESSAGE)
        assert e.value.smtp_code == 452 and e.value.smtp_error.startswith(b"4.3.1 Insufficient system storage")
        assert r.stack.spool_ids() == []
    finally:
        r.close()


def test_on_failure_accept_lets_mail_through_and_says_so():
    r = MilterRig({"spool": {"min_free_bytes": 1 << 60}, "milter": {"on_failure": "accept"}})
    try:
        with r.smtp() as s:
            assert s.sendmail("a@globex.example", ["b@acme.example"], MESSAGE) == {}
        assert r.stack.spool_ids() == []
        assert "NOT ARCHIVED, accepted by policy (on_failure=accept)" in r.stack.log()
    finally:
        r.close()


def test_on_failure_accept_decides_per_message_not_per_connection():
    """Accept mode with no spool key at connect: the connection goes on;
    a message sent while the key is missing passes unarchived (logged), and
    the next one on the same connection, once the key is there, is archived."""
    r = MilterRig({"milter": {"on_failure": "accept"}}, start_control=False)
    try:
        r.start_daemon_without_key()
        with r.smtp() as s:
            assert s.sendmail("a@globex.example", ["b@acme.example"], b"Subject: first\r\n\r\n1\r\n") == {}
            assert r.stack.spool_ids() == []
            r.stack.start_control()
            assert r.stack.notify.wait_for("READY=1", timeout=30)
            assert s.sendmail("a@globex.example", ["b@acme.example"], b"Subject: second\r\n\r\n2\r\n") == {}
        assert [e.data for e in r.stack.entries().values()] == [b"Subject: second\r\n\r\n2\r\n"]
        log = r.stack.log()
        assert "each message is decided at MAIL FROM" in log
        assert log.count("NOT ARCHIVED, accepted by policy") == 1
    finally:
        r.close()


def test_daemon_down_means_postfix_tempfails(rig):
    """milter_default_action = tempfail (conf/postfix-main.cf): no archive,
    no delivery."""
    rig.stack.stop_daemon()
    assert not rig.stack.milter_socket.exists()
    # Postfix refuses at the first point it consults the milter (here
    # STARTTLS: 454 4.3.0); in every case a temporary failure.
    with pytest.raises(smtplib.SMTPResponseException) as e:
        with rig.smtp() as s:
            s.sendmail("a@globex.example", ["b@acme.example"], MESSAGE)
    assert 400 <= e.value.smtp_code < 500
    assert "milter" in rig.pf.maillog()


def test_corpus_sample_through_postfix_is_byte_identical(rig):
    files = corpus_files()[::25]
    sent = {}
    with rig.smtp() as s:
        for p in files:
            data = corpus_message(p)
            s.sendmail("a@globex.example", ["b@acme.example"], data)
            sent[data] = p.name
    got = [e.data for e in rig.stack.entries().values()]
    assert len(got) == len(files)
    assert [g for g in got if g not in sent] == []


def test_a_forged_journal_report_through_postfix_is_archived_as_received():
    """Issue 12 (a): an insider's real mail dressed as a journal report
    passes a real Postfix and the milter.  The milter is no journaling
    source: the message is kept as received (real text and spreadsheet
    searchable, flagged journal-untrusted), and it routes by the SMTP
    envelope only -- the globex recipients its forged report names get
    nothing."""
    from tests.test_archive import cli, search, wait_archived
    from tests.test_journal_trust import assert_archived_as_received, forgery, holdings, status
    rig = MilterRig({"archive": {"enabled": True}})
    try:
        forged = forgery("nightjar", recipients=[("to", "gus@globex.example", None),
                                                 ("bcc", "gil@globex.example", None)])
        with rig.smtp() as s:
            s.sendmail("insider@acme.example", ["colleague@acme.example"], forged)
        deadline = time.monotonic() + 60
        while not rig.stack.spool_ids() and time.monotonic() < deadline:
            time.sleep(0.1)
        wait_archived(rig.stack)
        _, e = assert_archived_as_received(rig.stack, "acme", forged, "nightjar")
        assert e["source"] == "milter" and e["journal_untrusted"] == "not from a journaling connector"
        assert holdings(rig.stack) == {"acme": 1}
        assert search(rig.stack, "acme", "envelope:gil@globex.example") == []     # an untrusted report's list
        assert status(rig.stack, 1)["archiver"]["journal_untrusted"] == 1
        assert cli(rig.stack, "verify", check=0).returncode == 0
    finally:
        rig.close()


def test_size_hint_takes_ascii_digits_only():
    """SIZE=² passes str.isdigit() and int() raises on it: the hint is 0,
    not a tempfail for the whole message (Sendmail passes what it got)."""
    from mailtresor_milter import size_hint
    assert size_hint({"SIZE": "12345"}) == 12345
    for bad in ("²", "١٢٣", "12a", "", None, "9" * 21):
        assert size_hint({"SIZE": bad}) == 0, bad
    assert size_hint({}) == 0
