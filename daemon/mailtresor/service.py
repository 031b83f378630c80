"""mailtresord: wiring, systemd integration, lifecycle.

Start: recover the spool, listen (the relay answers 421 4.3.0 and the milter
tempfails until the spool key is held), fetch the spool key from the control
endpoint with backoff, then READY=1.  SIGTERM: STOPPING=1, stop listening,
idle sessions get 421 4.3.2, sessions inside a transaction finish it (up to
service.shutdown_timeout), the spool committer drains, exit 0.

This is the only module that touches the global reactor.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time

from mailtresor import assemble
from mailtresor import config as configmod
from mailtresor.system import notify, setup_logging

log = logging.getLogger("mailtresor")

# A systemd:name= endpoint without its socket (sd_listen_fds(3)): LSB's 6,
# "not configured", which systemctl status shows as NOTCONFIGURED; 1 is any
# other failure to start, 2 a configuration that does not load.
EXIT_ACTIVATION = 6


class _WorkerProcess:
    """A relay worker as the main process sees it (a Twisted ProcessProtocol)."""

    def __init__(self, daemon: "Daemon", index: int):
        from twisted.internet.protocol import ProcessProtocol

        self.daemon, self.index = daemon, index
        self.transport = None
        self.ended = None
        self.started_at = 0.0
        self.delay = 0.0          # before the next restart; grows while it keeps dying
        outer = self

        class Proto(ProcessProtocol):
            def connectionMade(self):
                outer.transport = self.transport

            def processEnded(self, reason):
                outer.transport = None
                outer.daemon._worker_ended(outer, reason.value.exitCode, reason.value.signal)

        self.protocol = Proto()

    def send_key(self, material) -> None:
        if self.transport is not None:
            import base64
            line = json.dumps({"name": material.name, "version": material.version,
                               "key": base64.b64encode(material.key).decode()})
            self.transport.writeToChild(0, line.encode() + b"\n")

    def drop_key(self, name: str) -> None:
        if self.transport is not None:
            self.transport.writeToChild(0, json.dumps({"drop": name}).encode() + b"\n")

    def signal(self, sig: str) -> None:
        if self.transport is not None:
            try:
                self.transport.signalProcess(sig)
            except Exception:  # noqa: BLE001 - already gone
                pass


class Daemon:
    """The main process, or (worker > 0) one of its relay workers.

    Workers accept relay connections on the listening sockets the main
    process bound (and passed down as file descriptors), write to the same
    spool, and get the spool key over their stdin; they fetch nothing, run no
    milter and speak no sd_notify.  A worker stops on SIGTERM, or when its
    stdin closes because the main process is gone.
    """

    def __init__(self, cfg: configmod.Config, reactor, *, worker: int = 0, listen_fds: list[int] = (),
                 sockets: dict | None = None):
        from mailtresor.keys.ring import KeyFetcher

        self.cfg = cfg
        self.reactor = reactor
        self.worker = worker
        self.listen_fds = list(listen_fds)
        # Sockets systemd passed, by setting (mailtresor.activation.resolve).
        self.sockets = dict(sockets or {})
        self.ring = assemble.build_ring()
        self.spool = assemble.build_spool(cfg, self.ring)
        self.processes = cfg.relay.processes or (os.cpu_count() or 1) + 1
        if not cfg.relay.listener:
            self.processes = 1
        self.fetcher = None
        self.trail = self.audit_error = None
        self.archiver = None
        self.remote_backup = None
        if not worker:
            # One client to the control endpoint for the whole process: the
            # spool key's fetcher uses its Deferred face, the archiver's
            # thread its blocking one.
            self.control = assemble.build_control_client(cfg, reactor=reactor)
            self.control.context()          # the appliance's TLS files: fail now, not at the first fetch
            self._open_trail()
            c = cfg.control
            self.fetcher = KeyFetcher(reactor, self.control, self.ring, retry_initial=c.retry_initial,
                                      retry_max=c.retry_max, refresh_interval=c.refresh_interval,
                                      on_status=self.set_status, on_key=self._key_to_workers,
                                      on_revoke=self._key_revoked, on_fetch=self._key_fetched)
            if cfg.archive is not None and cfg.archive.enabled:
                from mailtresor.archive.archiver import Archiver
                keys = assemble.build_keys(cfg, ring=self.ring, client=self.control)
                if self.trail is not None:
                    keys.fetch = self.trail.audited_fetch(keys.fetch)
                pipeline = assemble.build_pipeline(cfg, self.spool, assemble.build_store(cfg), keys)
                self.archiver = Archiver(cfg, reactor, pipeline)
                if self.trail is not None:
                    pipeline.on_anomaly = self.trail.anomaly
                    # One FetchingKeys in the daemon: the archiver's expiry of
                    # tenant keys (forget()) covers what the trail derived too.
                    self.trail.log.keys = keys
                # A pause (full disk, missing key) and its end are in status.json at once.
                self.archiver.on_change = self.write_status
                if cfg.backup.remote:
                    # The backup directory mirrored to the SFTP target, on a pool thread.
                    from mailtresor.archive.store.remote import Scheduler, from_config
                    self.remote_backup = Scheduler(reactor, from_config(cfg), cfg.backup.interval,
                                                   cfg.backup.retry_initial, first=min(5.0, cfg.backup.interval),
                                                   on_change=self.write_status)
        self.api = None
        if not worker and cfg.api.enabled:
            from mailtresor.access.api import ApiServer
            self.api = ApiServer(cfg, reactor, self)
        # Search across appliances (docs/SCALING.md): the peers' shards join the core's searches.
        self.federation = None
        if not worker and cfg.federation.peer:
            from mailtresor.federation import Federation
            self.federation = Federation(cfg, reactor)
            if self.api is not None and self.api.api.core is not None:
                self.api.api.core.federation = self.federation
        self.factories = []
        self.ports = []
        self.workers: list[_WorkerProcess] = []
        self.milter = None
        self.milter_ports = []          # an activated milter socket, forwarded to libmilter's
        self.state = "starting"
        self.status = "starting"
        self.listening = False
        self.have_key = False
        self._revoked: set[str] = set()
        self.exit_code = 0
        self._stopping = None
        self._status_loop = None
        self._timer = None
        self._stop_requested = False
        self._workers_done = None
        self._status_file = cfg.appliance.runtime_directory / "status.json"

    # --- the audit trail: the daemon's own records (access/audit.py) ---

    def _open_trail(self) -> None:
        """Open the trail before any key is fetched: opening needs no key
        (it checks the tail; records of key fetches and anomalies hold no
        secret); sealing waits for the seal key, fetched when the first
        seal is due.  A trail that cannot be opened is said in the status
        and the log; mail is still taken and archived."""
        from mailtresor.access.audit import AuditError, DaemonTrail
        from mailtresor.keys.derive import FetchingKeys
        try:
            keys = FetchingKeys(self.ring, None)
            trail = DaemonTrail(assemble.build_audit(self.cfg, keys))
            keys.fetch = trail.audited_fetch(self.control.fetch_blocking)
            self.trail = trail
        except (AuditError, OSError) as e:
            self.audit_error = str(e)
            log.error("audit trail %s unusable: %s", self.cfg.audit.directory, e)

    def _key_fetched(self, name: str, version, error) -> None:
        if self.trail is not None:
            self.reactor.callInThread(self.trail.key_fetch, name, version, error)

    def _seal_trail(self) -> None:
        if self.trail is not None:
            self.reactor.callInThread(self.trail.log.seal)

    # --- status ---

    def set_status(self, text: str) -> None:
        self.status = text
        if not self.worker:
            notify(f"STATUS={text}")
            self.write_status()

    def status_doc(self) -> dict:
        """What status.json holds (and the API's /api/v1/status answers)."""
        return {"pid": os.getpid(), "state": self.state, "status": self.status, "time": time.time(),
                "spool_depth": self.spool.depth(), "spool_commits": self.spool.commits,
                "spool_flush_batches": self.spool.batches, "keys": self.ring.summary(),
                "relay_processes": 1 + sum(1 for w in self.workers if w.transport is not None),
                "listeners": [f"{lst.endpoint} ({lst.tls})" for lst in self.cfg.relay.listener],
                "milter": self.cfg.milter.listen if self.cfg.milter and self.cfg.milter.enabled else None,
                "archive": self.archiver.status() if self.archiver is not None else None,
                "audit": (self.trail.log.status() if self.trail is not None
                          else {"error": self.audit_error} if self.audit_error else None),
                "api": self.api.status() if self.api is not None else None,
                "backup_remote": self.remote_backup.status() if self.remote_backup is not None else None}

    def health(self) -> tuple[bool, str]:
        """/healthz: ready when the spool key is held and the spool takes mail."""
        from mailtresor.ingest.spool import SpoolError
        if self.state != "running":
            return False, f"not ready: {self.status}"
        try:
            self.spool.admit(0)
        except SpoolError as e:
            return False, f"the spool takes no mail: {e}"
        if not os.access(self.cfg.spool.directory, os.W_OK):
            return False, f"the spool {self.cfg.spool.directory} is not writable"
        return True, "ok"

    def metrics_facts(self) -> dict:
        """The numbers /metrics shows (see mailtresor.access.metrics)."""
        from mailtresor.access.metrics import spool_id_time
        now = time.time()
        depth = self.spool.depth()
        facts = {"spool_depth": depth, "accepted": self.spool.commits, "keys": self.ring.summary(),
                 "ready": 1 if self.health()[0] else 0, "archive_lag": 0.0, "index_lag": 0.0}
        if depth:
            oldest = self.spool.ready(limit=1)
            if oldest:
                facts["archive_lag"] = max(0.0, now - spool_id_time(oldest[0]))
        if self.archiver is not None:
            st = self.archiver.status()
            facts.update({k: st[k] for k in ("archived", "failed", "set_aside", "duplicates")})
            if depth and st.get("last_batch"):
                facts["index_lag"] = max(0.0, now - st["last_batch"])
        if self.remote_backup is not None:
            rb = self.remote_backup.status()
            lag = rb.get("lag") or {}
            facts.update({"backup_remote_lag_frames": lag.get("frames"), "backup_remote_lag_bytes": lag.get("bytes"),
                          "backup_remote_last_push": rb.get("last_push"),
                          "backup_remote_failing": 1 if rb.get("last_error") else 0})
        return facts

    def write_status(self) -> None:
        doc = self.status_doc()
        try:
            if not self._status_file.parent.is_dir():
                self._status_file.parent.mkdir(parents=True, exist_ok=True)
                os.chmod(self._status_file.parent, 0o750)
            tmp = self._status_file.with_name(".status.json.tmp")
            # 0640 as under the unit's UMask=0027 (the daemon runs with umask
            # 077 for its data): `mailtresor status` by the mailtresor group.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
            try:
                os.fchmod(fd, 0o640)
                data = memoryview(json.dumps(doc, indent=1).encode())
                while data:
                    data = data[os.write(fd, data):]
            finally:
                os.close(fd)
            os.replace(tmp, self._status_file)
        except OSError as e:
            log.debug("cannot write %s: %s", self._status_file, e)

    # --- start ---

    def _relay_factories(self):
        from mailtresor.ingest.relay import ClientCounts, Gate, ImplicitTLSFactory, RelayFactory, ServerTLS

        cfg = self.cfg
        t = cfg.tls
        r = cfg.relay
        tls = ServerTLS(t.cert_file, t.key_file, t.client_ca_file, t.min_version)
        gate = Gate(cfg.relay.connector)
        clients = ClientCounts()    # per process, over all its listeners
        for lst in cfg.relay.listener:
            implicit = lst.tls == "implicit"
            f = RelayFactory(sink=self.spool, gate=gate, tls=tls, hostname=cfg.appliance.hostname,
                             max_size=cfg.spool.max_message_size, max_recipients=cfg.relay.max_recipients,
                             max_connections=max(1, cfg.relay.max_connections // self.processes),
                             max_connections_per_client=r.max_connections_per_client,
                             handshake_timeout=r.handshake_timeout, session_timeout=r.session_timeout,
                             min_data_rate=r.min_data_rate, data_rate_window=r.data_rate_window,
                             bare_newline=r.bare_newline, clients=clients,
                             timeout=cfg.relay.timeout, implicit_tls=implicit,
                             listener_name=lst.name or lst.endpoint, clock=self.reactor,
                             call_from_thread=self.reactor.callFromThread,
                             log_name=f"mailtresor.ingest.relay.w{self.worker}" if self.worker else "mailtresor.ingest.relay")
            self.factories.append(f)
            yield lst, (ImplicitTLSFactory(tls, f) if implicit else f)

    def start(self):
        from twisted.internet import defer, endpoints, task

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self.reactor.callFromThread(self.request_stop))
        self.reactor.addSystemEventTrigger("before", "shutdown", self.stop)
        if self.worker:
            return self._start_worker()
        removed = self.spool.recover()
        if removed:
            log.info("spool: removed %d unfinished reception(s) (never acknowledged)", removed)
        log.info("spool %s: %d entries waiting, sync=%s", self.cfg.spool.directory, self.spool.depth(),
                 self.spool.sync)
        self.set_status("starting: waiting for the spool key")
        cfg = self.cfg
        listens = []
        for i, (lst, factory) in enumerate(self._relay_factories()):
            if ("relay", i) in self.sockets:
                listens.append(self._adopt(self.sockets[("relay", i)], factory).addCallback(self._listening, lst))
                continue
            ep = endpoints.serverFromString(self.reactor, lst.endpoint)
            listens.append(_listen_retrying(self.reactor, ep, factory).addCallback(self._listening, lst))
        if cfg.milter is not None and cfg.milter.enabled:
            from mailtresor_milter import MilterServer
            private = None
            if "milter" in self.sockets:
                # libmilter opens its socket itself and cannot take one
                # (docs/SYSTEMD.md): it listens on a private socket of the
                # daemon's own, and the activated one is forwarded to it.
                private = cfg.appliance.runtime_directory / "milter.private.sock"
            self.milter = MilterServer(self.spool, cfg.milter, hostname=cfg.appliance.hostname,
                                       on_exit=self._milter_exited,
                                       socket=f"unix:{private}" if private else None,
                                       socket_mode=0o600 if private else None)
            self.milter.start()
            if private is not None:
                from mailtresor.activation import forward_factory
                self._adopt(self.sockets["milter"], forward_factory(self.reactor, str(private))).addCallbacks(
                    self.milter_ports.append, self._milter_cannot_listen)
        if self.api is not None:
            # Not fatal: mail is still taken and archived without the API.
            self.api.start().addErrback(lambda f: log.error("api: cannot listen on %s: %s", cfg.api.listen,
                                                            f.getErrorMessage()))
        if self.federation is not None:
            self.federation.start()         # not fatal either: errors are logged, local search goes on
        d = defer.gatherResults(listens, consumeErrors=True)

        def listened(ports):
            # In listener order, whatever order the listens finished in (one
            # may have retried): workers pair the sockets they are handed
            # with the configured listeners by position.
            self.ports = list(ports) + [p for p in self.ports if p not in ports]
            self.listening = True
            for i in range(1, self.processes):
                self._spawn_worker(_WorkerProcess(self, i))
            self._maybe_ready()

        def cannot_listen(f):
            err = f.value.subFailure if hasattr(f.value, "subFailure") else f
            log.error("cannot listen: %s", err.getErrorMessage())
            self.exit_code = 1
            self.reactor.stop()

        d.addCallbacks(listened, cannot_listen)
        self.fetcher.start("spool").addCallback(self._key_ready)
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        if usec and os.environ.get("WATCHDOG_PID", str(os.getpid())) == str(os.getpid()):
            # The reactor answering is what the watchdog proves.
            watchdog = task.LoopingCall(notify, "WATCHDOG=1")
            watchdog.clock = self.reactor
            watchdog.start(usec / 2e6, now=True)
        self._status_loop = task.LoopingCall(self.write_status)
        self._status_loop.clock = self.reactor
        self._status_loop.start(10, now=False)
        if self.trail is not None:
            # A quiet trail is sealed too, not only every seal_every records.
            self._trail_sealer = task.LoopingCall(self._seal_trail)
            self._trail_sealer.clock = self.reactor
            self._trail_sealer.start(self.cfg.archive.seal_interval if self.cfg.archive else 300.0, now=False)

    def _adopt(self, sock, factory):
        """Listen on a socket systemd passed: a Deferred of the port, as an
        endpoint's listen() gives (the port holds a duplicate; systemd keeps
        its own, for the next start)."""
        from twisted.internet import defer
        fd, family = sock
        try:
            # Twisted needs it non-blocking (systemd passes it blocking): a
            # blocking accept() would hang the reactor once the backlog is empty.
            os.set_blocking(fd, False)
            port = self.reactor.adoptStreamPort(fd, family, factory)
        except Exception as e:  # noqa: BLE001 - said as "cannot listen"
            return defer.fail(e)
        finally:
            os.close(fd)
        return defer.succeed(port)

    def _start_worker(self):
        import socket as socketmod

        from twisted.internet import stdio
        from twisted.protocols.basic import LineOnlyReceiver

        from mailtresor.keys.ring import KeyMaterial

        # Accept only once the key is here: before that the main process
        # alone answers (421), so READY=1 never precedes a worker's 421.
        pending = list(zip(self.listen_fds, self._relay_factories()))

        def adopt():
            names = []
            for fd, (lst, factory) in pending:
                family = socketmod.socket(fileno=os.dup(fd)).family
                self.ports.append(self.reactor.adoptStreamPort(fd, family, factory))
                os.close(fd)
                names.append(f"{lst.endpoint} ({lst.tls} TLS)")
            pending.clear()
            log.info("relay worker %d accepting on %s", self.worker, ", ".join(names))

        daemon = self

        class KeyChannel(LineOnlyReceiver):
            delimiter = b"\n"

            def lineReceived(self, line):
                import base64
                doc = json.loads(line)
                if "drop" in doc:
                    daemon.ring.drop(doc["drop"])
                    log.warning("relay worker %d: %s key revoked; refusing mail until it is back",
                                daemon.worker, doc["drop"])
                    return
                daemon.ring.put(KeyMaterial(doc["name"], int(doc["version"]), base64.b64decode(doc["key"])),
                                current=True)
                if daemon.state == "starting":
                    daemon.state = "running"
                    adopt()

            def connectionLost(self, reason=None):
                if daemon.state not in ("stopping", "stopped"):
                    log.warning("relay worker %d: the main process is gone; stopping", daemon.worker)
                    daemon.request_stop()

        stdio.StandardIO(KeyChannel(), stdin=0, stdout=os.open(os.devnull, os.O_WRONLY), reactor=self.reactor)

    def _spawn_worker(self, w: "_WorkerProcess"):
        import sys as _sys
        fds = [p.fileno() for p in self.ports]
        child_fds = {0: "w", 1: 1, 2: 2}
        for i, fd in enumerate(fds):
            child_fds[3 + i] = fd
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
                            "LISTEN_FDNAMES")}
        args = [_sys.executable, "-m", "mailtresor.service", "--config", str(self.cfg.source),
                "--worker", str(w.index), "--listen-fds", ",".join(str(3 + i) for i in range(len(fds)))]
        self.reactor.spawnProcess(w.protocol, _sys.executable, args, env=env, childFDs=child_fds)
        w.started_at = time.monotonic()
        if w not in self.workers:
            self.workers.append(w)
        log.info("relay worker %d started", w.index)
        for name in ("spool",):
            cur = self.ring.current(name)
            if cur is not None:
                from mailtresor.keys.ring import KeyMaterial
                w.send_key(KeyMaterial(name, cur[0], cur[1]))

    def _key_to_workers(self, material):
        for w in self.workers:
            w.send_key(material)
        if material.name in self._revoked:
            self._revoked.discard(material.name)
            log.info("the control endpoint releases the %s key again; accepting mail", material.name)
            self.set_status(f"accepting mail again: the control endpoint released the {material.name} key")

    def _key_revoked(self, name: str):
        self._revoked.add(name)
        for w in self.workers:
            w.drop_key(name)
        self.set_status(f"refusing mail (4xx): the control endpoint no longer releases the {name} key")

    def _worker_ended(self, w, code, sig):
        if self.state in ("stopping", "stopped"):
            log.info("relay worker %d exited (%s)", w.index, f"status {code}" if sig is None else f"signal {sig}")
            if self._workers_done is not None and all(x.transport is None for x in self.workers):
                d, self._workers_done = self._workers_done, None
                d.callback(None)
            return
        # Also before READY (still waiting for the key): a worker that is
        # not restarted then would be missing for the daemon's whole life.
        # One that keeps dying is restarted less and less often.
        lived = time.monotonic() - w.started_at
        w.delay = 1.0 if lived > 60 else min(w.delay * 2, 60.0) if w.delay else 1.0
        log.error("relay worker %d died (%s); starting it again in %.0f s", w.index,
                  f"status {code}" if sig is None else f"signal {sig}", w.delay)
        self.reactor.callLater(w.delay, lambda: self.state not in ("stopping", "stopped") and self._spawn_worker(w))

    def request_stop(self):
        if not self._stop_requested:
            self._stop_requested = True
            self.reactor.stop()

    def _listening(self, port, lst):
        self.ports.append(port)
        log.info("relay listening on %s (%s TLS)", lst.endpoint, lst.tls)
        return port

    def _key_ready(self, version):
        self.have_key = True
        self._maybe_ready()

    def _maybe_ready(self):
        if self.listening and self.have_key and self.state == "starting":
            self.state = "running"
            what = [f"{lst.endpoint}" for lst in self.cfg.relay.listener]
            if self.milter is not None:
                what.append(f"milter {self.cfg.milter.listen}")
            procs = f" ({self.processes} relay processes)" if self.processes > 1 else ""
            text = "accepting mail on " + ", ".join(what) + procs
            log.info("%s", text)
            notify("READY=1")
            self.set_status(text)
            if self.archiver is not None:
                from twisted.internet import task
                self.archiver.start()
                self._expiry = task.LoopingCall(self.archiver.expire_keys, self.cfg.control.key_cache_seconds)
                self._expiry.clock = self.reactor
                self._expiry.start(60, now=False)
                if self.remote_backup is not None:
                    self.remote_backup.start()

    def _milter_cannot_listen(self, f):
        # As for a relay listener: a daemon without its milter socket
        # would leave the MTA tempfailing with nothing said here.
        log.error("cannot listen: milter %s: %s", self.cfg.milter.listen, f.getErrorMessage())
        self.exit_code = 1
        self.reactor.stop()

    def _milter_exited(self, error):
        if self.state not in ("stopping", "stopped"):
            log.error("the milter stopped on its own (%s); shutting down", error or "no error")
            self.exit_code = 1
            self.reactor.callFromThread(self.request_stop)

    # --- stop ---

    def stop(self):
        """The 'before shutdown' trigger: the reactor waits for this Deferred."""
        from twisted.internet import defer

        if self._stopping is not None:
            return self._stopping
        self.state = "stopping"
        if not self.worker:
            notify("STOPPING=1")
            self.set_status("shutting down: finishing transactions in progress")
            log.info("shutting down: no new mail; finishing transactions in progress")
            self.fetcher.stop()
        waits = []
        if self.api is not None:
            waits.append(self.api.stop())       # no new requests; those under way finish
        if self.federation is not None:
            waits.append(self.federation.stop())
        for port in self.ports + self.milter_ports:
            port.stopListening()
        if self.milter is not None:
            self.milter.begin_shutdown()
        waits += [f.shutdown() for f in self.factories]
        if self.milter is not None:
            waits.append(self.milter.wait_idle(self.reactor))
        live = [w for w in self.workers if w.transport is not None]
        if live:
            self._workers_done = defer.Deferred()
            waits.append(self._workers_done)
            for w in live:
                w.signal("TERM")
        if self.archiver is not None:
            if getattr(self, "_expiry", None) is not None and self._expiry.running:
                self._expiry.stop()
            if self.remote_backup is not None:
                self.remote_backup.stop()      # a push under way ends at its next log (or its timeouts)
            # The batch in hand finishes (or is repeated at the next start:
            # every step is idempotent); changed shards are sealed.
            waits.append(self.archiver.stop())
        self._stopping = defer.Deferred()
        self._timer = self.reactor.callLater(self.cfg.service.shutdown_timeout, self._abandon)
        defer.gatherResults(waits).addBoth(lambda _: self._finish())
        return self._stopping

    def _abandon(self):
        log.warning("shutdown timeout (%.0fs): closing the remaining sessions",
                    self.cfg.service.shutdown_timeout)
        for f in self.factories:
            f.abandon()
        if self.milter is not None:
            self.milter.abandon()
        for w in self.workers:
            w.signal("KILL")
        # Commits already handed to the spool finish in spool.close().
        self.reactor.callLater(0.5, self._finish)

    def _finish(self):
        if self.state == "stopped":
            return
        self.state = "stopped"
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self.milter is not None:
            self.milter.stop()
        self.spool.close(timeout=self.cfg.service.shutdown_timeout)
        if self._status_loop is not None and self._status_loop.running:
            self._status_loop.stop()
        if self.trail is not None:
            if getattr(self, "_trail_sealer", None) is not None and self._trail_sealer.running:
                self._trail_sealer.stop()
            # Sealed at stop when the seal key is held (never a wait on the
            # control endpoint here); else the next start's first seal covers it.
            self.trail.log.close(seal=self.ring.current("seal") is not None)
        self.set_status("stopped")
        if self.worker:
            log.debug("relay worker %d stopped", self.worker)
        else:
            log.info("stopped; spool holds %d entries", self.spool.depth())
        self._stopping.callback(None)


def _listen_retrying(reactor, endpoint, factory, attempts: int = 50, delay: float = 0.2):
    """Listen; while the address is still held (relay workers of a main
    process that was just killed are closing down), try again for ~10 s."""
    from twisted.internet import defer, error

    d = defer.Deferred()

    def attempt(n):
        def failed(f):
            if f.check(error.CannotListenError) and n < attempts:
                reactor.callLater(delay, attempt, n + 1)
            else:
                d.errback(f)
        endpoint.listen(factory).addCallbacks(d.callback, failed)

    attempt(1)
    return d


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mailtresord", description="mailtresor archiving daemon")
    p.add_argument("--config", help=f"configuration file (default ${configmod.ENV_VAR} or {configmod.DEFAULT_PATH})")
    p.add_argument("--check-config", action="store_true", help="validate the configuration and exit")
    p.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--listen-fds", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        cfg = configmod.load(configmod.locate(args.config))
    except configmod.ConfigError as e:
        print(f"mailtresord: {e}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"{cfg.source}: configuration OK")
        return 0
    from mailtresor import activation
    # Read and unset at once: no child (relay or parse worker) sees them.
    try:
        activated = activation.from_environment()
    except activation.ActivationError as e:      # malformed variables: said if a setting needs them
        activated = activation.Activated(note=f"the variables systemd set are unusable: {e}")
    from mailtresor import no_core_dumps, private_umask
    no_core_dumps()
    private_umask()                       # the spool, store, index and backup: the daemon's user's only
    setup_logging(cfg.service.log_level)
    try:
        sockets = activation.resolve(cfg, activated) if not args.worker else {}
    except activation.ActivationError as e:
        log.error("cannot start: %s", e)
        return EXIT_ACTIVATION
    for name in activated.unused():
        log.warning("systemd passed a socket named %r that no setting uses (systemd:name=%s); ignored",
                    name, name)
    if cfg.volume and not args.worker:
        # Before anything is opened or made: on a locked volume the daemon
        # could not write; on an absent one (file system not mounted) it
        # would write mail in the clear on the disk beneath.
        from mailtresor.volumes import unlocked_problems
        problems = unlocked_problems(cfg)
        if problems:
            log.error("cannot start: %s (run `mailtresor volume unlock --all`, or see "
                      "`systemctl status mailtresor-unlock`)", "; ".join(problems))
            return 2
    # The one place that takes the global reactor; everything else is given it.
    from twisted.internet import reactor

    from mailtresor.keys.ring import IdentityUnusable

    try:
        daemon = Daemon(cfg, reactor, worker=args.worker,
                        listen_fds=[int(x) for x in args.listen_fds.split(",") if x], sockets=sockets)
    except (OSError, IdentityUnusable) as e:
        log.error("cannot start: %s", e)
        return 1
    reactor.callWhenRunning(daemon.start)
    # SIGHUP is not a reason to stop a mail daemon; there is nothing to reload yet.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    reactor.run()
    if daemon.milter is not None:
        # libmilter's threads may still sit in their 5-second poll; leave
        # without running Python's finalisation under them.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(daemon.exit_code)
    return daemon.exit_code


if __name__ == "__main__":
    sys.exit(main())
