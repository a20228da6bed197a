"""`labelstore verify STORE`: check every checksum, the schema and that every row decodes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from labelstore.errors import LabelStoreError
from labelstore.store.manifest import CONFIG, MANIFEST, list_commits, load_manifest, read_json, sha256_file


def verify_store(path, *, decode_rows: bool = True, progress: bool = False) -> dict:
    """Check a store end to end. Returns ``{"ok": bool, "problems": [...], "checked": {...}}``; never raises
    for damage it can describe (a problem is a string naming the file and what is wrong)."""
    from labelstore.store.reader import LabelStore  # local: reader imports torch

    root = Path(path)
    problems: list[str] = []
    checked = {"shards": 0, "rows": 0, "bytes_hashed": 0}
    try:
        man = load_manifest(root)
    except LabelStoreError as exc:
        return {"ok": False, "problems": [str(exc)], "checked": checked}
    # Commit records, when present, must agree with the manifest.
    try:
        commits = {c["path"]: c for c in list_commits(root)}
    except LabelStoreError as exc:
        problems.append(f"commit records: {exc}")
        commits = {}
    if (root / CONFIG).exists():
        try:
            if read_json(root / CONFIG, "store config") != man["meta"]:
                problems.append(f"{MANIFEST}: metadata differs from {CONFIG} (one of them was edited)")
        except LabelStoreError as exc:
            problems.append(str(exc))
    shards = man["shards"]
    it = range(len(shards))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="verify", unit="shard")
    tot = {"samples": 0, "tokens": 0, "entries": 0, "bytes": 0}
    for s in it:
        rec = shards[s]
        p = root / rec["path"]
        tot["samples"] += rec["rows"]
        tot["tokens"] += rec["tokens"]
        tot["entries"] += rec["entries"]
        tot["bytes"] += rec["bytes"]
        if not p.exists():
            problems.append(f"{rec['path']}: missing")
            continue
        if p.stat().st_size != rec["bytes"]:
            problems.append(f"{rec['path']}: {p.stat().st_size} bytes, manifest says {rec['bytes']} (truncated?)")
            continue
        digest = sha256_file(p)
        checked["bytes_hashed"] += rec["bytes"]
        if digest != rec["sha256"]:
            problems.append(f"{rec['path']}: sha256 mismatch (the file changed after it was written)")
        c = commits.get(rec["path"])
        if commits and (c is None or any(c.get(key) != val for key, val in rec.items())):
            problems.append(f"{rec['path']}: commit record missing or disagreeing with the manifest entry")
        checked["shards"] += 1
    firsts = [r["first_sample_id"] for r in shards if r["rows"]]
    if firsts != sorted(firsts):
        problems.append(f"{MANIFEST}: shards are not in sample-id order (the shard list was edited)")
    if tot != {k: man["totals"].get(k) for k in tot} or man["totals"].get("shards") != len(shards):
        problems.append(f"{MANIFEST}: totals {man['totals']} disagree with the shard list {tot}")
    if man.get("tail_prior"):
        try:
            from labelstore.store.reader import LabelStore as _LS

            _LS(root).tail_prior()
        except LabelStoreError as exc:
            problems.append(str(exc))
    if decode_rows and not problems:
        try:
            store = LabelStore(root, verify_rows=True)
            tokens = entries = 0
            all_ids = []
            for s_idx, rec in enumerate(shards):
                start = int(store.shard_starts[s_idx])
                sh_tokens = sh_entries = 0
                sids = []
                for i in range(start, start + rec["rows"]):
                    raw = store.get_raw(i)
                    sids.append(raw.sample_id)
                    sh_tokens += raw.input_ids.size
                    sh_entries += raw.ids.size
                    if raw.weights is not None and raw.weights.size and not np.all(np.isfinite(raw.weights)):
                        problems.append(f"{rec['path']}: row {i - start} decodes to non-finite values")
                    if raw.tail.size and not (np.all(raw.tail >= 0) and np.all(raw.tail <= 1)):
                        problems.append(f"{rec['path']}: row {i - start} has a tail mass outside [0, 1]")
                if sids and (min(sids) != rec["first_sample_id"] or max(sids) != rec["last_sample_id"]):
                    problems.append(f"{rec['path']}: sample ids {min(sids)}..{max(sids)} disagree with the manifest's "
                                    f"{rec['first_sample_id']}..{rec['last_sample_id']}")
                if sh_tokens != rec["tokens"] or sh_entries != rec["entries"]:
                    problems.append(f"{rec['path']}: rows hold {sh_tokens} tokens / {sh_entries} entries, "
                                    f"manifest says {rec['tokens']} / {rec['entries']}")
                all_ids.extend(sids)
                tokens += sh_tokens
                entries += sh_entries
                checked["rows"] += rec["rows"]
            if len(set(all_ids)) != len(all_ids):
                problems.append("duplicate sample ids across shards")
        except LabelStoreError as exc:
            problems.append(str(exc))
    return {"ok": not problems, "problems": problems, "checked": checked}


def add_arguments(parser) -> None:
    parser.add_argument("store", help="path of the store directory")
    parser.add_argument("--no-decode", action="store_true", help="check checksums and sizes only")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _not_a_store(path) -> str | None:
    """What to say when ``path`` is no store at all (no damage to repair there), else None."""
    root = Path(path)
    if not root.exists():
        return f"{root} does not exist: check the path (a store is the directory given to `labelstore compile --out`)"
    if not root.is_dir():
        return f"{root} is a file, not a store: a store is the directory given to `labelstore compile --out`"
    if not (root / MANIFEST).exists():
        if (root / CONFIG).exists():
            from labelstore.store.info import describe_unfinished

            return describe_unfinished(root)
        return f"{root} is not a label store (no {MANIFEST}, no {CONFIG})"
    return None


def run(args) -> int:
    why = _not_a_store(args.store)
    if why is not None and not args.json:
        print(f"FAILED: {why}")
        return 1
    rep = verify_store(args.store, decode_rows=not args.no_decode, progress=not args.json)
    if args.json:
        print(json.dumps(rep, indent=1))
    elif rep["ok"]:
        c = rep["checked"]
        print(f"OK: {c['shards']} shard(s), {c['rows']:,} rows decoded, {c['bytes_hashed']:,} bytes hashed")
    else:
        print(f"FAILED: {len(rep['problems'])} problem(s) in {args.store}")
        for p in rep["problems"]:
            print(f"  - {p}")
        print("Re-copy the damaged shards from their source, or rerun the compile into a new store.")
    return 0 if rep["ok"] else 1
