"""The archiver: spool -> parse -> route -> dedup -> store -> index -> backup
-> unspool.

`Pipeline.run_batch()` is the blocking work (one thread: it is the single
writer of every shard); `Archiver` runs it on a one-thread pool from the
reactor.  Every step is idempotent (docs/ARCHIVE.md): a spool entry is
removed only after its records are committed, indexed and shipped to the
backup, so a crash anywhere means the entry comes again with the same
result.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from mailtresor.archive import classify, parse, parseworker
from mailtresor.archive.index import ShardIndex
from mailtresor.keys.ring import KeyUnavailable
from mailtresor.ingest.spool import KeyNotHeld, SpoolCorrupt
from mailtresor.archive.store.backup import BackupDirectory
from mailtresor.archive.store.codecs import seal_listing
from mailtresor.archive.store.errors import StoreLocked
from mailtresor.archive.store.fs import describe_fault
from mailtresor.archive.store.lock import WriterLock
from mailtresor.archive.store.shard import UNROUTED, Item, Store, effective_date, month_of
from mailtresor.keys.derive import FetchingKeys, KeyMissing, Keys  # noqa: F401 - FetchingKeys: for older tests

log = logging.getLogger("mailtresor.archive.archiver")


def domain_of(address: str) -> str:
    a = address.strip().strip("<>").rstrip(".")
    return a.rsplit("@", 1)[1].lower() if "@" in a else ""


class Router:
    """Which tenants' archives a message is written into.

    Authority, not addresses, decides: an entry that arrived through a
    connector bound to a tenant (or a `mailtresor import --tenant`) is that
    tenant's, and only that tenant's, whatever its envelope or a journal
    report inside it names.  Mail from untrusted paths (the milter, a
    connector without a tenant) goes by the SMTP envelope the MTA vouches
    for -- MAIL FROM and RCPT TO, exact match of the domain -- never by
    journal report recipients or headers.  No tenant: held as unrouted."""

    def __init__(self, tenants):
        self.by_domain = {d: t.name for t in tenants for d in t.domains}
        self.names = {t.name for t in tenants}
        # Each tenant's classification rules (config.py checked them at load).
        self.rules = {t.name: classify.compile_rules(getattr(t, "classify", ()), getattr(t, "groups", {}))
                      for t in tenants}

    def classify(self, tenant: str, p: "Prepared") -> list[str]:
        """The classification tags of a prepared message for one tenant:
        from the stored message's headers (a journal report's original)
        and the envelope (with a trusted report's sender and recipients)."""
        return classify.classify(self.rules.get(tenant, ()), p.raw, p.parsed, p.envelope, tenant)

    def tenants(self, envelope) -> list[str]:
        """The tenants for a spool envelope (spool.Envelope or its dict)."""
        env = envelope if isinstance(envelope, dict) else envelope.__dict__
        bound = env.get("tenant") or ""
        if bound:
            # A tenant no longer configured: held, never given to another.
            return [bound] if bound in self.names else []
        return sorted({self.by_domain[d] for d in map(domain_of, routing_addresses(env))
                       if d in self.by_domain})


def routing_addresses(env: dict) -> list[str]:
    """The SMTP envelope's addresses: what an untrusted path routes by."""
    return [a for a in [env.get("mail_from") or "", *(env.get("rcpt_to") or [])] if a]


@dataclass
class Prepared:
    entry_id: str
    raw: bytes                       # what is stored: the message, or the original inside a journal report
    parsed: parse.Parsed
    envelope: dict
    addresses: list[str]             # every envelope address, report recipients too (`envelope:` terms)
    tenants: list[str]
    month: str


@dataclass
class BatchResult:
    archived: int = 0                # spool entries finished
    stored: int = 0                  # new records
    duplicates: int = 0              # records that were there already
    unrouted: int = 0
    journal_untrusted: int = 0       # messages with a journal-report header not unwrapped (not trusted)
    failed: int = 0
    set_aside: int = 0
    waiting_for_key: str = ""
    deferred: int = 0                # entries put off because a tenant's key is missing
    locked: str = ""
    # Why archiving pauses (the store, index or backup cannot take writes:
    # a full, read-only or failing disk; or another index/backup failure).
    # The entries stay in the spool with no try counted.
    paused: str = ""
    held: int = 0                    # entries left in the spool for that
    shards: set = field(default_factory=set)


def envelope_addresses(env: dict) -> list[str]:
    """Every address of an envelope: the SMTP envelope and a trusted journal
    report's sender and recipients (Bcc, expanded lists).  Searchable
    (`envelope:`), never routing (`Router`)."""
    out = [env.get("mail_from") or ""] + list(env.get("rcpt_to") or [])
    j = env.get("journal")
    if j:
        out.append(j.get("sender") or "")
        out += [r["address"] for r in j.get("recipients", [])]
        out += [r[k] for r in j.get("recipients", []) for k in ("expanded", "forwarded") if r.get(k)]
    seen, res = set(), []
    for a in out:
        a = a.strip().strip("<>").lower()
        if a and a not in seen:
            seen.add(a)
            res.append(a)
    return res


def prepare(entry, router: Router, digested: dict | None = None) -> Prepared:
    """A spool entry as the store wants it.  `digested` is
    `parseworker.digest(entry.data, entry.envelope.journaling)` when a
    parser process made it; without it, it is made here."""
    env = dict(entry.envelope.__dict__)
    env["spool_id"] = entry.id
    journaling = entry.envelope.journaling
    d = digested if digested is not None else parseworker.digest(entry.data, journaling)
    raw = entry.data
    if d.get("journal") is not None and not isinstance(journaling, dict):
        # Only the relay's acceptance decides; a parser process that says
        # otherwise is not sane (parsing runs on hostile input).
        raise ValueError("the parser unwrapped a journal report from an untrusted source")
    if d.get("journal_untrusted") is not None:
        # Kept as received, every part searchable, flagged: an auditor finds
        # such attempts with flag:journal-untrusted.
        env["journal_untrusted"] = d["journal_untrusted"]
        log.warning("%s: journal report header from source=%s connector=%s: %s; archived as received, "
                    "flagged journal-untrusted", entry.id, entry.envelope.source or "?",
                    entry.envelope.connector or "-", d["journal_untrusted"])
    elif d["journal_error"] is not None:
        # Kept as received, flagged: an unusable report is still mail.
        env["journal_error"] = d["journal_error"]
        log.warning("%s: journal report cannot be unwrapped (%s); archived as it is", entry.id, d["journal_error"])
    elif d["journal"] is not None:
        raw = d["original"]
        env["journal"] = d["journal"]
    parsed = d["parsed"]
    if "journal_untrusted" in env and "journal-untrusted" not in parsed.flags:
        parsed.flags.append("journal-untrusted")
    if "journal_error" in env:
        parsed.flags.append("journal-unwrap-failed")
    for flag in entry.envelope.flags:      # what ingest noticed, e.g. bare-newline
        if flag not in parsed.flags:
            parsed.flags.append(flag)
    addresses = envelope_addresses(env)
    tenants = router.tenants(entry.envelope)
    return Prepared(entry.id, raw, parsed, env, addresses, tenants,
                    month_of(parsed.date, entry.envelope.received_at or time.time()))


# To: addresses a summary keeps (a result line shows the first and how
# many more; a list of thousands would bloat every index document).
SUMMARY_TO = 10


def summary_of(p: parse.Parsed) -> dict:
    return {"date": p.date, "from": p.from_header, "subject": p.subject, "message_id": p.message_id,
            "size": p.size, "flags": list(p.flags),
            "attachments": [a.filename for a in p.attachments if a.filename],
            "to": list(p.to[:SUMMARY_TO]), "to_count": len(p.to)}


def arrival_of(meta: dict) -> float:
    """When a record's message first arrived: its earliest envelope's
    received_at, else when it was first stored."""
    times = [e.get("received_at") for e in meta.get("envelopes", {}).values() if e.get("received_at")]
    return min(times) if times else float(meta.get("first_seen") or 0.0)


def classification_tags(meta: dict) -> list[str]:
    """The tags classification rules gave a record as it was archived,
    sorted: each envelope keeps the tags its arrival got ("tags"), so a
    duplicate that arrives by another path adds its own."""
    return sorted({t for env in meta.get("envelopes", {}).values() for t in env.get("tags") or ()})


def case_tags(meta: dict) -> list[str]:
    """The case tags auditors put on a record later (meta["case_tags"]), sorted."""
    return sorted(meta.get("case_tags") or ())


def index_terms(meta: dict, parsed: parse.Parsed) -> tuple[list[str], list[str], list[str]]:
    """(every envelope address, those not in the headers, tags) over all
    envelopes a record has (a duplicate adds its recipients).  The tags:
    each envelope's source ("relay", "milter", "import"), "journal",
    the classification tags and the case tags."""
    addrs = []
    for env in meta.get("envelopes", {}).values():
        addrs += envelope_addresses(env)
    addrs = list(dict.fromkeys(addrs))
    in_headers = set(parsed.from_) | set(parsed.to) | set(parsed.cc) | set(parsed.bcc)
    return addrs, [a for a in addrs if a not in in_headers], record_tags(meta)


def record_tags(meta: dict) -> list[str]:
    """Every tag of a record, sorted: what `tag:` finds and the tag facet
    counts (index_terms' third part)."""
    tags = set()
    for env in meta.get("envelopes", {}).values():
        tags.add(env.get("source") or "unknown")
        if env.get("journal"):
            tags.add("journal")
    tags.update(classification_tags(meta))
    tags.update(case_tags(meta))
    return sorted(tags)


class Pipeline:
    """The blocking part; one instance per store, used from one thread."""

    def __init__(self, spool, store: Store, keys: Keys, router: Router, *,
                 backup: BackupDirectory | None = None, seal_seed=None, seal_interval: float = 300.0,
                 timestamper=None, batch_size: int = 200, clock=time.time,
                 parser: parseworker.ParserPool | None = None):
        self.spool = spool
        self.store = store
        self.keys = keys
        self.router = router
        self.backup = backup
        self.seal_seed = seal_seed            # callable -> 32-byte seed or None
        self.seal_interval = seal_interval
        self.timestamper = timestamper
        self.batch_size = batch_size
        self.clock = clock
        self._dirty: dict[tuple[str, str], float] = {}     # shard -> first unsealed change
        self.totals = BatchResult()
        self.lock = WriterLock(store.root)
        self.hold_lock = False            # a CLI import keeps it for its whole run
        # Parsing in child processes (None: in this thread).  While a batch
        # is stored and indexed, the next one is already being parsed:
        # entry id -> (spool entry, future of its digest).
        self.parser = parser
        self.parse_timeout = parseworker.PARSE_TIMEOUT
        self._ahead: dict[str, tuple[object, Future]] = {}
        # Entries that wait for a tenant's key -> when to try them again:
        # they stay in the spool (no try counted) while the other tenants'
        # mail goes on.  And per such tenant, the current wait in seconds.
        self._deferred: dict[str, float] = {}
        self._key_waits: dict[str, float] = {}
        self._seal_fault = ""             # the storage fault sealing last met (logged once)
        self._stage_fault = ""            # the index/backup failure last logged (once)
        # (kind, tenant, object, detail) -> None: the audit trail's anomaly
        # records (access/audit.py DaemonTrail.anomaly); None: none kept.
        self.on_anomaly = None

    def run_batch(self) -> BatchResult:
        if self.lock.fd is None:
            try:
                self.lock.acquire()
            except StoreLocked as e:
                return BatchResult(locked=str(e))
            except OSError as e:            # a read-only or failing store cannot even lock
                why = describe_fault("store", self.store.root, e)
                if why is None:
                    raise
                return self._account(BatchResult(paused=why))
        try:
            return self._run_batch()
        except Exception as e:
            # A storage fault outside the steps that expect one (the writer
            # lock, opening the store): the same pause, not a crash.
            why = describe_fault("store", self.store.root, e)
            if why is None:
                raise
            return self._account(BatchResult(paused=why))
        finally:
            # Unmap every LMDB environment between batches.  Whatever a batch
            # touched (the random catalog and leaf pages of its ids, the
            # records the backup read back) would otherwise stay counted in
            # the daemon's RSS and grow with the archive; reopening costs
            # well under a millisecond per shard.
            self.store.close()
            if not self.hold_lock:
                self.lock.release()

    def _next_ids(self) -> list[str]:
        """The oldest ready entries, skipping those that wait for a key."""
        if not self._deferred:
            return self.spool.ready(limit=self.batch_size)
        limit = self.batch_size + len(self._deferred)
        ready = self.spool.ready(limit=limit)
        if len(ready) < limit:                 # every entry was listed: forget the finished ones
            listed = set(ready)
            self._deferred = {e: t for e, t in self._deferred.items() if e in listed}
        now = self.clock()
        return [e for e in ready if self._deferred.get(e, 0.0) <= now][:self.batch_size]

    def _run_batch(self) -> BatchResult:
        res = BatchResult()
        ids = self._next_ids()
        entries = []
        for eid in ids:
            ahead = self._ahead.pop(eid, None)
            if ahead is not None:
                entries.append((eid, *ahead))
                continue
            try:
                entry = self._read(eid)
            except (KeyUnavailable, KeyMissing) as e:
                res.waiting_for_key = str(e)
                break
            except FileNotFoundError:
                continue
            except Exception as e:  # noqa: BLE001 - one poison message never stops the rest
                # The reason is stored and logged in the clear: the
                # exception's class only, never its text (it may quote the message).
                self._failed(eid, f"cannot prepare: {type(e).__name__}", res)
                continue
            entries.append((eid, entry, self._submit(entry) if self.parser else None))
        self._drop_ahead()
        digests = self._digests(entries)
        prepared: list[Prepared] = []
        for eid, entry, _ in entries:
            try:
                d = digests.get(eid)
                if isinstance(d, Exception):
                    raise d
                p = prepare(entry, self.router, d)
            except Exception as e:  # noqa: BLE001 - as above
                self._failed(eid, f"cannot prepare: {type(e).__name__}", res)
                continue
            if not p.tenants:
                self.spool.hold_unrouted(eid)
                if entry.envelope.tenant:
                    log.warning("%s: its connector's tenant %r is not configured; held in %s",
                                eid, entry.envelope.tenant, UNROUTED)
                else:
                    log.warning("%s: no tenant claims any of its %d envelope address(es); held in %s",
                                eid, len(routing_addresses(p.envelope)), UNROUTED)
                res.unrouted += 1
                continue
            prepared.append(p)
        if not res.waiting_for_key:
            self._parse_ahead(set(ids))
        done = self._store(prepared, res)
        self.spool.done_many(done)
        res.archived += len(done)
        finished = set(done)
        # Counted once, when archived (an entry that comes again is not).
        res.journal_untrusted += sum(1 for p in prepared
                                     if p.entry_id in finished and "journal_untrusted" in p.envelope)
        if self.on_anomaly is not None:
            self._anomalies([p for p in prepared if p.entry_id in finished])
        self._seal_due()
        return self._account(res)

    def _read(self, eid: str):
        try:
            return self.spool.read(eid)
        except KeyNotHeld as e:
            fetch = getattr(self.keys, "fetch", None)
            if fetch is None:
                raise KeyMissing(e.name, e.version) from None
            self.keys.ring.put(fetch(e.name, e.version))
            return self.spool.read(eid)
        except SpoolCorrupt as e:
            raise ValueError(str(e)) from None

    def _submit(self, entry) -> Future:
        return self.parser.submit(entry.data, entry.envelope.journaling)

    def _digests(self, entries) -> dict[str, dict | Exception]:
        """Each entry's digest from the parser processes: eid -> digest, or
        the exception that stands for it.  When a parser process dies, the
        entries it had are parsed again one at a time (a dead parser is
        replaced before the next), so that only a message that kills a
        parser by itself is blamed (and set aside after max_tries); the
        rest go on."""
        out: dict[str, dict | Exception] = {}
        lost = []
        for eid, entry, fut in entries:
            if fut is None:
                continue
            try:
                out[eid] = parseworker.wait(fut, self.parse_timeout)
            except parseworker.ParserDied:
                lost.append((eid, entry))
            except Exception as e:  # noqa: BLE001
                out[eid] = e
        for eid, entry in lost:
            try:
                out[eid] = parseworker.wait(self._submit(entry), self.parse_timeout)
            except parseworker.ParserDied as e:
                log.error("%s: the parser process died or hung on this message", eid)
                out[eid] = e
            except Exception as e:  # noqa: BLE001
                out[eid] = e
        return out

    def _parse_ahead(self, current: set[str]) -> None:
        """Start parsing the next batch while this one is stored.  Only
        reads the spool: an entry is immutable until it is done, and the
        next batch uses a digest only for the entry it was made from."""
        if self.parser is None:
            return
        for eid in self.spool.ready(limit=self.batch_size + len(current)):
            if len(self._ahead) >= self.batch_size:
                break
            if eid in current or eid in self._ahead:
                continue
            try:
                entry = self._read(eid)
            except Exception:  # noqa: BLE001 - the next batch reads it again and says what is wrong
                continue
            self._ahead[eid] = (entry, self._submit(entry))

    def _drop_ahead(self) -> None:
        # Their answers still come back and are thrown away.
        self._ahead.clear()

    def _account(self, res: BatchResult) -> BatchResult:
        t = self.totals
        for k in ("archived", "stored", "duplicates", "unrouted", "journal_untrusted", "failed", "set_aside"):
            setattr(t, k, getattr(t, k) + getattr(res, k))
        t.waiting_for_key = res.waiting_for_key
        t.paused = res.paused
        return res

    def _failed(self, eid: str, reason: str, res: BatchResult) -> None:
        log.error("%s: %s", eid, reason)
        res.failed += 1
        try:
            if self.spool.failed(eid, reason):
                res.set_aside += 1
                if self.on_anomaly is not None:
                    self.on_anomaly("set-aside", None, eid, {"reason": reason})
        except FileNotFoundError:
            pass

    def _anomalies(self, archived: list[Prepared]) -> None:
        """Audit records for what an auditor of the tenant should hear of:
        a journal report from an untrusted source, extraction cut short.
        Once per archived entry and tenant, named by its archive id."""
        for p in archived:
            kinds = []
            if "journal_untrusted" in p.envelope:
                kinds.append(("journal-untrusted", {"source": p.envelope.get("source") or "",
                                                    "connector": p.envelope.get("connector") or ""}))
            if ("extraction-truncated" in p.parsed.flags
                    or any("extraction-truncated" in a.flags for a in p.parsed.attachments)):
                kinds.append(("extraction-truncated", {}))
            for kind, detail in kinds:
                for tenant in p.tenants:
                    try:
                        aid = self.keys.archive_id(tenant, p.raw)
                    except (KeyUnavailable, KeyMissing):
                        aid = ""
                    self.on_anomaly(kind, tenant, aid or p.entry_id, {"spool_id": p.entry_id, **detail})

    def _classify(self, tenant: str, p: Prepared) -> list[str]:
        """Classification never stops archiving: a rule that fails on some
        message (a bug: rules are checked at load) archives it untagged,
        said in the log (the class of the error only: no message content)."""
        try:
            return self.router.classify(tenant, p)
        except Exception as e:  # noqa: BLE001
            log.error("%s: classification for %s failed (%s); archived without its tags",
                      p.entry_id, tenant, type(e).__name__)
            return []

    def _store(self, prepared: list[Prepared], res: BatchResult) -> list[str]:
        """Store, index, back up.  Returns the spool ids that are finished.
        A tenant whose key cannot be had holds back only the entries that
        go to it (they are tried again later, with no try counted); its
        other tenants' copies of them are stored now, and stored again
        idempotently when the entry comes back."""
        rows: dict[str, list[tuple[Prepared, Item]]] = defaultdict(list)
        blocked: dict[str, str] = {}          # tenant -> why its key is missing
        for p in prepared:
            for t in p.tenants:
                if t in blocked:
                    continue
                try:
                    aid = self.keys.archive_id(t, p.raw)
                except (KeyUnavailable, KeyMissing) as e:
                    blocked[t] = str(e)
                    rows.pop(t, None)
                    continue
                env = p.envelope
                tags = self._classify(t, p)
                if tags:
                    env = {**env, "tags": tags}       # this tenant's rules' tags, kept with this arrival
                rows[t].append((p, Item(aid, p.month, p.raw, p.entry_id, env, summary_of(p.parsed))))
        failed: set[str] = set()
        held: set[str] = set()                # left in the spool: the store cannot write now
        indexed: dict[tuple[str, str], list] = defaultdict(list)
        for tenant, group in rows.items():
            if res.paused:
                # The store said it cannot take writes: the other tenants'
                # shards are on the same file system; they wait too.
                held.update(p.entry_id for p, _ in group)
                continue
            try:
                outs = self.store.store(tenant, [it for _, it in group], self.keys)
                pairs = list(zip(group, outs))
            except (KeyUnavailable, KeyMissing) as e:
                blocked[tenant] = str(e)
                continue
            except Exception as e:  # noqa: BLE001 - find the entry that breaks the batch
                # A full, read-only or failing disk is no message's fault:
                # no try is counted, nothing is set aside (the LMDB
                # transaction was aborted: the shard is as it was).
                why = describe_fault("store", self.store.root, e)
                if why is not None:
                    res.paused = why
                    held.update(p.entry_id for p, _ in group)
                    continue
                pairs = []
                for n, (p, it) in enumerate(group):
                    try:
                        (o,) = self.store.store(tenant, [it], self.keys)
                        pairs.append(((p, it), o))
                    except (KeyUnavailable, KeyMissing) as e:
                        blocked[tenant] = str(e)
                        break
                    except Exception as e:  # noqa: BLE001
                        why = describe_fault("store", self.store.root, e)
                        if why is not None:
                            res.paused = why
                            held.update(q.entry_id for q, _ in group[n:])
                            break
                        failed.add(p.entry_id)
                        self._failed(p.entry_id, f"cannot store for {tenant}: {type(e).__name__}", res)
            for (p, it), o in pairs:
                if o.new_record:
                    res.stored += 1
                else:
                    res.duplicates += 1
                indexed[(tenant, o.month)].append((o, p))
                log.info("%s: archived for %s as %s/%s%s", p.entry_id, tenant, o.month, o.aid,
                         "" if o.new_record else " (duplicate: envelope added)" if o.new_envelope
                         else " (already archived)")
        for (tenant, month), docs in indexed.items():
            stage, where = "store", self.store.root
            try:
                shard = self.store.shard(tenant, month)
                stage, where = "index", shard.index_dir
                with ShardIndex(shard.index_dir).writer() as w:
                    for o, p in docs:
                        addrs, env_only, tags = index_terms(o.meta, p.parsed)
                        w.add(o.aid, p.parsed, envelope=addrs, envelope_only=env_only, tags=tags,
                              date=effective_date(p.parsed.date, p.envelope.get("received_at") or o.meta["first_seen"]),
                              size=len(p.raw), arrival=arrival_of(o.meta),
                              listing=seal_listing(o.meta.get("summary") or {}, tenant, o.month,
                                                   bytes.fromhex(o.aid), self.keys))
                    w.set_indexed_seq(shard.head()[0])
                if self.backup is not None:
                    stage, where = "backup", self.backup.dir
                    self.backup.ship(shard)
            except Exception as e:  # noqa: BLE001 - the entries stay in the spool and come again
                # Not the messages' fault: no tries counted, nothing set
                # aside; the archiver pauses and tries again (backing off).
                # The Xapian transaction was cancelled; a torn backup frame
                # is dropped by the next ship; the records are committed and
                # are indexed and shipped again when their entries come back.
                why = describe_fault(stage, where, e)
                if why is None:
                    why = f"{stage} of {tenant}/{month} failed ({type(e).__name__})"
                    # The error's own words (an index lock, a damaged backup
                    # log), once while it stays the same: the archiver's
                    # pause line says the rest.
                    detail = f"{tenant}/{month}: cannot {stage}: {type(e).__name__}: {e}"
                    (log.debug if detail == self._stage_fault else log.warning)("%s", detail)
                    self._stage_fault = detail
                res.paused = res.paused or why
                for _, p in docs:
                    held.add(p.entry_id)
                continue
            res.shards.add((tenant, month))
            self._dirty.setdefault((tenant, month), self.clock())
        if not res.paused:
            self._stage_fault = ""
        waiting = self._defer(prepared, blocked, res)
        held -= failed
        res.held = len(held - waiting)
        return [p.entry_id for p in prepared
                if p.entry_id not in failed and p.entry_id not in waiting and p.entry_id not in held]

    def _defer(self, prepared: list[Prepared], blocked: dict[str, str], res: BatchResult) -> set[str]:
        """Put off the entries that go to a tenant without its key; the wait
        doubles per tenant (1 s .. 60 s) while its key stays missing."""
        for t in {t for p in prepared for t in p.tenants} - set(blocked):
            self._key_waits.pop(t, None)
        if not blocked:
            return set()
        for t in blocked:
            self._key_waits[t] = min(max(self._key_waits.get(t, 0.5) * 2, 1.0), 60.0)
        res.waiting_for_key = "; ".join(dict.fromkeys([*filter(None, [res.waiting_for_key]), *blocked.values()]))
        now = self.clock()
        waiting = set()
        for p in prepared:
            held = [t for t in p.tenants if t in blocked]
            if held:
                waiting.add(p.entry_id)
                self._deferred[p.entry_id] = now + max(self._key_waits[t] for t in held)
            else:
                self._deferred.pop(p.entry_id, None)
        res.deferred = len(waiting)
        log.warning("%d entr%s wait for a key (%s); the rest go on", len(waiting),
                    "y" if len(waiting) == 1 else "ies", res.waiting_for_key)
        return waiting

    def _seal_due(self, force: bool = False) -> None:
        if not self._dirty or self.seal_seed is None:
            return
        now = self.clock()
        due = [k for k, t in self._dirty.items() if force or now - t >= self.seal_interval]
        if not due:
            return
        try:
            seed = self.seal_seed()
        except (KeyUnavailable, KeyMissing) as e:
            log.warning("cannot seal %d shard(s): %s", len(due), e)
            return
        if seed is None:
            return
        for tenant, month in due:
            shard = self.store.shard(tenant, month)
            try:
                s = shard.seal(seed, timestamper=self.timestamper)
                if self.backup is not None:
                    self.backup.ship(shard)
            except Exception as e:  # noqa: BLE001 - sealing is retried at the next interval
                why = describe_fault("store", self.store.root, e)
                if why is not None:
                    # Tried at every batch while it lasts: said once.
                    (log.debug if why == self._seal_fault else log.warning)(
                        "%s/%s: cannot seal now: %s", tenant, month, why)
                    self._seal_fault = why
                else:
                    log.error("%s/%s: cannot seal: %s: %s", tenant, month, type(e).__name__, e)
                continue
            del self._dirty[(tenant, month)]
            self._seal_fault = ""
            if s is not None:
                log.info("%s/%s: sealed at chain entry %d%s", tenant, month, s.seq,
                         " (with a time stamp)" if s.tsa_token else "")

    def seal_all(self) -> None:
        if not self._dirty:
            return
        with self.lock if self.lock.fd is None else _nothing():
            self._seal_due(force=True)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def make_parser(processes: int, limits: parse.Limits | None = None) -> parseworker.ParserPool | None:
    """The parser pool (None: parse in this process); `limits` become this
    process's extraction budget too, for what is parsed here."""
    if limits is not None:
        parse.configure(limits)
    return parseworker.ParserPool(processes, limits) if processes > 0 else None


def make_timestamper(url: str, ca_file: Path | None):
    if not url:
        return None
    from mailtresor.archive import tsa

    def stamp(message: bytes) -> bytes:
        # A TSA outage must not stop sealing: the seal is signed anyway,
        # without the third-party time, and the log says so.
        try:
            return tsa.timestamp(url, message, ca_file)
        except tsa.TimestampError as e:
            log.warning("seal without a time stamp: %s", e)
            return b""
    return stamp


class Archiver:
    """Runs the pipeline from the reactor: a batch at a time on a thread
    of its own, again at once while the spool has entries, else after
    `interval` seconds."""

    def __init__(self, cfg, reactor, pipeline: Pipeline):
        """`pipeline`: mailtresor.assemble.build_pipeline's, over the
        daemon's spool and a FetchingKeys."""
        from twisted.python.threadpool import ThreadPool

        a = cfg.archive
        self.cfg, self.reactor, self.spool = cfg, reactor, pipeline.spool
        self.keys = pipeline.keys
        self.store = pipeline.store
        self.pipeline = pipeline
        self.interval = a.interval
        # Held by a batch, and by the daemon's query socket while it reads
        # the store: an LMDB environment must not be open twice in one
        # process, so both use self.store, one at a time.
        self.store_lock = threading.Lock()
        self.pool = ThreadPool(1, 1, name="archiver")
        self._call = None
        self._running = None
        self._stopped = False
        self.last_batch = 0.0
        self.status_text = "starting"
        self._key_wait = 0.0
        self.paused = ""                # why archiving waits now ("" when it does not)
        self.paused_since = 0.0
        self.next_try = 0.0             # when the next batch runs while paused (time.time())
        self.on_change = None           # called when the state changes between running and paused

    def start(self) -> None:
        self.pool.start()
        self._schedule(0)

    def _schedule(self, delay: float) -> None:
        if not self._stopped:
            self._call = self.reactor.callLater(delay, self._tick)

    def _tick(self) -> None:
        from twisted.internet import threads
        self._call = None
        if self._stopped:
            return
        self._running = threads.deferToThreadPool(self.reactor, self.pool, self._batch)
        self._running.addCallbacks(self._after, self._crashed)

    def _batch(self) -> BatchResult:
        with self.store_lock:
            return self.pipeline.run_batch()

    def _after(self, res: BatchResult) -> None:
        self._running = None
        self.last_batch = time.time()
        busy = res.archived + res.failed + res.unrouted
        # Pause (backing off) when the store, index or backup cannot take
        # writes (a full or failing disk: the entries stay in the spool, no
        # try counted), or when nothing could be done for want of a key;
        # entries that only wait for a tenant's key do not hold back the rest.
        reason = res.paused or (res.waiting_for_key if res.waiting_for_key and (not busy or not res.deferred)
                                else "")
        if reason:
            self._key_wait = min(max(self._key_wait * 2, 1.0), self.cfg.control.retry_max)
            self._pause(reason)
            self._schedule(self._key_wait)
            return
        if res.locked:
            self.status_text = f"paused: {res.locked}"
            self._schedule(max(self.interval, 1.0))
            return
        self._key_wait = 0.0
        self._resume()
        self.status_text = "archiving" if busy else "idle"
        if res.waiting_for_key:
            self.status_text += f"; some mail waits for a key: {res.waiting_for_key}"
        self._schedule(0 if busy >= self.pipeline.batch_size else self.interval)

    def _pause(self, reason: str) -> None:
        """Say why archiving waits: in the status at every try, in the log
        once per change of reason (a pause can last hours: one line a
        retry would bury everything else)."""
        now = time.time()
        self.next_try = now + self._key_wait
        self.status_text = f"paused: {reason}; next try in {self._key_wait:.0f} s"
        if reason != self.paused:
            if not self.paused:
                self.paused_since = now
            self.paused = reason
            log.warning("archiver paused: %s; the mail waits in the spool (no tries counted) and archiving "
                        "resumes by itself; retrying every %.0f s at most", reason, self.cfg.control.retry_max)
            self._changed()
        else:
            log.debug("archiver still paused: %s; next try in %.0f s", reason, self._key_wait)

    def _resume(self) -> None:
        if self.paused:
            log.warning("archiver resumed after %.0f s (was paused: %s)", time.time() - self.paused_since,
                        self.paused)
            self.paused, self.paused_since, self.next_try = "", 0.0, 0.0
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception as e:  # noqa: BLE001 - a status file is never a reason to stop archiving
                log.debug("status update failed: %s", e)

    def _crashed(self, f) -> None:
        self._running = None
        log.error("archiver batch failed: %s", f.getErrorMessage())
        self.status_text = f"error: {f.getErrorMessage()}"
        self._schedule(max(self.interval, 5.0))

    def exclusive(self, fn, *args, **kw):
        """Run fn(pipeline, *args, **kw) on the archiver's thread, between
        batches, holding the store lock and the store's writer lock: the
        one way for other parts of the daemon (retention deletions, case
        tags) to write to the store.  Returns a Deferred of fn's result;
        StoreLocked if another process (a CLI import) holds the writer lock."""
        from twisted.internet import threads

        def run():
            with self.store_lock:
                p = self.pipeline
                took = p.lock.fd is None
                if took:
                    p.lock.acquire()
                try:
                    return fn(p, *args, **kw)
                finally:
                    p.store.close()
                    if took and not p.hold_lock:
                        p.lock.release()
        return threads.deferToThreadPool(self.reactor, self.pool, run)

    def expire_keys(self, max_age: float) -> None:
        if self.keys.ring.expire("tenant.", max_age):
            self.pool.callInThread(self.keys.forget)

    def stop(self):
        """Finish the batch in hand, seal what changed, stop the thread."""
        from twisted.internet import defer, threads

        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        d = self._running if self._running is not None else defer.succeed(None)

        def sealed(_):
            return threads.deferToThreadPool(self.reactor, self.pool, self._close)

        def done(_):
            self.pool.stop()
        return d.addBoth(sealed).addBoth(done)

    def _close(self) -> None:
        with self.store_lock:
            try:
                self.pipeline.seal_all()
            finally:
                self.store.close()
                if self.pipeline.parser is not None:
                    self.pipeline.parser.close()

    def status(self) -> dict:
        t = self.pipeline.totals
        out = {"state": self.status_text, "archived": t.archived, "stored": t.stored,
               "duplicates": t.duplicates, "unrouted": t.unrouted,
               "journal_untrusted": t.journal_untrusted, "failed": t.failed,
               "set_aside": t.set_aside, "last_batch": self.last_batch,
               # "" while archiving goes on; else why it waits (a full
               # store, a missing key...), since when and the next try.
               "paused": self.paused}
        if self.paused:
            out["paused_since"] = self.paused_since
            out["next_try_in"] = max(0.0, round(self.next_try - time.time(), 1))
        return out
