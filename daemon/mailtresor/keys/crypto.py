"""The one place that touches `cryptography`.

Everything else sees a handful of functions and the `Aead` class.  Keys are
`bytes` of `KEY_SIZE`; they come from the control endpoint and are never
written to disk by the appliance.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag

# cryptography's primitives are imported where they are used: each of them
# imports cryptography 38's whole OpenSSL backend (X.509, every algorithm),
# ~25 ms that `mailtresor status` and `--help` need not pay.  AES-GCM is
# cryptography's AESGCM, whatever the start-up cost: a vetted AEAD is not
# traded for start-up time.


def AESGCM(key: bytes):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM as _AESGCM
    return _AESGCM(key)

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16


class DecryptionError(Exception):
    """Ciphertext, nonce or associated data do not authenticate."""


def random_key() -> bytes:
    return os.urandom(KEY_SIZE)


def random_bytes(n: int) -> bytes:
    return os.urandom(n)


def derive(key: bytes, salt: bytes, info: bytes, length: int = KEY_SIZE) -> bytes:
    """HKDF-SHA256 (RFC 5869): a sub-key bound to `salt` and `info`
    (cryptography's HKDF; an empty salt is HKDF's default, a hash-length
    string of zeros)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt or None, info=info).derive(key)


class Aead:
    """AES-256-GCM with caller-managed nonces.

    Callers derive a fresh key per object (file, record) and use counters as
    nonces, so a nonce never repeats under one key.
    """

    __slots__ = ("_aead",)

    def __init__(self, key: bytes):
        if len(key) != KEY_SIZE:
            raise ValueError("AEAD key must be 32 bytes")
        self._aead = AESGCM(key)

    def seal(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        return self._aead.encrypt(nonce, plaintext, aad)

    def open(self, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        try:
            return self._aead.decrypt(nonce, ciphertext, aad)
        except InvalidTag:
            raise DecryptionError("authentication failed") from None


def counter_nonce(n: int) -> bytes:
    return n.to_bytes(NONCE_SIZE, "big")


def seal_blob(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """One-shot encryption with a random nonce (prepended)."""
    nonce = os.urandom(NONCE_SIZE)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_blob(key: bytes, blob: bytes, aad: bytes) -> bytes:
    if len(blob) < NONCE_SIZE + TAG_SIZE:
        raise DecryptionError("ciphertext too short")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_SIZE], blob[NONCE_SIZE:], aad)
    except InvalidTag:
        raise DecryptionError("authentication failed") from None


def passphrase_key(secret: bytes, salt: bytes) -> bytes:
    """Stretch a master secret (possibly a human passphrase) into a key."""
    from argon2.low_level import Type, hash_secret_raw

    return hash_secret_raw(secret, salt, time_cost=3, memory_cost=64 * 1024,
                           parallelism=2, hash_len=KEY_SIZE, type=Type.ID)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def constant_time_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


# --- Ed25519: shard seals ------------------------------------------------------

class SignatureError(Exception):
    """A signature does not verify."""


def ed25519_public(seed: bytes) -> bytes:
    """The raw 32-byte public key of a 32-byte Ed25519 seed."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    return Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def ed25519_sign(seed: bytes, message: bytes) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    return Ed25519PrivateKey.from_private_bytes(seed).sign(message)


def ed25519_verify(public: bytes, signature: bytes, message: bytes) -> None:
    from cryptography.exceptions import InvalidSignature
    try:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        raise SignatureError("Ed25519 signature does not verify") from None
