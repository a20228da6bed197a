"""How opening a store scales with its shard count (issue 13): format version 3 (the shard list inside
manifest.json) against version 4 (index.arrow, read lazily), the resume of a store with many commit records, and
the projection for a 5T-token store.

    python benchmarks/bench_scale.py [--sizes 1000,10000,100000,1000000] [--resume 100000]

How the stores are synthesised: one folder per shard count N holds N shard files ``shards/rRRRRR-SSSSSS.arrow``
(empty sparse files of the declared size, ``os.truncate``: no data written, 10 ranks x N/10 sequence numbers),
one config, and both shard tables built from the same N synthetic entries (random sha256, 1000 rows and 2 MB per
shard, consecutive sample ids): ``manifest.json`` version 3 (written by the writer's own ``atomic_write_json``,
as ``finalize_store`` writes it) and, in a sibling folder sharing the shards, a version-4 ``manifest.json`` +
``index.arrow`` (``build_manifest``). No row is ever read: what is measured is what opening costs.

Each measurement runs in a fresh Python process (after importing labelstore.store.reader, i.e. torch): the wall
time of ``LabelStore(path)``, then (version 4) of locating one random row's shard (one index block read and
hashed), and the peak RSS of the open: the process's peak (``VmHWM``) is reset after the imports (``echo 5 >
/proc/self/clear_refs``), so the figure is the peak during open + lookup minus the RSS before it (``ru_maxrss``,
which includes importing torch, is recorded too).
Resume: N commit records (JSON, one sample range each) in ``commits/``, timed as a writer decides what is left
(``list_commits`` + merging the ranges, what ``StoreWriter.committed_ranges`` does).
Results: a table on stdout and ``benchmarks/results/scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from labelstore.store.format import normalize_meta  # noqa: E402
from labelstore.store.index import write_index_columns  # noqa: E402
from labelstore.store.manifest import (  # noqa: E402
    CONFIG,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    atomic_write_json,
    commit_name,
    config_with_digest,
    shard_name,
    write_manifest,
)

ROWS, BYTES, TOKENS, ENTRIES = 1000, 2_000_000, 1000 * 2048, 1000 * 2048 * 32
RANKS = 10
BYTES_PER_TOKEN = (61, 95)  # README "Store throughput and size": zstd 61, packed 91-99 B/token at k = 32
SHARD_BYTES = 256 << 20  # the writer's default shard size
TOKENS_5T = 5 * 10**12


def meta(version: int) -> dict:
    return normalize_meta({"vocab_size": 32000, "label_kind": "soft", "selection": {"mode": "topk", "k": 32},
                           "value_codec": {"name": "log8"}, "temperature": 1.0, "teacher": "synthetic",
                           "tokenizer": "synthetic", "format_version": version, "store_id": "0" * 32})


def synth_columns(n: int) -> dict:
    rng = np.random.default_rng(n)
    per = -(-n // RANKS)
    s = np.arange(n)
    rows = np.full(n, ROWS, np.int64)
    return {"rank": (s // per).astype(np.int32), "seq": (s % per).astype(np.int32), "rows": rows,
            "tokens": np.full(n, TOKENS, np.int64), "entries": np.full(n, ENTRIES, np.int64),
            "bytes": np.full(n, BYTES, np.int64), "sha256": rng.integers(0, 256, 32 * n, dtype=np.uint8),
            "first_sample_id": s * ROWS, "last_sample_id": s * ROWS + ROWS - 1, "row_start": s * ROWS}


def totals(n: int) -> dict:
    return {"shards": n, "samples": n * ROWS, "tokens": n * TOKENS, "entries": n * ENTRIES, "bytes": n * BYTES}


def synthesise(base: Path, n: int) -> tuple[Path, Path]:
    """``base/v3`` and ``base/v4`` (the latter's shards/ a link-free copy of the same names: hard links)."""
    cols = synth_columns(n)
    v3, v4 = base / "v3", base / "v4"
    for d in (v3, v4):
        (d / "shards").mkdir(parents=True)
    for i in range(n):
        name = shard_name(int(cols["rank"][i]), int(cols["seq"][i]))
        with open(v3 / name, "wb") as f:
            f.truncate(BYTES)
        os.link(v3 / name, v4 / name)
    m3, m4 = meta(3), meta(4)
    atomic_write_json(v3 / CONFIG, config_with_digest(m3))
    atomic_write_json(v4 / CONFIG, config_with_digest(m4))
    sha = cols["sha256"].reshape(n, 32)
    shards = [{"path": shard_name(int(cols["rank"][i]), int(cols["seq"][i])), "rank": int(cols["rank"][i]),
               "seq": int(cols["seq"][i]), "rows": ROWS, "tokens": TOKENS, "entries": ENTRIES, "bytes": BYTES,
               "sha256": sha[i].tobytes().hex(), "first_sample_id": int(cols["first_sample_id"][i]),
               "last_sample_id": int(cols["last_sample_id"][i])} for i in range(n)]
    write_manifest(v3, {"format": "labelstore", "format_version": 3, "meta": m3, "shards": shards,
                        "totals": totals(n)})
    del shards
    index, ref = write_index_columns(cols)
    write_manifest(v4, {"format": "labelstore", "format_version": 4, "meta": m4, "totals": totals(n),
                        "index": ref}, index)
    return v3, v4


OPEN_CHILD = r"""
import json, resource, sys, time
import numpy as np
from labelstore.store.reader import LabelStore
path = sys.argv[1]
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
def reset_peak():  # Linux >= 4.0: VmHWM restarts from the current RSS
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
reset = reset_peak()
before = status("VmRSS")
t0 = time.perf_counter()
try:
    s = LabelStore(path)
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:300]})); sys.exit(0)
t1 = time.perf_counter()
i = int(np.random.default_rng(0).integers(len(s)))
shard = s.shard_of(i); rec = s.shard_record(shard)
t2 = time.perf_counter()
after = status("VmHWM")
print(json.dumps({"open_s": t1 - t0, "first_lookup_s": t2 - t1, "rss_before_mib": before, "rss_peak_mib": after,
                  "rss_open_mib": after - before, "peak_reset": reset,
                  "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "samples": len(s)}))
"""

RESUME_CHILD = r"""
import json, resource, sys, time
import numpy as np
from labelstore.store.manifest import list_commits
root = sys.argv[1]
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
def reset_peak():  # Linux >= 4.0: VmHWM restarts from the current RSS
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
reset = reset_peak()
before = status("VmRSS")
t0 = time.perf_counter()
runs = sorted((a, b) for c in list_commits(root) for a, b in c["sample_ranges"])  # StoreWriter.committed_ranges
merged = []
for a, b in runs:
    if merged and a <= merged[-1][1]:
        merged[-1][1] = max(merged[-1][1], b)
    else:
        merged.append([a, b])
r = np.asarray(merged, dtype=np.int64).reshape(-1, 2)
t1 = time.perf_counter()
after = status("VmHWM")
print(json.dumps({"decide_s": t1 - t0, "runs": len(runs), "merged": len(r), "rss_before_mib": before,
                  "rss_peak_mib": after, "rss_decide_mib": after - before, "peak_reset": reset}))
"""


def child(code: str, arg: Path, repeats: int) -> dict:
    best = None
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", code, str(arg)], capture_output=True, text=True, cwd=ROOT,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True)
        got = json.loads(out.stdout.strip().splitlines()[-1])
        if best is None or "error" in got or got.get("open_s", got.get("decide_s")) < best.get(
                "open_s", best.get("decide_s")):
            best = got
        if "error" in got:
            break
    return best


def synth_commits(root: Path, n: int) -> None:
    (root / "commits").mkdir(parents=True)
    rng = np.random.default_rng(1)
    per = -(-n // RANKS)
    for i in range(n):
        rank, seq = i // per, i % per
        rec = {"path": shard_name(rank, seq), "rank": rank, "seq": seq, "rows": ROWS, "tokens": TOKENS,
               "entries": ENTRIES, "bytes": BYTES, "sha256": rng.bytes(32).hex(), "first_sample_id": i * ROWS,
               "last_sample_id": i * ROWS + ROWS - 1, "sample_ranges": [[i * ROWS, i * ROWS + ROWS]]}
        (root / commit_name(rank, seq)).write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")


def project(rows: list[dict]) -> list[dict]:
    """The 5T-token store at the README's bytes per token, from the largest measured size (index bytes per shard,
    manifest bytes per index block) and the slowest measured version-4 open + first lookup (flat in N)."""
    big, small = max(rows, key=lambda r: r["shards"]), min(rows, key=lambda r: r["shards"])
    per_shard_index = big["v4_index_bytes"] / big["shards"]
    nblocks = lambda n: -(-n // (1 << 14))  # noqa: E731
    per_block = ((big["v4_manifest_bytes"] - small["v4_manifest_bytes"])
                 / max(1, nblocks(big["shards"]) - nblocks(small["shards"])))
    v4_open = max(r["v4"]["open_s"] + r["v4"]["first_lookup_s"] for r in rows if "open_s" in r["v4"])
    v3 = [r for r in rows if "open_s" in r["v3"]]
    v3_big = max(v3, key=lambda r: r["shards"]) if v3 else None
    out = []
    for bpt in BYTES_PER_TOKEN:
        shards = -(-TOKENS_5T * bpt // SHARD_BYTES)
        v3_bytes = shards * big["v3_manifest_bytes"] / big["shards"]
        out.append({
            "bytes_per_token": bpt, "store_tb": TOKENS_5T * bpt / 1e12, "shards": shards,
            "v4_index_bytes": int(shards * per_shard_index),
            "v4_manifest_bytes": int(small["v4_manifest_bytes"] + per_block * (nblocks(shards) - 1)),
            "v4_open_plus_first_lookup_s_measured_max": v4_open,
            "v3_manifest_bytes": int(v3_bytes), "v3_over_manifest_cap": v3_bytes > MAX_MANIFEST_BYTES,
            "v3_open_s_linear_extrapolation": (v3_big["v3"]["open_s"] * shards / v3_big["shards"]) if v3_big else None,
            "v3_rss_mib_linear_extrapolation": (v3_big["v3"]["rss_open_mib"] * shards / v3_big["shards"])
            if v3_big else None,
        })
    return out


def report(out: dict) -> None:
    rows, resume = out["open"], out["resume"]
    print("\n| shards | v3 manifest MB | v3 open s | v3 RSS MiB | v4 manifest KB | v4 index MB | v4 open ms | "
          "v4 1st lookup ms | v4 RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        a, b = r["v3"], r["v4"]
        v3 = (f"{a['open_s']:.3f} | {a['rss_open_mib']:.0f}" if "open_s" in a else "refused (over the 256 MiB cap) | -")
        print(f"| {r['shards']:,} | {r['v3_manifest_bytes'] / 1e6:.1f} | {v3} | {r['v4_manifest_bytes'] / 1e3:.1f} | "
              f"{r['v4_index_bytes'] / 1e6:.1f} | {b['open_s'] * 1e3:.1f} | {b['first_lookup_s'] * 1e3:.1f} | "
              f"{b['rss_open_mib']:.0f} |")
    if resume:
        print(f"\nresume: {resume['commit_records']:,} commit records -> {resume['merged']:,} committed runs in "
              f"{resume['decide_s']:.1f} s, +{resume['rss_decide_mib']:.0f} MiB RSS")
    for p in out["projection_5T"]:
        print(f"5T tokens at {p['bytes_per_token']} B/token: {p['store_tb']:.0f} TB, {p['shards']:,} shards of "
              f"256 MiB; v4 index {p['v4_index_bytes'] / 1e6:.0f} MB + manifest {p['v4_manifest_bytes'] / 1e3:.0f} KB, "
              f"open + first lookup <= {p['v4_open_plus_first_lookup_s_measured_max'] * 1e3:.0f} ms (measured, flat); "
              f"v3 manifest {p['v3_manifest_bytes'] / 1e6:.0f} MB"
              f"{' (over the 256 MiB cap: refused)' if p['v3_over_manifest_cap'] else ''}, whose parse would take "
              f"~{p['v3_open_s_linear_extrapolation']:.0f} s and ~{p['v3_rss_mib_linear_extrapolation']:.0f} MiB "
              "per process (linear from the largest v3 measured)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,10000,100000,1000000")
    ap.add_argument("--resume", type=int, default=100000, help="commit records for the resume measurement (0: skip)")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per measurement (the fastest kept)")
    ap.add_argument("--tmp", default=None, help="folder for the synthetic stores (default: the system's)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale.json"))
    ap.add_argument("--report", default=None, help="recompute the projection of a scale.json and print it")
    args = ap.parse_args()
    if args.report:
        out = json.loads(Path(args.report).read_text())
        out["projection_5T"] = project(out["open"])
        Path(args.report).write_text(json.dumps(out, indent=1) + "\n")
        report(out)
        return
    sizes = [int(x) for x in args.sizes.split(",")]
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=args.tmp))
    try:
        for n in sizes:
            base = tmp / f"n{n}"
            t0 = time.perf_counter()
            v3, v4 = synthesise(base, n)
            synth_s = time.perf_counter() - t0
            rec = {"shards": n, "synth_s": round(synth_s, 1), "v3_manifest_bytes": (v3 / MANIFEST).stat().st_size,
                   "v4_manifest_bytes": (v4 / MANIFEST).stat().st_size,
                   "v4_index_bytes": (v4 / "index.arrow").stat().st_size}
            rep = 1 if n >= 10**6 else args.repeats
            rec["v3"] = child(OPEN_CHILD, v3, rep)
            rec["v4"] = child(OPEN_CHILD, v4, args.repeats)
            rows.append(rec)
            print(json.dumps(rec), flush=True)
            shutil.rmtree(base)
        resume = None
        if args.resume:
            base = tmp / "resume"
            synth_commits(base, args.resume)
            resume = {"commit_records": args.resume, **child(RESUME_CHILD, base, min(args.repeats, 2))}
            print(json.dumps(resume), flush=True)
            shutil.rmtree(base)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    projection = project(rows)
    out = {"bench": "scale", "host": platform.node(), "python": platform.python_version(),
           "loadavg": os.getloadavg(), "shard_bytes": SHARD_BYTES, "open": rows, "resume": resume,
           "projection_5T": projection}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    report(out)

if __name__ == "__main__":
    main()
