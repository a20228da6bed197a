"""StoreWriter: a crash-safe, resumable, sharded writer for label stores.

Protocol (docs/FORMAT.md, "Writing"): rows accumulate into Arrow record batches, batches into a shard
written under ``shards/.tmp-...``. ``commit()`` closes the shard (Arrow footer), fsyncs it, renames it to
its final name, fsyncs the directory, and only then writes the shard's commit record. A shard without a
commit record does not exist: resume deletes it. ``close()`` marks the rank done; the manifest is written
last, atomically, by :func:`finalize_store` once every rank is done.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from labelstore.errors import (
    ConfigMismatchError,
    StoreFormatError,
    StoreLockedError,
    StoreNotFinalizedError,
    StoreWriteError,
)
from labelstore.store.format import build_schema, encode_row, normalize_meta, rows_to_batch
from labelstore.store.manifest import (
    CONFIG,
    DEFAULT_PRIOR_MIX,
    MANIFEST,
    TAIL_PRIOR,
    atomic_write_bytes,
    atomic_write_json,
    build_manifest,
    commit_name,
    create_exclusive_json,
    done_name,
    fsync_dir,
    list_commits,
    prior_name,
    read_json,
    remove_stale_tmp,
    sha256_file,
    shard_name,
)

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None

DEFAULT_SHARD_BYTES = 256 << 20
DEFAULT_BATCH_BYTES = 8 << 20


def _meta_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two metadata dicts (``runtime`` ignored)."""
    out = []
    for key in sorted(set(a) | set(b)):
        if not prefix and key == "runtime":
            continue
        name = f"{prefix}{key}"
        if key not in a or key not in b:
            out.append(f"{name}: {a.get(key, '<absent>')!r} in the store, {b.get(key, '<absent>')!r} now")
        elif isinstance(a[key], dict) and isinstance(b[key], dict):
            out.extend(_meta_diff(a[key], b[key], name + "."))
        elif a[key] != b[key]:
            out.append(f"{name}: {a[key]!r} in the store, {b[key]!r} now")
    return out


def _runs(ids: list[int]) -> list[list[int]]:
    """Consecutive runs ``[start, end)`` of a list of sample ids (in order)."""
    runs: list[list[int]] = []
    for s in ids:
        if runs and runs[-1][1] == s:
            runs[-1][1] = s + 1
        else:
            runs.append([s, s + 1])
    return runs


class StoreWriter:
    """Write one rank's share of a label store.

    Args:
        path: the store directory (created if missing).
        meta: store metadata (see :func:`labelstore.store.format.normalize_meta`); everything but ``runtime`` must
            match the store's on resume.
        rank, world_size: this writer's rank among ``world_size`` concurrent writers.
        shard_bytes: roll to a new shard once the current one holds this many payload bytes.
        batch_bytes: Arrow record batch size (payload bytes).
    """

    def __init__(self, path, meta: dict, *, rank: int = 0, world_size: int = 1,
                 shard_bytes: int = DEFAULT_SHARD_BYTES, batch_bytes: int = DEFAULT_BATCH_BYTES):
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
        if not isinstance(shard_bytes, int) or shard_bytes < 1:
            raise ValueError(f"shard_bytes must be a positive integer, got {shard_bytes!r}")
        if not isinstance(batch_bytes, int) or batch_bytes < 1:
            raise ValueError(f"batch_bytes must be a positive integer, got {batch_bytes!r}")
        self.root = Path(path)
        self.rank, self.world_size = rank, world_size
        self.shard_bytes, self.batch_bytes = shard_bytes, min(batch_bytes, shard_bytes)
        self.meta = normalize_meta(meta)
        self.schema = build_schema(self.meta)
        self._compressor = None
        if self.meta["encoding"]["name"] == "zstd":
            from labelstore.store.entropy import RowCompressor

            self._compressor = RowCompressor(self.meta["encoding"]["level"])
        self._lock_fd = None
        self._closed = False
        self._rows: list = []
        self._pending_bytes = 0
        self._shard = None  # (tmp path, file, ipc writer)
        self._shard_stats = None
        self._prior_sum = np.zeros(self.meta["vocab_size"], dtype=np.float64)
        self._prior_positions = 0
        try:
            for sub in ("shards", "commits", "locks"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreWriteError(f"cannot create store directory {self.root}: {exc.strerror or exc}") from None
        self._acquire_lock()
        try:
            self._check_config()
            self._cleanup_uncommitted()
            commits = list_commits(self.root, rank)
            self._seq = max((c["seq"] for c in commits), default=-1) + 1
            done = self.root / done_name(rank)
            if done.exists():  # resuming a finished rank: carry its pending teacher mass over, then reopen it
                rec = read_json(done, "rank done marker")
                blob_path = self.root / (done_name(rank) + ".prior")
                if isinstance(rec, dict) and rec.get("prior_positions") and blob_path.exists():
                    blob = blob_path.read_bytes()
                    if len(blob) == 8 * self.meta["vocab_size"]:
                        self._prior_sum += np.frombuffer(blob, dtype="<f8")
                        self._prior_positions += int(rec["prior_positions"])
                done.unlink()
        except BaseException:
            self._release_lock()
            raise

    # ------------------------------------------------------------------------------------ setup
    def _acquire_lock(self) -> None:
        lock_path = self.root / "locks" / f"r{self.rank:05d}.lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreWriteError(
                f"cannot create the lock file {lock_path}: {exc.strerror or exc}; make the output directory writable"
            ) from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                try:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                except OSError:
                    holder = "?"
                os.close(fd)
                raise StoreLockedError(
                    f"{self.root} (rank {self.rank}) is being written by another live process ({holder}). "
                    "Wait for it to finish or stop it; a crashed writer's lock is released automatically."
                ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode(), 0)
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def _check_config(self) -> None:
        cfg = self.root / CONFIG
        if create_exclusive_json(cfg, self.meta):
            return
        existing = read_json(cfg, "store config")
        if not isinstance(existing, dict):
            raise StoreFormatError(f"{cfg} is not a JSON object; the store is damaged")
        diffs = _meta_diff(existing, self.meta)
        if diffs:
            raise ConfigMismatchError(
                f"{self.root} was written with different settings:\n  " + "\n  ".join(diffs)
                + "\nRerun with the store's settings to resume it, or write to a new --out directory."
            )

    def _cleanup_uncommitted(self) -> None:
        committed = {c["path"] for c in list_commits(self.root, self.rank)}
        prefix = f"r{self.rank:05d}-"
        for p in (self.root / "shards").iterdir():
            rel = f"shards/{p.name}"
            if p.name.startswith(f".tmp-{prefix}") or (p.name.startswith(prefix) and rel not in committed):
                p.unlink()
        for p in (self.root / "commits").glob(f".tmp-r{self.rank:05d}-*"):
            p.unlink()
        for p in (self.root / "commits").glob(f"r{self.rank:05d}-*.prior"):
            if not p.with_suffix(".json").exists():  # written before a commit record that never came
                p.unlink()

    # ------------------------------------------------------------------------------------ queries
    def committed_sample_ids(self) -> np.ndarray:
        """Sorted sample ids committed by any rank of this store (what a resume must skip)."""
        parts = [np.arange(a, b, dtype=np.int64) for c in list_commits(self.root)
                 for a, b in c.get("sample_ranges", [])]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)

    # ------------------------------------------------------------------------------------ writing
    def add(self, sample_id: int, input_ids, counts, ids, values, tail, doc_starts=None) -> None:
        """Append one sequence. Arrays follow docs/FORMAT.md; invalid ones raise ValueError."""
        if self._closed:
            raise StoreWriteError("this StoreWriter is closed")
        row = encode_row(self.meta, sample_id, input_ids, counts, ids, values, tail, doc_starts, self._compressor)
        self._rows.append(row)
        self._pending_bytes += row.nbytes
        if self._pending_bytes >= self.batch_bytes:
            self._flush_batch()

    def _flush_batch(self) -> None:
        if not self._rows:
            return
        rows, self._rows, nbytes, self._pending_bytes = self._rows, [], self._pending_bytes, 0
        try:
            if self._shard is None:
                tmp = self.root / "shards" / f".tmp-r{self.rank:05d}-{self._seq:06d}.arrow"
                f = pa.OSFile(str(tmp), "wb")
                self._shard = (tmp, f, pa.ipc.new_file(f, self.schema))
                self._shard_stats = {"rows": 0, "tokens": 0, "entries": 0, "payload": 0, "ids": []}
            self._shard[2].write_batch(rows_to_batch(rows, self.schema))
        except (OSError, pa.ArrowException) as exc:
            self._abort_shard()
            raise StoreWriteError(
                f"writing shard {self._seq} of rank {self.rank} in {self.root} failed: {exc}. Committed shards are "
                "intact; fix the cause (disk space, permissions) and rerun the same command to resume."
            ) from None
        st = self._shard_stats
        st["rows"] += len(rows)
        st["tokens"] += sum(r.num_tokens for r in rows)
        st["entries"] += sum(r.num_entries for r in rows)
        st["payload"] += nbytes
        st["ids"].extend(r.sample_id for r in rows)
        if self._shard_stats["payload"] >= self.shard_bytes:
            self.commit()

    def _abort_shard(self) -> None:
        if self._shard is not None:
            tmp, f, w = self._shard
            self._shard = None
            for closer in (w.close, f.close):
                try:
                    closer()
                except Exception:
                    pass
            try:
                tmp.unlink()
            except OSError:
                pass

    def commit(self) -> None:
        """Make everything added so far durable: close, fsync and rename the shard, then record it."""
        self._flush_batch()
        if self._shard is None:
            return
        tmp, f, w = self._shard
        final_rel = shard_name(self.rank, self._seq)
        final = self.root / final_rel
        try:
            w.close()
            f.close()
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            fsync_dir(final.parent)
            st = self._shard_stats
            record = {
                "path": final_rel,
                "rank": self.rank,
                "seq": self._seq,
                "rows": st["rows"],
                "tokens": st["tokens"],
                "entries": st["entries"],
                "bytes": final.stat().st_size,
                "sha256": sha256_file(final),
                "first_sample_id": min(st["ids"]),
                "last_sample_id": max(st["ids"]),
                "sample_ranges": _runs(st["ids"]),
            }
            if self._prior_positions:
                blob = self._prior_sum.astype("<f8").tobytes()
                atomic_write_bytes(self.root / prior_name(self.rank, self._seq), blob)
                record["prior_positions"] = int(self._prior_positions)
                record["prior_sha256"] = hashlib.sha256(blob).hexdigest()
            atomic_write_json(self.root / commit_name(self.rank, self._seq), record)
            manifest = self.root / MANIFEST
            if manifest.exists():  # the store grows: its old manifest no longer describes it
                manifest.unlink()
        except OSError as exc:
            self._shard = None
            try:
                tmp.unlink()
            except OSError:
                pass
            raise StoreWriteError(
                f"committing shard {final_rel} in {self.root} failed: {exc}. Earlier shards are intact; fix the "
                "cause and rerun the same command to resume."
            ) from None
        self._shard = None
        self._seq += 1
        self._prior_sum[:] = 0
        self._prior_positions = 0

    def add_teacher_mass(self, prob_sums, positions: int) -> None:
        """Accumulate the teacher's full distribution summed over ``positions`` positions (float [V]).

        The store's tail prior (docs/FORMAT.md section 5c) is the mean of these over the committed shards: the
        teacher's average next-token distribution, used to spread each position's tail mass.
        """
        v = np.asarray(prob_sums, dtype=np.float64).reshape(-1)
        if v.size != self.meta["vocab_size"] or not np.all(np.isfinite(v)) or (v.size and v.min() < 0):
            raise ValueError(f"teacher mass must be {self.meta['vocab_size']} finite non-negative sums")
        self._prior_sum += v
        self._prior_positions += int(positions)

    def close(self) -> None:
        """Commit what is pending, mark this rank done, and (single writer) write the manifest."""
        if self._closed:
            return
        try:
            self.commit()
            done = {"rank": self.rank, "world_size": self.world_size, "next_seq": self._seq}
            if self._prior_positions:  # teacher mass added after the last shard was committed
                blob = self._prior_sum.astype("<f8").tobytes()
                atomic_write_bytes(self.root / (done_name(self.rank) + ".prior"), blob)
                done.update(prior_positions=int(self._prior_positions), prior_sha256=hashlib.sha256(blob).hexdigest())
            atomic_write_json(self.root / done_name(self.rank), done)
            if self.world_size == 1:
                finalize_store(self.root, 1)
        except OSError as exc:
            raise StoreWriteError(f"finishing {self.root} failed: {exc}; rerun to resume") from None
        finally:
            self._closed = True
            self._release_lock()

    def abort(self) -> None:
        """Stop without committing the open shard (it is discarded on resume). Committed shards stay."""
        self._rows, self._pending_bytes = [], 0
        self._abort_shard()
        self._closed = True
        self._release_lock()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False

    def __del__(self):  # pragma: no cover - best effort
        if not getattr(self, "_closed", True):
            self._release_lock()


def finalize_store(path, world_size: int) -> dict:
    """Write ``manifest.json`` from the commit records once all ``world_size`` ranks are done.

    Refuses (StoreNotFinalizedError) while a rank is unfinished, and (StoreFormatError) if two shards hold
    the same sample id. Returns the manifest.
    """
    root = Path(path)
    remove_stale_tmp(root)
    cfg = read_json(root / CONFIG, "store config")
    missing = [r for r in range(world_size) if not (root / done_name(r)).exists()]
    if missing:
        raise StoreNotFinalizedError(
            f"{root}: rank(s) {missing} have not finished; rerun the compile (same command) to complete them"
        )
    commits = list_commits(root)
    for c in commits:
        p = root / c["path"]
        if not p.exists() or p.stat().st_size != c["bytes"]:
            raise StoreFormatError(f"{root}: committed shard {c['path']} is missing or has the wrong size")
    runs = sorted((a, b, c["path"]) for c in commits for a, b in c.get("sample_ranges", []))
    for (_a0, b0, p0), (a1, _b1, p1) in zip(runs, runs[1:]):
        if a1 < b0:
            raise StoreFormatError(f"{root}: sample id {a1} is stored twice ({p0} and {p1})")
    # Order shards by first sample id, so a store reads in sample order whatever the rank layout.
    commits.sort(key=lambda c: (c["first_sample_id"], c["rank"], c["seq"]))
    manifest = build_manifest(cfg, commits)
    total, positions = _sum_priors(root, cfg["vocab_size"], commits, world_size)
    if positions:
        blob = (total / positions).astype("<f4").tobytes()
        atomic_write_bytes(root / TAIL_PRIOR, blob)
        manifest["tail_prior"] = {"path": TAIL_PRIOR, "dtype": "float32", "positions": int(positions),
                                  "sha256": hashlib.sha256(blob).hexdigest(), "mix": DEFAULT_PRIOR_MIX}
    atomic_write_json(root / MANIFEST, manifest)
    return manifest


def _sum_priors(root: Path, vocab: int, commits: list[dict], world_size: int):
    total = np.zeros(vocab, dtype=np.float64)
    positions = 0
    dones = []
    for r in range(world_size):
        d = root / done_name(r)
        if d.exists():
            rec = read_json(d, "rank done marker")
            if isinstance(rec, dict) and rec.get("prior_positions"):
                dones.append(dict(rec, path=d.name, _file=done_name(r) + ".prior"))
    for c in list(commits) + dones:
        if not c.get("prior_positions"):
            continue
        p = root / (c["_file"] if "_file" in c else prior_name(c["rank"], c["seq"]))
        blob = p.read_bytes() if p.exists() else b""
        if len(blob) != 8 * vocab or hashlib.sha256(blob).hexdigest() != c.get("prior_sha256"):
            raise StoreFormatError(f"{root}: teacher-mass file of {c['path']} is missing or damaged; rerun the compile")
        total += np.frombuffer(blob, dtype="<f8")
        positions += int(c["prior_positions"])
    return total, positions


__all__ = ["StoreWriter", "finalize_store", "DEFAULT_SHARD_BYTES"]
