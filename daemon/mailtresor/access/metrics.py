"""/metrics: the daemon's numbers in the Prometheus text format.

A CollectorRegistry of our own (not prometheus_client's global one, which
would also export whatever else in the process registers there): the HTTP
request latency histogram, observed by the API, and a collector that reads
the daemon's facts at scrape time (the same numbers `mailtresor status`
shows), so nothing is counted twice.

The facts callable returns a dict with any of:

    spool_depth        entries waiting in the spool
    accepted           messages this process accepted into the spool (spool commits;
                       relay worker processes count their own)
    archived, failed, set_aside, duplicates      the archiver's totals since start
    archive_lag        seconds the oldest spool entry has waited (0: spool empty)
    index_lag          seconds since the archiver last finished a batch while
                       entries wait (0: nothing waits); the index is written in
                       the same batch as the store
    keys               [{"name", "version", "current", "age"}] keys held
    ready              1 when the daemon accepts mail (keys held, spool writable)
    backup_remote_lag_frames, backup_remote_lag_bytes   what the remote backup target lacks
    backup_remote_last_push    epoch seconds of the last good push; backup_remote_failing 1/0
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger("mailtresor.access.metrics")

CONTENT_TYPE = CONTENT_TYPE_LATEST
_COUNTERS = (("accepted", "mailtresor_messages_accepted", "Messages accepted into the spool by the main process"),
             ("archived", "mailtresor_messages_archived", "Messages archived (stored and indexed)"),
             ("failed", "mailtresor_messages_failed", "Spool entries whose archiving failed"),
             ("set_aside", "mailtresor_messages_set_aside", "Spool entries set aside after repeated failures"),
             ("duplicates", "mailtresor_messages_duplicate", "Messages found already archived"))
_GAUGES = (("spool_depth", "mailtresor_spool_depth", "Entries waiting in the spool"),
           ("archive_lag", "mailtresor_archive_lag_seconds", "Age of the oldest entry waiting in the spool"),
           ("index_lag", "mailtresor_index_lag_seconds",
            "Seconds since the archiver last finished a batch while entries wait"),
           ("ready", "mailtresor_ready", "1 when the daemon holds its keys and its spool takes mail"),
           ("backup_remote_lag_frames", "mailtresor_backup_remote_lag_frames",
            "Backup frames the remote target lacks (archive/store/remote.py)"),
           ("backup_remote_lag_bytes", "mailtresor_backup_remote_lag_bytes", "Backup bytes the remote target lacks"),
           ("backup_remote_last_push", "mailtresor_backup_remote_last_push_timestamp_seconds",
            "When the last push to the remote target succeeded"),
           ("backup_remote_failing", "mailtresor_backup_remote_failing", "1 when the last push attempt failed"))


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def spool_id_time(entry_id: str) -> float:
    """When a spool entry was received: its id is 26 Crockford base-32
    digits of (milliseconds << 80 | 80 random bits) (ingest.spool.new_id). Pure."""
    n = 0
    for ch in entry_id:
        n = n * 32 + _CROCKFORD.index(ch)
    return (n >> 80) / 1000.0


class _FactsCollector:
    def __init__(self, facts):
        self._facts = facts

    def collect(self):
        try:
            f = self._facts() or {}
        except Exception:  # noqa: BLE001 - a scrape must not fail for one missing number
            log.exception("metrics: the daemon's facts are not available")
            f = {}
        for key, name, text in _COUNTERS:
            if f.get(key) is not None:
                yield CounterMetricFamily(name, text, value=float(f[key]))
        for key, name, text in _GAUGES:
            if f.get(key) is not None:
                yield GaugeMetricFamily(name, text, value=float(f[key]))
        keys = f.get("keys")
        if keys is not None:
            held = GaugeMetricFamily("mailtresor_key_cached", "Keys held in memory (1 per name and version)",
                                     labels=["name", "version", "current"])
            age = GaugeMetricFamily("mailtresor_key_age_seconds", "Seconds since the key was fetched",
                                    labels=["name", "version"])
            for k in keys:
                held.add_metric([str(k["name"]), str(k["version"]), "true" if k.get("current") else "false"], 1)
                age.add_metric([str(k["name"]), str(k["version"])], float(k.get("age", 0)))
            yield held
            yield age


class Metrics:
    """The API's registry."""

    def __init__(self, facts=lambda: {}):
        self.registry = CollectorRegistry(auto_describe=False)
        self.latency = Histogram("mailtresor_http_request_duration_seconds",
                                 "HTTP API request latency by route and status",
                                 ["route", "status"], registry=self.registry,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.registry.register(_FactsCollector(facts))

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.latency.labels(route, str(status)).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
