import os

from mailtresor.keys import crypto


# RFC 5869 appendix A, the SHA-256 cases: (IKM, salt, info, L, OKM).
RFC5869 = [
    ("0b" * 22, "000102030405060708090a0b0c", "f0f1f2f3f4f5f6f7f8f9", 42,
     "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"),
    (bytes(range(0x00, 0x50)).hex(), bytes(range(0x60, 0xb0)).hex(), bytes(range(0xb0, 0x100)).hex(), 82,
     "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c59045a99cac7827271cb41c65e590e09"
     "da3275600c2f09b8367793a9aca3db71cc30c58179ec3e87c14c01d5c1f3434f1d87"),
    ("0b" * 22, "", "", 42,      # no salt: what the tenant sub-keys use (salt b"")
     "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"),
]


def test_hkdf_rfc5869_vectors():
    for ikm, salt, info, n, okm in RFC5869:
        assert crypto.derive(bytes.fromhex(ikm), bytes.fromhex(salt), bytes.fromhex(info), n).hex() == okm


def test_hkdf_gives_the_keys_the_hand_written_one_gave():
    """The sub-keys of data already written (archive ids, records, spool
    files) must not change: these were made by the standard-library HKDF
    that cryptography's replaced."""
    k = bytes(range(32))
    assert crypto.derive(k, b"", b"mailtresor/archive-id").hex() == (
        "3e1b2a1d0c1b8da10a424ed0fe57d5d338d007f78e223c05df4f3728126ce430")
    assert crypto.derive(k, b"", b"mailtresor/store/v1").hex() == (
        "a8ea4714ed8cf327f41189386489aaa79a02147bfefb0233f1a1bfacb194e136")
    assert crypto.derive(k, bytes(range(16)), b"mailtresor spool file v1 01M84NRCP2JHDE0G8666FPJMEZ").hex() == (
        "29cdb21b1848d14eedbcf8df2369bc8619a79baa9af4dc14a622c72bbf4fa467")


def test_hkdf_is_cryptographys():
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    for n in (1, 16, 32, 33, 64, 100):
        k, s, i = os.urandom(32), os.urandom(16), os.urandom(n % 40)
        assert crypto.derive(k, s, i, n) == HKDF(algorithm=hashes.SHA256(), length=n, salt=s, info=i).derive(k)


def test_aead_round_trip_and_tamper():
    key = crypto.random_key()
    a = crypto.Aead(key)
    ct = a.seal(crypto.counter_nonce(7), b"secret", b"aad")
    assert a.open(crypto.counter_nonce(7), ct, b"aad") == b"secret"
    for bad in ((crypto.counter_nonce(8), ct, b"aad"), (crypto.counter_nonce(7), ct, b"other")):
        try:
            a.open(*bad)
        except crypto.DecryptionError:
            pass
        else:
            raise AssertionError("tampered input decrypted")
    blob = crypto.seal_blob(key, b"x", b"ad")
    assert crypto.open_blob(key, blob, b"ad") == b"x"
