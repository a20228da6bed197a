"""`labelstore info|verify URL`: copy a remote store's objects into a temporary folder and run the local checks.

A copy is faithful: an object that is missing stays missing, a truncated one stays truncated, a replaced one keeps
its new bytes, and nothing is validated on the way (that is the checks' job). Messages name the objects' URLs, not
the temporary folder. ``info`` copies only the small objects it reads (the manifest and config; the commit records
of an unfinished store; not a version-4 store's ``index.arrow``: the totals and the index's size are in the
manifest, and the index is 97 bytes per shard); ``verify`` reads every byte, so it copies the whole store (in the
temporary folder, under ``$TMPDIR``: it needs free space for the store, and deletes it afterwards).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from labelstore.errors import RemoteStorageError
from labelstore.store import objectstore as obs
from labelstore.store.manifest import CONFIG, MANIFEST

WORKERS = 8


def _skip(rel: str) -> bool:
    """Objects no check reads: lock markers and a writer's in-flight temporary objects."""
    return rel.startswith("locks/") or Path(rel).name.startswith(".tmp-") or not rel


def _get(fs, rpath: str, dest: Path, url: str, storage_options: dict | None) -> bool:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        obs.call(fs.get_file, rpath, str(dest), url=url, action="downloading", storage_options=storage_options,
                 passthrough=(FileNotFoundError,))
        return True
    except FileNotFoundError as exc:
        if "bucket does not exist" in str(exc) or "NoSuchBucket" in str(exc):
            raise RemoteStorageError(obs.describe(exc, url, "reading", storage_options)) from None
        return False


def _list(fs, root: str, url: str, storage_options: dict | None, sub: str = "") -> list[str]:
    """Relative names of the objects under ``root/sub`` (one paged listing)."""
    try:
        found = obs.call(fs.find, obs.join(root, sub), url=obs.join(url, sub), action="listing",
                         storage_options=storage_options, passthrough=(FileNotFoundError,))
    except FileNotFoundError as exc:
        raise RemoteStorageError(obs.describe(exc, url, "listing", storage_options)) from None
    prefix = root.rstrip("/") + "/"
    return [p[len(prefix):] for p in found if p.startswith(prefix)]


def mirror(url: str, dest: Path, *, everything: bool, storage_options: dict | None = None) -> None:
    """Copy the store at ``url`` into ``dest``: every object (``everything``), or what ``info`` reads."""
    fs, root = obs.filesystem(url, storage_options)
    if everything:
        names = _list(fs, root, url, storage_options)
    else:
        names = [CONFIG]
        if not _get(fs, obs.join(root, MANIFEST), dest / MANIFEST, obs.join(url, MANIFEST), storage_options):
            names += [n for n in _list(fs, root, url, storage_options, "commits") if n.endswith(".json")]
    names = [n for n in names if not _skip(n)]
    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(lambda n: _get(fs, obs.join(root, n), dest / n, obs.join(url, n), storage_options), names))


@contextlib.contextmanager
def mirrored(url: str, *, everything: bool, storage_options: dict | None = None):
    """A temporary local copy of the store at ``url`` (see :func:`mirror`), and a function mapping its paths in
    a text back to the objects' URLs; deleted on exit."""
    tmp = Path(tempfile.mkdtemp(prefix="labelstore-remote-"))
    local = tmp / "store"
    local.mkdir()
    shown = url.rstrip("/")

    def show(text: str) -> str:
        return text.replace(str(local), shown)

    try:
        mirror(shown, local, everything=everything, storage_options=storage_options)
        yield local, show
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["mirror", "mirrored"]
