"""The ``--out`` directory of a compile: new, a store to resume, or a store to replace; never a user's folder.

* a missing or empty directory: a new store;
* a label store (``config.json``, ``manifest.json``, ``shards/`` or ``commits/``): resumed when its settings
  match. An unfinished store that committed nothing (a compile that failed in its first batch) is replaced
  when the settings changed, since nothing would be lost; one with committed shards is replaced only with
  ``--overwrite``;
* a file, or a non-empty directory that is not a store: refused, so a compile never writes beside (or
  deletes) a user's files. ``--overwrite`` removes only the store's own entries.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from labelstore.errors import OutputDirectoryError, StoreLockedError
from labelstore.store.manifest import CONFIG, MANIFEST, TAIL_PRIOR, list_commits

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

STORE_DIRS = ("shards", "commits", "locks")
STORE_FILES = (CONFIG, MANIFEST, TAIL_PRIOR)


def is_store(root: Path) -> bool:
    """Whether ``root`` holds a label store (finished or not)."""
    return any((root / n).exists() for n in (CONFIG, MANIFEST, "shards", "commits"))


def check_out(out) -> bool:
    """Refuse an ``--out`` that is a file or a non-empty non-store folder; True when a store is already there."""
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


def committed_shards(root: Path) -> int:
    """Shards committed in the store at ``root`` (a finalized store counts as committed even without records)."""
    n = len(list_commits(root)) if (root / "commits").is_dir() else 0
    return max(n, 1) if (root / MANIFEST).exists() else n


def discard_store(out) -> None:
    """Remove the store's own entries at ``out`` (files of anything else stay). Refused while a writer lives."""
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
