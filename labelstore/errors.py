"""One family of labelstore errors. Every message says what was wrong and what to do."""

from __future__ import annotations


class LabelStoreError(Exception):
    """Base class of every error labelstore raises on purpose."""


class StoreFormatError(LabelStoreError):
    """A store's files do not follow the format spec (docs/FORMAT.md): malformed, unknown version, absurd sizes."""


class StoreCorruptError(StoreFormatError):
    """A store's bytes changed after they were written: checksum mismatch, truncated or missing shard."""


class StoreLockedError(LabelStoreError):
    """Another live writer holds the store (or this rank of it)."""


class StoreNotFinalizedError(LabelStoreError):
    """The store has committed shards but no manifest yet (an interrupted or still-running compile)."""


class ConfigMismatchError(LabelStoreError):
    """A resume, a loader or a student disagrees with the settings recorded in the store."""


class InvalidLogitsError(LabelStoreError):
    """Teacher logits contain NaN, +inf, or rows with no finite entry."""

    def __init__(self, message: str, rows: list[int] | None = None):
        super().__init__(message)
        self.rows = list(rows or [])


class InputDataError(LabelStoreError):
    """A corpus file is missing, empty, unreadable or lacks the requested field."""


class StoreWriteError(LabelStoreError):
    """Writing a shard failed (disk full, permissions...). Committed shards are intact."""


class OutputDirectoryError(LabelStoreError):
    """``--out`` is a file or a non-empty folder that is not a store, or a store that needs ``--overwrite``."""


class RemoteStorageError(LabelStoreError):
    """The object store refused or kept failing (no such bucket, access denied, retries exhausted). What was
    committed before stays committed; fix the cause and rerun the same command."""
