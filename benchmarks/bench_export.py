"""Export/import throughput: a store to plain Parquet and to DistillKit's layout, and DistillKit's layout back.

    python benchmarks/bench_export.py [--tokens 65536] [--vocab 32000] [--k 32] [--repeats 3]

Content: the SYNTHETIC top-k store of benchmarks/bench_store.py (Zipf-like teacher log-probabilities, uniform
random ids, here distinct within a position, log8 values, sequences of 2048 positions). Every operation runs on the same
thread, warm page cache, best of ``--repeats``; tokens/s counts positions. Operations:

- ``read store``: decode every sequence to dataset items (StoreDataset), the reference the others are compared to;
- ``export parquet``: ``labelstore export --to parquet`` (decode + Arrow lists + zstd Parquet);
- ``read parquet``: pyarrow reads the export back and takes every column's values as numpy arrays;
- ``export distillkit``: ``labelstore export --to distillkit`` (lossless float32 setting);
- ``import distillkit``: ``labelstore import`` of that export into a new store (log8 values).

Writes benchmarks/results/export.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings

import numpy as np
import pyarrow.parquet as pq
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from bench_store import make_pool  # noqa: E402

from labelstore.codecs import get_codec  # noqa: E402
from labelstore.store.writer import StoreWriter  # noqa: E402
from labelstore.student.dataset import StoreDataset  # noqa: E402
from labelstore.student.distillkit import export_distillkit, import_distillkit  # noqa: E402
from labelstore.student.export import export_parquet  # noqa: E402


def build_store(path, vocab, k, tokens, T):
    ids_pool, lp_pool = (a[:, :k] for a in make_pool(vocab, k))
    rng = np.random.default_rng(k)
    codec = get_codec("log8")
    meta = {"vocab_size": vocab, "label_kind": "soft", "selection": {"mode": "topk", "k": k},
            "value_codec": codec.to_json(), "temperature": 1.0, "teacher": {"name": "synthetic", "hash": "-"},
            "tokenizer": {"name": "synthetic", "hash": "-"}}
    with StoreWriter(path, meta) as w:
        for i in range(tokens // T):
            pick = rng.integers(0, ids_pool.shape[0], size=T)
            lp = np.sort(lp_pool[pick] + rng.normal(0, 0.02, size=(T, k)).astype(np.float32), axis=1)[:, ::-1]
            lp = np.ascontiguousarray(lp)
            tail = np.clip(1 - np.exp(lp).sum(1), 0, 1).astype(np.float32)  # synthetic input only
            codes = codec.encode(torch.from_numpy(lp - lp[:, :1])).numpy()
            # uniform random ids, distinct within a position (as a teacher's top-k are)
            ids = (rng.integers(0, vocab, size=(T, 1)) + np.cumsum(rng.integers(1, vocab // k, size=(T, k)), 1)) % vocab
            w.add(i, rng.integers(0, vocab, size=T), np.full(T, k), ids.reshape(-1), codes.reshape(-1), tail)


def size(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs if not f.endswith(".lock"))


def best_of(repeats, fn, fresh=None):
    """Best wall time of ``fn(out)`` over ``repeats`` runs; ``fresh()`` gives each run a new output path."""
    times, out = [], None
    for _ in range(repeats):
        out = fresh() if fresh else None
        t0 = time.perf_counter()
        fn(out)
        times.append(time.perf_counter() - t0)
    return min(times), out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "export.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    tmp = tempfile.mkdtemp(prefix="bench-export-")
    counter = iter(range(10**6))

    def fresh():
        return os.path.join(tmp, f"out{next(counter)}")

    try:
        store = os.path.join(tmp, "store")
        build_store(store, a.vocab, a.k, a.tokens, a.seq_len)
        ntok = (a.tokens // a.seq_len) * a.seq_len
        ds = StoreDataset(store)

        def read_store(_):
            for i in range(len(ds)):
                ds[i]

        def read_parquet(path):
            for f in sorted(os.listdir(path)):
                t = pq.read_table(os.path.join(path, f))
                for name in ("input_ids", "teacher_ids", "teacher_probs", "teacher_tail"):
                    col = t.column(name).combine_chunks()
                    while hasattr(col, "flatten") and col.type.num_fields == 1:
                        col = col.flatten()
                    col.to_numpy()

        read_store(None)  # warm the page cache
        rows = {}
        t, _ = best_of(a.repeats, read_store)
        rows["read store"] = {"seconds": t, "bytes": size(store)}
        t, pq_out = best_of(a.repeats, lambda o: export_parquet(store, o), fresh)
        rows["export parquet"] = {"seconds": t, "bytes": size(pq_out)}
        t, _ = best_of(a.repeats, lambda _: read_parquet(pq_out))
        rows["read parquet"] = {"seconds": t, "bytes": size(pq_out)}
        t, dk_out = best_of(a.repeats, lambda o: export_distillkit(store, o), fresh)
        rows["export distillkit"] = {"seconds": t, "bytes": size(dk_out)}
        t, back = best_of(a.repeats, lambda o: import_distillkit(dk_out, o), fresh)
        rows["import distillkit"] = {"seconds": t, "bytes": size(back)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ref = ntok / rows["read store"]["seconds"]
    print(f"SYNTHETIC top-k store, V={a.vocab}, k={a.k}, {ntok} positions in sequences of {a.seq_len}, one thread, "
          f"best of {a.repeats}")
    hdr = f"{'operation':<18} | {'tokens/s':>12} | {'x read store':>12} | {'output bytes/token':>18}"
    print(hdr)
    print("-" * len(hdr))
    for name, r in rows.items():
        r["tokens_per_s"] = ntok / r["seconds"]
        r["bytes_per_token"] = r["bytes"] / ntok
        print(f"{name:<18} | {r['tokens_per_s']:12,.0f} | {r['tokens_per_s'] / ref:12.2f} | "
              f"{r['bytes_per_token']:18.1f}")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"synthetic": True, "vocab_size": a.vocab, "k": a.k, "tokens": ntok, "seq_len": a.seq_len,
                   "repeats": a.repeats, "threads": 1, "machine": platform.machine(),
                   "python": platform.python_version(), "results": rows}, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
