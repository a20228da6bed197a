"""Random label stores for tests: rows generated from a seed, kept beside the store as the reference."""

from __future__ import annotations

import numpy as np
import torch

from labelstore.codecs import get_codec


def make_meta(vocab_size=1000, k=8, codec="log8", label_kind="soft", **extra):
    meta = {
        "vocab_size": vocab_size,
        "label_kind": label_kind,
        "selection": {"mode": "topk", "k": k},
        "value_codec": get_codec(codec).to_json(),
        "temperature": 1.0,
        "teacher": {"name": "test-teacher", "hash": "0" * 16},
        "tokenizer": {"name": "test-tokenizer", "hash": "1" * 16},
        "compile_config": {"seed": 0},
    }
    meta.update(extra)
    return meta


def make_meta_v3(*args, **extra):
    """Metadata asking for format version 3: a store whose shard list is inside manifest.json, for the suites that
    edit that list (version 4's index.arrow has its own damage tests: tests/store/test_index.py)."""
    return make_meta(*args, **{"format_version": 3, **extra})


def random_rows(n, vocab_size=1000, k=8, codec="log8", seed=0, max_len=40, lengths=None, label_kind="soft"):
    """Rows as the writer takes them: dicts of numpy arrays, with variable counts per position."""
    rng = np.random.default_rng(seed)
    bpv = get_codec(codec).bytes_per_value if label_kind == "soft" else 0
    rows = []
    for i in range(n):
        T = int(lengths[i]) if lengths is not None else int(rng.integers(0, max_len + 1))
        counts = rng.integers(1, k + 1, size=T)
        m = int(counts.sum())
        rows.append({
            "sample_id": 1000 + i,
            "input_ids": rng.integers(0, vocab_size, size=T),
            "counts": counts,
            "ids": rng.integers(0, vocab_size, size=m),
            "values": _codes(codec, counts, rng) if bpv else np.zeros(0, np.uint8),
            "tail": rng.random(T).astype(np.float32) if label_kind == "soft" else np.zeros(0, np.float32),
            "doc_starts": np.sort(rng.choice(max(T, 1), size=min(T, 2), replace=False)).astype(np.int32),
        })
    return rows


def write_rows(writer, rows):
    for r in rows:
        writer.add(r["sample_id"], r["input_ids"], r["counts"], r["ids"], r["values"], r["tail"], r["doc_starts"])


def _codes(codec, counts, rng):
    """Valid codec bytes: relative log-probs, 0 for each position's first entry, then decreasing."""
    r = -rng.exponential(2.0, size=int(counts.sum()))
    starts = np.cumsum(counts) - counts
    r[starts[counts > 0]] = 0.0
    c = get_codec(codec)
    return c.encode(torch.from_numpy(r).float()[None, :]).reshape(-1).numpy()


def read_all_rows(path) -> list[tuple]:
    """Every row of a store, in store order, as (sample_id, input_ids, ids, probs, tail) numpy arrays (raises only
    labelstore errors on a damaged store)."""
    from labelstore.store.reader import LabelStore

    s = LabelStore(path)
    return [(x.sample_id, x.input_ids.numpy(), x.ids.numpy(), x.probs.numpy(), x.tail.numpy()) for x in s]


def same_rows(got, want) -> bool:
    """Whether two :func:`read_all_rows` results are identical, bit for bit."""
    return len(got) == len(want) and all(
        a[0] == b[0] and all(np.array_equal(x, y) for x, y in zip(a[1:], b[1:])) for a, b in zip(got, want))


def decode_spliced_column(one_row, col: str, keep: int, blob: bytes, vocab_size: int = 1000) -> None:
    """A hostile row (its CRC forged to match or bypassed): ``col`` cut to ``keep`` bytes plus ``blob`` either
    decodes, with every id in range, or raises a labelstore error, never another exception. ``one_row``: (store,
    sample id, tokens, raw parts) of a real row."""
    from labelstore.errors import LabelStoreError

    s, sid, T, parts = one_row
    try:
        raw = s.decode_parts(sid, T, dict(parts, **{col: parts[col][:keep] + blob}))
    except LabelStoreError:
        return
    assert raw.ids.size == int(raw.counts.sum()) and (raw.ids.size == 0 or int(raw.ids.max()) < vocab_size)
