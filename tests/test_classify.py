"""Classification rules (archive/classify.py) and case tags
(archive/casetags.py, access/tags.py, cli/tags.py).

Pure rule tests first (folded and encoded headers, msip_labels, regex
bounds, bad configuration), then a real daemon (tests/harness/stack.py):
the Exchange mail-flow header and a journal report's original tag mail as
it is archived, `tag:` finds it; auditors' case tags through the API and
the CLI change the metadata through the chain only -- `verify` passes, the
stored message is byte-identical, `reindex` keeps both kinds of tags --
and only an auditor of the message's tenant may set them."""

from __future__ import annotations

import json
import time

import pytest

from mailtresor import config as configmod
from mailtresor.archive import classify
from mailtresor.archive.classify import RuleError, compile_rules
from mailtresor.archive.parse import parse_message

GUID = "3f2a1b4c-5d6e-4f70-8a9b-0c1d2e3f4a5b"
GUID2 = "9e8d7c6b-5a49-4382-b1a0-f9e8d7c6b5a4"
# What Microsoft Purview puts on a labelled message (Outlook / Exchange Online).
MSIP = (f"MSIP_Label_{GUID}_Enabled=true; MSIP_Label_{GUID}_SetDate=2024-03-01T09:58:12Z;\r\n"
        f" MSIP_Label_{GUID}_Method=Privileged; MSIP_Label_{GUID}_Name=Confidential;\r\n"
        f" MSIP_Label_{GUID}_SiteId=72f988bf-86f1-41af-91ab-2d7cd011db47;\r\n"
        f" MSIP_Label_{GUID}_ActionId=1c2d3e4f-0000-1111-2222-333344445555; MSIP_Label_{GUID}_ContentBits=0")


def message(*headers: str, frm="bob@globex.example", to="amy@acme.example", subject="Hello") -> bytes:
    head = "".join(h + "\r\n" for h in headers)
    return (f"From: <{frm}>\r\nTo: <{to}>\r\nSubject: {subject}\r\nDate: Fri, 01 Mar 2024 10:00:00 +0000\r\n"
            f"Message-ID: <{abs(hash((subject, headers)))}@t>\r\n{head}\r\nbody\r\n").encode()


def tags(rules, raw, envelope=None, tenant="acme", groups=None):
    compiled = compile_rules(rules, groups or {})
    env = {"source": "relay", "mail_from": "", "rcpt_to": [], **(envelope or {})}
    return classify.classify(compiled, raw, parse_message(raw), env, tenant)


EXCHANGE = {"tag": "confidential", "header": "X-Acme-Classification", "equals": "Confidential"}


# --- pure ----------------------------------------------------------------------

def test_exchange_header_as_the_mail_flow_rule_sets_it():
    assert tags([EXCHANGE], message("X-Acme-Classification: Confidential")) == ["confidential"]
    # Header names and values without regard to case; surrounding blanks ignored.
    assert tags([EXCHANGE], message("x-acme-CLASSIFICATION:   confidential  ")) == ["confidential"]
    assert tags([EXCHANGE], message("X-Acme-Classification: Public")) == []
    assert tags([EXCHANGE], message()) == []
    # Only the header block: the same line in the body is not a header.
    assert tags([EXCHANGE], message() + b"X-Acme-Classification: Confidential\r\n") == []


def test_folded_encoded_and_repeated_headers():
    folded = message("X-Acme-Classification:\r\n  Confidential")
    encoded = message("X-Acme-Classification: =?utf-8?q?Confidential?=")
    latin = message("X-Acme-Classification: =?iso-8859-1?q?Vertraulich_f=FCr_HR?=")
    repeated = message("X-Acme-Classification: Public", "X-Acme-Classification: Confidential")
    assert tags([EXCHANGE], folded) == ["confidential"]
    assert tags([EXCHANGE], encoded) == ["confidential"]
    assert tags([EXCHANGE], repeated) == ["confidential"]             # every occurrence counts
    rule = {"tag": "hr", "header": "X-Acme-Classification", "contains": "für hr"}
    assert tags([rule], latin) == ["hr"]
    lf = message("X-Acme-Classification:\r\n\tConfidential").replace(b"\r\n", b"\n")
    assert tags([EXCHANGE], lf) == ["confidential"]


def test_value_tags_are_normalised_and_bounded():
    rule = {"tag": "class", "header": "X-Acme-Classification", "value_tag": True}
    assert tags([rule], message("X-Acme-Classification: Confidential")) == ["class:confidential"]
    assert tags([rule], message("X-Acme-Classification: Strictly  Confidential / HR!")) == [
        "class:strictly-confidential-hr"]
    long = tags([rule], message("X-Acme-Classification: " + "x" * 500))
    assert long == ["class:" + "x" * 58] and all(classify.valid_tag(t) for t in long)
    assert tags([rule], message("X-Acme-Classification: ***")) == []           # nothing left
    many = message(*[f"X-Acme-Classification: v{i}" for i in range(40)])
    assert len(tags([rule], many)) == classify.MAX_VALUE_TAGS


def test_msip_labels_by_name_guid_and_value_tag():
    raw = message("msip_labels: " + MSIP)
    assert tags([{"tag": "purview-confidential", "header": "msip_labels", "label": "Confidential"}], raw) == [
        "purview-confidential"]
    assert tags([{"tag": "p", "header": "MSIP_Labels", "label": GUID.upper()}], raw) == ["p"]
    assert tags([{"tag": "p", "header": "msip_labels", "label": "Public"}], raw) == []
    assert tags([{"tag": "label", "header": "msip_labels", "value_tag": True}], raw) == ["label:confidential"]
    # A label that is not enabled is not a label of the message.
    off = message("msip_labels: " + MSIP.replace("_Enabled=true", "_Enabled=false"))
    assert tags([{"tag": "p", "header": "msip_labels", "label": "Confidential"}], off) == []
    # A parent label and its sub-label ("Confidential \\ HR").
    two = message(f"msip_labels: MSIP_Label_{GUID}_Enabled=true; MSIP_Label_{GUID}_Name=Confidential; "
                  f"MSIP_Label_{GUID2}_Enabled=True; MSIP_Label_{GUID2}_Name=HR Only")
    assert tags([{"tag": "label", "header": "msip_labels", "value_tag": True}], two) == [
        "label:confidential", "label:hr-only"]
    assert classify.msip_labels("garbage; =; MSIP_Label_x_Name=y") == []


def test_regex_rules_and_their_bounds():
    rule = {"tag": "secret", "header": "Subject", "matches": r"^\[(secret|confidential)\]"}
    assert tags([rule], message(subject="[SECRET] plans")) == ["secret"]
    assert tags([rule], message(subject="re: [secret] plans")) == []
    for bad, why in ((r"(a+)+$", "repetition inside a repetition"), (r"(x*)*y", "repetition inside"),
                     (r"(a)\1", "back references"), ("[", "not a regular expression"),
                     ("a" * 201, "longer than 200")):
        with pytest.raises(RuleError, match=why):
            compile_rules([{"tag": "t", "header": "Subject", "matches": bad}])
    # What a rule reads of a value is bounded.
    huge = message("X-Acme-Classification: " + "a" * 100_000)
    got = classify.headers_of(huge, {"x-acme-classification"})["x-acme-classification"]
    assert len(got[0]) == classify.MAX_VALUE


def test_sender_domain_recipient_and_groups():
    hr = {"tag": "hr", "sender_domain": ["hr.acme.example"]}
    assert tags([hr], message(frm="pat@HR.acme.example")) == ["hr"]
    assert tags([hr], message(), {"mail_from": "pat@hr.acme.example"}) == ["hr"]       # envelope sender
    assert tags([hr], message(frm="pat@acme.example")) == []                            # no subdomain magic
    legal = {"tag": "legal", "recipient_group": "legal"}
    groups = {"legal": ["counsel@acme.example", "Paralegal@acme.example"]}
    assert tags([legal], message(to="paralegal@acme.example"), groups=groups) == ["legal"]
    assert tags([legal], message(), {"rcpt_to": ["counsel@acme.example"]}, groups=groups) == ["legal"]
    # A trusted journal report's Bcc recipient (the envelope's journal facts).
    j = {"journal": {"sender": "bob@globex.example",
                     "recipients": [{"address": "counsel@acme.example", "kind": "bcc"}]}}
    assert tags([legal], message(), j, groups=groups) == ["legal"]
    assert tags([legal], message(), groups=groups) == []
    dom = {"tag": "board", "recipient": ["board.acme.example", "ceo@acme.example"]}
    assert tags([dom], message(to="x@board.acme.example")) == ["board"]
    assert tags([dom], message(to="CEO@acme.example")) == ["board"]


def test_trusted_only_rules_ignore_headers_from_untrusted_paths():
    rule = {**EXCHANGE, "trusted_only": True}
    raw = message("X-Acme-Classification: Confidential")
    assert tags([rule], raw, {"source": "relay", "connector": "local", "tenant": ""}) == []
    assert tags([rule], raw, {"source": "import"}) == []
    assert tags([rule], raw, {"source": "relay", "connector": "exchange-acme", "tenant": "acme"}) == ["confidential"]
    assert tags([rule], raw, {"source": "relay", "tenant": "globex"}) == []         # another tenant's connector
    assert tags([rule], raw, {"source": "milter"}) == ["confidential"]
    assert tags([rule], raw, {"source": "relay", "tenant": "acme", "journal_untrusted": "x"}) == []


@pytest.mark.parametrize("rule,where,why", [
    ({"tag": "bad tag", "header": "X"}, "classify[0].tag", "not a tag name"),
    ({"tag": "x" * 65, "header": "X"}, "classify[0].tag", "not a tag name"),
    ({"tag": "t"}, "classify[0]", "exactly one condition"),
    ({"tag": "t", "header": "X", "sender_domain": ["a.example"]}, "classify[0]", "found header, sender_domain"),
    ({"tag": "t", "header": "X", "equals": "a", "contains": "b"}, "classify[0].contains", "give one of"),
    ({"tag": "t", "header": "X", "label": "Confidential"}, "classify[0].label", "msip_labels"),
    ({"tag": "t", "header": "X", "equals": " "}, "classify[0].equals", "must not be empty"),
    ({"tag": "t", "header": "Bad Name", "equals": "a"}, "classify[0].header", "not a header name"),
    ({"tag": "t", "sender_domain": ["a@b.example"]}, "classify[0].sender_domain[0]", "not a domain"),
    ({"tag": "t", "sender_domain": ["a.example"], "equals": "x"}, "classify[0].equals", "only with a header"),
    ({"tag": "t", "recipient": ["a.example"], "value_tag": True}, "classify[0].value_tag", "only with a header"),
    ({"tag": "t", "recipient_group": "nope"}, "classify[0].recipient_group", "no group 'nope'"),
    ({"tag": "t", "recipient_group": "g"}, "groups.g[0]", "not an address"),
])
def test_bad_rules_are_named(rule, where, why):
    with pytest.raises(RuleError) as e:
        compile_rules([rule], {"g": ["not-an-address"]})
    assert e.value.key == where and why in e.value.msg


def test_configuration_checks_rules_at_load(tmp_path):
    doc = {"appliance": {"name": "t"}, "control": {"url": "https://c.test", "ca_file": "a", "cert_file": "b",
                                                  "key_file": "c"},
           "spool": {"directory": str(tmp_path)},
           "tenant": [{"name": "acme", "domains": ["acme.example"],
                       "classify": [EXCHANGE, {"tag": "hr", "header": "X-A", "matches": "(a+)+"}]}]}
    with pytest.raises(configmod.ConfigError) as e:
        configmod.parse(doc, tmp_path / "m.toml")
    assert "tenant[0].classify[1].matches" in str(e.value) and "(tenant 'acme')" in str(e.value)
    doc["tenant"][0]["classify"][1] = {"tag": "legal", "recipient_group": "legal"}
    doc["tenant"][0]["groups"] = {"legal": ["counsel@acme.example"]}
    cfg = configmod.parse(doc, tmp_path / "m.toml")
    assert cfg.tenant[0].classify[0].equals == "Confidential" and cfg.tenant[0].groups["legal"] == (
        "counsel@acme.example",)
    doc["tenant"][0]["classify"][0] = {"tag": "x", "header": "X", "equls": "typo"}
    with pytest.raises(configmod.ConfigError, match=r"tenant\[0\].classify\[0\].equls: unknown key"):
        configmod.parse(doc, tmp_path / "m.toml")
