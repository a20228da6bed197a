"""Random corruptions of a label store: does `verify` catch every one, and does the reader ever return
wrong numbers instead of raising a labelstore error?

    python benchmarks/corrupt_store.py [--trials 260] [--seed 0]

Kinds of damage, in equal numbers: flipped bytes in a shard, a truncated shard, a deleted shard, flipped
bytes in manifest.json, a semantic edit of manifest.json (a number nudged, a key deleted, two shards swapped,
a string changed), an edited config.json; and (issue 20) a row's sample id changed or two rows' ids swapped
inside a shard, a shard replaced by the same-named shard of another store of the same configuration, a manifest
entry removed with the totals fixed to match, an edited metadata value or tail-prior mix, a shard duplicated under
another shard's name (its entry fixed). The ``*_forged`` kinds also rewrite the sha256 and size of the edited shard
in the manifest and its commit record and recompute the manifest's digest, as a deliberate editor would.

Each trial copies a pristine store (with a tail prior), damages it, then (1) runs `verify_store` (must report a
problem: 100 % detection is the target) and (2) reads every row and the tail prior with `LabelStore`: the only
acceptable outcomes are a `LabelStoreError` or data identical to the pristine store's. Outcomes counted: detected
by verify / reader error / identical data / SILENTLY WRONG / other exception / hang (a trial, verify or reader,
that takes over 60 s). Writes benchmarks/results/corruption.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from store_factory import make_meta_v3, random_rows, write_rows  # noqa: E402

from labelstore.errors import LabelStoreError  # noqa: E402
from labelstore.store.format import with_digest  # noqa: E402
from labelstore.store.reader import LabelStore  # noqa: E402
from labelstore.store.verify import verify_store  # noqa: E402
from labelstore.store.writer import StoreWriter  # noqa: E402

KINDS = ["shard_bytes", "shard_truncate", "shard_delete", "manifest_bytes", "manifest_edit", "config_edit",
         "sample_id_edit", "sample_id_edit_forged", "store_swap", "store_swap_forged", "entry_removed",
         "meta_edit", "shard_duplicated"]
TRIAL_SECONDS = 60
VOCAB, K = 50257, 8


def build_pristine(path: Path, seed: int = 0) -> None:
    rows = random_rows(40, vocab_size=VOCAB, k=K, seed=seed, max_len=50)
    rng = np.random.default_rng(seed)
    with StoreWriter(path, make_meta_v3(VOCAB, K), shard_bytes=6000) as w:
        for j, r in enumerate(rows):
            write_rows(w, [r])
            if j % 5 == 4:
                w.add_teacher_mass(rng.random(VOCAB), 5)


def snapshot(path: Path):
    s = LabelStore(path)
    rows = [(x.sample_id, x.input_ids.numpy().copy(), x.ids.numpy().copy(), x.probs.numpy().copy(),
             x.tail.numpy().copy()) for x in s]
    prior = s.tail_prior()
    return rows + [("tail_prior", None if prior is None else prior.copy())]


def same(a, b) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x[0] != y[0] or any(not np.array_equal(p, q) for p, q in zip(x[1:], y[1:])):
            return False
    return True


class Hang(Exception):
    pass


def _alarm(*_):
    raise Hang()


def _rewrite_table(f: Path, edit) -> None:
    """Rewrite a shard's Arrow table through ``edit(pydict)`` (same schema and schema metadata)."""
    table = pa.ipc.open_file(pa.memory_map(str(f))).read_all()
    cols = edit(table.to_pydict())
    data = pa.Table.from_pydict(cols, schema=table.schema)
    with pa.OSFile(str(f), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(data)


def _forge(store: Path, man: dict, rels) -> None:
    """Make the manifest (and commit records) agree with the shards' current bytes, digest recomputed."""
    for s in man["shards"]:
        if s["path"] in rels:
            data = (store / s["path"]).read_bytes()
            s["bytes"], s["sha256"] = len(data), hashlib.sha256(data).hexdigest()
            rec_path = store / "commits" / (Path(s["path"]).stem + ".json")
            if rec_path.exists():
                rec = json.loads(rec_path.read_text())
                rec.update({k: s[k] for k in s})
                rec_path.write_text(json.dumps(rec))
    _fix_totals(man)
    (store / "manifest.json").write_text(json.dumps(with_digest(man)))


def _fix_totals(man: dict) -> None:
    man["totals"] = {"shards": len(man["shards"]), "samples": sum(s["rows"] for s in man["shards"]),
                     **{k: sum(s[k] for s in man["shards"]) for k in ("tokens", "entries", "bytes")}}


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
    rec = rng.choice([s for s in man["shards"] if s["rows"] >= 2])
    if kind.startswith("sample_id_edit"):
        swap = rng.random() < 0.5
        i, j = rng.sample(range(rec["rows"]), 2)
        delta = rng.choice([1, -1, 7, 1000, 10**9])

        def edit(cols):
            ids = cols["sample_id"]
            if swap:
                ids[i], ids[j] = ids[j], ids[i]
            else:
                ids[i] += delta
            return cols
        _rewrite_table(store / rec["path"], edit)
        if kind.endswith("forged"):
            _forge(store, man, {rec["path"]})
        return f"{'swapped ids of rows' if swap else f'id of row {i} += {delta} in'} {rec['path']}" + (
            f" {i}, {j}" if swap else "")
    if kind.startswith("store_swap"):
        twin = store.parent / "twin"
        rec = rng.choice([s for s in man["shards"] if (twin / s["path"]).exists()])
        shutil.copy(twin / rec["path"], store / rec["path"])
        if kind.endswith("forged"):  # the entry copied from the twin's manifest
            twin_rec = {s["path"]: s for s in json.loads((twin / "manifest.json").read_text())["shards"]}
            if rec["path"] in twin_rec:
                rec.update(twin_rec[rec["path"]])
            _forge(store, man, {rec["path"]})
        return f"{rec['path']} replaced by the twin store's"
    if kind == "entry_removed":
        man["shards"].remove(rec)
        _fix_totals(man)
        (store / "manifest.json").write_text(json.dumps(man))
        return f"entry {rec['path']} removed, totals fixed"
    if kind == "meta_edit":
        choice = rng.choice(["mix", "temperature", "step", "tail_prior_mix"])
        if choice == "mix":
            man["tail_prior"]["mix"] = rng.choice([0.5, 0.811, 1.0])
        elif choice == "temperature":
            man["meta"]["temperature"] = 2.0
        elif choice == "step":
            man["meta"]["value_codec"]["params"]["step"] = 0.125
        else:
            man["meta"]["tail_prior_mix"] = man["tail_prior"]["mix"] = 0.5
        (store / "manifest.json").write_text(json.dumps(man))
        return f"manifest metadata edit: {choice}"
    if kind == "shard_duplicated":
        other = rng.choice([s for s in man["shards"] if s is not rec])
        shutil.copy(store / rec["path"], store / other["path"])
        other.update({k: rec[k] for k in ("rows", "tokens", "entries", "bytes", "sha256", "first_sample_id",
                                          "last_sample_id")})
        man["shards"].sort(key=lambda s: s["first_sample_id"])
        _fix_totals(man)
        (store / "manifest.json").write_text(json.dumps(man))
        return f"{rec['path']} copied over {other['path']}, entry fixed"
    raise ValueError(kind)


def _guarded(fn, *args):
    """``fn(*args)`` under a deadline: ("ok", value), ("error", exc) for labelstore errors, ("crash", exc),
    ("hang", None)."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TRIAL_SECONDS)
    try:
        return ("ok", fn(*args))
    except Hang:
        return ("hang", None)
    except LabelStoreError as exc:
        return ("error", exc)
    except Exception as exc:  # noqa: BLE001 - counted as a failure
        return ("crash", exc)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_trials(trials: int, seed: int = 0, workdir: Path | None = None, kinds=None) -> dict:
    kinds = list(kinds or KINDS)
    rng = random.Random(seed)
    work = Path(workdir or tempfile.mkdtemp(prefix="corrupt-"))
    pristine = work / "pristine"
    build_pristine(pristine, seed)
    build_pristine(work / "twin", seed + 100)  # same configuration, other rows, its own store id
    ref = snapshot(pristine)
    results = []
    for t in range(trials):
        kind = kinds[t % len(kinds)]
        store = work / f"t{t}"
        shutil.copytree(pristine, store)
        desc = corrupt(store, kind, rng)
        status, rep = _guarded(verify_store, store)
        if status == "ok":
            verify = "detected" if not rep["ok"] else "passed"
        else:  # verify reports damage as problems: any exception out of it is a failure
            verify = "HANG" if status == "hang" else "CRASH"
        status, got = _guarded(snapshot, store)
        if status == "ok":
            reader = "identical" if same(got, ref) else "SILENTLY WRONG"
        elif status == "error":
            reader = f"error: {type(got).__name__}"
        elif status == "hang":
            reader = "HANG"
        else:
            reader = f"CRASH: {type(got).__name__}: {got}"
        results.append({"trial": t, "kind": kind, "damage": desc, "verify": verify,
                        "verify_detected": verify == "detected", "reader": reader})
        shutil.rmtree(store)
    shutil.rmtree(work, ignore_errors=True)
    return {
        "trials": trials,
        "verify_detected": sum(r["verify_detected"] for r in results),
        "reader_silently_wrong": sum(r["reader"] == "SILENTLY WRONG" for r in results),
        "other_exceptions": sum(r["reader"].startswith("CRASH") or r["verify"] == "CRASH" for r in results),
        "hangs": sum(r["reader"] == "HANG" or r["verify"] == "HANG" for r in results),
        "reader_outcomes": dict(Counter(r["reader"].split(":")[0] for r in results)),
        "results": results,
    }


def failures(rep: dict) -> list[dict]:
    return [r for r in rep["results"] if not r["verify_detected"] or r["reader"].startswith(("CRASH", "SILENTLY"))
            or r["reader"] == "HANG"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=260)
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
        d["other"] += r["reader"].startswith("CRASH") or r["verify"] == "CRASH"
        d["hang"] += r["reader"] == "HANG" or r["verify"] == "HANG"
    print(f"{'kind':<22} {'trials':>6} {'verify caught':>13} {'reader error':>12} {'identical':>9} "
          f"{'SILENTLY WRONG':>14} {'other exc.':>10} {'hang':>5}")
    for k, d in by_kind.items():
        print(f"{k:<22} {d['trials']:6d} {d['verify']:13d} {d['error']:12d} {d['identical']:9d} "
              f"{d['SILENTLY WRONG']:14d} {d['other']:10d} {d['hang']:5d}")
    print(f"verify detected {rep['verify_detected']}/{rep['trials']}; reader silently wrong "
          f"{rep['reader_silently_wrong']}, other exceptions {rep['other_exceptions']}, hangs {rep['hangs']}")
    for r in failures(rep):
        print("  FAIL", r)
    rep["by_kind"] = {k: dict(d) for k, d in by_kind.items()}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(rep, f, indent=1)
    print(f"wrote {a.out}")
    return 1 if failures(rep) else 0


if __name__ == "__main__":
    sys.exit(main())
