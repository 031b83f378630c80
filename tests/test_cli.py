"""The `mailtresor` command line, run as a user runs it: a subprocess."""

import json
import subprocess
import sys

from tests.conftest import REPO


def mailtresor(stack, *args, check=None):
    p = subprocess.run([sys.executable, "-m", "mailtresor", "--config", str(stack.config_path), *args],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    if check is not None:
        assert p.returncode == check, (p.returncode, p.stdout, p.stderr)
    return p


def test_status_of_a_running_daemon(running):
    with running.smtp() as s:
        s.sendmail("a@globex.example", ["b@acme.example"], b"Subject: x\r\n\r\nbody\r\n")
    doc = json.loads(mailtresor(running, "status", "--json", check=0).stdout)
    assert doc["daemon"] == "running" and doc["state"] == "running"
    assert doc["spool"]["ready"] == 1 and doc["spool"]["set_aside"] == 0
    assert "spool" in json.dumps(doc["keys"])
    text = mailtresor(running, "status", check=0).stdout
    assert f"Daemon: running (pid {running.daemon.pid}), ready" in text and "Spool: 1 ready" in text
    # Keys in words: names and versions, no Python reprs, no material.
    (keys,) = [ln for ln in text.splitlines() if ln.lstrip().startswith("Keys:")]
    assert keys.split(":", 1)[1].strip() == "spool v1", text
    assert "{'" not in text and "[{" not in text and "'name'" not in text, text


def _core_limit(pid: int) -> str:
    with open(f"/proc/{pid}/limits") as f:
        (line,) = [x for x in f if x.startswith("Max core file size")]
    return " ".join(line.split()[4:6])


def test_no_process_that_holds_keys_can_dump_core(running):
    """Started by hand (no unit's LimitCORE=0), the daemon, its relay
    workers and the control endpoint still set their core limit to 0."""
    import os
    pids = [running.daemon.pid, running.control.pid]
    workers = [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == running.daemon.pid]
    assert workers, "relay workers expected"
    for pid in pids + workers:
        assert _core_limit(pid) == "0 0", pid


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return -1


def test_status_when_stopped_exits_3(stack):
    p = mailtresor(stack, "status", check=3)
    assert "not running" in p.stdout


def test_bad_config_is_named_without_traceback(tmp_path):
    bad = tmp_path / "m.toml"
    bad.write_text("[appliance]\nname = 3\n")
    p = subprocess.run([sys.executable, "-m", "mailtresor", "--config", str(bad), "status"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert str(bad) in p.stderr and "Traceback" not in p.stderr
