"""Format version 4: the shard index (docs/FORMAT.md section 11): round trip, lazy constant-time open, lookups
across blocks and empty shards, damage to the index found where it is read, version 3 still written on request."""

import hashlib
import json
import pickle

import numpy as np
import pytest
from store_factory import make_meta, random_rows, write_rows

from labelstore.errors import StoreCorruptError, StoreFormatError
from labelstore.store.format import MAX_SHARDS, normalize_meta, with_digest
from labelstore.store.index import INDEX, validate_index_ref, write_index_columns
from labelstore.store.manifest import CONFIG, atomic_write_json, config_with_digest, load_manifest, write_manifest
from labelstore.store.reader import LabelStore
from labelstore.store.verify import verify_store
from labelstore.store.writer import StoreWriter


def _store(tmp_path, n=40, **meta):
    rows = random_rows(n, seed=11)
    p = tmp_path / "s"
    with StoreWriter(p, make_meta(**meta), shard_bytes=1500) as w:
        write_rows(w, rows)
    return p, rows


def test_version_4_round_trip_and_entries(tmp_path):
    p, rows = _store(tmp_path)
    man = json.loads((p / "manifest.json").read_text())
    assert man["format_version"] == 4 and "shards" not in man and man["index"]["path"] == INDEX
    s = LabelStore(p)
    assert len(s) == len(rows) and s.num_shards == man["totals"]["shards"] > 3
    assert sorted(s.sample_ids().tolist()) == sorted(r["sample_id"] for r in rows)
    for i in range(s.num_shards):
        rec = s.shard_record(i)
        blob = (p / rec["path"]).read_bytes()
        assert len(blob) == rec["bytes"] and hashlib.sha256(blob).hexdigest() == rec["sha256"]
        assert s.shard_of(s.shard_start(i)) == i or rec["rows"] == 0
    by_id = {r["sample_id"]: r for r in rows}
    for i in range(len(s)):
        x = s.get_raw(i)
        assert np.array_equal(x.input_ids, by_id[x.sample_id]["input_ids"])
    s2 = pickle.loads(pickle.dumps(s))  # a DataLoader worker maps the index afresh
    assert s2.get_raw(len(s) - 1).sample_id == s.get_raw(len(s) - 1).sample_id
    assert verify_store(p)["ok"]


def test_version_3_written_on_request_reads_the_same(tmp_path):
    p3, rows = _store(tmp_path / "a", format_version=3)
    p4, _ = _store(tmp_path / "b")
    man = json.loads((p3 / "manifest.json").read_text())
    assert man["format_version"] == 3 and "shards" in man and not (p3 / INDEX).exists()
    a, b = LabelStore(p3), LabelStore(p4)
    assert len(a) == len(b) and a.num_shards == b.num_shards
    assert [a.shard_record(i)["rows"] for i in range(a.num_shards)] == [b.shard_record(i)["rows"]
                                                                        for i in range(b.num_shards)]
    assert np.array_equal(a.shard_starts, b.shard_starts)
    assert [a.get_raw(i).sample_id for i in range(len(a))] == [b.get_raw(i).sample_id for i in range(len(b))]


def _synthetic(root, n, block_rows, rows=None, seed=0):
    """A version-4 store of ``n`` synthetic shard entries and no shard files at all."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 4, n).astype(np.int64) if rows is None else np.asarray(rows, np.int64)
    starts = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64)
    s = np.arange(n, dtype=np.int64)
    cols = {"rank": (s // 1000).astype(np.int32), "seq": (s % 1000).astype(np.int32), "rows": rows,
            "tokens": rows * 10, "entries": rows * 80, "bytes": rows * 100 + 1000,
            "sha256": rng.integers(0, 256, 32 * n, dtype=np.uint8), "first_sample_id": np.where(rows > 0, starts, 0),
            "last_sample_id": np.where(rows > 0, starts + rows - 1, 0), "row_start": starts}
    meta = normalize_meta(make_meta())
    root.mkdir(parents=True)
    atomic_write_json(root / CONFIG, config_with_digest(meta))
    index, ref = write_index_columns(cols, block_rows)
    tot = {"shards": n, "samples": int(rows.sum()), "tokens": int(cols["tokens"].sum()),
           "entries": int(cols["entries"].sum()), "bytes": int(cols["bytes"].sum())}
    write_manifest(root, {"format": "labelstore", "format_version": 4, "meta": meta, "totals": tot, "index": ref},
                   index)
    return np.concatenate([starts, [rows.sum()]])


def test_lookups_across_blocks_and_empty_shards(tmp_path):
    rows = [0, 3, 0, 0, 2, 1, 0, 0, 0, 0, 5, 0, 1, 0]  # empty shards at block edges and a whole empty block
    starts = _synthetic(tmp_path / "s", len(rows), block_rows=4, rows=rows)
    s = LabelStore(tmp_path / "s")
    assert len(s) == sum(rows) and s.num_shards == len(rows)
    every = np.arange(len(s))
    want = np.searchsorted(starts, every, side="right") - 1
    assert np.array_equal(s.shards.shards_of(every), want)
    assert [s.shard_of(int(i)) for i in every] == want.tolist()
    assert np.array_equal(s.shard_starts, starts)
    assert s.shard_record(1)["path"] == "shards/r00000-000001.arrow" and s.shard_record(0)["first_sample_id"] is None


def test_large_index_opens_without_touching_shards(tmp_path):
    n = 100_000
    _synthetic(tmp_path / "s", n, block_rows=16384, seed=1)
    s = LabelStore(tmp_path / "s")  # not one of the 100,000 shard files exists: none is looked at on open
    assert s.num_shards == n and not s.shards._blocks
    i = len(s) // 2
    sh = s.shard_of(i)
    assert s.shard_start(sh) <= i < s.shard_start(sh) + s.shard_record(sh)["rows"]
    assert len(s.shards._blocks) == 1  # one block read and checked
    with pytest.raises(StoreCorruptError, match="missing"):
        s[i]


def test_damaged_index_found_where_it_is_read(tmp_path):
    p, _ = _store(tmp_path)
    ix = p / INDEX
    good = ix.read_bytes()
    man = json.loads((p / "manifest.json").read_text())
    data = bytearray(good)
    pos = good.find(bytes.fromhex(LabelStore(p).shard_record(1)["sha256"]))  # inside block 0's sha256 column
    assert pos > 0
    data[pos] ^= 0xFF
    ix.write_bytes(bytes(data))
    s = LabelStore(p)  # open reads the footer only
    with pytest.raises(StoreCorruptError, match="digest"):
        s[0]
    rep = verify_store(p)
    assert not rep["ok"] and any("digest" in x for x in rep["problems"])
    ix.write_bytes(good[:-7])
    with pytest.raises(StoreCorruptError, match="truncated"):
        LabelStore(p)
    ix.unlink()
    with pytest.raises(StoreCorruptError, match="missing"):
        LabelStore(p)
    ix.write_bytes(good)
    forged = json.loads(json.dumps(man))
    forged["index"]["blocks"][0]["sha256"] = "0" * 64
    (p / "manifest.json").write_text(json.dumps(forged))  # the old manifest digest: refused on open
    with pytest.raises(StoreCorruptError, match="digest"):
        LabelStore(p)
    body = {k: v for k, v in forged.items() if k != "digest"}
    (p / "manifest.json").write_text(json.dumps(with_digest(body)))  # a forger who recomputes it
    with pytest.raises(StoreCorruptError, match="digest"):
        LabelStore(p)[0]
    body["index"]["blocks"][0]["rows"] += 1  # block sums no longer equal the totals
    (p / "manifest.json").write_text(json.dumps(with_digest(body)))
    with pytest.raises(StoreFormatError, match="totals"):
        LabelStore(p)
    body["shards"] = []
    (p / "manifest.json").write_text(json.dumps(with_digest(body)))
    with pytest.raises(StoreFormatError, match="no \"shards\""):
        load_manifest(p)


def test_limits_admit_ten_million_shards_and_ten_trillion_positions():
    assert MAX_SHARDS >= 10**7
    ref = {"path": INDEX, "bytes": 10**9, "shards": 10**7, "block_rows": 16384,
           "blocks": [{"rows": 1000, "sha256": "0" * 64}] * -(-10**7 // 16384)}
    tot = {"shards": 10**7, "samples": 1000 * len(ref["blocks"]), "tokens": 10**13, "entries": 3 * 10**14,
           "bytes": 5 * 10**14}
    assert validate_index_ref(ref, tot, "m") is ref
    with pytest.raises(StoreFormatError):
        validate_index_ref(dict(ref, shards=MAX_SHARDS + 1), dict(tot, shards=MAX_SHARDS + 1), "m")


def test_a_version_3_compile_resumed_by_a_version_4_writer_finishes_as_version_3(tmp_path):
    rows = random_rows(12, seed=3)
    p = tmp_path / "s"
    w = StoreWriter(p, make_meta(format_version=3), shard_bytes=600)
    write_rows(w, rows[:6])
    w.abort()  # interrupted: committed shards of version 3, no manifest
    with StoreWriter(p, make_meta(), shard_bytes=600) as w:  # a newer writer, asked for nothing in particular
        mask = w.committed_mask([r["sample_id"] for r in rows])
        write_rows(w, [r for r, done in zip(rows, mask) if not done])
    man = json.loads((p / "manifest.json").read_text())
    assert man["format_version"] == 3 and not (p / INDEX).exists()
    assert sorted(LabelStore(p).sample_ids().tolist()) == sorted(r["sample_id"] for r in rows)
    assert verify_store(p)["ok"]


def test_declared_rows_bounded_by_declared_bytes_on_open(tmp_path):
    p, _ = _store(tmp_path)
    body = {k: v for k, v in json.loads((p / "manifest.json").read_text()).items() if k != "digest"}
    extra = 10**12
    body["index"]["blocks"][0]["rows"] += extra
    body["totals"]["samples"] += extra  # consistent sums, digest recomputed: a forger's manifest
    (p / "manifest.json").write_text(json.dumps(with_digest(body)))
    with pytest.raises(StoreFormatError, match="cannot fit"):
        LabelStore(p)
