"""`mailtresor tag add|remove --tenant T ID TAG...`: an auditor's case tags
on an archived message, from the appliance's shell.

Through the daemon's API socket (cli/client.py; the caller is a local
principal: auditor of the tenant it names): the daemon's archiver makes the
change (the message's metadata, through the shard's hash chain; the stored
message is not changed) and the audit trail records it as action "tag".
Classification tags (given by the tenant's rules at archive time) are not
removed here: they are facts of the message's arrival.
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
