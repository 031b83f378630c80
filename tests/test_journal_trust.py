"""Issue 12, parts 1 and 2: journal reports are trusted only from journaling
connectors, and a tenant's archive is written only with that tenant's
authority.  A real daemon behind the real relay (TLS, client certificates);
what the archive holds is read back with the `mailtresor` CLI and the store.

Connectors of the stack here (127.0.0.0/8 all; certificates by CN):

    exchange-acme   journaling, tenant acme           (Exchange Server)
    exo-acme        journaling, tenant acme, EXO id A, journal-a1@archive.test   } the same
    exo-globex      journaling, tenant globex, EXO id G, journal-g1@archive.test } certificate
    mta-acme        tenant acme, not journaling       (acme's own MTA)
    local           no certificate, no tenant         (routes by the SMTP envelope)
"""

import json
import time

import pytest

from mailtresor.archive.store import Store
from tests.harness.journalgen import make_forgery, make_report, xlsx
from tests.harness.stack import Stack
from tests.test_archive import cli, keys_of, search, wait_archived

ACME_ID = "8d0f1d7c-1a2b-4c3d-9e8f-0a1b2c3d4e5f"
GLOBEX_ID = "F00DCAFE-1234-4321-ABCD-0123456789AB"     # upper case in the config: compared without case

CONNECTORS = [
    {"name": "exchange-acme", "networks": ["127.0.0.0/8"], "client_cert": "required",
     "client_cert_names": ["exchange-acme"], "tenant": "acme", "journal": True},
    {"name": "exo-acme", "networks": ["127.0.0.0/8"], "client_cert": "required",
     "client_cert_names": ["exo"], "tenant": "acme", "journal": True, "exchange_tenant_id": ACME_ID,
     "recipients": ["journal-a1@archive.test"]},
    {"name": "exo-globex", "networks": ["127.0.0.0/8"], "client_cert": "required",
     "client_cert_names": ["exo"], "tenant": "globex", "journal": True, "exchange_tenant_id": GLOBEX_ID,
     "recipients": ["journal-g1@archive.test"]},
    {"name": "mta-acme", "networks": ["127.0.0.0/8"], "client_cert": "required",
     "client_cert_names": ["mta-acme"], "tenant": "acme"},
    {"name": "local", "networks": ["127.0.0.1/32"]},
]

DECOY = (b"From: Insider <insider@acme.example>\r\nTo: colleague@acme.example\r\nSubject: Lunch menu\r\n"
         b"Date: Thu, 22 Aug 2002 10:00:00 +0000\r\nMessage-ID: <decoy-1@acme.example>\r\n\r\nSoup on monday.\r\n")


def forgery(codeword: str, *, recipients=(("to", "victim@globex.example", None),), top_headers=()) -> bytes:
    """An acme insider's real mail (codeword in its text, a spreadsheet)
    with a forged journal-report header and a decoy attached."""
    return make_forgery(sender="insider@acme.example", to="colleague@acme.example", subject=f"Plan {codeword}",
                        text=f"The real figures, keep quiet: {codeword}.", attachment_name=f"payroll-{codeword}.xlsx",
                        attachment=xlsx(f"grid{codeword}"), decoy=DECOY, recipients=list(recipients),
                        top_headers=list(top_headers))


def original(subject: str, frm="zed@globex.example", to="amy@acme.example") -> bytes:
    return (f"From: <{frm}>\r\nTo: <{to}>\r\nSubject: {subject}\r\nDate: Thu, 22 Aug 2002 11:00:00 +0000\r\n"
            f"Message-ID: <{abs(hash(subject))}@globex.example>\r\n\r\nbody of {subject}\r\n").encode()


def show(stack, tenant, aid, *flags) -> bytes:
    return cli(stack, "show", "--tenant", tenant, *flags, aid, check=0).stdout


def ids(stack, tenant, query) -> list[str]:
    return [h["id"] for h in search(stack, tenant, query)]


def holdings(stack) -> dict[str, int]:
    """Records per tenant, straight from the store."""
    st = Store(stack.cfg.archive.directory, readonly=True)
    try:
        return {t: sum(st.shard(t, m).count() for m in st.months(t)) for t in st.tenants()}
    finally:
        st.close()


def status(stack, untrusted: int) -> dict:
    # The daemon publishes status.json every 10 s and on changes of state.
    deadline = time.monotonic() + 30
    while True:
        st = json.loads(cli(stack, "status", "--json", check=0).stdout)
        if (st.get("archiver") or {}).get("journal_untrusted") == untrusted or time.monotonic() > deadline:
            return st
        time.sleep(0.5)


@pytest.fixture
def trust(tmp_path):
    s = Stack(tmp_path / "stack", {"archive": {"enabled": True}, "relay": {"connector": CONNECTORS}}, milter=False)
    s.start()
    yield s
    s.close()


def assert_archived_as_received(stack, tenant, raw, codeword):
    """The forged message is there byte for byte, the real text and the
    spreadsheet searchable, flagged; the decoy is not what was kept."""
    (aid,) = ids(stack, tenant, f"body:{codeword}")
    assert show(stack, tenant, aid) == raw
    assert ids(stack, tenant, f"attachment:payroll-{codeword}.xlsx") == [aid]
    assert ids(stack, tenant, f"attachment-text:grid{codeword}") == [aid]
    assert aid in ids(stack, tenant, "flag:journal-untrusted")
    assert aid not in ids(stack, tenant, "tag:journal")
    env = json.loads(show(stack, tenant, aid, "--envelope"))
    (e,) = env["envelopes"]
    assert "journal" not in e and e["journal_untrusted"]
    return aid, e


def test_forged_reports_from_untrusted_paths_are_archived_as_received(trust):
    """(b) a connector bound to acme that is not journaling, and the
    unbound local connector: the insider's real mail is what is kept."""
    bound, unbound = forgery("bluefalcon"), forgery("redheron")
    with trust.smtp(implicit=True, cert="client-mta-acme") as s:
        s.sendmail("insider@acme.example", ["colleague@acme.example"], bound)
    with trust.smtp() as s:
        s.sendmail("insider@acme.example", ["colleague@acme.example"], unbound)
    wait_archived(trust)
    _, e = assert_archived_as_received(trust, "acme", bound, "bluefalcon")
    assert e["connector"] == "mta-acme" and e["journal_untrusted"] == "not from a journaling connector"
    _, e = assert_archived_as_received(trust, "acme", unbound, "redheron")
    assert e["connector"] == "local" and e.get("journaling") is None
    assert ids(trust, "acme", "subject:lunch") == []             # the decoy is not a message of its own
    # The forged report names globex recipients: globex gets nothing.
    assert holdings(trust) == {"acme": 2}
    # Logged without content, counted in status.
    log = trust.log()
    assert log.count("flagged journal-untrusted") == 2
    assert "bluefalcon" not in log.lower() and "payroll" not in log
    st = status(trust, 2)
    assert st["archiver"]["journal_untrusted"] == 2
    text = cli(trust, "status", check=None).stdout.decode()
    assert "2 message(s) with an untrusted journal report header" in text


def test_exchange_online_reports_are_trusted_only_with_the_organisations_tenant_id(trust):
    """(c) One certificate for every Microsoft 365 organisation: the journal
    address picks the connector, X-MS-Exchange-CrossTenant-Id must be its
    organisation's; a wrong, missing or doubled id is not trusted."""
    good = make_report(original("Genuine acme report"), sender="zed@globex.example",
                       recipients=[("to", "amy@acme.example", None), ("bcc", "hidden@acme.example", None)],
                       top_headers=[f"X-MS-Exchange-CrossTenant-Id: {ACME_ID.upper()}".encode()])
    for_globex = make_report(original("Genuine globex report", to="gus@globex.example"), sender="zed@globex.example",
                             recipients=[("to", "gus@globex.example", None)],
                             top_headers=[f"X-MS-Exchange-CrossTenant-Id: {GLOBEX_ID.lower()}".encode()])
    wrong = forgery("greenowl", top_headers=[f"X-MS-Exchange-CrossTenant-Id: {GLOBEX_ID}".encode()])
    missing = forgery("blackswan")
    doubled = forgery("whitecrane", top_headers=[f"X-MS-Exchange-CrossTenant-Id: {ACME_ID}".encode(),
                                                 f"X-MS-Exchange-CrossTenant-Id: {GLOBEX_ID}".encode()])
    # From 127.0.0.2: outside the local connector's network, as Exchange
    # Online is outside a site's own MTAs'.
    with trust.smtp(implicit=True, cert="client-exo", source="127.0.0.2") as s:
        s.sendmail("", ["journal-a1@archive.test"], good)
        s.sendmail("", ["journal-g1@archive.test"], for_globex)
        for m in (wrong, missing, doubled):
            s.sendmail("", ["journal-a1@archive.test"], m)
        # The certificate alone opens no connector: its journal address does.
        assert s.mail("")[0] == 250
        assert s.rcpt("journal@archive.test")[0] == 550
        s.rset()
    wait_archived(trust)
    # The genuine reports are unwrapped, each in its organisation's tenant.
    (aid,) = ids(trust, "acme", "bcc:hidden@acme.example")
    assert show(trust, "acme", aid) == original("Genuine acme report")
    assert ids(trust, "acme", "tag:journal") == [aid]
    (gid,) = ids(trust, "globex", "subject:genuine")
    assert show(trust, "globex", gid) == original("Genuine globex report", to="gus@globex.example")
    for raw, word in ((wrong, "greenowl"), (missing, "blackswan"), (doubled, "whitecrane")):
        _, e = assert_archived_as_received(trust, "acme", raw, word)
        assert e["connector"] == "exo-acme" and "X-MS-Exchange-CrossTenant-Id" in e["journal_untrusted"]
    assert holdings(trust) == {"acme": 4, "globex": 1}
    assert status(trust, 3)["archiver"]["journal_untrusted"] == 3


def test_a_bound_connector_writes_only_into_its_tenant(trust):
    """Report recipients and envelope addresses of another tenant route
    nothing: acme's connectors write into acme, and only there."""
    genuine = make_report(original("All about globex"), sender="zed@globex.example",
                          recipients=[("to", "gus@globex.example", None),
                                      ("bcc", "gil@globex.example", "Expanded: board@globex.example")])
    forged = forgery("goldfinch", recipients=[("to", "gus@globex.example", None), ("bcc", "gil@globex.example", None)])
    plain = original("Envelope names globex", frm="x@globex.example", to="y@globex.example")
    with trust.smtp(implicit=True, cert="client-exchange-acme") as s:      # acme's journaling connector
        s.sendmail("", ["journal@archive.test"], genuine)
        s.sendmail("postmaster@globex.example", ["gus@globex.example"], forgery("silverfox"))
    with trust.smtp(implicit=True, cert="client-mta-acme") as s:           # acme's MTA, not journaling
        s.sendmail("insider@acme.example", ["gus@globex.example"], forged)
        s.sendmail("x@globex.example", ["y@globex.example", "z@globex.example"], plain)
    wait_archived(trust)
    assert holdings(trust) == {"acme": 4}                       # globex has no archive at all
    # Report recipients stay searchable inside acme (Bcc, expanded list).
    (aid,) = ids(trust, "acme", "bcc:gil@globex.example")
    assert show(trust, "acme", aid) == original("All about globex")
    assert ids(trust, "acme", "envelope:board@globex.example") == [aid]
    # A report from the journaling connector with no tenant id to check is
    # unwrapped wherever its envelope points -- into acme.
    assert ids(trust, "acme", "subject:silverfox") == []
    (pid,) = ids(trust, "acme", "envelope:z@globex.example")
    assert show(trust, "acme", pid) == plain
    assert_archived_as_received(trust, "acme", forged, "goldfinch")


def test_untrusted_paths_route_by_the_smtp_envelope_only(trust):
    """The unbound connector: MAIL FROM and RCPT TO decide; a report's
    recipients and the headers never do; nothing is dropped."""
    to_acme = forgery("bluejay", recipients=[("to", "gus@globex.example", None)])
    nowhere = forgery("kestrel", recipients=[("to", "amy@acme.example", None)])
    with trust.smtp() as s:
        s.sendmail("x@nowhere.example", ["colleague@acme.example"], to_acme)
        s.sendmail("x@nowhere.example", ["y@elsewhere.example"], nowhere)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any((trust.spool_dir / "unrouted").iterdir()):
        time.sleep(0.1)
    wait_archived(trust)
    assert holdings(trust) == {"acme": 1}
    assert_archived_as_received(trust, "acme", to_acme, "bluejay")
    # The other names acme only in its forged report: held, not dropped.
    assert len(list((trust.spool_dir / "unrouted").iterdir())) == 1
    assert ids(trust, "acme", "body:kestrel") == []


def test_import_writes_into_its_tenant_and_unwraps_only_when_told(trust, tmp_path):
    """`mailtresor import --tenant acme`: the operator's authority names the
    tenant (globex addresses route nothing), and a journal report is
    unwrapped only with --journal-reports."""
    forged = forgery("pelican", recipients=[("to", "gus@globex.example", None)])
    genuine = make_report(original("Exported journal report", to="gus@globex.example"),
                          sender="zed@globex.example", recipients=[("bcc", "gil@globex.example", None)])
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "1.eml").write_bytes(forged)
    (tmp_path / "journal").mkdir()
    (tmp_path / "journal" / "1.eml").write_bytes(genuine)
    p = cli(trust, "import", "--tenant", "acme", str(tmp_path / "plain"))
    assert p.returncode == 0 and b"1 imported" in p.stdout, (p.stdout, p.stderr)
    wait_archived(trust)
    _, e = assert_archived_as_received(trust, "acme", forged, "pelican")
    assert e["source"] == "import"
    p = cli(trust, "import", "--tenant", "acme", "--journal-reports", str(tmp_path / "journal"))
    assert p.returncode == 0 and b"1 imported" in p.stdout, (p.stdout, p.stderr)
    wait_archived(trust)
    (aid,) = ids(trust, "acme", "bcc:gil@globex.example")
    assert show(trust, "acme", aid) == original("Exported journal report", to="gus@globex.example")
    assert holdings(trust) == {"acme": 2}
