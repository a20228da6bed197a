"""Encoding "expgolomb" (format version 5, docs/FORMAT.md 6c): the code tables against hand-computed cases and a
plain-Python reference, rows identical to packed ones bit for bit, the next-token swap's edge cases, version rules,
and damaged streams refused (StoreCorruptError, never other numbers)."""

import pickle

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from store_factory import decode_spliced_column, make_meta, random_rows, write_rows

from labelstore.errors import StoreCorruptError, StoreFormatError
from labelstore.store import expgolomb
from labelstore.store.format import PAYLOAD_COLUMNS, normalize_meta, validate_meta
from labelstore.store.reader import LabelStore
from labelstore.store.writer import StoreWriter


def ref_encode(c: int) -> tuple[int, int, int]:
    """(symbol, extra bit count, extra value) of one code, from FORMAT.md 6c's writer rules, in Python ints."""
    if c < 16:
        return c, 0, 0
    e = c.bit_length() - 1
    b = e - 3
    return 16 + 8 * (e - 4) + ((c >> b) % 8), b, c % (1 << b)


def ref_pack(parts: list[tuple[int, int]]) -> bytes:
    """Concatenate (value, bits) least significant bit first, bit j of the stream = bit j % 8 of byte j // 8."""
    acc, n = 0, 0
    for v, b in parts:
        acc |= v << n
        n += b
    return acc.to_bytes((n + 7) // 8, "little") if n else b""


def test_hand_computed_codes():
    sym, extra = expgolomb.encode_codes(np.array([5000]))  # FORMAT.md 6c's example
    assert sym.tolist() == [81] and extra == bytes([0x88, 0x01])
    sym, extra = expgolomb.encode_codes(np.arange(16))  # below 16: the symbol is the code, no extra bits
    assert sym.tolist() == list(range(16)) and extra == b""
    sym, extra = expgolomb.encode_codes(np.array([16, 17, 31, 32]))  # e=4 (b=1) twice ..., e=5 (b=2)
    assert sym.tolist() == [16, 16, 23, 24] and extra == ref_pack([(0, 1), (1, 1), (1, 1), (0, 2)])
    assert expgolomb.decode_codes(sym, np.frombuffer(extra, np.uint8), 6, "t").tolist() == [16, 17, 31, 32]


@pytest.mark.parametrize("id_bits", [1, 2, 4, 5, 13, 15, 17, 20, 26])
def test_codes_match_reference_and_round_trip(id_bits):
    rng = np.random.default_rng(id_bits)
    top = 1 << id_bits
    edges = [x for e in range(id_bits + 1) for x in (2**e - 1, 2**e, 2**e + 1) if x < top]
    c = np.concatenate([rng.integers(0, top, 3000), np.array(edges, dtype=np.int64)])
    sym, extra = expgolomb.encode_codes(c)
    ref = [ref_encode(int(x)) for x in c]
    assert sym.tolist() == [r[0] for r in ref]
    assert extra == ref_pack([(r[2], r[1]) for r in ref])
    assert int(sym.max()) < expgolomb.num_symbols(id_bits)
    back = expgolomb.decode_codes(sym, np.frombuffer(extra, np.uint8), id_bits, "t")
    assert back.tolist() == c.tolist()


def swap_rows(vocab, k, seed, full):
    """Rows whose entries hit every case of the next-token swap: the next input token kept (first, last, middle
    slot), id 0 kept with and without it, next token 0, and both at the last position (no swap there)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, T in enumerate([0, 1, 2, 7, 40]):
        inp = rng.integers(0, vocab, T)
        if T > 3:
            inp[2] = 0  # position 1 predicts token 0
        counts = np.full(T, k) if full else rng.integers(0, k + 1, T)
        ids = []
        for t in range(T):
            c = int(counts[t])
            row = rng.choice(vocab, size=c, replace=False) if c <= vocab else None
            nxt = int(inp[t + 1]) if t + 1 < T else int(rng.integers(0, vocab))
            if c >= 1 and t % 3 != 2:
                row[(t * 7) % c] = nxt  # the next token somewhere (may duplicate below: fine for the format)
            if c >= 2 and t % 2 == 0:
                row[(t * 5 + 1) % c] = 0
            ids.append(row)
        ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        r = -np.sort(rng.exponential(2.0, int(counts.sum())))
        codes = np.clip(np.round(-r * 16), 0, 254).astype(np.uint8)
        rows.append({"sample_id": 10 + i, "input_ids": inp, "counts": counts, "ids": ids, "values": codes,
                     "tail": rng.random(T).astype(np.float32), "doc_starts": np.zeros(0, np.int32)})
    return rows


@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("vocab,k", [(10, 4), (16, 3), (50257, 8), (1 << 26, 5)])
def test_rows_decode_bit_identical_to_packed_and_to_the_spec(tmp_path, vocab, k, full):
    from test_format_spec import assert_reader_matches, spec_decode_store

    rows = swap_rows(vocab, k, seed=vocab + k, full=full)
    stores = {}
    for enc in ("packed", "expgolomb"):
        with StoreWriter(tmp_path / enc, make_meta(vocab, k, encoding=enc)) as w:
            write_rows(w, rows)
        stores[enc] = LabelStore(tmp_path / enc)
    a, b = stores["packed"], stores["expgolomb"]
    assert b.meta["format_version"] == 5 and a.meta["format_version"] == 4
    for i, r in enumerate(rows):
        x, y = a[i], b[i]
        assert y.input_ids.tolist() == r["input_ids"].tolist()
        assert y.ids.tolist() == x.ids.tolist()
        assert y.probs.numpy().view(np.uint32).tolist() == x.probs.numpy().view(np.uint32).tolist()
        assert y.tail.numpy().view(np.uint32).tolist() == x.tail.numpy().view(np.uint32).tolist()
        got = np.concatenate([y.ids[t, :c].numpy() for t, c in enumerate(r["counts"])] or [np.zeros(0)])
        assert got.tolist() == r["ids"].tolist()
    dec = spec_decode_store(tmp_path / "expgolomb")
    for x in b:
        assert_reader_matches(x, *dec[x.sample_id][1:3])
    y = pickle.loads(pickle.dumps(b))[len(rows) - 1]  # DataLoader workers: the decoder is rebuilt after pickling
    assert y.ids.tolist() == b[len(rows) - 1].ids.tolist()


def test_version_rules():
    meta = normalize_meta(make_meta(encoding="expgolomb"))
    assert meta["format_version"] == 5 and meta["encoding"] == {"name": "expgolomb", "level": 3}
    assert normalize_meta(make_meta(encoding="zstd"))["format_version"] == 4  # other encodings unchanged
    for asked in (3, 4):
        with pytest.raises(StoreFormatError, match="version 5"):
            normalize_meta(make_meta(encoding="expgolomb", format_version=asked))
    with pytest.raises(StoreFormatError, match="does not belong"):
        validate_meta(dict(meta, format_version=4))
    with pytest.raises(StoreFormatError, match="does not belong"):
        validate_meta(dict(normalize_meta(make_meta(encoding="zstd")), format_version=5))


def _row_parts(store_path):
    shard = next((store_path / "shards").glob("r*.arrow"))
    t = pa.ipc.open_file(pa.memory_map(str(shard))).read_all()
    i = max(range(t.num_rows), key=lambda j: t.column("num_tokens")[j].as_py())
    return (t.column("sample_id")[i].as_py(), t.column("num_tokens")[i].as_py(),
            {c: t.column(c)[i].as_py() for c in PAYLOAD_COLUMNS})


def _ids_col(S, frame, extra):
    return S.to_bytes(4, "little") + frame + extra


def test_damaged_streams_are_refused(tmp_path):
    """Every check of 6c, through the decoder itself (the row CRC, which would catch these first, is bypassed)."""
    import zstandard

    vocab, k = 1000, 6  # 10-bit ids, V not a power of two: valid codes up to 1023 decode to ids >= V
    with StoreWriter(tmp_path / "s", make_meta(vocab, k, encoding="expgolomb")) as w:
        write_rows(w, random_rows(3, vocab_size=vocab, k=k, seed=4, max_len=30, lengths=[30, 20, 25]))
    s = LabelStore(tmp_path / "s")
    sid, T, parts = _row_parts(tmp_path / "s")
    good = s.decode_parts(sid, T, parts)
    col = parts["ids"]
    S = int.from_bytes(col[:4], "little")
    frame, extra = col[4:4 + S], col[4 + S:]
    n = int(good.counts.sum())
    z = zstandard.ZstdCompressor().compress

    def bad(match, **cols):
        with pytest.raises(StoreCorruptError, match=match):
            s.decode_parts(sid, T, dict(parts, **cols))

    bad("no symbol-frame length", ids=col[:3])
    bad("overruns", ids=(S + len(extra) + 1).to_bytes(4, "little") + col[4:])
    bad("ids symbols does not decompress", ids=_ids_col(S - 1, frame[:-1], extra))  # the frame cut short
    bad("bytes after", ids=_ids_col(S + 1, frame + b"\x00", extra))
    bad("extra bits", ids=col + b"\x00")
    bad("extra bits", ids=col[:-1])
    sym = np.frombuffer(zstandard.ZstdDecompressor().decompress(frame), np.uint8).copy()
    big = sym.copy()
    big[0] = expgolomb.num_symbols(10)  # the first symbol out of range for 10-bit ids
    bad("out of range", ids=_ids_col(len(z(big.tobytes())), z(big.tobytes()), extra))
    # a valid symbol stream whose codes reach 1023 >= V: every code the largest, 6 extra bits each
    top = np.full(n, 16 + 8 * 5 + 7, np.uint8)
    ext = expgolomb._pack_varbits(np.full(n, 63), np.full(n, 6))
    bad(">= vocab_size", ids=_ids_col(len(z(top.tobytes())), z(top.tobytes()), ext))
    total = int(expgolomb._NB_LUT[sym].sum())
    assert total % 8  # this row's last extra byte has padding bits: set the top one
    bad("padding", ids=_ids_col(S, frame, bytes(extra[:-1]) + bytes([extra[-1] | 0x80])))
    bad("values", values=parts["values"][:-1])
    bad("values", values=z(b"\x00" * (n + 1)))
    # and the intact row still decodes to the stored ids
    assert s.decode_parts(sid, T, parts).ids.tolist() == good.ids.tolist()


@pytest.fixture(scope="module")
def one_row(tmp_path_factory):
    path = tmp_path_factory.mktemp("eg") / "s"
    with StoreWriter(path, make_meta(1000, 6, encoding="expgolomb")) as w:
        write_rows(w, random_rows(2, vocab_size=1000, k=6, seed=8, lengths=[25, 9]))
    return LabelStore(path), *_row_parts(path)


@settings(max_examples=150, deadline=None)
@given(col=st.sampled_from(["ids", "values"]), keep=st.integers(0, 400), blob=st.binary(max_size=300))
def test_fuzzed_columns_only_raise_labelstore_errors(one_row, col, keep, blob):
    """A hostile row (its CRC forged to match): any prefix of a real column plus garbage either decodes, with
    every id in range, or raises a labelstore error, never another exception."""
    decode_spliced_column(one_row, col, keep, blob)


def _sampled_rows(mode, S, ke, rng):
    """Rows of a sampled-mode store: exact codes then count8 draw counts (FORMAT.md 5b)."""
    rows = []
    for sid in range(5):
        T = int(rng.integers(0, 12))
        counts, ids, vals = [], [], []
        for _ in range(T):
            draws = np.bincount(rng.integers(0, 5, S), minlength=5)
            drawn = np.sort(draws[draws > 0])[::-1].astype(np.uint8)
            exact = np.sort(rng.integers(0, 255, ke)).astype(np.uint8)
            v = np.concatenate([exact, drawn])
            counts.append(v.size)
            ids.append(rng.choice(300, size=v.size, replace=False))
            vals.append(v)
        rows.append({"sample_id": sid, "input_ids": rng.integers(0, 300, T), "counts": np.array(counts, int),
                     "ids": np.concatenate(ids) if ids else np.zeros(0, int),
                     "values": np.concatenate(vals) if vals else np.zeros(0, np.uint8),
                     "tail": rng.random(T).astype(np.float32) if mode != "sample" else np.zeros(0, np.float32),
                     "doc_starts": np.zeros(0, np.int32)})
    return rows


@pytest.mark.parametrize("case", ["log8", "e4m3", "e5m2", "fp16", "hard", "sample", "topk+sample"])
def test_every_codec_and_mode_decodes_bit_identical_to_packed(tmp_path, case):
    rng = np.random.default_rng(11)
    if case in ("sample", "topk+sample"):
        S, ke = 8, (0 if case == "sample" else 3)
        sel = {"mode": "sample", "k": S, "samples": S} if case == "sample" else \
            {"mode": "topk+sample", "k": ke + S, "k_exact": ke, "samples": S}
        meta = make_meta(300, ke + S, codec="count8" if case == "sample" else "log8", selection=sel)
        rows = _sampled_rows(case, S, ke, rng)
    elif case == "hard":
        meta = make_meta(300, 1, codec="none", label_kind="hard", selection={"mode": "argmax", "k": 1})
        rows = random_rows(6, vocab_size=300, k=1, codec="none", label_kind="hard", seed=2)
    else:
        meta = make_meta(300, 8, codec=case)
        rows = random_rows(6, vocab_size=300, k=8, codec=case, seed=2)
    out = {}
    for enc in ("packed", "expgolomb"):
        with StoreWriter(tmp_path / enc, dict(meta, encoding=enc)) as w:
            write_rows(w, rows)
        out[enc] = list(LabelStore(tmp_path / enc))
    assert len(out["packed"]) == len(rows) == len(out["expgolomb"])
    for x, y in zip(out["packed"], out["expgolomb"]):
        assert x.sample_id == y.sample_id and y.input_ids.tolist() == x.input_ids.tolist()
        assert y.ids.tolist() == x.ids.tolist() and y.counts.tolist() == x.counts.tolist()
        assert y.probs.numpy().view(np.uint32).tolist() == x.probs.numpy().view(np.uint32).tolist()
        assert y.tail.numpy().view(np.uint32).tolist() == x.tail.numpy().view(np.uint32).tolist()
