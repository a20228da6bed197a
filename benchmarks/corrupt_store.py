"""Random corruptions of a label store: does `verify` catch every one, and does the reader ever return
wrong numbers instead of raising a labelstore error?

    python benchmarks/corrupt_store.py [--trials 240] [--seed 0]

Kinds of damage, in equal numbers: flipped bytes in a shard, a truncated shard, a deleted shard, flipped
bytes in manifest.json, a semantic edit of manifest.json (a number nudged, a key deleted, two shards swapped,
a string changed), an edited config.json. Each trial copies a pristine store, damages it, then
(1) runs `verify_store` (must report a problem: 100 % detection is the target) and (2) reads every row with
`LabelStore`: the only acceptable outcomes are a `LabelStoreError` or rows identical to the pristine ones.
Any other exception type, or different numbers, is a failure. Writes benchmarks/results/corruption.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from store_factory import make_meta, random_rows, write_rows  # noqa: E402

from labelstore.errors import LabelStoreError  # noqa: E402
from labelstore.store.reader import LabelStore  # noqa: E402
from labelstore.store.verify import verify_store  # noqa: E402
from labelstore.store.writer import StoreWriter  # noqa: E402

KINDS = ["shard_bytes", "shard_truncate", "shard_delete", "manifest_bytes", "manifest_edit", "config_edit"]


def build_pristine(path: Path, seed: int = 0) -> None:
    rows = random_rows(40, vocab_size=50257, k=8, seed=seed, max_len=50)
    with StoreWriter(path, make_meta(50257, 8), shard_bytes=6000) as w:
        write_rows(w, rows)


def snapshot(path: Path):
    s = LabelStore(path)
    return [(x.sample_id, x.input_ids.numpy().copy(), x.ids.numpy().copy(), x.probs.numpy().copy(),
             x.tail.numpy().copy()) for x in s]


def same(a, b) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x[0] != y[0] or any(not np.array_equal(p, q) for p, q in zip(x[1:], y[1:])):
            return False
    return True


def _nudge(obj, rng):
    """Change one random leaf of a JSON object; returns a description."""
    paths = []

    def walk(o, p):
        if isinstance(o, dict):
            for k, v in o.items():
                walk(v, p + [k])
        elif isinstance(o, list):
            for i, v in enumerate(o):
                walk(v, p + [i])
        else:
            paths.append(p)

    walk(obj, [])
    p = rng.choice(paths)
    parent = obj
    for key in p[:-1]:
        parent = parent[key]
    leaf = parent[p[-1]]
    op = rng.choice(["change", "delete"]) if isinstance(parent, dict) else "change"
    if op == "delete":
        del parent[p[-1]]
    elif isinstance(leaf, bool):
        parent[p[-1]] = not leaf
    elif isinstance(leaf, int):
        parent[p[-1]] = leaf + rng.choice([-1, 1, 7, -1000, 10**12])
    elif isinstance(leaf, float):
        parent[p[-1]] = leaf * 1.5 + 0.1
    elif isinstance(leaf, str):
        parent[p[-1]] = leaf[:-1] + ("0" if not leaf.endswith("0") else "1") if leaf else "x"
    else:
        parent[p[-1]] = 1
    return f"{op} {'/'.join(map(str, p))}"


def corrupt(store: Path, kind: str, rng: random.Random) -> str:
    man = json.loads((store / "manifest.json").read_text())
    shard = store / rng.choice(man["shards"])["path"]
    if kind == "shard_bytes":
        data = bytearray(shard.read_bytes())
        n = rng.randint(1, 4)
        for _ in range(n):
            i = rng.randrange(len(data))
            data[i] ^= rng.randrange(1, 256)
        shard.write_bytes(bytes(data))
        return f"flipped {n} byte(s) of {shard.name}"
    if kind == "shard_truncate":
        data = shard.read_bytes()
        cut = rng.randrange(0, len(data))
        shard.write_bytes(data[:cut])
        return f"truncated {shard.name} to {cut} bytes"
    if kind == "shard_delete":
        shard.unlink()
        return f"deleted {shard.name}"
    if kind == "manifest_bytes":
        p = store / "manifest.json"
        data = bytearray(p.read_bytes())
        i = rng.randrange(len(data))
        data[i] = rng.choice(b"0123456789abcdef{}[]\",:x ")
        if bytes(data) == p.read_bytes():
            data[i] = ord("~")
        p.write_bytes(bytes(data))
        return f"manifest byte {i} changed"
    if kind == "manifest_edit":
        if rng.random() < 0.2 and len(man["shards"]) > 1:
            i, j = rng.sample(range(len(man["shards"])), 2)
            man["shards"][i], man["shards"][j] = man["shards"][j], man["shards"][i]
            desc = f"swapped shards {i} and {j}"
        else:
            desc = _nudge(man, rng)
        (store / "manifest.json").write_text(json.dumps(man))
        return desc
    if kind == "config_edit":
        cfg = json.loads((store / "config.json").read_text())
        desc = _nudge(cfg, rng)
        (store / "config.json").write_text(json.dumps(cfg))
        return "config: " + desc
    raise ValueError(kind)


def run_trials(trials: int, seed: int = 0, workdir: Path | None = None) -> dict:
    rng = random.Random(seed)
    work = Path(workdir or tempfile.mkdtemp(prefix="corrupt-"))
    pristine = work / "pristine"
    build_pristine(pristine, seed)
    ref = snapshot(pristine)
    results = []
    for t in range(trials):
        kind = KINDS[t % len(KINDS)]
        store = work / f"t{t}"
        shutil.copytree(pristine, store)
        desc = corrupt(store, kind, rng)
        rep = verify_store(store)
        try:
            got = snapshot(store)
            reader = "identical" if same(got, ref) else "WRONG NUMBERS"
        except LabelStoreError as exc:
            reader = f"error: {type(exc).__name__}"
        except Exception as exc:  # noqa: BLE001 - counted as a failure
            reader = f"CRASH: {type(exc).__name__}: {exc}"
        results.append({"trial": t, "kind": kind, "damage": desc, "verify_detected": not rep["ok"],
                        "reader": reader})
        shutil.rmtree(store)
    shutil.rmtree(work, ignore_errors=True)
    return {
        "trials": trials,
        "verify_detected": sum(r["verify_detected"] for r in results),
        "reader_wrong_numbers": sum(r["reader"] == "WRONG NUMBERS" for r in results),
        "reader_crashes": sum(r["reader"].startswith("CRASH") for r in results),
        "reader_outcomes": dict(Counter(r["reader"].split(":")[0] for r in results)),
        "results": results,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=240)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "corruption.json"))
    a = ap.parse_args()
    rep = run_trials(a.trials, a.seed)
    by_kind = {}
    for r in rep["results"]:
        d = by_kind.setdefault(r["kind"], Counter())
        d["trials"] += 1
        d["verify"] += r["verify_detected"]
        d[r["reader"].split(":")[0]] += 1
    print(f"{'kind':<16} {'trials':>6} {'verify caught':>13} {'reader error':>12} {'reader identical':>16} "
          f"{'WRONG':>6} {'CRASH':>6}")
    for k, d in by_kind.items():
        print(f"{k:<16} {d['trials']:6d} {d['verify']:13d} {d['error']:12d} {d['identical']:16d} "
              f"{d['WRONG NUMBERS']:6d} {d['CRASH']:6d}")
    print(f"verify detected {rep['verify_detected']}/{rep['trials']}; reader wrong numbers "
          f"{rep['reader_wrong_numbers']}, crashes {rep['reader_crashes']}")
    for r in rep["results"]:
        if not r["verify_detected"] or r["reader"].startswith(("CRASH", "WRONG")):
            print("  FAIL", r)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(rep, f, indent=1)
    print(f"wrote {a.out}")
    return 0 if rep["verify_detected"] == rep["trials"] and not rep["reader_wrong_numbers"] \
        and not rep["reader_crashes"] else 1


if __name__ == "__main__":
    sys.exit(main())
