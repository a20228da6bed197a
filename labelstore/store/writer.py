"""StoreWriter: a crash-safe, resumable, sharded writer for label stores.

Protocol (docs/FORMAT.md, "Writing"): rows accumulate into Arrow record batches, batches into a shard
written under ``shards/.tmp-...``. ``commit()`` closes the shard (Arrow footer), fsyncs it, renames it to
its final name, fsyncs the directory, and only then writes the shard's commit record. A shard without a
commit record does not exist: resume deletes it. ``close()`` marks the rank done; the manifest is written
last, atomically, by :func:`finalize_store` once every rank is done.
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
    ConfigMismatchError,
    LabelStoreError,
    StoreCorruptError,
    StoreFormatError,
    StoreLockedError,
    StoreNotFinalizedError,
    StoreWriteError,
)
from labelstore.store.arrow_file import check_ipc_file
from labelstore.store.format import META_KEY, build_schema, encode_row, normalize_meta, rows_to_batch, shard_identity
from labelstore.store.manifest import (
    COMMIT_RE,
    CONFIG,
    MANIFEST,
    TAIL_PRIOR,
    atomic_write_bytes,
    atomic_write_json,
    build_manifest,
    commit_name,
    config_with_digest,
    create_exclusive_json,
    done_name,
    fsync_dir,
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
from labelstore.store.safefs import check_store_dirs, is_regular, open_nofollow_write, open_regular, unlink_own

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
            commits = self._check_own_files()
            self._cleanup_uncommitted({c["path"] for c in commits})
            self._seq = max((c["seq"] for c in commits), default=-1) + 1
            self._resume_done_marker()
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
        if ver != self.meta["format_version"]:
            raise ConfigMismatchError(
                f"{self.root} was started by a labelstore writing format version {ver!r}; this one writes "
                f"{self.meta['format_version']} and cannot add shards to it. Finish the compile with the labelstore "
                "version that started it, or compile into a new --out directory."
            )
        if isinstance(existing.get("store_id"), str):
            self.meta["store_id"] = existing["store_id"]  # the store's identity, not a setting: adopt it
        diffs = _meta_diff(existing, self.meta)
        if diffs:
            raise ConfigMismatchError(
                f"{self.root} was written with different settings:\n  " + "\n  ".join(diffs)
                + "\nRerun with the store's settings to resume it, or write to a new --out directory."
            )

    def _check_own_files(self) -> list[dict]:
        """This rank's commit records, each validated, with its shard's size and sha256 and its teacher-mass file
        checked (a resume keeps these shards, so it must know they are intact). Damage raises StoreCorruptError
        listing exactly the files to remove: their samples are then recomputed by the next run."""
        damaged: list[tuple[str, list[str]]] = []
        commits = []
        r = f"r{self.rank:05d}"
        for p in sorted((self.root / "commits").glob(f"{r}-*.json")):
            m = COMMIT_RE.fullmatch(p.name)
            if not m:
                continue  # not a name this writer uses: left alone
            seq = int(m.group(2))
            own = [commit_name(self.rank, seq), shard_name(self.rank, seq), prior_name(self.rank, seq)]
            try:
                rec = read_json(p, "commit record")
                validate_commit_record(rec, str(p))
                if rec["path"] != shard_name(self.rank, seq):
                    raise StoreFormatError(f"{p} names shard {rec['path']}")
            except LabelStoreError as exc:
                damaged.append((f"commit record {p.name} is damaged ({exc})", own))
                continue
            shard = self.root / rec["path"]
            if not is_regular(shard):
                damaged.append((f"committed shard {rec['path']} is missing or not a regular file", own))
                continue
            if shard.stat().st_size != rec["bytes"] or sha256_file(shard) != rec["sha256"]:
                damaged.append((f"committed shard {rec['path']} changed after it was written (size or sha256)", own))
                continue
            if rec.get("prior_positions"):
                prior = self.root / prior_name(self.rank, seq)
                if not is_regular(prior) or _sha256_bytes(prior) != rec.get("prior_sha256"):
                    damaged.append((f"teacher-mass file {prior.name} is missing or damaged", own))
                    continue
            commits.append(rec)
        if damaged:
            files = sorted({f for _, fs in damaged for f in fs if os.path.lexists(self.root / f)})
            raise StoreCorruptError(
                f"{self.root}: files of rank {self.rank} were damaged after they were written:\n  "
                + "\n  ".join(why for why, _ in damaged)
                + "\nRemove exactly these files, then rerun the same command (their samples are recomputed):\n  "
                + "rm " + " ".join(shlex.quote(str(self.root / f)) for f in files)
            )
        return commits

    def _resume_done_marker(self) -> None:
        """Resuming a finished rank: carry its pending teacher mass over (checked), then reopen the rank."""
        done = self.root / done_name(self.rank)
        if not os.path.lexists(done):
            return
        blob_path = self.root / (done_name(self.rank) + ".prior")
        try:
            rec = read_json(done, "rank done marker")
            if not isinstance(rec, dict):
                raise StoreFormatError(f"{done} is not a JSON object")
            if rec.get("prior_positions"):
                blob = blob_path.read_bytes() if is_regular(blob_path) else b""
                if len(blob) != 8 * self.meta["vocab_size"] or hashlib.sha256(blob).hexdigest() != rec.get(
                        "prior_sha256"):
                    raise StoreFormatError(f"teacher-mass file {blob_path.name} is missing or damaged")
                self._prior_sum += np.frombuffer(blob, dtype="<f8")
                self._prior_positions += int(rec["prior_positions"])
        except LabelStoreError as exc:
            raise StoreCorruptError(
                f"{self.root}: the done marker of rank {self.rank} is damaged ({exc}). Remove exactly these files, "
                f"then rerun the same command: rm {shlex.quote(str(done))} {shlex.quote(str(blob_path))}"
            ) from None
        unlink_own(done, "done marker")

    def _is_own_shard(self, p: Path) -> bool:
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
        return (m is not None and isinstance(meta, dict) and meta.get("store_id") == self.meta["store_id"]
                and ident == {"rank": int(m.group(1)), "seq": int(m.group(2))})

    def _cleanup_uncommitted(self, committed: set[str]) -> None:
        """Delete this rank's temporary files and shards without a commit record: only names this writer uses
        (``rRRRRR-SSSSSS.arrow``, ``.tmp-rRRRRR-...``), only regular files; anything else is left alone."""
        r = f"r{self.rank:05d}"
        own_shard = re.compile(rf"(\.tmp-)?{r}-[0-9]{{6}}\.arrow", re.ASCII)
        for p in (self.root / "shards").iterdir():
            if not own_shard.fullmatch(p.name) or f"shards/{p.name}" in committed:
                continue
            if not p.name.startswith(".tmp-") and not self._is_own_shard(p):
                raise StoreWriteError(
                    f"{p} has the name of a shard of rank {self.rank} but is not one this store wrote (no commit "
                    "record, and its content does not carry this store's id and its name's rank and sequence "
                    "number). It is left untouched: move it out of the store, then rerun the same command."
                )
            unlink_own(p, "uncommitted shard")
        own_tmp = re.compile(rf"\.tmp-{r}-[0-9]{{6}}\.(json|prior)\.[0-9]+", re.ASCII)
        for p in (self.root / "commits").glob(f".tmp-{r}-*"):
            if own_tmp.fullmatch(p.name):
                unlink_own(p, "temporary commit file")
        for p in (self.root / "commits").glob(f"{r}-*.prior"):
            if re.fullmatch(rf"{r}-[0-9]{{6}}\.prior", p.name) and not os.path.lexists(p.with_suffix(".json")):
                unlink_own(p, "teacher-mass file")  # written before a commit record that never came

    # ------------------------------------------------------------------------------------ queries
    def committed_ranges(self) -> np.ndarray:
        """int64 [n, 2]: sorted, merged ``[start, end)`` runs of the sample ids committed by any rank (what a
        resume must skip). Built from validated commit records, never expanded id by id."""
        runs = sorted((a, b) for c in list_commits(self.root) for a, b in c["sample_ranges"])
        merged: list[list[int]] = []
        for a, b in runs:
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        return np.asarray(merged, dtype=np.int64).reshape(-1, 2)

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
    manifest = build_manifest(cfg, commits, tail_prior)
    write_manifest(root, manifest)
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


__all__ = ["StoreWriter", "finalize_store", "DEFAULT_SHARD_BYTES"]
