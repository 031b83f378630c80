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
    ({"tag": "case:x", "header": "X"}, "classify[0].tag", "auditors' case tags"),
    ({"tag": "case", "header": "X", "value_tag": True}, "classify[0].tag", "auditors' case tags"),
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


# --- a real daemon -------------------------------------------------------------

RULES = [
    # The customer's Exchange mail-flow rule "set the message header".
    EXCHANGE,
    {"tag": "class", "header": "X-Acme-Classification", "value_tag": True},
    # Purview sensitivity label, believed only from acme's own paths.
    {"tag": "purview-confidential", "header": "msip_labels", "label": "Confidential", "trusted_only": True},
    {"tag": "hr", "sender_domain": ["hr.acme.example"]},
    {"tag": "legal", "recipient_group": "legal"},
]
PW = {n: f"{n}-password-1" for n in ("amy", "aud", "gaud")}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from mailtresor.access.auth import open_databases
    from mailtresor.keys.client import control_fetcher
    from tests.harness.stack import Stack
    from tests.harness.web import api_login
    stack = Stack(tmp_path_factory.mktemp("classify"), {
        "archive": {"enabled": True},
        "tenant": [{"name": "acme", "domains": ["acme.example"], "classify": RULES,
                    "groups": {"legal": ["counsel@acme.example"]}},
                   {"name": "globex", "domains": ["globex.example"]}]}, milter=False)
    stack.start_control()
    users, _ = open_databases(stack.cfg, control_fetcher(stack.cfg))
    users.add("acme", "amy", PW["amy"], {"user"}, ["amy@acme.example"])
    users.add("acme", "aud", PW["aud"], {"auditor"}, [])
    users.add("globex", "gaud", PW["gaud"], {"auditor"}, [])
    stack.start_daemon()
    yield type("World", (), {"stack": stack, "login": lambda t, n: api_login(stack, t, n, PW[n])})
    stack.close()


def _search(stack, query, tenant="acme"):
    from tests.test_archive import search
    return sorted(h["subject"] for h in search(stack, tenant, query))


def _journal(original: bytes, recipients) -> bytes:
    from tests.harness.journalgen import make_report
    return make_report(original, sender="bob@globex.example", recipients=recipients)


def test_archived_mail_is_classified_and_found_by_tag(world):
    from tests.test_archive import wait_archived
    stack = world.stack
    labelled = message("msip_labels: " + MSIP, subject="Purview labelled")
    with stack.smtp() as s:                              # the "local" connector: any sender could use it
        s.sendmail("bob@globex.example", ["amy@acme.example"],
                   message("X-Acme-Classification:\r\n =?utf-8?q?Confidential?=", subject="Exchange header"))
        s.sendmail("bob@globex.example", ["amy@acme.example"], message(subject="Unclassified"))
        s.sendmail("pat@hr.acme.example", ["amy@acme.example"], message(frm="pat@hr.acme.example",
                                                                         subject="Salary review"))
        s.sendmail("bob@globex.example", ["amy@acme.example"], labelled.replace(b"Purview", b"Outside"))
        # The very message the journal report below carries, first by the
        # open path: not believed here; the journaled copy adds the tag.
        s.sendmail("bob@globex.example", ["amy@acme.example"], labelled)
    # acme's journaling connector: the label is on the journaled original;
    # the legal group's member is a Bcc recipient only the report names.
    report = _journal(labelled, [("to", "amy@acme.example", None), ("bcc", "counsel@acme.example", None)])
    with stack.smtp(implicit=True, cert="client-exchange-acme") as s:
        s.sendmail("", ["journal@archive.test"], report)
    wait_archived(stack)
    assert _search(stack, "tag:confidential") == ["Exchange header"]
    assert _search(stack, "tag:class:confidential") == ["Exchange header"]
    assert _search(stack, "tag:hr") == ["Salary review"]
    # The label of the journaled original, believed (trusted path); the
    # same header from the open relay connector is not.
    assert _search(stack, "tag:purview-confidential") == ["Purview labelled"]
    assert _search(stack, "tag:legal") == ["Purview labelled"]
    assert _search(stack, "tag:journal") == ["Purview labelled"]
    # The tag facet counts them; the message view says which tags are whose.
    aud = world.login("acme", "aud")
    doc = aud.request("GET", "/api/v1/search?q=&facets=1").json()
    assert doc["facets"]["tag"]["confidential"] == 1 and doc["facets"]["tag"]["legal"] == 1
    (hit,) = aud.request("GET", "/api/v1/search?q=tag:legal").json()["results"]
    m = aud.request("GET", f"/api/v1/messages/{hit['id']}").json()
    assert m["classification_tags"] == ["legal", "purview-confidential"] and m["case_tags"] == []
    assert sorted(e["source"] for e in m["envelopes"]) == ["relay", "relay"]      # one record, two arrivals
    assert {"journal", "relay", "legal", "purview-confidential"} <= set(m["tags"])


def _raw(stack, aid):
    from tests.test_archive import cli
    return cli(stack, "show", "--tenant", "acme", aid, check=0).stdout


def test_case_tags_change_metadata_only_and_only_for_auditors(world):
    from tests.test_archive import cli, search
    stack = world.stack
    aud = world.login("acme", "aud")
    (hit,) = aud.request("GET", "/api/v1/search?q=subject:unclassified").json()["results"]
    aid = hit["id"]
    before = _raw(stack, aid)
    path = f"/api/v1/messages/{aid}/tags"
    # A user of the tenant: 403 (audited); another tenant's auditor: 404.
    amy, gaud = world.login("acme", "amy"), world.login("globex", "gaud")
    r = amy.request("POST", path, {"add": ["case:acme-v-smith"]})
    assert r.status == 403 and "auditor" in r.json()["error"]
    assert gaud.request("POST", path, {"add": ["case:acme-v-smith"]}).status == 404
    for other in ("0" * 40, "z" * 40, "abc123def"):         # none stored; not hex; not an archive id
        r = aud.request("POST", f"/api/v1/messages/{other}/tags", {"add": ["case:x"]})
        assert r.status == 404 and r.json()["error"] == "no such message", r.data
    for bad, why in (({"add": ["no spaces"]}, "not a tag name"), ({}, "nothing to change"),
                     ({"add": ["review"]}, "a case tag begins with 'case:'"),
                     ({"remove": ["confidential"]}, "a case tag begins with 'case:'"),
                     ({"add": "case:x"}, "list of strings"), ({"add": ["x" * 65]}, "not a tag name")):
        r = aud.request("POST", path, bad)
        assert r.status == 400 and why in r.json()["error"], r.data
    r = aud.request("POST", path, {"add": ["case:acme-v-smith", "case:review"]})
    assert r.status == 200, r.data
    assert r.json()["case_tags"] == ["case:acme-v-smith", "case:review"] and r.json()["changed"]
    assert aud.request("POST", path, {"add": ["case:review"]}).json()["changed"] is False
    # From the shell, through the daemon.
    p = cli(stack, "tag", "remove", "--tenant", "acme", aid, "case:review", check=0)
    assert b"case tags: case:acme-v-smith" in p.stdout
    p = cli(stack, "tag", "add", "--tenant", "acme", aid, "bad tag", check=2)
    assert b"not a tag name" in p.stderr and b"Traceback" not in p.stderr
    p = cli(stack, "tag", "add", "--tenant", "globex", aid, "case:x", check=1)
    assert b"no message" in p.stderr
    # A classification tag is not the auditor's to remove (see above).
    (conf,) = search(stack, "acme", "tag:confidential")
    r = aud.request("POST", f"/api/v1/messages/{conf['id']}/tags", {"add": ["case:other"]})
    assert r.status == 200 and r.json()["classification_tags"] == ["class:confidential", "confidential"]
    # Found at once, the stored message unchanged, the view tells them apart.
    assert [h["id"] for h in search(stack, "acme", "tag:case:acme-v-smith")] == [aid]
    assert search(stack, "acme", "tag:case:review") == []
    assert _raw(stack, aid) == before
    m = aud.request("GET", f"/api/v1/messages/{aid}").json()
    assert m["case_tags"] == ["case:acme-v-smith"] and m["classification_tags"] == []
    assert "case:acme-v-smith" in m["tags"]
    # amy's own mail: she sees neither the case tag nor, by searching,
    # that her mail is under a case.
    mine = amy.request("GET", f"/api/v1/messages/{aid}").json()
    assert mine["case_tags"] == [] and "case:acme-v-smith" not in mine["tags"]
    doc = amy.request("GET", "/api/v1/search?q=&facets=1").json()
    assert aid in [h["id"] for h in doc["results"]]
    assert not [t for h in doc["results"] for t in h["tags"] if t.startswith("case:")]
    assert not [t for t in doc["facets"]["tag"] if t.startswith("case:")]
    for q in ("tag:case:acme-v-smith", "tag:c*", "tag:case*", "subject:x OR tag:ca*"):
        r = amy.request("GET", "/api/v1/search?q=" + q.replace(" ", "+"))
        assert r.status == 400 and "case tags" in r.json()["error"], (q, r.data)
    assert amy.request("GET", "/api/v1/search?q=tag:relay").status == 200
    # Audited: who, what, the tag names only encrypted.
    recs = aud.request("GET", "/api/v1/audit?action=tag").json()["records"]
    assert {(x["result"], x["object"]) for x in recs} >= {("ok", aid), ("denied", aid)}
    assert "acme-v-smith" not in json.dumps([x.get("detail") for x in recs])


def test_verify_and_reindex_keep_both_kinds_of_tags(world):
    from tests.test_archive import cli, search
    stack = world.stack
    p = cli(stack, "verify", "--tenant", "acme")
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-2000:])
    stack.stop_daemon()
    # The backup log has the case tags' chain entries: a restore has them.
    from mailtresor.archive.store import Store
    from tests.test_archive import keys_of
    restored = stack.dir / "restored"
    cli(stack, "restore", "--tenant", "acme", "--to", str(restored), check=0)
    live, back, keys = Store(stack.cfg.archive.directory, readonly=True), Store(restored, readonly=True), keys_of(stack)
    (aid,) = [h["id"] for h in search(stack, "acme", "tag:case:acme-v-smith")]
    month = live.locate("acme", aid)
    assert back.shard("acme", month).get_meta(aid, keys)["case_tags"] == ["case:acme-v-smith"]
    for m in live.months("acme"):
        a, b = live.shard("acme", m).dump(), back.shard("acme", m).dump()
        assert a["records"] == b["records"] and a["meta"] == b["meta"] and a["chain"] == b["chain"]
    live.close()
    back.close()
    cli(stack, "reindex", "--tenant", "acme", check=0)
    assert len(search(stack, "acme", "tag:case:acme-v-smith")) == 1
    assert len(search(stack, "acme", "tag:confidential")) == 1
    assert len(search(stack, "acme", "tag:purview-confidential")) == 1
    p = cli(stack, "verify", "--tenant", "acme")
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-2000:])


def test_classify_dry_run_previews_a_changed_rule_and_changes_nothing(world):
    from tests.test_archive import cli, search
    stack = world.stack
    before = {h["id"]: h["tags"] for h in search(stack, "acme", "")}
    p = cli(stack, "classify", "--tenant", "acme", "--dry-run", check=0)
    assert p.stdout == b"" and b"0 would be tagged differently" in p.stderr, p.stderr
    assert cli(stack, "classify", "--tenant", "acme", check=2).returncode == 2      # only a dry run
    # A rule added later: the preview lists what it would tag; nothing is re-tagged.
    rules = [*RULES, {"tag": "salary", "header": "Subject", "contains": "salary"}]
    stack.reconfigure({"tenant": [{"name": "acme", "domains": ["acme.example"], "classify": rules,
                                   "groups": {"legal": ["counsel@acme.example"]}},
                                  {"name": "globex", "domains": ["globex.example"]}]})
    p = cli(stack, "classify", "--tenant", "acme", "--dry-run", "--json", check=0)
    (line,) = [json.loads(x) for x in p.stdout.splitlines()]
    assert line["now"] == ["hr", "salary"] and line["stored"] == ["hr"]
    assert {h["id"]: h["tags"] for h in search(stack, "acme", "")} == before
    assert search(stack, "acme", "tag:salary") == []


def test_index_set_tags_replaces_only_the_tags(tmp_path):
    """IndexWriter.set_tags: the document's tag terms and slot are the new
    ones; its text, addresses and values stay (no re-parsing)."""
    from mailtresor.archive import index
    raw = message("X-Acme-Classification: Confidential", subject="Quarterly figures")
    ix = index.ShardIndex(tmp_path / "x")
    with ix.writer() as w:
        w.add("a" * 40, parse_message(raw), envelope=["amy@acme.example"], envelope_only=[],
              tags=["relay", "confidential"], date=1709287200.0, size=len(raw))
    with ix.writer() as w:
        assert w.set_tags("a" * 40, ["relay", "confidential", "case:acme-v-smith"])
        assert not w.set_tags("b" * 40, ["x"])
    for q in ("tag:case:acme-v-smith", "tag:confidential", "subject:quarterly", "from:bob@globex.example",
              "envelope:amy@acme.example", "date:2024-03-01"):
        total, hits = index.search([tmp_path / "x"], q)
        assert total == 1 and hits[0].tags == ("case:acme-v-smith", "confidential", "relay"), q
    with ix.writer() as w:
        w.set_tags("a" * 40, ["relay", "confidential"])
    assert index.search([tmp_path / "x"], "tag:case:acme-v-smith")[0] == 0
    assert index.facets([tmp_path / "x"], "")["tag"] == {"confidential": 1, "relay": 1}


def test_tags_drive_retention_end_to_end(world):
    """A classification tag (set at archive time from the Exchange header)
    and an auditor's case tag each drive a retention rule: the run deletes
    exactly the tagged mail, the rest stays, verify passes.  (Runs last in
    this module: it deletes messages the tests above read.)"""
    from tests.test_archive import cli
    stack = world.stack
    stack.start_daemon()                      # stopped by the reindex test above
    aud = world.login("acme", "aud")
    before = set(_search(stack, ""))
    assert {"Exchange header", "Unclassified"} <= before
    (hit,) = aud.request("GET", "/api/v1/search?q=subject:unclassified").json()["results"]
    assert aud.request("POST", f"/api/v1/messages/{hit['id']}/tags", {"add": ["case:purge-me"]}).status == 200
    gone = set()
    for match, subject in (({"tags": ["confidential"]}, "Exchange header"),
                           ({"tags": ["case:purge-me"]}, "Unclassified")):
        # All this module's mail is dated 2024-03-01: a year's maximum has ended.
        r = aud.request("POST", "/api/v1/retention/rules", {"name": f"by {match['tags'][0]}", "match": match,
                                                            "maximum": "1y"})
        assert r.status == 201, r.data
        dry = aud.request("POST", "/api/v1/retention/run", {"dry_run": True}).json()
        r = aud.request("POST", "/api/v1/retention/run", {"dry_run": False})
        assert r.status == 200, r.data
        assert r.json()["deleted"] == 1 == dry["go"], (r.json(), dry)
        gone.add(subject)
        assert set(_search(stack, "")) == before - gone
        p = cli(stack, "verify", "--tenant", "acme", check=0)
        assert p.returncode == 0 and b"tombstone" in p.stdout + p.stderr, (p.stdout[-2000:], p.stderr[-2000:])
