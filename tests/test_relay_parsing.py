"""The relay's pure parts: the DATA reader and the connector gate."""

import random

import pytest

from mailtresor.config import Connector as ConnectorCfg
from mailtresor.relay import BareLineEnding, DataReader, Gate, _address


def read_all(wire: bytes, splits=None):
    """Feed `wire` in pieces; return (content, rest) or raise."""
    r = DataReader()
    out = b""
    pieces = [wire] if splits is None else [wire[a:b] for a, b in zip([0] + splits, splits + [len(wire)])]
    for n, p in enumerate(pieces):
        content, rest, done = r.feed(p)
        out += content
        if done:
            return out, rest + b"".join(pieces[n + 1:])
    return out, None


def stuff(message: bytes) -> bytes:
    lines = message.split(b"\r\n")
    return b"\r\n".join(b"." + ln if ln.startswith(b".") else ln for ln in lines)


CASES = [
    b"Subject: x\r\n\r\nhello\r\n",
    b"\r\n",
    b".\r\n..\r\n.x\r\n",                               # lines made of dots
    b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\n.\r\nend\r\n",
    b"a" * 20000 + b"\r\n" + b".b" * 9000 + b"\r\n",     # long lines
    bytes(range(128, 256)) + b"\r\n",                    # 8-bit
]


@pytest.mark.parametrize("message", CASES, ids=lambda m: f"{len(m)}B")
def test_dot_stuffing_round_trips_across_any_split(message):
    wire = stuff(message) + b".\r\n" + b"QUIT\r\n"
    assert read_all(wire) == (message, b"QUIT\r\n")
    rng = random.Random(len(message))
    for _ in range(200):
        k = rng.randint(1, 6)
        splits = sorted(rng.sample(range(1, len(wire)), min(k, len(wire) - 1)))
        assert read_all(wire, splits) == (message, b"QUIT\r\n")
    # one byte at a time
    assert read_all(wire, list(range(1, len(wire)))) == (message, b"QUIT\r\n")


def test_empty_message():
    assert read_all(b".\r\nNOOP\r\n") == (b"", b"NOOP\r\n")


# The published SMTP smuggling variants (SEC Consult, 2023) and friends:
# every one must be refused, never taken as the end of DATA.
SMUGGLING = [
    b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r.\r\n", b"\r\n.\n", b"\n.\r",
    b"\r\n\x00.\r\n",  # NUL is data, but see below: this one is fine
]


@pytest.mark.parametrize("variant", SMUGGLING[:-1], ids=repr)
def test_smuggling_variants_are_refused(variant):
    wire = (b"Subject: first\r\n\r\nhello" + variant +
            b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\nSubject: smuggled\r\n\r\n.\r\n")
    with pytest.raises(BareLineEnding):
        read_all(wire)
    # and also when the pieces arrive separately
    with pytest.raises(BareLineEnding):
        read_all(wire, list(range(1, len(wire))))


def test_nul_is_data_not_an_end():
    msg, rest = read_all(b"a\r\n\x00.\r\n.\r\n")
    assert msg == b"a\r\n\x00.\r\n" and rest == b""


@pytest.mark.parametrize("body,what", [(b"line\nnext\r\n.\r\n", "LF"), (b"line\rnext\r\n.\r\n", "CR"),
                                       (b"trailing\n", "LF")])
def test_bare_line_endings_are_named(body, what):
    with pytest.raises(BareLineEnding) as e:
        read_all(body)
    assert e.value.what == what


def test_cr_at_chunk_end_waits_for_its_lf():
    r = DataReader()
    assert r.feed(b"abc\r") == (b"", b"", False)
    assert r.feed(b"\ndef\r\n.\r\n") == (b"abc\r\ndef\r\n", b"", True)


def connectors():
    return Gate([
        ConnectorCfg("exchange-acme", ("10.1.0.0/16",), "required", ("exchange-acme",), "acme"),
        ConnectorCfg("any-cert", ("10.2.0.0/16",), "required", (), ""),
        ConnectorCfg("mta", ("127.0.0.1/32", "::1/128"), "optional", (), ""),
    ])


def cert(cn, trusted=True):
    return {"client_cert": {"cn": cn, "trusted": trusted, "subject": f"CN={cn}", "sha256": "x"}}


def test_gate_network_admission():
    g = connectors()
    assert g.may_connect("10.1.2.3") and g.may_connect("127.0.0.1") and g.may_connect("::1")
    assert not g.may_connect("127.0.0.2") and not g.may_connect("192.0.2.1") and not g.may_connect("junk")


def test_gate_picks_connector_by_certificate():
    g = connectors()
    c, r = g.choose("10.1.2.3", cert("exchange-acme"))
    assert c.name == "exchange-acme" and c.tenant == "acme" and r is None
    c, r = g.choose("10.2.0.9", cert("anything"))
    assert c.name == "any-cert"
    c, r = g.choose("127.0.0.1", None)
    assert c.name == "mta"


def test_gate_refusals_say_why():
    g = connectors()
    c, r = g.choose("10.1.2.3", None)
    assert c is None and (r.code, r.enhanced) == (530, "5.7.0") and "certificate is required" in r.text
    c, r = g.choose("10.1.2.3", cert("someone-else"))
    assert c is None and (r.code, r.enhanced) == (550, "5.7.1") and "someone-else" in r.text
    c, r = g.choose("10.1.2.3", cert("exchange-acme", trusted=False))
    assert c is None and r.code == 550 and "trusted CA" in r.text
    c, r = g.choose("192.0.2.1", None)
    assert c is None and r.code == 550


def test_gate_tells_connectors_sharing_a_certificate_apart_by_journal_address():
    """Issue 12: every Microsoft 365 organisation presents the same
    certificate; the journal address picks the connector, and only a
    journaling connector's trust goes into the envelope."""
    guid = "8D0F1D7C-1A2B-4C3D-9E8F-0A1B2C3D4E5F"
    g = Gate([
        ConnectorCfg("exo-acme", ("40.92.0.0/15",), "required", ("exo",), "acme", ("ja@archive.example",),
                     journal=True, exchange_tenant_id=guid),
        ConnectorCfg("exo-globex", ("40.92.0.0/15",), "required", ("exo",), "globex", ("jg@archive.example",),
                     journal=True, exchange_tenant_id="f00dcafe-1234-4321-abcd-0123456789ab"),
        ConnectorCfg("mta", ("10.0.0.0/8",), "optional", (), "acme"),
    ])
    found, r = g.candidates("40.92.1.1", cert("exo"))
    assert [c.name for c in found] == ["exo-acme", "exo-globex"] and r is None
    (c,) = g.for_recipient(found, "JG@Archive.Example")
    assert c.name == "exo-globex" and c.journaling() == {"tenant_id": "f00dcafe-1234-4321-abcd-0123456789ab"}
    assert g.for_recipient(found, "ja@archive.example")[0].journaling() == {"tenant_id": guid.lower()}
    assert g.for_recipient(g.for_recipient(found, "ja@archive.example"), "jg@archive.example") == []
    assert g.for_recipient(found, "other@archive.example") == []
    c, _ = g.choose("10.1.1.1", None)
    assert c.name == "mta" and c.journaling() is None


@pytest.mark.parametrize("text,expected", [
    ("<a@b>", ("a@b", {})),
    ("<>", ("", {})),
    (" <a@b> SIZE=100 BODY=8BITMIME", ("a@b", {"SIZE": "100", "BODY": "8BITMIME"})),
    ("<a@b> SMTPUTF8", ("a@b", {"SMTPUTF8": None})),
    ("<@relay.x,@r2.y:user@host>", ("user@host", {})),
    ("<\"quoted local\"@b>", ("\"quoted local\"@b", {})),
    ("<ümlaut@bücher.example>", ("ümlaut@bücher.example", {})),
    ("a@b", None),
    ("<a@b", None),
    ("<a b@c>", None),
])
def test_address_parsing(text, expected):
    assert _address(text) == expected
