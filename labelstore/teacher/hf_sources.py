"""Hugging Face ``datasets`` as inputs: ``save_to_disk`` folders, ``hf:NAME`` (``load_dataset``), and dataset
objects or lists of records given to :func:`labelstore.compile_store`.

``hf:NAME`` calls ``datasets.load_dataset(NAME, split=--split, streaming=--streaming)``: a local folder of data
files, or a hub dataset already in the local cache (nothing here needs a network when the data is local). A
``DatasetDict`` needs ``--split`` unless it holds one split. Map-style datasets are read as Arrow record batches
in their own (index-mapped) order; iterable ones batch by batch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from labelstore.errors import InputDataError
from labelstore.teacher.records import Source, SourceConfig, iter_table_batches, record_document

HF_PREFIX = "hf:"


def is_saved_dataset(folder: Path) -> bool:
    """A folder written by ``datasets`` ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return ((folder / "dataset_info.json").is_file() and (folder / "state.json").is_file()) or \
        (folder / "dataset_dict.json").is_file()


def _require_datasets(what: str):
    try:
        import datasets
    except ImportError:
        raise InputDataError(f"{what} needs the `datasets` package: pip install datasets") from None
    return datasets


def _split(ds, name: str, cfg: SourceConfig):
    """The dataset of a ``DatasetDict`` that ``cfg.split`` names (or its only split); other datasets as they are."""
    datasets = _require_datasets(name)
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        splits = list(ds)
        if cfg.split is None and len(splits) == 1:
            ds = ds[splits[0]]
        elif cfg.split in splits:
            ds = ds[cfg.split]
        else:
            raise InputDataError(f"{name} holds the splits {splits}: choose one with --split NAME"
                                 + (f" ({cfg.split!r} is not one of them)" if cfg.split else ""))
    return ds


def dataset_source(ds, name: str, cfg: SourceConfig, rows: tuple[int, int] | None = None) -> Source:
    """A ``datasets.Dataset`` / ``IterableDataset`` (or a ``DatasetDict`` with ``cfg.split``) as a source;
    ``rows``: only the rows ``[start, end)`` of a (map-style) ``Dataset``."""
    datasets = _require_datasets(name)
    ds = _split(ds, name, cfg)
    names = ds.column_names

    def documents():
        if isinstance(ds, datasets.Dataset):  # memory-mapped Arrow: stream its record batches
            table = ds.with_format("arrow")
            a0, b0 = rows or (0, len(ds))
            batches = (b for a in range(a0, b0, 1024) for b in table[a:min(a + 1024, b0)].to_batches())
            yield from iter_table_batches(batches, names, {f.name: f.type for f in ds.data.schema}, cfg, name)
            return
        it = ds.iter(batch_size=1024)
        first = next(it, None)
        if first is None:
            return
        yield from iter_table_batches(_chain(first, it), list(names or first), None, cfg, name)

    return Source(name, documents)


def _chain(first, rest):
    yield first
    yield from rest


def hf_source(spec: str, cfg: SourceConfig) -> Source:
    """``hf:NAME``: ``datasets.load_dataset(NAME, split, streaming)``."""
    datasets = _require_datasets(spec)
    name = spec[len(HF_PREFIX):]
    if not name:
        raise InputDataError("--data hf: needs a dataset name or folder after 'hf:'")
    try:
        ds = datasets.load_dataset(name, split=cfg.split, streaming=cfg.streaming)
    except Exception as exc:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ValueError)
        raise InputDataError(f"cannot load dataset {name!r}: {type(exc).__name__}: {exc}") from None
    label = f"{spec}[{cfg.split}]" if cfg.split else spec
    return dataset_source(ds, label, cfg)


def saved_dataset_source(folder: Path, cfg: SourceConfig) -> Source:
    datasets = _require_datasets(str(folder))
    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as exc:
        raise InputDataError(f"cannot load the saved dataset {folder}: {type(exc).__name__}: {exc}") from None
    src = dataset_source(ds, str(folder), cfg)
    src.path = folder
    return src


def object_sources(data, cfg: SourceConfig, records_per_source: int | None = None) -> list[Source]:
    """Python objects given to :func:`labelstore.compile_store` ``data=`` (besides paths): a ``datasets``
    Dataset / IterableDataset / DatasetDict, or a list of records (dicts).

    ``records_per_source``: cut a list of records into sources of that many records (``--plan units``: one work
    unit each, identified by a hash of its records); None: one source."""
    mod = type(data).__module__ or ""
    if mod.startswith("datasets"):
        name = f"<{type(data).__name__}>"
        ds = _split(data, name, cfg)
        fp = getattr(ds, "_fingerprint", None)
        n = len(ds) if isinstance(ds, _require_datasets(name).Dataset) else 0  # map-style: its length is known
        if records_per_source is not None and n > records_per_source:  # one source per slice of rows
            return [Source(src.name, src.documents, identity={"fingerprint": fp, "rows": [a, b]})
                    for a in range(0, n, records_per_source)
                    for b in [min(n, a + records_per_source)]
                    for src in [dataset_source(ds, f"{name}[{a}:{b}]", cfg, rows=(a, b))]]
        src = dataset_source(ds, name, cfg)
        src.identity = {"fingerprint": fp} if isinstance(fp, str) else None
        return [src]
    if isinstance(data, (list, tuple)) and data and all(isinstance(r, dict) for r in data):
        recs = list(data)
        if records_per_source is None:
            return [Source("<records>", lambda: (record_document(r, cfg, f"data[{i}]") for i, r in enumerate(recs)))]
        out = []
        for a in range(0, len(recs), records_per_source):
            b = min(len(recs), a + records_per_source)
            digest = hashlib.sha256(json.dumps(recs[a:b], sort_keys=True, default=repr).encode()).hexdigest()
            out.append(Source(f"<records>[{a}:{b}]", lambda a=a, b=b: (record_document(recs[i], cfg, f"data[{i}]")
                                                                    for i in range(a, b)),
                              identity={"records_sha256": digest}))
        return out
    raise InputDataError(
        f"data= takes paths, a list of paths, a datasets.Dataset or a list of records (dicts), not "
        f"{type(data).__name__}; to compile texts pass data=[{{'text': t}} for t in texts]")
