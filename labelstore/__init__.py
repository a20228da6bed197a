"""labelstore: an offline soft-label dataset compiler for LLM knowledge distillation.

The public API (stable from 0.2; see CHANGELOG.md)::

    from labelstore import LabelStore, StoreDataset, StoreLoader, distillation_loss, compile_store, CompileOptions

Names are imported on first use, so ``import labelstore`` stays cheap and never imports transformers.
Layout (docs/ARCHITECTURE.md): base modules (``errors``, ``constants``, ``codecs``, ``selection``,
``reconstruction``, ``distributed``), then ``store/`` (format, writer, reader), ``teacher/`` (compile),
``student/`` (datasets, loader, losses) and ``tools/`` (bench, demo).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.5.0"

# public name -> module that defines it
_EXPORTS = {
    # errors
    "LabelStoreError": "labelstore.errors",
    "StoreFormatError": "labelstore.errors",
    "StoreCorruptError": "labelstore.errors",
    "StoreLockedError": "labelstore.errors",
    "StoreNotFinalizedError": "labelstore.errors",
    "ConfigMismatchError": "labelstore.errors",
    "InvalidLogitsError": "labelstore.errors",
    "InputDataError": "labelstore.errors",
    "StoreWriteError": "labelstore.errors",
    "OutputDirectoryError": "labelstore.errors",
    "RemoteStorageError": "labelstore.errors",
    # store
    "LabelStore": "labelstore.store.reader",
    "StoreWriter": "labelstore.store.writer",
    "verify_store": "labelstore.store.verify",
    "get_codec": "labelstore.codecs",
    # teacher
    "CompileOptions": "labelstore.teacher.options",
    "CompileResult": "labelstore.teacher.pipeline",
    "compile_store": "labelstore.teacher.compile",
    # student
    "StoreDataset": "labelstore.student.dataset",
    "StoreIterableDataset": "labelstore.student.dataset",
    "StoreLoader": "labelstore.student.loader",
    "StoreMixture": "labelstore.student.mixture",
    "StoreSampler": "labelstore.student.sampler",
    "Collator": "labelstore.student.collate",
    "distillation_loss": "labelstore.student.losses",
    "sparse_kl": "labelstore.student.losses",
    "reverse_kl": "labelstore.student.losses",
    "generalized_jsd": "labelstore.student.losses",
    "hard_label_ce": "labelstore.student.losses",
    "label_ce": "labelstore.student.losses",
    "dense_kl": "labelstore.student.codistill",
    "codistillation_losses": "labelstore.student.codistill",
    "CoDistillation": "labelstore.student.codistill",
    "to_dense": "labelstore.student.targets",
    "tokenizer_hash": "labelstore.student.targets",
    "export_parquet": "labelstore.student.export",
    "export_distillkit": "labelstore.student.distillkit",
    "import_distillkit": "labelstore.student.distillkit",
}

__all__ = [
    "__version__",
    "LabelStoreError",
    "StoreFormatError",
    "StoreCorruptError",
    "StoreLockedError",
    "StoreNotFinalizedError",
    "ConfigMismatchError",
    "InvalidLogitsError",
    "InputDataError",
    "StoreWriteError",
    "OutputDirectoryError",
    "RemoteStorageError",
    "LabelStore",
    "StoreWriter",
    "verify_store",
    "get_codec",
    "CompileOptions",
    "CompileResult",
    "compile_store",
    "StoreDataset",
    "StoreIterableDataset",
    "StoreLoader",
    "StoreMixture",
    "StoreSampler",
    "Collator",
    "distillation_loss",
    "sparse_kl",
    "reverse_kl",
    "generalized_jsd",
    "hard_label_ce",
    "label_ce",
    "dense_kl",
    "codistillation_losses",
    "CoDistillation",
    "to_dense",
    "tokenizer_hash",
    "export_parquet",
    "export_distillkit",
    "import_distillkit",
]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'labelstore' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static tools see the real names
    from labelstore.codecs import get_codec
    from labelstore.errors import (
        ConfigMismatchError,
        InputDataError,
        InvalidLogitsError,
        LabelStoreError,
        OutputDirectoryError,
        RemoteStorageError,
        StoreCorruptError,
        StoreFormatError,
        StoreLockedError,
        StoreNotFinalizedError,
        StoreWriteError,
    )
    from labelstore.store.reader import LabelStore
    from labelstore.store.verify import verify_store
    from labelstore.store.writer import StoreWriter
    from labelstore.student.collate import Collator
    from labelstore.student.dataset import StoreDataset, StoreIterableDataset
    from labelstore.student.distillkit import export_distillkit, import_distillkit
    from labelstore.student.export import export_parquet
    from labelstore.student.loader import StoreLoader
    from labelstore.student.losses import (
        CoDistillation,
        codistillation_losses,
        dense_kl,
        distillation_loss,
        generalized_jsd,
        hard_label_ce,
        label_ce,
        reverse_kl,
        sparse_kl,
    )
    from labelstore.student.mixture import StoreMixture
    from labelstore.student.sampler import StoreSampler
    from labelstore.student.targets import to_dense, tokenizer_hash
    from labelstore.teacher.compile import compile_store
    from labelstore.teacher.options import CompileOptions
    from labelstore.teacher.pipeline import CompileResult
