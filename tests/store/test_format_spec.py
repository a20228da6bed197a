"""docs/FORMAT.md is complete: decode a store with pyarrow and numpy only, following the spec's text.

Nothing from labelstore is imported by the decoder below (only the writer is used, to make a store).
"""

import hashlib
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from store_factory import make_meta, random_rows, write_rows

from labelstore.store.writer import StoreWriter


def spec_unpack(buf: bytes, w: int, n: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), bitorder="little")[: n * w].reshape(n, w)
    return (bits.astype(np.int64) << np.arange(w, dtype=np.int64)).sum(axis=1)


def spec_float8(code: np.ndarray, exp_bits: int, man_bits: int, bias: int) -> np.ndarray:
    code = code.astype(np.int64)
    e = (code >> man_bits) & ((1 << exp_bits) - 1)
    m = code & ((1 << man_bits) - 1)
    sign = np.where(code >> 7, -1.0, 1.0)
    normal = (1 + m / 2**man_bits) * 2.0 ** (e - bias)
    sub = (m / 2**man_bits) * 2.0 ** (1 - bias)
    return sign * np.where(e == 0, sub, normal)


def spec_weights(codec: dict, raw: bytes) -> np.ndarray:
    b = np.frombuffer(raw, dtype=np.uint8)
    if codec["name"] == "log8":
        w = np.exp(-b.astype(np.float64) * codec["params"]["step"])
        return np.where(b == 255, 0.0, w)
    if codec["name"] == "e4m3":
        return spec_float8(b, 4, 3, 7) / 256
    if codec["name"] == "e5m2":
        return spec_float8(b, 5, 2, 15) / 32768
    if codec["name"] == "fp16":
        return np.frombuffer(raw, dtype="<f2").astype(np.float64) / 1024
    raise AssertionError(codec)


def spec_zstd(buf: bytes, size: int) -> bytes:
    return pa.decompress(buf, decompressed_size=size, codec="zstd", asbytes=True) if size else b""


def spec_planes(buf: bytes, width: int, n: int) -> np.ndarray:
    planes = np.frombuffer(buf, dtype=np.uint8).reshape(width, n).astype(np.int64)
    return sum(planes[j] << (8 * j) for j in range(width)) if width else np.zeros(n, np.int64)


def spec_v2_row(meta, cols, r, T):
    """Version 2 (encoding zstd): undo zstd, byte planes and per-position code deltas (FORMAT.md section 6)."""
    w, cb = (meta["id_bits"] + 7) // 8, meta["count_bytes"]
    counts = np.frombuffer(spec_zstd(cols["counts"][r], T * cb), dtype="<u1" if cb == 1 else "<u2").astype(np.int64)
    n = int(counts.sum())
    inp = spec_planes(spec_zstd(cols["input_ids"][r], T * w), w, T)
    ids = spec_planes(spec_zstd(cols["ids"][r], n * w), w, n)
    tail = spec_planes(spec_zstd(cols["tail"][r], 4 * T), 4, T).astype("<u4").view("<f4").astype(np.float64)
    if meta["value_codec"]["name"] == "fp16":
        values = spec_planes(spec_zstd(cols["values"][r], 2 * n), 2, n).astype("<u2").tobytes()
    else:
        deltas = np.frombuffer(spec_zstd(cols["values"][r], n), dtype=np.uint8)
        codes, start = [], 0
        for c in counts:
            codes.extend(np.cumsum(deltas[start:start + c].astype(np.int64)) % 256)
            start += c
        values = np.array(codes, dtype=np.uint8).tobytes()
    return inp, counts, ids, tail, values


def spec_decode_store(path: Path) -> dict:
    """{sample_id: (input_ids, [per-position (ids, probs)], tail)} per docs/FORMAT.md."""
    man = json.loads((path / "manifest.json").read_text())
    version = man["format_version"]
    assert man["format"] == "labelstore" and version in (1, 2, 3)
    if version >= 3:  # section 2: the digest of the manifest without its "digest" key, canonical JSON
        body = {k: v for k, v in man.items() if k != "digest"}
        assert man["digest"] == hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
                                               ).hexdigest()
    meta = man["meta"]
    zstd = meta.get("encoding", {"name": "packed"})["name"] == "zstd"
    w, cb = meta["id_bits"], meta["count_bytes"]
    assert w == (meta["vocab_size"] - 1).bit_length()
    out = {}
    for sh in man["shards"]:
        table = pa.ipc.open_file(pa.memory_map(str(path / sh["path"]))).read_all()
        assert json.loads(table.schema.metadata[b"labelstore"]) == meta
        if version >= 3:
            assert json.loads(table.schema.metadata[b"labelstore_shard"]) == {"rank": sh["rank"], "seq": sh["seq"]}
        cols = table.to_pydict()
        for r in range(table.num_rows):
            T = cols["num_tokens"][r]
            payload = [cols[c][r] for c in ("input_ids", "counts", "ids", "values", "tail", "doc_starts")]
            crc = zlib.crc32(struct.pack("<qi", cols["sample_id"][r], T)) if version >= 3 else 0
            for p in payload:
                crc = zlib.crc32(p, crc)
            assert crc == cols["crc32"][r]
            if zstd:
                inp, counts, ids, tail, values = spec_v2_row(meta, cols, r, T)
            else:
                inp = spec_unpack(cols["input_ids"][r], w, T)
                counts = np.frombuffer(cols["counts"][r], dtype="<u1" if cb == 1 else "<u2").astype(np.int64)
                ids = spec_unpack(cols["ids"][r], w, int(counts.sum()))
                tail = np.frombuffer(cols["tail"][r], dtype="<f4").astype(np.float64)
                values = cols["values"][r]
            wts = spec_weights(meta["value_codec"], values)
            positions, start = [], 0
            for t in range(T):
                c = counts[t]
                wt = wts[start:start + c]
                probs = (1 - tail[t]) * wt / wt.sum() if wt.sum() > 0 else np.zeros(c)
                positions.append((ids[start:start + c], probs))
                start += c
            out[cols["sample_id"][r]] = (inp, positions, tail)
    return out


@pytest.mark.parametrize("encoding", ["packed", "zstd"])
@pytest.mark.parametrize("codec,vocab", [("log8", 50257), ("e4m3", 1000), ("e5m2", 262144), ("fp16", 1 << 20)])
def test_spec_decoder_matches_written_rows_and_reader(tmp_path, codec, vocab, encoding):
    from labelstore.store.reader import LabelStore  # only to cross-check, after the spec decode

    rows = random_rows(12, vocab_size=vocab, k=8, codec=codec, seed=1)
    with StoreWriter(tmp_path / "s", make_meta(vocab, 8, codec=codec, encoding=encoding), shard_bytes=2500) as wr:
        write_rows(wr, rows)
    dec = spec_decode_store(tmp_path / "s")
    assert sorted(dec) == sorted(r["sample_id"] for r in rows)
    s = LabelStore(tmp_path / "s")
    by_id = {s[i].sample_id: s[i] for i in range(len(s))}
    for r in rows:
        inp, positions, tail = dec[r["sample_id"]]
        assert inp.tolist() == r["input_ids"].tolist()
        np.testing.assert_array_equal(tail, r["tail"].astype(np.float64))
        assert np.concatenate([p[0] for p in positions] or [np.zeros(0)]).tolist() == r["ids"].tolist()
        x = by_id[r["sample_id"]]
        for t, (ids_t, probs_t) in enumerate(positions):
            assert x.ids[t, : len(ids_t)].tolist() == ids_t.tolist()
            np.testing.assert_allclose(x.probs[t, : len(ids_t)].numpy(), probs_t, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("version", [1, 2])
def test_store_written_by_older_format_code_still_reads(version):
    """tests/data/store_v1 and store_v2 were written by the version-1 and version-2 writers (v1: before entropy
    coding existed; v2: zstd rows, before the row CRC covered sample_id and num_tokens)."""
    from labelstore.store.reader import LabelStore
    from labelstore.store.verify import verify_store

    root = Path(__file__).parents[1] / "data"
    expected = json.loads((root / f"store_v{version}_expected.json").read_text())
    s = LabelStore(root / f"store_v{version}")
    assert s.meta["format_version"] == version and (version == 2) == ("encoding" in s.meta)
    got = [{"sample_id": x.sample_id, "input_ids": x.input_ids.tolist(), "ids": x.ids.tolist(),
            "probs": x.probs.tolist(), "tail": x.tail.tolist()} for x in s]
    assert got == expected
    assert verify_store(root / f"store_v{version}")["ok"]
    assert sorted(spec_decode_store(root / f"store_v{version}")) == [r["sample_id"] for r in expected]
