"""Store write/read throughput and bytes per token, side by side with the quick-script baseline.

    python benchmarks/bench_store.py [--tokens 131072] [--vocab 32000] [--repeats 5]
        [--encodings packed,zstd,expgolomb,grouped]

Content: top-k of SYNTHETIC Zipf-like teacher logits (labelstore.tools.synthetic, mean entropy 2.5 nats), sequences
of 2048 positions whose probabilities are drawn from a pool of generated positions (jittered) and whose
ids are uniform random (the worst case for id compression; real top-k ids favour frequent tokens).
labelstore: log8 values, bit-packed ids (encoding packed, format v1), per-row zstd (encoding zstd, v2) or Exp-Golomb
coded ids under zstd (encoding expgolomb, v5; docs/FORMAT.md 6c) or the same with the ids of tied values sorted and
gap-coded (encoding grouped, v6; 6d: these uniform ids and jittered values tie rarely at step 1/16, so it saves
little here; benchmarks/bench_grouped.py measures it where values tie). Baseline
(what a quick script does): Parquet (pyarrow defaults, snappy) with int64 input ids, list<int64> kept ids and
list<float32> probabilities per sequence, read back with pyarrow and sliced into numpy per sequence.
Reading = decoding every sequence to [T, K] ids and float32 probabilities, warm page cache, one process.
Every timing (both sides) is the median of ``--repeats`` runs, with the min and max kept in the JSON, and the
process's CPU seconds (one thread), whose tokens per CPU-second hold on a busy machine; "read x" is their ratio.
Writes benchmarks/results/store.json.
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
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from labelstore.codecs import get_codec  # noqa: E402
from labelstore.store.reader import LabelStore  # noqa: E402
from labelstore.store.writer import StoreWriter  # noqa: E402
from labelstore.tools.synthetic import zipf_logits  # noqa: E402


def make_pool(vocab, kmax, n=512, seed=0):
    logits = zipf_logits(n, vocab, mean_entropy=2.5, seed=seed)
    lp = torch.log_softmax(logits, -1)
    top, ids = lp.topk(kmax, -1)
    return ids.numpy(), top.numpy()


def timed(fn, repeats):
    """Median, min and max wall seconds of ``repeats`` calls of ``fn``, and the median CPU seconds of this process
    (one thread: CPU seconds are what one core spends, whatever else the machine runs)."""
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return float(np.median(times)), float(min(times)), float(max(times)), float(np.median(cpu))


def rate(ntok, t):
    """tokens/s of a timing: median wall rate, its spread [slowest, fastest], and tokens per CPU-second."""
    return {"median": ntok / t[0], "min": ntok / t[2], "max": ntok / t[1], "per_cpu_s": ntok / max(t[3], 1e-9)}


def run_one(vocab, k, tokens, T, pool, tmp, encoding="packed", repeats=5, step=None):
    ids_pool, lp_pool = pool[0][:, :k], pool[1][:, :k]
    rng = np.random.default_rng(k)
    nseq = tokens // T
    codec = get_codec("log8") if step is None else get_codec("log8", step=step)
    seqs = []
    for i in range(nseq):
        pick = rng.integers(0, ids_pool.shape[0], size=T)
        # fresh ids and jittered log-probs per position, so no codec can exploit the pool's repetition
        lp = np.sort(lp_pool[pick] + rng.normal(0, 0.02, size=(T, k)).astype(np.float32), axis=1)[:, ::-1]
        lp = np.ascontiguousarray(lp)
        ids = rng.integers(0, vocab, size=(T, k))
        tail = np.clip(1 - np.exp(lp).sum(1), 0, 1).astype(np.float32)  # fine here: synthetic benchmark input
        codes = codec.encode(torch.from_numpy(lp - lp[:, :1])).numpy()
        seqs.append((i, rng.integers(0, vocab, size=T), ids, codes, np.exp(lp).astype(np.float32), tail))
    meta = {"vocab_size": vocab, "label_kind": "soft", "selection": {"mode": "topk", "k": k},
            "value_codec": codec.to_json(), "temperature": 1.0, "teacher": {"name": "synthetic", "hash": "-"},
            "tokenizer": {"name": "synthetic", "hash": "-"}, "encoding": {"name": encoding}}
    counts = np.full(T, k)
    # --- labelstore write (each repeat into a fresh store)
    store = os.path.join(tmp, f"ls-{vocab}-{k}-{encoding}")

    def write():
        shutil.rmtree(store, ignore_errors=True)
        with StoreWriter(store, meta) as w:
            for sid, inp, ids, codes, _p, tail in seqs:
                w.add(sid, inp, counts, ids.reshape(-1), codes.reshape(-1), tail)

    t_write = timed(write, repeats)
    ls_bytes = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(store) for f in fs
                   if not f.endswith(".lock"))
    # --- labelstore read (warm: one untimed pass first)
    s = LabelStore(store)

    def read():
        for i in range(len(s)):
            x = s[i]
            assert x.ids.shape == (T, k)

    read()
    t_read = timed(read, repeats)
    # --- baseline write
    pqf = os.path.join(tmp, f"pq-{vocab}-{k}.parquet")

    def bwrite():
        table = pa.table({
            "sample_id": pa.array([q[0] for q in seqs], pa.int64()),
            "input_ids": pa.array([q[1].astype(np.int64) for q in seqs], pa.list_(pa.int64())),
            "ids": pa.array([q[2].reshape(-1).astype(np.int64) for q in seqs], pa.list_(pa.int64())),
            "probs": pa.array([q[4].reshape(-1) for q in seqs], pa.list_(pa.float32())),
        })
        pq.write_table(table, pqf)

    t_bwrite = timed(bwrite, repeats)
    pq_bytes = os.path.getsize(pqf)

    def bread():
        tb = pq.read_table(pqf)
        idc, prc = tb.column("ids"), tb.column("probs")
        for i in range(tb.num_rows):
            ids = torch.from_numpy(idc[i].values.to_numpy().reshape(T, k))
            probs = torch.from_numpy(prc[i].values.to_numpy().reshape(T, k))
            assert ids.shape == probs.shape

    bread()
    t_bread = timed(bread, repeats)
    ntok = nseq * T
    return {
        "vocab_size": vocab, "k": k, "tokens": ntok, "encoding": encoding, "repeats": repeats,
        "log8_step": codec.param["step"],
        "labelstore": {"bytes_per_token": ls_bytes / ntok, "write": rate(ntok, t_write), "read": rate(ntok, t_read),
                       "write_tokens_per_s": ntok / t_write[0], "read_tokens_per_s": ntok / t_read[0]},
        "baseline_parquet": {"bytes_per_token": pq_bytes / ntok, "write": rate(ntok, t_bwrite),
                             "read": rate(ntok, t_bread), "write_tokens_per_s": ntok / t_bwrite[0],
                             "read_tokens_per_s": ntok / t_bread[0]},
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--ks", default="8,32,64,128")
    ap.add_argument("--encodings", default="packed,zstd,expgolomb,grouped")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per measurement, both sides (median)")
    ap.add_argument("--log8-step", type=float, default=None, help="the log8 codec's step (default 1/16)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "store.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    ks = [int(x) for x in a.ks.split(",")]
    pool = make_pool(a.vocab, max(ks))
    tmp = tempfile.mkdtemp(prefix="bench-store-")
    results = []
    try:
        for enc in a.encodings.split(","):
            for k in ks:
                results.append(run_one(a.vocab, k, a.tokens, a.seq_len, pool, tmp, enc, a.repeats, a.log8_step))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # marginal bytes per kept entry: slope of bytes/token over k; per-position overhead: the intercept
    packed = [r for r in results if r["encoding"] == "packed"]
    kk = np.array([r["k"] for r in packed], float)
    bb = np.array([r["labelstore"]["bytes_per_token"] for r in packed])
    slope, icpt = np.polyfit(kk, bb, 1) if len(packed) > 1 else (float("nan"), float("nan"))
    print(f"SYNTHETIC teacher top-k, V={a.vocab}, {a.tokens} tokens per setting, sequences of {a.seq_len}, "
          f"one process, warm page cache, median of {a.repeats} runs each")
    hdr = (f"{'enc':>9} {'k':>4} | {'labelstore B/tok':>16} {'write tok/s':>12} {'read tok/s':>12} "
           f"{'read/CPU-s':>11} | {'parquet B/tok':>13} {'write tok/s':>12} {'read tok/s':>12} {'read/CPU-s':>11} | "
           f"{'size x':>6} {'read x':>6}")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        ls, bl = r["labelstore"], r["baseline_parquet"]
        print(f"{r['encoding']:>9} {r['k']:>4} | {ls['bytes_per_token']:16.1f} {ls['write_tokens_per_s']:12,.0f} "
              f"{ls['read_tokens_per_s']:12,.0f} {ls['read']['per_cpu_s']:11,.0f} | {bl['bytes_per_token']:13.1f} "
              f"{bl['write_tokens_per_s']:12,.0f} {bl['read_tokens_per_s']:12,.0f} {bl['read']['per_cpu_s']:11,.0f} | "
              f"{bl['bytes_per_token'] / ls['bytes_per_token']:6.2f} "
              f"{ls['read']['per_cpu_s'] / bl['read']['per_cpu_s']:6.2f}")
    print(f"fit: {slope:.3f} bytes per kept entry + {icpt:.2f} bytes per position "
          "(targets: <= 2.25 and <= 8 before entropy coding)")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"synthetic": True, "vocab_size": a.vocab, "seq_len": a.seq_len,
                   "bytes_per_entry": slope, "bytes_per_position": icpt, "fit_encoding": "packed",
                   "repeats": a.repeats, "machine": platform.machine(), "cpu_count": os.cpu_count(),
                   "loadavg_at_end": os.getloadavg(),
                   "python": platform.python_version(), "results": results}, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
