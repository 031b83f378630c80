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
import threading
import time
from pathlib import Path

from . import config as configmod

log = logging.getLogger("mailtresor")

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}
_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                    logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    """journald reads "<N>" prefixes as priorities; it adds the time itself."""

    def format(self, record):
        return f"<{_SYSLOG_PRIORITY.get(record.levelno, 6)}>{record.name}: {record.getMessage()}" + (
            "\n" + self.formatException(record.exc_info) if record.exc_info else "")


def setup_logging(level: str = "info") -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(_LEVELS.get(level, logging.INFO))
    # Twisted's own messages go the same way, at warning and above.
    from twisted.logger import (FilteringLogObserver, LogLevel, LogLevelFilterPredicate,
                                STDLibLogObserver, globalLogBeginner)
    pred = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(STDLibLogObserver(name="twisted"), [pred])],
                                     redirectStandardIO=False, discardBuffer=True)


def notify(*lines: str) -> None:
    """sd_notify(3); a no-op outside systemd."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    try:
        from systemd import daemon
        daemon.notify("\n".join(lines))
    except Exception as e:  # noqa: BLE001 - never fatal
        log.debug("sd_notify failed: %s", e)


class Daemon:
    def __init__(self, cfg: configmod.Config, reactor):
        from .keys import ControlClient, KeyFetcher, KeyRing
        from .spool import Spool

        self.cfg = cfg
        self.reactor = reactor
        self.ring = KeyRing()
        sp = cfg.spool
        self.spool = Spool(sp.directory, self.ring, max_message_size=sp.max_message_size,
                           min_free_bytes=sp.min_free_bytes, max_entries=sp.max_entries,
                           sync=sp.sync, max_tries=sp.max_tries)
        c = cfg.control
        self.client = ControlClient(reactor, c.url, c.ca_file, c.cert_file, c.key_file, c.timeout)
        self.fetcher = KeyFetcher(reactor, self.client, self.ring, retry_initial=c.retry_initial,
                                  retry_max=c.retry_max, refresh_interval=c.refresh_interval,
                                  on_status=self.set_status)
        self.factories = []
        self.ports = []
        self.milter = None
        self.state = "starting"
        self.status = "starting"
        self.listening = False
        self.have_key = False
        self.exit_code = 0
        self._stopping = None
        self._status_loop = None
        self._timer = None
        self._stop_requested = False
        self._status_file = cfg.appliance.runtime_directory / "status.json"

    # --- status ---

    def set_status(self, text: str) -> None:
        self.status = text
        notify(f"STATUS={text}")
        self.write_status()

    def write_status(self) -> None:
        doc = {"pid": os.getpid(), "state": self.state, "status": self.status, "time": time.time(),
               "spool_depth": self.spool.depth(), "spool_commits": self.spool.commits,
               "spool_flush_batches": self.spool.batches, "keys": self.ring.summary(),
               "listeners": [f"{lst.endpoint} ({lst.tls})" for lst in self.cfg.relay.listener],
               "milter": self.cfg.milter.listen if self.cfg.milter and self.cfg.milter.enabled else None}
        try:
            self._status_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._status_file.with_name(".status.json.tmp")
            tmp.write_text(json.dumps(doc, indent=1))
            os.replace(tmp, self._status_file)
        except OSError as e:
            log.debug("cannot write %s: %s", self._status_file, e)

    # --- start ---

    def start(self):
        from twisted.internet import defer, endpoints, task
        from twisted.protocols.tls import TLSMemoryBIOFactory

        from .relay import Gate, RelayFactory, ServerTLS

        removed = self.spool.recover()
        if removed:
            log.info("spool: removed %d unfinished reception(s) (never acknowledged)", removed)
        log.info("spool %s: %d entries waiting, sync=%s", self.cfg.spool.directory, self.spool.depth(),
                 self.spool.sync)
        self.set_status("starting: waiting for the spool key")
        cfg = self.cfg
        listens = []
        if cfg.relay.listener:
            t = cfg.tls
            tls = ServerTLS(t.cert_file, t.key_file, t.client_ca_file, t.min_version)
            gate = Gate(cfg.relay.connector)
            for lst in cfg.relay.listener:
                implicit = lst.tls == "implicit"
                f = RelayFactory(sink=self.spool, gate=gate, tls=tls, hostname=cfg.appliance.hostname,
                                 max_size=cfg.spool.max_message_size, max_recipients=cfg.relay.max_recipients,
                                 max_connections=cfg.relay.max_connections, timeout=cfg.relay.timeout,
                                 implicit_tls=implicit, listener_name=lst.name or lst.endpoint,
                                 clock=self.reactor, call_from_thread=self.reactor.callFromThread)
                self.factories.append(f)
                ep = endpoints.serverFromString(self.reactor, lst.endpoint)
                listens.append(ep.listen(TLSMemoryBIOFactory(tls, False, f) if implicit else f)
                               .addCallback(self._listening, lst))
        if cfg.milter is not None and cfg.milter.enabled:
            from mailtresor_milter import MilterServer
            self.milter = MilterServer(self.spool, cfg.milter, hostname=cfg.appliance.hostname,
                                       on_exit=self._milter_exited)
            self.milter.start()
        d = defer.gatherResults(listens, consumeErrors=True)

        def listened(_):
            self.listening = True
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
            task.LoopingCall(notify, "WATCHDOG=1").start(usec / 2e6, now=True)
        self._status_loop = task.LoopingCall(self.write_status)
        self._status_loop.start(10, now=False)
        self.reactor.addSystemEventTrigger("before", "shutdown", self.stop)
        # A second SIGTERM while stopping is not an error (Twisted's own
        # handler would call reactor.stop() twice).
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self.reactor.callFromThread(self.request_stop))

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
            text = "accepting mail on " + ", ".join(what)
            log.info("%s", text)
            notify("READY=1")
            self.set_status(text)

    def _milter_exited(self, error):
        if self.state not in ("stopping", "stopped"):
            log.error("the milter stopped on its own (%s); shutting down", error or "no error")
            self.exit_code = 1
            self.reactor.callFromThread(self.reactor.stop)

    # --- stop ---

    def stop(self):
        """The 'before shutdown' trigger: the reactor waits for this Deferred."""
        from twisted.internet import defer

        if self._stopping is not None:
            return self._stopping
        self.state = "stopping"
        notify("STOPPING=1")
        self.set_status("shutting down: finishing transactions in progress")
        log.info("shutting down: no new mail; finishing transactions in progress")
        self.fetcher.stop()
        for port in self.ports:
            port.stopListening()
        if self.milter is not None:
            self.milter.begin_shutdown()
        waits = [f.shutdown() for f in self.factories]
        if self.milter is not None:
            waits.append(self.milter.wait_idle(self.reactor))
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
        self.set_status("stopped")
        log.info("stopped; spool holds %d entries", self.spool.depth())
        self._stopping.callback(None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mailtresord", description="mailtresor archiving daemon")
    p.add_argument("--config", help=f"configuration file (default ${configmod.ENV_VAR} or {configmod.DEFAULT_PATH})")
    p.add_argument("--check-config", action="store_true", help="validate the configuration and exit")
    args = p.parse_args(argv)
    try:
        cfg = configmod.load(configmod.locate(args.config))
    except configmod.ConfigError as e:
        print(f"mailtresord: {e}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"{cfg.source}: configuration OK")
        return 0
    setup_logging(cfg.service.log_level)
    from twisted.internet import reactor

    try:
        daemon = Daemon(cfg, reactor)
    except OSError as e:
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
