"""The relay end to end: a real daemon process, real TLS, real clients."""

import os
import ssl
import subprocess
import time

import pytest

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
def test_smtp_smuggling_is_refused(running, variant):
    s = ready_session(running)
    s.cmd("MAIL FROM:<a@globex.example>")
    s.cmd("RCPT TO:<b@acme.example>")
    assert s.cmd("DATA")[0] == 354
    s.send(b"Subject: first\r\n\r\nhello" + variant +
           b"MAIL FROM:<admin@acme.example>\r\nRCPT TO:<victim@acme.example>\r\nDATA\r\n"
           b"Subject: smuggled\r\n\r\nevil\r\n.\r\nQUIT\r\n")
    code, text = s.reply()
    assert code == 550 and text.startswith("550 5.5.2 Error: bare <")
    assert s.closed_by_server()
    s.close()
    assert running.spool_ids() == []
    assert "bare <" in running.log()


def test_bare_lf_line_endings_are_refused(running):
    s = ready_session(running)
    s.cmd("MAIL FROM:<a@globex.example>")
    s.cmd("RCPT TO:<b@acme.example>")
    s.cmd("DATA")
    s.send(b"Subject: unix\nline endings\n.\n")
    assert s.reply() == (550, "550 5.5.2 Error: bare <LF> received\r\n")
    assert s.closed_by_server()


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
