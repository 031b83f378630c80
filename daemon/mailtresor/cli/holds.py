"""`mailtresor hold ...` and `mailtresor deletion ...`: legal holds and
four-eyes deletion requests from the appliance's shell.

Both go through the running daemon's API socket (cli/client.py): the
daemon holds lifecycle.db's key and the archiver that deletes.  The caller
is a local principal ("uid=0" for root), acting as an auditor of the tenant
it names -- and the four-eyes rule applies to it like anyone: a request
made from the shell must be decided by someone else (another auditor in the
web UI or the API, or another local user).  Every step is in the audit trail.

    mailtresor hold list|show NAME|place NAME --reason R [--query Q] [--id ID ...]|lift NAME --reason R
    mailtresor deletion request --reason R (--id ID ... | --query Q) | list [--state S] | show ID
                        | approve ID | reject ID --reason R
"""

from __future__ import annotations

import json

from mailtresor.cli.common import EXIT_FAIL, EXIT_USAGE, UserError, clip, minute, plural


def register(subparsers) -> None:
    h = subparsers.add_parser("hold", help="legal holds: place, list, show, lift (through the daemon)")
    hs = h.add_subparsers(dest="hold_command", metavar="ACTION")
    hs.required = True

    def tenant(p):
        p.add_argument("--tenant", required=True, help="the tenant")
        p.add_argument("--json", action="store_true", help="machine-readable output")

    p = hs.add_parser("list", help="the tenant's holds, active first")
    tenant(p)
    p.set_defaults(func=run_hold_list)
    p = hs.add_parser("show", help="one hold, with how many messages it covers now")
    p.add_argument("name")
    tenant(p)
    p.set_defaults(func=run_hold_show)
    p = hs.add_parser("place", help="place a hold (a query, ids, or both)",
                      description="Place a legal hold: no deletion (retention or request) touches what it "
                                  "covers -- its ids, and every message matching its query, including mail "
                                  "that arrives later -- until an auditor lifts it.")
    p.add_argument("name", help="the case: 1 to 64 letters, digits, '.', '_' or '-'; unique for ever")
    p.add_argument("--reason", required=True)
    p.add_argument("--query", help="a search query (as `mailtresor search` takes it)")
    p.add_argument("--id", action="append", dest="ids", metavar="ID", help="an archive id (repeatable)")
    tenant(p)
    p.set_defaults(func=run_hold_place)
    p = hs.add_parser("lift", help="lift a hold (kept, with who lifted it, when and why)")
    p.add_argument("name")
    p.add_argument("--reason", required=True)
    tenant(p)
    p.set_defaults(func=run_hold_lift)

    d = subparsers.add_parser("deletion", help="four-eyes deletion requests (through the daemon)")
    ds = d.add_subparsers(dest="deletion_command", metavar="ACTION")
    ds.required = True
    p = ds.add_parser("request", help="ask for the deletion of messages (another auditor decides)")
    p.add_argument("--reason", required=True)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--id", action="append", dest="ids", metavar="ID", help="an archive id (repeatable)")
    g.add_argument("--query", help="a search query: resolved to ids now, and shown")
    tenant(p)
    p.set_defaults(func=run_request)
    p = ds.add_parser("list", help="the tenant's deletion requests, newest first")
    p.add_argument("--state", choices=("pending", "deleting", "approved", "rejected", "refused"))
    tenant(p)
    p.set_defaults(func=run_request_list)
    p = ds.add_parser("show", help="one request (pending: what would refuse it now)")
    p.add_argument("id")
    tenant(p)
    p.set_defaults(func=run_request_show)
    p = ds.add_parser("approve", help="approve (not your own): deleted, or refused under a hold or minimum")
    p.add_argument("id")
    tenant(p)
    p.set_defaults(func=run_approve)
    p = ds.add_parser("reject", help="reject (not your own), with a reason")
    p.add_argument("id")
    p.add_argument("--reason", required=True)
    tenant(p)
    p.set_defaults(func=run_reject)


# --- talking to the daemon ------------------------------------------------------------

def _call(cfg, method: str, path: str, params: dict | None = None, body: dict | None = None):
    from mailtresor.cli import client
    from mailtresor.cli.common import known_tenant
    if params and params.get("tenant"):
        known_tenant(cfg, params["tenant"])
    try:
        with client.Client(cfg.appliance.runtime_directory, timeout=600.0) as c:
            return c.json(method, client.API + path, params, body)
    except client.ApiError as e:
        raise UserError(e.reason, EXIT_USAGE if e.status == 400 else EXIT_FAIL) from None
    except client.DaemonUnavailable as e:
        raise UserError(f"the daemon does not answer ({e}): holds and deletions need it running") from None


def _q(segment: str) -> str:
    from mailtresor.cli.client import quote
    return quote(segment)


def _out(args, doc, lines) -> int:
    if args.json:
        print(json.dumps(doc, indent=1, ensure_ascii=False))
    else:
        for line in lines:
            print(line)
    return 0


def _why(reasons: list[dict]) -> str:
    """What protects one message, in words."""
    out = []
    for r in reasons:
        if r.get("kind") == "hold":
            out.append(f"hold {r.get('hold')}")
        else:
            out.append(f"retention minimum of rule {r.get('name') or r.get('rule')} until {minute(r.get('until'))}")
    return "; ".join(out)


# --- holds ----------------------------------------------------------------------------

def _hold_line(h: dict) -> str:
    state = f"lifted {minute(h['lifted']['at'])} by {h['lifted']['by']}" if h.get("lifted") else "active"
    what = ", ".join(x for x in (f"query {h['query']!r}" if h.get("query") else "",
                                 plural(len(h.get("ids") or []), "id") if h.get("ids") else "") if x)
    return f"{h['name']}  {state}  placed {minute(h['at'])} by {h['by']}  {what}  -- {clip(h['reason'], 60)}"


def run_hold_list(cfg, args) -> int:
    doc = _call(cfg, "GET", "/holds", {"tenant": args.tenant})
    return _out(args, doc, [_hold_line(h) for h in doc["holds"]] or ["no holds"])


def run_hold_show(cfg, args) -> int:
    h = _call(cfg, "GET", f"/holds/{_q(args.name)}", {"tenant": args.tenant})
    lines = [_hold_line(h), f"covers {plural(h.get('covers', 0), 'message')} now", f"reason: {h['reason']}"]
    if h.get("lifted"):
        lines.append(f"lift reason: {h['lifted']['reason']}")
    lines += [f"id {i}" for i in h.get("ids") or []]
    return _out(args, h, lines)


def run_hold_place(cfg, args) -> int:
    body = {"name": args.name, "reason": args.reason, "tenant": args.tenant}
    if args.query is not None:
        body["query"] = args.query
    if args.ids:
        body["ids"] = args.ids
    h = _call(cfg, "POST", "/holds", None, body)
    return _out(args, h, [f"placed hold {h['name']} in tenant {args.tenant}"])


def run_hold_lift(cfg, args) -> int:
    h = _call(cfg, "POST", f"/holds/{_q(args.name)}/lift", {"tenant": args.tenant}, {"reason": args.reason})
    return _out(args, h, [f"lifted hold {h['name']} (it covered {plural(h['lifted'].get('covered', 0), 'message')})"])


# --- deletion requests ----------------------------------------------------------------

def _request_lines(r: dict) -> list[str]:
    n = len(r["ids"]) if "ids" in r else r.get("count", 0)
    lines = [f"deletion request {r['id']} {r['state']}: {plural(n, 'message')}, asked {minute(r['at'])} by "
             f"{r['by']} -- {clip(r['reason'], 60)}"]
    if r.get("query"):
        lines.append(f"  from the query {r['query']!r}")
    d = r.get("decision") or {}
    if d:
        lines.append(f"  decided {minute(d.get('at'))} by {d.get('by')}"
                     + (f": {plural(d['deleted'], 'message')} deleted" if "deleted" in d else "")
                     + (f": {d['reason']}" if d.get("reason") else ""))
    for aid, reasons in sorted((d.get("refusals") or r.get("would_refuse") or {}).items()):
        lines.append(f"  {'refused' if d.get('refusals') else 'would be refused'}: {aid}: {_why(reasons)}")
    return lines


def run_request(cfg, args) -> int:
    body = {"reason": args.reason, "tenant": args.tenant}
    if args.query is not None:
        body["query"] = args.query
    else:
        body["ids"] = args.ids
    r = _call(cfg, "POST", "/deletion-requests", None, body)
    return _out(args, r, _request_lines(r) + ["another auditor must approve or reject it"])


def run_request_list(cfg, args) -> int:
    doc = _call(cfg, "GET", "/deletion-requests", {"tenant": args.tenant, "state": args.state})
    return _out(args, doc, [_request_lines(r)[0] for r in doc["requests"]] or ["no deletion requests"])


def run_request_show(cfg, args) -> int:
    r = _call(cfg, "GET", f"/deletion-requests/{_q(args.id)}", {"tenant": args.tenant})
    return _out(args, r, _request_lines(r) + [f"  id {i}" for i in r["ids"]])


def run_approve(cfg, args) -> int:
    r = _call(cfg, "POST", f"/deletion-requests/{_q(args.id)}/approve", {"tenant": args.tenant})
    _out(args, r, _request_lines(r))
    return EXIT_FAIL if r["state"] == "refused" else 0


def run_reject(cfg, args) -> int:
    r = _call(cfg, "POST", f"/deletion-requests/{_q(args.id)}/reject", {"tenant": args.tenant},
              {"reason": args.reason})
    return _out(args, r, _request_lines(r))
