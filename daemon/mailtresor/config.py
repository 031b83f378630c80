"""Configuration: one TOML file, parsed strictly.

Every section is a frozen dataclass; the parser walks the type hints, so the
schema lives in one place.  An unknown key, a missing required key or a value
of the wrong type is a `ConfigError` naming the file and the dotted key, and
no program starts with a configuration it does not fully understand.

Relative paths are resolved against the working directory of the program
(`make run` runs from the checkout; the systemd unit sets
`WorkingDirectory=/`, where the packaged configuration uses absolute paths).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# Defined in the package, where the CLI's --help finds them without this module.
from mailtresor import CONFIG_ENV_VAR as ENV_VAR, CONFIG_PATH as DEFAULT_PATH, RUNTIME_DIRECTORY

from . import activation

_TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,55}$")   # "tenant." + this is a key name
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


class ConfigError(Exception):
    """The configuration cannot be used; the message names file and key."""


# Each section has a docstring: dataclass() makes one with inspect.signature()
# for a class without, at import, which every `mailtresor` command pays for.

@dataclass(frozen=True)
class Appliance:
    """[appliance]: this appliance's name and directories."""

    name: str
    hostname: str = "localhost"
    runtime_directory: Path = Path(RUNTIME_DIRECTORY)
    state_directory: Path = Path("/var/lib/mailtresor")


@dataclass(frozen=True)
class Control:
    """How this appliance reaches its control endpoint (mutual TLS)."""

    url: str
    ca_file: Path
    cert_file: Path
    key_file: Path
    timeout: float = 10.0
    retry_initial: float = 1.0
    retry_max: float = 60.0
    # How often the current spool key version is asked again (rotation).
    refresh_interval: float = 600.0
    # How long a tenant key stays in memory after its last fetch.
    key_cache_seconds: float = 3600.0


@dataclass(frozen=True)
class Spool:
    """[spool]: the encrypted spool between ingest and the archive."""

    directory: Path
    max_message_size: int = 50 * 1024 * 1024
    # Below this much free space, new mail gets 452 4.3.1.
    min_free_bytes: int = 64 * 1024 * 1024
    max_entries: int = 200_000
    # "auto": syncfs(2) when the spool is a file system of its own (one flush
    # for a whole batch), per-file fsync otherwise.
    sync: Literal["auto", "fsync", "syncfs"] = "auto"
    max_tries: int = 5


@dataclass(frozen=True)
class TLS:
    """[tls]: the relay's certificate and what it asks of clients."""

    cert_file: Path
    key_file: Path
    # CA whose certificates identify connector clients (mTLS); optional.
    client_ca_file: Path | None = None
    min_version: Literal["1.2", "1.3"] = "1.2"


@dataclass(frozen=True)
class Listener:
    """[[relay.listener]]: one relay listening endpoint."""

    endpoint: str
    tls: Literal["starttls", "implicit"]
    name: str = ""


@dataclass(frozen=True)
class Connector:
    """Who may deliver: a source network and/or a client certificate."""

    name: str
    networks: tuple[str, ...] = ()
    client_cert: Literal["required", "optional"] = "optional"
    # Subject common names accepted (empty: any certificate from the CA).
    client_cert_names: tuple[str, ...] = ()
    # Tenant this connector delivers for (an Exchange journal rule).
    tenant: str = ""
    # The journal addresses this connector may deliver to (RCPT TO, compared
    # without regard to case); empty: any recipient.
    recipients: tuple[str, ...] = ()
    # A journaling connector: Exchange journal reports it delivers are
    # unwrapped (only from such a connector; from anywhere else a report is
    # archived as received and flagged).  Needs client_cert = "required" and
    # a tenant.
    journal: bool = False
    # Exchange Online: the organisation's tenant id (a GUID).  Every
    # Microsoft 365 organisation presents the same client certificate, so a
    # report is trusted only if its X-MS-Exchange-CrossTenant-Id is this one;
    # needs journal = true and the secret journal address in `recipients`.
    exchange_tenant_id: str = ""


@dataclass(frozen=True)
class Relay:
    """[relay]: the TLS-only SMTP relay."""

    listener: tuple[Listener, ...] = ()
    connector: tuple[Connector, ...] = ()
    max_connections: int = 100
    # Sessions one client address may hold at once, per relay process (each
    # process counts its own; see docs/OPERATIONS.md).  Over it: 421 4.7.0
    # on a STARTTLS port, the connection closed unanswered on an
    # implicit-TLS one.  0: no per-client limit.
    max_connections_per_client: int = 20
    max_recipients: int = 1000
    # Idle time (no byte received) after which a session is cut (421 4.4.2).
    timeout: float = 300.0
    # A TLS handshake (implicit TLS, or after STARTTLS) must be done within
    # this many seconds, or the connection is dropped.
    handshake_timeout: float = 10.0
    # Whatever the session does, it ends after this many seconds (421 4.4.2,
    # an unfinished DATA is thrown away, never half-stored); long enough for
    # a big journal batch.  0: no deadline.
    session_timeout: float = 3600.0
    # During DATA, fewer than min_data_rate bytes per second over a window
    # of data_rate_window seconds cut the session (421 4.4.2): one byte every
    # few seconds cannot hold a connection.  0: no minimum.
    min_data_rate: int = 256
    data_rate_window: float = 30.0
    # A bare <LF> or <CR> inside a message: "keep" stores the bytes as they
    # came and flags the message (flag:bare-newline); "reject" refuses it
    # with 550 5.5.2 (the sender bounces it: the archive never has it).
    bare_newline: Literal["keep", "reject"] = "keep"
    # Processes accepting relay connections on the same listening sockets
    # (the main one and workers); 0: one per CPU plus one, so that a process
    # waiting for its group commit does not leave a CPU idle.
    processes: int = 0


@dataclass(frozen=True)
class Milter:
    """[milter]: the milter for an MTA in front of the appliance."""

    listen: str
    enabled: bool = True
    # "tempfail": the MTA retries later; mail is never let through un-archived.
    # "accept": mail flows on even when it could not be archived (logged loudly).
    on_failure: Literal["tempfail", "accept"] = "tempfail"
    # Seconds the MTA waits for us (libmilter's timeout).
    timeout: int = 60
    socket_mode: int = 0o660


@dataclass(frozen=True)
class Archive:
    """The archiver and the store it fills."""

    # Per tenant and month: DIR/TENANT/YYYY-MM/{lmdb,xapian}.
    directory: Path
    # A directory that receives every record and tombstone, still
    # encrypted (it holds no keys); leave the key out for no backup.
    backup_directory: Path | None = None
    enabled: bool = True
    batch_size: int = 200
    # Shard environments the archiver keeps open (least recently used is
    # closed first).  Each open shard's touched pages stay in the process's
    # RSS; raise this with many tenants writing at once.
    max_open_shards: int = 4
    # Child processes that parse mail for the archiver (0: parse in the
    # archiver's own thread).  See mailtresor/parseworker.py.
    parse_processes: int = 1
    # The extraction budget of one message (parse.Limits): CPU seconds
    # (plus so many per MiB of the message), characters of text in all,
    # bytes decoded and decompressed beyond the message's own size,
    # attached-message depth, MIME parts, multipart nesting.  A message over
    # it is archived with what was read and flagged extraction-truncated.
    extract_cpu_seconds: float = 2.0
    extract_cpu_seconds_per_mib: float = 1.0
    extract_max_text: int = 4_000_000
    extract_max_expanded: int = 128 * 1024 * 1024
    extract_max_depth: int = 3
    extract_max_parts: int = 1000
    extract_max_nesting: int = 60
    # Seconds between looks at the spool when it was empty.
    interval: float = 0.5
    # Seconds between seals of a shard that changed.
    seal_interval: float = 300.0
    # RFC 3161 time-stamping authority for seals (HTTP POST of a TSQ); "" for none.
    tsa_url: str = ""
    tsa_ca_file: Path | None = None


@dataclass(frozen=True)
class Service:
    """[service]: the daemon itself."""

    shutdown_timeout: float = 30.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"


# --- access: logins, sessions, per-tenant directories ---------------------------

@dataclass(frozen=True)
class Ldap:
    """[tenant.ldap]: the tenant's directory (LDAPS, or LDAP with StartTLS)."""

    url: str
    base: str
    ca_file: Path | None = None           # None: the system's CA store
    start_tls: bool = False               # needed with an ldap:// url
    # {username} is replaced by the login name, escaped (RFC 4515).
    filter: str = "(&(objectClass=inetOrgPerson)(uid={username}))"
    # The search bind; without it the user is looked up anonymously.
    bind_dn: str = ""
    bind_password_file: Path | None = None
    address_attributes: tuple[str, ...] = ("mail",)
    # Where groups are looked up by (member=<user DN>); default: base.
    group_base: str = ""
    # Group DN -> role.
    roles: dict[str, str] = field(default_factory=dict)
    # Roles every directory user has, whatever their groups.
    default_roles: tuple[str, ...] = ("user",)
    timeout: float = 10.0


@dataclass(frozen=True)
class Access:
    """[access]: logins and sessions."""

    # users.db and tokens.db; default STATE/access.
    directory: Path | None = None
    session_idle: float = 1800.0
    session_absolute: float = 43200.0
    # Failed logins per user name and per client address within
    # throttle_window seconds before back-off (throttle_base * 2^n seconds,
    # at most throttle_max_delay).
    throttle_failures: int = 5
    throttle_window: float = 300.0
    throttle_base: float = 1.0
    throttle_max_delay: float = 900.0


def access_directory(cfg: "Config") -> Path:
    return cfg.access.directory or cfg.appliance.state_directory / "access"


def _check_access(cfg: "Config", fail) -> None:
    from .access.principal import ROLES      # the one list of role names
    a = cfg.access
    if a.session_idle < 60:
        fail("access.session_idle", "must be at least 60 seconds")
    if a.session_absolute < a.session_idle:
        fail("access.session_absolute", "must be at least access.session_idle")
    if a.throttle_failures < 1:
        fail("access.throttle_failures", "must be at least 1")
    if a.throttle_window < 1:
        fail("access.throttle_window", "must be at least 1 second")
    if a.throttle_max_delay < a.throttle_base:
        fail("access.throttle_max_delay", "must be at least access.throttle_base")
    for i, t in enumerate(cfg.tenant):
        ld = t.ldap
        if ld is None:
            continue
        key = f"tenant[{i}].ldap"
        if ld.url.startswith("ldaps://"):
            if ld.start_tls:
                fail(f"{key}.start_tls", "not with an ldaps:// url (it is TLS already)")
        elif ld.url.startswith("ldap://"):
            if not ld.start_tls:
                fail(f"{key}.url", "ldap:// needs start_tls = true (passwords travel only over TLS)")
        else:
            fail(f"{key}.url", f"{ld.url!r}: use ldaps://HOST[:PORT] or ldap://HOST[:PORT] with start_tls = true")
        if "{username}" not in ld.filter or not (ld.filter.startswith("(") and ld.filter.endswith(")")):
            fail(f"{key}.filter", "must be an LDAP filter in parentheses containing {username}")
        if bool(ld.bind_dn) != (ld.bind_password_file is not None):
            fail(f"{key}.bind_dn", "bind_dn and bind_password_file go together")
        if not ld.address_attributes:
            fail(f"{key}.address_attributes", "name at least one attribute (e.g. mail)")
        for dn, role in ld.roles.items():
            if role not in ROLES or role == "appliance-admin":
                fail(f"{key}.roles", f"group {dn!r}: {role!r} is not a tenant role "
                     f"({', '.join(r for r in ROLES if r != 'appliance-admin')})")
        for r in ld.default_roles:
            if r not in ROLES or r == "appliance-admin":
                fail(f"{key}.default_roles", f"{r!r} is not a tenant role")


@dataclass(frozen=True)
class Api:
    """[api]: the HTTPS API (mailtresor.access.api), TLS only.  The daemon
    also answers it on RUNTIME_DIRECTORY/api.sock for root and its own user."""

    enabled: bool = True
    # A Twisted endpoint string, ssl: only (e.g. ssl:8443:interface=192.0.2.1),
    # or systemd:name=NAME (a socket from mailtresor-api.socket; TLS added here).
    listen: str = "ssl:8443:interface=127.0.0.1"
    # Default: the [tls] certificate and key.  With neither, the API is
    # answered on the unix socket only (the `mailtresor` command's way in).
    cert_file: Path | None = None
    key_file: Path | None = None
    max_body: int = 1 << 20                 # bytes of a request body (413 beyond)
    # Seconds a connection may stay idle (between or inside requests).
    timeout: float = 60.0
    max_connections: int = 256
    max_connections_per_client: int = 32
    # Threads that run the access core's blocking calls (LMDB, Xapian, argon2).
    threads: int = 8
    # Who may scrape /metrics without logging in (a Prometheus server).
    metrics_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")


@dataclass(frozen=True)
class Audit:
    """[audit]: the audit trail of every access (mailtresor/access/audit.py)."""

    # Default: appliance.state_directory + "/audit".
    directory: Path | None = None
    # A seal (Ed25519, the seal key) after this many records; also when a
    # segment is full and when the daemon stops.
    seal_every: int = 1000


@dataclass(frozen=True)
class Lifecycle:
    """[lifecycle]: the daily retention job (mailtresor/lifecycle/job.py)."""

    enabled: bool = True
    # When the job runs each day, "HH:MM" in UTC.
    run_at: str = "03:00"
    # After the deletions, months unchanged for this many days are compacted.
    compact_quiet_days: int = 7


@dataclass(frozen=True)
class Classify:
    """[[tenant.classify]]: a tag put on mail as it is archived, by ONE
    condition (archive/classify.py, docs/lifecycle/tags.md)."""

    tag: str
    header: str = ""
    equals: str | None = None
    contains: str | None = None
    matches: str | None = None           # a regular expression (bounded)
    label: str | None = None             # with header = "msip_labels": a Purview label's name or GUID
    value_tag: bool = False              # tag "TAG:<normalised value>"
    sender_domain: tuple[str, ...] = ()
    recipient: tuple[str, ...] = ()
    recipient_group: str = ""            # a list in [tenant.groups]
    # Only for mail from a path bound to the tenant (its relay connector,
    # e.g. the journaling connector) or the milter: not for a header that
    # any sender on the Internet could set.
    trusted_only: bool = False


@dataclass(frozen=True)
class Tenant:
    """[[tenant]]: an archive of its own for mail to its domains."""

    name: str
    domains: tuple[str, ...]
    ldap: Ldap | None = None
    # The records of processing (GDPR Art. 30) and the subject access
    # report (lifecycle/gdpr.py) name these; empty: the defaults there
    # (the tenant's name; no contact given; archiving for legal retention
    # duties under Art. 6(1)(c) and (f); no transfers to third countries).
    controller: str = ""
    contact: str = ""
    purposes: tuple[str, ...] = ()
    legal_basis: str = ""
    transfers: tuple[str, ...] = ()
    classify: tuple[Classify, ...] = ()
    # [tenant.groups]: name -> addresses (recipient_group rules).
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class ControlAppliance:
    """[[control_server.appliance]]: an appliance the control endpoint serves."""

    name: str
    # Client certificate subject common names that identify this appliance.
    cert_names: tuple[str, ...]


@dataclass(frozen=True)
class ControlServer:
    """The reference key-custody service (mailtresor-control)."""

    listen: str
    cert_file: Path
    key_file: Path
    client_ca_file: Path
    keystore: Path
    audit_log: Path
    # Where the master secret comes from: "credential:NAME" (systemd
    # LoadCredential=), "fd:N", "prompt", or "file:PATH" (development only).
    master_key: str = "credential:master-key"
    appliance: tuple[ControlAppliance, ...] = ()
    # Connections held at once.  When full, a new connection takes the slot
    # of the oldest one that has not finished its TLS handshake (which
    # needs a certificate from the CA); with none, it is refused.
    max_connections: int = 256
    # Connections one client address may hold at once.
    max_connections_per_client: int = 16
    # Seconds to finish the TLS handshake (client certificate included).
    handshake_timeout: float = 10.0
    # Seconds a connection may stay idle between requests.
    idle_timeout: float = 30.0


# --- sftp ---
@dataclass(frozen=True)
class Backup:
    """[backup]: a copy of the backup directory ([archive] backup_directory)
    on a remote target that holds no keys (archive/store/remote.py,
    docs/BACKUP.md)."""

    # "sftp://USER@HOST:PORT/PATH"; empty: no remote backup.
    remote: str = ""
    # The target's host key, pinned (OpenSSH known_hosts format, "[HOST]:PORT
    # KEY" for a port other than 22).  A key not in it is refused.
    known_hosts: Path | None = None
    # The private key this appliance logs in with: a path, or
    # "credential:NAME" for a systemd credential (LoadCredential=).
    identity_file: str = ""
    # Seconds between pushes (the first one shortly after the daemon starts).
    interval: float = 300.0
    # Seconds to connect (TCP, SSH banner, authentication), and to wait for
    # any answer once connected.
    connect_timeout: float = 10.0
    io_timeout: float = 30.0
    # Seconds before the first retry after a failed push; doubles up to interval.
    retry_initial: float = 10.0


# --- volumes ---
@dataclass(frozen=True)
class Volume:
    """[[volume]]: an encrypted volume whose key (`volume.NAME`) the control
    endpoint holds (mailtresor/volumes/, docs/VOLUMES.md)."""

    name: str
    kind: Literal["fscrypt", "luks"] = "fscrypt"
    # fscrypt: empty directories on one ext4 file system with the encrypt feature.
    directories: tuple[Path, ...] = ()
    # luks: the block device and where its file system is mounted.
    device: Path | None = None
    mountpoint: Path | None = None


def _check_volumes(cfg: "Config", fail) -> None:
    seen, dirs = set(), {}
    for i, v in enumerate(cfg.volume):
        where = f"volume[{i}]"
        if not _TENANT_NAME.match(v.name):
            fail(f"{where}.name", f"{v.name!r}: use lower-case letters, digits, '-' and '_', starting with a "
                 "letter or digit, at most 56 characters (it names the key volume.NAME)")
        if v.name in seen:
            fail(f"{where}.name", f"volume {v.name!r} is defined twice")
        seen.add(v.name)
        if v.kind == "fscrypt":
            if v.device is not None or v.mountpoint is not None:
                fail(where, "an fscrypt volume has directories, not device/mountpoint (those are for kind = \"luks\")")
            if not v.directories:
                fail(f"{where}.directories", "an fscrypt volume needs at least one directory")
            for j, d in enumerate(v.directories):
                if not d.is_absolute():
                    fail(f"{where}.directories[{j}]", f"{str(d)!r} is not an absolute path")
                if d in dirs:
                    fail(f"{where}.directories[{j}]", f"{d} is also in volume {dirs[d]!r}")
                dirs[d] = v.name
        else:
            if v.directories:
                fail(f"{where}.directories", "a luks volume has device and mountpoint, not directories "
                     "(those are for kind = \"fscrypt\")")
            if v.device is None or v.mountpoint is None:
                fail(where, "a luks volume needs both device (e.g. \"/dev/sdb1\") and mountpoint")
            for key in ("device", "mountpoint"):
                if not getattr(v, key).is_absolute():
                    fail(f"{where}.{key}", f"{str(getattr(v, key))!r} is not an absolute path")


# --- federation ---
@dataclass(frozen=True)
class FederationPeer:
    """[[federation.peer]]: another appliance of the same region that holds
    (some of) the archive of `tenants`, or that this appliance serves."""

    name: str
    # HOST:PORT of the peer's [federation] serve endpoint (mutual TLS).
    address: str = ""
    # Tenants whose shards the peer holds: searched there too (the searching side).
    tenants: tuple[str, ...] = ()
    # Tenants whose shards this appliance serves to the peer (the serving side).
    serve: tuple[str, ...] = ()
    # Certificate subject common names that identify the peer (default:
    # "appliance-NAME"); the peer's certificate must also be issued by
    # federation.ca_file.  Checked both ways: as client and as server.
    cert_names: tuple[str, ...] = ()
    # The peer's region; must equal federation.region when that is set.
    region: str = ""


@dataclass(frozen=True)
class Federation:
    """[federation]: search across the appliances of one region through
    Xapian's remote backend, over a mutual-TLS tunnel (docs/SCALING.md)."""

    # Twisted server endpoint of the TLS tunnel offered to peers, e.g.
    # "tcp:7443:interface=192.0.2.10" (TLS is added by the daemon); "" = serve nothing.
    serve: str = ""
    # The certificate this appliance shows its peers, both as server and as
    # client (extended key usage serverAuth and clientAuth, a DNS name equal
    # to its common name); default: the control client certificate.
    cert_file: Path | None = None
    key_file: Path | None = None
    # The CA that issues the appliances' certificates; default: control.ca_file.
    ca_file: Path | None = None
    # This appliance's region; every peer must name the same one.
    region: str = ""
    peer: tuple[FederationPeer, ...] = ()
    # The Xapian remote server (package xapian-tools), run by the daemon
    # on 127.0.0.1, one per served tenant.
    tcpsrv: str = "xapian-tcpsrv"
    # Seconds a peer may take to answer one step of a search / to connect.
    timeout: float = 10.0
    connect_timeout: float = 3.0


@dataclass(frozen=True)
class Config:
    """The whole file."""

    appliance: Appliance
    control: Control
    spool: Spool
    tls: TLS | None = None
    relay: Relay = field(default_factory=Relay)
    milter: Milter | None = None
    archive: Archive | None = None
    service: Service = field(default_factory=Service)
    tenant: tuple[Tenant, ...] = ()
    control_server: ControlServer | None = None
    access: Access = field(default_factory=Access)
    api: Api = field(default_factory=Api)
    audit: Audit = field(default_factory=Audit)
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    backup: Backup = field(default_factory=Backup)
    volume: tuple[Volume, ...] = ()
    federation: Federation = field(default_factory=Federation)
    source: Path = Path("")


def run_at_minutes(text: str) -> int | None:
    """"HH:MM" (24 h) as minutes after midnight; None if it is not one.  Pure."""
    m = re.fullmatch(r"([01]?[0-9]|2[0-3]):([0-5][0-9])", text.strip()) if isinstance(text, str) else None
    return int(m.group(1)) * 60 + int(m.group(2)) if m else None


def locate(explicit: str | os.PathLike | None) -> Path:
    """--config, else $MAILTRESOR_CONFIG, else the packaged default."""
    return Path(explicit or os.environ.get(ENV_VAR) or DEFAULT_PATH)


def load(path: str | os.PathLike) -> Config:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return parse(raw, path)


def parse(raw: dict, source: Path) -> Config:
    cfg = _build(Config, raw, source, "", skip={"source"})
    cfg = dataclasses.replace(cfg, source=source)
    if cfg.audit.directory is None:
        cfg = dataclasses.replace(cfg, audit=dataclasses.replace(
            cfg.audit, directory=cfg.appliance.state_directory / "audit"))
    _check(cfg, source)
    return cfg


def _build(cls, raw, source: Path, where: str, skip=frozenset()):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {where or 'top level'}: expected a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = _join(where, unknown[0])
        raise ConfigError(f"{source}: {key}: unknown key")
    values = {}
    for name, f in fields.items():
        key = _join(where, name)
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                if _optional(hints[name]):
                    continue
                raise ConfigError(f"{source}: {key}: required key is missing")
            continue
        values[name] = _convert(hints[name], raw[name], source, key)
    return cls(**values)


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _optional(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _convert(tp, value, source: Path, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, source, key)
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{source}: {key}: {value!r} is not one of {allowed}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a table, got {_tname(value)}")
        return {str(k): _convert(args[1], v, source, f"{key}.{k!r}") for k, v in value.items()}
    if origin is tuple:
        item = args[0]
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key}: expected a list, got {_tname(value)}")
        return tuple(_convert(item, v, source, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, source, key)
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{source}: {key}: expected a path (string), got {_tname(value)}")
        return Path(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: expected true or false, got {_tname(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key}: expected an integer, got {_tname(value)}")
        if value < 0:
            raise ConfigError(f"{source}: {key}: must not be negative")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key}: expected a number, got {_tname(value)}")
        if value < 0:
            raise ConfigError(f"{source}: {key}: must not be negative")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key}: expected a string, got {_tname(value)}")
        return value
    raise TypeError(f"config schema: unsupported type {tp!r} at {key}")  # programming error


def _tname(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)


def _check_classify(t: Tenant, i: int, fail) -> None:
    """Compile a tenant's classification rules once at load: a bad rule
    stops the program with its place and field named."""
    from .archive.classify import RuleError, compile_rules
    try:
        compile_rules(t.classify, t.groups, where=f"tenant[{i}].classify")
    except RuleError as e:
        key = e.key if e.key.startswith("tenant[") else f"tenant[{i}].{e.key}"
        fail(key, f"(tenant {t.name!r}) {e.msg}")


def _check(cfg: Config, source: Path) -> None:
    """Cross-field rules that types alone cannot express."""
    def fail(key, msg):
        raise ConfigError(f"{source}: {key}: {msg}")

    if not cfg.control.url.startswith("https://"):
        fail("control.url", "must be an https:// URL (keys travel only over TLS)")
    if cfg.relay.listener and cfg.tls is None:
        fail("relay.listener", "relay listeners need a [tls] section (the relay is TLS-only)")
    if cfg.spool.max_message_size < 1024:
        fail("spool.max_message_size", "must be at least 1024 bytes")
    if cfg.spool.max_tries < 1:
        fail("spool.max_tries", "must be at least 1")
    tenants = set()
    for i, t in enumerate(cfg.tenant):
        if not _TENANT_NAME.match(t.name):
            # It names the tenant's key at the control endpoint (tenant.NAME),
            # whose names are lower case; and a directory in the store.
            fail(f"tenant[{i}].name", f"{t.name!r}: use lower-case letters, digits, '-' and '_', "
                 "starting with a letter or digit, at most 56 characters")
        if t.name in tenants:
            fail(f"tenant[{i}].name", f"tenant {t.name!r} is defined twice")
        tenants.add(t.name)
        for j, d in enumerate(t.domains):
            if "@" in d or not d or d != d.strip().lower():
                fail(f"tenant[{i}].domains[{j}]", f"{d!r} is not a lower-case domain name")
        _check_classify(t, i, fail)
    names = set()
    for i, c in enumerate(cfg.relay.connector):
        if c.name in names:
            fail(f"relay.connector[{i}].name", f"connector {c.name!r} is defined twice")
        names.add(c.name)
        for j, net in enumerate(c.networks):
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                fail(f"relay.connector[{i}].networks[{j}]", f"{net!r} is not a network (e.g. 192.0.2.0/24)")
        if c.tenant and c.tenant not in tenants:
            fail(f"relay.connector[{i}].tenant", f"unknown tenant {c.tenant!r}")
        for j, r in enumerate(c.recipients):
            local, at, domain = r.rpartition("@")
            if not at or not local or not domain or any(ch.isspace() or ch in "<>," for ch in r):
                fail(f"relay.connector[{i}].recipients[{j}]", f"{r!r} is not an address (local@domain)")
        if c.client_cert == "required" and cfg.tls is not None and cfg.tls.client_ca_file is None:
            fail(f"relay.connector[{i}].client_cert", "'required' needs tls.client_ca_file")
        if not c.networks and c.client_cert != "required":
            fail(f"relay.connector[{i}]", "a connector needs networks, a required client certificate, or both")
        # Journal reports are unwrapped only from a connector that knows who
        # is speaking (a verified certificate) and for whom (its tenant).
        if c.journal and c.client_cert != "required":
            fail(f"relay.connector[{i}].journal", "a journaling connector needs client_cert = \"required\"")
        if c.journal and not c.tenant:
            fail(f"relay.connector[{i}].journal", "a journaling connector needs a tenant")
        if c.exchange_tenant_id:
            if not c.journal:
                fail(f"relay.connector[{i}].exchange_tenant_id", "only a journaling connector (journal = true) "
                     "checks the Exchange Online tenant id")
            if not _GUID.match(c.exchange_tenant_id):
                fail(f"relay.connector[{i}].exchange_tenant_id", f"{c.exchange_tenant_id!r} is not a tenant id "
                     "(a GUID such as 11111111-2222-3333-4444-555555555555)")
            if not c.recipients:
                # Every Microsoft 365 organisation presents the same
                # certificate: the unguessable journal address is what
                # keeps the others out of this connector.
                fail(f"relay.connector[{i}].recipients", "an Exchange Online journaling connector "
                     "(exchange_tenant_id) needs its journal address(es) here")
    if run_at_minutes(cfg.lifecycle.run_at) is None:
        fail("lifecycle.run_at", f"{cfg.lifecycle.run_at!r} is not a time of day: write \"HH:MM\" (UTC, e.g. \"03:00\")")
    if not 0 <= cfg.lifecycle.compact_quiet_days <= 3660:
        fail("lifecycle.compact_quiet_days", "must be between 0 and 3660 days")
    r = cfg.relay
    if r.max_connections < 1:
        fail("relay.max_connections", "must be at least 1")
    for key in ("timeout", "handshake_timeout", "data_rate_window"):
        if getattr(r, key) < 1:
            fail(f"relay.{key}", "must be at least 1 second")
    if r.session_timeout and r.session_timeout < max(60.0, r.timeout):
        # A deadline shorter than the idle timeout would cut healthy sessions
        # before a slow client could even be noticed.
        fail("relay.session_timeout", f"must be 0 (none) or at least 60 s and at least relay.timeout "
             f"({r.timeout:g} s)")
    if r.min_data_rate > 1 << 20:
        fail("relay.min_data_rate", "more than 1 MiB/s would cut ordinary senders; use at most 1048576")
    for i, lst in enumerate(cfg.relay.listener):
        if ":" not in lst.endpoint:
            fail(f"relay.listener[{i}].endpoint", f"{lst.endpoint!r} is not a Twisted endpoint (e.g. tcp:25:interface=192.0.2.1)")
        if activation.is_activated(lst.endpoint):
            try:
                activation.endpoint_name(lst.endpoint)
            except ValueError as e:
                fail(f"relay.listener[{i}].endpoint", str(e))
    if cfg.milter is not None and cfg.milter.enabled:
        try:
            if activation.is_activated(cfg.milter.listen):
                activation.endpoint_name(cfg.milter.listen)
            else:
                milter_socket(cfg.milter.listen)
        except ValueError as e:
            fail("milter.listen", str(e))
    if cfg.archive is not None:
        if cfg.archive.batch_size < 1:
            fail("archive.batch_size", "must be at least 1")
        if cfg.archive.max_open_shards < 1:
            fail("archive.max_open_shards", "must be at least 1")
        if not 0 <= cfg.archive.parse_processes <= 64:
            fail("archive.parse_processes", "must be between 0 and 64")
        for key, low, high in (("extract_cpu_seconds", 0.1, 3600), ("extract_cpu_seconds_per_mib", 0, 600),
                               ("extract_max_text", 1000, 10**9), ("extract_max_expanded", 1024 * 1024, 2**40),
                               ("extract_max_depth", 0, 20), ("extract_max_parts", 1, 100_000),
                               ("extract_max_nesting", 1, 200)):
            if not low <= getattr(cfg.archive, key) <= high:
                fail(f"archive.{key}", f"must be between {low} and {high}")
        if cfg.archive.tsa_url and not cfg.archive.tsa_url.startswith(("http://", "https://")):
            fail("archive.tsa_url", f"{cfg.archive.tsa_url!r} is not an http(s) URL")
        if cfg.archive.backup_directory is not None and cfg.archive.backup_directory == cfg.archive.directory:
            fail("archive.backup_directory", "must not be the store directory itself")
    if not 1 <= cfg.audit.seal_every <= 1_000_000:
        fail("audit.seal_every", "must be between 1 and 1000000")
    if cfg.archive is not None and cfg.audit.directory in (cfg.archive.directory, cfg.archive.backup_directory):
        fail("audit.directory", "must be a directory of its own (not the store or the backup)")
    if cfg.audit.directory == cfg.spool.directory:
        fail("audit.directory", "must be a directory of its own (not the spool)")
    _check_access(cfg, fail)
    _check_federation(cfg, fail)
    _check_api(cfg, fail)
    _check_sftp(cfg, fail)
    _check_volumes(cfg, fail)
    if cfg.control_server is not None:
        m = cfg.control_server.master_key
        kind = m.split(":", 1)[0]
        if kind not in ("credential", "fd", "prompt", "file") or (kind != "prompt" and ":" not in m):
            fail("control_server.master_key", f"{m!r}: use credential:NAME, fd:N, prompt or file:PATH")
        cs = cfg.control_server
        if cs.max_connections < 2:
            fail("control_server.max_connections", "must be at least 2")
        if not 1 <= cs.max_connections_per_client <= cs.max_connections:
            fail("control_server.max_connections_per_client",
                 "must be at least 1 and at most control_server.max_connections")
        for key in ("handshake_timeout", "idle_timeout"):
            if getattr(cs, key) < 1:
                fail(f"control_server.{key}", "must be at least 1 second")
        seen = set()
        for i, a in enumerate(cfg.control_server.appliance):
            if a.name in seen:
                fail(f"control_server.appliance[{i}].name", f"appliance {a.name!r} is defined twice")
            seen.add(a.name)


def api_listen(endpoint: str) -> tuple[int, str]:
    """``ssl:PORT[:interface=HOST]`` (or ``ssl:port=PORT:...``) -> (port,
    interface).  The API listens with TLS only; anything else is a
    ValueError saying so."""
    kind, _, rest = endpoint.partition(":")
    if kind != "ssl":
        raise ValueError(f"{endpoint!r}: the API listens with TLS only: ssl:PORT:interface=HOST")
    port, interface = None, ""
    for i, part in enumerate(rest.split(":") if rest else []):
        key, eq, value = part.partition("=")
        if not eq and i == 0:
            key, value = "port", part
        if key == "port" and value.isdigit() and 0 < int(value) < 65536:
            port = int(value)
        elif key == "interface" and value:
            interface = value
        else:
            raise ValueError(f"{endpoint!r}: {part!r} is not understood (ssl:PORT:interface=HOST; the "
                             "certificate comes from api.cert_file/key_file or [tls])")
    if port is None:
        raise ValueError(f"{endpoint!r}: no port (ssl:PORT:interface=HOST)")
    return port, interface


def _check_api(cfg: "Config", fail) -> None:
    a = cfg.api
    if not a.enabled:
        return
    try:
        if activation.is_activated(a.listen):
            activation.endpoint_name(a.listen)      # TLS is added by the daemon, as for ssl:
        else:
            api_listen(a.listen)
    except ValueError as e:
        fail("api.listen", str(e))
    if (a.cert_file is None) != (a.key_file is None):
        fail("api.cert_file", "api.cert_file and api.key_file go together")
    if a.max_body < 1024:
        fail("api.max_body", "must be at least 1024 bytes")
    if a.timeout < 1:
        fail("api.timeout", "must be at least 1 second")
    if not 1 <= a.max_connections_per_client <= a.max_connections:
        fail("api.max_connections_per_client", "must be at least 1 and at most api.max_connections")
    if not 1 <= a.threads <= 64:
        fail("api.threads", "must be between 1 and 64")
    for j, net in enumerate(a.metrics_networks):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            fail(f"api.metrics_networks[{j}]", f"{net!r} is not a network (e.g. 192.0.2.0/24)")


def milter_socket(endpoint: str) -> str:
    """Turn a Twisted-style endpoint string into libmilter's socket syntax.

    ``unix:PATH`` (or ``unix:address=PATH``) -> ``unix:/abs/PATH``;
    ``tcp:PORT:interface=HOST`` -> ``inet:PORT@HOST``.
    """
    kind, _, rest = endpoint.partition(":")
    # Twisted endpoint syntax: ':' separates fields, '\:' is a literal colon.
    params = [p.replace("\0", ":") for p in rest.replace("\\:", "\0").split(":")]
    if kind == "unix":
        path = params[0]
        if path.startswith("address="):
            path = path[len("address="):]
        if not path:
            raise ValueError(f"{endpoint!r}: unix socket needs a path")
        return "unix:" + os.path.abspath(path)
    if kind in ("tcp", "tcp6"):
        if not params[0].isdigit():
            raise ValueError(f"{endpoint!r}: tcp needs a port number")
        port, host = params[0], "127.0.0.1"
        for p in params[1:]:
            if p.startswith("interface="):
                host = p[len("interface="):]
        return f"{'inet6' if kind == 'tcp6' else 'inet'}:{port}@{host}"
    raise ValueError(f"{endpoint!r}: the milter listens on unix:PATH or tcp:PORT:interface=HOST")


def tenant_for_domain(cfg: Config) -> dict[str, str]:
    return {d: t.name for t in cfg.tenant for d in t.domains}


def _check_sftp(cfg: "Config", fail) -> None:
    """[backup]: a remote needs a backup directory to mirror, a pinned
    host key and an identity; times within bounds."""
    b = cfg.backup
    for key in ("interval", "connect_timeout", "io_timeout", "retry_initial"):
        v = getattr(b, key)
        if not 1 <= v <= 86400:
            fail(f"backup.{key}", f"{v:g} seconds: must be between 1 and 86400")
    if not b.remote:
        return
    from .archive.store.remote import parse_remote
    try:
        parse_remote(b.remote)
    except ValueError as e:
        fail("backup.remote", str(e))
    if cfg.archive is None or cfg.archive.backup_directory is None:
        fail("backup.remote", "needs [archive] backup_directory: the remote is a copy of that directory")
    if b.known_hosts is None:
        fail("backup.known_hosts", "required with backup.remote: the target's host key, pinned "
                                   "(ssh-keyscan -p PORT HOST, checked out of band)")
    if not b.identity_file:
        fail("backup.identity_file", "required with backup.remote: the private key to log in with "
                                     "(a path or credential:NAME)")
    if b.identity_file.startswith("credential:") and not b.identity_file[len("credential:"):].strip():
        fail("backup.identity_file", "credential: needs a name (credential:NAME, from LoadCredential=)")
def _check_federation(cfg: "Config", fail) -> None:
    """A peer is named once, has an address when it is searched, names only
    configured tenants, and lives in this appliance's region."""
    fed = cfg.federation
    tenants = {t.name for t in cfg.tenant}
    if fed.serve and not fed.serve.startswith(("tcp:", "tcp6:")):
        fail("federation.serve", f"{fed.serve!r}: a tcp: endpoint (TLS is added by the daemon)")
    if (fed.cert_file is None) != (fed.key_file is None):
        fail("federation.cert_file", "cert_file and key_file go together")
    if not 0.1 <= fed.timeout <= 600 or not 0.1 <= fed.connect_timeout <= 600:
        fail("federation.timeout", "timeout and connect_timeout must be between 0.1 and 600 seconds")
    seen = set()
    for i, p in enumerate(fed.peer):
        where = f"federation.peer[{i}]"
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,62}", p.name):
            fail(f"{where}.name", f"{p.name!r}: lower-case letters, digits, '.', '_', '-'")
        if p.name in seen or p.name == cfg.appliance.name:
            fail(f"{where}.name", f"peer {p.name!r} is this appliance or is defined twice")
        seen.add(p.name)
        if fed.region and p.region != fed.region:
            # Region pinning: a tenant's data (its index terms, its listings)
            # never leaves its region, so no peer outside it is configured at all.
            fail(f"{where}.region", f"peer {p.name!r} is in region {p.region or '(none)'!r}, "
                                    f"this appliance in {fed.region!r}: peers only within a region")
        for key in ("tenants", "serve"):
            for t in getattr(p, key):
                if t not in tenants:
                    fail(f"{where}.{key}", f"{t!r} is not a configured tenant")
        if p.tenants:
            host, sep, port = p.address.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                fail(f"{where}.address", f"{p.address!r}: HOST:PORT of the peer's federation.serve endpoint")
        if p.serve and not fed.serve:
            fail(f"{where}.serve", "this appliance serves tenants but has no federation.serve endpoint")
