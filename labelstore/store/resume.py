"""Reopening and finishing a store: what a writer checks before it keeps or deletes anything, and the manifest.

A resume keeps the shards its rank committed, so it first proves them intact (commit record valid, shard a
regular file of the recorded size and sha256, teacher-mass file of the recorded sha256); damage is refused with
the exact list of files to remove, after which the same command recomputes them. It deletes only files that
are verifiably its own leftovers. :func:`finalize_store` writes the manifest once every rank is done.
docs/FORMAT.md section 7.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
from pathlib import Path

import numpy as np
import pyarrow as pa

from labelstore.errors import (
    LabelStoreError,
    StoreCorruptError,
    StoreFormatError,
    StoreNotFinalizedError,
    StoreWriteError,
)
from labelstore.store.arrow_file import check_ipc_file
from labelstore.store.format import META_KEY, shard_identity
from labelstore.store.manifest import (
    COMMIT_RE,
    TAIL_PRIOR,
    atomic_write_bytes,
    build_manifest,
    commit_name,
    done_name,
    list_commits,
    prior_name,
    read_config,
    read_json,
    remove_stale_tmp,
    sha256_file,
    shard_name,
    validate_commit_record,
    write_manifest,
)
from labelstore.store.safefs import check_store_dirs, is_regular, open_regular, unlink_own


def check_own_files(root: Path, rank: int) -> list[dict]:
    """This rank's commit records, each validated, with its shard's size and sha256 and its teacher-mass file
    checked (a resume keeps these shards, so it must know they are intact). Damage raises StoreCorruptError
    listing exactly the files to remove: their samples are then recomputed by the next run."""
    damaged: list[tuple[str, list[str]]] = []
    commits = []
    r = f"r{rank:05d}"
    for p in sorted((root / "commits").glob(f"{r}-*.json")):
        m = COMMIT_RE.fullmatch(p.name)
        if not m:
            continue  # not a name this writer uses: left alone
        seq = int(m.group(2))
        own = [commit_name(rank, seq), shard_name(rank, seq), prior_name(rank, seq)]
        try:
            rec = read_json(p, "commit record")
            validate_commit_record(rec, str(p))
            if rec["path"] != shard_name(rank, seq):
                raise StoreFormatError(f"{p} names shard {rec['path']}")
        except LabelStoreError as exc:
            damaged.append((f"commit record {p.name} is damaged ({exc})", own))
            continue
        shard = root / rec["path"]
        if not is_regular(shard):
            damaged.append((f"committed shard {rec['path']} is missing or not a regular file", own))
            continue
        if shard.stat().st_size != rec["bytes"] or sha256_file(shard) != rec["sha256"]:
            damaged.append((f"committed shard {rec['path']} changed after it was written (size or sha256)", own))
            continue
        if rec.get("prior_positions"):
            prior = root / prior_name(rank, seq)
            if not is_regular(prior) or _sha256_bytes(prior) != rec.get("prior_sha256"):
                damaged.append((f"teacher-mass file {prior.name} is missing or damaged", own))
                continue
        commits.append(rec)
    if damaged:
        files = sorted({f for _, fs in damaged for f in fs if os.path.lexists(root / f)})
        raise StoreCorruptError(
            f"{root}: files of rank {rank} were damaged after they were written:\n  "
            + "\n  ".join(why for why, _ in damaged)
            + "\nRemove exactly these files, then rerun the same command (their samples are recomputed):\n  "
            + "rm " + " ".join(shlex.quote(str(root / f)) for f in files)
        )
    return commits


def reopen_done_rank(root: Path, rank: int, vocab: int) -> tuple[np.ndarray | None, int]:
    """Resuming a finished rank: remove its done marker and return the teacher mass it held (checked):
    ``(sum over positions, positions)``, or ``(None, 0)``."""
    done = root / done_name(rank)
    if not os.path.lexists(done):
        return None, 0
    blob_path = root / (done_name(rank) + ".prior")
    total, positions = None, 0
    try:
        rec = read_json(done, "rank done marker")
        if not isinstance(rec, dict):
            raise StoreFormatError(f"{done} is not a JSON object")
        if rec.get("prior_positions"):
            blob = blob_path.read_bytes() if is_regular(blob_path) else b""
            if len(blob) != 8 * vocab or hashlib.sha256(blob).hexdigest() != rec.get("prior_sha256"):
                raise StoreFormatError(f"teacher-mass file {blob_path.name} is missing or damaged")
            total, positions = np.frombuffer(blob, dtype="<f8").copy(), int(rec["prior_positions"])
    except LabelStoreError as exc:
        raise StoreCorruptError(
            f"{root}: the done marker of rank {rank} is damaged ({exc}). Remove exactly these files, "
            f"then rerun the same command: rm {shlex.quote(str(done))} {shlex.quote(str(blob_path))}"
        ) from None
    unlink_own(done, "done marker")
    return total, positions


def is_own_shard(p: Path, store_id: str) -> bool:
    """True if ``p`` is a complete shard written by this store for its name's rank and sequence number (a
    shard renamed into place whose commit record never came: a writer killed between the two)."""
    m = re.fullmatch(r"r([0-9]{5})-([0-9]{6})\.arrow", p.name, re.ASCII)
    try:
        fd = open_regular(p, "shard")
        try:
            check_ipc_file(fd, os.fstat(fd).st_size, str(p))
        finally:
            os.close(fd)
        schema = pa.ipc.open_file(pa.memory_map(str(p))).schema
        meta = json.loads((schema.metadata or {}).get(META_KEY, b"{}"))
        ident = shard_identity(schema, str(p))
    except (LabelStoreError, pa.ArrowException, OSError, ValueError):
        return False
    return (m is not None and isinstance(meta, dict) and meta.get("store_id") == store_id
            and ident == {"rank": int(m.group(1)), "seq": int(m.group(2))})

def cleanup_uncommitted(root: Path, rank: int, committed: set[str], store_id: str) -> None:
    """Delete this rank's temporary files and shards without a commit record: only names this writer uses
    (``rRRRRR-SSSSSS.arrow``, ``.tmp-rRRRRR-...``), only regular files; anything else is left alone."""
    r = f"r{rank:05d}"
    own_shard = re.compile(rf"(\.tmp-)?{r}-[0-9]{{6}}\.arrow", re.ASCII)
    for p in (root / "shards").iterdir():
        if not own_shard.fullmatch(p.name) or f"shards/{p.name}" in committed:
            continue
        if not p.name.startswith(".tmp-") and not is_own_shard(p, store_id):
            raise StoreWriteError(
                f"{p} has the name of a shard of rank {rank} but is not one this store wrote (no commit "
                "record, and its content does not carry this store's id and its name's rank and sequence "
                "number). It is left untouched: move it out of the store, then rerun the same command."
            )
        unlink_own(p, "uncommitted shard")
    own_tmp = re.compile(rf"\.tmp-{r}-[0-9]{{6}}\.(json|prior)\.[0-9]+(-[0-9a-f]{{8}}(-[A-Za-z0-9]+)?)?", re.ASCII)
    for p in (root / "commits").glob(f".tmp-{r}-*"):
        if own_tmp.fullmatch(p.name):
            unlink_own(p, "temporary commit file")
    for p in (root / "commits").glob(f"{r}-*.prior"):
        if re.fullmatch(rf"{r}-[0-9]{{6}}\.prior", p.name) and not os.path.lexists(p.with_suffix(".json")):
            unlink_own(p, "teacher-mass file")  # written before a commit record that never came


def finalize_store(path, world_size: int) -> dict:
    """Write ``manifest.json`` from the commit records once all ``world_size`` ranks are done.

    Refuses (StoreNotFinalizedError) while a rank is unfinished, and (StoreFormatError) if two shards hold
    the same sample id or a committed file is missing or damaged (naming the files to remove). Returns the
    manifest.
    """
    root = Path(path)
    check_store_dirs(root)
    remove_stale_tmp(root)
    cfg = read_config(root)
    missing = [r for r in range(world_size) if not is_regular(root / done_name(r))]
    if missing:
        raise StoreNotFinalizedError(
            f"{root}: rank(s) {missing} have not finished; rerun the compile (same command) to complete them"
        )
    commits = list_commits(root)
    for c in commits:
        p = root / c["path"]
        if not is_regular(p) or p.stat().st_size != c["bytes"]:
            raise StoreCorruptError(
                f"{root}: committed shard {c['path']} is missing or has the wrong size. Remove exactly these files, "
                f"then rerun the same command to recompute it: rm {' '.join(_own_files(root, c))}"
            )
    runs = sorted((a, b, c["path"]) for c in commits for a, b in c["sample_ranges"])
    for (_a0, b0, p0), (a1, _b1, p1) in zip(runs, runs[1:]):
        if a1 < b0:
            raise StoreFormatError(f"{root}: sample id {a1} is stored twice ({p0} and {p1})")
    # Order shards by first sample id, so a store reads in sample order whatever the rank layout.
    commits.sort(key=lambda c: (c["first_sample_id"], c["rank"], c["seq"]))
    total, positions = _sum_priors(root, cfg["vocab_size"], commits, world_size)
    tail_prior = None
    if positions:
        blob = (total / positions).astype("<f4").tobytes()
        atomic_write_bytes(root / TAIL_PRIOR, blob)
        tail_prior = {"path": TAIL_PRIOR, "dtype": "float32", "positions": int(positions),
                      "sha256": hashlib.sha256(blob).hexdigest(), "mix": cfg["tail_prior_mix"]}
    manifest, index = build_manifest(cfg, commits, tail_prior)
    write_manifest(root, manifest, index)
    return manifest


def _own_files(root: Path, c: dict) -> list[str]:
    """The files of one commit (record, shard, teacher mass) that exist: what to remove to recompute it."""
    names = [commit_name(c["rank"], c["seq"]), c["path"], prior_name(c["rank"], c["seq"])]
    return [shlex.quote(str(root / n)) for n in names if os.path.lexists(root / n)]


def _sha256_bytes(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sum_priors(root: Path, vocab: int, commits: list[dict], world_size: int):
    total = np.zeros(vocab, dtype=np.float64)
    positions = 0
    dones = []
    for r in range(world_size):
        d = root / done_name(r)
        rec = read_json(d, "rank done marker")
        if isinstance(rec, dict) and rec.get("prior_positions"):
            dones.append(dict(rec, path=d.name, _file=done_name(r) + ".prior", _remove=[str(d)]))
    for c in list(commits) + dones:
        if not c.get("prior_positions"):
            continue
        p = root / (c["_file"] if "_file" in c else prior_name(c["rank"], c["seq"]))
        blob = p.read_bytes() if is_regular(p) else b""
        if len(blob) != 8 * vocab or hashlib.sha256(blob).hexdigest() != c.get("prior_sha256"):
            remove = [shlex.quote(x) for x in c["_remove"] + [str(p)]] if "_remove" in c else _own_files(root, c)
            raise StoreCorruptError(
                f"{root}: teacher-mass file {p.name} is missing or damaged. Remove exactly these files, then rerun "
                f"the same command to recompute them: rm {' '.join(remove)}"
            )
        total += np.frombuffer(blob, dtype="<f8")
        positions += int(c["prior_positions"])
    return total, positions
