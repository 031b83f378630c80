"""The relay end to end: a real daemon process, real TLS, real clients;
and its session rules in-process, with a StringTransport and a task.Clock."""

import os
import socket
import ssl
import subprocess
import time
from concurrent.futures import Future

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mailtresor.config import Connector as ConnectorCfg
from mailtresor.ingest.relay import Gate, ImplicitTLSFactory, RelayFactory
from tests.harness.rawsmtp import RawSMTP, ready_session
from tests.harness.stack import Stack

MESSAGE = (b"From: Alice <alice@globex.example>\r\nTo: bob@acme.example\r\n"
           b"Subject: Quarterly figures 7f3a\r\nMessage-ID: <m1@globex.example>\r\n\r\n"
           b"Line one\r\n.leading dot\r\n..two dots\r\n\xe9t\xe9 8-bit body\r\n\r\n")


def test_starttls_delivery_is_byte_identical(running):
    with running.smtp() as s:
        assert s.sock.version() in ("TLSv1.2", "TLSv1.3")
        refused = s.sendmail("alice@globex.example", ["bob@acme.example", "carol@acme.example"], MESSAGE)
        assert refused == {}
    (entry,) = running.entries().values()
    assert entry.data == MESSAGE
    env = entry.envelope
    assert env.source == "relay" and env.connector == "local" and env.tenant == ""
    assert env.mail_from == "alice@globex.example"
    assert env.rcpt_to == ["bob@acme.example", "carol@acme.example"]
    assert env.client_address == "127.0.0.1" and env.helo == "client.test"
    assert env.tls["version"] in ("TLSv1.2", "TLSv1.3") and env.tls["client_cert"] is None
    assert env.size == len(MESSAGE)


def test_queue_id_in_reply_matches_spool_and_log(running):
    with running.smtp() as s:
        s.mail("a@globex.example")
        s.rcpt("b@acme.example")
        code, text = s.data(MESSAGE)
    assert code == 250 and text.startswith(b"2.0.0 Ok: queued as ")
    qid = text.decode().rsplit(" ", 1)[1]
    assert running.spool_ids() == [qid]
    assert qid in running.log()


def test_implicit_tls_with_client_certificate_names_the_tenant(running):
    with running.smtp(implicit=True, cert="client-exchange-acme") as s:
        s.sendmail("", ["journal@archive.test"], MESSAGE)
    (entry,) = running.entries().values()
    env = entry.envelope
    assert env.connector == "exchange-acme" and env.tenant == "acme" and env.mail_from == ""
    cert = env.tls["client_cert"]
    assert cert["cn"] == "exchange-acme" and cert["trusted"] is True and len(cert["sha256"]) == 95


def test_ehlo_advertises_extensions(running):
    s = RawSMTP(running.smtp_port)
    s.reply()
    code, text = s.cmd("EHLO client.test")
    for ext in ("PIPELINING", f"SIZE {running.cfg.spool.max_message_size}", "8BITMIME", "SMTPUTF8",
                "ENHANCEDSTATUSCODES", "STARTTLS"):
        assert f"250-{ext}\r\n" in text or f"250 {ext}\r\n" in text, ext
    s.starttls(running.client_context())
    code, text = s.cmd("EHLO client.test")
    assert code == 250 and "STARTTLS" not in text
    s.close()


def test_plaintext_is_refused(running):
    s = RawSMTP(running.smtp_port)
    assert s.reply()[0] == 220
    assert s.cmd("EHLO client.test")[0] == 250
    assert s.cmd("MAIL FROM:<a@globex.example>") == (530, "530 5.7.0 Must issue a STARTTLS command first\r\n")
    assert s.cmd("RCPT TO:<b@acme.example>")[0] == 503
    assert s.cmd("DATA")[0] == 503
    s.close()
    assert running.spool_ids() == []


def test_tls_below_1_2_is_refused(running):
    ctx = running.client_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    s = RawSMTP(running.smtp_port)
    s.reply()
    s.cmd("EHLO client.test")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        s.starttls(ctx)
    s.close()


def test_commands_pipelined_before_starttls_are_dropped(running):
    """STARTTLS command injection: what came in the clear with STARTTLS must
    not be executed inside the TLS session."""
    s = RawSMTP(running.smtp_port)
    s.reply()
    s.cmd("EHLO client.test")
    s.send(b"STARTTLS\r\nMAIL FROM:<injected@evil.example>\r\n")
    assert s.reply()[0] == 220
    s.sock = running.client_context().wrap_socket(s.sock, server_hostname="localhost")
    assert s.cmd("EHLO client.test")[0] == 250
    # Had the injected MAIL run, this would be "503 nested MAIL".
    assert s.cmd("MAIL FROM:<real@globex.example>")[0] == 250
    s.close()


def test_size_limit_is_advertised_and_enforced(stack):
    stack = Stack(stack.dir.parent / "small", {"spool": {"max_message_size": 2048}}).start()
    try:
        s = ready_session(stack)
        assert s.cmd("MAIL FROM:<a@globex.example> SIZE=4096") == (
            552, "552 5.3.4 Error: message size exceeds fixed maximum message size\r\n")
        assert s.cmd("MAIL FROM:<a@globex.example> SIZE=100")[0] == 250
        assert s.cmd("RCPT TO:<b@acme.example>")[0] == 250
        assert s.cmd("DATA")[0] == 354
        s.send(b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" * 0 + (b"y" * 78 + b"\r\n") * 40 + b".\r\n")
        assert s.reply()[0:1] == (552,)
        # The session goes on; a small message still gets through.
        assert s.cmd("MAIL FROM:<a@globex.example>")[0] == 250
        assert s.cmd("RCPT TO:<b@acme.example>")[0] == 250
        assert s.cmd("DATA")[0] == 354
        code, text = s.cmd(b"Subject: small\r\n\r\nok\r\n.")
        assert code == 250, text
        s.close()
        assert len(stack.spool_ids()) == 1
        assert list(stack.entries().values())[0].data == b"Subject: small\r\n\r\nok\r\n"
    finally:
        stack.close()


SMUGGLING = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r.\r\n", b"\r\n.\n", b"\n.\r"]


@pytest.mark.parametrize("variant", SMUGGLING, ids=repr)
def test_smtp_smuggling_is_one_message_not_two(running, variant):
    """Only <CR><LF>.<CR><LF> ends DATA: what a smuggler puts after a bare
    line end is content of the first message (kept, flagged), never a
    second transaction."""
    s = ready_session(running)
    s.cmd("MAIL FROM:<a@globex.example>")
    s.cmd("RCPT TO:<b@acme.example>")
    assert s.cmd("DATA")[0] == 354
    body = (b"Subject: first\r\n\r\nhello" + variant +
            b"MAIL FROM:<admin@acme.example>\r\nRCPT TO:<victim@acme.example>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nevil\r\n")
    s.send(body + b".\r\nQUIT\r\n")
    code, text = s.reply()
    assert code == 250, text
    assert s.reply()[0] == 221
    s.close()
    (entry,) = running.entries().values()
    assert entry.data == body.replace(b"\r\n.", b"\r\n")     # unstuffed only after <CR><LF>
    assert entry.envelope.flags == ["bare-newline"] and entry.envelope.rcpt_to == ["b@acme.example"]


@pytest.mark.parametrize("variant", SMUGGLING[:2], ids=repr)
def test_smtp_smuggling_is_refused_in_strict_mode(tmp_path, variant):
    st = Stack(tmp_path / "strict", {"relay": {"bare_newline": "reject"}}).start()
    try:
        s = ready_session(st)
        s.cmd("MAIL FROM:<a@globex.example>")
        s.cmd("RCPT TO:<b@acme.example>")
        assert s.cmd("DATA")[0] == 354
        s.send(b"Subject: first\r\n\r\nhello" + variant + b"MAIL FROM:<admin@acme.example>\r\n.\r\n")
        code, text = s.reply()
        assert code == 550 and text.startswith("550 5.5.2 Error: bare <")
        assert s.closed_by_server()
        s.close()
        assert st.spool_ids() == []
        assert "bare <" in st.log()
    finally:
        st.close()


BARE_LF = (b"From: unix@globex.example\nTo: bob@acme.example\nSubject: bare LF 4c1d\n\n"
           b"written by a Unix tool\n.dot after a bare LF\n")
BARE_CR = b"Subject: bare CR 9e2b\r\n\r\nold\rmac\rline ends\r\n..stuffed\r\n"


def send_raw(st, wire: bytes, *, implicit=False) -> tuple[int, str]:
    """One message as raw DATA bytes (dot stuffing and all) over TLS."""
    if implicit:
        s = RawSMTP(st.smtps_port, implicit=True, context=st.client_context())
        assert s.reply()[0] == 220
        assert s.cmd("EHLO client.test")[0] == 250
    else:
        s = ready_session(st)
    with s:
        assert s.cmd("MAIL FROM:<a@globex.example>")[0] == 250
        assert s.cmd("RCPT TO:<bob@acme.example>")[0] == 250
        assert s.cmd("DATA")[0] == 354
        s.send(wire + b"\r\n.\r\n")
        return s.reply()


def test_bare_newlines_are_kept_flagged_and_searchable(tmp_path):
    """Exchange and Unix tools send bare line ends: such mail got a 550 and
    bounced, so the archive never had it.  Now: 250, the bytes as sent (after
    dot-unstuffing), and flag:bare-newline finds them once archived."""
    from tests.test_archive import search, wait_archived
    st = Stack(tmp_path / "bare").start()
    try:
        code, text = send_raw(st, BARE_LF)                       # STARTTLS
        assert code == 250, text
        code, text = send_raw(st, BARE_CR, implicit=True)        # implicit TLS
        assert code == 250, text
        entries = sorted(st.entries().values(), key=lambda e: e.envelope.received_at)
        assert [e.data for e in entries] == [BARE_LF + b"\r\n", BARE_CR.replace(b"\r\n..", b"\r\n.") + b"\r\n"]
        assert [e.envelope.flags for e in entries] == [["bare-newline"], ["bare-newline"]]
        assert "kept as received, flagged bare-newline" in st.log()
        st.stop_daemon()
        st.reconfigure({"archive": {"enabled": True}})
        st.start_daemon()
        with st.smtp() as c:                                     # and an ordinary one: not flagged
            c.sendmail("a@globex.example", ["bob@acme.example"], MESSAGE.replace(b"bob@", b"bob@"))
        wait_archived(st)
        hits = search(st, "acme", "flag:bare-newline")
        assert sorted(h["subject"] for h in hits) == ["bare CR 9e2b", "bare LF 4c1d"]
    finally:
        st.close()


def test_bare_lf_in_commands_is_refused(running):
    s = RawSMTP(running.smtp_port)
    s.reply()
    s.send(b"EHLO client.test\n")
    assert s.reply()[0] == 550
    assert s.closed_by_server()


def test_pipelining(running):
    s = ready_session(running)
    s.send(b"MAIL FROM:<a@globex.example>\r\nRCPT TO:<b@acme.example>\r\nRCPT TO:<c@acme.example>\r\nDATA\r\n")
    assert [s.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
    s.send(b"Subject: one\r\n\r\n1\r\n.\r\nMAIL FROM:<d@globex.example>\r\nRCPT TO:<e@acme.example>\r\n"
           b"DATA\r\nSubject: two\r\n\r\n2\r\n.\r\nQUIT\r\n")
    codes = [s.reply()[0] for _ in range(6)]
    assert codes == [250, 250, 250, 354, 250, 221]
    s.close()
    bodies = sorted(e.data for e in running.entries().values())
    assert bodies == [b"Subject: one\r\n\r\n1\r\n", b"Subject: two\r\n\r\n2\r\n"]


def test_smtputf8_and_8bit(running):
    msg = "Subject: Grüße\r\nFrom: jürgen@bücher.example\r\n\r\nÄÖÜ\r\n".encode()
    with running.smtp() as s:
        s.sendmail("jürgen@bücher.example", ["zoë@acme.example"], msg, mail_options=["SMTPUTF8", "BODY=8BITMIME"])
    (entry,) = running.entries().values()
    assert entry.data == msg
    assert entry.envelope.mail_from == "jürgen@bücher.example" and entry.envelope.rcpt_to == ["zoë@acme.example"]
    assert entry.envelope.mail_params == {"SMTPUTF8": None, "BODY": "8BITMIME", "SIZE": str(len(msg))}


def test_command_errors(running):
    s = ready_session(running)
    assert s.cmd("VRFY root")[0] == 502
    assert s.cmd("FROBNICATE")[0] == 502
    assert s.cmd("NOOP") == (250, "250 2.0.0 Ok\r\n")
    assert s.cmd("RCPT TO:<b@acme.example>")[0] == 503
    assert s.cmd("MAIL FROM:a@b")[0] == 501
    assert s.cmd("MAIL FROM:<a@b> FOO=bar") == (555, "555 5.5.4 Unsupported option: FOO\r\n")
    assert s.cmd("MAIL FROM:<a@b>")[0] == 250
    assert s.cmd("MAIL FROM:<a@b>")[0] == 503
    assert s.cmd("RCPT TO:<>")[0] == 501
    assert s.cmd("DATA")[0] == 503
    assert s.cmd("RSET")[0] == 250
    # ten errors and the session ends
    codes = []
    while not codes or codes[-1] == 502:
        assert len(codes) < 10
        codes.append(s.cmd("BOGUS")[0])
    assert codes[-1] == 421 and len(codes) == 3
    assert s.closed_by_server()


def test_too_many_recipients(stack):
    stack = Stack(stack.dir.parent / "r", {"relay": {"max_recipients": 3}}).start()
    try:
        s = ready_session(stack)
        s.cmd("MAIL FROM:<a@globex.example>")
        codes = [s.cmd(f"RCPT TO:<r{i}@acme.example>")[0] for i in range(5)]
        assert codes == [250, 250, 250, 452, 452]
        s.close()
    finally:
        stack.close()


def test_a_connector_takes_only_its_journal_addresses(tmp_path):
    """With `recipients` set, any other RCPT TO is refused (550 5.1.1), so
    that a secret journal address keeps strangers' mail out; case does not
    matter; what was accepted is spooled for the accepted address only."""
    st = Stack(tmp_path / "c", {"relay": {"connector": [
        {"name": "local", "networks": ["127.0.0.1/32"],
         "recipients": ["Journal-7f3a9@archive.acme.example"]}]}}).start()
    try:
        s = ready_session(st)
        assert s.cmd("MAIL FROM:<a@globex.example>")[0] == 250
        code, text = s.cmd("RCPT TO:<bob@acme.example>")
        assert code == 550 and text.startswith("550 5.1.1 ") and "journal address" in text
        assert s.cmd("RCPT TO:<journal-7F3A9@Archive.Acme.Example>")[0] == 250
        assert s.cmd("DATA")[0] == 354
        s.send(b"Subject: kept\r\n\r\nbody\r\n.\r\n")
        assert s.reply()[0] == 250
        assert s.cmd("MAIL FROM:<a@globex.example>")[0] == 250
        assert s.cmd("RCPT TO:<journal-7f3a9@archive.acme.example.evil>")[0] == 550
        assert s.cmd("DATA")[0] == 503                     # no recipient was accepted
        s.close()
        (entry,) = st.entries().values()
        assert entry.envelope.rcpt_to == ["journal-7F3A9@Archive.Acme.Example"]
        assert "not a recipient of connector local" in st.log()
    finally:
        st.close()


def test_who_may_connect(tmp_path):
    """Unknown networks are refused at the greeting; a connector that needs
    a certificate says which one is missing or wrong."""
    st = Stack(tmp_path / "c", {"relay": {"connector": [
        {"name": "exchange-acme", "networks": ["127.0.0.3/32"], "client_cert": "required",
         "client_cert_names": ["exchange-acme"], "tenant": "acme"},
        {"name": "local", "networks": ["127.0.0.1/32"]}]}}).start()
    try:
        s = RawSMTP(st.smtp_port, source="127.0.0.2")
        code, text = s.reply()
        assert code == 554 and text.startswith("554 5.7.1 Access denied: client 127.0.0.2")
        assert s.closed_by_server()

        def mail_from(source, cert=None):
            s = RawSMTP(st.smtps_port, implicit=True, context=st.client_context(cert), source=source)
            s.reply()
            s.cmd("EHLO client.test")
            r = s.cmd("MAIL FROM:<journal@acme.example>")
            s.close()
            return r

        assert mail_from("127.0.0.3") == (530, "530 5.7.0 Error: a client certificate is required\r\n")
        code, text = mail_from("127.0.0.3", "outsider")
        assert code == 550 and "5.7.1" in text and "trusted CA" in text
        code, text = mail_from("127.0.0.3", "appliance-t1")
        assert code == 550 and "5.7.1" in text and "appliance-t1" in text
        assert mail_from("127.0.0.3", "client-exchange-acme")[0] == 250
        assert st.spool_ids() == []
    finally:
        st.close()


def test_garbage_does_not_hurt(running):
    s = RawSMTP(running.smtp_port)
    s.reply()
    s.send(bytes(range(256)) * 4 + b"\r\n")
    s.close()
    s = RawSMTP(running.smtps_port)   # plaintext junk on the TLS port
    s.send(b"EHLO hello\r\n" + bytes(range(256)))
    s.closed_by_server(10)
    s.close()
    with running.smtp() as c:
        c.sendmail("a@globex.example", ["b@acme.example"], MESSAGE)
    assert len(running.spool_ids()) == 1
    assert running.daemon.poll() is None


def test_no_message_content_in_logs(running):
    with running.smtp() as s:
        s.sendmail("a@globex.example", ["b@acme.example"], MESSAGE)
    log = running.log()
    assert "queued" in log
    for secret in ("Quarterly", "7f3a", "leading dot", "Line one"):
        assert secret not in log


def test_no_key_means_421_then_ready_when_control_appears(stack):
    """Control endpoint down at start: 421 4.3.0 and a STATUS saying why;
    once it is up, READY=1 and mail flows."""
    stack.start_daemon(wait_ready=False)
    s = RawSMTP(stack.smtp_port)
    assert s.reply() == (421, "421 4.3.0 Service not available: archive keys not yet available, "
                              "try again later\r\n")
    s.close()
    deadline = time.monotonic() + 20
    while not any(m.startswith("STATUS=waiting for the spool key") for m in stack.notify.messages):
        assert time.monotonic() < deadline, stack.notify.messages
        time.sleep(0.1)
    status = [m for m in stack.notify.messages if m.startswith("STATUS=waiting")][-1]
    assert "unreachable" in status or "refused" in status.lower()
    assert "READY=1" not in stack.notify.messages
    stack.start_control()
    assert stack.notify.wait_for("READY=1", timeout=30)
    with stack.smtp() as c:
        c.sendmail("a@globex.example", ["b@acme.example"], MESSAGE)
    assert len(stack.spool_ids()) == 1


def test_control_refusing_the_key_keeps_refusing_mail(tmp_path):
    """A control endpoint that does not know this appliance's certificate."""
    st = Stack(tmp_path / "u", {"control_server": {"appliance": [
        {"name": "t1", "cert_names": ["someone-else"]}]}})
    try:
        st.start_control()
        st.start_daemon(wait_ready=False)
        s = RawSMTP(st.smtp_port)
        assert s.reply()[0] == 421
        s.close()
        deadline = time.monotonic() + 20
        while not any("403" in m for m in st.notify.messages):
            assert time.monotonic() < deadline, st.notify.messages
            time.sleep(0.1)
        audit = (st.dir / "control" / "audit.log").read_text()
        assert '"event": "deny"' in audit and "unknown client certificate" in audit
    finally:
        st.close()


def test_a_revoked_spool_key_is_dropped_and_mail_refused_until_released(tmp_path):
    """An outage keeps the key (availability); a 403 from the control
    endpoint while refreshing means this appliance may no longer have it:
    every relay process drops it and answers 4xx, nothing already accepted
    is lost, and mail flows again once the key is released again."""
    st = Stack(tmp_path / "r", {"control": {"refresh_interval": 0.5}, "relay": {"processes": 3}})
    try:
        st.start()
        with st.smtp() as c:
            c.sendmail("a@globex.example", ["b@acme.example"], MESSAGE)
        assert len(st.spool_ids()) == 1

        def mail_replies(n=12):
            """Over n connections (spread over the relay processes by the
            kernel): the greeting if it refuses, else the answer to MAIL."""
            replies = set()
            for _ in range(n):
                s = RawSMTP(st.smtp_port)
                code, text = s.reply()
                if code == 220:
                    assert s.cmd("EHLO client.test")[0] == 250
                    assert s.starttls(st.client_context())[0] == 220
                    assert s.cmd("EHLO client.test")[0] == 250
                    code, text = s.cmd("MAIL FROM:<a@globex.example>")
                replies.add(text.split(" ", 2)[0] + " " + text.split(" ", 2)[1] if code != 250 else "250")
                s.close()
            return replies

        def wait_log(text, timeout=30):
            deadline = time.monotonic() + timeout
            while text not in st.log():
                assert time.monotonic() < deadline, st.log()[-3000:]
                time.sleep(0.1)

        st.stop_control()                          # an outage: the key is kept
        time.sleep(1.5)
        assert mail_replies(4) == {"250"}
        st.reconfigure({"control_server": {"appliance": [{"name": "t1", "cert_names": ["someone-else"]}]}})
        st.start_control()                         # now it refuses this appliance: 403
        wait_log("the control endpoint no longer releases the spool key")
        time.sleep(0.5)                            # the workers read the news from their pipe
        assert mail_replies() == {"421 4.3.0"}
        assert any(m.startswith("STATUS=") and "no longer releases the spool key" in m for m in st.notify.messages)
        assert len(st.spool_ids()) == 1
        st.stop_control()
        st.reconfigure({"control_server": {"appliance": [{"name": "t1", "cert_names": ["appliance-t1"]}]}})
        st.start_control()
        wait_log("releases the spool key again")
        time.sleep(0.5)
        assert mail_replies() == {"250"}
        with st.smtp() as c:
            c.sendmail("a@globex.example", ["b@acme.example"], MESSAGE)
        assert len(st.spool_ids()) == 2
        assert len(st.entries()) == 2                 # both still readable
    finally:
        st.close()


def test_workers_serve_each_listener_as_configured_after_a_late_listen(tmp_path):
    """The STARTTLS port's listen has to retry (its address is still held)
    while the implicit-TLS one succeeds at once: every relay process must
    still serve each port with that port's own TLS mode."""
    import socket
    import threading
    st = Stack(tmp_path / "w", {"relay": {"processes": 3}})
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", st.smtp_port))          # bound, not listening: EADDRINUSE for the daemon
    threading.Timer(1.5, blocker.close).start()
    try:
        st.start()
        deadline = time.monotonic() + 30
        while st.log().count("accepting on") < 2:      # both workers took their sockets
            assert time.monotonic() < deadline, st.log()[-2000:]
            time.sleep(0.1)
        for _ in range(24):                             # spread over the three processes by the kernel
            plain = RawSMTP(st.smtp_port, timeout=5)
            assert plain.reply()[0] == 220              # plaintext greeting: STARTTLS mode
            plain.close()
            tls = RawSMTP(st.smtps_port, implicit=True, context=st.client_context(), timeout=5)
            assert tls.reply()[0] == 220                # greeting inside TLS: implicit mode
            tls.close()
    finally:
        blocker.close()
        st.close()


def test_a_worker_that_dies_before_ready_is_started_again(tmp_path):
    """No key yet (control down): a relay worker killed then is restarted,
    and once the key comes every process serves mail."""
    import signal as sig
    st = Stack(tmp_path / "d", {"relay": {"processes": 2}})
    try:
        st.start_daemon(wait_ready=False)
        deadline = time.monotonic() + 30
        while "relay worker 1 started" not in st.log():
            assert time.monotonic() < deadline, st.log()[-2000:]
            time.sleep(0.1)
        (worker,) = [p for p in st.daemon_processes() if p != st.daemon.pid]
        os.kill(worker, sig.SIGKILL)
        while st.log().count("relay worker 1 started") < 2:
            assert time.monotonic() < deadline, st.log()[-2000:]
            time.sleep(0.1)
        assert "relay worker 1 died (signal 9); starting it again" in st.log()
        assert "READY=1" not in st.notify.messages
        st.start_control()
        assert st.notify.wait_for("READY=1", timeout=30)
        while "relay worker 1 accepting on" not in st.log():
            assert time.monotonic() < deadline, st.log()[-2000:]
            time.sleep(0.1)
        for _ in range(10):
            with st.smtp() as c:
                c.sendmail("a@globex.example", ["b@acme.example"], MESSAGE)
        assert len(st.spool_ids()) == 10
        assert len(st.daemon_processes()) == 2
    finally:
        st.close()


def _tmpfs(path, size):
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"no tmpfs here: {r.stderr}")


def test_full_disk_is_a_temporary_failure(tmp_path):
    """Twisted's smtp.SMTP would answer 550 here; we must answer 4xx and keep
    every message that got 250."""
    mnt = tmp_path / "tiny"
    _tmpfs(mnt, "4m")
    st = Stack(tmp_path / "s", {"spool": {"directory": str(mnt / "spool"), "min_free_bytes": 0}})
    try:
        st.start()
        body = b"Subject: filler\r\n\r\n" + (b"z" * 998 + b"\r\n") * 300
        accepted, replies = [], []
        s = ready_session(st)
        for i in range(40):
            if s.cmd("MAIL FROM:<a@globex.example>")[0] != 250:
                replies.append(s.buf)
                break
            s.cmd("RCPT TO:<b@acme.example>")
            code, text = s.cmd("DATA")
            if code != 354:
                replies.append((code, text))
                s.cmd("RSET")
                continue
            code, text = s.cmd(body + b"%d\r\n." % i)
            replies.append((code, text))
            if code == 250:
                accepted.append(text.strip().rsplit(" ", 1)[1])
        s.close()
        failures = [r for r in replies if isinstance(r, tuple) and r[0] != 250]
        assert failures, "the disk never filled"
        assert all(400 <= code < 500 for code, _ in failures), failures
        assert any(text.startswith("452 4.3.1") for _, text in failures), failures
        entries = st.entries()
        assert sorted(entries) == sorted(accepted)
        for qid in accepted:
            assert entries[qid].data.startswith(b"Subject: filler")
    finally:
        st.close()
        subprocess.run(["umount", "-l", str(mnt)])


def test_sigterm_finishes_transactions_then_421(running):
    busy = ready_session(running)
    busy.cmd("MAIL FROM:<a@globex.example>")
    busy.cmd("RCPT TO:<b@acme.example>")
    assert busy.cmd("DATA")[0] == 354
    busy.send(b"Subject: in flight\r\n\r\nfirst half\r\n")
    idle = ready_session(running)
    time.sleep(0.2)
    running.daemon.terminate()
    assert running.notify.wait_for("STOPPING=1", timeout=10)
    assert idle.reply() == (421, "421 4.3.2 Service shutting down, closing transmission channel\r\n")
    # New connections are no longer accepted.  The relay worker processes
    # close their copies of the listening socket when their SIGTERM arrives
    # (the main process sends it on its own); wait until no process listens.
    deadline = time.monotonic() + 10
    while subprocess.run(["ss", "-Hltn", f"sport = :{running.smtp_port}"], capture_output=True,
                         text=True).stdout.strip():
        assert time.monotonic() < deadline, "still listening 10 s after SIGTERM"
        time.sleep(0.05)
    with pytest.raises(OSError):
        RawSMTP(running.smtp_port, timeout=2).reply()
    busy.send(b"second half\r\n.\r\n")
    code, text = busy.reply()
    assert code == 250, text
    assert busy.cmd("MAIL FROM:<a@globex.example>")[0] == 421
    assert running.daemon.wait(30) == 0
    (entry,) = running.entries().values()
    assert entry.data == b"Subject: in flight\r\n\r\nfirst half\r\nsecond half\r\n"


def test_watchdog_and_status(stack):
    stack.start_control()
    stack.start_daemon(env={"WATCHDOG_USEC": "400000"})
    deadline = time.monotonic() + 5
    while stack.notify.messages.count("WATCHDOG=1") < 3:
        assert time.monotonic() < deadline, stack.notify.messages
        time.sleep(0.05)
    assert any(m.startswith("STATUS=accepting mail on") for m in stack.notify.messages)
    import json
    status = json.loads((stack.dir / "run" / "status.json").read_text())
    assert status["state"] == "running" and status["pid"] == stack.daemon.pid
    assert [k["name"] for k in status["keys"]] == ["spool"]
    assert "key" not in json.dumps(status["keys"]).replace('"keys"', "")


@pytest.mark.parametrize("tls_version", ["TLSv1_2", "TLSv1_3"])
def test_tls_session_resumption_does_not_skip_the_certificate_check(tmp_path, tls_version):
    """A certificate from a foreign CA with the connector's name is refused;
    resuming that TLS session on a new connection must not turn it into a
    trusted one (the verify callback does not run on resumption)."""
    st = Stack(tmp_path / "c", {"relay": {"connector": [
        {"name": "exchange-acme", "networks": ["127.0.0.3/32"], "client_cert": "required",
         "client_cert_names": ["exchange-acme"], "tenant": "acme"}]}}).start()
    try:
        _resumption(st, tls_version)
    finally:
        st.close()


def _resumption(st, tls_version):
    import socket
    ctx = st.client_context("outsider")
    ctx.minimum_version = ctx.maximum_version = getattr(ssl.TLSVersion, tls_version)

    def attempt(session=None):
        sock = socket.create_connection(("127.0.0.1", st.smtps_port), timeout=10, source_address=("127.0.0.3", 0))
        tls = ctx.wrap_socket(sock, server_hostname="localhost", session=session)
        f = tls.makefile("rb")
        f.readline()
        tls.sendall(b"EHLO client.test\r\n")
        while f.readline()[3:4] == b"-":
            pass
        tls.sendall(b"MAIL FROM:<journal@acme.example>\r\n")
        reply = f.readline()
        tls.sendall(b"QUIT\r\n")
        f.readline()
        session, reused = tls.session, tls.session_reused
        tls.close()
        return reply, session, reused

    reply, session, _ = attempt()
    assert reply.startswith(b"550 5.7.1") and b"trusted CA" in reply
    for _ in range(2):
        reply, _, reused = attempt(session)
        assert not reused                 # the relay offers no resumption at all
        assert reply.startswith(b"550 5.7.1") and b"trusted CA" in reply, (reply, reused)


# --- issue 12: the relay under attack --------------------------------------------------------
# In-process first (a StringTransport and a task.Clock: no sockets, time
# driven by the test), then the same attacks on a real daemon over TLS.

TLS_FACTS = {"version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384", "client_cert": None}


class FakeWriter:
    def __init__(self, sink):
        self.sink, self.data, self.aborted, self.future = sink, b"", False, Future()
        self.id = f"ID{len(sink.writers)}"

    def write(self, data):
        self.data += data

    def commit(self, envelope):
        self.envelope = envelope
        if self.sink.commit_at_once:
            self.sink.committed.append((self.data, envelope))
            self.future.set_result(self.id)
        return self.future

    def abort(self):
        self.aborted = True


class FakeSink:
    def __init__(self, commit_at_once=True):
        self.writers, self.committed, self.commit_at_once = [], [], commit_at_once

    def admit(self, size_hint=0):
        pass

    def open_writer(self, size_hint=0):
        w = FakeWriter(self)
        self.writers.append(w)
        return w


def relay_factory(clock, sink=None, **kw):
    kw.setdefault("timeout", 300.0)
    return RelayFactory(sink=sink or FakeSink(), gate=Gate([ConnectorCfg("local", ("127.0.0.1/32",))]),
                        tls=None, hostname="archive.test", max_size=1 << 20, clock=clock,
                        call_from_thread=lambda fn, *a: fn(*a), **kw)


def session(factory, host="127.0.0.1", tls=True):
    """A STARTTLS-port session past EHLO, as if TLS were done (in-process)."""
    p = factory.buildProtocol(IPv4Address("TCP", host, 40000))
    t = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
    p.makeConnection(t)
    if tls and p.mode == "command":
        p.tls = dict(TLS_FACTS)
        p.dataReceived(b"EHLO client.test\r\n")
    return p, t


def replies_of(t) -> list[bytes]:
    out = t.value().split(b"\r\n")
    t.clear()
    return [ln for ln in out if ln]


def into_data(p, t):
    p.dataReceived(b"MAIL FROM:<a@globex.example>\r\nRCPT TO:<b@acme.example>\r\nDATA\r\n")
    assert replies_of(t)[-1].startswith(b"354 ")


def test_slow_loris_in_data_is_cut_and_nothing_is_stored():
    """One byte every 2 s resets any idle timeout for ever; the minimum data
    rate cuts it with 421 4.4.2 and the unfinished message is aborted."""
    clock = Clock()
    f = relay_factory(clock, min_data_rate=100, data_rate_window=30.0)
    p, t = session(f)
    into_data(p, t)
    for _ in range(14):                     # 28 s: the window is not over yet
        p.dataReceived(b"x")
        clock.advance(2)
    assert not t.disconnecting
    for _ in range(2):
        p.dataReceived(b"x")
        clock.advance(2)
    assert replies_of(t)[-1].startswith(b"421 4.4.2 ") and t.disconnecting
    (w,) = f.sink.writers
    assert w.aborted and f.sink.committed == []


def test_a_fast_sender_is_not_cut_by_the_data_rate_rule():
    clock = Clock()
    f = relay_factory(clock, min_data_rate=100, data_rate_window=30.0)
    p, t = session(f)
    into_data(p, t)
    for _ in range(10):                     # 100 s of DATA at 1000 bytes every 5 s
        p.dataReceived(b"y" * 998 + b"\r\n")
        clock.advance(5)
    p.dataReceived(b".\r\n")
    assert replies_of(t)[-1].startswith(b"250 2.0.0 Ok: queued as ")
    assert len(f.sink.committed) == 1 and not t.disconnecting
    clock.advance(100)                      # and no rate check runs outside DATA
    assert not t.disconnecting


def test_session_deadline_cuts_a_busy_but_endless_session():
    clock = Clock()
    f = relay_factory(clock, session_timeout=3600.0)
    p, t = session(f)
    for _ in range(359):                    # a NOOP every 10 s: never idle
        p.dataReceived(b"NOOP\r\n")
        clock.advance(10)
    assert not t.disconnecting
    clock.advance(10)
    assert replies_of(t)[-1] == b"421 4.4.2 archive.test Error: session time limit exceeded"
    assert t.disconnecting


def test_session_deadline_in_data_aborts_the_unfinished_message():
    clock = Clock()
    f = relay_factory(clock, session_timeout=100.0)
    p, t = session(f)
    into_data(p, t)
    p.dataReceived(b"Subject: half\r\n\r\nfirst half\r\n")
    clock.advance(100)
    assert replies_of(t)[-1].startswith(b"421 4.4.2 ") and t.disconnecting
    assert f.sink.writers[0].aborted and f.sink.committed == []


def test_session_deadline_during_a_commit_still_answers_250():
    """Nothing acknowledged is lost, and nothing committed goes unanswered:
    the deadline waits for the spool's verdict, then closes."""
    clock = Clock()
    sink = FakeSink(commit_at_once=False)
    f = relay_factory(clock, sink=sink, session_timeout=100.0)
    p, t = session(f)
    into_data(p, t)
    p.dataReceived(b"Subject: big batch\r\n\r\nbody\r\n.\r\n")
    clock.advance(100)
    assert not t.disconnecting
    (w,) = sink.writers
    w.future.set_result(w.id)
    lines = replies_of(t)
    assert lines[-2] == b"250 2.0.0 Ok: queued as ID0" and lines[-1].startswith(b"421 4.4.2 ")
    assert t.disconnecting and not w.aborted


def test_per_client_connection_limit_on_a_starttls_port():
    clock = Clock()
    f = relay_factory(clock, max_connections_per_client=3)
    held = [session(f, tls=False) for _ in range(3)]
    assert all(replies_of(t)[0].startswith(b"220 ") for _, t in held)
    p, t = session(f, tls=False)
    assert replies_of(t) == [b"421 4.7.0 Error: too many connections from your address, try again later"]
    assert t.disconnecting
    p.connectionLost(None)
    held[0][0].connectionLost(None)          # a slot freed is a slot free
    p, t = session(f, tls=False)
    assert replies_of(t)[0].startswith(b"220 ")
    assert f.clients.count("127.0.0.1") == 3


def test_implicit_tls_checks_before_any_handshake():
    """buildProtocol returning None: Twisted closes the socket before one
    TLS byte; allowed clients get a TLS protocol."""
    clock = Clock()
    f = relay_factory(clock, max_connections_per_client=2, implicit_tls=True)
    tls_factory = ImplicitTLSFactory.__new__(ImplicitTLSFactory)   # no certificate needed to decide
    tls_factory.relay = f
    assert f.refusal_at_connect("127.0.0.2") == "in no connector's networks"
    assert tls_factory.buildProtocol(IPv4Address("TCP", "127.0.0.2", 1)) is None
    assert f.refusal_at_connect("127.0.0.1") is None
    f.clients.add("127.0.0.1")
    f.clients.add("127.0.0.1")
    assert "limit 2 per client" in f.refusal_at_connect("127.0.0.1")
    assert tls_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1)) is None


def test_handshake_timeout_drops_a_silent_client():
    clock = Clock()
    f = relay_factory(clock, handshake_timeout=10.0, implicit_tls=True)
    p, t = session(f, tls=False)
    assert p.mode == "tls"
    clock.advance(9.9)
    assert not t.disconnecting and not getattr(t, "aborted", False)
    clock.advance(0.2)
    assert p.mode == "closed" and t.value() == b""        # nothing said: there is no TLS yet
    assert t.disconnecting
    p.connectionLost(None)
    assert f.clients.count("127.0.0.1") == 0 and not f.active


def test_handshake_timeout_after_starttls():
    clock = Clock()
    f = relay_factory(clock, handshake_timeout=5.0)
    p, t = session(f, tls=False)
    p.dataReceived(b"EHLO client.test\r\n")
    t.startTLS = lambda ctx: None          # a client that says STARTTLS, then nothing
    p.dataReceived(b"STARTTLS\r\n")
    assert replies_of(t)[-1].startswith(b"220 2.0.0")
    clock.advance(5.1)
    assert p.mode == "closed" and t.disconnecting


def test_size_with_non_ascii_digits_is_a_501_and_the_session_goes_on():
    clock = Clock()
    f = relay_factory(clock)
    p, t = session(f)
    replies_of(t)
    for line in ("MAIL FROM:<a@b> SIZE=²", "MAIL FROM:<a@b> SIZE=١٢٣", "MAIL FROM:<a@b> SIZE=1_0"):
        p.dataReceived(line.encode() + b"\r\n")
        assert replies_of(t) == [b"501 5.5.4 Bad SIZE parameter"]
    p.dataReceived(b"MAIL FROM:<a@b> \xff\xfe=1\r\n")          # 8-bit keyword
    assert replies_of(t) == [b"501 5.5.4 Syntax error in parameters"]
    p.dataReceived("MAIL FROM:<a@b> BODY=8bitmıme\r\n".encode())
    assert replies_of(t) == [b"501 5.5.4 Bad BODY parameter"]
    p.dataReceived(b"EHLO \xff\xfe.example\r\n")                # 8-bit EHLO argument: taken as sent
    assert replies_of(t)[0].startswith(b"250-archive.test")
    p.dataReceived(b"MAIL FROM:<a@b> SIZE=10\r\nRCPT TO:<c@d> \xff=1\r\nRCPT TO:<c@d> FOO\r\n")
    assert replies_of(t) == [b"250 2.1.0 Ok", b"501 5.5.4 Syntax error in parameters",
                             b"555 5.5.4 Unsupported option: FOO"]
    assert not t.disconnecting


def test_implicit_tls_refuses_a_foreign_network_before_the_handshake(tmp_path):
    """On the implicit-TLS port a client from no connector's network must
    not get a TLS handshake (CPU, a connection slot) before being refused:
    the server sends not one byte."""
    st = Stack(tmp_path / "n", {"relay": {"connector": [{"name": "local", "networks": ["127.0.0.1/32"]}]}}).start()
    try:
        sock = socket.create_connection(("127.0.0.1", st.smtps_port), timeout=10, source_address=("127.0.0.2", 0))
        try:
            sock.sendall(b"\x16\x03\x01\x00\x05hello")    # the start of a ClientHello
        except OSError:
            pass
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            data = b""
        sock.close()
        assert data == b""                              # no ServerHello, no alert, no 554
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            RawSMTP(st.smtps_port, implicit=True, context=st.client_context(), source="127.0.0.2").reply()
        assert "reject: [127.0.0.2] on smtps before TLS: in no connector's networks" in st.log()
        with st.smtp(implicit=True) as c:                # 127.0.0.1 still served
            c.sendmail("a@globex.example", ["b@acme.example"], MESSAGE)
    finally:
        st.close()


def test_a_silent_client_is_dropped_after_the_handshake_timeout(running):
    """Connect to the implicit-TLS port and say nothing: dropped after
    handshake_timeout (10 s by default), not after the 30 s idle timeout."""
    s = RawSMTP(running.smtps_port, timeout=40)
    started = time.monotonic()
    assert s.closed_by_server(timeout=25)
    assert time.monotonic() - started < 25
    s.close()
    assert "TLS handshake not finished within 10 s" in running.log()


def test_connections_are_limited_per_client_address(tmp_path):
    """Eleven sessions from one address (limit set to 10): the
    eleventh gets 421 4.7.0 on the STARTTLS port and is closed unanswered
    on the implicit-TLS one; another address is still served."""
    running = Stack(tmp_path / "pc", {"relay": {"max_connections_per_client": 10}}).start()
    held = []
    try:
        for _ in range(10):
            s = RawSMTP(running.smtp_port)
            assert s.reply()[0] == 220
            held.append(s)
        extra = RawSMTP(running.smtp_port)
        assert extra.reply() == (421, "421 4.7.0 Error: too many connections from your address, try again later\r\n")
        assert extra.closed_by_server()
        extra.close()
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            RawSMTP(running.smtps_port, implicit=True, context=running.client_context()).reply()
        other = RawSMTP(running.smtps_port, implicit=True, context=running.client_context(), source="127.0.0.3")
        assert other.reply()[0] == 220                 # the exchange-acme connector's network
        other.close()
        for s in held:
            s.close()
        deadline = time.monotonic() + 10                 # slots come back as sessions end
        while True:
            s = RawSMTP(running.smtp_port)
            code = s.reply()[0]
            s.close()
            if code == 220:
                break
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        for s in held:
            s.close()
        running.close()


def test_slow_loris_in_data_is_cut(tmp_path):
    """One byte every half second keeps an idle timeout from ever firing;
    the minimum data rate (here 100 bytes/s over 2 s) cuts it: 421 4.4.2,
    nothing stored, and the next message goes through."""
    st = Stack(tmp_path / "l", {"relay": {"min_data_rate": 100, "data_rate_window": 2.0}}).start()
    try:
        s = ready_session(st)
        s.cmd("MAIL FROM:<a@globex.example>")
        s.cmd("RCPT TO:<b@acme.example>")
        assert s.cmd("DATA")[0] == 354
        started = time.monotonic()
        code = None
        for _ in range(40):                              # at most 20 s
            try:
                s.send(b"x")
            except OSError:
                break
            s.sock.settimeout(0.5)
            try:
                chunk = s.sock.recv(4096)
            except socket.timeout:
                continue
            except (OSError, ssl.SSLError):
                break
            s.buf += chunk
            if b"\r\n" in s.buf or not chunk:
                break
        assert s.buf.startswith(b"421 4.4.2 "), s.buf
        assert time.monotonic() - started < 15
        s.close()
        assert st.spool_ids() == []
        assert "DATA too slow" in st.log()
        with st.smtp() as c:
            c.sendmail("a@globex.example", ["b@acme.example"], MESSAGE)
        assert len(st.spool_ids()) == 1
    finally:
        st.close()


def test_size_with_non_ascii_digits_gets_501_not_a_dropped_session(running):
    s = ready_session(running)
    assert s.cmd("MAIL FROM:<a@globex.example> SIZE=²".encode()) == (501, "501 5.5.4 Bad SIZE parameter\r\n")
    assert s.cmd("MAIL FROM:<a@globex.example> SIZE=١٢".encode()) == (501, "501 5.5.4 Bad SIZE parameter\r\n")
    assert s.cmd(b"MAIL FROM:<a@globex.example> \xff=1") == (501, "501 5.5.4 Syntax error in parameters\r\n")
    assert s.cmd("MAIL FROM:<a@globex.example> SIZE=100")[0] == 250
    assert s.cmd("RCPT TO:<b@acme.example>")[0] == 250
    assert s.cmd("DATA")[0] == 354
    assert s.cmd(b"Subject: after\r\n\r\nok\r\n.")[0] == 250
    s.close()
    assert len(running.spool_ids()) == 1
    assert "Traceback" not in running.log()
