"""Corpus inputs: files -> documents -> token sequences, in one deterministic plan.

Supported inputs (``--data`` may repeat; a directory stands for its files, recursively, in sorted order,
hidden files and ``__pycache__`` folders excepted):

- plain text (any other extension): the whole file is one document, UTF-8;
- JSONL (``.jsonl``, ``.ndjson``): one JSON object per line, its ``text_field`` is a document;
- Parquet (``.parquet``) and Arrow IPC (``.arrow``, ``.feather``, ``.ipc``; file or stream format): each row's
  ``text_field`` (a string column) is a document, or, when the table has no such column, its ``token_field``
  (a ``list<int>`` column) is a pre-tokenized document used as is.

Documents are tokenized with the teacher's tokenizer (``add_special_tokens=True``: a BOS where the tokenizer
adds one) and an EOS is appended where the tokenizer defines one. Then either

- **pack**: all documents are concatenated and cut into sequences of exactly ``max_length`` tokens (the last
  one shorter); each sequence records the offsets where a document starts inside it (``doc_starts``); or
- **truncate**: each document is one sequence, cut to ``max_length`` tokens (``doc_starts == [0]``).

Sequence ``i`` of the plan has sample id ``i``: the same inputs and settings always give the same ids.
The plan's tokens live in a memory-mapped scratch file when a work directory is given, so memory stays small
whatever the corpus size, and its SHA-256 fingerprint identifies the data in the store's config.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from labelstore.errors import InputDataError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow", ".feather", ".ipc")
TOKENIZE_BATCH = 256  # documents per tokenizer call


@dataclass(frozen=True)
class InputConfig:
    """Every input setting that changes which sequences the plan holds."""

    max_length: int = 2048
    pack: bool = True
    text_field: str = "text"
    token_field: str = "input_ids"
    max_samples: int | None = None  # keep only the first N sequences of the plan

    def __post_init__(self):
        if not isinstance(self.max_length, int) or self.max_length < 1:
            raise ValueError(f"max_length must be a positive integer, got {self.max_length!r}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples must be a positive integer, got {self.max_samples!r}")


# -------------------------------------------------------------------------------------------- files
def _skipped(rel: Path) -> bool:
    return any(part.startswith(".") or part == "__pycache__" for part in rel.parts)


def expand_paths(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Input paths in plan order: files as given, directories replaced by their files (sorted, recursive).

    Inside a directory, hidden files and folders and ``__pycache__`` folders are skipped.
    """
    if not paths:
        raise InputDataError("no input given: pass at least one --data file or directory")
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(
                (f for f in p.rglob("*") if f.is_file() and not _skipped(f.relative_to(p))),
                key=lambda f: f.relative_to(p).as_posix(),
            )
            if not found:
                raise InputDataError(f"input directory {p} holds no files")
            out.extend(found)
        elif p.exists():
            if not p.is_file():
                raise InputDataError(f"input {p} is not a regular file or directory")
            out.append(p)
        else:
            raise InputDataError(f"input {p} does not exist")
    return out


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(ARROW_SUFFIXES):
        return "arrow"
    return "text"


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputDataError(f"cannot read input {path}: {exc.strerror or exc}") from None


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputDataError(
            f"{where} is not valid UTF-8 (byte {exc.start}): convert it to UTF-8 or remove it from --data"
        ) from None


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    """One document per line, streamed (a JSONL file may be far larger than memory)."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, also when the generator is abandoned
    except OSError as exc:
        raise InputDataError(f"cannot read input {path}: {exc.strerror or exc}") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            line = _decode(raw, f"{path}:{lineno}")
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputDataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict) or text_field not in rec:
                keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
                raise InputDataError(
                    f"{path}:{lineno}: record has no field {text_field!r} (it has {keys}); pass --text-field NAME"
                )
            value = rec[text_field]
            if not isinstance(value, str):
                raise InputDataError(
                    f"{path}:{lineno}: field {text_field!r} is a {type(value).__name__}, not a string")
            yield value


def _open_table(path: Path):
    """(schema, function(column) -> iterator of record batches holding that column), streamed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if _kind(path) == "parquet":
        pf = pq.ParquetFile(path)
        return pf.schema_arrow, lambda col: pf.iter_batches(batch_size=1024, columns=[col])
    try:
        reader = pa.ipc.open_file(path)
        return reader.schema, lambda col: (reader.get_batch(i) for i in range(reader.num_record_batches))
    except pa.ArrowInvalid:
        reader = pa.ipc.open_stream(path)
        return reader.schema, lambda col: iter(reader)


def _iter_table(path: Path, text_field: str, token_field: str) -> Iterator[str | np.ndarray]:
    """Each row's text (string column) or token ids (list<int> column), streamed batch by batch."""
    import pyarrow as pa

    try:
        schema, batches = _open_table(path)
        names = schema.names
        if text_field in names:
            field, kind = text_field, "text"
            t = schema.field(text_field).type
            if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
                raise InputDataError(f"{path}: column {text_field!r} has type {t}, expected a string column")
        elif token_field in names:
            field, kind = token_field, "tokens"
            t = schema.field(token_field).type
            if not ((pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(t.value_type)):
                raise InputDataError(f"{path}: column {token_field!r} has type {t}, expected list<int> token ids")
        else:
            raise InputDataError(
                f"{path} has neither a text column {text_field!r} nor a token column {token_field!r} "
                f"(columns: {names}); pass --text-field or --token-field"
            )
        for batch in batches(field):
            col = batch.column(field)
            if col.null_count:
                raise InputDataError(f"{path}: column {field!r} holds null rows; drop or fill them")
            if kind == "text":
                yield from col.to_pylist()
                continue
            offsets = np.asarray(col.offsets)
            values = np.asarray(col.values.fill_null(-1), dtype=np.int64)
            for row in range(len(col)):
                yield values[offsets[row]:offsets[row + 1]]
    except OSError as exc:
        raise InputDataError(f"cannot read input {path}: {exc}") from None
    except pa.ArrowException as exc:
        raise InputDataError(f"{path} is not a readable {_kind(path)} file: {exc}") from None


def iter_documents(paths: Sequence[Path], cfg: InputConfig) -> Iterator[str | np.ndarray]:
    """Every document of every input in plan order: a ``str`` to tokenize or an array of token ids."""
    for path in paths:
        kind = _kind(path)
        if kind == "text":
            yield _decode(_read_bytes(path), str(path))
        elif kind == "jsonl":
            yield from _iter_jsonl(path, cfg.text_field)
        else:
            yield from _iter_table(path, cfg.text_field, cfg.token_field)


# -------------------------------------------------------------------------------------------- tokens
def _eos_id(tokenizer) -> int | None:
    eos = getattr(tokenizer, "eos_token_id", None)
    return int(eos) if eos is not None else None


def iter_token_documents(paths: Sequence[Path], cfg: InputConfig, tokenizer,
                         vocab_size: int) -> Iterator[np.ndarray]:
    """Documents as int32 token arrays (tokenized in batches), each ending with EOS where there is one."""
    eos = _eos_id(tokenizer)
    pending: list[str | np.ndarray] = []

    def flush():
        texts = [d for d in pending if isinstance(d, str)]
        encoded = iter(tokenizer(texts, add_special_tokens=True)["input_ids"]) if texts else iter(())
        for d in pending:
            ids = np.asarray(next(encoded) if isinstance(d, str) else d, dtype=np.int64)
            if len(d) == 0:  # an empty document contributes nothing (not even an EOS)
                continue
            if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                raise InputDataError(
                    f"a document holds token id {int(ids.max() if ids.max() >= vocab_size else ids.min())}, "
                    f"outside the teacher's vocabulary [0, {vocab_size}): were the token ids made with another "
                    "tokenizer?"
                )
            if eos is not None and (ids.size == 0 or ids[-1] != eos):
                ids = np.append(ids, eos)
            if ids.size:
                yield ids.astype(np.int32)
        pending.clear()

    for doc in iter_documents(paths, cfg):
        pending.append(doc)
        if len(pending) >= TOKENIZE_BATCH:
            yield from flush()
    yield from flush()


def iter_sequences(docs: Iterator[np.ndarray], cfg: InputConfig) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tokens int32 [T], doc_starts int32 [D]) per sequence, packed or truncated per ``cfg``."""
    L = cfg.max_length
    if not cfg.pack:
        for d in docs:
            yield d[:L], np.zeros(1, dtype=np.int32)
        return
    buf: list[np.ndarray] = []
    starts: list[int] = []
    fill = 0
    for d in docs:
        pos = 0
        while pos < d.size:
            if pos == 0:
                starts.append(fill)
            take = min(L - fill, d.size - pos)
            buf.append(d[pos:pos + take])
            fill += take
            pos += take
            if fill == L:
                yield np.concatenate(buf), np.asarray(starts, dtype=np.int32)
                buf, starts, fill = [], [], 0
    if fill:
        yield np.concatenate(buf), np.asarray(starts, dtype=np.int32)


# -------------------------------------------------------------------------------------------- plan
class Plan:
    """The compile's sequences: tokens and document starts of sample ``i`` for every ``i < len(plan)``."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, doc_starts: np.ndarray, doc_offsets: np.ndarray,
                 fingerprint: str, files: list[str]):
        self.tokens, self.offsets = tokens, offsets
        self.doc_starts_flat, self.doc_offsets = doc_starts, doc_offsets
        self.fingerprint = fingerprint
        self.files = files

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sequence(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[self.offsets[i]:self.offsets[i + 1]])

    def doc_starts(self, i: int) -> np.ndarray:
        return np.asarray(self.doc_starts_flat[self.doc_offsets[i]:self.doc_offsets[i + 1]])


def build_plan(paths: Sequence[str | os.PathLike], tokenizer, cfg: InputConfig, vocab_size: int,
               workdir: str | os.PathLike | None = None) -> Plan:
    """Read, tokenize and cut every input into sequences; validates all inputs before returning.

    With ``workdir`` the tokens go to a scratch file there (memory-mapped back), otherwise into memory.
    Raises :class:`InputDataError` for missing, unreadable or non-UTF-8 files, missing fields and empty corpora.
    """
    if cfg.pack and _eos_id(tokenizer) is None:
        raise InputDataError("packing needs an EOS token between documents but the tokenizer has none; "
                             "use --truncate or a tokenizer with an eos_token")
    files = expand_paths(paths)
    sink = open(Path(workdir) / "plan-tokens.bin", "wb") if workdir is not None else None  # noqa: SIM115
    parts: list[np.ndarray] = []
    lengths: list[int] = []
    starts: list[np.ndarray] = []
    digest = hashlib.sha256()
    try:
        seqs = iter_sequences(iter_token_documents(files, cfg, tokenizer, vocab_size), cfg)
        for tokens, ds in seqs:
            if cfg.max_samples is not None and len(lengths) >= cfg.max_samples:
                break
            digest.update(np.int64(tokens.size).tobytes())
            digest.update(tokens.tobytes())
            digest.update(np.int64(ds.size).tobytes())
            digest.update(ds.tobytes())
            lengths.append(tokens.size)
            starts.append(ds)
            if sink is not None:
                sink.write(tokens.tobytes())
            else:
                parts.append(tokens)
    finally:
        if sink is not None:
            sink.close()
    if not lengths:
        raise InputDataError(
            f"the corpus is empty: {len(files)} input file(s) ({', '.join(map(str, files[:3]))}"
            f"{', ...' if len(files) > 3 else ''}) hold no text; check --data and --text-field"
        )
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if sink is not None:
        tokens = np.memmap(sink.name, dtype=np.int32, mode="r", shape=(int(offsets[-1]),))
    else:
        tokens = np.concatenate(parts)
    doc_offsets = np.zeros(len(starts) + 1, dtype=np.int64)
    np.cumsum([s.size for s in starts], out=doc_offsets[1:])
    return Plan(tokens, offsets, np.concatenate(starts), doc_offsets, digest.hexdigest(),
                [str(f) for f in files])
