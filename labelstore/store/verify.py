"""`labelstore verify STORE`: check every checksum, the schema and that every row decodes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from labelstore.errors import LabelStoreError
from labelstore.store.index import INDEX, shard_table
from labelstore.store.manifest import (
    COMMIT_RE,
    CONFIG,
    MANIFEST,
    SHARD_RE,
    load_manifest,
    read_config,
    read_json,
    sha256_file,
    shard_name,
    validate_commit_record,
)
from labelstore.store.safefs import is_regular

# What a store of an older format version cannot have checked (docs/FORMAT.md section 8).
VERSION_LIMITS = {
    1: "format version 1: the row CRC does not cover sample_id and num_tokens, manifest.json and config.json carry "
       "no digest, shards do not record their rank and sequence number; only sha256 (verify) catches such edits",
    2: "format version 2: the row CRC does not cover sample_id and num_tokens, manifest.json and config.json carry "
       "no digest, shards do not record their rank and sequence number; only sha256 (verify) catches such edits",
}


def _cross_check(root: Path, shards: list[dict], problems: list[str], notes: list[str]) -> None:
    """Manifest against commit records against the files present in ``shards/`` and ``commits/``."""
    listed = {r["path"]: r for r in shards}
    if len(listed) != len(shards):
        problems.append(f"{INDEX}: a shard is listed twice (the shard index was edited)")
    cdir, sdir = root / "commits", root / "shards"
    commits: dict[str, dict] = {}
    if cdir.is_dir() and not cdir.is_symlink():
        for p in sorted(cdir.iterdir()):
            if p.name.startswith(".tmp-") or not p.name.endswith(".json"):
                continue
            try:
                m = COMMIT_RE.fullmatch(p.name)
                rec = validate_commit_record(read_json(p, "commit record"), str(p))
                if not m or rec["path"] != shard_name(int(m.group(1)), int(m.group(2))):
                    raise LabelStoreError(f"commit record {p.name} names shard {rec['path']}")
                commits[rec["path"]] = rec
            except LabelStoreError as exc:
                problems.append(f"commits/{p.name}: {exc}")
    if commits or (cdir.is_dir() and any(COMMIT_RE.fullmatch(p.name) for p in cdir.iterdir())):
        for path, rec in listed.items():
            c = commits.get(path)
            if c is None:
                problems.append(f"{path}: listed in the manifest but has no commit record")
            elif any(c.get(key) != val for key, val in rec.items()):
                problems.append(f"{path}: its commit record disagrees with the manifest entry")
        for path in sorted(set(commits) - set(listed)):
            problems.append(f"{path}: committed (commit record present) but missing from the manifest")
        for path in sorted(commits):
            if not os.path.lexists(root / path):
                problems.append(f"{path}: commit record without its shard file")
    if sdir.is_dir() and not sdir.is_symlink():
        for p in sorted(sdir.iterdir()):
            rel = f"shards/{p.name}"
            if p.name.startswith(".tmp-") or rel in listed:
                continue
            if SHARD_RE.fullmatch(rel):
                problems.append(f"{rel}: orphan shard (in shards/ but not in the manifest"
                                f"{'' if rel in commits else ' nor in any commit record'})")
            else:
                notes.append(f"{rel}: a file the format does not use, in shards/ (not read, left alone)")


def verify_store(path, *, decode_rows: bool = True, progress: bool = False) -> dict:
    """Check a store end to end. Returns ``{"ok": bool, "problems": [...], "checked": {...}, "notes": [...]}``;
    never raises for damage it can describe (a problem is a string naming the file and what is wrong). ``notes``
    says which checks the store's format version cannot have."""
    from labelstore.store.reader import LabelStore  # local: reader imports torch

    root = Path(path)
    problems: list[str] = []
    notes: list[str] = []
    checked = {"shards": 0, "rows": 0, "bytes_hashed": 0}
    try:
        man = load_manifest(root)
    except LabelStoreError as exc:
        return {"ok": False, "problems": [str(exc)], "checked": checked, "notes": notes}
    if man["format_version"] in VERSION_LIMITS:
        notes.append(VERSION_LIMITS[man["format_version"]])
    try:
        shards = shard_table(root, man).records()  # version 4: every block of index.arrow checked
    except LabelStoreError as exc:
        return {"ok": False, "problems": [str(exc)], "checked": checked, "notes": notes}
    _cross_check(root, shards, problems, notes)
    if os.path.lexists(root / CONFIG):
        try:
            if read_config(root) != man["meta"]:
                problems.append(f"{MANIFEST}: metadata differs from {CONFIG} (one of them was edited)")
        except LabelStoreError as exc:
            problems.append(str(exc))
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
        if not os.path.lexists(p):
            problems.append(f"{rec['path']}: missing")
            continue
        if not is_regular(p):
            problems.append(f"{rec['path']}: not a regular file (a link, folder, pipe or device)")
            continue
        if p.stat().st_size != rec["bytes"]:
            problems.append(f"{rec['path']}: {p.stat().st_size} bytes, manifest says {rec['bytes']} (truncated?)")
            continue
        digest = sha256_file(p)
        checked["bytes_hashed"] += rec["bytes"]
        if digest != rec["sha256"]:
            problems.append(f"{rec['path']}: sha256 mismatch (the file changed after it was written)")
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
            store.count_invalid_codes = True
            tokens = entries = 0
            all_ids = []
            starts = store.shard_starts
            for s_idx, rec in enumerate(shards):
                start = int(starts[s_idx])
                sh_tokens = sh_entries = 0
                sids = []
                for i in range(start, start + rec["rows"]):
                    before = store.invalid_codes
                    raw = store.get_raw(i)
                    if store.invalid_codes != before:
                        problems.append(f"{rec['path']}: row {i - start} holds {store.invalid_codes - before} value "
                                        "code(s) no writer produces (NaN, infinity or negative): readers decode them "
                                        "to 0; the shard was damaged before its CRC was computed, or written by "
                                        "another tool")
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
    return {"ok": not problems, "problems": problems, "checked": checked, "notes": notes}


def add_arguments(parser) -> None:
    parser.add_argument("store", help="path of the store directory, or its URL (s3://bucket/prefix: copied to a "
                        "temporary folder under $TMPDIR first, which needs room for the whole store)")
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
    from labelstore.store.objectstore import is_url

    if not is_url(args.store):
        return _run(args, args.store, str)
    from labelstore.store.mirror import mirrored

    with mirrored(args.store, everything=True) as (local, show):  # every byte is read: the whole store is copied
        return _run(args, local, show)


def _run(args, path, show) -> int:
    """Verify the store in folder ``path``; ``show`` maps its paths in messages to what the user named."""
    why = _not_a_store(path)
    if why is not None and not args.json:
        print(f"FAILED: {show(why)}")
        return 1
    rep = verify_store(path, decode_rows=not args.no_decode, progress=not args.json)
    rep["problems"] = [show(p) for p in rep["problems"]]
    if args.json:
        print(json.dumps(rep, indent=1))
    elif rep["ok"]:
        c = rep["checked"]
        print(f"OK: {c['shards']} shard(s), {c['rows']:,} rows decoded, {c['bytes_hashed']:,} bytes hashed")
        for note in rep["notes"]:
            print(f"  note: {note}")
    else:
        print(f"FAILED: {len(rep['problems'])} problem(s) in {args.store}")
        for p in rep["problems"]:
            print(f"  - {p}")
        print("Re-copy the damaged shards from their source, or rerun the compile into a new store.")
    return 0 if rep["ok"] else 1
