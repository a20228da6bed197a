"""Hostile stores and hostile store directories: does labelstore ever hang, allocate without bound, return
wrong data, or write or delete outside the store?

    python benchmarks/hostile_store.py [--timeout 60]

Each case builds a small store (SYNTHETIC rows from tests/store_factory.py), makes it hostile, then runs the
action in a forked child process with a deadline and an address-space limit (its start + 4 GiB):

* read cases: ``LabelStore`` (every row and the tail prior), a ``StoreLoader`` epoch, ``info`` and ``verify``;
  outcome: reader error / identical data / SILENTLY WRONG / other exception / hang, and whether verify detected it;
* write cases: a resume (``StoreWriter`` over an unfinished store, the remaining rows, close and finalize);
  outcome: refused with a labelstore error / completed, and whether every file outside the store is intact
  (a write or delete outside it counts as SILENTLY WRONG).

Peak extra memory is the child's peak RSS minus its RSS when the action started. Writes
benchmarks/results/hostile.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import resource
import shutil
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from store_factory import make_meta_v3, random_rows, write_rows  # noqa: E402

from labelstore.errors import LabelStoreError  # noqa: E402
from labelstore.store.format import with_digest  # noqa: E402
from labelstore.store.writer import StoreWriter  # noqa: E402

V, K = 1000, 4
ROWS = random_rows(12, vocab_size=V, k=K, seed=0, max_len=12)
USER_FILES = ("r00000-notes.txt", "r00000-999999.arrow", ".tmp-r00000-backup.arrow", "precious.txt")
GiB = 1 << 30
COMPRESSED_DOC_STARTS = 256 << 20  # bytes of zeros in the compressed v1 case (the test suite uses less)


# ------------------------------------------------------------------------------------------ building blocks
def build(p: Path, rows=ROWS, meta=None, finish=True, **kw) -> None:
    w = StoreWriter(p, meta or make_meta_v3(V, K), shard_bytes=600, **kw)
    write_rows(w, rows if finish else rows[:6])
    w.add_teacher_mass(np.ones(V), 3)
    w.close() if finish else w.abort()


def man(p: Path) -> dict:
    return json.loads((p / "manifest.json").read_text())


def put_man(p: Path, m: dict) -> None:
    (p / "manifest.json").write_text(json.dumps(with_digest(m)))


def rewrite(p: Path, rel: str, edit, compression=None) -> None:
    """Rewrite a shard through ``edit(pydict)``; its manifest entry's size and sha256 are fixed to match."""
    f = p / rel
    table = pa.ipc.open_file(pa.memory_map(str(f))).read_all()
    cols = edit(table.to_pydict())
    opts = pa.ipc.IpcWriteOptions(compression=compression) if compression else None
    with pa.OSFile(str(f), "wb") as sink, pa.ipc.new_file(sink, table.schema, options=opts) as w:
        w.write_table(pa.Table.from_pydict(cols, schema=table.schema))
    m, data = man(p), f.read_bytes()
    for s in m["shards"]:
        if s["path"] == rel:
            m["totals"]["bytes"] += len(data) - s["bytes"]
            s["bytes"], s["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    put_man(p, m) if "digest" in m else (p / "manifest.json").write_text(json.dumps(m))


def crc_v3(cols, r) -> int:
    c = zlib.crc32(int(cols["sample_id"][r]).to_bytes(8, "little", signed=True)
                   + int(cols["num_tokens"][r]).to_bytes(4, "little", signed=True))
    for col in ("input_ids", "counts", "ids", "values", "tail", "doc_starts"):
        c = zlib.crc32(cols[col][r], c)
    return c


def first_shard(p: Path) -> str:
    return man(p)["shards"][0]["path"]


# ------------------------------------------------------------------------------------------ read cases
def _replace(p: Path, rel: str, make) -> None:
    (p / rel).unlink()
    make(p / rel)


def huge_T(p, encoding):
    build(p, rows=random_rows(3, vocab_size=V, k=32, seed=2, max_len=8),
          meta=make_meta_v3(V, 32, encoding={"name": encoding}))

    def edit(cols):
        cols["num_tokens"][0] = 1 << 24
        cols["crc32"][0] = crc_v3(cols, 0)  # a valid CRC: only the decode budget stands in the way
        return cols
    rewrite(p, first_shard(p), edit)


def zstd_k4096_zero_counts(p):
    """A store a writer can really produce: k = 4096, 65536 positions keeping nothing (3.2 GB padded)."""
    T = 1 << 16
    meta = make_meta_v3(V, 4096, encoding={"name": "zstd"})
    with StoreWriter(p, meta) as w:
        w.add(1, np.zeros(T, np.int64), np.zeros(T, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint8),
              np.zeros(T, np.float32))


def v1_compressed_doc_starts(p):
    shutil.copytree(Path(ROOT) / "tests" / "data" / "store_v1", p)

    def edit(cols):
        cols["doc_starts"][0] = bytes(COMPRESSED_DOC_STARTS)  # zeros: a few hundred KB once zstd-compressed
        return cols
    rewrite(p, first_shard(p), edit, compression="zstd")


def absurd_rows(p, entries, nbytes=None):
    build(p)
    m = man(p)
    s0 = m["shards"][0]
    extra = [dict(s0, rows=1 << 31, bytes=nbytes or s0["bytes"]) for _ in range(entries)]
    m["shards"] = extra
    m["totals"] = {"shards": len(extra), "samples": sum(s["rows"] for s in extra), "tokens": s0["tokens"] * entries,
                   "entries": s0["entries"] * entries, "bytes": sum(s["bytes"] for s in extra)}
    m["shards"] = [dict(s, path=f"shards/r00000-{i:06d}.arrow", seq=i, first_sample_id=i, last_sample_id=i)
                   for i, s in enumerate(extra)]
    put_man(p, m)


def odd_path(p, suffix_or_path):
    build(p)
    m = man(p)
    s0 = m["shards"][0]
    shutil.copy(p / s0["path"], p / suffix_or_path)
    s0["path"] = suffix_or_path
    put_man(p, m)


READ_CASES = {
    "manifest is a FIFO": lambda p: (build(p), _replace(p, "manifest.json", os.mkfifo)),
    "manifest is a directory": lambda p: (build(p), _replace(p, "manifest.json", os.mkdir)),
    "config.json is a FIFO": lambda p: (build(p), _replace(p, "config.json", os.mkfifo)),
    "shard is a FIFO": lambda p: (build(p), _replace(p, first_shard(p), os.mkfifo)),
    "shard is a directory": lambda p: (build(p), _replace(p, first_shard(p), os.mkdir)),
    "shard is a link to /dev/zero": lambda p: (build(p), _replace(p, first_shard(p),
                                                                 lambda f: os.symlink("/dev/zero", f))),
    "tail prior is a FIFO": lambda p: (build(p), _replace(p, "tail_prior.f32", os.mkfifo)),
    "shards/ is a link outside": lambda p: (build(p), shutil.move(p / "shards", p.parent / "elsewhere"),
                                            os.symlink(p.parent / "elsewhere", p / "shards")),
    "shard path with a trailing newline": lambda p: odd_path(p, "shards/r00000-000000.arrow\n"),
    "shard path with Unicode digits": lambda p: odd_path(p, "shards/r\u0660\u0660\u0660\u0660\u0660-"
                                                            "\u0660\u0660\u0660\u0660\u0660\u0660.arrow"),
    "row declares T = 2^24, k = 32 (packed)": lambda p: huge_T(p, "packed"),
    "row declares T = 2^24, k = 32 (zstd)": lambda p: huge_T(p, "zstd"),
    "zstd row k = 4096, T = 65536, zero counts": zstd_k4096_zero_counts,
    "v1 shard with Arrow body compression (huge doc_starts)": v1_compressed_doc_starts,
    "manifest declares 2^31 rows in one small shard": lambda p: absurd_rows(p, 1),
    "manifest declares 2^31 rows, 1 TB, one shard": lambda p: absurd_rows(p, 1, 1 << 40),
    "manifest declares 100k shards of 2^31 rows": lambda p: absurd_rows(p, 100_000, 1 << 40),
}


def read_action(p: Path, ref) -> dict:
    from labelstore.store.info import summary
    from labelstore.store.reader import LabelStore
    from labelstore.store.verify import verify_store
    from labelstore.student.dataset import StoreDataset
    from labelstore.student.loader import StoreLoader

    out = {}
    try:
        s = LabelStore(p)
        got = [(x.sample_id, x.ids.tolist(), x.probs.tolist()) for x in s]
        prior = s.tail_prior()
        got.append(None if prior is None else prior.tolist())
        out["reader"] = "identical" if ref is not None and got == ref else "SILENTLY WRONG"
    except LabelStoreError as exc:
        out["reader"], out["message"] = "reader error", str(exc)[:300]
    except Exception as exc:  # noqa: BLE001 - counted
        out["reader"], out["message"] = "other exception", f"{type(exc).__name__}: {exc}"[:300]
    for name, fn in (("loader", lambda: [b for b in StoreLoader(StoreDataset(p), batch_size=4)]),
                     ("info", lambda: summary(p))):
        try:
            fn()
            out[name] = "ok"
        except LabelStoreError:
            out[name] = "error"
        except Exception as exc:  # noqa: BLE001 - counted
            out[name] = f"other exception: {type(exc).__name__}: {exc}"[:200]
    try:
        out["verify"] = "passed" if verify_store(p)["ok"] else "detected"
    except Exception as exc:  # noqa: BLE001 - verify never raises for damage
        out["verify"] = f"other exception: {type(exc).__name__}: {exc}"[:200]
    return out


# ------------------------------------------------------------------------------------------ write cases
def _link(p: Path, rel: str, target: Path) -> None:
    d = p / rel
    if d.is_dir() and not d.is_symlink():
        for f in d.iterdir():  # keep the store's own files: the link replaces the folder
            shutil.move(f, target / f.name) if not (target / f.name).exists() else None
        d.rmdir()
    elif d.exists():
        d.unlink()
    os.symlink(target, d)


def commit_range(p: Path, outside: Path) -> None:
    build(p, finish=False)
    rec_path = sorted((p / "commits").glob("r00000-*.json"))[0]
    rec = json.loads(rec_path.read_text())
    rec["sample_ranges"] = [[0, 10**12]]
    rec_path.write_text(json.dumps(rec))


WRITE_CASES = {
    "lock file is a link to a file outside": lambda p, o: (build(p, finish=False),
                                                          _link(p, "locks/r00000.lock", o / "precious.txt")),
    "shards/ is a link to a folder outside (user files there)": lambda p, o: (build(p, finish=False),
                                                                              _link(p, "shards", o)),
    "commits/ is a link to a folder outside": lambda p, o: (build(p, finish=False), _link(p, "commits", o)),
    "config.json is a link to a file outside": lambda p, o: (build(p, finish=False),
                                                            _link(p, "config.json", o / "precious.txt")),
    "manifest.json is a link to a file outside (finalize)": lambda p, o: (build(p, finish=False),
                                                                         _link(p, "manifest.json",
                                                                               o / "precious.txt")),
    "commit record claims 10^12 sample ids": commit_range,
    "user files inside shards/ (not links)": lambda p, o: (build(p, finish=False),
                                                          [(p / "shards" / n).write_text("user data")
                                                           for n in USER_FILES[:3]]),
}


def write_action(p: Path, outside: Path) -> dict:
    before = {f.name: f.read_bytes() for f in outside.iterdir()}
    own_before = {n: (p / "shards" / n).read_bytes() for n in USER_FILES[:3] if (p / "shards" / n).is_file()}
    out = {}
    try:
        with StoreWriter(p, make_meta_v3(V, K), shard_bytes=600) as w:
            todo = ~w.committed_mask([r["sample_id"] for r in ROWS])
            write_rows(w, [r for r, t in zip(ROWS, todo) if t])
        out["writer"] = "completed"
    except LabelStoreError as exc:
        out["writer"], out["message"] = "refused", str(exc)[:300]
    except Exception as exc:  # noqa: BLE001 - counted
        out["writer"], out["message"] = "other exception", f"{type(exc).__name__}: {exc}"[:300]
    after = {f.name: f.read_bytes() for f in outside.iterdir()}
    intact = after == before and all((p / "shards" / n).read_bytes() == b for n, b in own_before.items()
                                     if (p / "shards" / n).is_file())
    intact = intact and all((p / "shards" / n).is_file() for n in own_before)
    out["outside_intact"] = intact
    return out


# ------------------------------------------------------------------------------------------ harness
def _child(kind: str, name: str, work: str, q) -> None:
    work = Path(work)
    try:
        outside = work / "outside"
        outside.mkdir()
        for n in USER_FILES:
            (outside / n).write_text("user data")
        p = work / "store"
        ref = None
        if kind == "read":
            pristine = work / "pristine"
            build(pristine)
            from labelstore.store.reader import LabelStore

            s = LabelStore(pristine)
            ref = [(x.sample_id, x.ids.tolist(), x.probs.tolist()) for x in s] + [s.tail_prior().tolist()]
            READ_CASES[name](p)
        else:
            WRITE_CASES[name](p, outside)
        rss0 = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        vms = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (vms + 4 * GiB, resource.RLIM_INFINITY))
        out = read_action(p, ref) if kind == "read" else write_action(p, outside)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out["peak_extra_mb"] = round(max(0, peak - rss0) / 2**20, 1)
        q.put(out)
    except BaseException as exc:  # noqa: BLE001 - a setup failure is reported, not hidden
        q.put({"setup_error": f"{type(exc).__name__}: {exc}"[:300]})


def run_case(kind: str, name: str, timeout: float) -> dict:
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="hostile-") as work:
        proc = ctx.Process(target=_child, args=(kind, name, work, q))
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            return {"case": name, "kind": kind, "outcome": "HANG"}
        res = q.get() if not q.empty() else {"setup_error": f"child died with exit code {proc.exitcode}"}
    res.update(case=name, kind=kind)
    res["outcome"] = classify(res)
    return res


def classify(r: dict) -> str:
    if "setup_error" in r:
        return "other exception"
    if r["kind"] == "write":
        if not r["outside_intact"]:
            return "SILENTLY WRONG"
        return {"refused": "writer refused", "completed": "completed, outside intact"}.get(r["writer"],
                                                                                            "other exception")
    if any(str(r.get(k, "")).startswith("other exception") for k in ("reader", "loader", "info", "verify")):
        return "other exception"
    return r["reader"]


def run_all(timeout: float = 60, names=None) -> dict:
    cases = [("read", n) for n in READ_CASES] + [("write", n) for n in WRITE_CASES]
    results = [run_case(k, n, timeout) for k, n in cases if names is None or n in names]
    counts = {}
    for r in results:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    return {"cases": len(results), "outcomes": counts,
            "silently_wrong": counts.get("SILENTLY WRONG", 0), "other_exceptions": counts.get("other exception", 0),
            "hangs": counts.get("HANG", 0),
            "verify_detected": sum(r.get("verify") == "detected" for r in results if r["kind"] == "read"),
            "max_peak_extra_mb": max((r.get("peak_extra_mb", 0) for r in results), default=0), "results": results}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "hostile.json"))
    a = ap.parse_args()
    rep = run_all(a.timeout)
    print(f"{'case':<58} {'outcome':<26} {'verify':<9} {'loader':<7} {'peak MB':>8}")
    for r in rep["results"]:
        print(f"{r['case']:<58} {r['outcome']:<26} {str(r.get('verify', '-')):<9} {str(r.get('loader', '-'))[:7]:<7} "
              f"{r.get('peak_extra_mb', float('nan')):8.1f}")
    print(f"{rep['cases']} cases: {rep['outcomes']}; silently wrong {rep['silently_wrong']}, other exceptions "
          f"{rep['other_exceptions']}, hangs {rep['hangs']}; peak extra memory {rep['max_peak_extra_mb']} MB")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(rep, f, indent=1)
    print(f"wrote {a.out}")
    return 1 if rep["silently_wrong"] or rep["other_exceptions"] or rep["hangs"] else 0


if __name__ == "__main__":
    sys.exit(main())
