"""Crashes: whatever got a 250 survives a kill -9, and nothing is torn.

Bounded: a fixed number of kills, senders stop by themselves after a
deadline, every wait has a timeout.
"""

import multiprocessing as mp
import os
import random
import shutil
import signal
import smtplib
import subprocess
import sys
import time

import pytest

from tests.conftest import corpus_files, corpus_message
from tests.harness.postfix import PostfixInstance, free_port, make_workdir
from tests.harness.stack import Stack

KILLS = 12
DEADLINE = 120.0


def _sender(kind, port, ca, k, templates, ack_path, stop_at):
    """Send until stop_at; append "message-id queue-id" for every 250."""
    import ssl
    ctx = ssl.create_default_context(cafile=ca)
    seq = 0
    rng = random.Random(k)
    with open(ack_path, "a") as acks:
        while time.time() < stop_at:
            try:
                s = smtplib.SMTP("127.0.0.1", port, timeout=10)
                s.ehlo("crash.test")
                if kind == "relay":
                    s.starttls(context=ctx)
                    s.ehlo("crash.test")
                for _ in range(rng.randint(1, 20)):
                    if time.time() >= stop_at:
                        break
                    seq += 1
                    mid = f"<crash-{kind}-{k}-{seq}@test>"
                    body = f"Message-ID: {mid}\r\n".encode() + templates[seq % len(templates)]
                    s.mail("load@globex.example")
                    s.rcpt(f"r{seq % 3}@acme.example")
                    code, text = s.data(body)
                    if code == 250:
                        acks.write(f"{mid} {text.decode().rsplit(' ', 1)[1]}\n")
                        acks.flush()
                s.quit()
            except (OSError, smtplib.SMTPException):
                time.sleep(0.05)


@pytest.mark.slow
def test_kill_9_under_load_loses_nothing_acknowledged():
    workdir = make_workdir("mt-crash-")
    st = Stack(workdir / "stack", {"milter": {"socket_mode": 0o666, "timeout": 30}})
    pf = PostfixInstance(workdir / "postfix", free_port(), smtpd_milters=f"unix:{st.milter_socket}",
                         milter_default_action="tempfail", extra_main_cf={"message_drop_headers": ""})
    templates = [corpus_message(p) for p in corpus_files()[::300]]
    procs = []
    try:
        st.start()
        pf.start()
        stop_at = time.time() + DEADLINE
        ca = str(st.pki / "ca.pem")
        plan = [("relay", st.smtp_port)] * 6 + [("milter", pf.smtpd_port)] * 2
        for k, (kind, port) in enumerate(plan):
            p = mp.Process(target=_sender, args=(kind, port, ca, k, templates,
                                                 str(workdir / f"acks-{k}"), stop_at))
            p.start()
            procs.append(p)
        rng = random.Random(1234)
        kills = 0
        while kills < KILLS and time.time() < stop_at - 10:
            time.sleep(rng.uniform(0.3, 2.0))
            st.kill_daemon()
            kills += 1
            st.start_daemon()        # waits for READY=1
        for p in procs:
            p.join(DEADLINE + 30)
            assert not p.is_alive()
        assert kills == KILLS
        time.sleep(2)                 # Postfix's last milter transactions
        assert st.stop_daemon() == 0

        acks = {}
        for k, (kind, _) in enumerate(plan):
            path = workdir / f"acks-{k}"
            for line in path.read_text().splitlines() if path.exists() else []:
                mid, qid = line.split()
                acks[mid] = (kind, qid)
        relay_acks = {m: q for m, (kind, q) in acks.items() if kind == "relay"}
        milter_acks = {m: q for m, (kind, q) in acks.items() if kind == "milter"}
        assert len(relay_acks) > 200 and len(milter_acks) > 20, (len(relay_acks), len(milter_acks))

        spool = st.open_spool()
        ids = spool.ready()
        entries = {i: spool.read(i) for i in ids}   # raises on any torn or tampered entry
        spool.close()
        assert os.listdir(st.spool_dir / "tmp") == []   # cleaned at restarts and shutdown
        by_id = {i: e for i, e in entries.items()}
        # Postfix's short queue ids are reused over time (they derive from
        # inode numbers), so one id may name several entries.
        by_postfix_qid = {}
        for e in entries.values():
            if e.envelope.source == "milter":
                by_postfix_qid.setdefault(e.envelope.queue_id, []).append(e)
        lost = []
        for mid, qid in relay_acks.items():
            e = by_id.get(qid)
            if e is None or f"Message-ID: {mid}".encode() not in e.data:
                lost.append(("relay", mid, qid))
        for mid, qid in milter_acks.items():
            if not any(f"Message-ID: {mid}".encode() in e.data for e in by_postfix_qid.get(qid, [])):
                lost.append(("milter", mid, qid))
        assert lost == [], f"{len(lost)} acknowledged messages missing, e.g. {lost[:5]}"
        print(f"\n{kills} kills; {len(relay_acks)} relay + {len(milter_acks)} milter messages acknowledged, "
              f"all present; spool holds {len(entries)} entries")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        pf.stop()
        st.close()
        if not os.environ.get("MT_KEEP"):
            shutil.rmtree(workdir, ignore_errors=True)


def test_relay_workers_are_supervised(stack):
    """A dead worker is started again; workers never outlive the main
    process (a kill -9 of the main one closes their key pipe)."""
    stack.start()
    deadline = time.monotonic() + 10
    while len(stack.daemon_processes()) < 2:
        assert time.monotonic() < deadline, "no relay worker started"
        time.sleep(0.1)
    main = stack.daemon.pid
    workers = [p for p in stack.daemon_processes() if p != main]
    os.kill(workers[0], signal.SIGKILL)
    deadline = time.monotonic() + 15
    while workers[0] in stack.daemon_processes() or len(stack.daemon_processes()) < len(workers) + 1:
        assert time.monotonic() < deadline, stack.log()[-2000:]
        time.sleep(0.1)
    assert "died (signal 9); starting it again" in stack.log()
    with stack.smtp() as s:
        s.sendmail("a@globex.example", ["b@acme.example"], b"Subject: after\r\n\r\nx\r\n")
    os.kill(main, signal.SIGKILL)
    stack.daemon.wait()
    deadline = time.monotonic() + 15
    while _live_in_session(main):
        assert time.monotonic() < deadline, f"orphaned workers: {_live_in_session(main)}"
        time.sleep(0.1)
    stack.daemon = None


def _live_in_session(sid):
    live = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            if os.getsid(int(d)) == sid and open(f"/proc/{d}/stat").read().split()[2] != "Z":
                live.append(int(d))
        except OSError:
            pass
    return live


@pytest.mark.slow
def test_kill_9_during_archiving_keeps_every_message_exactly_once(tmp_path):
    """Spool a few hundred corpus messages (each for two tenants), then kill
    the daemon at random points while it archives them, KILLS times; in the
    end the spool is empty and each tenant's store holds every acknowledged
    message once, with exactly the envelopes it was acknowledged with, and
    `verify` is clean (chains, seals, index)."""
    st = Stack(tmp_path / "stack", {"archive": {"enabled": True, "batch_size": 16, "seal_interval": 0.5}})
    raws = [corpus_message(p) for p in corpus_files()[::8]]
    acked: dict[str, bytes] = {}
    try:
        st.start()
        st.stop_daemon()                     # spool first, archive under the kills
        st.reconfigure({"archive": {"enabled": False}})
        st.start_daemon()
        with st.smtp() as s:
            for raw in raws:
                s.mail("load@globex.example")
                s.rcpt("r@acme.example")
                code, text = s.data(raw)
                assert code == 250
                acked[text.decode().rsplit(" ", 1)[1]] = raw
        st.stop_daemon()
        st.reconfigure({"archive": {"enabled": True}})
        rng = random.Random(99)
        kills = 0
        st.start_daemon()
        while kills < KILLS and any((st.spool_dir / "new").iterdir()):
            time.sleep(rng.uniform(0.05, 1.0))
            st.kill_daemon()
            kills += 1
            st.start_daemon()
        deadline = time.monotonic() + 300
        while any((st.spool_dir / "new").iterdir()):
            assert time.monotonic() < deadline, "archiver did not drain the spool"
            time.sleep(0.2)
        assert st.stop_daemon() == 0
        assert kills >= KILLS // 2, f"only {kills} kills before the spool drained"

        from mailtresor.assemble import build_keys, build_store
        keys = build_keys(st.cfg)
        store = build_store(st.cfg, readonly=True)
        try:
            for tenant in ("acme", "globex"):
                want: dict[str, set] = {}
                for qid, raw in acked.items():
                    want.setdefault(keys.archive_id(tenant, raw), set()).add(qid)
                have = {aid: m for m in store.months(tenant) for aid in store.shard(tenant, m).ids()}
                assert sorted(have) == sorted(want), tenant          # none lost, none extra
                for aid, month in have.items():
                    raw, meta = store.shard(tenant, month).get(aid, keys)
                    assert set(meta["envelopes"]) == want[aid]        # each envelope once
                    assert raw in acked.values()
        finally:
            store.close()
        p = subprocess.run([sys.executable, "-m", "mailtresor", "--config", str(st.config_path), "verify"],
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
        print(f"\n{kills} kills while archiving {len(acked)} messages for 2 tenants: all there once")
    finally:
        st.close()
