"""`mailtresor retention run|rules|add|remove`: retention from the shell.

Through the running daemon's API socket (cli/client.py), as a local
principal (auditor + admin of the tenant it names): the daemon holds the
archiver, whose thread alone writes to the store, and lifecycle.db's key.
So the rules, the preview and the run are exactly the API's
(access/retention.py), and audited the same way.  Without a daemon there is
no run: the command says so.

    mailtresor retention run [--dry-run] [--tenant T]
    mailtresor retention rules [--tenant T]
    mailtresor retention add --tenant T --name N [--sender A] [--recipient A] [--tag T] [--flag F]
                             [--query Q] [--basis date|arrival] [--minimum 10y] [--maximum 7y]
    mailtresor retention remove ID [--tenant T]
"""

from __future__ import annotations

import json
import sys

from mailtresor.cli.common import UserError, clip, known_tenant, minute, plural


def register(subparsers) -> None:
    s = subparsers.add_parser("retention", help="retention rules and runs: list, add, remove, run, dry run")
    sub = s.add_subparsers(dest="retention_command", metavar="ACTION")
    sub.required = True

    r = sub.add_parser("run", help="delete what the rules say must go (holds and minimums keep theirs)",
                       description="Run retention now through the daemon: per rule, what goes and why; what "
                                   "is kept and why (a legal hold, a minimum). --dry-run deletes nothing and "
                                   "lists the same. One audit record per tenant.")
    r.add_argument("--dry-run", action="store_true", help="list what would go; delete nothing")
    r.add_argument("--tenant", help="only this tenant (default: every tenant)")
    r.add_argument("--json", action="store_true", help="machine-readable output")
    r.set_defaults(func=run_run)

    r = sub.add_parser("rules", help="list the retention rules")
    r.add_argument("--tenant", help="only this tenant (default: every tenant)")
    r.add_argument("--json", action="store_true", help="machine-readable output")
    r.set_defaults(func=run_rules)

    r = sub.add_parser("add", help="add a rule; prints what it would delete now",
                       description="Add a retention rule. Matching: within one option any value (repeat "
                                   "the option), across options all. A period is a number and y, m or d.")
    r.add_argument("--tenant", required=True)
    r.add_argument("--name", required=True)
    r.add_argument("--sender", action="append", default=[], help="address or domain (repeatable)")
    r.add_argument("--recipient", action="append", default=[], help="address or domain (repeatable)")
    r.add_argument("--tag", action="append", default=[], help="a tag (repeatable)")
    r.add_argument("--flag", action="append", default=[], help="a flag (repeatable)")
    r.add_argument("--query", default="", help="any search query")
    r.add_argument("--basis", choices=("date", "arrival"), default="date",
                   help="count from the Date: header (default) or from the arrival")
    r.add_argument("--minimum", help="no deletion before this period has ended (e.g. 10y)")
    r.add_argument("--maximum", help="deleted once this period has ended (e.g. 7y)")
    r.add_argument("--json", action="store_true", help="machine-readable output")
    r.set_defaults(func=run_add)

    r = sub.add_parser("remove", help="remove a rule by its id")
    r.add_argument("id")
    r.add_argument("--tenant", help="the rule's tenant (default: looked up)")
    r.set_defaults(func=run_remove)


def _client(cfg):
    from mailtresor.cli import client
    return client, client.Client(cfg.appliance.runtime_directory)


def _call(cfg, method, path, params=None, body=None):
    client, conn = _client(cfg)
    try:
        return conn.json(method, f"{client.API}{path}", params, body)
    except client.DaemonUnavailable as e:
        raise UserError(f"the daemon does not answer ({e}): retention runs in the daemon; start it") from None
    except client.ApiError as e:
        raise UserError(e.reason) from None
    finally:
        conn.close()


def _tenants(cfg, name):
    return [known_tenant(cfg, name)] if name else [t.name for t in cfg.tenant]


def _rule_line(r: dict) -> str:
    m = r.get("match") or {}
    what = []
    for key, label in (("senders", "from"), ("recipients", "to"), ("tags", "tag"), ("flags", "flag")):
        if m.get(key):
            what.append(f"{label} " + "|".join(m[key]))
    if m.get("query"):
        what.append(f"query {json.dumps(m['query'], ensure_ascii=False)}")
    periods = ", ".join(p for p in (f"minimum {r['minimum']}" if r.get("minimum") else "",
                                    f"maximum {r['maximum']}" if r.get("maximum") else "") if p)
    return (f"{r['id']}  {json.dumps(r['name'], ensure_ascii=False)}  {periods} from the {r['basis']}; "
            f"{' and '.join(what) or 'all mail'}; changed {minute(r.get('changed_at'))} by {r.get('changed_by')}")


def why_text(w: dict) -> str:
    """One reason a message is kept, as a line shows it."""
    if w["kind"] == "hold":
        return f"legal hold {json.dumps(w['hold'], ensure_ascii=False)}"
    if w["kind"] == "minimum":
        return f"minimum of rule {json.dumps(w.get('name', ''), ensure_ascii=False)} ({w['rule']}) " \
               f"until {minute(w.get('until'))}"
    return f"rule {w.get('rule')} was removed during the run"


def print_plan(doc: dict, *, dry_run: bool, out=sys.stdout) -> None:
    """A plan (preview or run report) as the terminal shows it."""
    verb = "would go" if dry_run else "deleted"
    for r in doc["rules"]:
        print(f"  rule {json.dumps(r['name'], ensure_ascii=False)} ({r['id']}): {r['go']} {verb}, "
              f"{r['kept']} kept", file=out)
    for h in doc["kept_by"]["holds"]:
        print(f"  kept by legal hold {json.dumps(h['hold'], ensure_ascii=False)}: {h['kept']}", file=out)
    for m in doc["kept_by"]["minimums"]:
        print(f"  kept by the minimum of {json.dumps(m['name'], ensure_ascii=False)} ({m['id']}): {m['kept']}",
              file=out)
    for it in doc["items"]["go"]:
        print(f"  {verb}: {it['id']} {it['month']} rule {json.dumps(it['rule']['name'], ensure_ascii=False)} "
              f"(maximum ended {minute(it['ended'])})", file=out)
    for it in doc["items"]["kept"]:
        print(f"  kept: {it['id']} {it['month']} expired by {json.dumps(it['rule']['name'], ensure_ascii=False)}; "
              + "; ".join(why_text(w) for w in it.get("why", [])), file=out)
    if doc.get("truncated"):
        print(f"  (the lists show the first {len(doc['items']['go'])} / {len(doc['items']['kept'])}; "
              "the counts are complete)", file=out)


def run_run(cfg, args) -> int:
    reports = []
    for t in _tenants(cfg, args.tenant):
        rep = _call(cfg, "POST", "/retention/run", body={"tenant": t, "dry_run": bool(args.dry_run)})
        reports.append(rep)
        if args.json:
            continue
        if args.dry_run:
            head = f"{t}: dry run: {plural(rep['go'], 'message')} would go, {rep['kept']} kept"
        else:
            head = f"{t}: {plural(rep['deleted'], 'message')} deleted, {rep['kept']} kept" + \
                   (f", {rep['missing']} already gone" if rep.get("missing") else "")
        print(head)
        print_plan(rep, dry_run=args.dry_run)
    if args.json:
        print(json.dumps({"reports": reports}, indent=1, sort_keys=True))
    return 0


def run_rules(cfg, args) -> int:
    out = []
    for t in _tenants(cfg, args.tenant):
        doc = _call(cfg, "GET", "/retention/rules", {"tenant": t})
        out.append(doc)
        if not args.json:
            print(f"{t}: {plural(len(doc['rules']), 'rule')}")
            for r in doc["rules"]:
                print("  " + clip(_rule_line(r), 400))
    if args.json:
        print(json.dumps({"tenants": out}, indent=1, sort_keys=True))
    return 0


def run_add(cfg, args) -> int:
    t = known_tenant(cfg, args.tenant)
    match = {k: v for k, v in (("senders", args.sender), ("recipients", args.recipient), ("tags", args.tag),
                               ("flags", args.flag), ("query", args.query)) if v}
    body = {"tenant": t, "name": args.name, "basis": args.basis, "match": match,
            "minimum": args.minimum or None, "maximum": args.maximum or None}
    doc = _call(cfg, "POST", "/retention/rules", body=body)
    if args.json:
        print(json.dumps(doc, indent=1, sort_keys=True))
        return 0
    p = doc["preview"]
    print(f"rule {doc['rule']['id']} added to {t}: " + clip(_rule_line(doc["rule"]), 300))
    print(f"the next run would delete {plural(p['go'], 'message')} and keep {p['kept']}:")
    print_plan(p, dry_run=True)
    return 0


def run_remove(cfg, args) -> int:
    tenants = _tenants(cfg, args.tenant)
    if not args.tenant:
        found = [t for t in tenants
                 if any(r["id"] == args.id for r in _call(cfg, "GET", "/retention/rules", {"tenant": t})["rules"])]
        if not found:
            raise UserError(f"no retention rule {args.id!r} in any tenant")
        tenants = found[:1]
    from mailtresor.cli.client import quote
    _call(cfg, "DELETE", f"/retention/rules/{quote(args.id)}", {"tenant": tenants[0]})
    print(f"rule {args.id} removed from {tenants[0]}")
    return 0
