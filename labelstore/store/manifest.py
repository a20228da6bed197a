"""Commit records and the manifest: the contract between writers and readers.

Layout of a store directory (docs/FORMAT.md):

    STORE/config.json                 store metadata, created once (first writer), compared on resume
    STORE/shards/rRRRRR-SSSSSS.arrow  committed shards (Arrow IPC file format)
    STORE/shards/.tmp-*               in-flight shards; never read, removed on resume
    STORE/commits/rRRRRR-SSSSSS.json  one commit record per committed shard (written after its rename)
    STORE/commits/rRRRRR.done         a rank finished all its work
    STORE/locks/rRRRRR.lock           flock held by the live writer of rank R
    STORE/index.arrow                 (format version 4) the shard table, written just before the manifest
    STORE/manifest.json               written last, atomically: the totals and the shard list (version 4: a
                                      reference to index.arrow, with a digest per block of it)

A shard exists only once its commit record does. Every file is written under a temporary name,
fsynced and renamed, so a crash at any instant leaves either the old or the new file, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import socket
from pathlib import Path

from labelstore.errors import StoreCorruptError, StoreFormatError, StoreNotFinalizedError, StoreWriteError
from labelstore.store.format import (
    DEFAULT_PRIOR_MIX,
    FORMAT_NAME,
    MAX_JSON_SHARDS,
    MAX_ROWS_PER_SHARD,
    MIN_ROW_BYTES,
    SUPPORTED_VERSIONS,
    check_digest,
    validate_meta,
    with_digest,
)
from labelstore.store.index import INDEX, build_index, validate_index_ref
from labelstore.store.safefs import (
    check_no_symlink,
    is_regular,
    open_nofollow_write,
    open_regular,
    read_regular,
    unlink_own,
)

MANIFEST = "manifest.json"
CONFIG = "config.json"
# Matched with fullmatch: ASCII digits only (no Unicode digits), nothing before or after (no trailing newline).
SHARD_RE = re.compile(r"shards/r([0-9]{5})-([0-9]{6})\.arrow", re.ASCII)
MAX_MANIFEST_BYTES = 256 << 20
TAIL_PRIOR = "tail_prior.f32"
__all__ = ["DEFAULT_PRIOR_MIX"]  # re-exported: defined once, in labelstore.store.format


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


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:40] or "host"


def tmp_name(name: str) -> str:
    """``.tmp-NAME.PID-TOKEN-HOST``: the writing process, a random token and the host (letters and digits only), so
    writers on different hosts of a shared filesystem (the same pid is possible there) never pick the same
    temporary name, and a cleaner knows which names a pid probe can speak for."""
    return f".tmp-{name}.{os.getpid()}-{secrets.token_hex(4)}-{_host()}"


def _write_new_file(tmp: Path, data: bytes) -> None:
    """Create ``tmp`` (refusing a symbolic link or anything already there that is not a plain file), write and
    fsync ``data``."""
    unlink_own(tmp, "temporary file")  # a stale one of a dead process with our pid; never a link or a folder
    fd = open_nofollow_write(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, "temporary file")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one, never a mix. A symbolic link
    (or a non-file) at ``path`` is refused before anything is written."""
    path = Path(path)
    check_no_symlink(path.parent, "store folder")
    check_no_symlink(path, "store file")
    if os.path.lexists(path) and not is_regular(path):
        raise StoreWriteError(f"{path} exists and is not a regular file; refusing to replace it")
    tmp = path.with_name(tmp_name(path.name))
    try:
        _write_new_file(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        try:
            if is_regular(tmp):
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
    check_no_symlink(path, "store file")
    tmp = path.with_name(tmp_name(path.name))
    _write_new_file(tmp, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())
    try:
        os.link(tmp, path)  # fails if path exists (a link too: never followed): create-if-absent, atomically
        created = True
    except FileExistsError:
        created = False
    finally:
        tmp.unlink()
    fsync_dir(path.parent)
    return created


def remove_stale_tmp(root: Path) -> int:
    """Delete ``.tmp-NAME.PID-TOKEN`` (and older ``.tmp-NAME.PID``) files in the store root (config, manifest, tail
    prior) and in ``commits/`` (commit records, done markers, teacher mass) left by a writer that died mid-write.
    Only called once every rank is done (finalize), so no other writer can own one; files of a live process of this
    host other than this one are kept anyway (another host's are removed: a pid probe cannot speak for them), and
    only regular files are removed (never a link or a folder). Returns how many were removed.
    """
    removed = 0
    for d in (Path(root), Path(root) / "commits"):
        if d.is_symlink() or not d.is_dir():
            continue
        for p in d.glob(".tmp-*"):
            pid, *rest = p.name.rsplit(".", 1)[-1].split("-")
            if not pid.isdigit():
                continue
            if int(pid) == os.getpid():
                continue
            try:
                if len(rest) < 2 or rest[1] == _host():  # a pid probe speaks for this host's processes only
                    os.kill(int(pid), 0)
                    continue  # still running
            except ProcessLookupError:
                pass
            except (PermissionError, OverflowError, ValueError):
                continue
            try:
                if is_regular(p):
                    p.unlink()
                    removed += 1
            except OSError:
                pass
    return removed


def read_json(path: Path, what: str, max_bytes: int = MAX_MANIFEST_BYTES):
    """Parse a store's JSON file: a regular file only (a FIFO, device, folder or symbolic link is refused before a
    byte is read), of at most ``max_bytes``."""
    path = Path(path)
    try:
        return json.loads(read_regular(path, what, max_bytes))
    except (ValueError, UnicodeDecodeError) as exc:
        raise StoreFormatError(f"{what} {path} is not valid JSON ({exc}); the file is damaged") from None
    except RecursionError:
        raise StoreFormatError(f"{what} {path} is nested too deeply") from None


def read_config(root: Path) -> dict:
    """``config.json``, its digest checked (required from format version 3 on) and removed."""
    cfg = read_json(Path(root) / CONFIG, "store config")
    if not isinstance(cfg, dict):
        raise StoreFormatError(f"{Path(root) / CONFIG} is not a JSON object; the store is damaged")
    return check_digest(cfg, cfg.get("format_version"), str(Path(root) / CONFIG))


def config_with_digest(meta: dict) -> dict:
    return with_digest(meta)


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with os.fdopen(open_regular(path, "shard"), "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def safe_shard_path(root: Path, rel, where: str) -> Path:
    """Resolve a shard path named in a manifest, refusing anything that could leave the store."""
    if not isinstance(rel, str) or not SHARD_RE.fullmatch(rel):
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
    m = SHARD_RE.fullmatch(rec.get("path") if isinstance(rec.get("path"), str) else "")
    if not m:
        raise StoreFormatError(
            f"{where}: shard path {rec.get('path')!r} is not of the form shards/rRRRRR-SSSSSS.arrow; refusing it"
        )
    _int(rec.get("rows"), 0, MAX_ROWS_PER_SHARD, "rows", where)
    _int(rec.get("tokens"), 0, 1 << 50, "tokens", where)
    _int(rec.get("entries"), 0, 1 << 56, "entries", where)
    _int(rec.get("bytes"), 0, 1 << 50, "bytes", where)
    if rec["rows"] * MIN_ROW_BYTES > rec["bytes"]:
        raise StoreFormatError(f"{where}: {rec['rows']} rows cannot fit in {rec['bytes']} bytes (each row takes at "
                               f"least {MIN_ROW_BYTES}); refusing the entry before allocating anything for its rows")
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


def _check_tail_prior(man: dict, ver: int, where: str) -> None:
    tp = man.get("tail_prior")
    if tp is not None:
        if not isinstance(tp, dict) or tp.get("path") != TAIL_PRIOR or tp.get("dtype") != "float32":
            raise StoreFormatError(f"{where}: tail_prior {tp!r} is malformed")
        mix = tp.get("mix")
        if not isinstance(mix, (int, float)) or isinstance(mix, bool) or not 0 <= mix <= 1:
            raise StoreFormatError(f"{where}: tail_prior mix {mix!r} is not in [0, 1]")
        if not isinstance(tp.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", tp["sha256"]):
            raise StoreFormatError(f"{where}: tail_prior sha256 is not a hex digest")
        if ver >= 3 and mix != man["meta"]["tail_prior_mix"]:
            raise StoreCorruptError(f"{where}: tail_prior mix {mix!r} differs from the store's tail_prior_mix "
                                    f"{man['meta']['tail_prior_mix']!r} (recorded in every shard); it was edited")


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
    ver = man.get("format_version")
    if ver not in SUPPORTED_VERSIONS:
        raise StoreFormatError(
            f"{where}: format version {ver!r} is not supported (this labelstore reads "
            f"{SUPPORTED_VERSIONS}); upgrade labelstore"
        )
    man = check_digest(man, ver, where)
    validate_meta(man.get("meta"), where)
    if man["meta"]["format_version"] != ver:
        raise StoreFormatError(f"{where}: format_version {ver} disagrees with its metadata's "
                               f"{man['meta']['format_version']}")
    tot = man.get("totals")
    keys = ("shards", "samples", "tokens", "entries", "bytes")
    if not isinstance(tot, dict) or any(not isinstance(tot.get(k), int) or isinstance(tot.get(k), bool) for k in keys):
        raise StoreFormatError(f"{where}: \"totals\" must hold integer {', '.join(keys)}")
    _check_tail_prior(man, ver, where)
    if ver >= 4:  # the shard table is index.arrow, read lazily (labelstore.store.index.ShardIndex)
        if "shards" in man:
            raise StoreFormatError(f"{where}: a version-4 manifest has no \"shards\" list (its shards are in {INDEX})")
        validate_index_ref(man.get("index"), tot, where)
        return man
    shards = man.get("shards")
    if not isinstance(shards, list) or len(shards) > MAX_JSON_SHARDS:
        raise StoreFormatError(f"{where}: \"shards\" must be a list of at most {MAX_JSON_SHARDS} entries")
    seen = set()
    for i, rec in enumerate(shards):
        validate_shard_record(rec, f"{where} shard #{i}")  # the path is a full match of shards/rRRRRR-SSSSSS.arrow
        if rec["path"] in seen:
            raise StoreFormatError(f"{where}: shard {rec['path']} is listed twice")
        seen.add(rec["path"])
    if shards:  # the only way such a path leaves the store is a link: shards/ here, the shard itself at open
        safe_shard_path(root, shards[0]["path"], where)
    firsts = [r["first_sample_id"] for r in shards if r["rows"]]
    if firsts != sorted(firsts):
        raise StoreFormatError(f"{where}: shards are not listed in sample-id order; the manifest was edited")
    sums = {"shards": len(shards), **{k: sum(r[k] for r in shards) for k in keys[1:] if k != "samples"},
            "samples": sum(r["rows"] for r in shards)}
    if any(sums[k] != tot[k] for k in keys):
        raise StoreFormatError(f"{where}: totals {tot} disagree with the shard list {sums}; the manifest was edited")
    return man


COMMIT_RE = re.compile(r"r([0-9]{5})-([0-9]{6})\.json", re.ASCII)


def validate_commit_record(rec, where: str) -> dict:
    """A commit record: a valid shard entry whose ``sample_ranges`` are disjoint ``[start, end)`` runs (in writing
    order) that hold exactly its ``rows`` ids between its first and last sample id. Checked before any use, so a
    hostile range (``[0, 10**12)``) is refused, never expanded."""
    validate_shard_record(rec, where)
    runs = rec.get("sample_ranges")
    if not isinstance(runs, list) or len(runs) > rec["rows"]:
        raise StoreFormatError(f"{where}: sample_ranges must be a list of at most rows={rec['rows']} runs")
    for run in runs:
        if (not isinstance(run, list) or len(run) != 2 or any(not isinstance(x, int) or isinstance(x, bool)
                                                              for x in run) or not run[0] < run[1]):
            raise StoreFormatError(f"{where}: sample range {run!r} is not [start, end) with start < end")
    ordered = sorted(runs)
    if any(b[0] < a[1] for a, b in zip(ordered, ordered[1:])):
        raise StoreFormatError(f"{where}: sample_ranges overlap (a sample id stored twice)")
    total = sum(b - a for a, b in runs)
    if total != rec["rows"] or (runs and (ordered[0][0] != rec["first_sample_id"]
                                          or max(b for _, b in runs) - 1 != rec["last_sample_id"])):
        raise StoreFormatError(f"{where}: sample_ranges hold {total} ids, or bounds other than "
                               f"{rec.get('first_sample_id')}..{rec.get('last_sample_id')}, for {rec['rows']} rows")
    return rec


def list_commits(root: Path, rank: int | None = None) -> list[dict]:
    """Every commit record (optionally of one rank), validated (:func:`validate_commit_record`), sorted by
    (rank, seq). A record that is damaged raises a StoreFormatError naming the file."""
    cdir = Path(root) / "commits"
    if not cdir.is_dir():
        return []
    pat = "r*-*.json" if rank is None else f"r{rank:05d}-*.json"
    out = []
    for p in sorted(cdir.glob(pat)):
        if p.name.startswith(".tmp-"):
            continue
        m = COMMIT_RE.fullmatch(p.name)
        rec = read_json(p, "commit record")
        validate_commit_record(rec, str(p))
        if not m or rec["path"] != shard_name(int(m.group(1)), int(m.group(2))):
            raise StoreFormatError(f"{p}: commit record names shard {rec['path']}, not the one its file name says")
        out.append(rec)
    out.sort(key=lambda r: (r["rank"], r["seq"]))
    return out


def build_manifest(meta: dict, commits: list[dict], tail_prior: dict | None = None) -> tuple[dict, bytes | None]:
    """The manifest of a store (without its digest: :func:`write_manifest` adds it) and, from format version 4 on,
    the bytes of its shard index ``index.arrow`` (None before: the shard list is inside the manifest)."""
    shards = [{k: c[k] for k in ("path", "rank", "seq", "rows", "tokens", "entries", "bytes", "sha256",
                                 "first_sample_id", "last_sample_id")} for c in commits]
    man = {
        "format": FORMAT_NAME,
        "format_version": meta["format_version"],
        "meta": meta,
        "totals": {
            "shards": len(shards),
            "samples": sum(s["rows"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "entries": sum(s["entries"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards),
        },
    }
    index = None
    if meta["format_version"] >= 4:
        index, man["index"] = build_index(shards)
    else:
        if len(shards) > MAX_JSON_SHARDS:
            raise StoreFormatError(f"{len(shards)} shards: a version-{meta['format_version']} manifest lists at most "
                                   f"{MAX_JSON_SHARDS}; write format version 4")
        man["shards"] = shards
    if tail_prior is not None:
        man["tail_prior"] = tail_prior
    return man, index


def write_manifest(root: Path, manifest: dict, index: bytes | None = None) -> None:
    """Write ``index.arrow`` (version 4) then ``manifest.json`` atomically, with its digest (format version 3 on)."""
    if index is not None:
        atomic_write_bytes(Path(root) / INDEX, index)
    atomic_write_json(Path(root) / MANIFEST, with_digest(manifest))
