"""Bytes per token and decode speed of the row encodings side by side, on the same labels: packed, zstd, expgolomb
and grouped (docs/FORMAT.md 4, 6b, 6c, 6d).

    python benchmarks/bench_grouped.py [--synthetic-positions 2048] [--demo-positions 4096] [--repeats 3]

Sources: SYNTHETIC Zipf-like logits at V = 131072 (labelstore.tools.bench.synthetic_source) and the demo teacher on
held-out text (labelstore.tools.bench.demo_source). Settings: top-32 and top-50, log8 at step 1/16 (the default)
and 0.5 (coarse: more ties in value, which is where "grouped" saves). Each store is written by the real
StoreWriter in rows of ``--seq-len`` positions; bytes per token is the shard file's size over the positions (one
shard per store: its fixed cost, the schema metadata, is included and is under 0.5 B per token here). Decode is
tokens per CPU-second of one thread reading every row to padded [T, K] ids and float32 probabilities, best of
``--repeats`` (CPU seconds hold on a shared machine). Each grouped store is checked against the packed one: same
first entry, same probabilities, ids equal once both are put in 6d's order. Writes
benchmarks/results/grouped.json and the table as grouped.md.
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
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from labelstore.codecs import get_codec  # noqa: E402
from labelstore.store.reader import LabelStore  # noqa: E402
from labelstore.store.writer import StoreWriter  # noqa: E402

ENCODINGS = ("packed", "zstd", "expgolomb", "grouped")


def rows_of(logits, nxt, k, step, seq_len):
    from labelstore_kernels import extract_topk

    codec = get_codec("log8", step=step)
    ex = extract_topk(logits, k, codec=codec)
    ids, vals, counts, tail = ex.ids.numpy(), ex.values.numpy(), ex.counts.numpy().astype(np.int64), ex.tail.numpy()
    nxt = nxt.numpy()
    inputs = np.concatenate([np.zeros(1, dtype=nxt.dtype), nxt[:-1]])  # input_ids[t + 1] = the token t predicts
    rows = []
    for a in range(0, len(counts), seq_len):
        b = min(len(counts), a + seq_len)
        keep = np.arange(ids.shape[1])[None, :] < counts[a:b, None]
        rows.append((inputs[a:b], counts[a:b], ids[a:b][keep], vals[a:b][keep], tail[a:b]))
    return codec, rows


def meta_of(V, k, codec, encoding):
    return {"vocab_size": V, "label_kind": "soft", "selection": {"mode": "topk", "k": k},
            "value_codec": codec.to_json(), "temperature": 1.0, "teacher": {"name": "bench", "hash": "-"},
            "tokenizer": {"name": "bench", "hash": "-"}, "encoding": {"name": encoding}}


def decode_rate(path, repeats):
    s = LabelStore(path)
    ntok = 0
    for i in range(len(s)):  # warm
        ntok += s[i].ids.shape[0]
    best = float("inf")
    for _ in range(repeats):
        c0 = time.process_time()
        for i in range(len(s)):
            s[i]
        best = min(best, time.process_time() - c0)
    return ntok / max(best, 1e-9)


def canonical(x):
    """(first ids, per-position ids sorted with their probabilities): what 6d preserves."""
    ids, p = x.ids.numpy(), x.probs.numpy()
    order = np.lexsort((ids, -p.view(np.int32)), axis=1)  # by probability (bits), then id
    return ids[:, 0], np.take_along_axis(ids, order, 1), np.take_along_axis(p, order, 1)


def check_same(packed, grouped):
    a, b = LabelStore(packed), LabelStore(grouped)
    for i in range(len(a)):
        fa, ia, pa_ = canonical(a[i])
        fb, ib, pb = canonical(b[i])
        assert np.array_equal(fa, fb) and np.array_equal(ia, ib) and np.array_equal(pa_.view(np.uint32),
                                                                                    pb.view(np.uint32))


def run_source(name, logits, nxt, args, tmp, results):
    N, V = logits.shape
    for k in (32, 50):
        for step in (1 / 16, 0.5):
            codec, rows = rows_of(logits, nxt, k, step, args.seq_len)
            for enc in ENCODINGS:
                path = os.path.join(tmp, f"{enc}")
                shutil.rmtree(path, ignore_errors=True)
                t0 = time.process_time()
                with StoreWriter(path, meta_of(V, k, codec, enc)) as w:
                    for i, r in enumerate(rows):
                        w.add(i, *r)
                t_write = time.process_time() - t0
                size = sum(os.path.getsize(p) for p in
                           (os.path.join(path, "shards", f) for f in os.listdir(os.path.join(path, "shards"))))
                rate = decode_rate(path, args.repeats)
                results.append({"source": name, "vocab_size": V, "positions": N, "k": k, "step": step,
                                "encoding": enc, "bytes_per_token": size / N, "decode_tokens_per_cpu_s": rate,
                                "encode_tokens_per_cpu_s": N / max(t_write, 1e-9)})
                r = results[-1]
                print(f"{name:>24} k={k:<3} step={step:<6} {enc:>9}: {r['bytes_per_token']:7.2f} B/token, "
                      f"decode {rate:12,.0f} tok/CPU-s", flush=True)
            check_same(os.path.join(tmp, "packed"), os.path.join(tmp, "grouped"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--synthetic-positions", type=int, default=2048)
    ap.add_argument("--demo-positions", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sources", default="synthetic,demo")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "grouped.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    from labelstore.tools.bench import demo_source, synthetic_source

    tmp = tempfile.mkdtemp(prefix="bench-grouped-")
    results = []
    try:
        for src in a.sources.split(","):
            if src == "synthetic":
                name, logits, nxt = synthetic_source(131072, a.synthetic_positions)
            else:
                name, logits, nxt = demo_source(a.demo_positions, log=lambda *x: None)
            run_source(name, logits, nxt, a, tmp, results)
            del logits
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = ["| source | k | log8 step | " + " | ".join(f"{e} B/tok" for e in ENCODINGS)
             + " | grouped saves vs expgolomb | " + " | ".join(f"{e} decode tok/CPU-s" for e in ENCODINGS) + " |",
             "|---" * (4 + 2 * len(ENCODINGS)) + "|"]
    keys = sorted({(r["source"], r["k"], r["step"]) for r in results}, key=lambda x: (x[0], x[1], -x[2]))
    for key in keys:
        by = {r["encoding"]: r for r in results if (r["source"], r["k"], r["step"]) == key}
        save = by["expgolomb"]["bytes_per_token"] - by["grouped"]["bytes_per_token"]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]:g} | "
                     + " | ".join(f"{by[e]['bytes_per_token']:.2f}" for e in ENCODINGS) + f" | {save:.2f} | "
                     + " | ".join(f"{by[e]['decode_tokens_per_cpu_s']:,.0f}" for e in ENCODINGS) + " |")
    print("\n" + "\n".join(lines))
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"seq_len": a.seq_len, "repeats": a.repeats, "machine": platform.machine(),
                   "cpu_count": os.cpu_count(), "loadavg_at_end": os.getloadavg(),
                   "python": platform.python_version(), "results": results}, f, indent=1)
    md = os.path.splitext(a.out)[0] + ".md"
    with open(md, "w") as f:
        f.write(f"`python benchmarks/bench_grouped.py` ({platform.machine()}, {os.cpu_count()} cores, load average "
                f"{os.getloadavg()[0]:.1f} at the end: decode rates are noisy on a shared machine). Bytes per token "
                "include the shard's fixed cost; decode is tokens per CPU-second, best of "
                f"{a.repeats}.\n\n" + "\n".join(lines) + "\n")
    print(f"wrote {a.out} and {md}")


if __name__ == "__main__":
    main()
