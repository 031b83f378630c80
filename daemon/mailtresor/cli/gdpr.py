"""`mailtresor gdpr subject-access|records` and `mailtresor evidence`.

All three ask the daemon over its API socket (cli/client.py) as the local
principal (auditor + administrator of the tenant it names), so that the
answer and its audit record are the API's: `gdpr subject-access` starts the
export job, waits for it and writes the file; `gdpr records` prints the
Art. 30 record; `evidence` prints the live proof of one tenant (every
configured tenant without --tenant), `--verify` checks every shard too.
"""

from __future__ import annotations

import json
import sys
import time

WAIT_SECONDS = 3600.0               # an export the command waits for at most


def register(subparsers) -> None:
    g = subparsers.add_parser("gdpr", help="GDPR subject access (Art. 15/20) and records of processing (Art. 30)")
    sub = g.add_subparsers(dest="gdpr_command", metavar="ACTION")
    sub.required = True
    s = sub.add_parser("subject-access", help="export everything concerning one address, with a processing report",
                       description="Every message where ADDRESS is in From, To, Cc, Bcc or an envelope, as a zip "
                                   "(messages byte for byte, manifest.json, report.json/.txt/.html) or an mbox. "
                                   "ADDRESS is taken literally: no search syntax.")
    s.add_argument("address", metavar="ADDRESS")
    s.add_argument("--tenant", required=True)
    s.add_argument("--format", choices=("zip", "mbox"), default="zip")
    s.add_argument("-o", "--output", metavar="FILE",
                   help="where to write the export (default: subject-access-<job>.<format> here)")
    s.add_argument("--report", action="store_true", help="also print the report (text) on standard output")
    s.set_defaults(func=run_subject_access)
    r = sub.add_parser("records", help="the Art. 30 record of processing activities of a tenant")
    r.add_argument("--tenant", required=True)
    r.add_argument("--json", action="store_true", help="machine-readable output")
    r.set_defaults(func=run_records)

    e = subparsers.add_parser("evidence", help="the live proof: chain heads, seals, deletions, holds, decisions, "
                                               "key releases, verify")
    e.add_argument("--tenant", help="one tenant (default: every configured tenant)")
    e.add_argument("--verify", action="store_true", help="also verify every shard (reads every record: slow)")
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.set_defaults(func=run_evidence)


def _client(cfg):
    from mailtresor.cli import client
    return client.Client(cfg.appliance.runtime_directory)


def _call(fn):
    """Run fn(); the daemon's refusals as one line naming the problem."""
    from mailtresor.cli import client
    from mailtresor.cli.common import UserError
    try:
        return fn()
    except client.DaemonUnavailable as e:
        raise UserError(f"the daemon does not answer ({e}): these commands need it running")
    except client.ApiError as e:
        raise UserError(e.reason)


def _known(cfg, tenant: str) -> str:
    from mailtresor.cli.common import UserError
    if tenant not in {t.name for t in cfg.tenant}:
        raise UserError(f"no tenant {tenant!r} in the configuration")
    return tenant


def run_subject_access(cfg, args) -> int:
    from mailtresor.cli import client
    from mailtresor.cli.common import UserError
    from mailtresor.lifecycle import gdpr
    tenant = _known(cfg, args.tenant)
    with _client(cfg) as c:
        ans = _call(lambda: c.json("POST", "/api/v1/gdpr/subject-access",
                                   body={"address": args.address, "format": args.format, "tenant": tenant}))
        job = ans["export"]
        print(f"subject access: {ans['messages']} message(s) concern {ans['report']['subject']}", file=sys.stderr)
        if args.report:
            sys.stdout.write(gdpr.report_text(ans["report"]))
        if job is None:
            print("subject access: nothing to export (an mbox of no message)", file=sys.stderr)
            return 0
        deadline = time.monotonic() + WAIT_SECONDS
        while job["state"] in ("queued", "running"):
            if time.monotonic() > deadline:
                raise UserError(f"the export {job['id']} is still running; fetch it later with the API")
            time.sleep(0.2)
            job = _call(lambda: c.json("GET", f"/api/v1/exports/{client.quote(job['id'])}"))
        if job["state"] != "done":
            raise UserError(f"the export failed: {job.get('error') or job['state']}")
        data = _call(lambda: c.bytes(f"/api/v1/exports/{client.quote(job['id'])}/download"))
    out = args.output or f"subject-access-{job['id']}.{args.format}"
    try:
        with open(out, "xb") as f:
            f.write(data)
    except FileExistsError:
        raise UserError(f"{out} exists already: name another file with -o")
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}")
    print(f"subject access: {len(data)} bytes written to {out}" + (f" ({job['missing']} missing)"
                                                                    if job.get("missing") else ""), file=sys.stderr)
    return 0


def run_records(cfg, args) -> int:
    from mailtresor.lifecycle import gdpr
    tenant = _known(cfg, args.tenant)
    with _client(cfg) as c:
        doc = _call(lambda: c.json("GET", "/api/v1/gdpr/records", params={"tenant": tenant}))
    if args.json:
        print(json.dumps(doc, indent=1, ensure_ascii=False))
    else:
        sys.stdout.write(gdpr.records_text(doc))
    return 0


def run_evidence(cfg, args) -> int:
    from mailtresor.lifecycle import evidence
    tenants = [_known(cfg, args.tenant)] if args.tenant else [t.name for t in cfg.tenant]
    docs = []
    with _client(cfg) as c:
        for t in tenants:
            docs.append(_call(lambda: c.json("GET", "/api/v1/evidence",
                                             params={"tenant": t, "verify": "1" if args.verify else None})))
    if args.json:
        print(json.dumps(docs[0] if args.tenant else docs, indent=1, ensure_ascii=False))
    else:
        sys.stdout.write("\n".join(evidence.evidence_text(d) for d in docs))
    bad = any(d["verify"] is not None and not d["verify"]["sound"] for d in docs)
    return 1 if bad else 0
