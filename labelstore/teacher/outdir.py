"""The ``--out`` directory of a compile: new, a store to resume, or a store to replace; never a user's folder.

* a missing or empty directory: a new store;
* a label store (``config.json``, ``manifest.json``, ``shards/`` or ``commits/``): resumed when its settings
  match. An unfinished store that committed nothing (a compile that failed in its first batch) is replaced
  when the settings changed, since nothing would be lost; one with committed shards is replaced only with
  ``--overwrite``;
* a file, or a non-empty directory that is not a store: refused, so a compile never writes beside (or
  deletes) a user's files. ``--overwrite`` removes only the store's own entries.

An object-storage URL (``s3://bucket/prefix``) follows the same rules, with objects for files and the prefix for
the directory.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from labelstore.errors import ConfigMismatchError, OutputDirectoryError, StoreLockedError, StoreWriteError
from labelstore.store.index import INDEX
from labelstore.store.manifest import CONFIG, MANIFEST, TAIL_PRIOR, list_commits
from labelstore.store.objectstore import is_url

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

STORE_DIRS = ("shards", "commits", "locks")
STORE_FILES = (CONFIG, MANIFEST, TAIL_PRIOR, INDEX)


def is_store(root: Path) -> bool:
    """Whether ``root`` holds a label store (finished or not)."""
    return any((root / n).exists() for n in (CONFIG, MANIFEST, *STORE_DIRS))


def check_out(out) -> bool:
    """Refuse an ``--out`` that is a file or a non-empty non-store folder; True when a store is already there."""
    if is_url(out):
        return _check_remote_out(out)
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise OutputDirectoryError(f"--out {root} is a file, not a directory: choose a new or empty directory")
    if not root.exists():
        return False
    if is_store(root):
        return True
    entries = sorted(p.name for p in root.iterdir())
    if entries:
        raise OutputDirectoryError(
            f"--out {root} is a non-empty directory that is not a label store (it holds "
            f"{', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''}): choose a new or empty directory; "
            "nothing was written")
    return False


def _check_remote_out(url: str) -> bool:
    from labelstore.store.remote_store import RemoteStore

    store = RemoteStore(url)
    if (store.info("") or {}).get("type") == "file":
        raise OutputDirectoryError(f"--out {url} is an object, not a prefix: choose a new or empty prefix")
    if store.is_store():
        return True
    others = store.other_entries()
    if others:
        raise OutputDirectoryError(
            f"--out {url} holds objects that are not a label store ({', '.join(others[:5])}"
            f"{', ...' if len(others) > 5 else ''}): choose a new or empty prefix; nothing was written")
    return False


def committed_shards(root) -> int:
    """Shards committed in the store at ``root`` (a finalized store counts as committed even without records)."""
    if is_url(root):
        from labelstore.store.remote_store import RemoteStore

        store = RemoteStore(root)
        return max(len(store.commit_records()), 1) if store.exists(MANIFEST) else len(store.commit_records())
    root = Path(root)
    n = len(list_commits(root)) if (root / "commits").is_dir() else 0
    return max(n, 1) if (root / MANIFEST).exists() else n


def discard_store(out) -> None:
    """Remove the store's own entries at ``out`` (files of anything else stay). Refused while a writer lives."""
    if is_url(out):
        return _discard_remote(out)
    root = Path(out)
    held = []
    try:
        for lock in sorted((root / "locks").glob("*.lock")) if (root / "locks").is_dir() else []:
            fd = os.open(lock, os.O_RDWR)
            held.append(fd)
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    raise StoreLockedError(f"{root} is being written by another live process ({lock.name}): stop it "
                                           "before replacing the store") from None
        for name in STORE_FILES:
            (root / name).unlink(missing_ok=True)
        for p in root.glob(".tmp-*"):
            p.unlink(missing_ok=True)
        for name in STORE_DIRS:
            if (root / name).is_dir():
                shutil.rmtree(root / name)
    except OSError as exc:
        raise OutputDirectoryError(f"cannot remove the store at {root}: {exc.strerror or exc}") from None
    finally:
        for fd in held:
            os.close(fd)


def _discard_remote(url: str) -> None:
    from labelstore.store.remote_store import RemoteStore
    from labelstore.store.remote_writer import RemoteLock

    store = RemoteStore(url)
    for rel in store.listing("locks"):
        info = store.info(rel)
        holder = store.get_json(rel, "lock") if info is not None else None
        if info is not None and not RemoteLock(store, 0)._stale(holder, info)[0]:
            raise StoreLockedError(f"{url} is being written by another live writer ({rel}): stop it before "
                                   "replacing the store")
    store.discard()


def barrier(world: int) -> None:
    """Wait for every rank (a no-op in one process)."""
    if world > 1:
        import torch

        torch.distributed.barrier()


def open_writer(opts, meta: dict, rank: int, world: int, store_there: bool):
    """The store's writer; ``--overwrite`` first discards the store, a store that committed nothing is replaced
    when its settings changed, and a settings mismatch on a store with shards says how to start over."""
    from labelstore.store.locations import open_store_writer as StoreWriter

    shard_bytes = max(1, int(opts.shard_mb * (1 << 20)))
    if store_there and opts.overwrite:
        if rank == 0:
            discard_store(opts.out)
        barrier(world)
    try:
        try:
            return StoreWriter(opts.out, meta, rank=rank, world_size=world, shard_bytes=shard_bytes)
        except ConfigMismatchError as exc:
            n = committed_shards(opts.out)
            if n or world > 1:
                raise ConfigMismatchError(f"{exc}\nOr pass --overwrite to discard its {n} committed shard(s) and "
                                          "compile it anew.") from None
            # an unfinished store that committed nothing (a compile that failed in its first batch): replace it
            print(f"labelstore compile: note: {opts.out} held an unfinished store with no committed shard and other "
                  "settings; replacing it", file=sys.stderr)
            discard_store(opts.out)
            return StoreWriter(opts.out, meta, rank=rank, world_size=world, shard_bytes=shard_bytes)
    except OSError as exc:  # e.g. the lock file of a read-only store (the writer wraps its other I/O)
        raise StoreWriteError(
            f"cannot open {opts.out} for writing: {exc.strerror or exc}"
            f"{f' ({exc.filename})' if exc.filename else ''}. Nothing was changed; make --out writable "
            "(permissions, free space) or choose another directory, then rerun the same command."
        ) from None
