"""Sparse KL with tail (pure-torch twin, CPU) against a dense KL, forward + backward, time and peak memory.

    python benchmarks/bench_losses.py [--vocab 32000 131072] [--rows 4096] [--k 32] [--reps 3]

Each vocabulary size runs in its own subprocess (a crash or an out-of-memory kill loses only that row), on
deterministic inputs: fp32 student logits [rows, V] and a teacher's top-k (ids, absolute probabilities, exact
tail mass).

- ``sparse``: ``labelstore.student.losses.sparse_kl(logits, ids, probs, tail, backend="torch")``, then ``backward()``
  (the tail bucket).
- ``sparse_uniform`` / ``sparse_prior``: the same with ``tail="uniform"`` / ``tail="prior"`` (the tail spread over
  the non-kept tokens; the prior is a SYNTHETIC positive [V] vector, indexed once before measuring, as a
  training run indexes its store's prior once).
- ``dense``: the dense alternative a trainer would write, ``F.kl_div(F.log_softmax(logits), P, "batchmean")``
  then ``backward()``, with ``P`` the [rows, V] teacher target (kept probabilities plus the tail spread evenly
  over the other tokens, the loader's dense mode). ``P`` is built before measuring and NOT counted, which
  favours the dense method by one more logits-sized buffer.

Time: the best (and the median) of ``--reps`` forward + backward wall times after one warm-up, the two
methods interleaved in one process so that a busy machine slows both alike (``torch.get_num_threads()``
threads). Peak memory: the torch profiler's allocator accounting (``profile_memory=True``: every CPU tensor
allocation and free is recorded with the running "Total Allocated"), over one extra forward + backward run
of each method; "peak extra" is the maximum of that running total above its value at the start, i.e.
everything allocated beyond the pre-existing inputs, including the logits' gradient that the step leaves
behind. It is reported in bytes and as a multiple of the student logits' size (unlike RSS it is not
blurred by the C allocator keeping freed pages).

Results go to a table on stdout and to ``benchmarks/results/losses.json``.
Targets (issue 6): sparse peak extra <= 1.5x the logits, sparse time <= dense time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_inputs(rows: int, vocab: int, k: int, seed: int = 0, dense: bool = False):
    import torch

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 2.0
    ids = torch.empty(rows, k, dtype=torch.long)
    probs = torch.empty(rows, k)
    tail = torch.empty(rows)
    target = torch.empty(rows, vocab) if dense else None
    step = 64
    for s in range(0, rows, step):  # teacher built in chunks: no extra [rows, V] buffer
        e = min(rows, s + step)
        p = torch.softmax(torch.randn(e - s, vocab, generator=g) * 3.0, -1)
        top = p.topk(k, -1)
        ids[s:e], probs[s:e] = top.indices, top.values
        rest = p.scatter(1, top.indices, 0.0)
        tail[s:e] = rest.sum(1)  # exact mass outside the kept set
        if dense:
            spread = (tail[s:e] / (vocab - k))[:, None].expand(-1, vocab).clone()
            target[s:e] = spread.scatter_(1, top.indices, top.values)
    return logits, ids, probs, tail, target


def _peak_extra_bytes(fn) -> int:
    """Peak of the allocator's running "Total Allocated" during ``fn()``, above its value at the start."""
    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory() as tmp:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        trace = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(trace)
        with open(trace) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    events.sort(key=lambda e: e["ts"])
    if not events:
        return 0
    start = events[0]["args"]["Total Allocated"] - events[0]["args"]["Bytes"]
    return int(max(e["args"]["Total Allocated"] for e in events) - start)


def worker(rows: int, vocab: int, k: int, reps: int) -> list[dict]:
    """Both methods in one process, repetitions interleaved (sparse, dense, sparse, dense, ...) so that
    a busy machine slows both alike; the profiler's allocator accounting is per call, so sharing the
    process does not mix the two memory measurements."""
    import torch
    import torch.nn.functional as F

    from labelstore.student.losses import sparse_kl

    logits, ids, probs, tail, target = make_inputs(rows, vocab, k, dense=True)
    prior = torch.rand(vocab, generator=torch.Generator().manual_seed(1)) ** 4 + 1e-3  # SYNTHETIC prior

    def sparse_step(rule="bucket"):
        z = logits.detach().requires_grad_(True)
        loss = sparse_kl(z, ids, probs, tail, tail=rule, prior=prior if rule == "prior" else None, backend="torch")
        loss.backward()
        return loss.item()

    def dense_step():
        z = logits.detach().requires_grad_(True)
        loss = F.kl_div(F.log_softmax(z, dim=-1), target, reduction="batchmean")
        loss.backward()
        return loss.item()

    steps = dict(sparse=sparse_step, dense=dense_step, sparse_uniform=lambda: sparse_step("uniform"),
                 sparse_prior=lambda: sparse_step("prior"))
    values = {name: fn() for name, fn in steps.items()}  # warm-up
    times = {name: [] for name in steps}
    for _ in range(reps):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    logits_bytes = logits.numel() * logits.element_size()
    out = []
    for name, fn in steps.items():
        peak = _peak_extra_bytes(fn)
        out.append(
            dict(
                method=name,
                vocab=vocab,
                rows=rows,
                k=k,
                loss=values[name],
                time_s=min(times[name]),
                time_median_s=statistics.median(times[name]),
                times_s=times[name],
                peak_extra_bytes=peak,
                logits_bytes=int(logits_bytes),
                peak_extra_x_logits=peak / logits_bytes,
                threads=torch.get_num_threads(),
            )
        )
    return out


def run_worker(rows, vocab, k, reps) -> list[dict]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker"]
    cmd += ["--rows", str(rows), "--vocab", str(vocab), "--k", str(k), "--reps", str(reps)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-600:]
        return [dict(method=m, vocab=vocab, rows=rows, k=k, error=f"exit {proc.returncode}: {tail}")
                for m in ("sparse", "dense", "sparse_uniform", "sparse_prior")]
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 131072])
    ap.add_argument("--rows", type=int, default=4096, help="B*T positions")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "losses.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.rows, args.vocab[0], args.k, args.reps)))
        return

    results = []
    head = ("V", "method", "best s", "median s", "peak extra MB", "x logits", "loss")
    print("{:>7} {:>14} {:>8} {:>9} {:>14} {:>9} {:>9}".format(*head))
    for vocab in args.vocab:
        pair = {}
        for r in run_worker(args.rows, vocab, args.k, args.reps):
            method = r["method"]
            results.append(r)
            pair[method] = r
            if "error" in r:
                print(f"{vocab:>7} {method:>14}  FAILED: {r['error']}")
                continue
            print(
                f"{vocab:>7} {method:>14} {r['time_s']:>8.3f} {r['time_median_s']:>9.3f} "
                f"{r['peak_extra_bytes'] / 2**20:>14.1f} "
                f"{r['peak_extra_x_logits']:>9.2f} {r['loss']:>9.4f}"
            )
        s, d = pair.get("sparse", {}), pair.get("dense", {})
        for name in ("sparse_uniform", "sparse_prior"):
            sp = pair.get(name, {})
            if "time_s" in sp and "time_s" in d:
                print(f"{'':>7} {name}/dense: time {sp['time_s'] / d['time_s']:.2f}x, peak "
                      f"{sp['peak_extra_bytes'] / max(1, d['peak_extra_bytes']):.2f}x "
                      f"({sp['peak_extra_x_logits']:.2f}x logits)")
        if "time_s" in s and "time_s" in d:
            print(
                f"{'':>7} sparse/dense: time {s['time_s'] / d['time_s']:.2f}x, "
                f"peak {s['peak_extra_bytes'] / max(1, d['peak_extra_bytes']):.2f}x; targets: "
                f"peak <= 1.5x logits {'MET' if s['peak_extra_x_logits'] <= 1.5 else 'MISSED'}, "
                f"time <= dense {'MET' if s['time_s'] <= d['time_s'] else 'MISSED'}"
            )
    meta = dict(
        rows=args.rows,
        k=args.k,
        reps=args.reps,
        python=platform.python_version(),
        machine=platform.machine(),
        cpu_count=os.cpu_count(),
        memory_method="torch.profiler profile_memory: max running 'Total Allocated' during one fwd+bwd",
        time_method="best of --reps fwd+bwd wall times after one warm-up, methods interleaved in one process",
        dense_note="dense target [rows, V] pre-built and not counted",
    )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=2)
    print(f"wrote {os.path.relpath(args.out, ROOT)}")


if __name__ == "__main__":
    main()
