"""Selection ``adaptive`` against ``topk`` at the same mean entries per position: fidelity and bytes per token.

    python benchmarks/bench_adaptive.py [--synthetic-positions 2048] [--demo-positions 4096]

Settings: ``topk`` with ``k = M``; ``adaptive`` with mean ``M``; ``topp`` with ``min_k = 1``, at most ``4 M`` and
the largest ``p`` whose mean entries stay within ``M`` (the nucleus at the same budget).

Sources: SYNTHETIC Zipf-like logits at V = 131072 (:func:`labelstore.tools.bench.synthetic_source`) and the demo
teacher on held-out text (:func:`labelstore.tools.bench.demo_source`). Samples are consecutive blocks of 512
positions: adaptive allocates each block's budget ``floor(mean_k * 512)`` (as a compile does per sequence) with
``max_k = 4 * mean_k``. Each setting is extracted, written as a store (log8 values, encoding expgolomb) and read
back; the KL is KL(teacher || reconstruction) of the stored, quantised values under the uniform tail rule (and the
prior rule with a cross-fitted prior, docs/FORMAT.md 5c), in nats. Bytes per token are the marginal shard bytes
(a store holding every row twice minus one holding it once), as in ``labelstore bench``.

Prints a table and writes ``benchmarks/results/adaptive.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from labelstore.codecs import get_codec  # noqa: E402
from labelstore.store.reader import LabelStore  # noqa: E402
from labelstore.tools.bench import (  # noqa: E402
    bench_meta,
    crossfit_folds,
    demo_source,
    prior_kl_crossfit,
    synthetic_source,
    write_twice,
)
from labelstore.tools.fidelity import kl_to_reconstruction  # noqa: E402
from labelstore_kernels import extract, extract_topk  # noqa: E402
from labelstore_kernels.select_torch import topp_from_topk  # noqa: E402

SEQ = 512  # positions per sample: the budget group
CODEC, ENCODING = "log8", "expgolomb"


def topp_at_mean(logits: torch.Tensor, setting: dict, codec) -> tuple:
    """``topp`` (``min_k = 1``, at most ``k``) with the largest ``p`` whose mean entries stay <= ``mean_k``: the
    nucleus at the same budget as the other two (``p`` by bisection, 30 steps, on one top-``k`` extraction)."""
    top = extract_topk(logits, setting["k"], codec=codec)
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        n = topp_from_topk(logits, top, mid, 1, 1.0, codec).counts.double().mean()
        lo, hi = (mid, hi) if n <= setting["mean_k"] else (lo, mid)
    return topp_from_topk(logits, top, lo, 1, 1.0, codec), {**setting, "p": lo, "min_k": 1}


def run_setting(logits: torch.Tensor, setting: dict, work: Path, prior: bool) -> dict:
    N, V = logits.shape
    codec = get_codec(CODEC)
    t0 = time.perf_counter()
    if setting["mode"] == "topk":
        ex = extract_topk(logits, setting["k"], codec=codec)
    elif setting["mode"] == "topp":
        ex, setting = topp_at_mean(logits, setting, codec)
    else:
        groups = torch.arange(N) // SEQ
        ex = extract(logits, {"mode": "adaptive", "k": setting["k"], "mean_k": setting["mean_k"]}, codec=codec,
                     groups=groups)
    seconds = time.perf_counter() - t0
    K = ex.ids.shape[1]
    ids, vals, cnt, tail = ex.ids.numpy(), ex.values.numpy(), ex.counts.numpy().astype(np.int64), ex.tail.numpy()
    rows = []
    for a in range(0, N, SEQ):
        b = min(N, a + SEQ)
        keep = np.arange(K)[None, :] < cnt[a:b, None]
        rows.append((np.zeros(b - a, np.int64), cnt[a:b], ids[a:b][keep], vals[a:b][keep].reshape(-1), tail[a:b]))
    meta = bench_meta({**setting, "codec": CODEC, "encoding": ENCODING}, V, K, codec)
    mass = torch.softmax(logits.double(), -1).sum(0).numpy()
    sizes = write_twice(rows, meta, mass, N, work)
    s = LabelStore(work / "store1")
    back = [s[i] for i in range(len(s))]
    r_ids, r_probs, r_tail, r_counts = (torch.cat([getattr(x, f) for x in back]) for f in ("ids", "probs", "tail",
                                                                                         "counts"))
    kl = kl_to_reconstruction(logits, r_ids, r_probs, r_tail, r_counts)["kl"]
    out = {**setting, "positions": N, "vocab_size": V, "entries_per_token": float(cnt.mean()),
           "max_entries_per_sample": float(max(r[1].mean() for r in rows)),
           "kl_mean": float(kl.mean()), "kl_p99": float(np.quantile(kl, 0.99)),
           "bytes_per_token": (sizes[1] - sizes[0]) / N, "extract_seconds": seconds}
    if prior:
        folds = crossfit_folds(logits, float(s.manifest["tail_prior"]["mix"]), SEQ)
        out["kl_mean_prior"] = float(prior_kl_crossfit(logits, r_ids, r_probs, r_tail, r_counts, folds).mean())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--synthetic-positions", type=int, default=2048)
    ap.add_argument("--synthetic-vocab", type=int, default=131072)
    ap.add_argument("--demo-positions", type=int, default=4096)
    ap.add_argument("--no-demo", action="store_true")
    ap.add_argument("--no-prior", action="store_true", help="skip the prior-rule KL (halves the time)")
    ap.add_argument("--no-topp", action="store_true", help="skip topp at the same mean entries")
    ap.add_argument("--ks", default="16,32,50")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "adaptive.json"))
    args = ap.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    settings = [{"mode": "topk", "k": k} for k in ks] + [{"mode": "adaptive", "k": 4 * k, "mean_k": k} for k in ks]
    if not args.no_topp:
        settings += [{"mode": "topp", "k": 4 * k, "mean_k": k} for k in ks]
    sources = [synthetic_source(args.synthetic_vocab, args.synthetic_positions)]
    if not args.no_demo:
        sources.append(demo_source(args.demo_positions, seq_len=SEQ, log=lambda *a: print(*a, file=sys.stderr)))
    results = []
    work = Path(tempfile.mkdtemp(prefix="labelstore-adaptive-"))
    try:
        for name, logits, _ in sources:
            for st in settings:
                r = {"source": name, **run_setting(logits, st, work, prior=not args.no_prior)}
                results.append(r)
                print(f"  {name}: {st} done ({r['extract_seconds']:.1f} s extraction)", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    head = f"{'source':<22} {'mode':<9} {'mean k':>6} {'max k':>5} {'entries':>7} {'KL mean':>8} {'KL p99':>7} " \
           f"{'KL prior':>8} {'B/tok':>6}"
    print(head)
    print("-" * len(head))
    for r in results:
        mean_k = r.get("mean_k", r["k"])
        prior = f"{r['kl_mean_prior']:8.4f}" if "kl_mean_prior" in r else f"{'-':>8}"
        print(f"{r['source']:<22} {r['mode']:<9} {mean_k:>6} {r['k']:>5} {r['entries_per_token']:7.2f} "
              f"{r['kl_mean']:8.4f} {r['kl_p99']:7.3f} {prior} {r['bytes_per_token']:6.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "what": "adaptive vs topk at equal mean entries per position; samples = blocks of 512 positions; "
                f"codec {CODEC}, encoding {ENCODING}; KL(teacher || reconstruction) of the stored values, uniform "
                "tail rule (kl_mean, kl_p99) and cross-fitted prior rule (kl_mean_prior)",
        "args": vars(args), "torch": torch.__version__, "results": results}, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
