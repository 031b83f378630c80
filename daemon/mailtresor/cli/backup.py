"""`mailtresor backup push|status|pull`: the remote copy of the backup
directory ([backup] remote, archive/store/remote.py, docs/BACKUP.md).

`push` sends what the target lacks now (the daemon also pushes every
[backup] interval); `status` says what was pushed, when, the lag and the
last error, without contacting the target; `pull DIR` downloads the
target's logs into DIR and checks each, for `mailtresor restore --from DIR`.
A push or pull waits for one of the daemon's that is under way (a lock).
"""

from __future__ import annotations

import json
import sys
import time

from mailtresor.cli.common import UserError, archive_section, minute, plural, size


IDENTITY_HELP = ("private key to log in with, instead of [backup] identity_file (which, as credential:NAME, "
                 "exists only inside the daemon's unit)")


def register(subparsers) -> None:
    b = subparsers.add_parser(
        "backup", help="the remote copy of the backup directory (SFTP): push, status, pull",
        description="The backup directory mirrored to an SFTP target that holds no keys ([backup] remote). "
                    "Restore from it: `mailtresor backup pull DIR`, then `mailtresor restore --from DIR`.")
    sub = b.add_subparsers(dest="backup_command", metavar="ACTION")
    sub.required = True
    s = sub.add_parser("push", help="send what the target lacks, now",
                       description="Append each log's new frames on the target; upload a rewritten "
                                   "(compacted) log whole and rename it over the old one. Prints a summary.")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--wait", type=float, default=120.0, metavar="SECONDS",
                   help="wait this long for a push of the daemon's that is under way (default 120)")
    s.add_argument("--identity", metavar="FILE", help=IDENTITY_HELP)
    s.set_defaults(func=run_push)
    s = sub.add_parser("status", help="the last push, the lag and the last error (no network)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=run_status)
    s = sub.add_parser("pull", help="download the target's logs into DIR and check them, for a restore",
                       description="Downloads every TENANT/YYYY-MM.log of the target into DIR (new or empty) "
                                   "and checks each: frames, chain, blobs, seals, and what this appliance "
                                   "pushed (when its record is there). A log with a problem is kept as "
                                   "YYYY-MM.log.damaged, which restore does not read; exit 1 then. "
                                   "Next: mailtresor restore --from DIR, then mailtresor reindex.")
    s.add_argument("dir", metavar="DIR", help="where to put the logs (new or empty)")
    s.add_argument("--identity", metavar="FILE", help=IDENTITY_HELP)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=run_pull)


def _remote(cfg, args=None):
    from mailtresor.archive.store.remote import from_config
    archive_section(cfg)
    if not cfg.backup.remote:
        raise UserError(f"{cfg.source}: no [backup] remote: this appliance has no remote backup target")
    rb = from_config(cfg)
    if getattr(args, "identity", None):
        rb.target.identity = args.identity
    return rb


def run_push(cfg, args) -> int:
    from mailtresor.archive.store.remote import RemoteError, exclusive
    rb = _remote(cfg, args)
    try:
        with exclusive(rb.state_dir, wait=args.wait):
            out = rb.push()
    except RemoteError as e:
        raise UserError(f"backup push: {e}")
    if args.json:
        print(json.dumps(out, indent=1, sort_keys=True))
        return 0
    parts = [f"{out[k]} {k}" for k in ("created", "appended", "replaced", "unchanged") if out[k]]
    if out["repaired"]:
        parts.append(f"{out['repaired']} of them replaced because the target's copy differed")
    fsync = {True: "fsynced on the target", False: "the target does not fsync", None: "nothing written"}[out["fsync"]]
    print(f"backup push: {plural(out['logs'], 'log')} ({', '.join(parts) or 'none'}); "
          f"{plural(out['frames_sent'], 'frame')}, {size(out['bytes_sent'])} sent to {rb.target.url} "
          f"in {out['seconds']:.1f} s; {fsync}", file=sys.stderr)
    return 0


def run_status(cfg, args) -> int:
    rb = _remote(cfg)
    st = rb.status()
    st["lag"] = rb.lag()                    # as it is now, from the local logs and the record
    st["daemon"] = daemon = _published(cfg)
    if args.json:
        print(json.dumps(st, indent=1, sort_keys=True))
        return 1 if st["last_error"] else 0
    lag = st["lag"]
    print(f"remote      {st['remote']}")
    print(f"last push   {minute(st['last_push']) if st['last_push'] else 'never'}"
          + (f" ({_age(st['last_push'])} ago)" if st["last_push"] else ""))
    if st["last_error"]:
        print(f"last error  {minute(st['last_attempt'])}: {st['last_error']}")
    print(f"lag         {plural(lag['frames'], 'frame')}, {size(lag['bytes'])} in {plural(lag['logs'], 'log')}"
          + (" (the target has everything)" if not lag["frames"] else ""))
    print(f"logs pushed {st['logs_pushed']}")
    if daemon is not None:
        print(f"daemon      pushing every {cfg.backup.interval:g} s"
              + (f"; {plural(daemon.get('failures_in_a_row', 0), 'failure')} in a row"
                 if daemon.get("failures_in_a_row") else ""))
    return 1 if st["last_error"] else 0


def _published(cfg) -> dict | None:
    """The running daemon's pushing state (status.json), or None."""
    from mailtresor.cli.status import _pid_alive
    try:
        with open(cfg.appliance.runtime_directory / "status.json") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    if doc.get("state") == "stopped" or not _pid_alive(int(doc.get("pid", 0))):
        return None
    return doc.get("backup_remote")


def _age(t: float) -> str:
    s = max(0, int(time.time() - t))
    return f"{s} s" if s < 120 else f"{s // 60} min" if s < 7200 else f"{s // 3600} h"


def run_pull(cfg, args) -> int:
    from pathlib import Path

    from mailtresor.archive.store.remote import RemoteError, exclusive
    from mailtresor.cli.common import fetching_keys
    from mailtresor.keys import crypto
    from mailtresor.keys.ring import KeyUnavailable
    rb = _remote(cfg, args)
    try:
        publics = {crypto.ed25519_public(seed) for seed in fetching_keys(cfg).seal_seeds()}
    except KeyUnavailable as e:
        publics = None
        print(f"backup pull: the seal key is not available ({e}): seals are checked against their own "
              "public keys only, not against this appliance's", file=sys.stderr)
    try:
        with exclusive(rb.state_dir, wait=120.0):
            out = rb.pull(Path(args.dir), publics)
    except RemoteError as e:
        raise UserError(f"backup pull: {e}")
    if args.json:
        print(json.dumps(out, indent=1, sort_keys=True))
    else:
        for key, problems in sorted(out["problems"].items()):
            for p in problems:
                print(f"{key}: {p}")
    bad = len(out["problems"])
    print(f"backup pull: {plural(out['logs'], 'log')}, {size(out['bytes'])} from {rb.target.url} into {args.dir}: "
          + ("all good; next: mailtresor restore --from " + args.dir + ", then mailtresor reindex" if not bad else
             f"{plural(bad, 'log')} with problems, kept as YYYY-MM.log.damaged (restore does not read them); "
             "do not restore from this copy without looking at them"), file=sys.stderr)
    return 1 if bad else 0
