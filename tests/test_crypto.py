import os

from mailtresor.keys import crypto


def test_hkdf_matches_cryptography_and_rfc5869():
    # RFC 5869, test case 1
    ikm = bytes.fromhex("0b" * 22)
    salt = bytes.fromhex("000102030405060708090a0b0c")
    info = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9")
    okm = ("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
           "34007208d5b887185865")
    assert crypto.derive(ikm, salt, info, 42).hex() == okm
    for n in (1, 16, 32, 33, 64, 100):
        k, s, i = os.urandom(32), os.urandom(16), os.urandom(n % 40)
        assert crypto.derive(k, s, i, n) == crypto.derive_reference(k, s, i, n)


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
