"""`mailtresor audit verify|show`: the audit trail from the appliance's shell.

Both read the trail's directory ([audit] directory) directly; they need
no daemon.  `verify` checks the chain, the seals (against every version of
the seal key, fetched from the control endpoint) and the head file; `show`
lists records, search terms as "(encrypted)" unless `--terms` is given and
the tenant's key can be fetched -- and decrypting them is itself recorded
in the trail.
"""

from __future__ import annotations

import json
import os
import sys


def register(subparsers) -> None:
    s = subparsers.add_parser("audit", help="the audit trail of every access: verify it, show it")
    sub = s.add_subparsers(dest="audit_command", metavar="ACTION")
    sub.required = True

    v = sub.add_parser("verify", help="check the trail's chain, seals and head; exit 1 with the problems",
                       description="Check every record's hash and link, the order of seq and time, every "
                                   "seal's signature and key, and the head file (which catches a removed "
                                   "tail). Prints one line per problem naming the seq; exit 0 when sound.")
    v.add_argument("--quiet", action="store_true", help="do not mention unsealed records at the end")
    v.set_defaults(func=run_verify)

    sh = sub.add_parser("show", help="list audit records")
    sh.add_argument("--tenant", help="only this tenant's records (default: every record)")
    sh.add_argument("--appliance", action="store_true", help="only the appliance's own records (no tenant)")
    sh.add_argument("--since", type=int, default=0, metavar="SEQ", help="records after this seq")
    sh.add_argument("--limit", type=int, default=1000)
    sh.add_argument("--action", action="append", metavar="ACTION", help="only these actions (repeatable)")
    sh.add_argument("--terms", action="store_true",
                    help="decrypt search terms with the tenant's key (needs --tenant; recorded in that "
                         "tenant's trail)")
    sh.add_argument("--json", action="store_true", help="machine-readable output")
    sh.set_defaults(func=run_show)


def _directory(cfg):
    from mailtresor.cli.common import UserError
    d = cfg.audit.directory
    if not d.is_dir():
        raise UserError(f"no audit trail at {d} ([audit] directory): the daemon makes it at its first start")
    return d


def run_verify(cfg, args) -> int:
    from mailtresor.access import audit
    from mailtresor.archive.store import KeyMissing
    from mailtresor.cli.common import UserError, fetching_keys
    from mailtresor.keys.ring import KeyUnavailable
    d = _directory(cfg)
    try:
        rep = audit.check(d, fetching_keys(cfg))
    except (KeyUnavailable, KeyMissing) as e:
        raise UserError(f"cannot get the seal key to check seals against: {e}")
    except OSError as e:
        raise UserError(f"cannot read the audit trail {d}: {e.strerror or e}")
    for line in rep.problems:
        print(line)
    if not args.quiet:
        for line in rep.notes:
            print(f"note: {line}", file=sys.stderr)
    print(f"audit verify: {rep.records} record(s), {rep.seals} seal(s), up to seq {rep.last_seq}: "
          + ("sound" if not rep.problems else f"{len(rep.problems)} problem(s)"), file=sys.stderr)
    return 1 if rep.problems else 0


def shown(value) -> str:
    """One field of a record on a terminal line: as it is when it is
    printable and has no space, else quoted and escaped (JSON, ASCII).  A
    login name, an id or a client address is what the caller sent: a
    newline in one would forge a record line under it, an escape sequence
    would rewrite the auditor's terminal.  Pure."""
    s = "-" if value is None or value == "" else str(value)
    if all(c.isprintable() and not c.isspace() for c in s):
        return s
    return json.dumps(s, ensure_ascii=True)


def format_record(r: dict) -> str:
    """A record as one line of `mailtresor audit show`."""
    line = " ".join([f"{r['seq']:>8}", shown(r["time"]), shown(r["principal"]), shown(r["tenant"]),
                     shown(r["action"]), shown(r["object"]), shown(r["result"]), shown(r["client"])])
    if "terms" in r:
        line += f" terms={json.dumps(r['terms'], ensure_ascii=True)}"
    if "detail" in r:
        line += " " + json.dumps(r["detail"], sort_keys=True, ensure_ascii=True)
    return line


def run_show(cfg, args) -> int:
    from mailtresor import assemble
    from mailtresor.access import audit
    from mailtresor.cli.common import UserError, fetching_keys, known_tenant
    d = _directory(cfg)
    if args.tenant and args.appliance:
        raise UserError("--tenant and --appliance exclude each other")
    if args.limit < 1:
        raise UserError("--limit must be at least 1")
    if args.since < 0:
        raise UserError("--since must not be negative")
    if args.terms and not args.tenant:
        # The record of this read goes to the tenant whose terms are read,
        # where its auditors see it; over every tenant at once it would be
        # an appliance record that no tenant's auditor is shown.
        raise UserError("--terms needs --tenant (the read is recorded in that tenant's trail)")
    tenant = known_tenant(cfg, args.tenant) if args.tenant else None if args.appliance else audit.ALL
    keys = fetching_keys(cfg) if args.terms else None
    if args.terms:
        # Decrypting a tenant's search terms is an access like any other.
        who = f"local:uid={os.getuid()}"
        log = assemble.build_audit(cfg, keys, name="mailtresor")
        try:
            log.append(principal=who, tenant=args.tenant or None, action="read", object="audit-terms",
                       result="ok", client=f"unix:uid={os.getuid()},pid={os.getpid()}",
                       detail={"command": "mailtresor audit show --terms", "since": args.since})
        finally:
            log.close(seal=False)
    records, nxt = audit.read(d, keys, tenant=tenant, since=args.since, limit=args.limit,
                              actions=set(args.action) if args.action else None, with_terms=args.terms)
    if args.json:
        print(json.dumps({"records": records, "next": nxt}, indent=1, sort_keys=True))
        return 0
    for r in records:
        print(format_record(r))
    print(f"{len(records)} record(s); next: --since {nxt}", file=sys.stderr)
    return 0
