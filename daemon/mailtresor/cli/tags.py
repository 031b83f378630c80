"""`mailtresor tag add|remove --tenant T ID TAG...`: an auditor's case tags
on an archived message, from the appliance's shell.

Through the daemon's API socket (cli/client.py; the caller is a local
principal: auditor of the tenant it names): the daemon's archiver makes the
change (the message's metadata, through the shard's hash chain; the stored
message is not changed) and the audit trail records it as action "tag".
Classification tags (given by the tenant's rules at archive time) are not
removed here: they are facts of the message's arrival.

`mailtresor classify --tenant T --dry-run`: what the tenant's rules as
configured NOW would give each archived message, against the tags it got
when it arrived (a new rule's preview).  Only a dry run: rules changed
later do not re-tag old mail (docs/lifecycle/tags.md).  It reads and
decrypts every message of the tenant from the store (read-only; the daemon
may run).
"""

from __future__ import annotations

import json
import sys


def register(subparsers) -> None:
    s = subparsers.add_parser("tag", help="add or remove an auditor's case tags on a message",
                              description="Case tags (e.g. case:acme-v-smith) go into the message's metadata "
                                          "through the shard's hash chain; the stored message is unchanged. "
                                          "Needs the running daemon.")
    sub = s.add_subparsers(dest="tag_command", metavar="ACTION")
    sub.required = True
    for action, text in (("add", "add case tags"), ("remove", "remove case tags")):
        a = sub.add_parser(action, help=text)
        a.add_argument("--tenant", required=True)
        a.add_argument("id", help="the archive id (40 hex digits, as `search` prints)")
        a.add_argument("tags", nargs="+", metavar="TAG", help="tag names: 1-64 of A-Z a-z 0-9 . _ : -")
        a.add_argument("--json", action="store_true", help="print the message's tags as JSON")
        a.set_defaults(func=run_tag, tag_action=action)

    c = subparsers.add_parser("classify", help="preview the classification rules on archived mail",
                              description="What the tenant's classification rules as configured now would give "
                                          "each archived message, beside the tags it got when it arrived. Tags "
                                          "are facts at archive time: nothing is changed (--dry-run is the only "
                                          "mode). Reads every message of the tenant.")
    c.add_argument("--tenant", required=True)
    c.add_argument("--dry-run", action="store_true", required=True,
                   help="required: only report (archived mail is never re-tagged)")
    c.add_argument("--json", action="store_true", help="one JSON object per differing message")
    c.set_defaults(func=run_classify)


def run_tag(cfg, args) -> int:
    from mailtresor.archive.classify import valid_tag
    from mailtresor.cli import client
    from mailtresor.cli.common import EXIT_USAGE, UserError, archive_section, known_tenant
    archive_section(cfg)
    tenant = known_tenant(cfg, args.tenant)
    aid = args.id.lower()
    if len(aid) != 40 or any(c not in "0123456789abcdef" for c in aid):
        raise UserError(f"{args.id!r} is not an archive id (40 hex digits, as `search` prints)", EXIT_USAGE)
    for t in args.tags:
        if not valid_tag(t):
            raise UserError(f"{t!r} is not a tag name (1-64 of A-Z a-z 0-9 . _ : -)", EXIT_USAGE)
    body = {args.tag_action: list(args.tags)}
    try:
        with client.Client(cfg.appliance.runtime_directory, timeout=60) as c:
            doc = c.json("POST", f"{client.API}/messages/{client.quote(aid)}/tags", {"tenant": tenant}, body)
    except client.DaemonUnavailable as e:
        raise UserError(f"the daemon does not answer ({e}); case tags are changed by the running daemon") from None
    except client.ApiError as e:
        if e.status == 404:
            raise UserError(f"no message {aid} in the archive of {tenant}") from None
        raise UserError(f"cannot change the tags: {e.reason}") from None
    if args.json:
        sys.stdout.write(json.dumps(doc, indent=1) + "\n")
        return 0
    print(f"{aid}: case tags: {' '.join(doc['case_tags']) or '(none)'}"
          + ("" if doc["changed"] else " (unchanged)"))
    if doc["classification_tags"]:
        print(f"{aid}: classification tags: {' '.join(doc['classification_tags'])}")
    return 0


def run_classify(cfg, args) -> int:
    from mailtresor.archive import classify, parse
    from mailtresor.archive.archiver import classification_tags
    from mailtresor.archive.store import Store
    from mailtresor.cli.common import UserError, archive_section, fetching_keys, known_tenant
    a = archive_section(cfg)
    tenant = known_tenant(cfg, args.tenant)
    t = next(x for x in cfg.tenant if x.name == tenant)
    rules = classify.compile_rules(t.classify, t.groups)
    if not rules:
        raise UserError(f"tenant {tenant!r} has no [[tenant.classify]] rules")
    keys = fetching_keys(cfg)
    store = Store(a.directory, readonly=True)
    seen = differ = 0
    try:
        if not store.has_archive(tenant):
            raise UserError(f"no archive for tenant {tenant!r} yet")
        for month in store.months(tenant):
            shard = store.shard(tenant, month)
            for aid in shard.ids():
                raw, meta = shard.get(aid, keys)
                parsed = parse.parse_message(raw, parse.limits_of(a))
                now = sorted({tag for env in (meta.get("envelopes") or {}).values()
                              for tag in classify.classify(rules, raw, parsed, env, tenant)})
                stored = classification_tags(meta)
                seen += 1
                if now == stored:
                    continue
                differ += 1
                gain, lose = sorted(set(now) - set(stored)), sorted(set(stored) - set(now))
                if args.json:
                    print(json.dumps({"id": aid, "month": month, "stored": stored, "now": now}))
                else:
                    print(f"{month} {aid}: rules now" + (f" add {' '.join(gain)}" if gain else "")
                          + (f" leave out {' '.join(lose)}" if lose else ""))
    finally:
        store.close()
    print(f"classify --dry-run: {seen} message(s) of {tenant}, {differ} would be tagged differently now; "
          "nothing changed (tags are facts at archive time)", file=sys.stderr)
    return 0
