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
  files, or a hub dataset already in the local cache (nothing here needs a network when the data is local);
- a **URL** (``s3://bucket/corpus/a.jsonl.zst``, ``gs://...``, any fsspec URL, see
  :mod:`labelstore.store.objectstore` for credentials and endpoints): one object, read by its name as above; a
  **glob** (``s3://bucket/corpus/*.parquet``, ``**`` recurses): the matching objects, sorted, read like a
  folder's files; or a **prefix** (``s3://bucket/corpus/``, trailing slash optional): every object under it,
  walked like a local folder (same order, same skip rules, same refusal of unknown kinds). Objects are streamed
  through fsspec in blocks of :data:`BLOCK_SIZE` (Parquet and Arrow by ranged reads), never downloaded whole
  first. The recorded input names are the full URLs. The data fingerprint covers tokens only, so the same bytes
  read from a bucket or from a local copy give the same plan and fingerprint (a store resumes after its inputs
  moved).

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
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from labelstore.errors import InputDataError, RemoteStorageError
from labelstore.store import objectstore
from labelstore.teacher.hf_sources import HF_PREFIX, hf_source, is_saved_dataset, saved_dataset_source
from labelstore.teacher.records import Document, Source, SourceConfig, iter_table_batches, record_document

JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow", ".feather", ".ipc")
TEXT_SUFFIXES = (".txt", ".text", ".md")
COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open, ".zst": None}  # None: zstandard
BLOCK_SIZE = 8 << 20  # bytes per ranged read of a remote object (fsspec's read-ahead block)
GLOB_CHARS = "*?["
MAGIC = {b"\x1f\x8b": "gzip (.gz)", b"\x28\xb5\x2f\xfd": "zstd (.zst)", b"BZh": "bzip2 (.bz2)",
         b"\xfd7zXZ": "xz (.xz)"}


# -------------------------------------------------------------------------------------------- remote
@dataclass(frozen=True)
class RemoteObject:
    """One object at a URL: what the readers get instead of a local :class:`Path`."""

    url: str  # the full URL, as recorded in the store (no credentials)
    fs: object  # the fsspec filesystem
    path: str  # the object's path inside ``fs``

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return self.url

    def open(self):
        """The object as a seekable binary file (ranged reads of BLOCK_SIZE bytes, read ahead)."""
        try:
            return objectstore.call(self.fs.open, self.path, "rb", block_size=BLOCK_SIZE, url=self.url,
                                    action="reading input", passthrough=(FileNotFoundError, IsADirectoryError))
        except FileNotFoundError:
            raise InputDataError(f"input {self.url} no longer exists (it was listed when the inputs were "
                                 "expanded): restore it, or drop it from --data") from None
        except IsADirectoryError:
            raise InputDataError(f"input {self.url} is a prefix (a folder), not an object") from None


def _without_userinfo(url: str) -> str:
    """``scheme://user:secret@host/...`` -> ``scheme://***@host/...`` (never record a credential)."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@", r"\1***@", url)


# -------------------------------------------------------------------------------------------- kinds
def split_compression(path: Path | RemoteObject) -> tuple[str, str | None]:
    """(name without the compression suffix, lower case; the compression suffix or None)."""
    name = path.name.lower()
    for suffix in COMPRESSED:
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    return name, None


def file_kind(path: Path | RemoteObject, text_glob: Sequence[str] = (), explicit: bool = True) -> str | None:
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
def _open(path: Path | RemoteObject):
    """A binary file object over the decompressed bytes of ``path``."""
    _, comp = split_compression(path)
    if isinstance(path, RemoteObject):
        return _open_remote(path, comp)
    try:
        if comp is None:
            return open(path, "rb")  # noqa: SIM115 - the caller closes it
        if comp == ".zst":
            import zstandard

            return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
        return COMPRESSED[comp](path, "rb")
    except OSError as exc:
        raise InputDataError(f"cannot read input {path}: {exc.strerror or exc}") from None


def _open_remote(obj: RemoteObject, comp: str | None):
    raw = obj.open()
    if comp is None:  # fsspec's own readline reads a whole block per line: 40x slower on a 37 MiB JSONL object
        return io.BufferedReader(raw, buffer_size=1 << 20)
    try:
        if comp == ".zst":
            import zstandard

            return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
        f = COMPRESSED[comp](raw, "rb")  # gzip/bz2/lzma.open over a file object leave it open when closed
    except BaseException:
        raw.close()
        raise
    inner_close = f.close

    def close():
        try:
            inner_close()
        finally:
            raw.close()

    f.close = close
    return f


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
    remote = isinstance(path, RemoteObject)
    src = path.open() if remote else path  # local files keep pyarrow's own (memory-mapped) reader
    try:
        if kind == "parquet":
            pf = pq.ParquetFile(src)
            schema = pf.schema_arrow
            batches = pf.iter_batches(batch_size=1024)
        else:
            try:
                reader = pa.ipc.open_file(src)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            except pa.ArrowInvalid:
                if remote:
                    src.seek(0)
                reader = pa.ipc.open_stream(src)
                batches = iter(reader)
            schema = reader.schema
        types = {f.name: f.type for f in schema}
        yield from iter_table_batches(batches, schema.names, types, cfg, str(path))
    except OSError as exc:
        raise InputDataError(f"cannot read input {path}: {exc}") from None
    except pa.ArrowException as exc:
        raise InputDataError(f"{path} is not a readable {kind} file: {exc}") from None
    finally:
        if remote:
            src.close()


READERS = {"text": _iter_text, "jsonl": _iter_jsonl, "json": _iter_json, "parquet": _iter_file_table,
           "arrow": _iter_file_table}


def file_source(path: Path | RemoteObject, kind: str, cfg: SourceConfig, info: dict | None = None) -> Source:
    reader = READERS[kind]
    local = None if isinstance(path, RemoteObject) else path
    ident = objectstore.object_identity(info) if isinstance(path, RemoteObject) else None
    if kind == "text":
        return Source(str(path), lambda: reader(path), local, ident)
    return Source(str(path), lambda: reader(path, cfg), local, ident)


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
        if objectstore.is_url(entry):
            out.extend(_remote_sources(entry, cfg))
            continue
        p = Path(objectstore.local_path(entry))
        if p.is_dir():
            if is_saved_dataset(p):
                out.append(saved_dataset_source(p, cfg))
                continue
            found = sorted((f for f in p.rglob("*") if f.is_file() and not _skipped(f.relative_to(p))),
                           key=lambda f: f.relative_to(p).as_posix())
            if not found:
                raise InputDataError(f"input directory {p} holds no files")
            kinds = [(f, file_kind(f, cfg.text_glob, explicit=False)) for f in found]
            _refuse_unknown(f"input directory {p}", [f.relative_to(p) for f, k in kinds if k is None])
            out.extend(file_source(f, k, cfg) for f, k in kinds)
        elif p.exists():
            if not p.is_file():
                raise InputDataError(f"input {p} is not a regular file or directory")
            out.append(file_source(p, file_kind(p), cfg))
        else:
            raise InputDataError(f"input {p} does not exist")
    return out


def _refuse_unknown(where: str, unknown: list[Path] | list[PurePosixPath]) -> None:
    """Files of a folder (or a glob's matches) whose kind is unknown: refused, listed (relative names)."""
    if not unknown:
        return
    exts = sorted({"".join(f.suffixes[-1:]) or f.name for f in unknown})
    raise InputDataError(
        f"{where} holds {len(unknown)} file(s) of unknown kind ({', '.join(exts[:8])}): "
        f"{', '.join(str(f) for f in unknown[:5])}{', ...' if len(unknown) > 5 else ''}. "
        "Pass --text-glob PATTERN to read them as plain text (e.g. --text-glob '*.py'), or name the files "
        "you want with --data")


def _missing_bucket(fs, path: str, url: str) -> str | None:
    """The bucket's name when ``url`` names a bucket that does not exist (object stores with buckets only)."""
    if not hasattr(fs, "split_path"):
        return None
    bucket = path.split("/", 1)[0]
    try:
        objectstore.call(fs.ls, bucket, url=url, action="listing the bucket of", passthrough=(FileNotFoundError,))
    except FileNotFoundError:
        return bucket
    except RemoteStorageError:
        return None  # another failure: the caller reports what it got
    return None


def _not_found(fs, path: str, url: str, what: str) -> InputDataError:
    bucket = _missing_bucket(fs, path, url)
    if bucket is not None:
        return InputDataError(f"input {url}: the bucket {bucket!r} does not exist (or this endpoint and these "
                              "credentials cannot see it): fix the URL, or the endpoint (AWS_ENDPOINT_URL / "
                              f"{objectstore.OPTIONS_ENV})")
    return InputDataError(f"input {url}: {what}")


def _remote_sources(url: str, cfg: SourceConfig) -> list[Source]:
    """One ``--data`` URL: an object, a glob over objects, or a prefix walked like a folder."""
    fs, path = objectstore.filesystem(url)
    scheme = url.split("://", 1)[0] + "://"
    shown = _without_userinfo(url)
    if not path:
        raise InputDataError(f"input {url} names no bucket or path")

    def obj(p: str) -> RemoteObject:
        return RemoteObject(_without_userinfo(scheme + p), fs, p)

    fs.invalidate_cache(path)  # list what is there now, not what an earlier run of this process saw
    if any(c in path for c in GLOB_CHARS):
        root = re.split(r"[*?\[]", path, maxsplit=1)[0].rsplit("/", 1)[0]
        fs.invalidate_cache(root)
        found = objectstore.call(fs.glob, path, detail=True, url=shown, action="listing input",
                                 passthrough=(FileNotFoundError,)) if root else {}
        files = sorted((p for p, info in found.items() if info.get("type") == "file"
                        and not _skipped(PurePosixPath(p[len(root) + 1:]))), key=lambda p: p[len(root) + 1:])
        if not files:
            raise _not_found(fs, path, shown, "no object matches this pattern (globs match objects, not prefixes; "
                                              "hidden names are skipped): check the pattern and the bucket")
        kinds = [(p, file_kind(obj(p), cfg.text_glob, explicit=False)) for p in files]
        _refuse_unknown(f"input {shown}", [PurePosixPath(p[len(root) + 1:]) for p, k in kinds if k is None])
        return [file_source(obj(p), k, cfg, found[p]) for p, k in kinds]
    try:
        info = objectstore.call(fs.info, path, url=shown, action="reading input", passthrough=(FileNotFoundError,))
    except FileNotFoundError:
        raise _not_found(fs, path, shown, "no such object or prefix: check the URL") from None
    if info.get("type") != "directory":
        if url.endswith("/"):
            raise InputDataError(f"input {shown} is an object, not a prefix: drop the trailing '/'")
        o = obj(path)
        return [file_source(o, file_kind(o), cfg, info)]
    found = objectstore.call(fs.find, path, detail=True, url=shown, action="listing input")
    rels = sorted((p[len(path) + 1:], p) for p, i in found.items()
                  if i.get("type") == "file" and not p.endswith("/") and p.startswith(path + "/"))
    rels = [(r, p) for r, p in rels if r and not _skipped(PurePosixPath(r))]
    if not rels:
        raise InputDataError(f"input prefix {shown} holds no objects")
    top = {r for r, _ in rels if "/" not in r}
    if {"dataset_info.json", "state.json"} <= top or "dataset_dict.json" in top:
        raise InputDataError(f"input {shown} is a datasets.save_to_disk folder, which labelstore reads only from a "
                             "local disk: copy it locally, or pass its data files (hf:parquet with data_files, or "
                             "Parquet/JSONL objects)")
    kinds = [(r, p, file_kind(obj(p), cfg.text_glob, explicit=False)) for r, p in rels]
    _refuse_unknown(f"input prefix {shown}", [PurePosixPath(r) for r, _, k in kinds if k is None])
    return [file_source(obj(p), k, cfg, found[p]) for _, p, k in kinds]
