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

Resume, ``--plan units`` (``resume_units``): N commit records of 10 ranks as the units writer writes them (each
with its rank's ``units`` progress entry; 5 shards of 1000 sequences per unit, so N/5 units), timed as a rank
decides what is left: :func:`labelstore.teacher.units.read_progress` (the newest record of each rank), the
identity check of every committed unit (:meth:`CommittedUnits.check_identities`, on identities given in memory:
the ``stat`` of each input is not timed) and the status of every unit of rank 0's block. Synthetic records.

Planning (``plan``): a synthetic corpus (generated text: words drawn from a 5,000-word made-up vocabulary, 64
JSONL files of 1,000-word documents, labelled synthetic in the results) of at least ``--plan-tokens`` tokens, a
byte-level BPE tokenizer trained on it (8,192 ids). Each measurement is a fresh process: ``--plan global`` (what
every rank does, whatever the world size: the whole corpus into a scratch file), and ``--plan units`` as rank 0 of
1 and as each rank of 4 (its block of units, one at a time, in memory). Per rank: tokens and documents
tokenized, tokenizer calls, CPU and wall seconds, bytes written (``/proc/self/io`` ``write_bytes``, and the
scratch file's size) and the peak RSS above the RSS before planning.
Results: a table on stdout and ``benchmarks/results/scale.json`` (``--sections`` runs some sections and keeps the
others' results from the file).
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


# what every child script starts with: its memory figures from /proc (MiB)
MEASURE = r"""
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
"""


OPEN_CHILD = MEASURE + r"""
import json, resource, sys, time
import numpy as np
from labelstore.store.reader import LabelStore
path = sys.argv[1]
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

RESUME_CHILD = MEASURE + r"""
import json, resource, sys, time
import numpy as np
from labelstore.store.manifest import list_commits
root = sys.argv[1]
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


def child(code: str, arg: Path, repeats: int, *extra: str) -> dict:
    best = None
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", code, str(arg), *extra], capture_output=True, text=True, cwd=ROOT,
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


# ------------------------------------------------------------------------------------------ resume, --plan units
UNIT_SHARDS, UNIT_ROWS = 5, 1000  # shards per unit, sequences per shard


def unit_identity(u: int) -> str:
    import hashlib

    return hashlib.sha256(f"synthetic unit {u}".encode()).hexdigest()


def synth_unit_commits(root: Path, n: int) -> int:
    """``n`` commit records of 10 ranks, each carrying its rank's ``units`` progress as the writer writes it
    (:class:`labelstore.teacher.units.UnitTracker`'s record); returns the number of units."""
    from labelstore.teacher.units import SEQ_BITS, ZERO, _xor

    (root / "commits").mkdir(parents=True)
    rng = np.random.default_rng(2)
    units = n // UNIT_SHARDS
    per_rank = units // RANKS
    for rank in range(RANKS):
        done, ident, seq = [], ZERO, 0
        for u in range(rank * per_rank, (rank + 1) * per_rank):
            sha = rng.bytes(32).hex()
            for j in range(UNIT_SHARDS):
                a = (u << SEQ_BITS) + j * UNIT_ROWS
                completed = []
                if j == UNIT_SHARDS - 1:
                    if done and done[-1][1] == u:
                        done[-1][1] += 1
                        done[-1][2] += UNIT_SHARDS * UNIT_ROWS
                    else:
                        done.append([u, u + 1, UNIT_SHARDS * UNIT_ROWS])
                    ident = _xor(ident, unit_identity(u))
                    completed = [[u, unit_identity(u)]]
                    partial = []
                else:
                    partial = [[u, sha, unit_identity(u), [[0, (j + 1) * UNIT_ROWS]]]]
                rec = {"path": shard_name(rank, seq), "rank": rank, "seq": seq, "rows": UNIT_ROWS, "tokens": TOKENS,
                       "entries": ENTRIES, "bytes": BYTES, "sha256": rng.bytes(32).hex(), "first_sample_id": a,
                       "last_sample_id": a + UNIT_ROWS - 1, "sample_ranges": [[a, a + UNIT_ROWS]],
                       "units": {"done": [list(d) for d in done], "done_identity": ident, "partial": partial,
                                 "completed": completed}}
                (root / commit_name(rank, seq)).write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
                seq += 1
    return units


RESUME_UNITS_CHILD = MEASURE + r"""
import json, sys, time
from labelstore.teacher.unit_progress import CommittedUnits, read_progress
from labelstore.teacher.units import WorkUnit, rank_units
sys.path.insert(0, "benchmarks")
from bench_scale import RANKS, unit_identity
root, n_units = sys.argv[1], int(sys.argv[2])
units = [WorkUnit(u, None, f"part-{u:06d}.jsonl", unit_identity(u)) for u in range(n_units)]  # as make_units gives
reset = reset_peak()
before = status("VmRSS")
t0 = time.perf_counter()
committed = CommittedUnits(read_progress(root))
t1 = time.perf_counter()
committed.check_identities(units, root)
t2 = time.perf_counter()
block = rank_units(n_units, 0, RANKS)
left = [u for u in block if not committed.status(u).done]
t3 = time.perf_counter()
after = status("VmHWM")
print(json.dumps({"decide_s": t3 - t0, "read_progress_s": t1 - t0, "check_identities_s": t2 - t1,
                  "status_s": t3 - t2, "units_left_rank0": len(left), "block_units": len(block),
                  "rss_before_mib": before, "rss_peak_mib": after, "rss_decide_mib": after - before,
                  "peak_reset": reset}))
"""


# ------------------------------------------------------------------------------------------ planning
PLAN_FILES, PLAN_DOC_WORDS, PLAN_VOCAB_WORDS = 64, 1000, 5000


def synth_corpus(root: Path, tokens: int) -> dict:
    """Generated text (synthetic): ``PLAN_FILES`` JSONL files of ``PLAN_DOC_WORDS``-word documents, words drawn
    (Zipf-like) from made-up ones; a BPE tokenizer trained on a sample. Enough words for ``tokens`` tokens."""
    from labelstore.tools.demo_model import train_tokenizer

    rng = np.random.default_rng(3)
    syll = ["ka", "to", "ri", "men", "sul", "da", "vo", "pe", "lin", "go", "tra", "es", "nu", "bi", "or", "qua"]
    words = sorted({"".join(rng.choice(syll, rng.integers(1, 5))) for _ in range(PLAN_VOCAB_WORDS * 3)})
    words = np.asarray(words[:PLAN_VOCAB_WORDS])
    p = 1.0 / np.arange(1, len(words) + 1)
    p /= p.sum()
    sample = [" ".join(rng.choice(words, 200, p=p)) for _ in range(2000)]
    tok = train_tokenizer(sample, 8192)
    per_word = len(tok(" ".join(sample[:200]))["input_ids"]) / (200 * 200)
    n_words = int(tokens / per_word * 1.02) + 1
    docs_total = -(-n_words // PLAN_DOC_WORDS)
    docs_per_file = -(-docs_total // PLAN_FILES)
    root.mkdir(parents=True)
    tok.save_pretrained(root / "tokenizer")
    data = root / "corpus"
    data.mkdir()
    for f in range(PLAN_FILES):
        idx = rng.choice(len(words), docs_per_file * PLAN_DOC_WORDS, p=p).reshape(docs_per_file, PLAN_DOC_WORDS)
        with open(data / f"part-{f:03d}.jsonl", "w") as out:
            for row in idx:
                out.write('{"text": "' + " ".join(words[row].tolist()) + '"}\n')  # plain ASCII words: valid JSON
    return {"files": PLAN_FILES, "documents": docs_per_file * PLAN_FILES, "words": docs_per_file * PLAN_FILES *
            PLAN_DOC_WORDS, "tokens_per_word_estimate": per_word,
            "bytes": sum(f.stat().st_size for f in data.iterdir()), "synthetic": True}


PLAN_CHILD = MEASURE + r"""
import json, os, sys, tempfile, time
from transformers import AutoTokenizer
from labelstore.teacher.batching import plan_batches, rank_batches
from labelstore.teacher.inputs import InputConfig, build_plan
from labelstore.teacher.sources import expand_sources
from labelstore.teacher.unit_progress import CommittedUnits
from labelstore.teacher.units import UnitCounts, make_units, rank_units, unit_work
root, mode, rank, world, L, tpb = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
def written():
    for line in open("/proc/self/io"):
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
tok = AutoTokenizer.from_pretrained(os.path.join(root, "tokenizer"))
calls = [0]
cls = type(tok)
real_call = cls.__call__
def counting(self, *a, **k):
    calls[0] += 1
    return real_call(self, *a, **k)
cls.__call__ = counting
cfg = InputConfig(max_length=L)
V = len(tok)
reset = reset_peak()
before, w0 = status("VmRSS"), written()
t0, c0 = time.perf_counter(), time.process_time()
scratch = 0
with tempfile.TemporaryDirectory(dir=root) as work:
    sources = expand_sources([os.path.join(root, "corpus")], cfg.sources)
    if mode == "global":
        plan = build_plan(sources, tok, cfg, V, workdir=work)
        mine = rank_batches(plan_batches(plan, tpb, True), rank, world)
        scratch = os.path.getsize(os.path.join(work, "plan-tokens.bin"))
        st, seqs, units, planned = plan.stats, len(plan), None, int(sum(len(b) for b in mine))
    else:
        units = make_units(sources)
        counts = UnitCounts()
        planned = 0
        for plan, batches, masks in unit_work(units, rank_units(len(units), rank, world), CommittedUnits({}), tok,
                                              cfg, V, tpb, counts):
            planned += int(sum(len(b) for b in batches))
        st, seqs, units = counts.stats, counts.sequences, counts.tokenized_units
    t1, c1 = time.perf_counter(), time.process_time()
    w1 = written()
after = status("VmHWM")
print(json.dumps({"mode": mode, "rank": rank, "world": world, "wall_s": t1 - t0, "cpu_s": c1 - c0,
                  "tokens_tokenized": st["document_tokens"], "documents_tokenized": st["documents"],
                  "tokenizer_calls": calls[0], "sequences_planned": seqs, "sequences_of_this_rank": planned,
                  "units_tokenized": units, "write_bytes": w1 - w0, "scratch_file_bytes": scratch,
                  "rss_before_mib": before, "rss_peak_mib": after, "rss_plan_mib": after - before,
                  "peak_reset": reset}))
"""


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
    rows, resume = out.get("open") or [], out.get("resume")
    if rows:
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
        print(f"\nresume (--plan global): {resume['commit_records']:,} commit records -> {resume['merged']:,} "
              f"committed runs in {resume['decide_s']:.1f} s, +{resume['rss_decide_mib']:.0f} MiB RSS")
    ru = out.get("resume_units")
    if ru:
        print(f"resume (--plan units): {ru['commit_records']:,} commit records of {ru['ranks']} ranks, "
              f"{ru['units']:,} units -> rank 0 decides what is left of its {ru['block_units']:,} units in "
              f"{ru['decide_s'] * 1e3:.0f} ms (newest records "
              f"{ru['read_progress_s'] * 1e3:.0f} ms, identities {ru['check_identities_s'] * 1e3:.0f} "
              f"ms), +{ru['rss_decide_mib']:.0f} MiB RSS")
    plan = out.get("plan")
    if plan:
        c = plan["corpus"]
        print(f"\nplanning a synthetic corpus: {c['files']} files, {c['documents']:,} documents, "
              f"{plan['runs'][0]['tokens_tokenized']:,} tokens ({c['bytes'] / 1e9:.2f} GB of generated text)")
        print("| plan | rank/world | tokens tokenized | documents | tokenizer calls | CPU s | wall s | bytes written | "
              "scratch file | peak RSS MiB |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in plan["runs"]:
            print(f"| {r['mode']} | {r['rank']}/{r['world']} | {r['tokens_tokenized']:,} | "
                  f"{r['documents_tokenized']:,} | {r['tokenizer_calls']:,} | {r['cpu_s']:.0f} | {r['wall_s']:.0f} | "
                  f"{r['write_bytes'] / 1e6:,.0f} MB | {r['scratch_file_bytes'] / 1e6:,.0f} MB | "
                  f"{r['rss_plan_mib']:.0f} |")
    for p in out.get("projection_5T") or []:
        print(f"5T tokens at {p['bytes_per_token']} B/token: {p['store_tb']:.0f} TB, {p['shards']:,} shards of "
              f"256 MiB; v4 index {p['v4_index_bytes'] / 1e6:.0f} MB + manifest {p['v4_manifest_bytes'] / 1e3:.0f} KB, "
              f"open + first lookup <= {p['v4_open_plus_first_lookup_s_measured_max'] * 1e3:.0f} ms (measured, flat); "
              f"v3 manifest {p['v3_manifest_bytes'] / 1e6:.0f} MB"
              f"{' (over the 256 MiB cap: refused)' if p['v3_over_manifest_cap'] else ''}, whose parse would take "
              f"~{p['v3_open_s_linear_extrapolation']:.0f} s and ~{p['v3_rss_mib_linear_extrapolation']:.0f} MiB "
              "per process (linear from the largest v3 measured)")


SECTIONS = ("open", "resume", "resume_units", "plan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    ap.add_argument("--sizes", default="1000,10000,100000,1000000")
    ap.add_argument("--resume", type=int, default=100000, help="commit records for the resume measurements")
    ap.add_argument("--plan-tokens", type=int, default=200_000_000, help="tokens of the synthetic planning corpus")
    ap.add_argument("--plan-ranks", type=int, default=4)
    ap.add_argument("--plan-units-one", action="store_true", help="also plan --plan units as rank 0 of 1 (one more "
                                                                    "pass over the corpus; the global pass is the "
                                                                    "1-rank reference)")
    ap.add_argument("--plan-max-length", type=int, default=2048)
    ap.add_argument("--plan-tokens-per-batch", type=int, default=16384)
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
    sections = [x for x in args.sections.split(",") if x]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown --sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    out_path = Path(args.out)
    out = json.loads(out_path.read_text()) if out_path.exists() else {}
    out.update({"bench": "scale", "host": platform.node(), "python": platform.python_version(),
                "shard_bytes": SHARD_BYTES})
    out.setdefault("loadavg", {})
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=args.tmp))

    def save():  # after each measurement: a long run that fails keeps what it measured
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(out, indent=1) + "\n")

    try:
        if "open" in sections:
            out["loadavg"] = {**(out["loadavg"] if isinstance(out["loadavg"], dict) else {}), "open": os.getloadavg()}
            rows = []
            for n in [int(x) for x in args.sizes.split(",")]:
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
            out["open"] = rows
            out["projection_5T"] = project(rows)
            save()
        if "resume" in sections:
            base = tmp / "resume"
            synth_commits(base, args.resume)
            out["resume"] = {"commit_records": args.resume, "plan": "global",
                             **child(RESUME_CHILD, base, min(args.repeats, 2))}
            print(json.dumps(out["resume"]), flush=True)
            save()
            shutil.rmtree(base)
        if "resume_units" in sections:
            base = tmp / "resume_units"
            n_units = synth_unit_commits(base, args.resume)
            out["resume_units"] = {"commit_records": args.resume, "plan": "units", "ranks": RANKS, "units": n_units,
                                   "shards_per_unit": UNIT_SHARDS, "synthetic": True,
                                   **child(RESUME_UNITS_CHILD, base, min(args.repeats, 2), str(n_units))}
            print(json.dumps(out["resume_units"]), flush=True)
            save()
            shutil.rmtree(base)
        if "plan" in sections:
            base = tmp / "plan"
            t0 = time.perf_counter()
            corpus = synth_corpus(base, args.plan_tokens)
            corpus["synth_s"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(corpus), flush=True)
            runs = []
            settings = [str(args.plan_max_length), str(args.plan_tokens_per_batch)]
            out["plan"] = {"corpus": corpus, "max_length": args.plan_max_length,
                           "tokens_per_batch": args.plan_tokens_per_batch,
                           "note": "global: every rank of any world size tokenizes the whole corpus (measured as "
                                   f"rank 0 of {args.plan_ranks}); units: each rank its block of units",
                           "runs": runs}
            for mode, rank, world in ([("global", 0, args.plan_ranks)] + [("units", 0, 1)] * args.plan_units_one
                                      + [("units", r, args.plan_ranks) for r in range(args.plan_ranks)]):
                got = child(PLAN_CHILD, base, 1, mode, str(rank), str(world), *settings)
                runs.append({**got, "loadavg": os.getloadavg()})
                print(json.dumps(got), flush=True)
                save()
            shutil.rmtree(base)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    save()
    report(out)


if __name__ == "__main__":
    main()
