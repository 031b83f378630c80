"""The relay's pure parts: the DATA reader and the connector gate."""

import random

import pytest

from mailtresor.config import Connector as ConnectorCfg
from mailtresor.ingest.relay import BareLineEnding, DataReader, Gate, _address, mail_parameters


def read_all(wire: bytes, splits=None, strict=False, reader=None):
    """Feed `wire` in pieces; return (content, rest) or raise."""
    r = reader or DataReader(strict=strict)
    out = b""
    pieces = [wire] if splits is None else [wire[a:b] for a, b in zip([0] + splits, splits + [len(wire)])]
    for n, p in enumerate(pieces):
        content, rest, done = r.feed(p)
        out += content
        if done:
            return out, rest + b"".join(pieces[n + 1:])
    return out, None


def stuff(message: bytes) -> bytes:
    """Dot stuffing as an SMTP client does it: a dot after <CR><LF> (or at
    the start) is doubled; a dot after a bare <LF> is left alone."""
    lines = message.split(b"\r\n")
    return b"\r\n".join(b"." + ln if ln.startswith(b".") else ln for ln in lines)


def splits_of(wire: bytes, seed: int, n: int = 200):
    rng = random.Random(seed)
    for _ in range(n):
        k = rng.randint(1, 6)
        yield sorted(rng.sample(range(1, len(wire)), min(k, len(wire) - 1)))
    yield list(range(1, len(wire)))     # one byte at a time


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
    for strict in (False, True):
        assert read_all(wire, strict=strict) == (message, b"QUIT\r\n")
    for splits in splits_of(wire, len(message)):
        reader = DataReader()
        assert read_all(wire, splits, reader=reader) == (message, b"QUIT\r\n")
        assert reader.bare == set()


def test_empty_message():
    assert read_all(b".\r\nNOOP\r\n") == (b"", b"NOOP\r\n")


# The published SMTP smuggling variants (SEC Consult, 2023) and friends:
# none of them may end DATA.  Kept as content (the default) or refused
# (strict), never taken as the end of the message.
SMUGGLING = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r.\r\n", b"\r\n.\n", b"\n.\r"]
SMUGGLED = b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\nSubject: smuggled\r\n\r\n"


@pytest.mark.parametrize("variant", SMUGGLING, ids=repr)
def test_smuggling_variants_are_content_not_an_end(variant):
    """The whole wire up to the one real <CR><LF>.<CR><LF> is one message,
    byte for byte (no dot after a bare line end is unstuffed), flagged."""
    body = b"Subject: first\r\n\r\nhello" + variant + SMUGGLED
    wire = body + b".\r\nQUIT\r\n"
    expected = body.replace(b"\r\n.", b"\r\n")     # a line that starts with a dot after <CR><LF>
    reader = DataReader()
    assert read_all(wire, reader=reader) == (expected, b"QUIT\r\n")
    assert reader.bare
    for splits in splits_of(wire, len(variant), 50):
        reader = DataReader()
        assert read_all(wire, splits, reader=reader) == (expected, b"QUIT\r\n")
        assert reader.bare


@pytest.mark.parametrize("variant", SMUGGLING, ids=repr)
def test_smuggling_variants_are_refused_in_strict_mode(variant):
    wire = b"Subject: first\r\n\r\nhello" + variant + SMUGGLED + b".\r\n"
    with pytest.raises(BareLineEnding):
        read_all(wire, strict=True)
    with pytest.raises(BareLineEnding):
        read_all(wire, list(range(1, len(wire))), strict=True)


def test_nul_is_data_not_an_end():
    msg, rest = read_all(b"a\r\n\x00.\r\n.\r\n")
    assert msg == b"a\r\n\x00.\r\n" and rest == b""


@pytest.mark.parametrize("body,what", [(b"line\nnext\r\n.\r\n", "LF"), (b"line\rnext\r\n.\r\n", "CR"),
                                       (b"trailing\n", "LF")])
def test_bare_line_endings_are_named_in_strict_mode(body, what):
    with pytest.raises(BareLineEnding) as e:
        read_all(body, strict=True)
    assert e.value.what == what


@pytest.mark.parametrize("content,bare", [
    (b"unix\nline\nends\n", {"LF"}),
    (b"old mac\rline ends\r", {"CR"}),
    (b"mixed\r\r\n\n\r\n", {"CR", "LF"}),
    (b"\n.\n..\n.x\r\n", {"LF"}),                # dots after a bare LF stay as they are
    (b"\r\r\r\n", {"CR"}),
    (b"x" * 9000 + b"\n" + b"y" * 9000 + b"\r", {"LF", "CR"}),   # long lines with bare ends
])
def test_bare_line_endings_are_kept_byte_for_byte(content, bare):
    """Today's Exchange and Unix MTAs do send these: the archive keeps the
    bytes (only dot stuffing after <CR><LF> is undone) and says so."""
    wire = stuff(content) + b"\r\n.\r\nNOOP\r\n"
    expected = content + b"\r\n"
    reader = DataReader()
    assert read_all(wire, reader=reader) == (expected, b"NOOP\r\n") and reader.bare == bare
    for splits in splits_of(wire, len(content), 50):
        reader = DataReader()
        assert read_all(wire, splits, reader=reader) == (expected, b"NOOP\r\n") and reader.bare == bare


def test_only_crlf_dot_crlf_ends_data():
    for not_an_end in (b"a\n.\nb", b"a\n.\r\nb", b"a\r.\r\nb", b"a\r\n.\nb", b"a\r\n.\rb"):
        content, rest = read_all(not_an_end + b"\r\n.\r\n")
        assert content == not_an_end.replace(b"\r\n.", b"\r\n") + b"\r\n" and rest == b""
    assert read_all(b"a\r\n.\r\n") == (b"a\r\n", b"")


def test_cr_at_chunk_end_waits_for_its_lf():
    r = DataReader()
    assert r.feed(b"abc\r") == (b"", b"", False)
    assert r.feed(b"\ndef\r\n.\r\n") == (b"abc\r\ndef\r\n", b"", True)
    assert r.bare == set()


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


@pytest.mark.parametrize("text,expected", [
    ("<a@b> ſIZE=5", ("a@b", {"ſIZE": "5"})),         # "ſ".upper() == "S": not a keyword
    ("<a@b> \udcff=1", ("a@b", {"\udcff": "1"})),       # an 8-bit byte (surrogateescape)
    ("<a@b> size=7", ("a@b", {"SIZE": "7"})),
])
def test_only_ascii_keywords_are_upper_cased(text, expected):
    assert _address(text) == expected


@pytest.mark.parametrize("params,reply", [
    ({"SIZE": "²"}, (501, "Bad SIZE parameter")),           # str.isdigit() is True, int() raises
    ({"SIZE": "١٢٣"}, (501, "Bad SIZE parameter")),          # int() would take these as 123
    ({"SIZE": "１２"}, (501, "Bad SIZE parameter")),          # fullwidth digits
    ({"SIZE": "-1"}, (501, "Bad SIZE parameter")),
    ({"SIZE": "+1"}, (501, "Bad SIZE parameter")),
    ({"SIZE": "1_000"}, (501, "Bad SIZE parameter")),        # int() takes underscores
    ({"SIZE": " 1"}, (501, "Bad SIZE parameter")),
    ({"SIZE": ""}, (501, "Bad SIZE parameter")),
    ({"SIZE": None}, (501, "Bad SIZE parameter")),
    ({"BODY": "8bitmıme"}, (501, "Bad BODY parameter")),     # "ı".upper() == "I"
    ({"BODY": "BINARYMIME"}, (501, "Bad BODY parameter")),
    ({"SMTPUTF8": "yes"}, (501, "Bad SMTPUTF8 parameter (it takes no value)")),
    ({"ſIZE": "5"}, (501, "Syntax error in parameters")),
    ({"\udcff": "1"}, (501, "Syntax error in parameters")),
    ({"FOO": "bar"}, (555, "Unsupported option: FOO")),
])
def test_mail_parameters_refuse_what_is_not_ascii_syntax(params, reply):
    size, refusal = mail_parameters(params, esmtp=True)
    assert size == 0 and (refusal.code, refusal.enhanced[0], refusal.text) == (reply[0], str(reply[0])[0], reply[1])
    refusal.line()          # the reply itself can always be sent


def test_mail_parameters_accepts_the_ordinary():
    assert mail_parameters({"SIZE": "12345", "BODY": "8bitmime", "SMTPUTF8": None}, esmtp=True) == (12345, None)
    assert mail_parameters({}, esmtp=False) == (0, None)
    size, refusal = mail_parameters({"SIZE": "9" * 4000}, esmtp=True)   # over int()'s digit limit
    assert refusal is None and size > 1 << 63                           # just "too large" later
    assert mail_parameters({"SIZE": "1"}, esmtp=False)[1].code == 555   # HELO: no parameters


# The relay's limits in the configuration: sensible defaults, nonsense refused.

def _relay_cfg(tmp_path, relay: str = "", control: str = ""):
    from tests.test_config import BASE, load_text
    extra = ("[relay]\n" + relay if relay else "") + (
        "[control_server]\nlisten = 'tcp:1'\ncert_file = 'c'\nkey_file = 'k'\nclient_ca_file = 'a'\n"
        "keystore = 's'\naudit_log = 'l'\n" + control if control else "")
    return load_text(tmp_path, BASE + extra)[0]


def test_relay_limit_defaults(tmp_path):
    r = _relay_cfg(tmp_path).relay
    assert (r.max_connections_per_client, r.handshake_timeout, r.session_timeout, r.min_data_rate,
            r.data_rate_window, r.bare_newline) == (20, 10.0, 3600.0, 256, 30.0, "keep")
    cs = _relay_cfg(tmp_path, control="max_connections = 300\n").control_server
    assert (cs.max_connections, cs.max_connections_per_client, cs.handshake_timeout, cs.idle_timeout) == \
        (300, 16, 10.0, 30.0)


@pytest.mark.parametrize("relay,control,key,message", [
    ("bare_newline = 'normalize'\n", "", "relay.bare_newline", "is not one of"),
    ("handshake_timeout = 0\n", "", "relay.handshake_timeout", "at least 1 second"),
    ("data_rate_window = 0.5\n", "", "relay.data_rate_window", "at least 1 second"),
    ("session_timeout = 30\n", "", "relay.session_timeout", "at least 60 s"),
    ("timeout = 600\nsession_timeout = 300\n", "", "relay.session_timeout", "at least relay.timeout"),
    ("min_data_rate = 10000000\n", "", "relay.min_data_rate", "at most 1048576"),
    ("max_connections = 0\n", "", "relay.max_connections", "at least 1"),
    ("max_connections_per_client = -1\n", "", "relay.max_connections_per_client", "must not be negative"),
    ("", "max_connections = 1\n", "control_server.max_connections", "at least 2"),
    ("", "max_connections_per_client = 0\n", "control_server.max_connections_per_client", "at least 1"),
    ("", "idle_timeout = 0\n", "control_server.idle_timeout", "at least 1 second"),
])
def test_relay_limits_are_checked(tmp_path, relay, control, key, message):
    from mailtresor.config import ConfigError
    with pytest.raises(ConfigError) as e:
        _relay_cfg(tmp_path, relay, control)
    assert f": {key}: " in str(e.value) and message in str(e.value), str(e.value)


def test_session_deadline_zero_means_none(tmp_path):
    assert _relay_cfg(tmp_path, "session_timeout = 0\nmin_data_rate = 0\n").relay.session_timeout == 0
