"""The LMDB store on real LMDB files: records, envelopes, chain, seals,
tampering, backup and restore."""

import hashlib
import os
import struct

import lmdb
import pytest

from mailtresor.keys import crypto
from mailtresor.keys.ring import KeyMaterial, KeyRing
from mailtresor.archive.store import (LISTING_FIELDS, BackupDirectory, Item, Keys, RecordCorrupt, Store, StoreError,
                              month_of, open_listing, read_frames, restore, seal_listing, verify_shard)
from tests.conftest import corpus_files, corpus_message

SEED = os.urandom(32)


def ring_with(*tenants, versions=1):
    ring = KeyRing()
    for t in tenants:
        for v in range(1, versions + 1):
            ring.put(KeyMaterial(f"tenant.{t}", v, os.urandom(32)), current=(v == versions))
    return ring


def item(keys, tenant, raw, env_key="e1", month="2002-08", rcpt=("b@acme.example",)):
    return Item(aid=keys.archive_id(tenant, raw), month=month, raw=raw, envelope_key=env_key,
                envelope={"source": "relay", "rcpt_to": list(rcpt)},
                summary={"subject": "s", "size": len(raw)})


RAW = b"From: a@globex.example\r\nSubject: Secret merger 42\r\n\r\nThe body is confidential\r\n"


@pytest.fixture
def keys():
    return Keys(ring_with("acme", "globex"))


def test_store_and_read_back_byte_identical(tmp_path, keys):
    st = Store(tmp_path)
    (out,) = st.store("acme", [item(keys, "acme", RAW)], keys)
    assert out.new_record and out.new_envelope
    raw, meta = st.shard("acme", out.month).get(out.aid, keys)
    assert raw == RAW
    assert meta["envelopes"]["e1"]["rcpt_to"] == ["b@acme.example"]
    assert st.locate("acme", out.aid) == "2002-08"
    st.close()


def test_same_message_twice_is_one_record_with_both_envelopes(tmp_path, keys):
    st = Store(tmp_path)
    a = item(keys, "acme", RAW, "spool-1")
    b = item(keys, "acme", RAW, "spool-2", month="2002-09", rcpt=("c@acme.example",))
    st.store("acme", [a], keys)
    (out,) = st.store("acme", [b], keys)
    assert not out.new_record and out.new_envelope and out.month == "2002-08"   # the catalog wins
    (again,) = st.store("acme", [item(keys, "acme", RAW, "spool-2")], keys)   # re-processing
    assert not again.new_record and not again.new_envelope
    shard = st.shard("acme", "2002-08")
    assert shard.count() == 1 and shard.head()[0] == 3        # add, meta, meta
    assert sorted(shard.get_meta(out.aid, keys)["envelopes"]) == ["spool-1", "spool-2"]
    assert st.months("acme") == ["2002-08"]
    st.close()


def _mapped(path) -> bool:
    """Whether this process has `path` mapped (LMDB maps data.mdb)."""
    with open("/proc/self/maps") as f:
        return any(line.rstrip().endswith(str(path)) for line in f)


def test_least_recently_used_shards_are_closed_and_reopen_intact(tmp_path, keys):
    st = Store(tmp_path, max_open_shards=2)
    months = ["2002-01", "2002-02", "2002-03", "2002-04"]
    stored = {}
    for m in months:
        raw = RAW + m.encode() + b"\r\n"
        (out,) = st.store("acme", [item(keys, "acme", raw, month=m)], keys)
        stored[m] = (out.aid, raw)
        assert len(st.open_shards()) <= 2
    # The two most recent stay open, the older ones are closed and unmapped.
    assert st.open_shards() == [("acme", "2002-03"), ("acme", "2002-04")]
    assert not _mapped(tmp_path / "acme" / "2002-01" / "lmdb" / "data.mdb")
    assert _mapped(tmp_path / "acme" / "2002-04" / "lmdb" / "data.mdb")
    # A hit moves a shard to the recent end; a reopened shard reads and
    # writes as before, its chain continuing where it was.
    st.shard("acme", "2002-03")
    assert st.shard("acme", "2002-01").get(stored["2002-01"][0], keys)[0] == stored["2002-01"][1]
    assert st.open_shards() == [("acme", "2002-03"), ("acme", "2002-01")]
    st.store("acme", [item(keys, "acme", b"From: x@y\r\n\r\nlater\r\n", month="2002-02")], keys)
    assert st.shard("acme", "2002-02").count() == 2 and st.shard("acme", "2002-02").head()[0] == 4
    for m, (aid, raw) in stored.items():
        shard = st.shard("acme", m)
        assert shard.get(aid, keys)[0] == raw
        assert verify_shard(shard, keys, None)[0] == []
    st.close()
    assert st.open_shards() == []
    with pytest.raises(ValueError):
        Store(tmp_path, max_open_shards=0)


def test_ids_are_per_tenant_and_stable_across_rotation():
    ring = ring_with("acme", versions=1)
    k1 = Keys(ring)
    aid = k1.archive_id("acme", RAW)
    ring.put(KeyMaterial("tenant.acme", 2, os.urandom(32)), current=True)
    assert Keys(ring).archive_id("acme", RAW) == aid
    other = Keys(ring_with("acme"))
    assert other.archive_id("acme", RAW) != aid


def test_rotated_key_still_decrypts_old_records(tmp_path):
    ring = ring_with("acme")
    keys = Keys(ring)
    st = Store(tmp_path)
    (old,) = st.store("acme", [item(keys, "acme", RAW)], keys)
    ring.put(KeyMaterial("tenant.acme", 2, os.urandom(32)), current=True)
    keys2 = Keys(ring)
    new_raw = RAW + b"second\r\n"
    (new,) = st.store("acme", [item(keys2, "acme", new_raw, "e2")], keys2)
    shard = st.shard("acme", "2002-08")
    assert shard.get(old.aid, keys2)[0] == RAW and shard.get(new.aid, keys2)[0] == new_raw
    assert verify_shard(shard, keys2, None)[0] == []
    st.close()


def test_a_tenant_cannot_read_another_tenants_record(tmp_path, keys):
    st = Store(tmp_path)
    (out,) = st.store("acme", [item(keys, "acme", RAW)], keys)
    shard = st.shard("acme", out.month)
    with shard.env.begin() as txn:
        blob = bytes(txn.get(bytes.fromhex(out.aid), db=shard.records))
    # globex's key cannot open it, even with the AAD rewritten to globex.
    from mailtresor.archive.store import open_record
    other = Keys(ring_with("acme"))                 # a different acme key: the wrong key
    with pytest.raises(RecordCorrupt):
        open_record(blob, "acme", out.month, bytes.fromhex(out.aid), other)
    ring = ring_with("globex")
    with pytest.raises(RecordCorrupt):
        open_record(blob, "globex", out.month, bytes.fromhex(out.aid), Keys(ring))
    st.close()


def test_listing_opens_only_for_its_tenant_shard_and_id(tmp_path, keys):
    summary = {"date": 1030010400.0, "from": "Alice <a@globex.example>", "subject": "Secret merger 42",
               "message_id": "<x@globex.example>", "size": 81, "flags": ["f"], "attachments": ["a.pdf"],
               "to": ["b@acme.example"], "to_count": 1}
    aid = bytes.fromhex(keys.archive_id("acme", RAW))
    blob = seal_listing(summary, "acme", "2002-08", aid, keys)
    assert b"merger" not in blob and b"globex" not in blob
    assert open_listing(blob, "acme", "2002-08", aid, keys) == {f: summary[f] for f in LISTING_FIELDS}
    for tenant, month, other_id in (("globex", "2002-08", aid), ("acme", "2002-09", aid),
                                    ("acme", "2002-08", bytes(20))):
        with pytest.raises(RecordCorrupt, match="does not decrypt"):
            open_listing(blob, tenant, month, other_id, keys)
    flipped = bytearray(blob)
    flipped[-1] ^= 1
    with pytest.raises(RecordCorrupt, match="does not decrypt"):
        open_listing(bytes(flipped), "acme", "2002-08", aid, keys)
    with pytest.raises(RecordCorrupt, match="bad magic"):
        open_listing(b"MTM1" + blob[4:], "acme", "2002-08", aid, keys)
    # A rotated key: the listing names its version and still opens.
    ring = ring_with("acme", versions=2)
    v1 = KeyRing()
    v1.put(KeyMaterial("tenant.acme", 1, ring.get("tenant.acme", 1)), current=True)
    blob1 = seal_listing(summary, "acme", "2002-08", aid, Keys(v1))
    assert blob1[5:9] == struct.pack(">I", 1)
    assert open_listing(blob1, "acme", "2002-08", aid, Keys(ring))["subject"] == "Secret merger 42"


def test_no_plaintext_in_lmdb_files(tmp_path, keys):
    st = Store(tmp_path)
    st.store("acme", [item(keys, "acme", RAW)], keys)
    st.close()
    blob = b"".join(p.read_bytes() for p in tmp_path.rglob("*.mdb"))
    assert b"Secret merger" not in blob and b"confidential" not in blob and b"acme.example" not in blob


def test_month_of():
    recv = 1_030_000_000.0                          # 2002-08-22
    assert month_of(1_027_000_000.0, recv) == "2002-07"
    assert month_of(None, recv) == "2002-08"
    assert month_of(recv + 10 * 86400, recv) == "2002-08"   # a Date in the future: arrival month
    assert month_of(-5.0, recv) == "2002-08"


# --- integrity ---

def filled(tmp_path, keys, n=5):
    st = Store(tmp_path)
    items = [item(keys, "acme", RAW + f"{i}\r\n".encode(), f"e{i}") for i in range(n)]
    outs = st.store("acme", items, keys)
    shard = st.shard("acme", "2002-08")
    return st, shard, [o.aid for o in outs]


def problems(shard, keys, pub=None):
    return [str(p) for p in verify_shard(shard, keys, pub)[0]]


def test_clean_shard_verifies_and_seals(tmp_path, keys):
    st, shard, ids = filled(tmp_path, keys)
    s = shard.seal(SEED)
    assert s is not None and s.seq == shard.head()[0]
    assert shard.seal(SEED) is None                 # nothing new to seal
    pset, live = verify_shard(shard, keys, crypto.ed25519_public(SEED))
    assert pset == [] and live == set(ids)
    st.close()


def test_flipped_byte_in_a_record_is_reported(tmp_path, keys):
    st, shard, ids = filled(tmp_path, keys)
    aid = bytes.fromhex(ids[2])
    with shard.env.begin(write=True) as txn:
        blob = bytearray(txn.get(aid, db=shard.records))
        blob[-20] ^= 0x01
        txn.put(aid, bytes(blob), db=shard.records)
    got = problems(shard, keys)
    assert len(got) == 1 and ids[2] in got[0] and "differs from what the chain recorded" in got[0]
    st.close()


def test_flipped_byte_with_chain_recomputed_is_caught_by_the_hash_and_the_seal(tmp_path, keys):
    """An attacker who also rewrites the chain: the record no longer
    decrypts/hashes, and the seal no longer matches."""
    st, shard, ids = filled(tmp_path, keys)
    shard.seal(SEED)
    from mailtresor.archive.store import _CHAIN, GENESIS, ChainEntry, chain_hash
    aid = bytes.fromhex(ids[0])
    with shard.env.begin(write=True) as txn:
        blob = bytearray(txn.get(aid, db=shard.records))
        blob[-1] ^= 0x80
        txn.put(aid, bytes(blob), db=shard.records)
        prev = GENESIS
        for k, v in list(txn.cursor(db=shard.chain)):
            seq = struct.unpack(">Q", k)[0]
            e = ChainEntry.decode(seq, v)
            digest = hashlib.sha256(bytes(blob)).digest() if bytes.fromhex(e.aid) == aid and e.op == 1 else e.digest
            h = chain_hash(seq, e.op, bytes.fromhex(e.aid), digest, e.time, prev)
            txn.put(k, _CHAIN.pack(e.op, bytes.fromhex(e.aid), digest, e.time, prev, h), db=shard.chain)
            prev = h
        txn.put(b"head", struct.pack(">Q32s", seq, prev), db=shard.state)
    got = "\n".join(problems(shard, keys))
    assert f"{ids[0]}: record does not decrypt" in got
    assert "seal 1 does not match chain entry" in got
    st.close()


def test_deleted_record_is_reported(tmp_path, keys):
    st, shard, ids = filled(tmp_path, keys)
    with shard.env.begin(write=True) as txn:
        txn.delete(bytes.fromhex(ids[1]), db=shard.records)
    got = problems(shard, keys)
    assert got == [f"acme/2002-08: {ids[1]}: record is missing (deleted without a tombstone)"]
    st.close()


def test_swapped_records_are_reported(tmp_path, keys):
    st, shard, ids = filled(tmp_path, keys)
    a, b = bytes.fromhex(ids[0]), bytes.fromhex(ids[3])
    with shard.env.begin(write=True) as txn:
        va, vb = bytes(txn.get(a, db=shard.records)), bytes(txn.get(b, db=shard.records))
        txn.put(a, vb, db=shard.records)
        txn.put(b, va, db=shard.records)
    got = "\n".join(problems(shard, keys))
    assert ids[0] in got and ids[3] in got and "swapped" in got
    st.close()


def test_reordered_and_removed_chain_entries_are_reported(tmp_path, keys):
    st, shard, ids = filled(tmp_path, keys)
    with shard.env.begin(write=True) as txn:
        k3, k4 = struct.pack(">Q", 3), struct.pack(">Q", 4)
        v3, v4 = bytes(txn.get(k3, db=shard.chain)), bytes(txn.get(k4, db=shard.chain))
        txn.put(k3, v4, db=shard.chain)
        txn.put(k4, v3, db=shard.chain)
    got = "\n".join(problems(shard, keys))
    assert "chain entry 3 does not link" in got and "chain entry 3 was altered" in got
    with shard.env.begin(write=True) as txn:
        txn.put(k3, v3, db=shard.chain)
        txn.put(k4, v4, db=shard.chain)
        txn.delete(struct.pack(">Q", 6), db=shard.chain)
    got = "\n".join(problems(shard, keys))
    assert "chain entries 6..6 are missing" in got
    st.close()


def test_truncated_chain_after_a_seal_is_reported(tmp_path, keys):
    st, shard, ids = filled(tmp_path, keys)
    shard.seal(SEED)
    seq = shard.head()[0]
    with shard.env.begin(write=True) as txn:
        txn.delete(struct.pack(">Q", seq), db=shard.chain)
        e = txn.get(struct.pack(">Q", seq - 1), db=shard.chain)
        txn.put(b"head", struct.pack(">Q32s", seq - 1, bytes(e)[-32:]), db=shard.state)
        txn.delete(bytes.fromhex(ids[-1]), db=shard.meta)
    got = "\n".join(problems(shard, keys))
    assert f"covers chain entry {seq}, which is gone" in got
    st.close()


def test_seal_by_another_key_is_reported(tmp_path, keys):
    st, shard, ids = filled(tmp_path, keys)
    shard.seal(os.urandom(32))
    got = problems(shard, keys, crypto.ed25519_public(SEED))
    assert got == ["acme/2002-08: seal 1 was made with another key"]
    with shard.env.begin(write=True) as txn:
        raw = bytearray(txn.get(struct.pack(">Q", 1), db=shard.seals))
        raw[60] ^= 1                                # inside the signature
        txn.put(struct.pack(">Q", 1), bytes(raw), db=shard.seals)
    assert "seal 1: signature does not verify" in "\n".join(problems(shard, keys))
    st.close()


def test_seals_by_every_version_of_the_seal_key_verify(tmp_path, keys):
    """After a seal key rotation the older seals still verify (verify is
    given every version's public key); a foreign key's seal does not."""
    from mailtresor.archive.store import FetchingKeys, Item
    st, shard, ids = filled(tmp_path, keys)
    v1, v2 = os.urandom(32), os.urandom(32)
    shard.seal(v1)
    raw = b"Subject: after the rotation\r\n\r\nx\r\n"
    st.store("acme", [Item(aid=keys.archive_id("acme", raw), month="2002-08", raw=raw, envelope_key="e9",
                           envelope={"source": "relay"}, summary={})], keys)
    shard = st.shard("acme", "2002-08")
    shard.seal(v2)
    both = [crypto.ed25519_public(v1), crypto.ed25519_public(v2)]
    assert problems(shard, keys, both) == []
    assert problems(shard, keys, both[1]) == ["acme/2002-08: seal 1 was made with another key"]
    # The CLI's key source: every version the control endpoint has, oldest first.
    ring = KeyRing()
    fetched = []

    def fetch(name, version):
        fetched.append((name, version))
        seed = {1: v1, 2: v2}[version or 2]
        return KeyMaterial(name, version or 2, seed)
    assert FetchingKeys(ring, fetch).seal_seeds() == [v1, v2]
    assert fetched == [("seal", None), ("seal", 1)]
    st.close()


def test_tombstone_keeps_the_chain_valid(tmp_path, keys):
    st, shard, ids = filled(tmp_path, keys)
    assert shard.delete(ids[0], "retention expired")
    assert not shard.delete(ids[0], "again")
    pset, live = verify_shard(shard, keys, None)
    assert pset == [] and live == set(ids[1:])
    st.close()


# --- backup and restore ---

def test_backup_and_restore_bit_for_bit(tmp_path, keys):
    files = corpus_files()[::97]
    st = Store(tmp_path / "store")
    backup = BackupDirectory(tmp_path / "backup")
    months = ["2002-07", "2002-08"]
    for i, p in enumerate(files):
        raw = corpus_message(p)
        for t in ("acme", "globex"):
            st.store(t, [item(keys, t, raw, f"e{i}", month=months[i % 2])], keys)
    st.shard("acme", "2002-07").delete(keys.archive_id("acme", corpus_message(files[0])), "test")
    for t in ("acme", "globex"):
        for m in months:
            st.shard(t, m).seal(SEED)
            backup.ship(st.shard(t, m))
    before = {(t, m): st.shard(t, m).dump() for t in ("acme", "globex") for m in months}
    st.close()
    # Nothing readable in the backup.
    blob = b"".join(p.read_bytes() for p in (tmp_path / "backup").rglob("*.log"))
    for p in files[1:]:
        subj = next((ln for ln in corpus_message(p).split(b"\r\n") if ln.startswith(b"Subject: ")), b"")
        if len(subj) > 20:
            assert subj not in blob

    counts = restore(backup, tmp_path / "restored")
    assert sum(counts.values()) == 2 * len(files) - 1
    st2 = Store(tmp_path / "restored")
    for (t, m), dump in before.items():
        assert st2.shard(t, m).dump() == dump
        assert verify_shard(st2.shard(t, m), keys, crypto.ed25519_public(SEED))[0] == []
    aid = keys.archive_id("globex", corpus_message(files[3]))
    assert st2.shard("globex", st2.locate("globex", aid)).get(aid, keys)[0] == corpus_message(files[3])
    st2.close()
    with pytest.raises(StoreError, match="restore only into an empty store"):
        restore(backup, tmp_path / "restored")


def test_backup_survives_a_torn_tail_and_a_reship(tmp_path, keys):
    st, shard, ids = filled(tmp_path / "store", keys, n=3)
    backup = BackupDirectory(tmp_path / "backup")
    assert backup.ship(shard) == 6
    log_path = backup.path("acme", "2002-08")
    size = log_path.stat().st_size
    st.store("acme", [item(keys, "acme", RAW + b"later\r\n", "e9")], keys)
    with open(log_path, "ab") as f:                 # a crash in the middle of an append
        f.write(b"MTB1\x01garbage")
    # and the mark was not advanced for the last entries: they go again
    with shard.env.begin(write=True) as txn:
        txn.put(b"backup_seq", struct.pack(">Q", 4), db=shard.state)
    backup.ship(shard)
    frames = list(read_frames(log_path))
    assert log_path.stat().st_size > size and [s for k, s, _ in frames] == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8]
    before = shard.dump()
    st.close()
    restore(backup, tmp_path / "restored")
    st2 = Store(tmp_path / "restored")
    assert st2.shard("acme", "2002-08").dump() == before
    st2.close()


def test_readonly_store_does_not_create_anything(tmp_path):
    st = Store(tmp_path / "none", readonly=True)
    with pytest.raises(StoreError, match="no shard acme/2002-08"):
        st.shard("acme", "2002-08")
    assert not (tmp_path / "none").exists()


def test_lmdb_env_is_a_real_lmdb_file(tmp_path, keys):
    st, shard, ids = filled(tmp_path, keys)
    st.close()
    env = lmdb.open(str(tmp_path / "acme" / "2002-08" / "lmdb"), max_dbs=8, readonly=True)
    records = env.open_db(b"records", create=False)
    with env.begin() as txn:
        assert txn.stat(records)["entries"] == 5
    env.close()


def test_outcomes_come_in_the_order_of_the_items(tmp_path, keys):
    """Items of several months in one batch: the caller pairs outcome i
    with item i (the archiver indexes by that pairing)."""
    st = Store(tmp_path)
    items = [item(keys, "acme", RAW + f"{i}\r\n".encode(), f"e{i}", month=m)
             for i, m in enumerate(["2002-09", "2002-07", "2002-08", "2002-07", "2002-09"])]
    outs = st.store("acme", items, keys)
    assert [o.aid for o in outs] == [it.aid for it in items]
    assert [o.month for o in outs] == ["2002-09", "2002-07", "2002-08", "2002-07", "2002-09"]
    st.close()


def test_a_damaged_backup_frame_is_never_truncated_away(tmp_path, keys):
    st, shard, ids = filled(tmp_path / "store", keys, n=3)
    backup = BackupDirectory(tmp_path / "backup")
    backup.ship(shard)
    log_path = backup.path("acme", "2002-08")
    data = bytearray(log_path.read_bytes())
    data[30] ^= 0x01                                   # inside frame 1
    log_path.write_bytes(bytes(data))
    from mailtresor.archive import store as storemod
    storemod._checked_size.clear()
    st.store("acme", [item(keys, "acme", RAW + b"more\r\n", "e7")], keys)
    with pytest.raises(StoreError, match="damaged at byte 0"):
        backup.ship(shard)
    assert log_path.read_bytes() == bytes(data)        # nothing dropped
    st.close()


def test_each_blob_is_read_by_the_codec_of_its_format_version(tmp_path, keys, monkeypatch):
    """The format byte picks the codec from the table: an unknown format is
    refused by name, and a new format is one entry that leaves the blobs
    already written readable."""
    from mailtresor.archive.store import codecs

    st = Store(tmp_path)
    (out,) = st.store("acme", [item(keys, "acme", RAW)], keys)
    shard = st.shard("acme", out.month)
    aid = bytes.fromhex(out.aid)
    with shard.env.begin() as txn:
        old = bytes(txn.get(aid, db=shard.records))
        old_meta = bytes(txn.get(aid, db=shard.meta))
    version, key = keys.current("acme")

    future = bytearray(old)
    future[4] = 2
    with pytest.raises(RecordCorrupt, match="record format 2 is not supported"):
        codecs.open_record(bytes(future), "acme", out.month, aid, keys)
    meta2 = bytearray(old_meta)
    meta2[4] = 2
    with pytest.raises(RecordCorrupt, match="metadata format 2 is not supported"):
        codecs.open_meta(bytes(meta2), "acme", out.month, aid, keys)

    class RecordV2(codecs.RecordV1):
        format = 2                               # same layout, another number: enough for the table

    monkeypatch.setitem(codecs.RECORD_CODECS, 2, RecordV2())
    monkeypatch.setattr(codecs, "WRITE_FORMAT", 2)
    new = codecs.seal_record(RAW + b"v2\r\n", "acme", out.month, aid, version, key)
    assert new[4] == 2 and codecs.record_header(new)[0] == 2
    assert codecs.open_record(new, "acme", out.month, aid, keys) == RAW + b"v2\r\n"
    assert codecs.open_record(old, "acme", out.month, aid, keys) == RAW      # format 1 still reads
    st.close()
