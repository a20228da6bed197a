"""Object storage against a local disk, side by side: writing a store, and a loader reading it.

    python benchmarks/bench_remote.py [--samples 48] [--repeats 3] [--delays 0,20]

The S3 endpoint is moto's S3 server (tests/s3_server.py) in a separate process on this machine, so it has **no
real network**: every byte crosses the loopback interface and is held in the server's memory, and the server
competes with the client for this machine's 2 cores. To imitate a cloud region, each request is also delayed by
``--delays`` milliseconds inside the server (one sleeping thread per request, so concurrent requests overlap as
against a real region); one server process per delay. Bandwidth is not limited; real figures depend on it.

Content (synthetic, clearly so, as in bench_loader.py): ``--samples`` sequences of T = 2048 tokens, V = 32000,
k = 32 entries per position with a Zipf-like decay, log8 values, 8 MiB shards (about 0.6 MB per sequence).

* **write**: the same rows through ``StoreWriter`` to a local folder and through ``RemoteStoreWriter`` to the
  bucket (shards spooled locally, uploaded by two background threads, verified, committed), until the store is
  finalized. Tokens per second of wall clock, and the producer's time blocked in ``add``/``commit`` (what a
  teacher would wait), both to the finalized store. The teacher itself is not run: this isolates the store.
* **read**: ``StoreLoader`` (B = 8, shuffled, 0 workers) over the whole store, from the local folder (page cache
  warm), from the bucket with a **cold** cache (an empty cache folder: every shard downloaded during the epoch,
  prefetched in the order the epoch reads them) and **warm** (the same cache again). Same batches, same repeats.
  Tokens per second of the epoch's iteration; opening the store (for a URL: fetching the manifest) is timed
  apart, as ``open_s``: it happens once per process, not per batch. **fetch only** is the ceiling of a cold
  read on this machine: the same shard objects downloaded by 4 threads and discarded (no hashing, no decoding).
  **store order** rows read without shuffling (what a shard-block shuffle would do), each against the local
  loader in the same order: a uniformly shuffled epoch needs nearly every shard within its first batches, so its
  cold epoch waits for downloads; a sequential one overlaps them with decoding. **shard shuffle** rows use
  ``StoreLoader(shuffle="shards")`` (groups of 4 shards in a seeded order, rows shuffled within a group).

Writes ``benchmarks/results/remote.json`` and prints a table. Ratios are remote / local in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from bench_loader import K, T, V, synth  # noqa: E402

from labelstore.codecs import get_codec  # noqa: E402
from labelstore.store.locations import open_store_writer  # noqa: E402

SHARD_BYTES = 8 << 20
PREFETCH = 4  # the loader's default; --prefetch


SERVER = """
import sys, time
sys.path.insert(0, {tests!r})
from s3_server import S3Server
s = S3Server(delay_s={delay}).start()
print(s.endpoint, flush=True)
while True:
    time.sleep(3600)
"""


class ServerProcess:
    """moto's S3 server in its own process (it must not share the client's interpreter lock)."""

    def __init__(self, delay_ms: int):
        self.delay_ms = delay_ms
        code = SERVER.format(tests=str(ROOT / "tests"), delay=delay_ms / 1000)
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        self.endpoint = self.proc.stdout.readline().strip()
        self.options = {"endpoint_url": self.endpoint, "key": "bench-key", "secret": "bench-secret"}
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True, **self.options).mkdir("bench")

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def meta():
    return {"vocab_size": V, "label_kind": "soft", "selection": {"mode": "topk", "k": K},
            "value_codec": get_codec("log8").to_json(), "temperature": 1.0,
            "teacher": {"name": "synthetic", "hash": "0" * 16}, "tokenizer": {"name": "synthetic", "hash": "0" * 16}}


def write_once(out: str, rows, options=None) -> dict:
    blocked = 0.0
    t0 = time.perf_counter()
    kw = {"storage_options": options} if options else {}
    w = open_store_writer(out, meta(), shard_bytes=SHARD_BYTES, **kw)
    for i, x, ids, _probs, tail, codes in rows:
        a = time.perf_counter()
        w.add(i, x, np.full(T, K), ids, codes, tail)
        blocked += time.perf_counter() - a
    a = time.perf_counter()
    w.close()
    closing = time.perf_counter() - a
    wall = time.perf_counter() - t0
    tokens = len(rows) * T
    return {"wall_s": wall, "tokens_per_s": tokens / wall, "blocked_s": blocked, "close_s": closing}


def bench_write(servers, rows, repeats, tmp: Path) -> list[dict]:
    out = []
    for target in ["local"] + [f"s3+{d}ms" for d in servers]:
        runs = []
        for r in range(repeats):
            if target == "local":
                dest = str(tmp / f"w-local-{r}")
                runs.append(write_once(dest, rows))
                shutil.rmtree(dest)
            else:
                server = servers[int(target[3:-2])]
                runs.append(write_once(f"s3://bench/w-{r}", rows, server.options))
        med = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
        out.append({"target": target, **med, "runs": runs})
    base = out[0]["tokens_per_s"]
    for o in out:
        o["ratio_vs_local"] = o["tokens_per_s"] / base
    return out


def loader_epoch(path, cache_dir=None, options=None, shuffle=True) -> tuple[float, int, float]:
    """(seconds of the epoch's iteration, tokens, seconds to open the store)."""
    from labelstore.student.dataset import StoreDataset
    from labelstore.student.loader import StoreLoader

    kw = {} if cache_dir is None else {"cache_dir": str(cache_dir), "storage_options": options,
                                       "prefetch": PREFETCH}
    t0 = time.perf_counter()
    ds = StoreDataset(path, **kw)
    opened = time.perf_counter() - t0
    loader = StoreLoader(ds, batch_size=8, seed=0, rank=0, world_size=1, num_workers=0, shuffle=shuffle)
    t0 = time.perf_counter()
    tokens = 0
    for batch in loader:
        tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel())
    return time.perf_counter() - t0, tokens, opened


def fetch_only(server, tokens: int) -> tuple[float, int, float]:
    """Download every shard object of the read store with 4 threads (the loader's prefetch width), discarding the
    bytes: what the server and the client's HTTP stack alone allow."""
    from concurrent.futures import ThreadPoolExecutor

    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **server.options)
    keys = fs.find("bench/r-store/shards")
    t0 = time.perf_counter()
    with ThreadPoolExecutor(PREFETCH) as pool:
        list(pool.map(fs.cat_file, keys))
    return time.perf_counter() - t0, tokens, 0.0


def bench_read(servers, rows, repeats, tmp: Path) -> list[dict]:
    local = tmp / "r-local"
    w = open_store_writer(str(local), meta(), shard_bytes=SHARD_BYTES)
    for i, x, ids, _probs, tail, codes in rows:
        w.add(i, x, np.full(T, K), ids, codes, tail)
    w.close()
    url = "s3://bench/r-store"
    import s3fs

    for server in servers.values():
        s3fs.S3FileSystem(skip_instance_cache=True, **server.options).put(str(local) + "/", "bench/r-store",
                                                                          recursive=True)
    loader_epoch(local)  # page cache warm, imports done
    out = []
    results = {"local": [], "local, store order": [], "local, shard shuffle": []}
    for d in servers:
        results[f"s3+{d}ms cold"] = []
        results[f"s3+{d}ms warm"] = []
        results[f"s3+{d}ms cold, store order"] = []
        results[f"s3+{d}ms cold, shard shuffle"] = []
    for r in range(repeats):
        results["local"].append(loader_epoch(local))
        results["local, store order"].append(loader_epoch(local, shuffle=False))
        results["local, shard shuffle"].append(loader_epoch(local, shuffle="shards"))
        for d, server in servers.items():
            cache = tmp / f"cache-{d}-{r}"
            results[f"s3+{d}ms cold"].append(loader_epoch(url, cache, server.options))
            results[f"s3+{d}ms warm"].append(loader_epoch(url, cache, server.options))
            shutil.rmtree(cache, ignore_errors=True)
            results[f"s3+{d}ms cold, store order"].append(loader_epoch(url, cache, server.options, shuffle=False))
            shutil.rmtree(cache, ignore_errors=True)
            results[f"s3+{d}ms cold, shard shuffle"].append(loader_epoch(url, cache, server.options,
                                                                         shuffle="shards"))
            shutil.rmtree(cache, ignore_errors=True)
    for d, server in servers.items():  # the ceiling: the same objects fetched by 4 threads, nothing else done
        results[f"s3+{d}ms fetch only"] = [fetch_only(server, len(rows) * T) for _ in range(repeats)]
    for name, runs in results.items():
        secs = statistics.median(s for s, _, _ in runs)
        out.append({"source": name, "seconds": secs, "tokens": runs[0][1], "tokens_per_s": runs[0][1] / secs,
                    "open_s": statistics.median(o for _, _, o in runs), "runs_s": [s for s, _, _ in runs]})
    for o in out:  # each against the local loader reading in the same order
        base = out[1 if "store order" in o["source"] else 2 if "shard shuffle" in o["source"] else 0]["tokens_per_s"]
        o["ratio_vs_local"] = o["tokens_per_s"] / base
    return out


def main(argv=None) -> int:
    global PREFETCH
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--delays", default="0,20", help="per-request delays in ms, comma-separated")
    ap.add_argument("--skip-read", action="store_true")
    ap.add_argument("--skip-write", action="store_true")
    ap.add_argument("--prefetch", type=int, default=PREFETCH, help="shards the loader downloads ahead")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "remote.json"))
    args = ap.parse_args(argv)
    delays = [int(x) for x in args.delays.split(",") if x.strip()]
    PREFETCH = args.prefetch
    servers = {d: ServerProcess(d) for d in delays}
    rows = list(synth(args.samples))
    try:
        with tempfile.TemporaryDirectory(prefix="bench-remote-") as tmp:
            os.environ["LABELSTORE_SPOOL_DIR"] = str(Path(tmp) / "spool")
            write = [] if args.skip_write else bench_write(servers, rows, args.repeats, Path(tmp))
            read = [] if args.skip_read else bench_read(servers, rows, args.repeats, Path(tmp))
    finally:
        for server in servers.values():
            server.stop()
    print(f"\nSYNTHETIC rows: {args.samples} x {T} tokens, V={V}, k={K}; moto S3 server on localhost "
          f"(no real network; delays are injected per request); median of {args.repeats}")
    print(f"{'write to':<14} {'tokens/s':>10} {'vs local':>9} {'blocked s':>10} {'close s':>8}")
    for o in write:
        print(f"{o['target']:<14} {o['tokens_per_s']:>10,.0f} {o['ratio_vs_local']:>8.2f}x "
              f"{o['blocked_s']:>10.2f} {o['close_s']:>8.2f}")
    if read:
        print(f"\n{'loader from':<16} {'tokens/s':>10} {'vs local':>9} {'open s':>7}")
        for o in read:
            print(f"{o['source']:<16} {o['tokens_per_s']:>10,.0f} {o['ratio_vs_local']:>8.2f}x {o['open_s']:>7.3f}")
    res = {"synthetic": True, "samples": args.samples, "T": T, "V": V, "k": K, "shard_bytes": SHARD_BYTES,
           "repeats": args.repeats, "delays_ms": delays, "prefetch": args.prefetch,
           "endpoint": "moto S3 server, separate process, same machine (no network)",
           "write": write, "read": read, "machine": platform.node(), "cpus": os.cpu_count(),
           "load_avg": os.getloadavg()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
