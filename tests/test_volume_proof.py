"""The proof of issue 16's encrypted volumes: a stolen disk is useless.

The corpus goes in through the relay (half, tenant acme) and Postfix with
the milter (the other half, tenant globex) into a real daemon whose spool,
store (LMDB + Xapian index), backup and state (access, audit) directories
are fscrypt directories of one volume on one loop-mounted ext4 image.
Then: daemon stopped, volume locked, image unmounted, and the image's raw
bytes searched for a fair sample of each message's distinctive strings
(subject word, body word, sender address, attachment file names; >= 6
characters, case-insensitive): none is there.

The control, same run: the same files, read through the unlocked volume,
are copied into a plain directory on a second image of the same kind, and
the same search of that raw image finds most of the same strings (the
Xapian index holds them in the clear).  A search that could not find
them would prove nothing, so the control's counts are asserted too.

Then the image is mounted and unlocked again, the daemon starts, a search
finds messages of both halves and `mailtresor verify` passes.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mailtresor.archive.parse import parse_message
from tests.conftest import REPO, corpus_files, corpus_message
from tests.harness.loopfs import loop_available, loop_ext4
from tests.test_corpus import _send_all

VENV_BIN = Path(sys.executable).parent
WORD = re.compile(r"[A-Za-z]{6,24}")
# Words on the image for reasons other than a message: ours, and the file
# system's.  (None is a corpus probe by accident only if it is one of these.)
EXCLUDE = {"archive", "example", "lost+found"}


def probes(messages: list[bytes]) -> dict[str, set[str]]:
    """Per category, distinctive strings of the messages (lower case, >= 6
    characters): each message's longest subject word, its longest body word
    of the first 4,000 characters, its sender's address and its attachment
    file names.  Every message counts: no picking of what the control found."""
    cats = {"subject": set(), "body": set(), "address": set(), "attachment": set()}
    for m in messages:
        p = parse_message(m)
        words = WORD.findall(p.subject)
        if words:
            cats["subject"].add(max(words, key=len).lower())
        words = [w for w in WORD.findall(p.body_text[:4000]) if len(w) >= 8]
        if words:
            cats["body"].add(max(words, key=len).lower())
        for a in p.from_[:1]:
            if len(a) >= 6 and "@" in a:
                cats["address"].add(a.lower())
        for att in p.attachments:
            if att.filename and len(att.filename) >= 6:
                cats["attachment"].add(att.filename.lower())
    return {k: {s for s in v if s not in EXCLUDE} for k, v in cats.items()}


def found_in(image: Path, strings: set[str], work: Path) -> set[str]:
    """Which of `strings` occur in the image's raw bytes (case-insensitive),
    by GNU grep's multi-string search (the image is mostly zeros: -z cuts
    it into short records)."""
    pats = work / "patterns"
    pats.write_bytes(b"\n".join(s.encode() for s in sorted(strings)) + b"\n")
    # LC_ALL=C: a byte search (in a UTF-8 locale, -i over binary data is
    # a hundred times slower).
    r = subprocess.run(["grep", "-a", "-z", "-o", "-i", "-F", "-f", str(pats), str(image)],
                       capture_output=True, timeout=300, env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"})
    assert r.returncode in (0, 1), r.stderr
    pats.unlink()
    hits = {h.decode("utf-8", "replace").lower() for h in r.stdout.split(b"\0") if h}
    return {s for s in strings if s in hits}


def test_stolen_image_of_a_locked_volume_reveals_no_corpus_string(tmp_path):
    reason = loop_available()
    if reason:
        pytest.skip(reason)
    from tests.test_milter import MilterRig

    t0 = time.monotonic()

    def mark(what):
        print(f"[{time.monotonic() - t0:6.1f} s] {what}", flush=True)

    messages = [corpus_message(p) for p in corpus_files()]
    relay_half, milter_half = messages[0::2], messages[1::2]
    sample = probes(messages)
    every = set().union(*sample.values())
    mark("probes")

    with loop_ext4(tmp_path / "appliance.img", tmp_path / "mnt", size_mib=512) as disk:
        m = disk.mountpoint
        vdirs = [m / "v1", m / "v2", m / "v3", m / "v4"]
        for d in vdirs:
            d.mkdir()
        rig = MilterRig({"spool": {"directory": str(vdirs[0] / "spool")},
                         "archive": {"directory": str(vdirs[1] / "store"), "enabled": True,
                                     "backup_directory": str(vdirs[2] / "backup")},
                         "appliance": {"state_directory": str(vdirs[3] / "state")}}, start_control=False)
        st = rig.stack
        try:
            st.reconfigure({"volume": [{"name": "data", "directories": [str(d) for d in vdirs]}]})
            assert all(not any(d.iterdir()) for d in vdirs)
            st.start_control()

            def cli(*args, check=True):
                r = subprocess.run([str(VENV_BIN / "mailtresor"), "--config", str(st.config_path), *args],
                                   capture_output=True, cwd=REPO, timeout=300)
                assert not check or r.returncode == 0, r.stderr
                return r

            r = subprocess.run([str(VENV_BIN / "mailtresor-control"), "--config", str(st.config_path), "keys",
                                "create", "t1", "volume.data"], capture_output=True, timeout=60)
            assert r.returncode == 0, r.stderr
            cli("volume", "init", "data")
            st.start_daemon()
            mark('daemon started')

            assert len(_send_all(st.smtp, relay_half, "archive@acme.example", "sender@example.net")) \
                == len(relay_half)
            assert len(_send_all(rig.smtp, milter_half, "archive@globex.example", "sender@example.net")) \
                == len(milter_half)
            deadline = time.monotonic() + 300
            while any((st.spool_dir / "new").iterdir()):
                assert time.monotonic() < deadline, "the archiver did not drain the spool"
                time.sleep(0.5)
            st.stop_daemon()
            mark('drained')

            # The control: the same files, in the clear, on an image of the same kind.
            with loop_ext4(tmp_path / "plain.img", tmp_path / "plain", size_mib=512) as plain:
                for d in vdirs:
                    shutil.copytree(d, plain.mountpoint / "copy" / d.name, symlinks=True)
                plain.umount()
                seen = found_in(plain.image, every, tmp_path)
                control = {k: v & seen for k, v in sample.items()}
            (tmp_path / "plain.img").unlink()
            mark('control searched')

            counts = {k: (len(control[k]), len(sample[k])) for k in sample}
            print(f"control, found in the plain image / sampled: {counts}")
            # Most of each category is on a plain disk, in the clear.
            for k, least in (("subject", 0.5), ("body", 0.5), ("address", 0.8), ("attachment", 0.3)):
                assert len(control[k]) >= least * len(sample[k]) and len(control[k]) >= 20, (k, counts)

            # Lock, unmount: the raw image holds none of them.
            cli("volume", "lock", "data")
            assert json.loads(cli("volume", "status", "--json", check=False).stdout)["volumes"][0]["state"] \
                == "locked"
            disk.umount()
            leaked = found_in(disk.image, every, tmp_path)
            mark('locked image searched')

            assert leaked == set(), sorted(leaked)[:20]

            # Back: mount, unlock, start; search finds both halves; verify passes.
            disk.mount()
            cli("volume", "unlock", "--all")
            st.start_daemon()
            for tenant, half in (("acme", relay_half), ("globex", milter_half)):
                hits = 0
                for raw in half[:200:20]:
                    p = parse_message(raw)
                    if not p.from_:
                        continue
                    r = cli("search", "--json", "--tenant", tenant, f"from:{p.from_[0]}")
                    hits += bool(json.loads(r.stdout)["results"])
                assert hits >= 8, (tenant, hits)
            st.stop_daemon()
            mark('searched again')
            r = cli("verify", check=False)
            assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
            cli("volume", "lock", "--all")
            mark('verified')
        finally:
            rig.close()
