"""Retention: the tenants' rules, what they would delete now, and the run.

A rule (lifecycle.db "rules", shape in protect.py's docstring) says how
long mail that matches it is kept: a minimum (no deletion before it ends)
and/or a maximum (deleted once it has ended), counted from the message's
Date: ("date") or from when it first arrived ("arrival").  Nothing is
stamped on a message at archive time: plan() evaluates every rule against
the shard indexes when it is asked, so a rule added or changed today
applies to all mail, old and new.

    validate(doc)        a rule's fields as a caller sends them, checked
                         and normalised (RuleError names the problem)
    add/change/remove    lifecycle.db, with who and when
    plan(paths, section, now)
                         what the maxima have expired (protect.expired),
                         minus what protect.protections() keeps, and why
    run(ctx, tenant, who, dry_run=...)
                         the plan, then deletion in bounded batches through
                         the archiver (protections checked again right
                         before each batch: a hold placed during the run
                         wins), one audit record per run

The precedence (hold > longest minimum > shortest maximum) is protect.py's
and only protect.py's: this module asks, it never decides.
"""

from __future__ import annotations

import logging
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from mailtresor.archive import index
from mailtresor.lifecycle import protect, state

log = logging.getLogger("mailtresor.lifecycle.retention")

BASES = ("date", "arrival")
MATCH_LISTS = ("senders", "recipients", "tags", "flags")
MAX_NAME = 120              # characters of a rule's name
MAX_LIST = 100              # entries in one match list
MAX_ENTRY = 254             # characters of one address, domain, tag or flag
MAX_QUERY = 1000            # characters of a rule's search query
MAX_RULES = 200             # rules of one tenant
BATCH = 1000                # messages deleted per archiver call (ingest waits no longer than that)
PREVIEW_ITEMS = 200         # items listed in a preview / run answer (the counts cover all)
JOB = "retention job"       # who the daily run is, in tombstones and the audit trail


class RuleError(ValueError):
    """A rule that cannot be used (400); the message names the problem."""


class RuleMissing(LookupError):
    """No such rule in this tenant (404: another tenant's rule too)."""


class RunBusy(RuntimeError):
    """A run of this tenant is under way in this process (the daily job or
    another caller): one at a time, so two never delete the same batch."""


_RUNNING: set[tuple[int, str]] = set()      # (id of the LifecycleDB, tenant) being run


# --- the rule -------------------------------------------------------------------------------

def _text(value, what: str, limit: int, *, empty_ok: bool = False) -> str:
    if not isinstance(value, str):
        raise RuleError(f"{what} must be a string")
    v = value.strip()
    if not v and not empty_ok:
        raise RuleError(f"{what} must not be empty")
    if len(v) > limit:
        raise RuleError(f"{what} is longer than {limit} characters")
    if any(unicodedata.category(c) in ("Cc", "Cf") for c in v):
        raise RuleError(f"{what} must not contain control characters")
    return v


def _period(value, what: str) -> str | None:
    if value is None or value == "":
        return None
    try:
        return protect.parse_period(value)
    except protect.PolicyError as e:
        raise RuleError(f"{what}: {e}") from None


def _days(period: str) -> float:
    """How long a period is, counted from a fixed day (to compare two)."""
    base = 946684800.0                  # 2000-01-01
    return protect.ends(period, base) - base


def validate(doc) -> dict:
    """A rule's fields (name, basis, match, minimum, maximum) from what a
    caller sent, checked and normalised; RuleError naming the problem.
    Unknown fields are refused (a typo must not silently widen a rule)."""
    if not isinstance(doc, dict):
        raise RuleError("a rule is a JSON object")
    unknown = sorted(set(doc) - {"name", "basis", "match", "minimum", "maximum"})
    if unknown:
        raise RuleError(f"unknown field {unknown[0]!r} in the rule")
    name = _text(doc.get("name"), "the rule's name", MAX_NAME)
    basis = doc.get("basis", "date") or "date"
    if basis not in BASES:
        raise RuleError(f"basis must be one of {', '.join(BASES)}")
    raw = doc.get("match") or {}
    if not isinstance(raw, dict):
        raise RuleError("match must be an object of senders, recipients, tags, flags, query")
    unknown = sorted(set(raw) - set(MATCH_LISTS) - {"query"})
    if unknown:
        raise RuleError(f"unknown field {unknown[0]!r} in match (senders, recipients, tags, flags, query)")
    match: dict = {}
    for key in MATCH_LISTS:
        values = raw.get(key) or []
        if not isinstance(values, list):
            raise RuleError(f"match.{key} must be a list")
        if len(values) > MAX_LIST:
            raise RuleError(f"match.{key} has more than {MAX_LIST} entries")
        out = []
        for v in values:
            v = _text(v, f"an entry of match.{key}", MAX_ENTRY).lower() if key in ("senders", "recipients") \
                else _text(v, f"an entry of match.{key}", MAX_ENTRY)
            if v not in out:
                out.append(v)
        if out:
            match[key] = out
    query = _text(raw.get("query") or "", "match.query", MAX_QUERY, empty_ok=True)
    if query:
        match["query"] = query
    try:
        text = protect.rule_query(match)
        if text:
            index.parse_query(text)
    except protect.PolicyError as e:
        raise RuleError(str(e)) from None
    except index.QueryError as e:
        raise RuleError(f"the rule's query cannot be used: {e}") from None
    minimum = _period(doc.get("minimum"), "minimum")
    maximum = _period(doc.get("maximum"), "maximum")
    if minimum is None and maximum is None:
        raise RuleError("a rule needs a minimum, a maximum or both (e.g. \"10y\", \"6m\", \"90d\")")
    if minimum and maximum and _days(minimum) > _days(maximum):
        raise RuleError(f"the minimum ({minimum}) is longer than the maximum ({maximum}): "
                        "mail could never be deleted when the maximum says it must")
    return {"name": name, "basis": basis, "match": match, "minimum": minimum, "maximum": maximum}


def query_of(rule: dict) -> str:
    """The search query a rule's match stands for (for the audit's
    encrypted terms: addresses and queries are never in clear there)."""
    return protect.rule_query(rule.get("match"))


def public(rule: dict) -> dict:
    """A rule as the API shows it."""
    return {k: rule.get(k) for k in ("id", "name", "basis", "match", "minimum", "maximum", "created_by",
                                     "created_at", "changed_by", "changed_at")}


def rules_of(section: dict) -> list[dict]:
    return sorted((public(r) for r in (section.get("rules") or {}).values()),
                  key=lambda r: (r["name"].lower(), r["id"]))


def add_rule(db, tenant: str, fields: dict, by: str, now: float) -> dict:
    """Save a new rule (fields from validate()); the stored rule."""
    def fn(sec):
        if len(sec["rules"]) >= MAX_RULES:
            raise RuleError(f"a tenant has at most {MAX_RULES} retention rules")
        rid = state.new_id()
        while rid in sec["rules"]:
            rid = state.new_id()
        rule = {"id": rid, **fields, "created_by": by, "created_at": now, "changed_by": by, "changed_at": now}
        sec["rules"][rid] = rule
        return dict(rule)
    return db.change(tenant, fn)


def change_rule(db, tenant: str, rid: str, fields: dict, by: str, now: float) -> tuple[dict, dict]:
    """Replace a rule's fields; (the old rule, the new one).  RuleMissing."""
    def fn(sec):
        old = sec["rules"].get(rid)
        if old is None:
            raise RuleMissing(rid)
        new = {**old, **fields, "id": rid, "changed_by": by, "changed_at": now}
        sec["rules"][rid] = new
        return dict(old), dict(new)
    return db.change(tenant, fn)


def remove_rule(db, tenant: str, rid: str) -> dict:
    """Remove a rule; the rule as it was.  RuleMissing."""
    def fn(sec):
        old = sec["rules"].pop(rid, None)
        if old is None:
            raise RuleMissing(rid)
        return old
    return db.change(tenant, fn)


def get_rule(section: dict, rid: str) -> dict:
    rule = (section.get("rules") or {}).get(rid)
    if rule is None:
        raise RuleMissing(rid)
    return rule


# --- the plan -------------------------------------------------------------------------------

@dataclass
class Item:
    """One message a maximum has expired: deleted (go) or kept, and why."""
    aid: str
    month: str
    rule: dict                          # {"id", "name"}: the maximum that expired it
    ended: float                        # when that maximum ended
    why: list = field(default_factory=list)     # kept: protect.protections()'s reasons

    def doc(self) -> dict:
        d = {"id": self.aid, "month": self.month, "rule": self.rule, "ended": int(self.ended)}
        if self.why:
            d["why"] = [{**w, "until": int(w["until"])} if "until" in w else dict(w) for w in self.why]
        return d


@dataclass
class Plan:
    """What a run would do at `now`: `go` the messages to delete, `kept`
    those a maximum has expired but a hold or a minimum keeps."""
    now: float
    go: list[Item] = field(default_factory=list)
    kept: list[Item] = field(default_factory=list)

    def summary(self) -> dict:
        """Counts per rule (the maximum that expired the message) and kept
        counts by reason (per hold name; per minimum rule)."""
        rules: dict[str, dict] = {}
        for kind, items in (("go", self.go), ("kept", self.kept)):
            for it in items:
                r = rules.setdefault(it.rule["id"], {"id": it.rule["id"], "name": it.rule["name"], "go": 0,
                                                     "kept": 0})
                r[kind] += 1
        holds: dict[str, int] = {}
        minimums: dict[str, dict] = {}
        for it in self.kept:
            # A message is counted once per reason kind: the holds that
            # cover it, and the one minimum that ends last.
            for w in it.why:
                if w["kind"] == "hold":
                    holds[w["hold"]] = holds.get(w["hold"], 0) + 1
                else:
                    m = minimums.setdefault(w["rule"], {"id": w["rule"], "name": w.get("name", ""), "kept": 0})
                    m["kept"] += 1
        return {"go": len(self.go), "kept": len(self.kept),
                "rules": sorted(rules.values(), key=lambda r: (r["name"].lower(), r["id"])),
                "kept_by": {"holds": [{"hold": k, "kept": v} for k, v in sorted(holds.items())],
                            "minimums": sorted(minimums.values(), key=lambda m: (m["name"].lower(), m["id"]))}}

    def doc(self, limit: int = PREVIEW_ITEMS) -> dict:
        """The plan as an answer: the summary and at most `limit` items of
        each list (oldest month first)."""
        return {**self.summary(), "at": int(self.now),
                "items": {"go": [i.doc() for i in self.go[:limit]], "kept": [i.doc() for i in self.kept[:limit]]},
                "truncated": len(self.go) > limit or len(self.kept) > limit}


def month_of(path) -> str:
    """The shard (YYYY-MM) of a shard index path (<store>/<tenant>/<month>/xapian)."""
    return Path(path).parent.name


def plan(paths: list, section: dict, now: float) -> Plan:
    """What the tenant's rules would delete at `now`: every message some
    maximum has expired (protect.expired: the shortest maximum), minus
    those protect.protections() keeps (a hold; the longest minimum), with
    the reasons.  Reads the shard indexes only (no lock needed)."""
    rules = section.get("rules") or {}
    expired: dict[str, Item] = {}
    for path in paths:
        month = month_of(path)
        for aid, (rule, ended) in protect.expired([path], rules, now).items():
            expired[aid] = Item(aid, month, {"id": rule["id"], "name": rule.get("name", "")}, ended)
    out = Plan(now)
    if not expired:
        return out
    why = protect.protections(paths, section, now, set(expired))
    for aid, it in sorted(expired.items(), key=lambda kv: (kv[1].month, kv[0])):
        if aid in why:
            it.why = why[aid]
            out.kept.append(it)
        else:
            out.go.append(it)
    return out


def with_candidate(section: dict, fields: dict, rid: str | None = None) -> tuple[dict, dict]:
    """(a copy of the section with the candidate rule in it, the candidate):
    replacing rule `rid` (a change) or as a new rule (id "(new)")."""
    sec = {**section, "rules": dict(section.get("rules") or {})}
    cand = {**(sec["rules"].get(rid) or {}), **fields, "id": rid or "(new)"}
    sec["rules"][cand["id"]] = cand
    return sec, cand


def preview(paths: list, section: dict, fields: dict, now: float, rid: str | None = None,
            limit: int = PREVIEW_ITEMS) -> dict:
    """What the dry run would do at `now` if the candidate rule were saved
    (as a new rule, or in place of `rid`): the whole plan (all of the
    tenant's rules, as the run would see them) and this rule's own counts."""
    sec, cand = with_candidate(section, fields, rid)
    p = plan(paths, sec, now)
    doc = p.doc(limit)
    mine = next((r for r in doc["rules"] if r["id"] == cand["id"]), {"id": cand["id"], "name": cand["name"],
                                                                         "go": 0, "kept": 0})
    keeps = next((m["kept"] for m in doc["kept_by"]["minimums"] if m["id"] == cand["id"]), 0)
    return {**doc, "rule": {**mine, "keeps": keeps}}


# --- the run --------------------------------------------------------------------------------

@dataclass
class Context:
    """What a run needs of the daemon (access.api.Api has all of it; see of()).

    lifecycle  lifecycle.state.LifecycleDB
    paths      tenant -> the tenant's shard index paths
    blocking   (fn, *a) -> Deferred: fn in a worker thread (the API's pool)
    exclusive  (fn, *a) -> Deferred: fn(pipeline, *a) on the archiver's thread
    audit      access.audit.AuditLog or None
    stopping   () -> True when the daemon stops: the run ends after its batch
    """
    lifecycle: object
    paths: object
    blocking: object
    exclusive: object
    audit: object = None
    stopping: object = staticmethod(lambda: False)

    @classmethod
    def of(cls, api) -> "Context":
        def paths(tenant):
            store = api.archiver.store if api.archiver is not None else api.core.store
            return store.index_paths(tenant, store.months(tenant, check=False))
        return cls(lifecycle=api.lifecycle, paths=paths, blocking=api.run,
                   exclusive=api.archiver.exclusive if api.archiver is not None else None, audit=api.audit)


def who_name(who) -> str:
    """The tombstone's and report's "by": the principal's name, or the job."""
    if who is None or isinstance(who, str):
        return who or JOB
    from mailtresor.access.audit import principal_name
    return principal_name(who)


def _recheck(ctx: Context, tenant: str, paths, chunk: list[Item], now: float) -> tuple[list[Item], list[Item]]:
    """(still to delete, now kept) of a batch, against lifecycle.db as it is
    now: a hold placed (or a minimum added) during the run wins, and a rule
    removed during the run deletes nothing more."""
    sec = ctx.lifecycle.section(tenant)
    rules = sec.get("rules") or {}
    why = protect.protections(paths, sec, now, {it.aid for it in chunk})
    go, kept = [], []
    for it in chunk:
        if it.aid in why:
            it.why = why[it.aid]
            kept.append(it)
        elif it.rule["id"] not in rules:
            it.why = [{"kind": "removed", "rule": it.rule["id"], "name": it.rule["name"]}]
            kept.append(it)
        else:
            go.append(it)
    return go, kept


async def run(ctx: Context, tenant: str, who, *, dry_run: bool, now: float | None = None, batch: int = BATCH,
              client: str = "", limit: int = PREVIEW_ITEMS) -> dict:
    """Run the tenant's retention at `now`: the plan, then (unless a dry
    run) deletion in batches of `batch` through the archiver, each batch
    checked against the protections once more right before.  One audit
    record (action "retention") with the counts.  Returns the report:
    the plan's document, with "deleted" and "missing" for a real run.
    RunBusy while another run of the tenant is under way."""
    key = (id(ctx.lifecycle), tenant)
    if key in _RUNNING:
        raise RunBusy(tenant)
    _RUNNING.add(key)
    try:
        return await _run(ctx, tenant, who, dry_run=dry_run, now=now, batch=batch, client=client, limit=limit)
    finally:
        _RUNNING.discard(key)


async def _run(ctx: Context, tenant: str, who, *, dry_run: bool, now, batch: int, client: str, limit: int) -> dict:
    from mailtresor.archive import deleter

    now = time.time() if now is None else now
    by = who_name(who)
    section = await ctx.blocking(ctx.lifecycle.section, tenant)
    paths = await ctx.blocking(ctx.paths, tenant)
    p = await ctx.blocking(plan, paths, section, now)
    deleted: list[Item] = []
    missing = 0
    failed = None
    if not dry_run and p.go:
        todo, p.go = p.go, []
        try:
            for start in range(0, len(todo), batch):
                if ctx.stopping():
                    log.info("retention %s: the daemon stops; the rest waits for the next run", tenant)
                    break
                chunk = todo[start:start + batch]
                go, kept = await ctx.blocking(_recheck, ctx, tenant, paths, chunk, now)
                p.kept += kept
                if not go:
                    continue
                victims = [deleter.Victim(it.aid, it.month, {"kind": "retention", "rule": it.rule["id"], "by": by,
                                                             "reason": it.rule["name"], "at": now})
                           for it in go]
                res = await ctx.exclusive(deleter.delete_messages, tenant, victims)
                gone = {aid for aid, _ in res.deleted}
                missing += len(res.missing)
                deleted += [it for it in go if it.aid in gone]
        except Exception as e:  # noqa: BLE001 - audited as failed, then raised
            failed = f"{type(e).__name__}: {e}"
            raise
        finally:
            p.go = deleted
            p.kept.sort(key=lambda it: (it.month, it.aid))
            report = _report(p, tenant, dry_run, by, missing, limit)
            await ctx.blocking(_audit, ctx, tenant, who, client, report, failed)
        return report
    report = _report(p, tenant, dry_run, by, missing, limit)
    await ctx.blocking(_audit, ctx, tenant, who, client, report, None)
    return report


def _report(p: Plan, tenant: str, dry_run: bool, by: str, missing: int, limit: int) -> dict:
    doc = p.doc(limit)
    return {"tenant": tenant, "dry_run": dry_run, "by": by, **doc,
            **({} if dry_run else {"deleted": len(p.go), "missing": missing})}


def audit_detail(report: dict, failed: str | None = None) -> dict:
    """The run's audit detail: counts only (no ids, no addresses, no
    queries): per rule, and kept per reason."""
    detail = {"dry_run": report["dry_run"], "go": report["go"], "kept": report["kept"],
              "rules": {r["id"]: {"name": r["name"][:MAX_NAME], "go": r["go"], "kept": r["kept"]}
                        for r in report["rules"][:MAX_RULES]},
              "kept_by": {"holds": {h["hold"][:MAX_NAME]: h["kept"] for h in report["kept_by"]["holds"][:100]},
                          "minimums": {m["id"]: m["kept"] for m in report["kept_by"]["minimums"][:MAX_RULES]}}}
    if not report["dry_run"]:
        detail["deleted"], detail["missing"] = report["deleted"], report["missing"]
    if failed:
        detail["error"] = failed[:300]
    return detail


def _audit(ctx: Context, tenant: str, who, client: str, report: dict, failed: str | None) -> None:
    if ctx.audit is None:
        return
    ctx.audit.append(principal=who if who is not None else JOB, tenant=tenant, action="retention",
                     object="dry-run" if report["dry_run"] else "run", result="failed" if failed else "ok",
                     client=client or getattr(who, "client", "") or "daemon",
                     detail=audit_detail(report, failed))
