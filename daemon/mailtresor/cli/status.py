"""`mailtresor status`: the daemon and the archive in words, or `--json`.

Where the numbers come from: the daemon's own status document (asked over
its API socket when it answers, else the status.json it publishes in the
runtime directory, checked against the process table), the spool
directory as it is right now, and each shard's chain, index and backup
heads (read-only).  Nothing here needs a key.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from mailtresor.cli.common import EXIT_NOT_RUNNING, UserError, minute, plural


def register(subparsers) -> None:
    s = subparsers.add_parser(
        "status", help="daemon state, keys held, spool depth, archive and index lag, tenants and shards",
        description="The daemon's state, the keys it holds (names and versions), the spool, the "
                    "archiver, and per tenant and shard the records and what the index and backup "
                    "still lack. Exit 0 when the daemon runs, 3 when it does not.")
    s.add_argument("--json", action="store_true", help="machine-readable output (the fields are in "
                                                       "docs/OPERATIONS.md)")
    s.set_defaults(func=run_status)


def run_status(cfg, args) -> int:
    doc = daemon_status(cfg)
    if args.json:
        print(json.dumps(doc, indent=1, sort_keys=True))
    else:
        sys.stdout.write(render(doc))
    return 0 if doc["daemon"] == "running" else EXIT_NOT_RUNNING


# --- gathering ------------------------------------------------------------------------

def daemon_status(cfg) -> dict:
    """The status document (`status --json`): what the daemon publishes,
    checked against the process table, plus the spool and the shards as
    they are right now."""
    doc: dict = {"daemon": "not running"}
    published = _published(cfg)
    if published is not None:
        alive = _pid_alive(int(published.get("pid", 0))) and published.get("state") != "stopped"
        doc["daemon"] = "running" if alive else "not running"
        doc["pid"] = published.get("pid")
        doc["state"] = published.get("state")
        doc["status"] = published.get("status")
        doc["status_age_seconds"] = round(time.time() - float(published.get("time", 0)), 1)
        for name in ("keys", "listeners", "milter", "relay_processes", "api"):
            doc[name] = published.get(name)
        doc["archiver"] = published.get("archive")
        doc["backup_remote"] = published.get("backup_remote")       # [backup] remote (cli/backup.py)
    spool = cfg.spool.directory
    names = sorted(n for n in _list(spool / "new") if not n.startswith("."))
    doc["spool"] = {"directory": str(spool), "ready": len(names),
                    "in_progress": _count(spool / "tmp"),
                    "set_aside": sum(1 for n in _list(spool / "bad") if not n.endswith(".why") and not n.startswith(".")),
                    "unrouted": _count(spool / "unrouted")}
    if names:
        try:
            oldest = (spool / "new" / names[0]).stat().st_mtime
            doc["spool"]["archive_lag_seconds"] = round(time.time() - oldest, 1)
        except FileNotFoundError:
            pass
    if cfg.archive is not None:
        doc["shards"] = _shards(cfg.archive.directory)
        doc["tenants"] = _tenants(doc["shards"], [t.name for t in cfg.tenant])
    doc["audit"] = _audit_status(cfg, published if doc["daemon"] == "running" else None)
    return doc


def _audit_status(cfg, published: dict | None) -> dict:
    """The audit trail's last seal (its head file: a removed tail shows
    against it) and, from a running daemon, its last seq and unsealed count."""
    d = cfg.audit.directory
    out: dict = {"directory": str(d), "last_seal": None}
    try:
        head = json.loads((d / "head").read_text())
        out["last_seal"], out["last_seal_hash"] = head.get("seal_seq"), head.get("seal_hash")
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        out["head_error"] = f"{d / 'head'}: {getattr(e, 'strerror', None) or e}"
    if published is not None and published.get("audit"):
        out["daemon"] = published["audit"]
    return out


def _published(cfg) -> dict | None:
    """The daemon's status document: from its API when it answers there
    (fresh), else the status.json it last wrote."""
    from mailtresor.cli import client
    try:
        with client.Client(cfg.appliance.runtime_directory) as c:
            doc = c.json("GET", "/api/v1/status")
        if isinstance(doc, dict) and "pid" in doc and "time" in doc:
            return doc
    except (client.DaemonUnavailable, client.ApiError, ValueError):
        pass
    path = cfg.appliance.runtime_directory / "status.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable status file: {e}")


def _count(d: Path) -> int:
    return sum(1 for n in _list(d) if not n.startswith("."))


def _list(d: Path) -> list[str]:
    try:
        return os.listdir(d)
    except FileNotFoundError:
        return []


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _shards(root: Path) -> list[dict]:
    from mailtresor.archive.store import Store
    store = Store(root, readonly=True)
    try:
        return shard_figures(store)
    finally:
        store.close()


def shard_figures(store) -> list[dict]:
    """Per shard of an open Store: records, chain head, index and backup
    lag, records not sealed yet (also the daemon's /api/v1/status, over
    the archiver's own Store)."""
    from mailtresor.archive import index
    out = []
    for t in store.tenants():
        for m in store.months(t):
            sh = store.shard(t, m)
            head = sh.head()[0]
            seal = sh.last_seal()
            out.append({"shard": f"{t}/{m}", "records": sh.count(), "chain": head,
                        "index_lag": max(0, head - index.indexed_seq(sh.index_dir)),
                        "backup_lag": max(0, head - sh.backup_seq()),
                        "unsealed": head - (seal.seq if seal else 0)})
    return out


def _tenants(shards: list[dict], configured: list[str]) -> dict:
    """Per tenant: records, shards, and the lags summed over its shards."""
    out = {t: {"records": 0, "shards": 0, "index_lag": 0, "backup_lag": 0, "unsealed": 0} for t in configured}
    for sh in shards:
        t = out.setdefault(sh["shard"].split("/", 1)[0],
                           {"records": 0, "shards": 0, "index_lag": 0, "backup_lag": 0, "unsealed": 0})
        t["shards"] += 1
        for k in ("records", "index_lag", "backup_lag", "unsealed"):
            t[k] += sh[k]
    return out


# --- words ----------------------------------------------------------------------------------

LABEL = 10          # width of the label column, as `systemctl status` aligns its own


def render(doc: dict) -> str:
    """The status document as aligned lines for a person."""
    out: list[str] = []

    def line(label: str, text: str = "") -> None:
        out.append(f"{label + ':' if label else '':>{LABEL}} {text}".rstrip())

    running = doc["daemon"] == "running"
    if running:
        ready = "ready" if doc.get("state") == "running" else f"not ready ({doc.get('state')})"
        line("Daemon", f"running (pid {doc.get('pid')}), {ready}")
    else:
        line("Daemon", "not running" + (f" (last state: {doc['state']})" if doc.get("state") else ""))
    if doc.get("status"):
        line("Status", f"{doc['status']} (published {_ago(doc.get('status_age_seconds'))})")
    if running:
        for i, lst in enumerate(doc.get("listeners") or []):
            line("Relay" if i == 0 else "", lst)
        if doc.get("milter"):
            line("Milter", doc["milter"])
        if doc.get("api"):
            line("API", _api(doc["api"]))
        line("Keys", _keys(doc.get("keys") or []))
    if doc.get("audit"):
        line("Audit", _audit(doc["audit"]))
    _spool(doc["spool"], line)
    ar = doc.get("archiver") if running else None
    if ar:
        _archiver(ar, line)
    rb = doc.get("backup_remote") if running else None
    if rb:
        lag = rb.get("lag") or {}
        line("Remote", f"{rb['remote']}: last push {minute(rb['last_push']) if rb.get('last_push') else 'never'}"
             + (f", lag {lag.get('frames', 0)} frame(s) / {lag.get('bytes', 0)} bytes" if lag else "")
             + (f"; FAILING: {rb['last_error']}" if rb.get("last_error") else ""))
    if doc.get("tenants") is not None:
        _tenants_lines(doc["tenants"], line)
    shards = doc.get("shards") or []
    width = max((len(sh["shard"]) for sh in shards), default=0)
    for i, sh in enumerate(shards):
        line("Shards" if i == 0 else "",
             f"{sh['shard']:<{width}}  {plural(sh['records'], 'record')}, chain at {sh['chain']}, "
             f"index lag {sh['index_lag']}, backup lag {sh['backup_lag']}, {sh['unsealed']} unsealed")
    return "\n".join(out) + "\n"


def _ago(seconds) -> str:
    if seconds is None:
        return "at an unknown time"
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.1f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _api(api) -> str:
    if not isinstance(api, dict):
        return str(api)
    text = f"{api.get('listen')} and {api.get('socket')}"
    if not api.get("listening"):
        text += " (not listening: see the log)"
    if api.get("logins") is False:
        text += "; no logins (the user database is not open: see the log)"
    return text


def _audit(au: dict) -> str:
    live = au.get("daemon") or {}
    if live.get("error"):
        text = f"not written by the daemon: {live['error']}; "
    elif "seq" in live:
        text = f"up to seq {live['seq']}, {live['unsealed']} unsealed; "
    else:
        text = ""
    text += f"last seal at seq {au['last_seal']}" if au.get("last_seal") else "no seal yet"
    text += f" ({au['directory']})"
    if au.get("head_error"):
        text += f"; {au['head_error']}"
    if live.get("seal_problem"):
        text += f"; sealing fails: {live['seal_problem']}"
    return text


def _keys(keys: list) -> str:
    """Names and versions of the keys held (never material), current first."""
    if not keys:
        return "none held (the daemon accepts no mail until it has the spool key)"
    parts = []
    for k in keys:
        if not isinstance(k, dict):
            parts.append(str(k))
            continue
        text = f"{k.get('name')} v{k.get('version')}"
        if not k.get("current", True):
            text += " (previous)"
        parts.append(text)
    return ", ".join(parts)


def _spool(sp: dict, line) -> None:
    line("Spool", f"{sp['ready']} ready, {sp['in_progress']} being written, "
                  f"{sp['set_aside']} set aside, {sp['unrouted']} unrouted")
    if "archive_lag_seconds" in sp:
        line("", f"archive lag {sp['archive_lag_seconds']}s (the oldest message waiting)")
    else:
        line("", "archive lag 0s (nothing waits)")
    line("", sp["directory"])
    if sp["set_aside"]:
        line("", "set aside: `mailtresor requeue --list` says why, `mailtresor requeue --all` puts them back")
    if sp["unrouted"]:
        line("", "unrouted: no tenant claims them; `mailtresor reroute` after adding the tenant")


def _archiver(ar: dict, line) -> None:
    counts = (f"{ar.get('archived', 0)} archived, {ar.get('stored', 0)} stored, "
              f"{ar.get('duplicates', 0)} duplicates, {ar.get('failed', 0)} failed since start")
    line("Archiver", str(ar.get("state", "")))
    line("", counts)
    if ar.get("paused"):
        line("Paused", str(ar["paused"]))
    if ar.get("journal_untrusted"):
        # Someone tried to pass mail off as a journal report (or a
        # journaling connector's tenant id does not match): each is
        # archived as received; flag:journal-untrusted lists them.
        line("", f"{ar['journal_untrusted']} message(s) with an untrusted journal report header "
                 "archived as received (search flag:journal-untrusted)")


def _tenants_lines(tenants: dict, line) -> None:
    width = max((len(t) for t in tenants), default=0)
    for i, (name, t) in enumerate(sorted(tenants.items())):
        lags = [f"index lag {t['index_lag']}"] if t["index_lag"] else []
        lags += [f"backup lag {t['backup_lag']}"] if t["backup_lag"] else []
        line("Tenants" if i == 0 else "",
             f"{name:<{width}}  {plural(t['records'], 'message')} in {plural(t['shards'], 'shard')}"
             + (f" ({', '.join(lags)})" if lags else ""))
