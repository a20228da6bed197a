"""RemoteStoreWriter: write one rank of a store at an object-storage URL, crash-safe without rename.

Shards are built exactly as on a local disk, in a local *spool* store (``$LABELSTORE_SPOOL_DIR`` or
``~/.cache/labelstore/spool/<url hash>-rRRRRR``): a shard is closed, fsynced and committed there first, then a
background pool publishes it (docs/FORMAT.md section 8): shard object, size/MD5 check, teacher-mass object, and
the commit record last; only then are the local copies deleted. At most ``max_pending`` committed shards wait for
upload; the teacher stalls only when the uploads fall that far behind. A transient failure is retried with
backoff; a permanent one (no such bucket, access denied) stops the compile with the store intact: the shards
still in the spool are published by the next run on this machine, or recomputed elsewhere.

A writer killed at any moment loses at most its open shard: a committed shard is in the spool (published by the
next run here) or in the bucket with its record. A shard object without a record (killed between the two PUTs)
and the rank's unfinished multipart uploads are deleted by the rank's next writer.

Concurrency: one writer per rank, enforced by a lock object ``locks/rRRRRR.lock`` created with
``If-None-Match: *`` and kept alive by a heartbeat (``If-Match`` on its ETag). A lock whose holder is a dead
process on this host, or whose heartbeat is older than the lease (``LABELSTORE_LOCK_LEASE_S``, 600 s), is taken
over with ``If-Match``, so exactly one of several racing writers wins.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from labelstore.errors import (
    ConfigMismatchError,
    LabelStoreError,
    RemoteStorageError,
    StoreLockedError,
    StoreWriteError,
)
from labelstore.store import objectstore as obj
from labelstore.store.format import WRITABLE_VERSIONS, normalize_meta, with_digest
from labelstore.store.manifest import (
    CONFIG,
    MANIFEST,
    commit_name,
    done_name,
    list_commits,
    prior_name,
    read_config,
    shard_name,
)
from labelstore.store.remote_store import RemoteStore, is_rank_shard
from labelstore.store.safefs import pid_alive
from labelstore.store.writer import DEFAULT_BATCH_BYTES, DEFAULT_SHARD_BYTES, StoreWriter, _meta_diff, merged_ranges

LEASE_ENV = "LABELSTORE_LOCK_LEASE_S"
SPOOL_ENV = "LABELSTORE_SPOOL_DIR"
FAULT_ENV = "LABELSTORE_FAULT"  # tests: "POINT:N" SIGKILLs this process the N-th time it reaches POINT
_fault_counts: dict[str, int] = {}


def fault(point: str) -> None:
    """Fault injection for the crash tests (no effect unless ``LABELSTORE_FAULT`` names ``point``)."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec.startswith(point + ":"):
        return
    _fault_counts[point] = _fault_counts.get(point, 0) + 1
    if _fault_counts[point] == int(spec.rsplit(":", 1)[1]):
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def default_spool(url: str, rank: int) -> Path:
    base = os.environ.get(SPOOL_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "labelstore", "spool")
    return Path(base) / f"{hashlib.sha256(url.rstrip('/').encode()).hexdigest()[:16]}-r{rank:05d}"


class RemoteLock:
    """The lock object of one rank: created if absent, refreshed by a heartbeat, taken over when stale."""

    def __init__(self, store: RemoteStore, rank: int, lease_s: float | None = None):
        self.store, self.rank = store, rank
        self.rel = f"locks/r{rank:05d}.lock"
        self.lease_s = float(lease_s if lease_s is not None else os.environ.get(LEASE_ENV, 600))
        self.token = uuid.uuid4().hex
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.etag: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread = None

    def _body(self) -> bytes:
        return json.dumps({"host": self.host, "pid": self.pid, "token": self.token,
                           "heartbeat": time.time()}).encode()

    def acquire(self) -> None:
        for _ in range(3):
            if self.store.put(self.rel, self._body(), exclusive=True):
                break
            info = self.store.info(self.rel)
            holder = self.store.get_json(self.rel, "lock") if info is not None else None
            if info is None:
                continue  # released meanwhile: try again
            stale, why = self._stale(holder, info)
            if not stale:
                raise StoreLockedError(
                    f"{self.store.url} (rank {self.rank}) is being written by another live writer ({why}). Wait for "
                    f"it to finish or stop it; a crashed writer's lock is taken over after {self.lease_s:.0f} s "
                    f"without heartbeat ({LEASE_ENV}), or at once on the same host.")
            if self.store.put(self.rel, self._body(), if_match=info.get("ETag")):
                print(f"labelstore: note: took over the stale lock of rank {self.rank} ({why})", file=sys.stderr)
                break
        else:
            raise StoreLockedError(f"{self.store.url} (rank {self.rank}): another writer keeps taking the lock")
        self.etag = self._etag()
        self._thread = threading.Thread(target=self._beat, name="labelstore-lock", daemon=True)
        self._thread.start()

    def _etag(self) -> str | None:
        info = self.store.info(self.rel)
        return info.get("ETag") if info else None

    def _stale(self, holder, info) -> tuple[bool, str]:
        if not isinstance(holder, dict):
            return True, "an unreadable lock object"
        who = f"pid {holder.get('pid')} on {holder.get('host')}"
        if holder.get("host") == self.host and isinstance(holder.get("pid"), int) and not pid_alive(holder["pid"]):
            return True, f"{who}, which is no longer running"
        modified = info.get("LastModified")
        age = (datetime.now(timezone.utc) - modified).total_seconds() if isinstance(modified, datetime) else \
            time.time() - float(holder.get("heartbeat") or 0)
        if age > self.lease_s:
            return True, f"{who}, silent for {age:.0f} s"
        return False, f"{who}, heartbeat {age:.0f} s ago"

    def _beat(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                if not self.store.put(self.rel, self._body(), if_match=self.etag):
                    self.lost = True
                    return
                self.etag = self._etag()
            except LabelStoreError:
                pass  # transient trouble beyond retries: the next beat tries again; the lease is long

    def check(self) -> None:
        if self.lost:
            raise StoreLockedError(f"{self.store.url} (rank {self.rank}): another writer took this rank's lock "
                                   "(this one was silent past the lease); stopping without publishing more")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.etag is not None and not self.lost:
            try:
                held = self.store.get_json(self.rel, "lock")
                if isinstance(held, dict) and held.get("token") == self.token:
                    self.store.delete(self.rel)
            except LabelStoreError:
                pass
        self.etag = None


class RemoteStoreWriter(StoreWriter):
    """A :class:`~labelstore.store.writer.StoreWriter` whose store is at an object-storage URL.

    Args (beyond StoreWriter's):
        spool: local folder where shards are built before upload (default :func:`default_spool`).
        storage_options: fsspec options (credentials, endpoint); also ``LABELSTORE_STORAGE_OPTIONS``.
        upload_workers: parallel uploads; max_pending: committed shards that may wait for upload.
    """

    def __init__(self, url: str, meta: dict, *, rank: int = 0, world_size: int = 1,
                 shard_bytes: int = DEFAULT_SHARD_BYTES, batch_bytes: int = DEFAULT_BATCH_BYTES,
                 spool=None, storage_options: dict | None = None, upload_workers: int = 2, max_pending: int = 4):
        self.url = url.rstrip("/")
        self.remote = RemoteStore(self.url, storage_options)
        self._lock_remote = RemoteLock(self.remote, rank)
        self._pool = None
        self._errors: list[BaseException] = []
        self._slots = threading.Semaphore(max(1, max_pending))
        self._pending: list = []
        self._mutex = threading.Lock()
        self._manifest_dropped = False
        if not isinstance(rank, int) or not isinstance(world_size, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got {rank!r} of {world_size!r}")
        self._lock_remote.acquire()
        try:
            meta = normalize_meta(meta)
            self._remote_config(meta)
            spool = Path(spool) if spool is not None else default_spool(self.url, rank)
            self._check_spool(spool, meta)
            super().__init__(spool, meta, rank=rank, world_size=world_size, shard_bytes=shard_bytes,
                             batch_bytes=batch_bytes)
            self._pool = ThreadPoolExecutor(max_workers=max(1, upload_workers), thread_name_prefix="labelstore-up")
            self._resume_remote()
        except BaseException:
            if getattr(self, "_lock_fd", None) is not None:
                self._release_lock()
            self._lock_remote.release()
            raise

    # ------------------------------------------------------------------ opening
    def _remote_config(self, meta: dict) -> None:
        if self.remote.put_json(CONFIG, with_digest(meta), exclusive=True):
            return
        existing = self.remote.read_config()
        if existing is None:
            raise RemoteStorageError(f"{self.remote.where(CONFIG)} could not be created nor read; rerun")
        ver = existing.get("format_version")
        if ver in WRITABLE_VERSIONS and meta["format_version"] in WRITABLE_VERSIONS:
            meta["format_version"] = ver  # 3 and 4 differ only in the manifest's shard table: finish as started
        if ver != meta["format_version"]:
            raise ConfigMismatchError(
                f"{self.url} was started by a labelstore writing format version {ver!r}; this one writes "
                f"{meta['format_version']}. Finish the compile with the version that started it, or use a new --out.")
        if isinstance(existing.get("store_id"), str):
            meta["store_id"] = existing["store_id"]
        if isinstance(existing.get("runtime"), dict):  # shards carry the store's metadata (StoreWriter._check_config)
            meta["runtime"] = existing["runtime"]
        diffs = _meta_diff(existing, meta)
        if diffs:
            raise ConfigMismatchError(f"{self.url} was written with different settings:\n  " + "\n  ".join(diffs)
                                      + "\nRerun with the store's settings to resume it, or write to a new --out.")

    @staticmethod
    def _check_spool(spool: Path, meta: dict) -> None:
        """A spool left by another store or other settings is not ours to publish: empty it."""
        if not (spool / CONFIG).exists():
            return
        try:
            same = not _meta_diff(read_config(spool), meta)
        except LabelStoreError:
            same = False
        if not same:
            n = len(list((spool / "commits").glob("r*-*.json"))) if (spool / "commits").is_dir() else 0
            if n:
                print(f"labelstore: note: discarding {n} unpublished shard(s) in {spool}: they belong to a compile "
                      "with other settings", file=sys.stderr)
            for sub in ("shards", "commits", "locks"):
                shutil.rmtree(spool / sub, ignore_errors=True)
            (spool / CONFIG).unlink(missing_ok=True)

    def _resume_remote(self) -> None:
        """Reconcile the spool with the bucket: publish what the spool committed, delete the rank's orphans."""
        r = self.remote
        self._records = r.commit_records()  # every rank's (a resume skips samples any rank committed)
        mine = {c["seq"]: c for c in self._records if c["rank"] == self.rank}
        local = {c["seq"]: c for c in list_commits(self.root, self.rank)}
        publish = []
        for seq, rec in sorted(local.items()):
            there = mine.get(seq)
            if there is None:
                publish.append(rec)
            else:  # published by a run killed before it cleaned its spool, or superseded: the bucket wins
                self._drop_local(seq)
        keep = {shard_name(self.rank, s) for s in local if s not in mine}
        for rel in r.listing("shards"):
            m = is_rank_shard(rel, self.rank)
            if m and rel not in keep and int(m.group(2)) not in mine:
                r.delete(rel)  # a shard object whose commit record never came
        for rel in r.listing("commits"):
            name = rel.rsplit("/", 1)[-1]
            if name.startswith(f"r{self.rank:05d}-") and name.endswith(".prior") and int(name[7:13]) not in mine \
                    and int(name[7:13]) not in local:
                r.delete(rel)
        self._abort_multipart()
        done = r.get_json(done_name(self.rank), "rank done marker")
        if isinstance(done, dict):  # resuming a finished rank: take its teacher mass back, reopen it
            if done.get("prior_positions"):
                import numpy as np

                blob = r.get(done_name(self.rank) + ".prior", "teacher-mass file", 8 * self.meta["vocab_size"] + 1)
                if not blob or hashlib.sha256(blob).hexdigest() != done.get("prior_sha256"):
                    raise StoreWriteError(f"{r.where(done_name(self.rank))}: its teacher-mass object is missing or "
                                          "damaged; delete both objects and rerun the same command")
                self._prior_sum += np.frombuffer(blob, dtype="<f8")
                self._prior_positions += int(done["prior_positions"])
            r.delete(done_name(self.rank))
            r.delete(done_name(self.rank) + ".prior")
        self._seq = max([self._seq - 1, *mine, *local], default=-1) + 1
        for rec in publish:
            self._submit(rec)

    def _abort_multipart(self) -> None:
        """Abort the rank's multipart uploads a killed writer left unfinished (S3 only; invisible otherwise)."""
        if not obj.supports_conditional_writes(self.remote.fs):
            return
        bucket, _, prefix = self.remote.root.partition("/")
        key_prefix = f"{prefix}/shards/r{self.rank:05d}-" if prefix else f"shards/r{self.rank:05d}-"
        try:
            out = self.remote.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key_prefix)
            for up in out.get("Uploads", []):
                self.remote.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=up["Key"],
                                       UploadId=up["UploadId"])
        except Exception:  # noqa: BLE001 - best effort: a bucket lifecycle rule also expires them
            pass

    # ------------------------------------------------------------------ publishing
    def _drop_local(self, seq: int) -> None:
        for rel in (commit_name(self.rank, seq), shard_name(self.rank, seq), prior_name(self.rank, seq)):
            try:
                (self.root / rel).unlink()
            except FileNotFoundError:
                pass

    def _submit(self, rec: dict) -> None:
        self._raise_errors()
        self._slots.acquire()  # backpressure: at most max_pending shards wait for upload
        try:
            fut = self._pool.submit(self._publish, rec)
        except BaseException:
            self._slots.release()
            raise
        with self._mutex:
            self._pending.append(fut)

    def _publish(self, rec: dict) -> None:
        try:
            self._publish_one(rec)
        except BaseException as exc:  # noqa: BLE001 - reported by the writer's next call
            with self._mutex:
                self._errors.append(exc)
        finally:
            self._slots.release()

    def _publish_one(self, rec: dict) -> None:
        r, seq = self.remote, rec["seq"]
        self._lock_remote.check()
        with self._mutex:
            if not self._manifest_dropped:  # the store grows: its old manifest no longer describes it
                r.delete(MANIFEST)
                self._manifest_dropped = True
        local = self.root / rec["path"]
        obj.call(r.fs.put_file, str(local), r.key(rec["path"]), url=r.where(rec["path"]), action="uploading shard")
        fault("shard-uploaded")
        self._check_uploaded(rec["path"], local)
        prior = self.root / prior_name(self.rank, seq)
        if rec.get("prior_positions"):
            r.put(prior_name(self.rank, seq), prior.read_bytes())
        fault("prior-uploaded")
        r.put(commit_name(self.rank, seq), (self.root / commit_name(self.rank, seq)).read_bytes())
        fault("record-uploaded")
        with self._mutex:
            self._records.append(rec)
            self._drop_local(seq)

    def _check_uploaded(self, rel: str, local: Path) -> None:
        info = self.remote.info(rel)
        size = local.stat().st_size
        if info is None or info.get("size") != size:
            raise StoreWriteError(f"uploaded shard {self.remote.where(rel)} is {None if info is None else info['size']}"
                                  f" bytes, the local file {size}: the upload was damaged; rerun to resume")
        tag = str(info.get("ETag") or "").strip('"')
        if len(tag) == 32 and "-" not in tag:  # single-part S3 upload: the ETag is the MD5 of the bytes
            md5 = hashlib.md5(usedforsecurity=False)
            with open(local, "rb") as f:
                for chunk in iter(lambda: f.read(8 << 20), b""):
                    md5.update(chunk)
            if md5.hexdigest() != tag:
                raise StoreWriteError(f"uploaded shard {self.remote.where(rel)} has MD5 {tag}, the local file "
                                      f"{md5.hexdigest()}: the upload was damaged; rerun to resume")

    def _raise_errors(self) -> None:
        with self._mutex:
            errs, self._errors = self._errors, []
        if errs:
            exc = errs[0]
            if isinstance(exc, LabelStoreError):
                raise type(exc)(f"{exc} (the shards not yet published stay in {self.root} and are published by "
                                "the next run on this machine)") from None
            raise StoreWriteError(f"publishing a shard to {self.url} failed: {obj.redact(repr(exc))}. Committed "
                                  "shards are intact; rerun the same command to resume") from None

    def _drain(self) -> None:
        with self._mutex:
            futs, self._pending = self._pending, []
        for f in futs:
            f.result()
        self._raise_errors()

    # ------------------------------------------------------------------ StoreWriter overrides
    def committed_ranges(self):
        with self._mutex:  # (publishing threads move records from the spool to the bucket)
            recs = list(self._records) + list_commits(self.root, self.rank)  # spooled: committed, not published
        return merged_ranges(recs)

    def commit_records(self) -> list[dict]:
        """Every rank's commit records read when this writer opened, and this rank's spooled ones since."""
        with self._mutex:
            return list(self._records) + list_commits(self.root, self.rank)

    def commit(self) -> None:
        self._lock_remote.check()
        seq = self._seq
        super().commit()
        if self._seq != seq:  # a shard was committed locally: publish it
            fault("spooled")
            self._submit(json.loads((self.root / commit_name(self.rank, seq)).read_bytes()))

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.commit()
            self._drain()
            done = {"rank": self.rank, "world_size": self.world_size, "next_seq": self._seq}
            if self._prior_positions:
                blob = self._prior_sum.astype("<f8").tobytes()
                self.remote.put(done_name(self.rank) + ".prior", blob)
                done.update(prior_positions=int(self._prior_positions), prior_sha256=hashlib.sha256(blob).hexdigest())
            self.remote.put_json(done_name(self.rank), done)
            fault("done")
            if self.world_size == 1:
                self.remote.finalize(1)
        finally:
            self._closed = True
            self._shutdown()
        shutil.rmtree(self.root, ignore_errors=True)  # everything it held is published

    def abort(self) -> None:
        self._rows, self._pending_bytes = [], 0
        self._abort_shard()
        self._closed = True
        try:
            with self._mutex:
                futs = list(self._pending)
            for f in futs:  # committed shards already queued: publish them if the store lets us
                f.exception(timeout=300)
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._release_lock()
        self._lock_remote.release()

    def __del__(self):  # pragma: no cover - best effort
        if not getattr(self, "_closed", True):
            self._release_lock()


def finalize_remote(url: str, world_size: int, storage_options: dict | None = None) -> dict:
    return RemoteStore(url, storage_options).finalize(world_size)


__all__ = ["RemoteStoreWriter", "RemoteLock", "finalize_remote", "default_spool"]
