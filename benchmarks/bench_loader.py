"""Loader throughput: labelstore batches against a quick-script Parquet baseline, side by side.

    python benchmarks/bench_loader.py [--samples 96] [--repeats 3]

Content (synthetic, clearly so): ``--samples`` sequences of T = 2048 tokens, V = 32000, k = 32 kept entries per
position with a Zipf-like decay and a random tail, stored twice from the same arrays:

- labelstore: the store format (ids bit-packed at 15 bits, log8 values, float32 tail);
- baselines: Parquet with ``input_ids`` list<int64>, ``ids`` list<list<int64>> [T][k], ``probs``
  list<list<float32>> (absolute probabilities) and ``tail`` list<float32>, memory-mapped with pyarrow, in a
  map-style Dataset, decoded two ways: **numpy** (the best reasonable script: each row's flattened Arrow buffers
  viewed as numpy arrays, no Python objects; timed exactly like labelstore: same batches, same repeats) and
  **naive** (``to_pylist()`` then ``torch.tensor``, what a quick script often does; fewer batches and one run,
  as it is two orders of magnitude slower; kept for reference, labelled as such).

Both produce the same batch (input ids, labels, masks, teacher ids/probs/tail; dense adds [B, T, V] targets)
through a torch DataLoader with 0 and 2 workers, from a warm page cache (every file is read once first).
Sparse batches: B = 8, T = 2048. Dense batches: B = 2, T = 2048, V = 32000 (0.5 GB of float32 per batch).
The main process runs torch with one thread, so "0 workers" is one core; its tokens per CPU-second of the
process (``tokens_per_cpu_s``) is the one-core figure that holds on a busy machine, where wall-clock rates
drop with the load average (recorded). Tokens/s counts real tokens.
Writes ``benchmarks/results/loader.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from labelstore.codecs import get_codec  # noqa: E402
from labelstore.store.writer import StoreWriter  # noqa: E402
from labelstore.student.dataset import StoreDataset  # noqa: E402
from labelstore.student.loader import StoreLoader  # noqa: E402
from labelstore.student.targets import to_dense  # noqa: E402

V, K, T = 32000, 32, 2048
NUMPY = "parquet + numpy"  # the fair baseline: same batches, same repeats
NAIVE = "parquet to_pylist"  # the naive quick script, for reference


# ------------------------------------------------------------------------------------------------ content
def synth(n: int, seed: int = 0):
    """Per sequence: input ids [T], kept ids [T, K] (unique per position), probs [T, K], tail [T], log8 codes."""
    rng = np.random.default_rng(seed)
    codec = get_codec("log8")
    for i in range(n):
        ids = (rng.integers(0, V, (T, 1)) + np.arange(K) * 997) % V  # 997 * 31 < V: unique within a position
        s = rng.uniform(0.5, 3.0, (T, 1))
        logrel = -s * np.log1p(np.arange(K))  # Zipf-like decay below the top token
        tail = rng.uniform(0.0, 0.3, T).astype(np.float32)
        w = np.exp(logrel)
        probs = (w / w.sum(1, keepdims=True) * (1 - tail)[:, None]).astype(np.float32)
        codes = codec.encode(torch.from_numpy(logrel.astype(np.float32))).numpy()
        yield i, rng.integers(0, V, T), ids, probs, tail, codes


def write_inputs(root: Path, n: int):
    meta = {"vocab_size": V, "label_kind": "soft", "selection": {"mode": "topk", "k": K},
            "value_codec": get_codec("log8").to_json(), "temperature": 1.0,
            "teacher": {"name": "synthetic", "hash": "0" * 16}, "tokenizer": {"name": "synthetic", "hash": "0" * 16}}
    rows = []
    with StoreWriter(root / "store", meta) as w:
        for i, x, ids, probs, tail, codes in synth(n):
            w.add(i, x, np.full(T, K), ids, codes, tail)
            rows.append((i, x, ids, probs, tail))

    def nested(a):  # [n, T, K] -> list<list<...>> without Python objects
        inner = pa.ListArray.from_arrays(np.arange(0, a.size + 1, a.shape[2], dtype=np.int32), a.reshape(-1))
        return pa.ListArray.from_arrays(np.arange(0, a.shape[0] * a.shape[1] + 1, a.shape[1], dtype=np.int32), inner)

    def flat(a):
        return pa.ListArray.from_arrays(np.arange(0, a.size + 1, a.shape[1], dtype=np.int32), a.reshape(-1))

    table = pa.table({
        "sample_id": pa.array([r[0] for r in rows], pa.int64()),
        "input_ids": flat(np.stack([r[1] for r in rows]).astype(np.int64)),
        "ids": nested(np.stack([r[2] for r in rows]).astype(np.int64)),
        "probs": nested(np.stack([r[3] for r in rows])),
        "tail": flat(np.stack([r[4] for r in rows])),
    })
    pq.write_table(table, root / "baseline.parquet", row_group_size=8)


def warm(paths):
    for p in paths:
        for f in ([p] if p.is_file() else sorted(p.rglob("*"))):
            if f.is_file():
                with open(f, "rb") as fh:
                    while fh.read(1 << 24):
                        pass


# ------------------------------------------------------------------------------------------------ baseline
class QuickParquetDataset(torch.utils.data.Dataset):
    """What a quick script does: read the table with pyarrow, per row ``to_pylist()`` and ``torch.tensor``."""

    def __init__(self, path):
        self.path = str(path)
        self.table = None
        self.n = pq.ParquetFile(self.path).metadata.num_rows

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if self.table is None:
            self.table = pq.read_table(self.path, memory_map=True)
        row = self.table.slice(int(i), 1).to_pylist()[0]
        return {
            "sample_id": row["sample_id"],
            "input_ids": torch.tensor(row["input_ids"], dtype=torch.int64),
            "teacher_ids": torch.tensor(row["ids"], dtype=torch.int64),
            "teacher_probs": torch.tensor(row["probs"], dtype=torch.float32),
            "teacher_tail": torch.tensor(row["tail"], dtype=torch.float32),
        }


class NumpyParquetDataset(QuickParquetDataset):
    """The best reasonable script: per row, the flattened Arrow buffers as numpy arrays (zero-copy views)."""

    def __getitem__(self, i):
        if self.table is None:
            self.table = pq.read_table(self.path, memory_map=True).combine_chunks()
        row = self.table.slice(int(i), 1)

        def values(name, depth):
            col = row.column(name).chunk(0)
            for _ in range(depth):
                col = col.flatten()
            return col.to_numpy()

        x = values("input_ids", 1)
        n = x.shape[0]
        return {
            "sample_id": int(row.column("sample_id")[0].as_py()),
            "input_ids": torch.from_numpy(x),
            "teacher_ids": torch.from_numpy(values("ids", 2).reshape(n, -1)),
            "teacher_probs": torch.from_numpy(values("probs", 2).reshape(n, -1)),
            "teacher_tail": torch.from_numpy(values("tail", 1)),
        }


class QuickCollate:
    def __init__(self, dense=False):
        self.dense = dense

    def __call__(self, items):
        Tm = max(len(it["input_ids"]) for it in items)
        pad = [Tm - len(it["input_ids"]) for it in items]
        x = torch.stack([torch.nn.functional.pad(it["input_ids"], (0, p)) for it, p in zip(items, pad)])
        attn = torch.stack([torch.nn.functional.pad(torch.ones_like(it["input_ids"]), (0, p))
                            for it, p in zip(items, pad)])
        labels = torch.where(attn.bool(), x, -100).roll(-1, 1)
        labels[:, -1] = -100
        ids = torch.stack([torch.nn.functional.pad(it["teacher_ids"], (0, 0, 0, p)) for it, p in zip(items, pad)])
        probs = torch.stack([torch.nn.functional.pad(it["teacher_probs"], (0, 0, 0, p)) for it, p in zip(items, pad)])
        tail = torch.stack([torch.nn.functional.pad(it["teacher_tail"], (0, p)) for it, p in zip(items, pad)])
        mask = probs > 0
        batch = {"input_ids": x, "attention_mask": attn, "labels": labels, "teacher_ids": ids, "teacher_probs": probs,
                 "teacher_tail": tail, "teacher_mask": mask, "position_mask": attn.bool()}
        if self.dense:
            batch["teacher_dense"] = to_dense(ids, probs, tail, mask, V)
        return batch


# ------------------------------------------------------------------------------------------------ timing
def tokens_per_s(make_iter, repeats: int, max_batches: int):
    """Median over ``repeats`` of (tokens / wall second, tokens / CPU second of this process)."""
    wall, cpu = [], []
    for _ in range(repeats):
        it = make_iter()
        next(it)  # warm-up batch (worker start-up, first maps)
        tokens, t0, c0 = 0, time.perf_counter(), time.process_time()
        for _, batch in zip(range(max_batches), it):
            tokens += int(batch["attention_mask"].sum())
        wall.append(tokens / (time.perf_counter() - t0))
        cpu.append(tokens / max(time.process_time() - c0, 1e-9))
        del it
    return statistics.median(wall), statistics.median(cpu), wall


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, help="keep the generated inputs here (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "loader.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench-loader-"))
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "store" / "manifest.json").exists():
        print(f"writing {args.samples} x {T} tokens to {root} ...", flush=True)
        shutil.rmtree(root / "store", ignore_errors=True)
        write_inputs(root, args.samples)
    warm([root / "store", root / "baseline.parquet"])
    store_bytes = sum(f.stat().st_size for f in (root / "store").rglob("*.arrow"))
    parquet_bytes = (root / "baseline.parquet").stat().st_size

    ds = StoreDataset(root / "store")
    quick = QuickParquetDataset(root / "baseline.parquet")
    fast = NumpyParquetDataset(root / "baseline.parquet")
    rows = []
    for mode, B in (("sparse", 8), ("dense", 2)):
        dense = mode == "dense"
        nb = max(2, args.samples // B - 1)
        if dense:
            nb = min(nb, 6)
        for workers in (0, 2):
            def ours(workers=workers, dense=dense, B=B):
                return iter(StoreLoader(ds, batch_size=B, seed=0, num_workers=workers, dense=dense,
                                        collate_kwargs={"dense_budget_bytes": 4 << 30}))

            def base(workers=workers, dense=dense, B=B, data=quick):
                sampler = torch.utils.data.RandomSampler(data, generator=torch.Generator().manual_seed(0))
                return iter(torch.utils.data.DataLoader(data, batch_size=B, sampler=sampler, num_workers=workers,
                                                        collate_fn=QuickCollate(dense)))

            def numpy_base(workers=workers, dense=dense, B=B):
                return base(workers, dense, B, data=fast)

            for name, make in (("labelstore", ours), (NUMPY, numpy_base), (NAIVE, base)):
                naive = name == NAIVE
                nbatches = min(nb, 3 if not dense else 2) if naive else nb
                med, per_cpu, all_rates = tokens_per_s(make, 1 if naive else args.repeats, nbatches)
                rows.append({"mode": mode, "batch": B, "seq_len": T, "workers": workers, "loader": name,
                             "tokens_per_s": med, "runs": all_rates, "batches_timed": nbatches,
                             "repeats": 1 if naive else args.repeats,
                             # with 0 workers all the work is this process's: tokens per second of one busy core
                             "tokens_per_cpu_s": per_cpu if workers == 0 else None})
                extra = f"  ({per_cpu:,.0f} per CPU-second)" if workers == 0 else ""
                print(f"{mode:6s} B={B} workers={workers} {name:22s} {med:12,.0f} tokens/s{extra}", flush=True)

    def rate(mode, workers, loader, field="tokens_per_s"):
        key = (mode, workers, loader)
        return next(r[field] for r in rows if (r["mode"], r["workers"], r["loader"]) == key)

    one_core = rate("sparse", 0, "labelstore", "tokens_per_cpu_s")

    ratios = {f"{m}_w{w}": rate(m, w, "labelstore") / rate(m, w, NUMPY) for m in ("sparse", "dense") for w in (0, 2)}
    naive_ratios = {f"{m}_w{w}": rate(m, w, "labelstore") / rate(m, w, NAIVE)
                    for m in ("sparse", "dense") for w in (0, 2)}
    result = {
        "benchmark": "loader",
        "content": "synthetic (Zipf-like top-k, random tail)",
        "config": {"vocab_size": V, "k": K, "seq_len": T, "samples": args.samples, "codec": "log8",
                   "sparse_batch": 8, "dense_batch": 2},
        "bytes": {"store_shards": store_bytes, "parquet_baseline": parquet_bytes,
                  "store_per_token": store_bytes / (args.samples * T),
                  "parquet_per_token": parquet_bytes / (args.samples * T)},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "pyarrow": pa.__version__, "loadavg_1m": os.getloadavg()[0]},
        "rows": rows,
        "speedup_vs_baseline": ratios,
        "baseline": NUMPY + " (same batches and repeats as labelstore)",
        "speedup_vs_naive_baseline": naive_ratios,
        "targets": {"sparse_one_core_tokens_per_s": 1e6, "sparse_speedup": 10.0},
        "sparse_one_core_tokens_per_cpu_s": one_core,
        # issue 5's 10x target was set against the quick script (the naive baseline)
        "targets_met": {"sparse_one_core": one_core >= 1e6,
                        "sparse_speedup_vs_naive": naive_ratios["sparse_w0"] >= 10.0},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")

    print()
    print(f"{'mode':6s} {'workers':>7s} {'labelstore tok/s':>17s} {'numpy tok/s':>12s} {'ratio':>6s} "
          f"{'naive tok/s':>12s} {'ratio':>6s}")
    for m in ("sparse", "dense"):
        for w in (0, 2):
            print(f"{m:6s} {w:7d} {rate(m, w, 'labelstore'):17,.0f} {rate(m, w, NUMPY):12,.0f} "
                  f"{ratios[f'{m}_w{w}']:5.2f}x {rate(m, w, NAIVE):12,.0f} {naive_ratios[f'{m}_w{w}']:5.1f}x")
    print(f"sparse, one core (tokens per CPU-second, 0 workers): {one_core:,.0f} (target 1,000,000)")
    print(f"bytes per token: store {result['bytes']['store_per_token']:.1f}, "
          f"parquet {result['bytes']['parquet_per_token']:.1f}; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs")
    print(f"results written to {args.out}")
    if args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
