"""API tokens for machines (a SOC pulling events, an e-discovery tool).

A token is "mt_<id>_<secret>": <id> (16 hex digits) names it in lists and the
audit trail, <secret> is 32 random bytes (base64url) shown once at issue.
Only the SHA-256 of the secret is kept (a 256-bit random secret needs no slow
hash), with the tenant, the scopes, an expiry and a revoked flag, in an
encrypted file (sealed.py).
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from mailtresor.access.principal import SCOPES
from mailtresor.access.sealed import SealedFile

_AAD = b"mailtresor access tokens v1"
PREFIX = "mt"
_ID = re.compile(r"^[0-9a-f]{16}$")
_SECRET = re.compile(r"^[A-Za-z0-9_-]{43}$")
_LABEL = re.compile(r"^[\x21-\x7e][\x20-\x7e]{0,127}$")


class TokenError(ValueError):
    """A request the token database refuses; the message names the problem."""


@dataclass(frozen=True)
class Token:
    id: str
    tenant: str | None
    name: str
    scopes: frozenset[str]
    created: float
    expires: float | None
    revoked: bool

    def public(self) -> dict:
        return {"id": self.id, "tenant": self.tenant, "name": self.name, "scopes": sorted(self.scopes),
                "created": _iso(self.created), "expires": None if self.expires is None else _iso(self.expires),
                "revoked": self.revoked}


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def parse(token: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed "mt_<id>_<secret>", else None.  Pure."""
    if not isinstance(token, str):
        return None
    parts = token.split("_", 2)           # the secret is base64url: it may hold "_" itself
    if len(parts) != 3 or parts[0] != PREFIX or not _ID.match(parts[1]) or not _SECRET.match(parts[2]):
        return None
    return parts[1], parts[2]


class TokenDB:
    """Every tenant's API tokens, in `path`, encrypted under `key`."""

    def __init__(self, path: Path, key: bytes, *, clock=time.time):
        self._file = SealedFile(path, key, _AAD, lambda: {"version": 1, "tokens": {}})
        self.path = self._file.path
        self._clock = clock

    @staticmethod
    def _token(tid: str, rec: dict) -> Token:
        return Token(id=tid, tenant=rec["tenant"], name=rec["name"], scopes=frozenset(rec["scopes"]),
                     created=rec["created"], expires=rec["expires"], revoked=rec["revoked"])

    def issue(self, tenant: str | None, name: str, scopes, expires: float | None) -> tuple[str, str]:
        """A new token; returns (token id, the whole token "mt_<id>_<secret>"),
        the second shown once and never stored.  `expires`: a Unix time, or
        None for a token that lasts until revoked."""
        scopes = frozenset(scopes)
        bad = scopes - set(SCOPES)
        if bad:
            raise TokenError(f"unknown scope(s) {', '.join(sorted(bad))} (scopes: {', '.join(SCOPES)})")
        if not scopes:
            raise TokenError("a token needs at least one scope")
        if not isinstance(name, str) or not _LABEL.match(name):
            raise TokenError("a token's name is 1 to 128 printable ASCII characters")
        now = self._clock()
        if expires is not None and expires <= now:
            raise TokenError("the expiry is in the past")
        secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
        tid = secrets.token_hex(8)

        def do(data):
            if tid in data["tokens"]:          # 64 random bits: never, but never silently
                raise TokenError("token id collision; issue again")
            data["tokens"][tid] = {"tenant": tenant, "name": name, "scopes": sorted(scopes),
                                   "hash": _digest(secret), "created": now, "expires": expires,
                                   "revoked": False}
        self._file.modify(do)
        return tid, f"{PREFIX}_{tid}_{secret}"

    def revoke(self, token_id: str, tenant: str | None = ...) -> None:
        """Revoke a token; with `tenant` given, only one of that tenant's
        (another tenant's id is "no such token")."""
        def do(data):
            rec = data["tokens"].get(token_id)
            if rec is None or (tenant is not ... and rec["tenant"] != tenant):
                raise TokenError(f"no token {token_id!r}")
            rec["revoked"] = True
        self._file.modify(do)

    def list(self, tenant: str | None = ...) -> list[Token]:
        """The tokens of `tenant` (all of them when not given); no secret, no hash."""
        toks = self._file.load()["tokens"]
        return [self._token(t, r) for t, r in sorted(toks.items(), key=lambda kv: kv[1]["created"])
                if tenant is ... or r["tenant"] == tenant]

    def check(self, token: str) -> Token | None:
        """The token a presented "mt_<id>_<secret>" is, if it is known, its
        secret matches, and it is neither revoked nor expired; else None."""
        parsed = parse(token)
        if parsed is None:
            return None
        tid, secret = parsed
        rec = self._file.load()["tokens"].get(tid)
        digest = _digest(secret)
        # Compared even for an unknown id, so that the answer takes as long.
        stored = rec["hash"] if rec is not None else "0" * 64
        if not secrets.compare_digest(stored, digest) or rec is None:
            return None
        if rec["revoked"] or (rec["expires"] is not None and rec["expires"] <= self._clock()):
            return None
        return self._token(tid, rec)
