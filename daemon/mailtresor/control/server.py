"""mailtresor-control: the reference key-custody service.

In production it runs on a separate host.  It holds, per appliance, the
spool key, volume keys and tenant keys; it releases a key only to the
appliance it belongs to (identified by its client certificate) and appends
every release and every refusal to a hash-chained audit log.

Its key store is a file encrypted under a key stretched (Argon2id) from a
master secret that is never stored next to it: systemd credential, file
descriptor, or a prompt.  `file:PATH` exists for development only.

A rotated key keeps its older versions, so whatever they encrypted can still
be decrypted; appliances ask for a version explicitly when they need one.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import fcntl
import getpass
import hashlib
import json
import logging
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

from mailtresor import config as configmod
from mailtresor.keys import crypto
from mailtresor.keys.ring import KEY_NAME
from mailtresor.system import notify, setup_logging

log = logging.getLogger("mailtresor.control.server")

KEYSTORE_FORMAT = 1
_KEYSTORE_AAD = b"mailtresor-control-keystore-v1"


class ControlError(Exception):
    """A user-facing error of mailtresor-control."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --- master secret ----------------------------------------------------------------

def read_master_secret(spec: str) -> bytes:
    kind, _, arg = spec.partition(":")
    if kind == "credential":
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        if not cred_dir:
            raise ControlError(f"master_key = {spec!r} but $CREDENTIALS_DIRECTORY is not set "
                               "(start the service with LoadCredential=/LoadCredentialEncrypted=)")
        path = Path(cred_dir) / arg
        try:
            secret = path.read_bytes()
        except OSError as e:
            raise ControlError(f"cannot read credential {arg!r}: {e.strerror}") from None
    elif kind == "fd":
        try:
            fd = int(arg)
            with os.fdopen(fd, "rb", closefd=True) as f:
                secret = f.read()
        except (ValueError, OSError) as e:
            raise ControlError(f"cannot read the master secret from fd {arg!r}: {e}") from None
    elif kind == "prompt":
        secret = getpass.getpass("mailtresor-control master secret: ").encode()
    elif kind == "file":
        try:
            secret = Path(arg).read_bytes()
        except OSError as e:
            raise ControlError(f"cannot read master secret file {arg}: {e.strerror}") from None
    else:
        raise ControlError(f"unknown master_key source {spec!r}")
    secret = secret.strip()
    if len(secret) < 16:
        raise ControlError("the master secret is shorter than 16 characters")
    return secret


# --- key store ------------------------------------------------------------------------

class KeyStore:
    """{appliance: {name: {"current": v, "versions": {v: {key, created}}}}}, encrypted."""

    def __init__(self, path: Path, secret: bytes):
        self.path = Path(path)
        self._secret = secret
        self._derived: dict[bytes, bytes] = {}
        self._stamp = None
        self._data: dict = {}

    def _key(self, salt: bytes) -> bytes:
        if salt not in self._derived:
            self._derived[salt] = crypto.passphrase_key(self._secret, salt)
        return self._derived[salt]

    @contextmanager
    def _locked(self):
        lock = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def exists(self) -> bool:
        return self.path.exists()

    def init(self) -> None:
        with self._locked():
            if self.path.exists():
                raise ControlError(f"key store {self.path} exists already")
            self._data = {}
            self._save(crypto.random_bytes(16))

    def load(self) -> dict:
        """The decrypted store; re-read only when the file changed."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            raise ControlError(f"no key store at {self.path} (run: mailtresor-control init)") from None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return self._data
        doc = json.loads(self.path.read_bytes())
        if doc.get("format") != KEYSTORE_FORMAT:
            raise ControlError(f"{self.path}: unsupported key store format {doc.get('format')!r}")
        salt = base64.b64decode(doc["kdf"]["salt"])
        try:
            plain = crypto.open_blob(self._key(salt), base64.b64decode(doc["blob"]), _KEYSTORE_AAD)
        except crypto.DecryptionError:
            raise ControlError(f"{self.path}: wrong master secret (the key store does not decrypt)") from None
        self._data = json.loads(plain)
        self._salt = salt
        self._stamp = stamp
        return self._data

    def _save(self, salt: bytes) -> None:
        blob = crypto.seal_blob(self._key(salt), json.dumps(self._data).encode(), _KEYSTORE_AAD)
        doc = {"format": KEYSTORE_FORMAT,
               "kdf": {"alg": "argon2id", "t": 3, "m": 65536, "p": 2,
                       "salt": base64.b64encode(salt).decode()},
               "blob": base64.b64encode(blob).decode()}
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(doc, indent=1).encode())
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self._stamp = None

    def _modify(self, fn):
        with self._locked():
            self._stamp = None
            self.load()
            result = fn(self._data)
            self._save(self._salt)
            return result

    def create(self, appliance: str, name: str) -> int:
        _check_names(appliance, name)

        def do(data):
            keys = data.setdefault(appliance, {})
            if name in keys:
                raise ControlError(f"appliance {appliance!r} already has a key {name!r} (use rotate)")
            keys[name] = {"current": 1, "versions": {"1": _new_version()}}
            return 1
        return self._modify(do)

    def rotate(self, appliance: str, name: str) -> int:
        _check_names(appliance, name)

        def do(data):
            entry = data.get(appliance, {}).get(name)
            if entry is None:
                raise ControlError(f"appliance {appliance!r} has no key {name!r}")
            v = max(int(x) for x in entry["versions"]) + 1
            entry["versions"][str(v)] = _new_version()
            entry["current"] = v
            return v
        return self._modify(do)

    def share(self, source: str, name: str, target: str) -> list[int]:
        """Give `target` the same key `name` as `source`, every version
        (search across appliances: both open the tenant's listings; a
        tenant moved to `target` keeps its archive ids).  Only tenant keys
        are shared.  A key `target` holds already must be the same key
        (versions it has equal to `source`'s): then the newer versions are
        added; a different one is never replaced.  The versions given."""
        _check_names(source, name)
        _check_names(target, name)
        if not name.startswith("tenant."):
            raise ControlError(f"only tenant keys (tenant.NAME) are shared between appliances, not {name!r}")
        if source == target:
            raise ControlError("the appliances to share between are the same")

        def do(data):
            entry = data.get(source, {}).get(name)
            if entry is None:
                raise ControlError(f"appliance {source!r} has no key {name!r}")
            have = data.get(target, {}).get(name)
            if have is not None:
                for v, ver in have["versions"].items():
                    if entry["versions"].get(v, {}).get("key") != ver["key"]:
                        raise ControlError(f"appliance {target!r} has a different key {name!r} (version {v}): "
                                           "refusing to replace it (what it encrypted would be lost)")
            given = sorted(int(v) for v in entry["versions"]
                           if have is None or v not in have["versions"])
            data.setdefault(target, {})[name] = json.loads(json.dumps(entry))
            return given
        return self._modify(do)

    def get(self, appliance: str, name: str, version: int | None = None):
        entry = self.load().get(appliance, {}).get(name)
        if entry is None:
            return None
        v = entry["current"] if version is None else version
        ver = entry["versions"].get(str(v))
        if ver is None:
            return None
        return v, base64.b64decode(ver["key"]), ver["created"]

    def listing(self) -> list[dict]:
        rows = []
        for appliance, keys in sorted(self.load().items()):
            for name, entry in sorted(keys.items()):
                rows.append({"appliance": appliance, "name": name, "current": entry["current"],
                             "versions": sorted(int(v) for v in entry["versions"]),
                             "created": entry["versions"][str(entry["current"])]["created"]})
        return rows


def _new_version() -> dict:
    return {"key": base64.b64encode(crypto.random_key()).decode(), "created": _now()}


def _check_names(appliance: str, name: str) -> None:
    if not KEY_NAME.match(appliance):
        raise ControlError(f"invalid appliance name {appliance!r}")
    if not KEY_NAME.match(name):
        raise ControlError(f"invalid key name {name!r} (lower-case letters, digits, '.', '_', '-')")


# --- audit log -------------------------------------------------------------------------

class AuditLog:
    """Append-only JSON lines, each carrying the hash of the one before."""

    GENESIS = "0" * 64

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, event: str, **fields) -> dict:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            prev, seq = self._tail(fd)
            rec = {"seq": seq + 1, "time": _now(), "event": event, **fields, "prev": prev}
            rec["hash"] = _chain_hash(rec)
            os.write(fd, json.dumps(rec, sort_keys=True).encode() + b"\n")
            os.fsync(fd)
            return rec
        finally:
            os.close(fd)

    def _tail(self, fd: int) -> tuple[str, int]:
        size = os.fstat(fd).st_size
        if size == 0:
            return self.GENESIS, 0
        start = max(0, size - 65536)
        chunk = os.pread(fd, size - start, start)
        last = chunk.rstrip(b"\n").rsplit(b"\n", 1)[-1]
        rec = json.loads(last)
        return rec["hash"], rec["seq"]

    def verify(self) -> list[str]:
        problems = []
        prev, seq = self.GENESIS, 0
        try:
            lines = self.path.read_bytes().splitlines()
        except FileNotFoundError:
            return []
        for n, line in enumerate(lines, 1):
            try:
                rec = json.loads(line)
            except ValueError:
                problems.append(f"line {n}: not JSON")
                continue
            if rec.get("prev") != prev:
                problems.append(f"line {n}: chain broken (prev hash does not match line {n - 1})")
            if rec.get("seq") != seq + 1:
                problems.append(f"line {n}: sequence {rec.get('seq')} follows {seq}")
            if _chain_hash(rec) != rec.get("hash"):
                problems.append(f"line {n}: record altered (hash mismatch)")
            prev, seq = rec.get("hash"), rec.get("seq", seq + 1)
        return problems


def _chain_hash(rec: dict) -> str:
    body = {k: v for k, v in rec.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


# --- HTTPS service ---------------------------------------------------------------------------

def _peer_names(transport) -> list[str]:
    cert = transport.getPeerCertificate() if hasattr(transport, "getPeerCertificate") else None
    if cert is None:
        return []
    return [v.decode("utf-8", "replace") for k, v in cert.get_subject().get_components() if k == b"CN"]


# A key request: /v1/keys/NAME or /v1/keys/NAME/VERSION.  ASCII digits only
# (str.isdigit() takes "²", which int() refuses), and few of them.
_VERSION = re.compile(r"[1-9][0-9]{0,8}", re.ASCII)


def parse_key_path(parts: list[bytes]) -> tuple[str, int | None] | str:
    """(name, version or None) from the path segments after /v1/keys/, or
    the reason they are not a key request.  Pure: any bytes give one or the
    other, never an exception."""
    parts = [p for p in parts if p]
    if not parts or len(parts) > 2:
        return "use /v1/keys/NAME or /v1/keys/NAME/VERSION"
    try:
        name = parts[0].decode("ascii")
        version = parts[1].decode("ascii") if len(parts) == 2 else None
    except UnicodeDecodeError:
        return "a key name and version are ASCII"
    # fullmatch: KEY_NAME's "$" would let a final newline through.
    if KEY_NAME.fullmatch(name) is None:
        return "invalid key name (lower-case letters, digits, '.', '_', '-'; at most 63)"
    if version is not None and _VERSION.fullmatch(version) is None:
        return "invalid key version (a positive number)"
    return name, None if version is None else int(version)


def _printable_path(request) -> str:
    """The requested path for the audit log: ASCII, bounded."""
    raw = request.uri or b""
    return raw[:200].decode("ascii", "backslashreplace") + ("..." if len(raw) > 200 else "")


def _peer_of(request) -> str:
    peer = request.getClientAddress()
    return f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"


def make_site(store: KeyStore, audit: AuditLog, appliances: dict[str, str], *, idle_timeout: float = 30.0,
              reactor=None):
    """appliances: certificate CN -> appliance name.  `reactor` runs the
    connections' idle timers (serve() passes its own; tests a task.Clock).

    Every answer is JSON; every refusal (4xx, 5xx) is in the audit log with
    who asked (certificate names, address), what (the path) and why --
    never a key.  An unexpected error is a 500 with a JSON reason and one
    log line, no traceback for the client."""
    from twisted.internet.interfaces import IHandshakeListener
    from twisted.web import http
    from twisted.web.resource import Resource
    from zope.interface import implementer
    from twisted.web.server import Request, Site

    def reply(request, code, doc):
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(doc).encode()

    def refuse(request, code, reason, error=None, **fields):
        """Answer `code` with a JSON reason, and audit it once."""
        request.audited = True
        names = _peer_names(request.channel.transport)
        fields.setdefault("appliance", next((appliances[n] for n in names if n in appliances), None))
        audit.append("deny", status=code, cert=names, peer=_peer_of(request), path=_printable_path(request),
                     reason=reason, **fields)
        log.warning("refused %s %s (certificate %s): %d %s", _peer_of(request), _printable_path(request),
                    names, code, reason)
        return reply(request, code, {"error": error or reason})

    class JSONResource(Resource):
        isLeaf = True

        def render(self, request):
            if request.method not in (b"GET", b"HEAD"):
                request.setHeader(b"allow", b"GET, HEAD")
                return refuse(request, 405, "method not allowed")
            return Resource.render(self, request)

    class KeysResource(JSONResource):
        def render_GET(self, request):
            peer_s = _peer_of(request)
            names = _peer_names(request.channel.transport)
            appliance = next((appliances[n] for n in names if n in appliances), None)
            if appliance is None:
                return refuse(request, 403, "unknown client certificate",
                              "this client certificate belongs to no appliance")
            parsed = parse_key_path(request.postpath)
            if isinstance(parsed, str):
                return refuse(request, 400, parsed)
            name, version = parsed
            try:
                found = store.get(appliance, name, version)
            except ControlError as e:
                log.error("key store: %s", e)
                return refuse(request, 503, "key store unavailable")
            if found is None:
                return refuse(request, 404, "no such key",
                              f"appliance {appliance!r} has no key {name!r}"
                              + ("" if version is None else f" version {version}"),
                              appliance=appliance, key=name, version=version)
            v, key, created = found
            audit.append("release", appliance=appliance, key=name, version=v, peer=peer_s)
            log.info("released %s version %d to %s (%s)", name, v, appliance, peer_s)
            return reply(request, 200, {"name": name, "version": v, "created": created,
                                        "key": base64.b64encode(key).decode()})

    class Health(JSONResource):
        def render_GET(self, request):
            return reply(request, 200, {"status": "ok"})

    class NotFound(JSONResource):
        def render_GET(self, request):
            return refuse(request, 404, "no such endpoint")

    class Tree(Resource):
        def getChild(self, path, request):
            return NotFound()

    root = Tree()
    v1 = Tree()
    root.putChild(b"v1", v1)
    v1.putChild(b"keys", KeysResource())
    v1.putChild(b"health", Health())

    class AuditedRequest(Request):
        audited = False

        def processingFailed(self, reason):
            # A bug, not an attack: one log line here, a JSON 500 there.
            log.error("request %s failed: %s: %s", _printable_path(self), reason.type.__name__,
                      reason.getErrorMessage())
            body = refuse(self, 500, f"internal error ({reason.type.__name__})", "internal error")
            self.setHeader(b"content-length", b"%d" % len(body))
            self.write(body)
            self.finish()
            return None

    @implementer(IHandshakeListener)
    class Channel(http.HTTPChannel):
        def handshakeCompleted(self):
            guard = getattr(self.factory, "guard", None)
            if guard is not None:
                guard.authenticated(self.transport)

        def _respondToBadRequestAndDisconnect(self):
            # Malformed HTTP from a holder of a CA certificate: audited too.
            names = _peer_names(self.transport)
            peer = self.transport.getPeer()
            audit.append("deny", status=400, cert=names, peer=f"{getattr(peer, 'host', '?')}:"
                         f"{getattr(peer, 'port', '?')}", path=None, reason="malformed HTTP request",
                         appliance=next((appliances[n] for n in names if n in appliances), None))
            super()._respondToBadRequestAndDisconnect()

    class QuietSite(Site):
        protocol = Channel
        requestFactory = AuditedRequest
        guard = None

        def log(self, request):
            # The audit log is the record; no access log.  A refusal that
            # Twisted made itself lands here unaudited: audit it now.
            if request.code >= 400 and not request.audited:
                names = _peer_names(request.channel.transport)
                audit.append("deny", status=request.code, cert=names, peer=_peer_of(request),
                             path=_printable_path(request), reason=http.RESPONSES.get(request.code, b"").decode(),
                             appliance=next((appliances[n] for n in names if n in appliances), None))

    return QuietSite(root, timeout=idle_timeout, reactor=reactor)


class ConnectionGuard:
    """Who holds the control endpoint's connections.

    At most `max_per_client` connections per client address and
    `max_connections` in all.  When full, a new connection takes the place
    of the oldest one that has not finished its TLS handshake (proved no
    certificate yet): idle sockets from strangers cannot keep the
    appliances from their keys; an appliance's connection, once
    authenticated, is never the one evicted.  A handshake not finished in
    `handshake_timeout` seconds is dropped; an idle authenticated
    connection is closed by the web server's own timeout."""

    def __init__(self, clock, *, max_connections: int, max_per_client: int, handshake_timeout: float):
        self.clock = clock
        self.max_connections, self.max_per_client = max_connections, max_per_client
        self.handshake_timeout = handshake_timeout
        self.pending: dict = {}          # protocol -> (host, timer): handshake not done, oldest first
        self.done: dict = {}             # protocol -> host
        self.per_client: dict[str, int] = {}
        self.refused = 0
        self.evicted = 0

    def __len__(self):
        return len(self.pending) + len(self.done)

    def admit(self, host: str) -> str | None:
        """None if a connection from `host` may be accepted now (making room
        if need be), else why not."""
        if self.per_client.get(host, 0) >= self.max_per_client:
            return f"{host} has {self.per_client[host]} connections (limit {self.max_per_client} per client)"
        if len(self) >= self.max_connections:
            if not self.pending:
                return f"{len(self)} connections, all authenticated (limit {self.max_connections})"
            oldest = next(iter(self.pending))
            self.evicted += 1
            self.forget(oldest)
            oldest.abortConnection()
        return None

    def track(self, proto, host: str) -> None:
        timer = self.clock.callLater(self.handshake_timeout, self._handshake_expired, proto)
        self.pending[proto] = (host, timer)
        self.per_client[host] = self.per_client.get(host, 0) + 1

    def authenticated(self, proto) -> None:
        entry = self.pending.pop(proto, None)
        if entry is not None:
            host, timer = entry
            if timer.active():
                timer.cancel()
            self.done[proto] = host

    def forget(self, proto) -> None:
        entry = self.pending.pop(proto, None)
        if entry is not None:
            host, timer = entry
            if timer.active():
                timer.cancel()
        else:
            host = self.done.pop(proto, None)
            if host is None:
                return
        n = self.per_client.get(host, 0) - 1
        if n > 0:
            self.per_client[host] = n
        else:
            self.per_client.pop(host, None)

    def _handshake_expired(self, proto) -> None:
        if proto in self.pending:
            log.info("dropped %s: no TLS handshake within %g s", self.pending[proto][0], self.handshake_timeout)
            self.forget(proto)
            proto.abortConnection()


def guarded_tls_factory(options, site, guard: ConnectionGuard):
    """The TLS listening factory of the control endpoint, under `guard`."""
    from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol

    class Protocol(TLSMemoryBIOProtocol):
        def connectionLost(self, reason):
            guard.forget(self)
            super().connectionLost(reason)

    class Factory(TLSMemoryBIOFactory):
        protocol = Protocol

        def buildProtocol(self, addr):
            host = getattr(addr, "host", "")
            why = guard.admit(host)
            if why is not None:
                guard.refused += 1
                if guard.refused & (guard.refused - 1) == 0:     # 1, 2, 4, 8...: a flood is not a log flood
                    log.warning("refused a connection from %s: %s (%d refused so far)", host, why, guard.refused)
                return None                                     # closed at once, before any TLS
            p = super().buildProtocol(addr)
            guard.track(p, host)
            return p

    site.guard = guard
    return Factory(options, False, site)


def _fd_budget(wanted: int) -> int:
    """Connections this process can hold without running out of file
    descriptors (the key store, the audit log and Python need some)."""
    import resource
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(2, min(wanted, soft - 64))


def _tls_files(cs):
    """(certificate with key, client CA) of [control_server]; a
    ControlError naming the setting and the file that cannot be read or is
    not what it should be (not a traceback: a trial setup or a hand-edited
    configuration gets these wrong)."""
    from twisted.internet import ssl as tssl

    def read(key: str) -> bytes:
        path = getattr(cs, key)
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise ControlError(f"control_server.{key}: cannot read {path}: {e.strerror}") from None
    cert, key, client_ca = read("cert_file"), read("key_file"), read("client_ca_file")
    try:
        me = tssl.PrivateCertificate.loadPEM(cert + key)
    except Exception as e:
        raise ControlError(f"control_server.cert_file/key_file ({cs.cert_file}, {cs.key_file}): not a PEM "
                           f"certificate and its private key ({type(e).__name__})") from None
    try:
        ca = tssl.Certificate.loadPEM(client_ca)
    except Exception as e:
        raise ControlError(f"control_server.client_ca_file {cs.client_ca_file}: not a PEM certificate "
                           f"({type(e).__name__})") from None
    return me, ca


def serve(cfg: configmod.Config, reactor) -> int:
    """Run the HTTPS key service on `reactor` until it stops."""
    from twisted.internet import endpoints
    from twisted.internet import ssl as tssl

    cs = cfg.control_server
    if cs is None:
        raise ControlError(f"{cfg.source}: no [control_server] section")
    if cs.master_key.startswith("file:"):
        log.warning("master secret read from a file (%s): for development only", cs.master_key[5:])
    store = KeyStore(cs.keystore, read_master_secret(cs.master_key))
    store.load()  # fail now if the secret is wrong or the store is missing
    audit = AuditLog(cs.audit_log)
    problems = audit.verify()
    if problems:
        raise ControlError(f"audit log {cs.audit_log} is damaged: {problems[0]}")
    appliances = {cn: a.name for a in cs.appliance for cn in a.cert_names}
    site = make_site(store, audit, appliances, idle_timeout=cs.idle_timeout, reactor=reactor)
    me, ca = _tls_files(cs)
    options = tssl.CertificateOptions(privateKey=me.privateKey.original, certificate=me.original,
                                      verify=True, caCerts=[ca.original], requireCertificate=True,
                                      raiseMinimumTo=tssl.TLSVersion.TLSv1_2)
    limit = _fd_budget(cs.max_connections)
    if limit < cs.max_connections:
        log.warning("max_connections = %d, but the file descriptor limit allows %d: using %d",
                    cs.max_connections, limit, limit)
    guard = ConnectionGuard(reactor, max_connections=limit,
                            max_per_client=min(cs.max_connections_per_client, limit),
                            handshake_timeout=cs.handshake_timeout)
    ep = endpoints.serverFromString(reactor, cs.listen)
    d = ep.listen(guarded_tls_factory(options, site, guard))

    def listening(port):
        log.info("control endpoint listening on %s (mutual TLS), %d appliance(s), at most %d connections "
                 "(%d per client)", cs.listen, len(cs.appliance), guard.max_connections, guard.max_per_client)
        notify("READY=1", f"STATUS=serving keys on {cs.listen}")

    result = {"exit": 0}

    def failed(f):
        log.error("cannot listen on %s: %s", cs.listen, f.getErrorMessage())
        result["exit"] = 1
        reactor.stop()

    d.addCallbacks(listening, failed)
    reactor.run()
    return result["exit"]


# --- CLI ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    from mailtresor import no_core_dumps
    no_core_dumps()

    p = argparse.ArgumentParser(prog="mailtresor-control", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help=f"configuration file (default ${configmod.ENV_VAR} or {configmod.DEFAULT_PATH})")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("serve", help="run the HTTPS key service")
    sub.add_parser("init", help="create an empty key store")
    keys = sub.add_parser("keys", help="create, rotate and list keys").add_subparsers(dest="kcmd", required=True)
    kc = keys.add_parser("create", help="create a key for an appliance")
    kc.add_argument("appliance")
    kc.add_argument("name", help="e.g. spool, tenant.acme, volume.spool")
    kc.add_argument("--if-missing", action="store_true", help="succeed quietly if the key exists")
    kr = keys.add_parser("rotate", help="add a new current version (older versions stay readable)")
    kr.add_argument("appliance")
    kr.add_argument("name")
    ks = keys.add_parser("share", help="give another appliance of this control endpoint the same tenant key "
                                       "(every version): search across appliances, moving a tenant")
    ks.add_argument("appliance", help="the appliance that holds the key")
    ks.add_argument("name", help="a tenant key: tenant.NAME")
    ks.add_argument("to", help="the appliance to give it to")
    kl = keys.add_parser("list", help="list keys (names and versions, never material)")
    kl.add_argument("appliance", nargs="?")
    kl.add_argument("--json", action="store_true")
    audit = sub.add_parser("audit", help="audit log").add_subparsers(dest="acmd", required=True)
    audit.add_parser("verify", help="check the audit log's hash chain")
    pki = sub.add_parser("pki", help="development certificates (never for production)")
    pki.add_argument("directory")
    pki.add_argument("--appliance", default="dev")
    pki.add_argument("--hostname", default="localhost")
    args = p.parse_args(argv)
    setup_logging("info")
    try:
        if args.cmd == "pki":
            from mailtresor.keys.pki import dev_pki
            paths = dev_pki(Path(args.directory), appliance=args.appliance, hostname=args.hostname)
            print(f"development PKI in {args.directory}: {len(paths)} files")
            return 0
        cfg = configmod.load(configmod.locate(args.config))
        if args.cmd == "serve":
            # The one place that takes the global reactor.
            from twisted.internet import reactor
            return serve(cfg, reactor)
        cs = cfg.control_server
        if cs is None:
            raise ControlError(f"{cfg.source}: no [control_server] section")
        if args.cmd == "audit":
            problems = AuditLog(cs.audit_log).verify()
            for pr in problems:
                print(f"{cs.audit_log}: {pr}", file=sys.stderr)
            if not problems:
                print(f"{cs.audit_log}: chain intact")
            return 1 if problems else 0
        store = KeyStore(cs.keystore, read_master_secret(cs.master_key))
        audit_log = AuditLog(cs.audit_log)
        if args.cmd == "init":
            store.init()
            audit_log.append("init", keystore=str(cs.keystore))
            print(f"created empty key store {cs.keystore}")
            return 0
        if args.kcmd == "create":
            if args.if_missing and store.get(args.appliance, args.name) is not None:
                return 0
            v = store.create(args.appliance, args.name)
            audit_log.append("create", appliance=args.appliance, key=args.name, version=v)
            print(f"created {args.appliance}/{args.name} version {v}")
        elif args.kcmd == "rotate":
            v = store.rotate(args.appliance, args.name)
            audit_log.append("rotate", appliance=args.appliance, key=args.name, version=v)
            print(f"rotated {args.appliance}/{args.name}: current version is now {v}")
        elif args.kcmd == "share":
            known = {a.name for a in cs.appliance}
            try:
                for who in (args.appliance, args.to):
                    # Region pinning: one control endpoint per region; an
                    # appliance it does not serve is another region's.
                    if who not in known:
                        raise ControlError(f"appliance {who!r} is not served by this control endpoint "
                                           "([[control_server.appliance]]): keys are shared only within it")
                given = store.share(args.appliance, args.name, args.to)
            except ControlError as e:
                audit_log.append("share-refused", appliance=args.appliance, key=args.name, to=args.to,
                                 reason=str(e))
                raise
            audit_log.append("share", appliance=args.appliance, key=args.name, to=args.to, versions=given)
            print(f"shared {args.appliance}/{args.name} with {args.to}: "
                  + (f"version(s) {', '.join(map(str, given))}" if given else "it had every version already"))
        elif args.kcmd == "list":
            rows = [r for r in store.listing() if args.appliance in (None, r["appliance"])]
            if args.json:
                print(json.dumps(rows, indent=1))
            else:
                print(f"{'APPLIANCE':<16} {'KEY':<24} {'CURRENT':>7}  {'VERSIONS':<12} CREATED")
                for r in rows:
                    vs = ",".join(map(str, r["versions"]))
                    print(f"{r['appliance']:<16} {r['name']:<24} {r['current']:>7}  {vs:<12} {r['created']}")
        return 0
    except (ControlError, configmod.ConfigError) as e:
        print(f"mailtresor-control: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
