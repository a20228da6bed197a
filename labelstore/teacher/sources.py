"""Where documents come from: files, folders, Hugging Face datasets and Python objects, in one order.

``--data`` entries (repeatable), each expanded into sources read in order:

- a **file**, by its name: ``.jsonl`` / ``.ndjson`` (one JSON record per line), ``.json`` (a JSON array of
  records), ``.parquet`` (any codec), ``.arrow`` / ``.feather`` / ``.ipc`` (file or stream format), anything
  else is plain text (the whole file is one document, UTF-8). Text, JSON and JSONL files may be compressed:
  ``.gz``, ``.bz2``, ``.xz``, ``.zst`` after the name (``docs.jsonl.zst``).
- a **folder** written by ``datasets.Dataset.save_to_disk`` (or ``DatasetDict``: pick one with ``--split``);
- any other **folder**: its files, recursively, in sorted order (hidden files and ``__pycache__`` skipped).
  Files whose kind is unknown (not one of the names above, nor ``.txt`` / ``.text`` / ``.md``) are refused,
  listed, unless ``--text-glob PATTERN`` names them as plain text (``--text-glob '*.py'``);
- ``hf:NAME``: ``datasets.load_dataset(NAME, split=--split, streaming=--streaming)``: a local folder of data
  files, or a hub dataset already in the local cache (nothing here needs a network when the data is local).

A record (JSON object, table row, dataset row) is one document, taken from the first of these fields it has:
``--text-field`` (text), ``messages`` (a conversation), ``prompt`` + ``completion`` (an instruction pair),
``--token-field`` (pre-tokenized ids, used as is). Tables pick the field once from their columns.
"""

from __future__ import annotations

import bz2
import fnmatch
import gzip
import io
import json
import lzma
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from labelstore.errors import InputDataError
from labelstore.teacher.chat import Chat, Pair

JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow", ".feather", ".ipc")
TEXT_SUFFIXES = (".txt", ".text", ".md")
COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open, ".zst": None}  # None: zstandard
MAGIC = {b"\x1f\x8b": "gzip (.gz)", b"\x28\xb5\x2f\xfd": "zstd (.zst)", b"BZh": "bzip2 (.bz2)",
         b"\xfd7zXZ": "xz (.xz)"}
HF_PREFIX = "hf:"
MESSAGES, PROMPT, COMPLETION = "messages", "prompt", "completion"
Document = str | np.ndarray | Chat | Pair


@dataclass(frozen=True)
class SourceConfig:
    """The settings that decide how records become documents."""

    text_field: str = "text"
    token_field: str = "input_ids"
    text_glob: tuple[str, ...] = ()
    split: str | None = None
    streaming: bool = False


@dataclass
class Source:
    """One input: its name (recorded in the store's runtime metadata) and how to read its documents."""

    name: str
    documents: Callable[[], Iterator[Document]]
    path: Path | None = None  # a local file (checked again on resume)


# -------------------------------------------------------------------------------------------- kinds
def split_compression(path: Path) -> tuple[str, str | None]:
    """(name without the compression suffix, lower case; the compression suffix or None)."""
    name = path.name.lower()
    for suffix in COMPRESSED:
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    return name, None


def file_kind(path: Path, text_glob: Sequence[str] = (), explicit: bool = True) -> str | None:
    """``jsonl``, ``json``, ``parquet``, ``arrow`` or ``text``; None for an unknown file inside a folder."""
    name, comp = split_compression(path)
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(JSON_SUFFIXES):
        return "json"
    if comp is None and name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if comp is None and name.endswith(ARROW_SUFFIXES):
        return "arrow"
    if explicit or name.endswith(TEXT_SUFFIXES) or any(fnmatch.fnmatch(path.name, g) for g in text_glob):
        return "text"
    return None


def is_saved_dataset(folder: Path) -> bool:
    """A folder written by ``datasets`` ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return ((folder / "dataset_info.json").is_file() and (folder / "state.json").is_file()) or \
        (folder / "dataset_dict.json").is_file()


def _skipped(rel: Path) -> bool:
    return any(part.startswith(".") or part == "__pycache__" for part in rel.parts)


# -------------------------------------------------------------------------------------------- files
def _open(path: Path):
    """A binary file object over the decompressed bytes of ``path``."""
    _, comp = split_compression(path)
    try:
        if comp is None:
            return open(path, "rb")  # noqa: SIM115 - the caller closes it
        if comp == ".zst":
            import zstandard

            return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
        return COMPRESSED[comp](path, "rb")
    except OSError as exc:
        raise InputDataError(f"cannot read input {path}: {exc.strerror or exc}") from None


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        kind = next((k for m, k in MAGIC.items() if data.startswith(m)), None)
        if kind is not None:
            raise InputDataError(f"{where} is {kind}-compressed, not text: name it with its compression suffix "
                                 f"(e.g. {where.split(':')[0]}{kind.split('(')[1][:-1]}) so labelstore "
                                 "decompresses it") from None
        raise InputDataError(
            f"{where} is not valid UTF-8 (byte {exc.start}): convert it to UTF-8 or remove it from --data"
        ) from None


def _guard(path: Path, fn):
    """Run ``fn`` turning decompression and I/O failures into input errors naming the file."""
    import zstandard

    try:
        return fn()
    except (OSError, EOFError, lzma.LZMAError, zstandard.ZstdError) as exc:
        raise InputDataError(f"cannot read input {path}: {exc}") from None


def _lines(path: Path, f) -> Iterator[bytes]:
    """The lines of an open file, with decompression and I/O failures turned into input errors."""
    while True:
        line = _guard(path, f.readline)
        if not line:
            return
        yield line


def _iter_text(path: Path) -> Iterator[Document]:
    def read():
        with _open(path) as f:
            return f.read()
    yield _decode(_guard(path, read), str(path))


def record_document(rec, cfg: SourceConfig, where: str) -> Document:
    """The document of one record (a dict): text, conversation, instruction pair or token ids."""
    if not isinstance(rec, dict):
        raise InputDataError(f"{where}: expected a JSON object (a record), got {type(rec).__name__}")
    if cfg.text_field in rec:
        value = rec[cfg.text_field]
        if not isinstance(value, str):
            raise InputDataError(f"{where}: field {cfg.text_field!r} is a {type(value).__name__}, not a string")
        return value
    if MESSAGES in rec:
        return Chat(rec[MESSAGES], where)
    if PROMPT in rec and COMPLETION in rec:
        return Pair(rec[PROMPT], rec[COMPLETION], where)
    if cfg.token_field in rec:
        ids = rec[cfg.token_field]
        if not isinstance(ids, (list, np.ndarray)) or not all(isinstance(i, (int, np.integer)) for i in ids):
            raise InputDataError(f"{where}: field {cfg.token_field!r} must be a list of integer token ids")
        return np.asarray(ids, dtype=np.int64)
    raise InputDataError(
        f"{where}: record has no field {cfg.text_field!r} (it has {sorted(rec)}), nor {MESSAGES!r}, "
        f"{PROMPT!r}+{COMPLETION!r} or {cfg.token_field!r}; pass --text-field NAME")


def _iter_jsonl(path: Path, cfg: SourceConfig) -> Iterator[Document]:
    """One document per line, streamed (a JSONL file may be far larger than memory)."""
    f = _open(path)
    with f:
        for lineno, raw in enumerate(_lines(path, f), 1):
            line = _decode(raw, f"{path}:{lineno}")
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputDataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            yield record_document(rec, cfg, f"{path}:{lineno}")


def _iter_json(path: Path, cfg: SourceConfig) -> Iterator[Document]:
    """A JSON array of records (read whole: use JSONL for corpora larger than memory)."""
    def read():
        with _open(path) as f:
            return f.read()
    text = _decode(_guard(path, read), str(path))
    try:
        recs = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputDataError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(recs, list):
        raise InputDataError(f"{path}: expected a JSON array of records, got a {type(recs).__name__}; one record "
                             "per line is .jsonl")
    for i, rec in enumerate(recs):
        yield record_document(rec, cfg, f"{path}[{i}]")


# -------------------------------------------------------------------------------------------- tables
def _pick_field(names: Sequence[str], cfg: SourceConfig, where: str) -> str:
    if cfg.text_field in names:
        return "text"
    if MESSAGES in names:
        return "messages"
    if PROMPT in names and COMPLETION in names:
        return "pair"
    if cfg.token_field in names:
        return "tokens"
    raise InputDataError(
        f"{where} has neither a text column {cfg.text_field!r} nor a token column {cfg.token_field!r} "
        f"(nor {MESSAGES!r} or {PROMPT!r}+{COMPLETION!r}; columns: {list(names)}); pass --text-field or --token-field")


def iter_table_batches(batches, names: Sequence[str], types: dict | None, cfg: SourceConfig,
                       where: str) -> Iterator[Document]:
    """Documents of a stream of pyarrow record batches (or dicts of lists) with columns ``names``."""
    import pyarrow as pa

    kind = _pick_field(names, cfg, where)
    if types is not None and kind == "text":
        t = types[cfg.text_field]
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise InputDataError(f"{where}: column {cfg.text_field!r} has type {t}, expected a string column")
    if types is not None and kind == "tokens":
        t = types[cfg.token_field]
        if not ((pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(t.value_type)):
            raise InputDataError(f"{where}: column {cfg.token_field!r} has type {t}, expected list<int> token ids")
    cols = {"text": [cfg.text_field], "messages": [MESSAGES], "pair": [PROMPT, COMPLETION],
            "tokens": [cfg.token_field]}[kind]
    row = 0
    for batch in batches:
        if isinstance(batch, dict):
            data = [batch[c] for c in cols]
        else:
            data = [batch.column(c) for c in cols]
            if any(c.null_count for c in data):
                raise InputDataError(f"{where}: column {cols[0]!r} holds null rows; drop or fill them")
            if kind == "tokens":
                col = data[0]
                offsets = np.asarray(col.offsets)
                values = np.asarray(col.values.fill_null(-1), dtype=np.int64)
                for r in range(len(col)):
                    yield values[offsets[r]:offsets[r + 1]]
                row += len(col)
                continue
            data = [c.to_pylist() for c in data]
        for r, values in enumerate(zip(*data)):
            at = f"{where} row {row + r}"
            if any(v is None for v in values):
                raise InputDataError(f"{at}: column {cols[0]!r} holds null rows; drop or fill them")
            if kind == "text":
                if not isinstance(values[0], str):
                    raise InputDataError(f"{at}: {cfg.text_field!r} is a {type(values[0]).__name__}, not a string")
                yield values[0]
            elif kind == "messages":
                yield Chat(values[0], at)
            elif kind == "pair":
                yield Pair(values[0], values[1], at)
            else:
                yield record_document({cfg.token_field: list(values[0])}, cfg, at)
        row += len(data[0])


def _iter_file_table(path: Path, cfg: SourceConfig) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    kind = file_kind(path)
    try:
        if kind == "parquet":
            pf = pq.ParquetFile(path)
            schema = pf.schema_arrow
            batches = pf.iter_batches(batch_size=1024)
        else:
            try:
                reader = pa.ipc.open_file(path)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            except pa.ArrowInvalid:
                reader = pa.ipc.open_stream(path)
                batches = iter(reader)
            schema = reader.schema
        types = {f.name: f.type for f in schema}
        yield from iter_table_batches(batches, schema.names, types, cfg, str(path))
    except OSError as exc:
        raise InputDataError(f"cannot read input {path}: {exc}") from None
    except pa.ArrowException as exc:
        raise InputDataError(f"{path} is not a readable {kind} file: {exc}") from None


READERS = {"text": _iter_text, "jsonl": _iter_jsonl, "json": _iter_json, "parquet": _iter_file_table,
           "arrow": _iter_file_table}


def file_source(path: Path, kind: str, cfg: SourceConfig) -> Source:
    reader = READERS[kind]
    if kind == "text":
        return Source(str(path), lambda: reader(path), path)
    return Source(str(path), lambda: reader(path, cfg), path)


# -------------------------------------------------------------------------------------------- datasets
def _require_datasets(what: str):
    try:
        import datasets
    except ImportError:
        raise InputDataError(f"{what} needs the `datasets` package: pip install datasets") from None
    return datasets


def dataset_source(ds, name: str, cfg: SourceConfig) -> Source:
    """A ``datasets.Dataset`` / ``IterableDataset`` (or a ``DatasetDict`` with ``cfg.split``) as a source."""
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
    names = ds.column_names

    def documents():
        if isinstance(ds, datasets.Dataset):  # memory-mapped Arrow: stream its record batches
            table = ds.with_format("arrow")
            batches = (b for a in range(0, len(ds), 1024) for b in table[a:a + 1024].to_batches())
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


# -------------------------------------------------------------------------------------------- expand
def expand_sources(paths: Sequence[str | os.PathLike], cfg: SourceConfig = SourceConfig()) -> list[Source]:
    """``--data`` entries -> sources in plan order (see the module docstring). Checks every file's kind now."""
    if not paths:
        raise InputDataError("no input given: pass at least one --data file or directory")
    out: list[Source] = []
    for entry in paths:
        if isinstance(entry, str) and entry.startswith(HF_PREFIX):
            out.append(hf_source(entry, cfg))
            continue
        p = Path(entry)
        if p.is_dir():
            if is_saved_dataset(p):
                out.append(saved_dataset_source(p, cfg))
                continue
            found = sorted((f for f in p.rglob("*") if f.is_file() and not _skipped(f.relative_to(p))),
                           key=lambda f: f.relative_to(p).as_posix())
            if not found:
                raise InputDataError(f"input directory {p} holds no files")
            kinds = [(f, file_kind(f, cfg.text_glob, explicit=False)) for f in found]
            unknown = [f for f, k in kinds if k is None]
            if unknown:
                exts = sorted({"".join(f.suffixes[-1:]) or f.name for f in unknown})
                raise InputDataError(
                    f"input directory {p} holds {len(unknown)} file(s) of unknown kind ({', '.join(exts[:8])}): "
                    f"{', '.join(str(f.relative_to(p)) for f in unknown[:5])}{', ...' if len(unknown) > 5 else ''}. "
                    "Pass --text-glob PATTERN to read them as plain text (e.g. --text-glob '*.py'), or name the files "
                    "you want with --data")
            out.extend(file_source(f, k, cfg) for f, k in kinds)
        elif p.exists():
            if not p.is_file():
                raise InputDataError(f"input {p} is not a regular file or directory")
            out.append(file_source(p, file_kind(p), cfg))
        else:
            raise InputDataError(f"input {p} does not exist")
    return out


def object_sources(data, cfg: SourceConfig) -> list[Source]:
    """Python objects given to :func:`labelstore.compile_store` ``data=`` (besides paths): a ``datasets``
    Dataset / IterableDataset / DatasetDict, or a list of records (dicts)."""
    mod = type(data).__module__ or ""
    if mod.startswith("datasets"):
        return [dataset_source(data, f"<{type(data).__name__}>", cfg)]
    if isinstance(data, (list, tuple)) and data and all(isinstance(r, dict) for r in data):
        recs = list(data)
        return [Source("<records>", lambda: (record_document(r, cfg, f"data[{i}]") for i, r in enumerate(recs)))]
    raise InputDataError(
        f"data= takes paths, a list of paths, a datasets.Dataset or a list of records (dicts), not "
        f"{type(data).__name__}; to compile texts pass data=[{{'text': t}} for t in texts]")
