"""HTTP plumbing for the API that has nothing to do with the archive.

JSON answers and errors, the security headers every answer carries, the
request body limit, the per-client connection limit and the unix socket's
peer check.  Pure functions where they can be (parsing), Twisted classes
where they must be; nothing here touches the global reactor.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import struct

from twisted.protocols import policies
from twisted.web import server

log = logging.getLogger("mailtresor.access.api")

# Every answer, errors included.  HSTS: the API is TLS only; no-store: mail
# and audit records must not stay in a browser's or proxy's cache.
SECURITY_HEADERS = {
    b"Strict-Transport-Security": b"max-age=31536000",
    b"X-Content-Type-Options": b"nosniff",
    b"Referrer-Policy": b"no-referrer",
    b"Cache-Control": b"no-store",
    b"X-Frame-Options": b"DENY",
    b"Content-Security-Policy": b"default-src 'none'; frame-ancestors 'none'",
}
# The sanitised HTML rendering of a message: nothing but inline styles and
# inline (data:) images, and a sandbox (no scripts, forms, same-origin).
HTML_CSP = b"default-src 'none'; img-src data:; style-src 'unsafe-inline'; sandbox"

JSON_TYPE = b"application/json"
_PEERCRED = struct.Struct("3i")     # struct ucred: pid, uid, gid


class HttpError(Exception):
    """An answer other than success: `status` and a `reason` for the client
    (never a traceback, never a secret)."""

    def __init__(self, status: int, reason: str, headers: dict[bytes, bytes] | None = None, **extra):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}
        self.extra = extra             # more members of the JSON body (e.g. totp_required)


def error_body(reason: str, **extra) -> bytes:
    return json_bytes({"error": reason, **extra})


def json_bytes(doc) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def parse_json_object(body: bytes, *, required: tuple[str, ...] = (), optional: tuple[str, ...] = ()) -> dict:
    """A request body that must be one JSON object with these members.
    HttpError(400) naming the problem otherwise.  Pure."""
    if not body.strip():
        raise HttpError(400, "the request needs a JSON body")
    try:
        doc = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise HttpError(400, "malformed JSON: the body is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise HttpError(400, f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(doc, dict):
        raise HttpError(400, "the JSON body must be an object")
    allowed = set(required) | set(optional)
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise HttpError(400, f"unknown member {unknown[0]!r} in the JSON body")
    for key in required:
        if key not in doc:
            raise HttpError(400, f"the JSON body needs {key!r}")
    return doc


def member(doc: dict, key: str, kind, default=None):
    """doc[key] checked for type (str, int, bool, list-of-str as list)."""
    value = doc.get(key, default)
    if value is default:
        return value
    if kind is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise HttpError(400, f"{key!r} must be a list of strings")
        return value
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise HttpError(400, f"{key!r} must be an integer")
    if kind is str and not isinstance(value, str):
        raise HttpError(400, f"{key!r} must be a string")
    if kind is bool and not isinstance(value, bool):
        raise HttpError(400, f"{key!r} must be true or false")
    return value


def query_args(args: dict[bytes, list[bytes]], allowed: tuple[str, ...]) -> dict[str, str]:
    """The query string as {name: value}; an unknown or repeated parameter,
    or one that is not UTF-8, is a 400 naming it.  Pure."""
    out = {}
    for raw, values in args.items():
        try:
            name = raw.decode("utf-8")
            vals = [v.decode("utf-8") for v in values]
        except UnicodeDecodeError:
            raise HttpError(400, "the query string is not UTF-8") from None
        if name not in allowed:
            shown = name if len(name) <= 40 and name.isprintable() else "(unprintable)"
            raise HttpError(400, f"unknown parameter {shown!r}" + (
                f" (this route takes {', '.join(allowed)})" if allowed else " (this route takes none)"))
        if len(vals) != 1:
            raise HttpError(400, f"parameter {name!r} given more than once")
        out[name] = vals[0]
    return out


def int_arg(args: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    if name not in args:
        return default
    text = args[name]
    if not re.fullmatch(r"[0-9]{1,12}", text):
        raise HttpError(400, f"{name!r} must be a non-negative integer")
    value = int(text)
    if not low <= value <= high:
        raise HttpError(400, f"{name!r} must be between {low} and {high}")
    return value


def bool_arg(args: dict[str, str], name: str) -> bool:
    text = args.get(name, "0").lower()
    if text in ("1", "true", "yes"):
        return True
    if text in ("0", "false", "no", ""):
        return False
    raise HttpError(400, f"{name!r} must be 1 or 0")


def safe_filename(name: str, fallback: str) -> str:
    """A file name for Content-Disposition: no path, no control characters,
    no quotes; ASCII only in the plain `filename=` (RFC 6266). Pure."""
    name = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable() and c not in '"\r\n;')
    name = name.strip(" .")[:200]
    return name or fallback


def content_disposition(name: str, fallback: str) -> bytes:
    from urllib.parse import quote
    name = safe_filename(name, fallback)
    ascii_name = name.encode("ascii", "replace").decode().replace("?", "_")
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name, safe='')}".encode()


# Types a browser may be handed as they are (as an attachment download
# still); everything else is application/octet-stream.  Never text/html,
# image/svg+xml or anything else a browser would run script in.
SAFE_TYPES = frozenset({
    "text/plain", "text/csv", "application/pdf", "image/png", "image/jpeg", "image/gif", "image/webp",
    "application/zip", "application/gzip", "message/rfc822", "application/msword",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    "application/vnd.ms-excel", "application/vnd.oasis.opendocument.text", "text/calendar",
})


def download_type(content_type: str) -> bytes:
    base = (content_type or "").split(";", 1)[0].strip().lower()
    return base.encode() if base in SAFE_TYPES else b"application/octet-stream"


# --- the request: a body limit -------------------------------------------------

class LimitedRequest(server.Request):
    """A Request that refuses a body over the site's `max_body`: at once
    (413, connection closed) when Content-Length says so, else as soon as
    the chunks pass the limit.  Nothing beyond the limit is kept."""

    refused = False
    _received = 0
    _deadline = None

    def __init__(self, channel, *args, **kw):
        super().__init__(channel, *args, **kw)
        # The idle timeout alone lets a client that sends a byte now and
        # then hold a request open for ever: the whole request (headers and
        # body) must be in within the site's timeout of its first line.
        limit = getattr(getattr(channel, "site", None), "timeOut", None)
        later = getattr(channel, "callLater", None)
        if limit and later is not None:
            self._deadline = later(limit, self._too_slow)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        log.info("api: %s: the request was not complete after %s s; connection closed",
                 self.getClientAddress(), getattr(self.channel.site, "timeOut", "?"))
        t = self.channel.transport
        getattr(t, "abortConnection", t.loseConnection)()

    def connectionLost(self, reason):
        self._cancel_deadline()
        super().connectionLost(reason)

    def _limit(self) -> int:
        return getattr(self.channel.site, "max_body", 1 << 20) if self.channel is not None else 1 << 20

    def gotLength(self, length):
        if length is not None and length > self._limit():
            super().gotLength(0)
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data):
        if self.refused:
            return
        self._received += len(data)
        if self._received > self._limit():
            self._refuse()
            return
        super().handleContentChunk(data)

    def _refuse(self):
        """Answer 413 on the wire and close: the request never reaches the
        resource, and the rest of the body is not read."""
        self.refused = True
        self._cancel_deadline()
        reason = f"the request body is larger than {self._limit()} bytes"
        body = error_body(reason)
        head = [b"HTTP/1.1 413 Content Too Large", b"Content-Type: " + JSON_TYPE,
                b"Content-Length: " + str(len(body)).encode(), b"Connection: close"]
        head += [k + b": " + v for k, v in SECURITY_HEADERS.items()]
        site = getattr(self.channel, "site", None)
        if site is not None and hasattr(site, "on_refused"):
            site.on_refused(self, 413)
        log.info("api: %s: 413 (%s)", self.getClientAddress(), reason)
        transport = self.channel.transport
        transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        transport.loseConnection()

    def process(self):
        self._cancel_deadline()
        if self.refused:
            return
        super().process()


# --- connections: per-client limit, unix peer credentials ----------------------

def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of a unix socket's peer (SO_PEERCRED)."""
    return _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))


class _Gated(policies.ProtocolWrapper):
    """The wrapper around one HTTP connection; `local` is the peer's
    principal on the unix socket (read by the API through the channel's
    transport), `host` its address for the per-client count."""

    local = None
    host = ""
    counted = False
    refused = False

    def makeConnection(self, transport):
        f = self.factory
        if f.unix:
            try:
                pid, uid, _gid = peer_credentials(transport.getHandle())
            except OSError as e:
                log.warning("api socket: cannot read the peer's credentials (%s); connection closed", e)
                self.refused = True
                transport.loseConnection()
                return
            if uid not in f.allowed_uids:
                log.warning("api socket: refused uid %d (pid %d): only root and the daemon's user may connect",
                            uid, pid)
                self.refused = True
                transport.loseConnection()
                return
            self.local = f.make_local(uid, pid)
        else:
            self.host = getattr(transport.getPeer(), "host", "")
            if len(f.protocols) >= f.max_connections or \
                    f.per_client.get(self.host, 0) >= f.max_per_client:
                log.warning("api: %s: too many connections; refused", self.host)
                self.refused = True
                transport.loseConnection()
                return
            f.per_client[self.host] = f.per_client.get(self.host, 0) + 1
            self.counted = True
            # Answers are small and whole: no Nagle delay behind the
            # client's delayed ACK between a TLS record and the next.
            try:
                transport.getHandle().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (AttributeError, OSError):
                pass
        super().makeConnection(transport)

    def connectionLost(self, reason):
        if self.refused:                    # never handed to HTTP, never registered
            return
        if self.counted:
            f = self.factory
            n = f.per_client.get(self.host, 0) - 1
            if n > 0:
                f.per_client[self.host] = n
            else:
                f.per_client.pop(self.host, None)
            self.counted = False
        super().connectionLost(reason)


class ConnectionGate(policies.WrappingFactory):
    """Wraps the API's Site: on TCP, at most `max_connections` connections
    and `max_per_client` per client address (an idle keep-alive connection
    is closed by the Site's timeout); on the unix socket, only peers whose
    uid is in `allowed_uids`, each made a local principal by `make_local`."""

    protocol = _Gated

    def __init__(self, site, *, unix: bool = False, max_connections: int = 256, max_per_client: int = 32,
                 allowed_uids=(), make_local=None):
        super().__init__(site)
        self.unix = unix
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self.allowed_uids = frozenset(allowed_uids)
        self.make_local = make_local
        self.per_client: dict[str, int] = {}

