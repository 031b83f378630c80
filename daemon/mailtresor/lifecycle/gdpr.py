"""GDPR: subject access and portability (Art. 15, 20), records of processing (Art. 30).

Subject access: everything concerning one address in one tenant -- every
message where the address is in From, To, Cc, Bcc or the envelope (MAIL
FROM, RCPT TO, a journal report's recipients: the index's address terms,
index.address_filter) -- exported through the access core's export job (a
zip of the messages as stored, byte for byte, with manifest.json, or an
mbox), plus a report of the processing that applies to them: the
controller, what is kept (count, date range), purposes and legal basis,
the retention rules that match them and when they are due
(lifecycle/protect.py), the holds that cover them, and who read or
downloaded them (the audit trail).

The address is ONE LITERAL ADDRESS: it never goes through the query
parser, so "*", "OR", quotes or field:value in it are characters of an
address (which no message has), not search syntax (see check_address).

Records of processing: generated per tenant from the configuration
(config.Tenant's controller, contact, purposes, legal_basis, transfers;
[archive], [relay], [api], [audit]) and lifecycle.db (the retention rules
as text), never written by hand, so they cannot drift from what runs.

Everything here is pure or blocking (index, audit trail): the API runs it
in its thread pool (access/gdpr.py), which also writes the audit records.
"""

from __future__ import annotations

import html
import json
import time
from collections import deque

from mailtresor.archive import index
from mailtresor.lifecycle import protect

MAX_ADDRESS = 320                   # characters of an address (RFC 5321: 64 + @ + 255)
ACCESS_KEPT = 500                   # accesses a report lists (the newest); the count covers all
ACCESS_SCAN_PAGES = 2000            # pages of the trail read for accesses (1000 records each) at most
ACTIONS_ACCESSED = frozenset({"read", "download"})

DEFAULT_PURPOSES = ("archiving of business correspondence to meet statutory retention duties",
                    "evidence in legal disputes, audits and investigations")
DEFAULT_LEGAL_BASIS = ("GDPR Art. 6(1)(c) (legal obligation: retention duties such as HGB §257, AO §147) "
                       "and Art. 6(1)(f) (legitimate interest: evidence)")


class GdprError(ValueError):
    """A request that cannot be run; the message names the problem."""


def _iso(t) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(t)))


def check_address(text) -> str:
    """The one literal address a subject access is about, lower-cased
    (addresses are indexed lower-case).  A local part, one "@", a domain;
    no spaces, no control characters, no "<>", at most MAX_ADDRESS
    characters.  Characters that mean something in a search ("*", quotes,
    parentheses, ":") are kept as they are: the address is never parsed
    as a query (subject_hits).  GdprError naming the problem.  Pure."""
    if not isinstance(text, str) or not text.strip():
        raise GdprError("give the data subject's mail address")
    a = text.strip()
    if len(a) > MAX_ADDRESS:
        raise GdprError(f"an address has at most {MAX_ADDRESS} characters")
    if any(c.isspace() or not c.isprintable() for c in a) or any(c in a for c in "<>,;"):
        raise GdprError("give one mail address (local@domain), without a name, spaces or brackets")
    local, at, domain = a.rpartition("@")
    if not at or not local or not domain or "." not in domain.strip(".") or "@" in local:
        raise GdprError(f"{a[:80]!r} is not a mail address (local@domain)")
    return a.lower()


def subject_hits(core, tenant: str, address: str) -> list:
    """index.Hit of every message of `tenant` where `address` (checked:
    check_address) is in From/To/Cc/Bcc or an envelope, oldest first.
    The query is the index's exact address filter: no query syntax."""
    prepared = index.Prepared(f"address:{address}", index.address_filter([address]), None)
    with core._store_lock:
        paths = core.store.index_paths(tenant, core.store.months(tenant, check=False))
    total, _ = index.search(paths, prepared, limit=0, readers=core.readers)
    if total > core.export_max:
        raise GdprError(f"{total} messages concern this address, over the export limit of {core.export_max}; "
                        "ask the operator to raise [access] export limits")
    _, hits = index.search(paths, prepared, limit=total, order="date-asc", readers=core.readers)
    return hits


def tenant_config(cfg, tenant: str):
    """The [[tenant]] of that name (None without a configuration)."""
    for t in getattr(cfg, "tenant", ()) or ():
        if t.name == tenant:
            return t
    return None


def controller(cfg, tenant: str) -> dict:
    """The controller as configured, with the defaults filled in."""
    t = tenant_config(cfg, tenant)
    return {"tenant": tenant, "name": (t.controller if t is not None and t.controller else tenant),
            "contact": t.contact if t is not None else "",
            "purposes": list(t.purposes) if t is not None and t.purposes else list(DEFAULT_PURPOSES),
            "legal_basis": t.legal_basis if t is not None and t.legal_basis else DEFAULT_LEGAL_BASIS,
            "transfers": list(t.transfers) if t is not None else []}


def rule_text(rule: dict) -> str:
    """A retention rule in one line of plain words.  Pure."""
    m = rule.get("match") or {}
    what = []
    for key, label in (("senders", "from"), ("recipients", "to"), ("tags", "tagged"), ("flags", "flagged")):
        if m.get(key):
            what.append(f"{label} {' or '.join(str(v) for v in m[key])}")
    if (m.get("query") or "").strip():
        what.append("matching a search")
    basis = "arrival" if rule.get("basis") == "arrival" else "date"
    keep = []
    if rule.get("minimum"):
        keep.append(f"kept at least {rule['minimum']}")
    if rule.get("maximum"):
        keep.append(f"deleted after {rule['maximum']}")
    return (f"{rule.get('name') or rule.get('id')}: mail {', '.join(what) if what else '(all mail)'}: "
            f"{' and '.join(keep) or 'no period'}, counted from its {basis}")


def retention_for(paths, rules: dict, aids: set[str]) -> list[dict]:
    """Per rule, how many of `aids` it matches and when they are due: for
    a maximum the first and last deletion date, for a minimum the first
    and last date until which they are kept."""
    out = []
    for r in sorted(rules.values(), key=lambda r: (r.get("name") or "", r.get("id") or "")):
        row = {"rule": r.get("id"), "name": r.get("name") or "", "text": rule_text(r),
               "basis": r.get("basis", "date"), "minimum": r.get("minimum"), "maximum": r.get("maximum"),
               "matches": 0}
        try:
            docs = protect.matching(paths, protect.rule_query(r.get("match")), aids=aids) if aids else {}
        except (protect.PolicyError, index.QueryError) as e:
            row["error"] = str(e)[:200]
            out.append(row)
            continue
        row["matches"] = len(docs)
        for key, period in (("deleted", r.get("maximum")), ("kept_until", r.get("minimum"))):
            if period and docs:
                whens = sorted(protect.ends(period, d.basis(row["basis"])) for d in docs.values())
                row[key] = {"first": _iso(whens[0]), "last": _iso(whens[-1])}
        out.append(row)
    return out


def accesses(audit, tenant: str, aids: set[str], *, keep: int = ACCESS_KEPT,
             pages: int = ACCESS_SCAN_PAGES) -> dict:
    """Who read or downloaded one of `aids`: the trail's read/download
    records of the tenant whose object is one of them, the newest `keep`,
    newest first; {"records", "count", "complete"} (complete: the whole
    trail was read within `pages` pages)."""
    kept: deque = deque(maxlen=keep)
    count, since, complete = 0, 0, False
    for _ in range(pages):
        p = audit.page(tenant=tenant, since=since, limit=1000, actions=set(ACTIONS_ACCESSED))
        for r in p.records:
            if r.get("object") in aids:
                count += 1
                kept.append({k: r.get(k) for k in ("seq", "time", "principal", "action", "object", "result",
                                                   "client")})
        since = p.next
        if not p.more:
            complete = True
            break
    return {"records": list(kept)[::-1], "count": count, "complete": complete}


def report(*, cfg, tenant: str, address: str, hits: list, paths, section: dict, audit, now: float) -> dict:
    """The processing report of a subject access (report_text and
    report_html render it).  `hits` from subject_hits, `section` the
    tenant's lifecycle.db section ({} when it is not available)."""
    aids = {h.archive_id for h in hits}
    dates = sorted(h.date for h in hits if h.date is not None)
    holds = protect.held(paths, section.get("holds") or {}, aids) if aids else {}
    names = sorted({n for ns in holds.values() for n in ns})
    ctl = controller(cfg, tenant)
    return {
        "report": "GDPR Art. 15 subject access",
        "generated": _iso(now),
        "subject": address,
        "controller": {"tenant": tenant, "name": ctl["name"], "contact": ctl["contact"]},
        "purposes": ctl["purposes"],
        "legal_basis": ctl["legal_basis"],
        "transfers": ctl["transfers"],
        "messages": {"count": len(hits), "first": _iso(dates[0]) if dates else None,
                     "last": _iso(dates[-1]) if dates else None},
        "categories": ["message content and attachments, as received",
                       "metadata: addresses (From, To, Cc, Bcc, envelope), dates, subject, message id, size",
                       "records of access to the messages (audit trail)"],
        "retention": retention_for(paths, section.get("rules") or {}, aids),
        "holds": {"count": len(holds), "names": names},
        "accesses": accesses(audit, tenant, aids) if aids else {"records": [], "count": 0, "complete": True},
        "rights": ["rectification (Art. 16): an archive keeps messages as received; they are not changed",
                   "erasure (Art. 17): by a deletion request decided by a second auditor, refused while "
                   "a legal hold or a retention minimum applies",
                   "complaint to a supervisory authority (Art. 77)"],
        "ids": [h.archive_id for h in hits],
    }


def report_text(doc: dict) -> str:
    """The report as plain text (report.txt in the zip).  Pure."""
    c = doc["controller"]
    m = doc["messages"]
    lines = [f"{doc['report']}", f"Generated: {doc['generated']}", f"Data subject: {doc['subject']}", "",
             f"Controller: {c['name']} (tenant {c['tenant']})" + (f", contact: {c['contact']}" if c["contact"] else ""),
             "Purposes:"] + [f"  - {p}" for p in doc["purposes"]] + [
             f"Legal basis: {doc['legal_basis']}",
             "Transfers to third countries: " + ("; ".join(doc["transfers"]) if doc["transfers"] else "none"), "",
             f"Messages kept: {m['count']}" + (f", dated {m['first']} to {m['last']}" if m["count"] else ""),
             "Categories of data:"] + [f"  - {x}" for x in doc["categories"]] + ["", "Retention rules:"]
    if not doc["retention"]:
        lines.append("  none: the messages are kept until a rule or a decided request removes them")
    for r in doc["retention"]:
        lines.append(f"  - {r['text']}: matches {r['matches']} of them")
        if r.get("deleted"):
            lines.append(f"      due for deletion {r['deleted']['first']} to {r['deleted']['last']}")
        if r.get("kept_until"):
            lines.append(f"      kept at least until {r['kept_until']['first']} to {r['kept_until']['last']}")
    h = doc["holds"]
    lines += ["", f"Legal holds: {h['count']} message(s) under hold" + (f" ({', '.join(h['names'])})"
                                                                        if h["names"] else "")]
    a = doc["accesses"]
    lines += ["", f"Accesses (read, download): {a['count']}" + ("" if a["complete"] else " (trail read in part)")]
    lines += [f"  {r['time']} {r['principal']} {r['action']} {r['object']} {r['result']}" for r in a["records"]]
    lines += ["", "Your rights:"] + [f"  - {x}" for x in doc["rights"]]
    return "\n".join(lines) + "\n"


def report_html(doc: dict) -> str:
    """The report as a standalone HTML page (report.html in the zip):
    every value escaped, no script, no remote content.  Pure."""
    e = html.escape
    body = "".join(f"<p>{e(line)}</p>" if line.strip() else "" for line in report_text(doc).splitlines())
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
            f"<title>{e(doc['report'])}: {e(doc['subject'])}</title>"
            "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}p{margin:.2em 0;"
            "white-space:pre-wrap}</style></head><body>" + body + "</body></html>\n")


def report_files(doc: dict) -> dict[str, bytes]:
    """The files a subject access zip carries beside the messages."""
    return {"report.json": json.dumps(doc, indent=1, ensure_ascii=False).encode(),
            "report.txt": report_text(doc).encode(),
            "report.html": report_html(doc).encode()}


# --- Art. 30 -------------------------------------------------------------------------

def _host(url: str) -> str:
    from urllib.parse import urlsplit
    try:
        return urlsplit(url).hostname or ""
    except ValueError:
        return ""


def records(cfg, tenant: str, *, roles: dict[str, int] | None, section: dict | None, now: float) -> dict:
    """The records of processing activities (GDPR Art. 30(1)) for one
    tenant, generated from the configuration: `roles` the tenant's local
    users per role (None: not available), `section` its lifecycle.db
    section (None: not available).  Pure."""
    ctl = controller(cfg, tenant)
    t = tenant_config(cfg, tenant)
    a = getattr(cfg, "archive", None)
    relay = getattr(cfg, "relay", None)
    listeners = list(getattr(relay, "listener", ()) or ())
    connectors = list(getattr(relay, "connector", ()) or ())
    tls = getattr(cfg, "tls", None)
    tsa = bool(a is not None and a.tsa_url)
    backup = a is not None and a.backup_directory is not None
    rules = sorted((section or {}).get("rules", {}).values(), key=lambda r: r.get("name") or "")
    holds = [h for h in ((section or {}).get("holds") or {}).values() if not h.get("lifted")]
    control = getattr(cfg, "control", None)
    recipients = [{"recipient": f"the tenant's {role}s", "count": n,
                   "what": {"user": "their own mail", "auditor": "all of the tenant's mail, read-only, and the "
                            "audit trail", "admin": "no mail: users and tokens",
                            "appliance-admin": "no mail"}.get(role, "")}
                  for role, n in sorted((roles or {}).items())]
    if t is not None and t.ldap is not None:
        recipients.append({"recipient": "users of the tenant's directory (LDAP) by their groups' roles",
                           "count": None, "what": "as their roles allow"})
    recipients.append({"recipient": "backup target" + (f" ({a.backup_directory})" if backup else ""),
                       "count": None, "what": "encrypted records and chain entries, no keys" if backup
                       else "none configured"})
    recipients.append({"recipient": "control endpoint (key custody)" + (f" at {_host(control.url)}" if control
                                                                         else ""),
                       "count": None, "what": "keys only: no mail, no metadata"})
    if tsa:
        recipients.append({"recipient": f"time-stamping authority {_host(a.tsa_url)}", "count": None,
                           "what": "a hash of each sealed chain head: no mail, no metadata"})
    measures = [
        {"measure": "encryption at rest", "on": True,
         "detail": "each tenant's records, metadata and listings sealed with AES-256-GCM under a key of "
                   "that tenant; audit search terms encrypted under the tenant's key"},
        {"measure": "key custody", "on": True,
         "detail": "keys fetched over mutual TLS from the control endpoint" + (f" ({_host(control.url)})"
                   if control else "") + ", kept in memory only, never written to disk"},
        {"measure": "encrypted transport for ingest", "on": bool(listeners) and tls is not None,
         "detail": f"{len(listeners)} SMTP listener(s), TLS only (STARTTLS required or implicit TLS), TLS "
                   f"{tls.min_version if tls else '-'} or later; {len(connectors)} connector(s), "
                   f"{sum(1 for c in connectors if c.client_cert == 'required')} requiring client certificates"},
        {"measure": "encrypted transport for access", "on": True,
         "detail": "HTTPS API and web UI (TLS only); the command line on a local unix socket"},
        {"measure": "integrity: hash chain and seals", "on": True,
         "detail": "every change to a shard is a hash-chained entry; chain heads are signed (Ed25519) every "
                   f"{int(a.seal_interval) if a else 300} s" if a else "the archive is not enabled"},
        {"measure": "trusted time stamps (RFC 3161)", "on": tsa,
         "detail": f"each seal time-stamped by {_host(a.tsa_url)}" if tsa else "not configured ([archive] tsa_url)"},
        {"measure": "audit trail", "on": True,
         "detail": "every search, read, download, export, login and change, hash-chained and sealed every "
                   f"{cfg.audit.seal_every if getattr(cfg, 'audit', None) else 1000} records"},
        {"measure": "access control", "on": True,
         "detail": "roles (user: own mail; auditor: the tenant's mail; admin: no mail); second factor (TOTP); "
                   "throttled logins; sessions end after "
                   f"{int(cfg.access.session_idle // 60) if getattr(cfg, 'access', None) else 30} min idle"},
        {"measure": "deletion with four eyes, legal holds", "on": True,
         "detail": "erasure only when a second auditor approves; refused under a legal hold or a retention "
                   "minimum; every deletion leaves a tombstone in the chain"},
        {"measure": "backup", "on": backup,
         "detail": "an append-only log of encrypted chain entries per shard" if backup
         else "not configured ([archive] backup_directory)"},
        {"measure": "encrypted volumes", "on": None,
         "detail": "spool, store and index on encrypted volumes unlocked with keys from the control endpoint "
                   "(mailtresor-unlock): a property of the installation, not of this configuration"},
    ]
    return {
        "record": "GDPR Art. 30(1) record of processing activities",
        "generated": _iso(now),
        "controller": {"tenant": tenant, "name": ctl["name"], "contact": ctl["contact"]},
        "purposes": ctl["purposes"],
        "legal_basis": ctl["legal_basis"],
        "data_subjects": ["senders and recipients of mail to and from the tenant's domains "
                          f"({', '.join(t.domains) if t is not None else '-'}): employees, customers, suppliers, "
                          "other correspondents",
                          "persons named in the messages' content",
                          "the tenant's users of the archive (access records)"],
        "data_categories": ["message content and attachments, as received",
                            "metadata: addresses (From, To, Cc, Bcc, envelope), dates, subject, message id, size",
                            "text extracted from messages and attachments (search index)",
                            "access records: who searched, read, exported (audit trail)"],
        "recipients": recipients,
        "transfers": ctl["transfers"],
        "retention": ([rule_text(r) for r in rules] if section is not None else None),
        "holds": len(holds) if section is not None else None,
        "measures": measures,
    }


def records_text(doc: dict) -> str:
    """The Art. 30 record as plain text (`mailtresor gdpr records`).  Pure."""
    c = doc["controller"]
    lines = [doc["record"], f"Generated: {doc['generated']}", "",
             f"Controller: {c['name']} (tenant {c['tenant']})", f"Contact: {c['contact'] or '(not configured)'}",
             "Purposes:"] + [f"  - {p}" for p in doc["purposes"]] + [f"Legal basis: {doc['legal_basis']}",
                                                                     "Categories of data subjects:"]
    lines += [f"  - {x}" for x in doc["data_subjects"]] + ["Categories of personal data:"]
    lines += [f"  - {x}" for x in doc["data_categories"]] + ["Recipients:"]
    lines += [f"  - {r['recipient']}" + (f": {r['count']}" if r["count"] is not None else "") + f" ({r['what']})"
              for r in doc["recipients"]]
    lines += ["Transfers to third countries: " + ("; ".join(doc["transfers"]) if doc["transfers"] else "none"),
              "Retention:"]
    if doc["retention"] is None:
        lines.append("  (the lifecycle database is not available yet)")
    elif not doc["retention"]:
        lines.append("  no rules: mail is kept until a decided deletion request removes it")
    lines += [f"  - {r}" for r in doc["retention"] or []]
    if doc["holds"]:
        lines.append(f"  {doc['holds']} legal hold(s) in force suspend deletion of what they cover")
    lines.append("Technical and organisational measures (Art. 32):")
    for m in doc["measures"]:
        state = {True: "on", False: "off", None: "installation"}[m["on"]]
        lines.append(f"  - {m['measure']} [{state}]: {m['detail']}")
    return "\n".join(lines) + "\n"
