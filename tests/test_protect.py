"""lifecycle/protect.py: periods, rule queries and the precedence (hold >
longest minimum > shortest maximum), against real Xapian shard indexes."""

from __future__ import annotations

import calendar

import pytest

from mailtresor.archive.index import ShardIndex
from mailtresor.archive.parse import Parsed
from mailtresor.lifecycle import protect


def utc(*a) -> float:
    return float(calendar.timegm((*a, 0, 0, 0, 0, 0, 0)[:9]))


def msg(**kw) -> Parsed:
    base = dict(message_id="<m@example.com>", date=None, from_header="", from_=[], to=[], cc=[],
                bcc=[], subject="", body_text="", attachments=[], flags=[], size=1000)
    base.update(kw)
    return Parsed(**base)


NOW = utc(2026, 12, 3)


@pytest.fixture
def shard(tmp_path):
    path = tmp_path / "2015-01" / "xapian"
    with ShardIndex(path).writer() as w:
        # old: sent 2015, old-late: sent 2015 but arrived (journal import) 2024
        w.add("old", msg(from_=["hr@acme.example"], to=["bob@acme.example"]), envelope=[], envelope_only=[],
              tags=["hr"], date=utc(2015, 1, 10), size=10)
        w.add("oldlate", msg(from_=["x@other.example"]), envelope=[], envelope_only=[], tags=[],
              date=utc(2015, 1, 11), size=10, arrival=utc(2024, 6, 1))
        w.add("new", msg(from_=["hr@acme.example"], to=["carol@acme.example"]), envelope=[],
              envelope_only=[], tags=["hr"], date=utc(2026, 1, 5), size=10)
    return [str(path)]


def test_periods_are_calendar_periods_and_bad_ones_are_named():
    assert protect.cutoff("1y", utc(2024, 2, 29)) == utc(2023, 2, 28)
    assert protect.cutoff("1m", utc(2026, 3, 31)) == utc(2026, 2, 28)
    assert protect.cutoff("90d", NOW) == NOW - 90 * 86400
    assert protect.ends("10y", utc(2015, 1, 10)) == utc(2025, 1, 10)
    for bad in ("10", "y", "0y", "-1y", "10w", "1 0y", "99999d", 7):
        with pytest.raises(protect.PolicyError):
            protect.parse_period(bad)


def test_rule_query_ands_the_fields_and_ors_their_values():
    q = protect.rule_query({"senders": ["hr@acme.example", "acme.example"], "tags": ["hr"], "query": "payroll"})
    assert q == "(from:hr@acme.example OR from:acme.example) AND (tag:hr) AND (payroll)"
    assert protect.rule_query({}) == ""
    with pytest.raises(protect.PolicyError):
        protect.rule_query({"senders": ['a" OR "b']})


def test_precedence_hold_then_longest_minimum_then_shortest_maximum(shard):
    rules = {
        "r7": {"id": "r7", "name": "everything 7y", "basis": "date", "match": {}, "maximum": "7y"},
        "r3": {"id": "r3", "name": "hr 3y", "basis": "date", "match": {"tags": ["hr"]}, "maximum": "3y"},
        "m": {"id": "m", "name": "hr kept 20y", "basis": "date", "match": {"senders": ["hr@acme.example"]},
              "minimum": "20y"},
        "arr": {"id": "arr", "name": "by arrival 10y", "basis": "arrival", "match": {"senders": ["other.example"]},
                "minimum": "10y"},
    }
    gone = protect.expired(shard, rules, NOW)
    # The shortest maximum names the deletion: hr mail's 3y rule, the rest's 7y.
    assert {a: r["id"] for a, (r, _) in gone.items()} == {"old": "r3", "oldlate": "r7"}
    # The longest minimum keeps old (20y from 2015) and oldlate (10y from its 2024 arrival).
    section = {"rules": rules, "holds": {}}
    why = protect.protections(shard, section, NOW, gone)
    assert [p["rule"] for p in why["old"]] == ["m"] and why["old"][0]["until"] == utc(2035, 1, 10)
    assert [p["rule"] for p in why["oldlate"]] == ["arr"]
    # Without the minimums both would go; a hold by query or by id stops it.
    section = {"rules": {k: rules[k] for k in ("r7", "r3")},
               "holds": {"case-1": {"name": "case-1", "query": "from:hr@acme.example", "ids": []},
                         "case-2": {"name": "case-2", "query": "", "ids": ["oldlate"], "lifted": None},
                         "gone": {"name": "gone", "query": "", "ids": ["old"], "lifted": {"by": "a"}}}}
    why = protect.protections(shard, section, NOW, gone)
    assert why == {"old": [{"kind": "hold", "hold": "case-1"}], "oldlate": [{"kind": "hold", "hold": "case-2"}]}
    section["holds"] = {}
    assert protect.protections(shard, section, NOW, gone) == {}


def test_a_hold_by_query_covers_mail_that_arrives_after_it(shard, tmp_path):
    holds = {"h": {"name": "h", "query": "from:later@acme.example", "ids": []}}
    assert protect.held(shard, holds) == {}
    with ShardIndex(shard[0]).writer() as w:
        w.add("later", msg(from_=["later@acme.example"]), envelope=[], envelope_only=[], tags=[],
              date=utc(2015, 1, 20), size=10)
    assert protect.held(shard, holds) == {"later": ["h"]}
