"""Touching a store's files safely: regular files only, never through a symbolic link, never blocking.

A store directory may be damaged or hostile: ``manifest.json`` may be a named pipe (a plain ``open`` would block
forever), a directory or a device; ``shards/`` or a lock file may be a symbolic link to somewhere outside the
store (writing through it would overwrite, and cleaning it would delete, a user's files). Every read of a store
file goes through :func:`read_regular` / :func:`open_regular` (``O_NONBLOCK | O_NOFOLLOW``, then ``fstat``), and
every write or delete a writer makes goes through :func:`check_no_symlink` / :func:`unlink_own` first.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from labelstore.errors import StoreFormatError, StoreWriteError

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def check_regular(path, what: str) -> os.stat_result:
    """``lstat`` ``path`` and refuse anything but a regular file (no read, no open: cannot block)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise StoreFormatError(f"{what} {path} is missing") from None
    except OSError as exc:
        raise StoreFormatError(f"{what} {path} cannot be examined ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise StoreFormatError(
            f"{what} {path} is {_kind(st.st_mode)}, not a regular file; refusing to read it (replace it with the "
            "real file, e.g. re-copy the store)"
        )
    return st


def open_regular(path, what: str) -> int:
    """A read-only descriptor of ``path``, refusing symbolic links and anything that is not a regular file
    *before* a byte is read (``O_NONBLOCK``: opening a FIFO never waits for a writer)."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK)
    except FileNotFoundError:
        raise StoreFormatError(f"{what} {path} is missing") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StoreFormatError(f"{what} {path} is a symbolic link; refusing to follow it") from None
        if exc.errno in (errno.ENXIO, errno.EISDIR):
            check_regular(path, what)  # names what it is
        raise StoreFormatError(f"{what} {path} cannot be opened ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StoreFormatError(
                f"{what} {path} is {_kind(st.st_mode)}, not a regular file; refusing to read it (replace it with "
                "the real file, e.g. re-copy the store)"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path, what: str, max_bytes: int) -> bytes:
    """The whole content of the regular file ``path`` (at most ``max_bytes``; more is refused unread)."""
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise StoreFormatError(f"{what} {path} is {size} bytes, over the {max_bytes} limit")
        chunks, left = [], size + 1  # one byte more: a file that grew since fstat is refused, not truncated
        while left > 0:
            b = os.read(fd, min(left, 8 << 20))
            if not b:
                break
            chunks.append(b)
            left -= len(b)
        data = b"".join(chunks)
        if len(data) > max_bytes:
            raise StoreFormatError(f"{what} {path} is over the {max_bytes} limit")
        return data
    except OSError as exc:
        raise StoreFormatError(f"{what} {path} cannot be read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


def check_no_symlink(path, what: str) -> None:
    """Refuse (StoreWriteError) if ``path`` exists and is a symbolic link, or exists and is not the expected kind
    (a directory for the store's folders is checked by :func:`check_store_dirs`)."""
    if os.path.islink(path):
        raise StoreWriteError(
            f"{what} {path} is a symbolic link; a writer never writes or deletes through one (it could point "
            "outside the store). Replace it with a real file or directory, or write to a new --out directory."
        )


def check_store_dirs(root: Path, subdirs=("shards", "commits", "locks")) -> None:
    """Refuse to write into ``root`` if it or one of its folders is a symbolic link or not a directory."""
    for d in (root, *(root / s for s in subdirs)):
        check_no_symlink(d, "store folder")
        if os.path.lexists(d) and not os.path.isdir(d):
            raise StoreWriteError(f"store folder {d} exists but is not a directory; refusing to write the store")


def unlink_own(path, what: str) -> bool:
    """Delete ``path`` only if it is a regular file (never a link, a folder or a special file). True if deleted;
    a path that is something else is refused (StoreWriteError) rather than removed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode):
        raise StoreWriteError(
            f"{what} {path} is {_kind(st.st_mode)}, not a file this store wrote; refusing to delete it. Remove it "
            "yourself if it is not needed, then rerun."
        )
    os.unlink(path)
    return True


def open_nofollow_write(path, flags: int, what: str, mode: int = 0o644) -> int:
    """``os.open`` for writing with ``O_NOFOLLOW``: a symbolic link at ``path`` is refused, never followed."""
    try:
        return os.open(path, flags | _NOFOLLOW | _NONBLOCK, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            check_no_symlink(path, what)
        raise


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host is running (a process we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def is_regular(path) -> bool:
    """True if ``path`` exists and is a regular file (not following a symbolic link)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False
