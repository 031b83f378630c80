"""Tests for the private Postfix harness (tests/harness/postfix.py).

Run: /usr/bin/python3 -m pytest tests/harness/test_postfix_harness.py
Needs root and Debian's postfix package; starts real Postfix instances on
127.0.0.1 and stops them again.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import smtplib
import socket
import ssl
import time

import pytest

from .postfix import (PostfixError, PostfixInstance, free_port, make_self_signed_cert,
                      make_workdir)

pytestmark = [
    pytest.mark.postfix,
    pytest.mark.skipif(not os.path.exists("/usr/sbin/postfix"),
                       reason="Debian's postfix package is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="a private Postfix instance needs root"),
]

QUEUED = re.compile(rb"^2\.0\.0 Ok: queued as (\w+)$")  # smtplib strips "250 "


def message(subject: str) -> bytes:
    return (f"From: a@example.org\r\nTo: b@example.com\r\nSubject: {subject}\r\n"
            f"\r\nbody of {subject}\r\n").encode()


def send(client: smtplib.SMTP, subject: str) -> str:
    """MAIL/RCPT/DATA by hand so we get the queue id from the 250 reply."""
    assert client.mail("a@example.org")[0] == 250
    assert client.rcpt("b@example.com")[0] == 250
    code, reply = client.data(message(subject))
    assert code == 250, reply
    m = QUEUED.match(reply)
    assert m, reply
    return m.group(1).decode()


def assert_discarded(pf: PostfixInstance, qid: str, sender: str = "a@example.org") -> None:
    name = re.escape(pf.instance_name)
    pf.wait_for_log(rf"{name}/qmgr\[\d+\]: {qid}: from=<{re.escape(sender)}>, "
                    rf"size=\d+, nrcpt=1 \(queue active\)")
    pf.wait_for_log(rf"{name}/discard\[\d+\]: {qid}: to=<b@example\.com>, relay=none, "
                    rf".*dsn=2\.0\.0, status=sent \(")
    pf.wait_for_log(rf"{name}/qmgr\[\d+\]: {qid}: removed")


def banner(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.settimeout(20)
        line = s.recv(512)
        s.sendall(b"QUIT\r\n")
    return line


@pytest.fixture(scope="module")
def workdir():
    d = make_workdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def cert(workdir):
    return make_self_signed_cert(workdir / "tls", "localhost")


@pytest.fixture(scope="module")
def pf(workdir, cert):
    inst = PostfixInstance(workdir / "pf1", free_port(), tls_cert=cert[0], tls_key=cert[1])
    with inst:
        yield inst
    assert inst.master_pid() is None


def test_plain_smtp_is_queued_and_discarded(pf):
    with smtplib.SMTP("127.0.0.1", pf.smtpd_port, timeout=20) as c:
        code, caps = c.ehlo("client.example")
        assert code == 250
        assert c.has_extn("starttls")
        qid = send(c, "plain")
    assert_discarded(pf, qid)
    pf.wait_queue_empty()
    assert pf.queue_is_empty()
    assert pf.postconf("mydestination") == ""
    assert pf.postconf("default_transport") == "discard:"
    # Nothing was delivered: the only delivery agent that ran is discard.
    assert not re.search(r"/(smtp|local|virtual|lmtp|pipe)\[\d+\]: " + qid, pf.maillog())


def test_starttls_is_queued_and_discarded(pf, cert):
    ctx = ssl.create_default_context(cafile=str(cert[0]))  # verifies the cert
    with smtplib.SMTP("127.0.0.1", pf.smtpd_port, timeout=20) as c:
        c.ehlo("client.example")
        code, _ = c.starttls(context=ctx)
        assert code == 220
        assert isinstance(c.sock, ssl.SSLSocket)
        assert c.sock.version() in ("TLSv1.2", "TLSv1.3")
        c.ehlo("client.example")
        assert not c.has_extn("starttls")  # not offered twice
        qid = send(c, "tls")
    client = pf.wait_for_log(rf"smtpd\[(\d+)\]: {qid}: client=localhost\[127\.0\.0\.1\]")
    pf.wait_for_log(rf"smtpd\[{client.group(1)}\]: Anonymous TLS connection established "
                    rf"from localhost\[127\.0\.0\.1\]: TLSv1\.[23] with cipher")
    assert_discarded(pf, qid)


def test_sendmail_goes_through_pickup_and_is_discarded(pf):
    offset = pf.log_offset()
    pf.sendmail("c@example.org", ["b@example.com"], b"Subject: local\n\n.\nbody\n")
    m = pf.wait_for_log(r"pickup\[\d+\]: (\w+): uid=0 from=<c@example\.org>", start=offset)
    assert_discarded(pf, m.group(1), sender="c@example.org")
    pf.wait_queue_empty()


def test_encrypt_level_and_two_instances_at_once(pf, workdir, cert):
    second = PostfixInstance(workdir / "pf2", free_port(), tls_cert=cert[0], tls_key=cert[1],
                             tls_security_level="encrypt")
    assert second.smtpd_port != pf.smtpd_port
    with second:
        assert second.master_pid() not in (None, pf.master_pid())
        with smtplib.SMTP("127.0.0.1", second.smtpd_port, timeout=20) as c:
            c.ehlo("client.example")
            code, reply = c.mail("a@example.org")
            assert (code, reply) == (530, b"5.7.0 Must issue a STARTTLS command first")
            c.starttls(context=ssl.create_default_context(cafile=str(cert[0])))
            c.ehlo("client.example")
            qid = send(c, "encrypt")
        assert_discarded(second, qid)
        assert qid not in pf.maillog()  # the instances really are separate
        second.main_cf["smtpd_banner"] = "$myhostname ESMTP reloaded"
        second.reload()
        deadline = time.monotonic() + 15  # an idle pre-reload smtpd may answer once more
        while (line := banner(second.smtpd_port)).endswith(b"ESMTP Postfix\r\n"):
            assert time.monotonic() < deadline, "reload did not take effect"
            time.sleep(0.2)
        assert line == b"220 mailtresor-test.localdomain ESMTP reloaded\r\n"
    assert second.master_pid() is None
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", second.smtpd_port), timeout=2).close()
    second.stop()  # idempotent
    assert pf.master_pid() is not None  # stopping one left the other alone


def test_start_refuses_unreachable_workdir(tmp_path):
    hidden = tmp_path / "hidden"
    hidden.mkdir(mode=0o700)
    inst = PostfixInstance(hidden / "pf", free_port())
    with pytest.raises(PostfixError, match="not searchable by user 'postfix'"):
        inst.start()
    assert inst.master_pid() is None
    assert not pathlib.Path(hidden / "pf").exists()
