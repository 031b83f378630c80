"""The archiver's pipeline on a real spool and store, without a daemon:
a tenant whose key cannot be had holds back only its own mail."""

import os

from mailtresor.archive.archiver import Pipeline, Router
from mailtresor.config import Tenant
from mailtresor.keys.ring import KeyMaterial, KeyRing
from mailtresor.ingest.spool import Envelope, Spool
from mailtresor.archive.store import Keys, Store


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self):
        return self.now


def msg(n: int, to: str) -> bytes:
    return (f"From: a@elsewhere.example\r\nTo: {to}\r\nSubject: message {n}\r\n"
            f"Date: Thu, 22 Aug 2002 10:00:00 +0000\r\nMessage-ID: <{n}@elsewhere.example>\r\n\r\n"
            f"body {n}\r\n").encode()


def test_a_missing_tenant_key_holds_back_only_that_tenants_mail(tmp_path):
    ring = KeyRing()
    for name in ("spool", "tenant.acme", "seal"):
        ring.put(KeyMaterial(name, 1, os.urandom(32)), current=True)      # no tenant.globex
    clock = Clock()
    spool = Spool(tmp_path / "spool", ring, max_tries=2, sync="fsync")
    store = Store(tmp_path / "store")
    pipe = Pipeline(spool, store, Keys(ring), Router([Tenant("acme", ("acme.example",)),
                                                      Tenant("globex", ("globex.example",))]),
                    seal_seed=lambda: b"s" * 32, batch_size=4, clock=clock)
    kinds = {}
    for n in range(12):
        to = ("b@acme.example", "c@globex.example", "b@acme.example, c@globex.example")[n % 3]
        w = spool.open_writer(0)
        w.write(msg(n, to))
        eid = w.commit(Envelope(source="relay", mail_from="a@elsewhere.example",
                                rcpt_to=[a.strip() for a in to.split(",")])).result()
        kinds[eid] = n % 3
    try:
        results = []
        for _ in range(10):                       # bounded: 12 entries, 4 a batch
            r = pipe.run_batch()
            results.append(r)
            if not r.archived and not r.deferred:
                break
        # Every acme-only entry is done; the others wait in the spool,
        # with no try counted, and were not picked again before their time.
        left = set(spool.ready())
        assert left == {e for e, k in kinds.items() if k != 0}
        assert os.listdir(spool.tries_dir) == [] and os.listdir(spool.bad_dir) == []
        assert sum(r.deferred for r in results) == 8 and "tenant.globex" in results[0].waiting_for_key
        assert pipe.run_batch().archived == 0     # nothing due yet
        acme = sum(store.shard("acme", m).count() for m in store.months("acme"))
        assert acme == 8                          # the four shared messages' acme copies too
        assert store.months("globex") == []

        # The key comes; once the wait is over everything is archived, the
        # shared messages' acme copies are not stored twice.
        ring.put(KeyMaterial("tenant.globex", 1, os.urandom(32)), current=True)
        clock.now += 61
        for _ in range(10):
            if not pipe.run_batch().archived:
                break
        assert spool.ready() == []
        assert sum(store.shard("acme", m).count() for m in store.months("acme")) == 8
        assert sum(store.shard("globex", m).count() for m in store.months("globex")) == 8
        assert pipe.totals.archived == 12 and pipe.totals.failed == 0
    finally:
        store.close()
        spool.close()


def test_an_implausible_date_is_replaced_by_the_arrival_time(tmp_path):
    """A Date: in 2099 (or before 1970) would sort first (last) for ever and
    sit in a shard of its own: the archive uses the arrival time instead,
    for the shard, the date order and date: searches; the listing still
    shows the header's date."""
    from mailtresor.archive import index
    ring = KeyRing()
    for name in ("spool", "tenant.acme", "seal"):
        ring.put(KeyMaterial(name, 1, os.urandom(32)), current=True)
    spool = Spool(tmp_path / "spool", ring, sync="fsync")
    store = Store(tmp_path / "store")
    keys = Keys(ring)
    pipe = Pipeline(spool, store, keys, Router([Tenant("acme", ("acme.example",))]), batch_size=10)
    arrival = 1_030_010_400.0                                   # 2002-08-22
    dates = {"future": "Thu, 01 Jan 2099 00:00:00 +0000", "old": "Mon, 01 Jan 1960 00:00:00 +0000",
             "fine": "Wed, 21 Aug 2002 09:00:00 +0000"}
    for tag, date in dates.items():
        raw = (f"From: a@elsewhere.example\r\nTo: b@acme.example\r\nSubject: {tag}\r\nDate: {date}\r\n"
               f"Message-ID: <{tag}@x>\r\n\r\nbody\r\n").encode()
        w = spool.open_writer(0)
        w.write(raw)
        w.commit(Envelope(source="relay", mail_from="a@elsewhere.example", rcpt_to=["b@acme.example"],
                          received_at=arrival)).result()
    try:
        assert pipe.run_batch().archived == 3
        assert store.months("acme") == ["2002-08"]
        paths = store.index_paths("acme", ["2002-08"])
        total, hits = index.search(paths, "", limit=10)
        by_tag = {store.listing("acme", "2002-08", h.archive_id, h.listing, keys)["subject"]: h for h in hits}
        assert by_tag["future"].date == arrival and by_tag["old"].date == arrival
        assert by_tag["fine"].date == 1_029_920_400.0
        assert [h.archive_id for h in hits][-1] == by_tag["fine"].archive_id      # newest first
        assert index.search(paths, "date:2099", limit=10)[0] == 0
        listing = store.listing("acme", "2002-08", by_tag["future"].archive_id, by_tag["future"].listing, keys)
        assert listing["date"] == 4070908800.0                # what the header says
    finally:
        store.close()
        spool.close()


def test_a_connector_tenant_no_longer_configured_holds_its_mail(tmp_path, caplog):
    """Issue 12: mail a connector bound to tenant "initech" accepted, after
    initech was removed from the configuration, is held as unrouted -- not
    given to acme, whose domain its envelope names -- and comes back with
    `reroute`."""
    ring = KeyRing()
    for name in ("spool", "tenant.acme", "seal"):
        ring.put(KeyMaterial(name, 1, os.urandom(32)), current=True)
    spool = Spool(tmp_path / "spool", ring, sync="fsync")
    store = Store(tmp_path / "store")
    pipe = Pipeline(spool, store, Keys(ring), Router([Tenant("acme", ("acme.example",))]), batch_size=10)
    try:
        w = spool.open_writer(0)
        w.write(msg(1, "b@acme.example"))
        eid = w.commit(Envelope(source="relay", connector="exchange-initech", tenant="initech",
                                mail_from="a@acme.example", rcpt_to=["b@acme.example"])).result()
        r = pipe.run_batch()
        assert (r.unrouted, r.archived) == (1, 0)
        assert spool.unrouted_entries() == [eid] and store.months("acme") == []
        assert "tenant 'initech' is not configured" in caplog.text
    finally:
        store.close()
        spool.close()
