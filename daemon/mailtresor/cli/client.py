"""The CLI's client of the daemon's API over its local unix socket.

HTTP/1.1 with JSON, as the HTTPS API speaks it (docs/ACCESS.md),
over RUNTIME_DIRECTORY/api.sock: no TLS (the socket is the daemon's, mode
0660), no login: the daemon takes the peer's credentials (SO_PEERCRED;
root or its own user) as a local principal and audits it like any other.

Standard library only, and only what it needs (http.client, socket,
json): `mailtresor search` through the daemon starts in a few dozen
milliseconds because this is all it imports beyond the configuration.
"""

from __future__ import annotations

import http.client
import json
import socket
import urllib.parse
from pathlib import Path

SOCKET_NAME = "api.sock"
API = "/api/v1"


class DaemonUnavailable(Exception):
    """Nobody answers on the socket (no socket, connection refused, the
    daemon went away mid-request): the command may do the work itself."""


class ApiError(Exception):
    """The daemon answered with an error status; `reason` is its
    `{"error": ...}` text."""

    def __init__(self, status: int, reason: str):
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


class _UnixConnection(http.client.HTTPConnection):
    """http.client's connection, to a unix socket instead of host:port."""

    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class Client:
    """One keep-alive connection to the daemon's API socket.

    `json()` for JSON answers, `bytes()` for the raw ones (a message's
    .eml); both raise DaemonUnavailable when nobody answers, ApiError for
    an error status."""

    def __init__(self, runtime_directory: str | Path, *, timeout: float = 300.0):
        self.path = str(Path(runtime_directory) / SOCKET_NAME)
        self._conn = _UnixConnection(self.path, timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._conn.close()

    def request(self, method: str, path: str, params: dict | None = None,
                body: dict | None = None) -> tuple[int, str, bytes]:
        """(status, content type, body) of one request.  `params` become
        the query string (None values left out)."""
        url = path
        if params:
            query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
            url += "?" + query if query else ""
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            self._conn.request(method, url, body=data, headers=headers)
            resp = self._conn.getresponse()
            payload = resp.read()
        except (FileNotFoundError, ConnectionRefusedError) as e:
            # No socket, or one a dead daemon left behind.
            self._conn.close()
            raise DaemonUnavailable(f"{self.path}: {e.strerror}") from None
        except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected) as e:
            self._conn.close()
            raise DaemonUnavailable(f"{self.path}: the daemon closed the connection ({e})") from None
        except (OSError, http.client.HTTPException) as e:
            # Not allowed on the socket, a timeout, a garbled answer: the
            # command's own process may still be able to do the work.
            self._conn.close()
            raise DaemonUnavailable(f"{self.path}: {getattr(e, 'strerror', None) or e}") from None
        return resp.status, resp.getheader("Content-Type", ""), payload

    def json(self, method: str, path: str, params: dict | None = None, body: dict | None = None):
        """The decoded JSON answer to a request; ApiError for an error status."""
        status, ctype, payload = self.request(method, path, params, body)
        if status >= 400:
            raise ApiError(status, _reason(payload, status))
        try:
            return json.loads(payload)
        except ValueError:
            raise ApiError(status, f"the daemon answered with something else than JSON ({ctype or 'no type'})")

    def bytes(self, path: str, params: dict | None = None) -> bytes:
        """A raw answer's bytes (e.g. a message's .eml); ApiError for an error status."""
        status, _ctype, payload = self.request("GET", path, params)
        if status >= 400:
            raise ApiError(status, _reason(payload, status))
        return payload


def _reason(payload: bytes, status: int) -> str:
    try:
        doc = json.loads(payload)
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            return doc["error"]
    except ValueError:
        pass
    return f"the daemon answered {status}"


def quote(segment: str) -> str:
    """A path segment (an archive id, a user name) safe in a URL."""
    return urllib.parse.quote(segment, safe="")
