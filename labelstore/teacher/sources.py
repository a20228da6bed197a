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

Which field of a record is the document: :mod:`labelstore.teacher.records`; Hugging Face datasets and Python
objects: :mod:`labelstore.teacher.hf_sources`.
"""

from __future__ import annotations

import bz2
import fnmatch
import gzip
import io
import json
import lzma
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from labelstore.errors import InputDataError
from labelstore.teacher.hf_sources import HF_PREFIX, hf_source, is_saved_dataset, saved_dataset_source
from labelstore.teacher.records import Document, Source, SourceConfig, iter_table_batches, record_document

JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow", ".feather", ".ipc")
TEXT_SUFFIXES = (".txt", ".text", ".md")
COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open, ".zst": None}  # None: zstandard
MAGIC = {b"\x1f\x8b": "gzip (.gz)", b"\x28\xb5\x2f\xfd": "zstd (.zst)", b"BZh": "bzip2 (.bz2)",
         b"\xfd7zXZ": "xz (.xz)"}


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
