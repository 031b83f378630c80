"""Building the parts from the configuration: one way, for the daemon, the
CLI and the tests alike.

Each function takes the loaded configuration (mailtresor.config.Config) and
what the part needs from other parts, and returns the part.  What differs
between a caller and another is a named argument here (`tool=True` for a
command-line tool's handle on the daemon's spool), never a copy of the
field-by-field construction.

    ring   = build_ring()
    client = build_control_client(cfg, reactor=reactor)   # the one control-endpoint client
    keys   = build_keys(cfg, ring=ring, client=client)     # tenant sub-keys, fetched when needed
    spool  = build_spool(cfg, ring)
    store  = build_store(cfg)
    pipe   = build_pipeline(cfg, spool, store, keys)       # spool -> parse -> route -> store -> index
    audit  = build_audit(cfg, keys, name="mailtresor")     # the audit trail
    core   = build_core(cfg, store, keys, audit)           # the one access core (search, read, export)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mailtresor.access.audit import AuditLog
    from mailtresor.access.core import Core
    from mailtresor.archive.archiver import Pipeline
    from mailtresor.archive.store.backup import BackupDirectory
    from mailtresor.archive.store.shard import Store
    from mailtresor.config import Config
    from mailtresor.ingest.spool import Spool
    from mailtresor.keys.client import ControlClient
    from mailtresor.keys.derive import FetchingKeys
    from mailtresor.keys.ring import KeyRing

# The imports are inside the functions: a CLI command that only moves
# spool files must not load the archive (LMDB, Xapian, the parser).


def build_ring() -> "KeyRing":
    """An empty in-memory key ring."""
    from mailtresor.keys.ring import KeyRing
    return KeyRing()


def build_control_client(cfg: "Config", *, reactor=None) -> "ControlClient":
    """The client to the control endpoint of the configuration's [control]
    section; `reactor` for its Deferred face (the daemon)."""
    from mailtresor.keys.client import ControlClient
    return ControlClient.from_config(cfg, reactor=reactor)


def build_keys(cfg: "Config", *, ring: "KeyRing | None" = None,
               client: "ControlClient | None" = None) -> "FetchingKeys":
    """Tenant keys over `ring` (a new one if None), fetched when first
    needed through `client` (a new blocking one if None)."""
    from mailtresor.keys.derive import FetchingKeys
    if ring is None:
        ring = build_ring()
    if client is None:
        client = build_control_client(cfg)
    return FetchingKeys(ring, client.fetch_blocking)


def build_spool(cfg: "Config", ring, *, tool: bool = False) -> "Spool":
    """The spool of the configuration's [spool] section over the key ring
    `ring` (a KeyRing, or anything with its current()/get()).

    `tool=True`: a command-line tool's handle on the daemon's spool.  It
    reads, moves and archives entries but accepts no mail from the
    network, so it never refuses for want of free space (the daemon's
    `min_free_bytes` keeps room for mail that is being received)."""
    from mailtresor.ingest.spool import Spool
    sp = cfg.spool
    return Spool(sp.directory, ring, max_message_size=sp.max_message_size,
                 min_free_bytes=0 if tool else sp.min_free_bytes, max_entries=sp.max_entries,
                 sync=sp.sync, max_tries=sp.max_tries)


def _archive(cfg: "Config"):
    if cfg.archive is None:
        raise ValueError(f"{cfg.source}: no [archive] section")
    return cfg.archive


def build_store(cfg: "Config", *, readonly: bool = False) -> "Store":
    """The archive store of the configuration's [archive] section."""
    from mailtresor.archive.store.shard import Store
    a = _archive(cfg)
    return Store(a.directory, readonly=readonly, max_open_shards=a.max_open_shards)


def build_backup(cfg: "Config") -> "BackupDirectory | None":
    """The backup directory, if [archive] backup_directory is set."""
    from mailtresor.archive.store.backup import BackupDirectory
    a = _archive(cfg)
    return BackupDirectory(a.backup_directory) if a.backup_directory else None


def build_pipeline(cfg: "Config", spool: "Spool", store: "Store", keys: "FetchingKeys", *,
                   timestamps: bool = True) -> "Pipeline":
    """The archive pipeline (spool -> parse -> route -> store -> index) of
    the configuration's [archive] section and tenants.  `timestamps=False`
    leaves the RFC 3161 time-stamping authority out (a CLI import seals
    without asking a third party; the daemon's next seal carries one)."""
    from mailtresor.archive import parse
    from mailtresor.archive.archiver import Pipeline, Router, make_parser, make_timestamper
    a = _archive(cfg)
    kw = {}
    if timestamps:
        kw = {"seal_interval": a.seal_interval, "timestamper": make_timestamper(a.tsa_url, a.tsa_ca_file)}
    return Pipeline(spool, store, keys, Router(cfg.tenant), backup=build_backup(cfg),
                    seal_seed=keys.seal_seed, batch_size=a.batch_size,
                    parser=make_parser(a.parse_processes, parse.limits_of(a)), **kw)


def build_audit(cfg: "Config", keys, *, name: str = "mailtresord") -> "AuditLog":
    """The audit trail of the configuration's [audit] section.  `name` says
    which program appends (the daemon, or a command in its own process)."""
    from mailtresor.access.audit import AuditLog
    return AuditLog(cfg.audit.directory, keys, seal_every=cfg.audit.seal_every, name=name)


def build_core(cfg: "Config", store: "Store", keys, audit: "AuditLog", *, exports_dir=None,
               readers=None, store_lock=None) -> "Core":
    """The access core over `store`, `keys` and `audit`, for the
    configuration's tenants and parser limits.  Exports go to
    `exports_dir` (default: the state directory's exports/).  `store_lock`:
    the lock of whoever else uses `store` in this process (the archiver)."""
    from mailtresor.access.core import Core
    from mailtresor.archive import parse
    a = _archive(cfg)
    if exports_dir is None:
        exports_dir = cfg.appliance.state_directory / "exports"
    return Core(store=store, keys=keys, audit=audit, readers=readers, exports_dir=exports_dir,
                tenants=[t.name for t in cfg.tenant], limits=parse.limits_of(a), store_lock=store_lock)
