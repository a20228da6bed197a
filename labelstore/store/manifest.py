"""Commit records and the manifest: the contract between writers and readers.

Layout of a store directory (docs/FORMAT.md):

    STORE/config.json                 store metadata, created once (first writer), compared on resume
    STORE/shards/rRRRRR-SSSSSS.arrow  committed shards (Arrow IPC file format)
    STORE/shards/.tmp-*               in-flight shards; never read, removed on resume
    STORE/commits/rRRRRR-SSSSSS.json  one commit record per committed shard (written after its rename)
    STORE/commits/rRRRRR.done         a rank finished all its work
    STORE/locks/rRRRRR.lock           flock held by the live writer of rank R
    STORE/manifest.json               written last, atomically: the shard list readers use

A shard exists only once its commit record does. Every file is written under a temporary name,
fsynced and renamed, so a crash at any instant leaves either the old or the new file, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from labelstore.errors import StoreFormatError, StoreNotFinalizedError
from labelstore.store.format import FORMAT_NAME, MAX_ROWS_PER_SHARD, MAX_SHARDS, SUPPORTED_VERSIONS, validate_meta

MANIFEST = "manifest.json"
CONFIG = "config.json"
SHARD_RE = re.compile(r"^shards/r(\d{5})-(\d{6})\.arrow$")
MAX_MANIFEST_BYTES = 256 << 20
TAIL_PRIOR = "tail_prior.f32"
DEFAULT_PRIOR_MIX = 0.9  # measured: docs/FORMAT.md section 5c


def shard_name(rank: int, seq: int) -> str:
    return f"shards/r{rank:05d}-{seq:06d}.arrow"


def commit_name(rank: int, seq: int) -> str:
    return f"commits/r{rank:05d}-{seq:06d}.json"


def prior_name(rank: int, seq: int) -> str:
    return f"commits/r{rank:05d}-{seq:06d}.prior"


def done_name(rank: int) -> str:
    return f"commits/r{rank:05d}.done"


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def create_exclusive_json(path: Path, obj) -> bool:
    """Atomically create ``path`` with ``obj`` unless it exists. True if this call created it."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write((json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)  # fails if path exists: create-if-absent, atomically
        created = True
    except FileExistsError:
        created = False
    finally:
        tmp.unlink()
    fsync_dir(path.parent)
    return created


def remove_stale_tmp(root: Path) -> int:
    """Delete ``.tmp-NAME.PID`` files in the store root (config, manifest, tail prior) left by a writer that died
    mid-write. Only called once every rank is done (finalize), so no other writer can own one; files of a live
    local process other than this one are kept anyway. Returns how many were removed.
    """
    removed = 0
    for d in (Path(root),):
        if not d.is_dir():
            continue
        for p in d.glob(".tmp-*"):
            pid = p.name.rsplit(".", 1)[-1]
            if not pid.isdigit():
                continue
            if int(pid) == os.getpid():
                continue
            try:
                os.kill(int(pid), 0)
                continue  # still running
            except ProcessLookupError:
                pass
            except (PermissionError, OverflowError, ValueError):
                continue
            try:
                p.unlink()
                removed += 1
            except OSError:
                pass
    return removed


def read_json(path: Path, what: str, max_bytes: int = MAX_MANIFEST_BYTES):
    path = Path(path)
    try:
        if path.is_symlink():
            raise StoreFormatError(f"{what} {path} is a symbolic link; refusing to follow it")
        size = path.stat().st_size
        if size > max_bytes:
            raise StoreFormatError(f"{what} {path} is {size} bytes, over the {max_bytes} limit")
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise StoreFormatError(f"{what} {path} is not valid JSON ({exc}); the file is damaged") from None
    except RecursionError:
        raise StoreFormatError(f"{what} {path} is nested too deeply") from None


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def safe_shard_path(root: Path, rel, where: str) -> Path:
    """Resolve a shard path named in a manifest, refusing anything that could leave the store."""
    if not isinstance(rel, str) or not SHARD_RE.match(rel):
        raise StoreFormatError(
            f"{where}: shard path {rel!r} is not of the form shards/rRRRRR-SSSSSS.arrow; "
            "refusing it (a manifest must not point outside its store)"
        )
    p = root / rel
    if p.is_symlink() or (root / "shards").is_symlink():
        raise StoreFormatError(f"{where}: shard {rel} is (or lies in) a symbolic link; refusing to follow it")
    try:
        inside = p.resolve().is_relative_to(root.resolve())
    except OSError:
        inside = False
    if not inside:
        raise StoreFormatError(f"{where}: shard {rel} resolves outside the store; refusing it")
    return p


def _int(x, lo, hi, what, where):
    if not isinstance(x, int) or isinstance(x, bool) or not lo <= x <= hi:
        raise StoreFormatError(f"{where}: {what} {x!r} is not an integer in [{lo}, {hi}]")
    return x


def validate_shard_record(rec, where: str) -> dict:
    if not isinstance(rec, dict):
        raise StoreFormatError(f"{where}: shard entry is not an object")
    m = SHARD_RE.match(rec.get("path") if isinstance(rec.get("path"), str) else "")
    if not m:
        raise StoreFormatError(
            f"{where}: shard path {rec.get('path')!r} is not of the form shards/rRRRRR-SSSSSS.arrow; refusing it"
        )
    _int(rec.get("rows"), 0, MAX_ROWS_PER_SHARD, "rows", where)
    _int(rec.get("tokens"), 0, 1 << 50, "tokens", where)
    _int(rec.get("entries"), 0, 1 << 56, "entries", where)
    _int(rec.get("bytes"), 0, 1 << 50, "bytes", where)
    rank, seq = int(m.group(1)), int(m.group(2))
    if rec.get("rank") != rank or rec.get("seq") != seq:
        raise StoreFormatError(f"{where}: rank/seq {rec.get('rank')!r}/{rec.get('seq')!r} disagree with {rec['path']}")
    first, last = rec.get("first_sample_id"), rec.get("last_sample_id")
    if rec["rows"]:
        _int(first, -(1 << 63), (1 << 63) - 1, "first_sample_id", where)
        _int(last, first, (1 << 63) - 1, "last_sample_id", where)
    sha = rec.get("sha256")
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise StoreFormatError(f"{where}: sha256 {sha!r} is not a hex digest")
    return rec


def load_manifest(root: Path) -> dict:
    """Read and validate ``root/manifest.json``. Raises a labelstore error describing what is wrong."""
    root = Path(root)
    mpath = root / MANIFEST
    if not root.is_dir():
        raise StoreFormatError(f"{root} is not a directory; a label store is a directory with a manifest.json")
    if not mpath.exists():
        if (root / CONFIG).exists():
            raise StoreNotFinalizedError(
                f"{root} has committed shards but no manifest.json: the compile was interrupted or is still "
                "running. Rerun the same `labelstore compile` command to resume and finalize it."
            )
        raise StoreFormatError(f"{root} has no manifest.json; it is not a labelstore store")
    man = read_json(mpath, "manifest")
    where = str(mpath)
    if not isinstance(man, dict) or man.get("format") != FORMAT_NAME:
        raise StoreFormatError(f"{where}: not a labelstore manifest (no \"format\": \"labelstore\")")
    if man.get("format_version") not in SUPPORTED_VERSIONS:
        raise StoreFormatError(
            f"{where}: format version {man.get('format_version')!r} is not supported (this labelstore reads "
            f"{SUPPORTED_VERSIONS}); upgrade labelstore"
        )
    validate_meta(man.get("meta"), where)
    shards = man.get("shards")
    if not isinstance(shards, list) or len(shards) > MAX_SHARDS:
        raise StoreFormatError(f"{where}: \"shards\" must be a list of at most {MAX_SHARDS} entries")
    tot = man.get("totals")
    keys = ("shards", "samples", "tokens", "entries", "bytes")
    if not isinstance(tot, dict) or any(not isinstance(tot.get(k), int) or isinstance(tot.get(k), bool) for k in keys):
        raise StoreFormatError(f"{where}: \"totals\" must hold integer {', '.join(keys)}")
    seen = set()
    for i, rec in enumerate(shards):
        validate_shard_record(rec, f"{where} shard #{i}")
        if rec["path"] in seen:
            raise StoreFormatError(f"{where}: shard {rec['path']} is listed twice")
        seen.add(rec["path"])
        safe_shard_path(root, rec["path"], where)
    firsts = [r["first_sample_id"] for r in shards if r["rows"]]
    if firsts != sorted(firsts):
        raise StoreFormatError(f"{where}: shards are not listed in sample-id order; the manifest was edited")
    tp = man.get("tail_prior")
    if tp is not None:
        if not isinstance(tp, dict) or tp.get("path") != TAIL_PRIOR or tp.get("dtype") != "float32":
            raise StoreFormatError(f"{where}: tail_prior {tp!r} is malformed")
        mix = tp.get("mix")
        if not isinstance(mix, (int, float)) or isinstance(mix, bool) or not 0 <= mix <= 1:
            raise StoreFormatError(f"{where}: tail_prior mix {mix!r} is not in [0, 1]")
        if not isinstance(tp.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", tp["sha256"]):
            raise StoreFormatError(f"{where}: tail_prior sha256 is not a hex digest")
    sums = {"shards": len(shards), **{k: sum(r[k] for r in shards) for k in keys[1:] if k != "samples"},
            "samples": sum(r["rows"] for r in shards)}
    if any(sums[k] != tot[k] for k in keys):
        raise StoreFormatError(f"{where}: totals {tot} disagree with the shard list {sums}; the manifest was edited")
    return man


def list_commits(root: Path, rank: int | None = None) -> list[dict]:
    """Every valid commit record (optionally of one rank), sorted by (rank, seq)."""
    cdir = Path(root) / "commits"
    if not cdir.is_dir():
        return []
    pat = "r*-*.json" if rank is None else f"r{rank:05d}-*.json"
    out = []
    for p in sorted(cdir.glob(pat)):
        if p.name.startswith(".tmp-"):
            continue
        rec = read_json(p, "commit record")
        validate_shard_record(rec, str(p))
        out.append(rec)
    out.sort(key=lambda r: (r["rank"], r["seq"]))
    return out


def build_manifest(meta: dict, commits: list[dict]) -> dict:
    shards = [
        {k: c[k] for k in ("path", "rank", "seq", "rows", "tokens", "entries", "bytes", "sha256",
                           "first_sample_id", "last_sample_id")}
        for c in commits
    ]
    return {
        "format": FORMAT_NAME,
        "format_version": meta["format_version"],
        "meta": meta,
        "shards": shards,
        "totals": {
            "shards": len(shards),
            "samples": sum(s["rows"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "entries": sum(s["entries"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards),
        },
    }
