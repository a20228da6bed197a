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
    StoreLockedError,
    StoreWriteError,
)
from labelstore.store.format import (
    WRITABLE_VERSIONS,
    build_schema,
    encode_row,
    normalize_meta,
    row_coder,
    rows_to_batch,
)
from labelstore.store.manifest import (
    CONFIG,
    MANIFEST,
    atomic_write_bytes,
    atomic_write_json,
    commit_name,
    config_with_digest,
    create_exclusive_json,
    done_name,
    fsync_dir,
    list_commits,
    prior_name,
    read_config,
    sha256_file,
    shard_name,
)
from labelstore.store.resume import check_own_files, cleanup_uncommitted, finalize_store, reopen_done_rank
from labelstore.store.safefs import check_store_dirs, is_regular, open_nofollow_write, unlink_own

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


def merged_ranges(records) -> np.ndarray:
    """int64 [n, 2]: the sorted, merged ``[start, end)`` runs of the commit records' ``sample_ranges``."""
    runs = sorted((a, b) for c in records for a, b in c["sample_ranges"])
    merged: list[list[int]] = []
    for a, b in runs:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return np.asarray(merged, dtype=np.int64).reshape(-1, 2)


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
        self._compressor = row_coder(self.meta)  # None for "packed"
        self._lock_fd = None
        self._closed = False
        self._rows: list = []
        self._pending_bytes = 0
        self._shard = None  # (tmp path, file, ipc writer)
        self._shard_stats = None
        self._prior_sum = np.zeros(self.meta["vocab_size"], dtype=np.float64)
        self._prior_positions = 0
        # ``--plan units``: a labelstore.teacher.units.UnitTracker whose record() each commit record carries
        self.unit_progress = None
        check_store_dirs(self.root)  # before anything is created, written or deleted
        try:
            for sub in ("shards", "commits", "locks"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreWriteError(f"cannot create store directory {self.root}: {exc.strerror or exc}") from None
        check_store_dirs(self.root)
        self._acquire_lock()
        try:
            self._check_config()
            self.schema = build_schema(self.meta)
            commits = check_own_files(self.root, rank)
            cleanup_uncommitted(self.root, rank, {c["path"] for c in commits}, self.meta["store_id"])
            self._seq = max((c["seq"] for c in commits), default=-1) + 1
            mass, positions = reopen_done_rank(self.root, rank, self.meta["vocab_size"])
            if positions:
                self._prior_sum += mass
                self._prior_positions += positions
        except BaseException:
            self._release_lock()
            raise

    # ------------------------------------------------------------------------------------ setup
    def _acquire_lock(self) -> None:
        lock_path = self.root / "locks" / f"r{self.rank:05d}.lock"
        try:
            fd = open_nofollow_write(lock_path, os.O_RDWR | os.O_CREAT, "lock file")  # a link is refused
            if not is_regular(lock_path):
                os.close(fd)
                raise StoreWriteError(f"lock file {lock_path} is not a regular file; remove it and rerun")
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
        if create_exclusive_json(cfg, config_with_digest(self.meta)):
            return
        existing = read_config(self.root)
        ver = existing.get("format_version")
        if ver in WRITABLE_VERSIONS and self.meta["format_version"] in WRITABLE_VERSIONS:
            self.meta["format_version"] = ver  # 3 and 4 differ only in the manifest's shard table: finish as started
        if ver != self.meta["format_version"]:
            raise ConfigMismatchError(
                f"{self.root} was started by a labelstore writing format version {ver!r}; this one writes "
                f"{self.meta['format_version']} and cannot add shards to it. Finish the compile with the labelstore "
                "version that started it, or compile into a new --out directory."
            )
        if isinstance(existing.get("store_id"), str):
            self.meta["store_id"] = existing["store_id"]  # the store's identity, not a setting: adopt it
        if isinstance(existing.get("runtime"), dict):
            # every shard carries the store's metadata, which readers compare with the manifest's (the config's):
            # a resume on another world size, device or version writes the store's recorded runtime, not its own
            self.meta["runtime"] = existing["runtime"]
        diffs = _meta_diff(existing, self.meta)
        if diffs:
            raise ConfigMismatchError(
                f"{self.root} was written with different settings:\n  " + "\n  ".join(diffs)
                + "\nRerun with the store's settings to resume it, or write to a new --out directory."
            )

    # ------------------------------------------------------------------------------------ queries
    def committed_ranges(self) -> np.ndarray:
        """int64 [n, 2]: sorted, merged ``[start, end)`` runs of the sample ids committed by any rank (what a
        resume must skip). Built from validated commit records, never expanded id by id."""
        return merged_ranges(list_commits(self.root))

    def committed_mask(self, sample_ids, ranges: np.ndarray | None = None) -> np.ndarray:
        """bool mask: which of ``sample_ids`` are committed (binary search over :meth:`committed_ranges`)."""
        r = self.committed_ranges() if ranges is None else ranges
        ids = np.asarray(sample_ids, dtype=np.int64)
        j = np.searchsorted(r[:, 0], ids, side="right") - 1
        return (j >= 0) & (ids < r[np.maximum(j, 0), 1]) if len(r) else np.zeros(ids.shape, dtype=bool)

    def committed_sample_ids(self) -> np.ndarray:
        """Sorted sample ids committed by any rank, expanded (one int64 per committed row: bounded by the rows the
        commit records declare and validate). Prefer :meth:`committed_mask` for large stores."""
        r = self.committed_ranges()
        return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in r]) if len(r) else np.zeros(0, np.int64)

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
                unlink_own(tmp, "temporary shard")
                os.close(open_nofollow_write(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, "temporary shard"))
                f = pa.OSFile(str(tmp), "wb")  # the regular file just created (never a link)
                self._shard = (tmp, f, pa.ipc.new_file(f, build_schema(self.meta, self.rank, self._seq)))
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
            if self.unit_progress is not None:  # docs/FORMAT.md 7: this rank's progress by work unit
                record["units"] = self.unit_progress.record()
            if self._prior_positions:
                blob = self._prior_sum.astype("<f8").tobytes()
                atomic_write_bytes(self.root / prior_name(self.rank, self._seq), blob)
                record["prior_positions"] = int(self._prior_positions)
                record["prior_sha256"] = hashlib.sha256(blob).hexdigest()
            atomic_write_json(self.root / commit_name(self.rank, self._seq), record)
            unlink_own(self.root / MANIFEST, "manifest")  # the store grows: its old manifest no longer describes it
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


__all__ = ["StoreWriter", "finalize_store", "DEFAULT_SHARD_BYTES"]
