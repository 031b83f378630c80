"""`mailtresor volume init|unlock|lock|status`: the encrypted volumes
([[volume]], mailtresor/volumes/, docs/VOLUMES.md).

init, unlock and lock are root's (they add keys to the kernel, run
cryptsetup and mount); status asks only what any user may ask and works
for anyone.  Keys come from the control endpoint (`volume.NAME`, over the
appliance's mutual TLS) into this process's memory and go to the kernel
or to cryptsetup's stdin, nowhere else.  Each problem is one line naming
the volume; `--all` carries on with the others and exits 1 if any failed.
"""

from __future__ import annotations

import json
import os
import sys
import time


def register(subparsers) -> None:
    s = subparsers.add_parser("volume", help="encrypted volumes: init, unlock, lock, status (root)")
    sub = s.add_subparsers(dest="volume_command", metavar="ACTION")
    sub.required = True

    i = sub.add_parser("init", help="encrypt a volume's empty directories / luksFormat its device (root)",
                       description="Fetch volume.NAME from the control endpoint and encrypt the volume with "
                                   "it: fscrypt directories must be empty and on ext4 with the encrypt "
                                   "feature; a luks device is formatted (its data is lost). Leaves it unlocked.")
    i.add_argument("name", metavar="NAME")
    i.set_defaults(func=run_init)
    for action, text in (("unlock", "fetch the key from the control endpoint and unlock (root)"),
                         ("lock", "remove the key / unmount and close (root); stop mailtresord first")):
        a = sub.add_parser(action, help=text)
        g = a.add_mutually_exclusive_group(required=True)
        g.add_argument("name", metavar="NAME", nargs="?")
        g.add_argument("--all", action="store_true", help="every configured volume")
        if action == "unlock":
            a.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                           help="keep trying this long while the control endpoint is unreachable or "
                                "answers 5xx (mailtresor-unlock.service: 240); a refusal ends at once")
        a.set_defaults(func=run_unlock if action == "unlock" else run_lock)
    st = sub.add_parser("status", help="each volume's state: uninitialised, locked, unlocked, absent, busy",
                        description="Exit 0 when every configured volume is unlocked, 1 otherwise.")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=run_status)


def _need_root(action: str) -> None:
    from mailtresor.cli.common import UserError
    if os.geteuid() != 0:
        raise UserError(f"volume {action} must run as root (it adds keys to the kernel, runs cryptsetup "
                        "and mounts): try sudo")


def _volumes(cfg, name: str | None, every: bool = False) -> list:
    from mailtresor.cli.common import UserError
    if every:
        return list(cfg.volume)
    for v in cfg.volume:
        if v.name == name:
            return [v]
    names = ", ".join(v.name for v in cfg.volume) or "none"
    raise UserError(f"unknown volume {name!r} (configured: {names})")


def _client(cfg):
    from mailtresor.keys.client import ControlClient
    return ControlClient.from_config(cfg)


def _with_key(cfg, client, vcfg, do) -> None:
    """Fetch the volume's key, call do(volume, key), wipe the key.  A
    failure that may pass (no answer, a 5xx) is a VolumeError marked
    `transient`."""
    from mailtresor.keys.ring import ControlUnreachable, KeyRefused, KeyUnavailable
    from mailtresor.volumes import VolumeError, fetch_key, key_name, open_volume, wipe
    volume = open_volume(vcfg)
    try:
        key = fetch_key(client, vcfg.name)
    except KeyUnavailable as e:
        passing = isinstance(e, ControlUnreachable) or (
            isinstance(e, KeyRefused) and e.status is not None and e.status >= 500)
        err = VolumeError(f"volume {vcfg.name}: cannot get its key {key_name(vcfg.name)}: {e}")
        err.transient = passing
        raise err from None
    try:
        do(volume, key)
    finally:
        wipe(key)


def run_init(cfg, args) -> int:
    from mailtresor.cli.common import UserError
    from mailtresor.volumes import VolumeError
    _need_root("init")
    (vcfg,) = _volumes(cfg, args.name)
    try:
        _with_key(cfg, _client(cfg), vcfg, lambda volume, key: volume.init(key))
    except VolumeError as e:
        raise UserError(str(e)) from None
    print(f"volume {vcfg.name}: encrypted with volume.{vcfg.name} and unlocked")
    return 0


def _each(cfg, args, action: str, one) -> int:
    from mailtresor.volumes import VolumeError
    _need_root(action)
    volumes = _volumes(cfg, args.name, args.all)
    if not volumes:
        print(f"no volumes configured ({cfg.source} has no [[volume]]): nothing to {action}")
        return 0
    failed = 0
    for vcfg in volumes:
        try:
            print(one(vcfg))
        except VolumeError as e:
            print(f"mailtresor: {e}", file=sys.stderr)
            failed += 1
    sys.stdout.flush()
    return 1 if failed else 0


def run_unlock(cfg, args) -> int:
    """At boot the control endpoint may come up after the appliance (a
    power cut takes both): with --wait, an unreachable endpoint or a 5xx
    is tried again with backoff (as the daemon waits for its spool key),
    one line on stderr each time; a 403/404 or a wrong key ends at once."""
    from mailtresor.volumes import UNLOCKED, VolumeError, open_volume
    client = _client(cfg)
    wait = getattr(args, "wait", 0.0) or 0.0
    deadline = time.monotonic() + max(0.0, wait)

    def one(vcfg):
        if open_volume(vcfg).status()["state"] == UNLOCKED:
            return f"volume {vcfg.name}: already unlocked"
        delay = 1.0
        while True:
            try:
                _with_key(cfg, client, vcfg, lambda volume, key: volume.unlock(key))
                return f"volume {vcfg.name}: unlocked"
            except VolumeError as e:
                left = deadline - time.monotonic()
                if not getattr(e, "transient", False) or left <= 0:
                    raise
                pause = min(delay, left)
                print(f"mailtresor: {e}; trying again in {pause:.0f} s", file=sys.stderr, flush=True)
                time.sleep(pause)
                delay = min(delay * 2, 15.0)
    return _each(cfg, args, "unlock", one)


def run_lock(cfg, args) -> int:
    from mailtresor.volumes import open_volume

    def one(vcfg):
        open_volume(vcfg).lock()
        return f"volume {vcfg.name}: locked"
    return _each(cfg, args, "lock", one)


def run_status(cfg, args) -> int:
    from mailtresor.volumes import UNLOCKED, open_volume
    rows = [open_volume(v).status() for v in cfg.volume]
    if args.json:
        print(json.dumps({"volumes": rows}, indent=2))
    elif not rows:
        print(f"no volumes configured ({cfg.source} has no [[volume]])")
    else:
        width = max(len(r["name"]) for r in rows)
        for r in rows:
            print(f"{r['name']:<{width}}  {r['kind']:<7}  {r['state']:<13}  {r['detail']}")
    return 0 if all(r["state"] == UNLOCKED for r in rows) else 1
