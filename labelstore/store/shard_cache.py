"""Reading a store at a URL: its manifest and shards, fetched on demand into a local cache.

A remote store is read through a cache folder (default ``$LABELSTORE_CACHE_DIR`` or ``~/.cache/labelstore/remote``)::

    CACHE/<sha256(url)[:16]>/<sha256(manifest bytes)[:16]>/manifest.json
                                                           tail_prior.f32
                                                           shards/rRRRRR-SSSSSS.arrow

so a store rewritten at the same URL (another manifest) never mixes with an older copy. Opening downloads only the
manifest (two requests); a shard is downloaded the first time a row of it is read, whole, to a unique temporary
name, its size and sha256 checked against the manifest (a mismatch is a StoreCorruptError naming the object, and
nothing is kept), then renamed into place. Cached shards are then memory-mapped like a local store's.

Several processes (DataLoader workers, ranks on one host) may share the folder: a per-shard ``.dl-NAME`` lock file
lets one of them download a shard while the others wait for it, and the rename is atomic. The folder is kept under
``cache_bytes`` (default 64 GiB, or ``$LABELSTORE_CACHE_BYTES``) by deleting the least recently opened shards not
in use here; a shard another process still maps stays readable (POSIX keeps an unlinked file's pages).

A background pool downloads up to ``prefetch`` shards ahead, in the order reads will need them:
:meth:`RemoteShards.plan` takes the upcoming sample indices (a sampler's epoch), and each shard opened moves the
window on. Without a plan the window is store order.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from labelstore.errors import (
    LabelStoreError,
    RemoteStorageError,
    StoreCorruptError,
    StoreFormatError,
    StoreNotFinalizedError,
)
from labelstore.store import objectstore as obs
from labelstore.store.index import INDEX, ShardTable, shard_table
from labelstore.store.manifest import CONFIG, MANIFEST, MAX_MANIFEST_BYTES, TAIL_PRIOR, load_manifest
from labelstore.store.safefs import pid_alive

CACHE_DIR_ENV = "LABELSTORE_CACHE_DIR"
CACHE_BYTES_ENV = "LABELSTORE_CACHE_BYTES"
DEFAULT_CACHE_BYTES = 64 << 30
DEFAULT_PREFETCH = 4
CHUNK = 8 << 20
_POLL_S = 0.05


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env) if env else Path.home() / ".cache" / "labelstore" / "remote"


def default_cache_bytes() -> int:
    env = os.environ.get(CACHE_BYTES_ENV)
    if not env:
        return DEFAULT_CACHE_BYTES
    try:
        return int(float(env))
    except ValueError:
        raise ValueError(f"{CACHE_BYTES_ENV}={env!r} is not a number of bytes (e.g. 68719476736 or 64e9)") from None


def first_access_order(shard_starts, indices) -> np.ndarray:
    """The shards that reading ``indices`` (sample indices, in reading order) touches, in first-touch order.
    ``shard_starts``: cumulative row starts, or a :class:`labelstore.store.index.ShardTable`."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    table = shard_starts if isinstance(shard_starts, ShardTable) else ShardTable.from_starts(shard_starts)
    n = table.total_rows
    if idx.size == 0 or n == 0:
        return np.zeros(0, np.int64)
    shards = table.shards_of(idx % n)
    _, first = np.unique(shards, return_index=True)
    return shards[np.sort(first)].astype(np.int64)


def _remap(exc: LabelStoreError, local: str, url: str) -> LabelStoreError:
    """The same error with the cache folder's path replaced by the store's URL."""
    return type(exc)(str(exc).replace(local, url))


class RemoteShards:
    """The local cache of one remote store: its validated manifest, and its shards on demand."""

    def __init__(self, url: str, *, storage_options: dict | None = None, cache_dir=None, cache_bytes=None,
                 prefetch: int = DEFAULT_PREFETCH):
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.cache_bytes = default_cache_bytes() if cache_bytes is None else int(cache_bytes)
        self.prefetch_depth = max(0, int(prefetch))
        if self.cache_bytes < 1:
            raise ValueError(f"cache_bytes must be positive, got {cache_bytes!r}")
        self.fs, self.rpath = obs.filesystem(self.url, self.storage_options)
        base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.url_dir = base / hashlib.sha256(self.url.encode()).hexdigest()[:16]
        blob = obs.get_bytes(self.fs, obs.join(self.rpath, MANIFEST), url=self.obj_url(MANIFEST),
                             max_bytes=MAX_MANIFEST_BYTES, what="manifest")
        if blob is None:
            self._no_manifest()
        self.root = self.url_dir / hashlib.sha256(blob).hexdigest()[:16]
        (self.root / "shards").mkdir(parents=True, exist_ok=True)
        self._put_small(MANIFEST, blob)
        try:
            self.manifest = load_manifest(self.root)
        except LabelStoreError as exc:
            raise _remap(exc, str(self.root), self.url) from None
        ref = self.manifest.get("index")
        have = self.root / INDEX
        if ref is not None and not (have.is_file() and have.stat().st_size == ref["bytes"]):
            data = obs.get_bytes(self.fs, obs.join(self.rpath, INDEX), url=self.obj_url(INDEX),
                                 max_bytes=ref["bytes"] + 1, what="shard index")
            if data is not None:  # a missing one is reported by the index, below (blocks are checked when read)
                self._put_small(INDEX, data)
        try:
            self.shards = shard_table(self.root, self.manifest)
        except LabelStoreError as exc:
            raise _remap(exc, str(self.root), self.url) from None
        tp = self.manifest.get("tail_prior")
        if tp is not None and not (self.root / TAIL_PRIOR).is_file():
            data = obs.get_bytes(self.fs, obs.join(self.rpath, TAIL_PRIOR), url=self.obj_url(TAIL_PRIOR),
                                 max_bytes=4 * self.manifest["meta"]["vocab_size"] + 1, what="tail prior")
            if data is not None:  # a missing one is reported by LabelStore.tail_prior(), naming it
                self._put_small(TAIL_PRIOR, data)
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._pid = os.getpid()
        self.pinned: set[int] = set()  # shards the owning reader has open
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._futures: dict = {}
        self._plan: np.ndarray | None = None
        self._plan_pos: dict[int, int] = {}
        self._cur: int | None = None  # the shard opened last: the prefetch window starts after it

    def __getstate__(self):
        state = self.__dict__.copy()
        for key in ("_lock", "_pool", "_futures", "pinned", "fs"):
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.fs, self.rpath = obs.filesystem(self.url, self.storage_options)
        self._init_runtime()
        self.plan_shards(state.get("_plan"))

    def _after_fork(self) -> None:
        """A forked child (a DataLoader worker under ``fork``) inherits this object but not its prefetch threads:
        start afresh, keeping the plan."""
        if self._pid != os.getpid():
            plan = self._plan
            self.fs, self.rpath = obs.filesystem(self.url, self.storage_options)  # the parent's is not fork-safe
            self._init_runtime()
            self._plan = plan
            self._plan_pos = {} if plan is None else {int(x): i for i, x in enumerate(plan)}

    def obj_url(self, rel: str) -> str:
        return obs.join(self.url, rel)

    def _no_manifest(self):
        try:
            obs.call(self.fs.info, obs.join(self.rpath, CONFIG), url=self.obj_url(CONFIG), action="reading",
                     storage_options=self.storage_options, passthrough=(FileNotFoundError,))
            has_config = True
        except FileNotFoundError as exc:
            if "bucket does not exist" in str(exc) or "NoSuchBucket" in str(exc):
                raise RemoteStorageError(obs.describe(exc, self.url, "opening store", self.storage_options)) from None
            has_config = False
        if has_config:
            raise StoreNotFinalizedError(
                f"{self.url} has committed shards but no manifest.json: the compile was interrupted or is still "
                "running. Rerun the same `labelstore compile` command to resume and finalize it.")
        raise StoreFormatError(f"{self.url} has no manifest.json; it is not a labelstore store (check the URL: "
                               "a store is the prefix given to `labelstore compile --out`)")

    def _put_small(self, rel: str, data: bytes) -> None:
        dest = self.root / rel
        if dest.is_file() and dest.stat().st_size == len(data) and dest.read_bytes() == data:
            return
        tmp = dest.with_name(f".tmp-{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(data)
        os.replace(tmp, dest)

    # ------------------------------------------------------------------------------ shards
    def local_path(self, s: int) -> Path:
        return self.root / self.shards.record(s)["path"]

    def fetch(self, s: int) -> Path:
        """Shard ``s`` in the cache (downloading it, or waiting for its prefetch); moves the prefetch window on."""
        self._after_fork()
        with self._lock:
            fut = self._futures.pop(s, None)
        if fut is not None:
            fut.result()  # a prefetch's error (corrupt object, unreachable store) surfaces here, where it matters
        p = self._ensure(s)
        self._advance(s)
        return p

    def _ensure(self, s: int) -> Path:
        dest = self.local_path(s)
        lock = dest.with_name(f".dl-{dest.name}")
        while True:
            if dest.is_file():
                try:
                    os.utime(dest)  # least recently *opened* goes first
                except OSError:
                    pass
                return dest
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._wait_for(lock, dest)
                continue
            try:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                if not dest.is_file():
                    self._download(s, dest)
                    self.evict(keep=(s,))
            finally:
                try:
                    os.unlink(lock)
                except OSError:
                    pass

    def _wait_for(self, lock: Path, dest: Path) -> None:
        """Another process (or thread) downloads ``dest``: wait until it is there or the download stops."""
        while lock.exists() and not dest.is_file():
            try:
                pid = int(lock.read_text() or "0")
            except (OSError, ValueError):
                pid = 0
            if pid and not pid_alive(pid):  # its downloader died: take over
                try:
                    os.unlink(lock)
                except OSError:
                    pass
                return
            time.sleep(_POLL_S)

    def _download(self, s: int, dest: Path) -> None:
        rec = self.shards.record(s)
        url = self.obj_url(rec["path"])
        tmp = dest.with_name(f".tmp-{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        try:
            digest, size = obs.call(self._copy, obs.join(self.rpath, rec["path"]), tmp, rec["bytes"], url=url,
                                    action="downloading shard", storage_options=self.storage_options,
                                    passthrough=(FileNotFoundError, StoreCorruptError))
        except FileNotFoundError:
            _unlink(tmp)
            raise StoreCorruptError(f"shard {url} listed in the manifest is missing from the object store; the store "
                                    "is incomplete: re-upload it, or rerun the compile") from None
        except BaseException:
            _unlink(tmp)
            raise
        if size != rec["bytes"] or digest != rec["sha256"]:
            _unlink(tmp)
            what = (f"is {size} bytes, the manifest says {rec['bytes']}" if size != rec["bytes"] else
                    "does not match the sha256 the manifest records")
            raise StoreCorruptError(f"shard {url} {what}: the object was truncated or replaced after the store was "
                                    "written (nothing of it was kept). Re-upload the shard, or run `labelstore verify "
                                    f"{self.url}` for a full report")
        os.replace(tmp, dest)

    def _copy(self, rpath: str, tmp: Path, expected: int) -> tuple[str, int]:
        """Stream one object into ``tmp``, hashing as it goes; never reads more than ``expected + 1`` bytes."""
        h = hashlib.sha256()
        size = 0
        with self.fs.open(rpath, "rb", block_size=CHUNK) as src, open(tmp, "wb") as out:
            while size <= expected:
                chunk = src.read(min(CHUNK, expected + 1 - size))
                if not chunk:
                    break
                h.update(chunk)
                out.write(chunk)
                size += len(chunk)
        return h.hexdigest(), size

    def evict(self, keep=()) -> None:
        """Delete least recently opened shards (not open here, not about to be read) until under ``cache_bytes``."""
        files = []
        with os.scandir(self.root / "shards") as it:
            for e in it:
                if e.name.startswith(".tmp-"):  # a download of a process that died: never renamed, never read
                    pid = e.name.split(".")[-2]
                    if pid.isdigit() and not pid_alive(int(pid)):
                        _unlink(Path(e.path))
                elif e.name.endswith(".arrow") and not e.name.startswith("."):
                    try:
                        st = e.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    files.append((st.st_mtime, st.st_size, e.name))
        total = sum(f[1] for f in files)
        if total <= self.cache_bytes:
            return
        keep = {Path(self.shards.record(s)["path"]).name for s in self._protected() | set(keep)}
        for _, size, name in sorted(files):
            if total <= self.cache_bytes:
                break
            if name in keep:
                continue
            _unlink(self.root / "shards" / name)
            total -= size

    def _protected(self) -> set[int]:
        self._after_fork()
        with self._lock:
            out = set(self.pinned) | set(self._futures)
        return out | set(self._window_after(self._cur))

    # ------------------------------------------------------------------------------ prefetch
    def plan_shards(self, order) -> None:
        """Shards in the order reads will first need them (None: store order); starts fetching the first ones."""
        self._after_fork()
        self._plan = None if order is None else np.asarray(order, dtype=np.int64)
        self._plan_pos = {} if order is None else {int(s): i for i, s in enumerate(self._plan)}
        if order is not None:
            self._submit(self._plan[: self.prefetch_depth])

    def _window_after(self, s: int | None) -> list[int]:
        d = self.prefetch_depth
        if s is None:
            return []
        if self._plan is None:
            return list(range(s + 1, min(s + 1 + d, len(self.shards))))
        i = self._plan_pos.get(int(s))
        return [] if i is None else [int(x) for x in self._plan[i + 1: i + 1 + d]]

    def _advance(self, s: int) -> None:
        self._cur = s
        self._submit(self._window_after(s))

    def _submit(self, shards) -> None:
        if not self.prefetch_depth:
            return
        self._after_fork()
        with self._lock:
            for s in shards:
                s = int(s)
                if s in self._futures or s in self.pinned or self.local_path(s).is_file():
                    continue
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.prefetch_depth, thread_name_prefix="labelstore-prefetch")
                self._futures[s] = self._pool.submit(self._ensure, s)
            done = [k for k, f in self._futures.items() if f.done() and f.exception() is None]
            for k in done:  # finished prefetches need no tracking (failed ones stay, to raise at first use)
                del self._futures[k]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _unlink(p: Path) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


__all__ = ["RemoteShards", "first_access_order", "default_cache_dir", "default_cache_bytes", "DEFAULT_PREFETCH",
           "CACHE_DIR_ENV", "CACHE_BYTES_ENV"]
