"""docs/FORMAT.md is complete: decode a store with pyarrow and numpy only, following the spec's text.

Nothing from labelstore is imported by the decoder below (only the writer is used, to make a store).
"""

import hashlib
import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from store_factory import make_meta, random_rows, write_rows

from labelstore.codecs import get_codec
from labelstore.store.writer import StoreWriter


def spec_unpack(buf: bytes, w: int, n: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), bitorder="little")[: n * w].reshape(n, w)
    return (bits.astype(np.int64) << np.arange(w, dtype=np.int64)).sum(axis=1)


def spec_float8(code: np.ndarray, exp_bits: int, man_bits: int, bias: int, fn: bool) -> np.ndarray:
    """Section 5 "Bit layouts": NaN, infinite and negative codes decode to +0 (fn: e4m3fn, no infinities)."""
    code = code.astype(np.int64)
    e = (code >> man_bits) & ((1 << exp_bits) - 1)
    m = code & ((1 << man_bits) - 1)
    normal = (1 + m / 2**man_bits) * 2.0 ** (e - bias)
    sub = (m / 2**man_bits) * 2.0 ** (1 - bias)
    top = e == (1 << exp_bits) - 1
    invalid = (code >> 7 == 1) | (top & (m == (1 << man_bits) - 1) if fn else top)
    return np.where(invalid, 0.0, np.where(e == 0, sub, normal))


def spec_weights(codec: dict, raw: bytes, count8: np.ndarray | None = None) -> np.ndarray:
    """float32 weights (as float64 numbers). ``count8``: which bytes are draw counts (section 5b)."""
    b = np.frombuffer(raw, dtype=np.uint8)
    if codec["name"] == "log8":
        w = np.where(b == 255, 0.0, np.exp(-b.astype(np.float64) * codec["params"]["step"]))
    elif codec["name"] == "e4m3":
        w = spec_float8(b, 4, 3, 7, fn=True) / 256
    elif codec["name"] == "e5m2":
        w = spec_float8(b, 5, 2, 15, fn=False) / 32768
    elif codec["name"] == "fp16":
        h = np.frombuffer(raw, dtype="<f2").astype(np.float64)
        w = np.where(np.isfinite(h) & (h > 0), h, 0.0) / 1024
    elif codec["name"] == "count8":
        w = b.astype(np.float64)
    else:
        raise AssertionError(codec)
    if count8 is not None:
        w = np.where(count8, b.astype(np.float64), w)
    return w.astype(np.float32).astype(np.float64)  # float32(...): one rounding


def spec_probs(w: np.ndarray, mass: float) -> np.ndarray:
    """Section 5 "Decoding precision": S exact sum rounded to float64, scale = m / S, p = float32(w * scale)."""
    s = math.fsum(w.tolist())
    if s == 0:
        return np.zeros(w.size, dtype=np.float32)
    scale = mass / s
    return np.array([x * scale for x in w.tolist()], dtype=np.float64).astype(np.float32)


def spec_frame_size(buf: bytes) -> int:
    """Section 6b "Frames": the declared content size; asserts the column is exactly one frame."""
    assert buf[:4] == bytes.fromhex("28b52ffd")
    d = buf[4]
    fcs, single, dict_flag, checksum = d >> 6, (d >> 5) & 1, d & 3, (d >> 2) & 1
    assert dict_flag == 0 and not (fcs == 0 and not single)
    i = 5 + (0 if single else 1)
    nb = [single, 2, 4, 8][fcs]
    size = int.from_bytes(buf[i:i + nb], "little") + (256 if nb == 2 else 0)
    i += nb
    while True:
        h = int.from_bytes(buf[i:i + 3], "little")
        last, btype, bsize = h & 1, (h >> 1) & 3, h >> 3
        assert btype != 3
        i += 3 + (1 if btype == 1 else bsize)
        if last:
            break
    i += 4 if checksum else 0
    assert i == len(buf), "bytes after the frame"
    return size


def spec_zstd(buf: bytes, size: int) -> bytes:
    if size == 0 and len(buf) == 0:  # "Empty streams": zero bytes or a frame declaring 0
        return b""
    assert spec_frame_size(buf) == size
    return pa.decompress(buf, decompressed_size=size, codec="zstd", asbytes=True) if size else b""


def spec_planes(buf: bytes, width: int, n: int) -> np.ndarray:
    planes = np.frombuffer(buf, dtype=np.uint8).reshape(width, n).astype(np.int64)
    return sum(planes[j] << (8 * j) for j in range(width)) if width else np.zeros(n, np.int64)


def spec_zstd_common(meta, cols, r, T):
    """Sections 6b-6d share these columns: counts and input ids (zstd byte planes), the tail (4 planes, or empty
    where the store keeps none). Returns (counts, entries, input ids, tail as float64)."""
    w, cb = (meta["id_bits"] + 7) // 8, meta["count_bytes"]
    counts = np.frombuffer(spec_zstd(cols["counts"][r], T * cb), dtype="<u1" if cb == 1 else "<u2").astype(np.int64)
    n = int(counts.sum())
    inp = spec_planes(spec_zstd(cols["input_ids"][r], T * w), w, T)
    if spec_has_tail(meta):
        tail = spec_planes(spec_zstd(cols["tail"][r], 4 * T), 4, T).astype("<u4").view("<f4").astype(np.float64)
    else:
        assert cols["tail"][r] == b""
        tail = np.zeros(T)
    return counts, n, inp, tail


def spec_v2_row(meta, cols, r, T):
    """Version 2 (encoding zstd): undo zstd, byte planes and per-position code deltas (FORMAT.md section 6)."""
    w = (meta["id_bits"] + 7) // 8
    counts, n, inp, tail = spec_zstd_common(meta, cols, r, T)
    ids = spec_planes(spec_zstd(cols["ids"][r], n * w), w, n)
    if meta["value_codec"]["name"] == "none":
        assert cols["values"][r] == b""
        values = b""
    elif meta["value_codec"]["name"] == "fp16":
        values = spec_planes(spec_zstd(cols["values"][r], 2 * n), 2, n).astype("<u2").tobytes()
    else:
        deltas = np.frombuffer(spec_zstd(cols["values"][r], n), dtype=np.uint8)
        codes, start = [], 0
        for c in counts:
            codes.extend(np.cumsum(deltas[start:start + c].astype(np.int64)) % 256)
            start += c
        values = np.array(codes, dtype=np.uint8).tobytes()
    return inp, counts, ids, tail, values


def spec_v5_row(meta, cols, r, T, grouped=False):
    """Version 5 (encoding expgolomb), section 6c: as 6b except the ids (symbols, extra bits, next-token swap) and
    the 1-byte values (slot-major deltas). ``grouped``: version 6 (encoding grouped), section 6d: values first,
    then ids from two symbol frames, gaps summed inside each group of byte-identical values."""
    id_bits = meta["id_bits"]
    counts, n, inp, tail = spec_zstd_common(meta, cols, r, T)
    bpv = {"none": 0, "fp16": 2}.get(meta["value_codec"]["name"], 1)
    if meta["value_codec"]["name"] == "none":
        assert cols["values"][r] == b""
        values = b""
    elif meta["value_codec"]["name"] == "fp16":
        values = spec_planes(spec_zstd(cols["values"][r], 2 * n), 2, n).astype("<u2").tobytes()
    else:
        slot_major = iter(np.frombuffer(spec_zstd(cols["values"][r], n), dtype=np.uint8).tolist())
        deltas = [[None] * int(c) for c in counts]
        for j in range(int(counts.max()) if T else 0):
            for t in range(T):
                if counts[t] > j:
                    deltas[t][j] = next(slot_major)
        codes = [v for d in deltas for v in (np.cumsum(np.array(d, dtype=np.int64)) % 256).tolist()]
        values = np.array(codes, dtype=np.uint8).tobytes()
    col = cols["ids"][r]
    # 6d "Groups": slot 0 or 1, or value bytes unlike the previous slot's; every entry when the store is not grouped
    is_grouped = grouped and meta["selection"]["mode"] not in ("sample", "topk+sample", "argmax") and bpv > 0
    first = []
    for t in range(T):
        start = int(counts[:t].sum())
        for j in range(int(counts[t])):
            i = start + j
            first.append(not is_grouped or j < 2 or values[i * bpv:(i + 1) * bpv] != values[(i - 1) * bpv:i * bpv])
    if grouped:
        n_a = sum(first)
        S_a = int.from_bytes(col[:4], "little")
        part_a = np.frombuffer(spec_zstd(col[4:4 + S_a], n_a), dtype=np.uint8).tolist()
        S_g = int.from_bytes(col[4 + S_a:8 + S_a], "little")
        assert 8 + S_a + S_g <= len(col)
        part_g = np.frombuffer(spec_zstd(col[8 + S_a:8 + S_a + S_g], n - n_a), dtype=np.uint8).tolist()
        it_a, it_g = iter(part_a), iter(part_g)
        sym = [next(it_a) if f else next(it_g) for f in first]
        extra = col[8 + S_a + S_g:]
    else:
        S = int.from_bytes(col[:4], "little")
        assert 4 + S <= len(col)
        sym = np.frombuffer(spec_zstd(col[4:4 + S], n), dtype=np.uint8).tolist()
        extra = col[4 + S:]
    limit = 16 + 8 * (id_bits - 4) if id_bits > 4 else 2**id_bits
    stream = np.unpackbits(np.frombuffer(extra, dtype=np.uint8), bitorder="little")
    codes, pos = [], 0
    for i, y in enumerate(sym):
        assert y < limit
        b, h = (0, y) if y < 16 else ((y - 16) // 8 + 1, 8 + (y - 16) % 8)
        x = sum(int(stream[pos + j]) << j for j in range(b))
        pos += b
        codes.append(h * 2**b + x if first[i] else codes[-1] + h * 2**b + x)  # 6d: c = c_prev + x
        assert codes[-1] < 2**id_bits
    assert len(extra) == -(-pos // 8) and not stream[pos:].any()  # exact length, zero padding
    ids, i = [], 0
    for t in range(T):
        for _ in range(int(counts[t])):
            c = codes[i]
            if t < T - 1:
                u = int(inp[t + 1])
                c = u if c == 0 else (0 if c == u else c)
            ids.append(c)
            i += 1
    ids = np.array(ids, dtype=np.int64)
    assert (ids < meta["vocab_size"]).all()
    return inp, counts, ids, tail, values


def spec_grouped_order(meta, input_ids, counts, ids, values) -> list[int]:
    """Section 6d's writer order, in plain Python: inside each run of byte-identical values among slots 1.. of a
    position, ids sorted by their next-token-swapped code (stores that are not grouped: unchanged)."""
    bpv = {"none": 0, "fp16": 2}.get(meta["value_codec"]["name"], 1)
    values = bytes(np.asarray(values, dtype=np.uint8))
    ids = [int(x) for x in ids]
    if meta["selection"]["mode"] in ("sample", "topk+sample", "argmax") or bpv == 0:
        return ids
    T, out, start = len(counts), [], 0
    for t in range(T):
        c = int(counts[t])
        u = int(input_ids[t + 1]) if t < T - 1 else None
        def swap(x, u=u):
            return x if u is None else (0 if x == u else (u if x == 0 else x))

        j = 0
        while j < c:
            end = j + 1
            if j >= 1:
                while end < c and values[(start + end) * bpv:(start + end + 1) * bpv] == \
                        values[(start + j) * bpv:(start + j + 1) * bpv]:
                    end += 1
            out += sorted(ids[start + j:start + end], key=swap)
            j = end
        start += c
    return out


def spec_has_tail(meta) -> bool:
    """Section 4: no tail column for hard labels and for mode sample."""
    return meta["label_kind"] == "soft" and meta["selection"]["mode"] != "sample"


def spec_position(meta, ids, raw: bytes, t: float):
    """One position's (ids, float32 probs, reported tail), sections 4, 5 and 5b."""
    sel, c = meta["selection"], len(ids)
    if meta["label_kind"] == "hard":
        return ids, np.ones(c, dtype=np.float32), 0.0
    if sel["mode"] == "sample":
        return ids, spec_probs(spec_weights(meta["value_codec"], raw), 1.0), 0.0
    if sel["mode"] == "topk+sample":
        ke = sel["k_exact"]
        slots = np.arange(c)
        w = spec_weights(meta["value_codec"], raw, count8=slots >= ke)
        exact, drawn = w[:ke], w[ke:]
        probs = np.concatenate([spec_probs(exact, 1 - t), spec_probs(drawn, t)]).astype(np.float32)
        return ids, probs, (0.0 if drawn.size else t)
    return ids, spec_probs(spec_weights(meta["value_codec"], raw), 1 - t), t


SPEC_INDEX_COLUMNS = [("rank", "<i4", 4), ("seq", "<i4", 4), ("rows", "<i8", 8), ("tokens", "<i8", 8),
                      ("entries", "<i8", 8), ("bytes", "<i8", 8), ("sha256", None, 32), ("first_sample_id", "<i8", 8),
                      ("last_sample_id", "<i8", 8), ("row_start", "<i8", 8)]


def spec_index(path: Path, man: dict) -> list[dict]:
    """Section 11: the shard entries of a version-4 store, from index.arrow and the manifest's reference."""
    ref = man["index"]
    assert "shards" not in man and ref["path"] == "index.arrow"
    data = (path / "index.arrow").read_bytes()
    assert len(data) == ref["bytes"] and ref["shards"] == man["totals"]["shards"]
    reader = pa.ipc.open_file(pa.py_buffer(data))
    assert [f.name for f in reader.schema] == [c[0] for c in SPEC_INDEX_COLUMNS]
    R, N = ref["block_rows"], ref["shards"]
    assert reader.num_record_batches == len(ref["blocks"]) == -(-N // R)
    out, row = [], 0
    for b, blk in enumerate(ref["blocks"]):
        batch = reader.get_batch(b)
        n = batch.num_rows
        assert n == min(R, N - b * R)
        h, cols = hashlib.sha256(), {}
        for j, (name, dt, width) in enumerate(SPEC_INDEX_COLUMNS):
            arr = batch.column(j)
            raw = bytes(arr.buffers()[1])[arr.offset * width:(arr.offset + n) * width]
            h.update(raw)
            cols[name] = raw if dt is None else np.frombuffer(raw, dtype=dt)
        assert h.hexdigest() == blk["sha256"] and int(cols["rows"].sum()) == blk["rows"]
        for i in range(n):
            rank, seq, rows = int(cols["rank"][i]), int(cols["seq"][i]), int(cols["rows"][i])
            assert int(cols["row_start"][i]) == row
            row += rows
            out.append({"path": f"shards/r{rank:05d}-{seq:06d}.arrow", "rank": rank, "seq": seq, "rows": rows,
                        "tokens": int(cols["tokens"][i]), "entries": int(cols["entries"][i]),
                        "bytes": int(cols["bytes"][i]), "sha256": cols["sha256"][32 * i:32 * i + 32].hex(),
                        "first_sample_id": int(cols["first_sample_id"][i]),
                        "last_sample_id": int(cols["last_sample_id"][i])})
    for sh in out:  # section 2: sha256 of the whole shard file, its size
        blob = (path / sh["path"]).read_bytes()
        assert len(blob) == sh["bytes"] and hashlib.sha256(blob).hexdigest() == sh["sha256"]
    return out


def spec_decode_store(path: Path) -> dict:
    """{sample_id: (input_ids, [per-position (ids, probs)], tail)} per docs/FORMAT.md."""
    man = json.loads((path / "manifest.json").read_text())
    version = man["format_version"]
    assert man["format"] == "labelstore" and version in (1, 2, 3, 4, 5, 6)
    if version >= 3:  # section 2: the digest of the manifest without its "digest" key, canonical JSON
        body = {k: v for k, v in man.items() if k != "digest"}
        assert man["digest"] == hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
                                               ).hexdigest()
    shards = man["shards"] if version < 4 else spec_index(path, man)
    assert man["totals"]["shards"] == len(shards) and man["totals"]["samples"] == sum(s["rows"] for s in shards)
    meta = man["meta"]
    encoding = meta.get("encoding", {"name": "packed"})["name"]
    zstd = encoding == "zstd"
    assert (version == 5) == (encoding == "expgolomb")  # sections 6c and 8
    assert (version == 6) == (encoding == "grouped" or meta["selection"]["mode"] == "adaptive")  # 6d and 8
    w, cb = meta["id_bits"], meta["count_bytes"]
    assert w == max(1, (meta["vocab_size"] - 1).bit_length())
    bpv = {"none": 0, "fp16": 2}.get(meta["value_codec"]["name"], 1)
    out = {}
    for sh in shards:
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
            elif encoding in ("expgolomb", "grouped"):
                inp, counts, ids, tail, values = spec_v5_row(meta, cols, r, T, grouped=encoding == "grouped")
            else:
                inp = spec_unpack(cols["input_ids"][r], w, T)
                counts = np.frombuffer(cols["counts"][r], dtype="<u1" if cb == 1 else "<u2").astype(np.int64)
                ids = spec_unpack(cols["ids"][r], w, int(counts.sum()))
                if spec_has_tail(meta):
                    tail = np.frombuffer(cols["tail"][r], dtype="<f4").astype(np.float64)
                else:
                    assert cols["tail"][r] == b""
                    tail = np.zeros(T)
                values = cols["values"][r]
            doc_starts = np.frombuffer(cols["doc_starts"][r], dtype="<i4")  # never compressed
            positions, reported, start = [], [], 0
            for t in range(T):
                c = int(counts[t])
                ids_t, probs_t, tail_t = spec_position(meta, ids[start:start + c],
                                                       values[start * bpv:(start + c) * bpv], float(tail[t]))
                positions.append((ids_t, probs_t))
                reported.append(tail_t)
                start += c
            out[cols["sample_id"][r]] = (inp, positions, np.array(reported), doc_starts)
    return out


@pytest.mark.parametrize("encoding", ["packed", "zstd", "expgolomb", "grouped"])
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
        inp, positions, tail, doc_starts = dec[r["sample_id"]]
        assert inp.tolist() == r["input_ids"].tolist()
        assert doc_starts.tolist() == r["doc_starts"].tolist()
        np.testing.assert_array_equal(tail, r["tail"].astype(np.float64))
        want = r["ids"].tolist()
        if encoding == "grouped":  # section 6d: the writer's order inside ties
            want = spec_grouped_order(s.meta, r["input_ids"], r["counts"], r["ids"], r["values"])
            assert sorted(want) == sorted(r["ids"].tolist())
        assert np.concatenate([p[0] for p in positions] or [np.zeros(0)]).tolist() == want
        assert_reader_matches(by_id[r["sample_id"]], positions, tail)


def assert_reader_matches(x, positions, tail):
    """The reader's output equals the spec decoder's bit for bit (section 5, "Decoding precision")."""
    for t, (ids_t, probs_t) in enumerate(positions):
        assert x.ids[t, : len(ids_t)].tolist() == ids_t.tolist()
        got = x.probs[t, : len(ids_t)].numpy()
        assert got.view(np.uint32).tolist() == probs_t.view(np.uint32).tolist(), (t, got, probs_t)
    assert x.tail.numpy().astype(np.float64).tolist() == tail.tolist()


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
    dec = spec_decode_store(root / f"store_v{version}")
    assert sorted(dec) == [r["sample_id"] for r in expected]
    for x in s:
        assert_reader_matches(x, *dec[x.sample_id][1:3])
    # section 4: these fixtures break the compiler's descending-order property (the format allows it)
    broken = sum(any(p[i] < p[i + 1] or (p[i] == p[i + 1] and ids[i] > ids[i + 1]) for i in range(len(ids) - 1))
                 for _, positions, _, _ in dec.values() for ids, p in positions)
    assert broken == {1: 9, 2: 6}[version]


# --------------------------------------------------------------------------- rules the clarifications added
def _position(codec, k, rng):
    """One position's (ids, value bytes, tail) with codes of a wide dynamic range."""
    from labelstore.codecs import get_codec

    r = -np.sort(rng.exponential(4.0, size=k))
    r[0] = 0.0
    vals = get_codec(codec).encode(torch_tensor(r)).reshape(-1).numpy()
    return rng.choice(5000, size=k, replace=False), vals, np.float32(rng.random() * 0.5)


def torch_tensor(r):
    import torch

    return torch.from_numpy(r).float()[None, :]


@pytest.mark.parametrize("encoding", ["packed", "zstd", "expgolomb", "grouped"])
@pytest.mark.parametrize("codec", ["log8", "e4m3", "e5m2", "fp16", "log8-step1"])
def test_position_bits_do_not_depend_on_neighbours(tmp_path, codec, encoding):
    """The same position decodes to the same float32 bits alone, in a row of full positions, in a row of ragged
    ones and next to weights of a very different range (section 5, "Decoding precision")."""
    from labelstore.codecs import get_codec
    from labelstore.store.reader import LabelStore

    name, params = ("log8", {"step": 1.0}) if codec == "log8-step1" else (codec, {})
    cdc = get_codec(name, **params)
    k, rng = 8, np.random.default_rng(3)
    bpv = cdc.bytes_per_value
    target = _position(cdc, k, rng)
    tiny = (np.arange(k), cdc.encode(torch_tensor(np.array([0.0] + [-90.0] * (k - 1)))).reshape(-1).numpy(),
            np.float32(0.25))

    def row(sid, parts):
        counts = np.array([len(p[0]) for p in parts])
        return {"sample_id": sid, "input_ids": np.arange(len(parts)) % 7, "counts": counts,
                "ids": np.concatenate([p[0] for p in parts]), "values": np.concatenate([p[1] for p in parts]),
                "tail": np.array([p[2] for p in parts], np.float32), "doc_starts": np.zeros(0, np.int32)}

    full = [_position(cdc, k, rng) for _ in range(5)]
    ragged = []
    for c in (1, 3, 8, 2):
        i, v, t = _position(cdc, k, rng)
        ragged.append((i[:c], v[: c * bpv], t))
    rows = [row(1, [target]), row(2, full[:2] + [target] + full[2:]), row(3, ragged[:2] + [target] + ragged[2:]),
            row(4, [tiny, target])]
    meta = make_meta(5000, k, codec=name, encoding=encoding)
    meta["value_codec"] = cdc.to_json()
    with StoreWriter(tmp_path / "s", meta) as wr:
        write_rows(wr, rows)
    s = LabelStore(tmp_path / "s")
    where = {1: 0, 2: 2, 3: 2, 4: 1}
    bits = {}
    for i in range(len(s)):
        x = s[i]
        bits[x.sample_id] = x.probs[where[x.sample_id]].numpy().view(np.uint32).tolist()
    assert bits[1] == bits[2] == bits[3] == bits[4]
    dec = spec_decode_store(tmp_path / "s")
    assert dec[1][1][0][1].view(np.uint32).tolist() == bits[1]


@pytest.mark.parametrize("encoding", ["packed", "zstd", "expgolomb", "grouped"])
@pytest.mark.parametrize("mode", ["sample", "topk+sample", "topk+sample-0", "argmax"])
def test_spec_decoder_sampled_and_hard_modes(tmp_path, mode, encoding):
    """Section 5b: which entries are exact, count8 weights, the reported tail; hard labels: probability 1, tail 0.
    In zstd stores the value deltas run across count8 and the exact/sampled boundary (section 6b)."""
    from labelstore.store.reader import LabelStore

    rng = np.random.default_rng(7)
    S, ke = 6, (0 if mode in ("topk+sample-0", "sample") else 3)
    if mode == "sample":
        sel, codec, k = {"mode": "sample", "k": S, "samples": S}, "count8", S
    elif mode == "argmax":
        sel, codec, k = {"mode": "argmax", "k": 1}, "none", 1
    else:
        sel, codec, k = {"mode": "topk+sample", "k": ke + S, "k_exact": ke, "samples": S}, "log8", ke + S
    rows = []
    for sid in range(4):
        T = int(rng.integers(0, 6))
        counts, ids, vals, tails = [], [], [], []
        for _ in range(T):
            if mode == "argmax":
                c = int(rng.integers(0, 2))
                v = np.zeros(0, np.uint8)
            else:
                draws = np.bincount(rng.integers(0, 4, S), minlength=4)
                drawn = np.sort(draws[draws > 0])[::-1].astype(np.uint8)
                exact = np.sort(rng.integers(0, 255, ke)).astype(np.uint8)
                has_draws = mode == "sample" or rng.random() < 0.7
                v = np.concatenate([exact, drawn]) if has_draws else exact[: int(rng.integers(0, ke + 1))]
                c = v.size
            counts.append(c)
            ids.append(rng.choice(1000, size=c, replace=False))
            vals.append(v)
            tails.append(1.0 if ke == 0 and mode != "sample" else rng.random() * 0.5)
        rows.append({"sample_id": sid, "input_ids": rng.integers(0, 1000, T), "counts": np.array(counts, int),
                     "ids": np.concatenate(ids) if ids else np.zeros(0, int),
                     "values": np.concatenate(vals) if vals else np.zeros(0, np.uint8),
                     "tail": np.array(tails, np.float32) if mode not in ("sample", "argmax") else np.zeros(0),
                     "doc_starts": np.zeros(0, np.int32)})
    meta = make_meta(1000, k, codec=codec, label_kind="hard" if mode == "argmax" else "soft", encoding=encoding)
    meta["selection"] = sel
    with StoreWriter(tmp_path / "s", meta) as wr:
        write_rows(wr, rows)
    dec = spec_decode_store(tmp_path / "s")
    s = LabelStore(tmp_path / "s")
    for i in range(len(s)):
        x = s[i]
        _, positions, tail, _ = dec[x.sample_id]
        assert_reader_matches(x, positions, tail)
        if mode == "argmax":
            assert all(p.tolist() == [1.0] * len(p) for _, p in positions) and not tail.any()


def test_zstd_frames_exactly_one_and_empty_streams(tmp_path):
    """Section 6b: writers frame empty input_ids/counts/ids (9 bytes) but leave empty values/tail as zero bytes;
    readers accept either form of an empty stream and refuse bytes after a frame."""
    import zstandard

    from labelstore.errors import StoreCorruptError
    from labelstore.store.reader import LabelStore

    rows = random_rows(3, vocab_size=1000, k=4, seed=2, lengths=[0, 3, 2])
    with StoreWriter(tmp_path / "s", make_meta(1000, 4, encoding="zstd")) as wr:
        write_rows(wr, rows)
    table = pa.ipc.open_file(pa.memory_map(str(next((tmp_path / "s" / "shards").glob("*.arrow"))))).read_all()
    cols = table.to_pydict()
    r0 = cols["sample_id"].index(1000)  # T = 0
    empty = bytes.fromhex("28b52ffd2000010000")
    assert [cols[c][r0] for c in ("input_ids", "counts", "ids")] == [empty] * 3
    assert cols["values"][r0] == b"" and cols["tail"][r0] == b"" and cols["doc_starts"][r0] == b""
    s = LabelStore(tmp_path / "s")
    assert spec_frame_size(empty) == 0
    parts = {c: cols[c][r0] for c in ("input_ids", "counts", "ids", "values", "tail", "doc_starts")}
    assert s.decode_parts(1000, 0, dict(parts, input_ids=b"", counts=b"", ids=b"")).counts.size == 0
    assert s.decode_parts(1000, 0, dict(parts, values=empty, tail=empty)).counts.size == 0
    r1 = cols["sample_id"].index(1001)
    parts = {c: cols[c][r1] for c in ("input_ids", "counts", "ids", "values", "tail", "doc_starts")}
    for extra in (b"\0", parts["counts"], zstandard.ZstdCompressor().compress(b"")):
        with pytest.raises(StoreCorruptError):
            s.decode_parts(1001, 3, dict(parts, counts=parts["counts"] + extra))
        with pytest.raises(AssertionError):
            spec_frame_size(parts["counts"] + extra)


def test_id_bits_at_one_token_vocabulary(tmp_path):
    """Section 3: V = 1 gives id_bits 1, not 0."""
    from labelstore.store.reader import LabelStore

    rows = [{"sample_id": 0, "input_ids": np.zeros(3, int), "counts": np.ones(3, int), "ids": np.zeros(3, int),
             "values": np.zeros(3, np.uint8), "tail": np.zeros(3, np.float32), "doc_starts": np.zeros(0, np.int32)}]
    with StoreWriter(tmp_path / "s", make_meta(1, 1)) as wr:
        write_rows(wr, rows)
    assert LabelStore(tmp_path / "s").meta["id_bits"] == 1
    (_, positions, tail, _), = spec_decode_store(tmp_path / "s").values()
    assert [p.tolist() for _, p in positions] == [[1.0]] * 3 and tail.tolist() == [0.0] * 3


def test_invalid_float8_and_fp16_codes_decode_to_zero():
    """Section 5 "Bit layouts": NaN, infinite and negative codes weigh +0 in the reader as in the text."""
    from labelstore.codecs import get_codec

    codes = np.arange(256, dtype=np.uint8)
    for name in ("e4m3", "e5m2"):
        lut = get_codec(name).decode_lut()
        spec = spec_weights({"name": name}, codes.tobytes())
        assert lut.astype(np.float64).tolist() == spec.tolist() and (lut >= 0).all()
        assert not np.signbit(lut).any()
    h = np.array([0x3C00, 0xBC00, 0x7C00, 0xFC00, 0x7E00, 0x8000, 0x0001], dtype="<u2")
    got = get_codec("fp16").decode_numpy(h.view(np.uint8))
    assert got.tolist() == spec_weights({"name": "fp16"}, h.tobytes()).tolist() == [1 / 1024, 0, 0, 0, 0, 0,
                                                                                     2.0**-34]
    assert not np.signbit(got).any()


def test_exact_position_sums_agree_with_fsum_on_every_path():
    """reconstruction.position_sums: float64, int64 and fsum paths all give math.fsum's bits."""
    from labelstore.reconstruction import position_sums

    rng = np.random.default_rng(0)
    for scale in (1.0, 2.0**-40, 2.0**-120):
        w = np.exp(-rng.exponential(6.0, size=400)).astype(np.float32)
        w[::7] *= np.float32(scale)
        for counts in (np.full(50, 8), rng.multinomial(400, np.ones(60) / 60)):
            ends = np.cumsum(counts)
            ref = [math.fsum(w[e - c:e].astype(np.float64).tolist()) for e, c in zip(ends, counts)]
            assert position_sums(w, counts).tolist() == ref


def test_uniform_tail_with_every_token_kept():
    """Section 5: count == V leaves the uniform rule nothing to fill."""
    import torch

    from labelstore.reconstruction import uniform_fill

    q = uniform_fill(torch.tensor([0.0, 0.3]), torch.tensor([5, 4]), 5)
    assert q.tolist() == [0.0, pytest.approx(0.3)]


@pytest.mark.parametrize("encoding", ["packed", "grouped"])
def test_coarse_log8_step_sums_exactly_on_the_row_table_and_on_the_fallback(tmp_path, encoding):
    """log8 step 0.5: the whole integer table would overflow int64, so the reader sums each row with a table up to
    the row's largest code, or falls back where even that cannot (a code near the bottom of the range). Both
    must give the spec decoder's bits (math.fsum)."""
    from labelstore.store.reader import LabelStore

    codec = {"name": "log8", "params": {"step": 0.5}}
    assert get_codec(codec).int_lut(8) is None  # the whole table cannot: the per-row path is what is tested
    rows = random_rows(10, vocab_size=5000, k=8, codec=codec, seed=4, lengths=[30] * 10)
    deep = rows[3]["values"].copy()
    deep[-1] = 230  # weight exp(-115): the row's table would need q ~ 190 bits
    rows[3]["values"] = deep
    with StoreWriter(tmp_path / "s", make_meta(5000, 8, codec=codec, encoding=encoding)) as wr:
        write_rows(wr, rows)
    dec = spec_decode_store(tmp_path / "s")
    s = LabelStore(tmp_path / "s")
    assert s.codec.int_lut(8, max_code=int(rows[0]["values"].max())) is not None
    assert s.codec.int_lut(8, max_code=230) is None
    for i in range(len(s)):
        x = s[i]
        _, positions, tail, _ = dec[x.sample_id]
        assert_reader_matches(x, positions, tail)


def test_per_position_scales_sum_exactly_where_one_row_scale_cannot():
    """reconstruction._per_position_sums (a coarse log8 step: weights 2^-180 apart in one row): each position on its
    own integer scale, the widest through math.fsum; zeros, empty positions and subnormals included."""
    from labelstore.reconstruction import _per_position_sums

    rng = np.random.default_rng(7)
    for _ in range(200):
        counts = rng.integers(0, 9, size=int(rng.integers(1, 60)))
        n = int(counts.sum())
        w = np.exp(-rng.exponential(float(rng.choice([3.0, 20.0, 60.0])), size=n)).astype(np.float32)
        w[rng.random(n) < 0.1] = 0
        if n and rng.random() < 0.3:
            w[rng.integers(0, n)] = np.float32(1e-44)
        ends = np.cumsum(counts)
        ref = [math.fsum(w[e - c:e].astype(np.float64).tolist()) for e, c in zip(ends, counts)]
        assert _per_position_sums(w, np.abs(w), counts).tolist() == ref
