#!/usr/bin/env bash
# GPU check of the extraction kernels (issue 3), < 5 minutes on one H200.
#
#   bash benchmarks/gpu_check.sh            # on a CUDA machine, from anywhere
#   bash benchmarks/gpu_check.sh --smoke    # tiny shapes; on CPU it runs the kernel in TRITON_INTERPRET=1
#
# 1. Parity at realistic shapes (8192 bf16 rows, V in {32000, 131072, 262144}, k in {32, 64, 128}): Triton
#    kernel vs the torch twin on the same GPU (ids and counts exact, tail / lse / value codes within the
#    tolerances of tests/gpu_kernels/test_extract.py), and both vs a float64 dense reference on 16 rows; other codecs at
#    one shape; a NaN row must raise naming the row.
# 2. Timing (CUDA events via triton.testing.do_bench, median): the kernel alone, the public call (plus its
#    bad-row check), the twin, and the naive log_softmax -> topk -> encode; GB/s of logits read against
#    the H200's 4.8 TB/s and against a measured device copy.
# 3. A small tile / warp sweep at V = 131072, k = 64.
# 4. The fused LM-head kernel: benchmarks/gpu_check_fused.py (see the end of this script).
# Results: benchmarks/results/gpu_extract.json (and $OUT/gpu_extract.json when $OUT is set). Exit status 1
# if a parity check failed. Stages past a 250 s budget are skipped and marked so.
set -euo pipefail
cd "$(dirname "$0")/.."

# The interpreter: $PYTHON, else the first of .venv/bin/python and python3 whose torch sees a GPU, else the
# first that has torch at all (for --smoke on CPU).
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for want in "torch.cuda.is_available()" "True"; do
    for cand in .venv/bin/python python3; do
      if command -v "$cand" >/dev/null && "$cand" -c "import sys, torch; sys.exit(not ($want))" 2>/dev/null; then
        PY=$cand
        break 2
      fi
    done
  done
fi
[ -n "$PY" ] || { echo "no python with torch found (set PYTHON=...)" >&2; exit 2; }
echo "python: $PY"
# labelstore need not be installed there: import it from this checkout (the folder kernels/ is the
# package labelstore_kernels).
SHIM=$(mktemp -d)
trap 'rm -rf "$SHIM"' EXIT
ln -s "$PWD/kernels" "$SHIM/labelstore_kernels"
export PYTHONPATH="$PWD:$SHIM${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>/dev/null || true

rc=0
"$PY" - "$@" <<'PYEOF' || rc=$?
import json
import os
import platform
import sys
import time

import torch

SMOKE = "--smoke" in sys.argv
T0 = time.time()
BUDGET_S = 250.0
HBM_BYTES_PER_S = 4.8e12  # H200 datasheet
DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu":
    if not SMOKE:
        sys.exit("no CUDA device; use --smoke to check this script on CPU (Triton interpreter)")
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import triton  # noqa: E402

from labelstore.codecs import get_codec  # noqa: E402
from labelstore_kernels import extract_topk_torch  # noqa: E402
from labelstore_kernels.extract_triton import extract_topk_triton  # noqa: E402

N, VS, KS = (8192, [32000, 131072, 262144], [32, 64, 128]) if not SMOKE else (7, [1000, 3000], [3, 8])
SWEEP = [(1024, 4), (2048, 4), (2048, 8), (4096, 8)] if not SMOKE else [(256, 4), (512, 4)]
NEG = float("-inf")
failures = []


def left() -> float:
    return BUDGET_S - (time.time() - T0)


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def bench_ms(fn, rep_ms=60):
    if DEV == "cuda":
        return float(triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median"))
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def make_logits(n, V, seed):
    """Teacher-like bf16 logits, plus the hard rows of tests/gpu_kernels/test_extract.py in rows 0..5."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.empty(n, V, dtype=torch.bfloat16, device=DEV)
    for s in range(0, n, 1024):
        e = min(n, s + 1024)
        z = torch.randn(e - s, V, generator=g, device=DEV) * 2.0
        z[:, :64] += 6.0 * torch.rand(e - s, 64, generator=g, device=DEV)
        x[s:e] = z
    x[0] = 1.25  # all equal
    x[1, torch.rand(V, generator=g, device=DEV) < 0.5] = NEG  # masked vocabulary
    x[2] = torch.linspace(-8, 8, V, device=DEV)  # ascending
    x[3, 5:] = NEG  # fewer finite entries than k
    x[4] = torch.randint(0, 4, (V,), generator=g, device=DEV).to(torch.bfloat16)  # heavy ties
    x[5] = torch.linspace(0, -8, V, device=DEV)
    x[5, V // 3 : V // 3 + V // 12] += 20  # a burst of large logits in a few neighbouring ids
    return x


def reference(x, k):
    xd = x.double()
    lse = torch.logsumexp(xd, -1)
    ids = torch.sort(xd, dim=-1, descending=True, stable=True).indices[:, :k]
    p = torch.exp(xd - lse[:, None])
    kept = torch.zeros_like(p, dtype=torch.bool).scatter_(1, ids, True)
    return ids, torch.where(kept, 0.0, p).sum(-1), lse


def ordinal(values, codec):
    if codec == "fp16":
        return values.contiguous().view(torch.int16).int() & 0xFFFF
    return values.int()


def compare(a, b, codec):
    """Triton vs twin: the numbers the tolerances are about."""
    rel_tail = ((a.tail.double() - b.tail.double()).abs() / b.tail.double().clamp_min(1e-30)).max().item()
    d = {
        "ids_rows_differing": int((a.ids != b.ids).any(1).sum()),
        "counts_equal": bool(torch.equal(a.counts, b.counts)),
        "tail_max_rel_diff": rel_tail,
        "lse_max_abs_diff": (a.lse - b.lse).abs().max().item(),
    }
    if a.values.numel():
        od = (ordinal(a.values, codec) - ordinal(b.values, codec)).abs()
        d["codes_max_ordinal_diff"] = int(od.max())
        d["codes_fraction_equal"] = float((od == 0).float().mean())
    d["ok"] = (
        d["ids_rows_differing"] == 0
        and d["counts_equal"]
        and rel_tail <= 1e-4
        and d["lse_max_abs_diff"] <= 1e-4
        and d.get("codes_max_ordinal_diff", 0) <= 1
    )
    return d


def check_reference(out, x, k, rows):
    ids, tail, lse = reference(x[rows], k)
    return {
        "rows": len(rows),
        "ids_exact": bool(torch.equal(out.ids[rows].long(), ids)),
        "tail_max_rel_err": ((out.tail[rows].double() - tail).abs() / tail.clamp_min(1e-30)).max().item(),
        "lse_max_abs_err": (out.lse[rows].double() - lse).abs().max().item(),
    }


def naive(x, k):
    lp = torch.log_softmax(x.float(), dim=-1)
    vals, ids = lp.topk(k, dim=-1)
    return ids.to(torch.int32), get_codec("log8").encode(vals - vals[:, :1])


def peak_extra_mb(fn):
    if DEV != "cuda":
        return None
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


info = {
    "device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke, Triton interpreter)",
    "sm_count": torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" else None,
    "torch": torch.__version__,
    "triton": triton.__version__,
    "python": platform.python_version(),
    "hbm_bytes_per_s_assumed": HBM_BYTES_PER_S,
    "rows": N,
    "dtype": "bfloat16",
}
results, sweep, extra = [], [], {}
print(json.dumps(info))

for V in VS:
    if left() < 0:
        results.append({"V": V, "skipped": "time budget"})
        continue
    x = make_logits(N, V, seed=V)
    nbytes = x.numel() * x.element_size()
    if DEV == "cuda" and "copy_bytes_per_s" not in extra:
        y = torch.empty_like(x)
        ms = bench_ms(lambda: y.copy_(x))
        extra["copy_bytes_per_s"] = 2 * nbytes / (ms * 1e-3)  # bytes read + written
        extra["copy_shape"] = [N, V]
        del y
    ref_rows = torch.cat([torch.arange(6), torch.randperm(N - 6, device="cpu")[:10] + 6]).tolist()
    for k in KS:
        if left() < 0:
            results.append({"V": V, "k": k, "skipped": "time budget"})
            continue
        t1 = time.time()
        got = extract_topk_triton(x, k)  # first call compiles
        compile_s = time.time() - t1
        want = extract_topk_torch(x, k)
        sync()
        r = {"V": V, "k": k, "first_call_s": round(compile_s, 2)}
        r["parity_vs_twin"] = compare(got, want, "log8")
        r["kernel_vs_float64"] = check_reference(got, x, k, ref_rows)
        r["twin_vs_float64"] = check_reference(want, x, k, ref_rows)
        ok_ref = all(
            c["ids_exact"] and c["tail_max_rel_err"] <= 1e-4 and c["lse_max_abs_err"] <= 1e-4
            for c in (r["kernel_vs_float64"], r["twin_vs_float64"])
        )
        if not (r["parity_vs_twin"]["ok"] and ok_ref):
            failures.append(f"parity V={V} k={k}")
        del got, want
        ms = {
            "triton_kernel": bench_ms(lambda: extract_topk_triton(x, k, validate=False)),
            "triton_call": bench_ms(lambda: extract_topk_triton(x, k)),
            "twin": bench_ms(lambda: extract_topk_torch(x, k), rep_ms=200),
            "naive": bench_ms(lambda: naive(x, k), rep_ms=200),
        }
        r["ms"] = {a: round(b, 4) for a, b in ms.items()}
        r["logits_gb_per_s"] = {a: round(nbytes / (b * 1e-3) / 1e9, 1) for a, b in ms.items()}
        r["kernel_pct_of_hbm"] = round(100 * nbytes / (ms["triton_kernel"] * 1e-3) / HBM_BYTES_PER_S, 1)
        if "copy_bytes_per_s" in extra:
            r["kernel_pct_of_measured_copy"] = round(
                100 * nbytes / (ms["triton_kernel"] * 1e-3) / extra["copy_bytes_per_s"], 1
            )
        r["speedup_call_vs_naive"] = round(ms["naive"] / ms["triton_call"], 2)
        r["speedup_call_vs_twin"] = round(ms["twin"] / ms["triton_call"], 2)
        r["peak_extra_mb"] = {
            "triton": peak_extra_mb(lambda: extract_topk_triton(x, k)),
            "twin": peak_extra_mb(lambda: extract_topk_torch(x, k)),
            "naive": peak_extra_mb(lambda: naive(x, k)),
        }
        results.append(r)
        print(json.dumps(r), flush=True)

    if V == VS[len(VS) // 2] and left() > 30:
        # other codecs at one shape, on the first 1024 rows
        xs = x[:1024]
        extra["codecs"] = {}
        for codec in ("e4m3", "e5m2", "fp16", "none"):
            c = compare(extract_topk_triton(xs, 64, codec=codec), extract_topk_torch(xs, 64, codec=codec), codec)
            extra["codecs"][codec] = c
            if not c["ok"]:
                failures.append(f"codec {codec}")
        # temperature != 1
        c = compare(extract_topk_triton(xs, 64, temperature=0.7), extract_topk_torch(xs, 64, temperature=0.7), "log8")
        extra["temperature_0.7"] = c
        if not c["ok"]:
            failures.append("temperature 0.7")
        # a NaN row must raise naming it
        bad = xs[:64].clone()
        bad_row = min(37, bad.shape[0] - 1)
        bad[bad_row, 5] = float("nan")
        try:
            extract_topk_triton(bad, 8)
            extra["nan_row"] = "did not raise"
            failures.append("nan row")
        except Exception as e:  # InvalidLogitsError expected
            rows = getattr(e, "rows", None)
            extra["nan_row"] = {"type": type(e).__name__, "rows": rows}
            if rows != [bad_row]:
                failures.append("nan row")
        # tile / warp sweep
        k = 64 if not SMOKE else 8
        for bv, w in SWEEP:
            if left() < 10:
                sweep.append({"block_v": bv, "num_warps": w, "skipped": "time budget"})
                continue
            extract_topk_triton(x, k, block_v=bv, num_warps=w)  # compile
            ms = bench_ms(lambda bv=bv, w=w: extract_topk_triton(x, k, block_v=bv, num_warps=w, validate=False))
            sweep.append(
                {"V": V, "k": k, "block_v": bv, "num_warps": w, "ms": round(ms, 4),
                 "logits_gb_per_s": round(nbytes / (ms * 1e-3) / 1e9, 1),
                 "pct_of_hbm": round(100 * nbytes / (ms * 1e-3) / HBM_BYTES_PER_S, 1)}
            )
            print(json.dumps(sweep[-1]), flush=True)
    del x
    if DEV == "cuda":
        torch.cuda.empty_cache()

summary = {**info, **extra, "results": results, "sweep": sweep, "failures": failures,
           "elapsed_s": round(time.time() - T0, 1)}
print()
print(f"{'V':>7} {'k':>4} {'kernel GB/s':>11} {'% HBM':>6} {'call ms':>8} {'twin ms':>8} {'naive ms':>9} "
      f"{'x naive':>7} {'x twin':>6} parity")
for r in results:
    if "ms" in r:
        print(f"{r['V']:>7} {r['k']:>4} {r['logits_gb_per_s']['triton_kernel']:>11} {r['kernel_pct_of_hbm']:>6} "
              f"{r['ms']['triton_call']:>8.3f} {r['ms']['twin']:>8.3f} {r['ms']['naive']:>9.3f} "
              f"{r['speedup_call_vs_naive']:>7} {r['speedup_call_vs_twin']:>6} {r['parity_vs_twin']['ok']}")
    else:
        print(f"{r['V']:>7} {r.get('k', '-'):>4} skipped ({r['skipped']})")
print("failures:", failures or "none", f"({summary['elapsed_s']} s)")
text = json.dumps(summary, indent=2) + "\n"
name = "gpu_extract_smoke.json" if SMOKE else "gpu_extract.json"
folder = "/tmp" if SMOKE else "benchmarks/results"  # a smoke run leaves the results folder alone
os.makedirs(folder, exist_ok=True)
with open(os.path.join(folder, name), "w") as f:
    f.write(text)
print("wrote", os.path.join(folder, name))
if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], name), "w") as f:
        f.write(text)
sys.exit(1 if failures else 0)
PYEOF
# 4. The fused LM-head extraction (issue 14): parity of the fused Triton kernel with its twin, and its time
#    against the materialised and row-block paths (benchmarks/gpu_check_fused.py, results gpu_fused.json).
"$PY" benchmarks/gpu_check_fused.py "$@" || rc=1
exit $rc
