"""What may be deleted: the one place that applies the precedence.

Precedence, as in the field (and as the issue states it): a legal hold
beats everything; then the longest minimum wins (any minimum whose period
has not ended keeps the message); only then does the shortest maximum
decide (the first maximum to end deletes it).  Retention runs (retention.py)
and four-eyes deletion requests (requests.py) both ask protections() before
they delete anything; nothing else decides.

Everything is evaluated against the shard indexes *when asked*, never
stamped on a message at archive time: a changed rule, or a hold placed
today, applies to all mail, including mail that arrives after the hold.

A rule (lifecycle.db "rules", made by retention.py):

    {"id", "name", "basis": "date" | "arrival",
     "match": {"senders": [...], "recipients": [...], "tags": [...],
               "flags": [...], "query": "..."},       # each optional
     "minimum": "10y" | None, "maximum": "7y" | None, ...}

An empty match is all of the tenant's mail.  Within one list any entry
matches (OR); across lists all must (AND).  A sender or recipient is an
address or a domain (the index's address terms match both).

A hold (lifecycle.db "holds", keyed by name, made by holds.py):

    {"name", "query": "..." | "", "ids": [archive ids], "reason", "by", "at",
     "lifted": None | {"by", "at", "reason"}}

A hold covers a message if it is not lifted and the message's id is in
"ids" or the message matches "query" (a hold with neither covers nothing).
"""

from __future__ import annotations

import calendar
import re
import time
from dataclasses import dataclass
from pathlib import Path

import xapian

from mailtresor.archive import index

_PERIOD = re.compile(r"\A([1-9][0-9]{0,3})([ymd])\Z")
MAX_DAYS = 200 * 366


class PolicyError(ValueError):
    """A rule, hold or period that cannot be used; the message names the problem."""


def parse_period(text) -> str:
    """A period as written in a rule: "10y", "6m" or "90d" (a number of
    calendar years, months or days, at most 200 years).  Returns it
    normalised; raises PolicyError naming the problem."""
    if not isinstance(text, str):
        raise PolicyError("a period is a string such as \"10y\", \"6m\" or \"90d\"")
    t = text.strip().lower()
    m = _PERIOD.match(t)
    if not m:
        raise PolicyError(f"{text!r} is not a period: write a number and y, m or d (\"10y\", \"6m\", \"90d\")")
    n, unit = int(m.group(1)), m.group(2)
    if n * {"y": 366, "m": 31, "d": 1}[unit] > MAX_DAYS:
        raise PolicyError(f"{text!r} is longer than 200 years")
    return f"{n}{unit}"


def _shift(when: float, period: str, sign: int) -> float:
    """`when` moved by the period (calendar arithmetic in UTC; the 31st of
    a shorter month becomes its last day)."""
    n, unit = int(period[:-1]), period[-1]
    if unit == "d":
        return when + sign * n * 86400
    t = time.gmtime(when)
    months = t.tm_year * 12 + (t.tm_mon - 1) + sign * (n * 12 if unit == "y" else n)
    year, month = divmod(months, 12)
    day = min(t.tm_mday, calendar.monthrange(year, month + 1)[1])
    return calendar.timegm((year, month + 1, day, t.tm_hour, t.tm_min, t.tm_sec, 0, 0, 0)) + (when % 1)


def cutoff(period: str, now: float) -> float:
    """The basis time before which the period has ended at `now`: a message
    whose basis time is < cutoff(p, now) is older than p."""
    return _shift(now, parse_period(period), -1)


def ends(period: str, basis_time: float) -> float:
    """When the period counted from `basis_time` ends."""
    return _shift(basis_time, parse_period(period), +1)


def _quote(value: str) -> str:
    v = str(value).strip()
    if not v or any(c in v for c in '"\\') or any(c.isspace() for c in v):
        raise PolicyError(f"{value!r} cannot be matched: an address, domain, tag or flag has no spaces or quotes")
    return v


def rule_query(match: dict | None) -> str:
    """The search query a rule's match stands for ("" = all mail)."""
    match = match or {}
    parts = []
    senders = [_quote(v) for v in match.get("senders") or []]
    if senders:
        parts.append("(" + " OR ".join(f"from:{v}" for v in senders) + ")")
    recipients = [_quote(v) for v in match.get("recipients") or []]
    if recipients:
        parts.append("(" + " OR ".join(f"to:{v} OR cc:{v} OR bcc:{v}" for v in recipients) + ")")
    tags = [_quote(v) for v in match.get("tags") or []]
    if tags:
        parts.append("(" + " OR ".join(f"tag:{v}" for v in tags) + ")")
    flags = [_quote(v) for v in match.get("flags") or []]
    if flags:
        parts.append("(" + " OR ".join(f"flag:{v}" for v in flags) + ")")
    q = (match.get("query") or "").strip()
    if q:
        parts.append(f"({q})")
    return " AND ".join(parts)


@dataclass(frozen=True)
class Doc:
    """One matching message: its id, date and arrival (the arrival is its
    date in an index older than format 3)."""
    aid: str
    date: float
    arrival: float

    def basis(self, basis: str) -> float:
        return self.arrival if basis == "arrival" else self.date


def _query(text: str) -> xapian.Query:
    if not text.strip():
        return xapian.Query.MatchAll
    return index.parse_query(text)          # QueryError names the problem


def _restricted(q: xapian.Query, aids) -> xapian.Query:
    if aids is None:
        return q
    terms = [t for t in (index._term(index.PREFIXES["aid"], a) for a in sorted(aids)) if t]
    return xapian.Query(xapian.Query.OP_FILTER, q, xapian.Query(xapian.Query.OP_OR, terms))


def matching(paths: list[str | Path], query: str, *, aids=None) -> dict[str, Doc]:
    """Every message in these shard indexes that matches `query` (a search
    string, "" = all), restricted to `aids` if given: id -> Doc.  Raises
    index.QueryError for a query that cannot run."""
    if aids is not None and not aids:
        return {}
    q = _restricted(_query(query), aids)
    out: dict[str, Doc] = {}
    for path in paths:
        if not (Path(path) / "iamglass").exists():
            continue
        for attempt in range(3):
            db = xapian.Database(str(path))
            try:
                enq = xapian.Enquire(db)
                enq.set_query(q)
                enq.set_weighting_scheme(xapian.BoolWeight())
                found = {}
                for m in enq.get_mset(0, db.get_doccount() or 1):
                    doc = m.document
                    aid, _ = index.split_data(doc.get_data())
                    date = xapian.sortable_unserialise(doc.get_value(index.SLOT_DATE))
                    raw_arrival = doc.get_value(index.SLOT_ARRIVAL)
                    arrival = xapian.sortable_unserialise(raw_arrival) if raw_arrival else date
                    found[aid] = Doc(aid, date, arrival)
                out.update(found)
                break
            except xapian.DatabaseModifiedError:
                if attempt == 2:
                    raise
            finally:
                db.close()
    return out


def _active(holds: dict) -> list[dict]:
    return [h for h in holds.values() if not h.get("lifted")]


def held(paths: list[str | Path], holds: dict, aids=None) -> dict[str, list[str]]:
    """id -> the names of the active holds that cover it (only ids that
    some hold covers; restricted to `aids` if given)."""
    out: dict[str, list[str]] = {}
    for h in sorted(_active(holds), key=lambda h: h["name"]):
        covered = set(h.get("ids") or [])
        if aids is not None:
            covered &= set(aids)
        if (h.get("query") or "").strip():
            covered |= set(matching(paths, h["query"], aids=aids))
        for aid in covered:
            out.setdefault(aid, []).append(h["name"])
    return out


def under_minimum(paths: list[str | Path], rules: dict, now: float, aids=None) -> dict[str, tuple[dict, float]]:
    """id -> (the rule, when its minimum ends) for messages a minimum still
    keeps at `now`: of several, the one that ends last (the longest wins)."""
    out: dict[str, tuple[dict, float]] = {}
    for r in sorted(rules.values(), key=lambda r: r["id"]):
        if not r.get("minimum"):
            continue
        for aid, d in matching(paths, rule_query(r.get("match")), aids=aids).items():
            until = ends(r["minimum"], d.basis(r.get("basis", "date")))
            if until > now and (aid not in out or until > out[aid][1]):
                out[aid] = (r, until)
    return out


def expired(paths: list[str | Path], rules: dict, now: float, aids=None) -> dict[str, tuple[dict, float]]:
    """id -> (the rule, when its maximum ended) for messages some maximum
    has expired at `now`: of several, the shortest (the one that ended
    first).  Holds and minimums are not applied here: see protections()."""
    out: dict[str, tuple[dict, float]] = {}
    for r in sorted(rules.values(), key=lambda r: r["id"]):
        if not r.get("maximum"):
            continue
        for aid, d in matching(paths, rule_query(r.get("match")), aids=aids).items():
            ended = ends(r["maximum"], d.basis(r.get("basis", "date")))
            if ended <= now and (aid not in out or ended < out[aid][1]):
                out[aid] = (r, ended)
    return out


def protections(paths: list[str | Path], section: dict, now: float, aids) -> dict[str, list[dict]]:
    """For each of `aids` that must not be deleted at `now`, why: a list of
    {"kind": "hold", "hold": name} and/or {"kind": "minimum", "rule": id,
    "name": rule name, "until": unix time}.  Ids not in the answer may be
    deleted as far as holds and minimums go.  `section` is the tenant's
    lifecycle.db section."""
    aids = set(aids)
    out: dict[str, list[dict]] = {}
    for aid, names in held(paths, section.get("holds") or {}, aids).items():
        out.setdefault(aid, []).extend({"kind": "hold", "hold": n} for n in names)
    for aid, (r, until) in under_minimum(paths, section.get("rules") or {}, now, aids).items():
        out.setdefault(aid, []).append({"kind": "minimum", "rule": r["id"], "name": r.get("name", ""),
                                        "until": until})
    return out
