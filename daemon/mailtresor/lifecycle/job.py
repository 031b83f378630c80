"""The daily lifecycle job: retention for every tenant, then compaction.

Started by the daemon's API server (access/api.py ApiServer, which has what
it needs: lifecycle.db, the archiver, the audit trail) when `[lifecycle]
enabled` is true.  Once a day at `run_at` (UTC) it runs each tenant's
retention (lifecycle/retention.py run(), as "retention job": the same plan,
batches, re-checks and audit record as `mailtresor retention run`), logs
one line per tenant with the counts, and then compacts the months that no
longer change (COMPACTION HOOK below).

One reactor.callLater to the next run, no loop that wakes to look at the
clock.  While the archiver is paused (the store cannot take writes) or
lifecycle.db is not open yet, the run is skipped and tried again an hour
later (never past the next day's run).
"""

from __future__ import annotations

import calendar
import logging
import time

from twisted.internet import defer

from mailtresor import config as configmod
from mailtresor.lifecycle import retention

log = logging.getLogger("mailtresor.lifecycle.job")

RETRY = 3600.0          # seconds before a skipped run is tried again


def next_run(run_at: str, now: float) -> float:
    """The next time (unix) after `now` that is `run_at` ("HH:MM", UTC).  Pure."""
    minutes = configmod.run_at_minutes(run_at)
    if minutes is None:
        raise ValueError(f"{run_at!r} is not a time of day (HH:MM)")
    t = time.gmtime(now)
    today = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0, 0, 0, 0)) + minutes * 60
    return today if today > now else today + 86400


def summary_line(tenant: str, report: dict) -> str:
    """The job's log line for one tenant (counts only: no ids, no names of mail)."""
    holds = sum(h["kept"] for h in report["kept_by"]["holds"])
    minimums = sum(m["kept"] for m in report["kept_by"]["minimums"])
    deleting = sum(1 for r in report["rules"] if r.get("go"))      # rules whose expired mail was not all kept
    return (f"retention {tenant}: {report.get('deleted', 0)} deleted by {deleting} rule(s), "
            f"{report['kept']} kept (legal hold {holds}, minimum {minimums})"
            + (f", {report['missing']} already gone" if report.get("missing") else ""))


class DailyJob:
    """The job of one daemon.  `api` is its access.api.Api (lifecycle,
    archiver, audit, tenant_names, run); `settings` its config.Lifecycle."""

    def __init__(self, api, settings, reactor, clock=time.time):
        self.api, self.settings, self.reactor, self.clock = api, settings, reactor, clock
        self._call = None
        self._running = None
        self._stopped = False
        self.last = None            # (when, {tenant: report or error text}) of the last run

    def start(self) -> None:
        self._schedule(next_run(self.settings.run_at, self.clock()))

    def _schedule(self, when: float) -> None:
        if self._stopped:
            return
        delay = max(0.0, when - self.clock())
        self._call = self.reactor.callLater(delay, self._fire)
        log.info("lifecycle job: next run at %s UTC", time.strftime("%Y-%m-%d %H:%M", time.gmtime(when)))

    def _fire(self) -> None:
        self._call = None
        self._running = defer.ensureDeferred(self.run_once())

        def done(result):
            self._running = None
            now = self.clock()
            nxt = next_run(self.settings.run_at, now)
            if result == "skipped":
                nxt = min(now + RETRY, nxt)
            self._schedule(nxt)
        self._running.addErrback(lambda f: log.error("lifecycle job failed: %s", f.getTraceback()))
        self._running.addBoth(done)

    def stop(self) -> defer.Deferred:
        """No new run; a run under way finishes its batch (the archiver's stop waits for it)."""
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        return self._running if self._running is not None else defer.succeed(None)

    def _skip_reason(self) -> str | None:
        api = self.api
        if api.lifecycle is None:
            return "lifecycle.db is not open yet (the access key is being fetched)"
        if api.archiver is None:
            return "the archive is not enabled"
        if api.archiver.paused:
            return f"archiving is paused ({api.archiver.paused})"
        return None

    async def run_once(self, now: float | None = None):
        """One day's run: every tenant's retention, then compaction.
        "skipped" when it could not run (said in the log)."""
        now = self.clock() if now is None else now
        why = self._skip_reason()
        if why is not None:
            log.warning("lifecycle job skipped: %s; trying again later", why)
            return "skipped"
        ctx = retention.Context.of(self.api)
        ctx.stopping = lambda: self._stopped
        results = {}
        for tenant in self.api.tenant_names:
            why = self._skip_reason()
            if why is not None:
                log.warning("lifecycle job stopped before %s: %s", tenant, why)
                results[tenant] = why
                break
            try:
                rep = await retention.run(ctx, tenant, None, dry_run=False, now=now, client="daemon")
            except retention.RunBusy:
                log.info("retention %s: a run is under way already; left to it", tenant)
                results[tenant] = "busy"
                continue
            except Exception as e:  # noqa: BLE001 - one tenant's failure does not stop the others
                log.error("retention %s failed: %s: %s", tenant, type(e).__name__, e)
                results[tenant] = f"{type(e).__name__}: {e}"
                continue
            log.info("%s", summary_line(tenant, rep))
            results[tenant] = rep
        self.last = (now, results)
        await self.compact(now)
        return results

    async def compact(self, now: float):
        """After the deletions, the months that no longer change are
        compacted (a packed LMDB copy, Xapian compaction, the backup log;
        archive/compact.py compact_closed), on the archiver's thread."""
        from mailtresor.archive import compact
        if self.api.archiver is None or self.api.archiver.paused:
            return None
        try:
            done = await self.api.archiver.exclusive(compact.compact_closed, now,
                                                     quiet_days=self.settings.compact_quiet_days)
        except Exception as e:  # noqa: BLE001 - compaction is an optimisation: retried tomorrow
            log.error("lifecycle job: compaction failed: %s: %s", type(e).__name__, e)
            return None
        done = done or []
        failed = [d for d in done if d.get("status") == "failed"]
        log.info("lifecycle job: %d month(s) compacted%s", sum(1 for d in done if d.get("status") == "compacted"),
                 f", {len(failed)} failed" if failed else "")
        return done
