"""Where a store lives: a local directory or an object-storage URL. The operations a compile and the CLI need,
dispatched to the local implementation (rename, flock, memory maps) or the remote one (docs/FORMAT.md 8)."""

from __future__ import annotations

from pathlib import Path

from labelstore.store.objectstore import is_url, local_path


def read_store_config(out) -> dict | None:
    """The store's ``config.json`` (digest checked), or None where there is none yet."""
    if is_url(out):
        from labelstore.store.remote_store import RemoteStore

        return RemoteStore(out).read_config()
    from labelstore.store.manifest import CONFIG, read_config

    root = Path(local_path(out))
    return read_config(root) if (root / CONFIG).exists() or (root / CONFIG).is_symlink() else None


def commit_records(out) -> list[dict]:
    """Every validated commit record of the store (all ranks)."""
    if is_url(out):
        from labelstore.store.remote_store import RemoteStore

        return RemoteStore(out).commit_records()
    from labelstore.store.manifest import list_commits

    return list_commits(Path(local_path(out)))


def finalize(out, world_size: int) -> dict:
    """Write the manifest once every rank is done."""
    if is_url(out):
        from labelstore.store.remote_store import RemoteStore

        return RemoteStore(out).finalize(world_size)
    from labelstore.store.resume import finalize_store

    return finalize_store(Path(local_path(out)), world_size)


def open_store_writer(out, meta: dict, **kwargs):
    """A :class:`~labelstore.store.writer.StoreWriter` for a local ``out``, a
    :class:`~labelstore.store.remote_writer.RemoteStoreWriter` for a URL (``spool=`` and ``storage_options=``
    only apply to the latter)."""
    if is_url(out):
        from labelstore.store.remote_writer import RemoteStoreWriter

        return RemoteStoreWriter(out, meta, **kwargs)
    from labelstore.store.writer import StoreWriter

    kwargs.pop("spool", None)
    kwargs.pop("storage_options", None)
    return StoreWriter(local_path(out), meta, **kwargs)


__all__ = ["is_url", "read_store_config", "commit_records", "finalize", "open_store_writer"]
