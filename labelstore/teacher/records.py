"""Records -> documents: which field of a JSON object, table row or dataset row is the document.

A record is one document through the first of these fields it has: ``--text-field`` (text), ``messages`` (a
conversation), ``prompt`` + ``completion`` (an instruction pair), ``--token-field`` (pre-tokenized ids, used as
is). Tables (Parquet, Arrow, ``datasets``) pick the field once from their columns and stream record batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from labelstore.errors import InputDataError
from labelstore.teacher.chat import Chat, Pair

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
    identity: dict | None = None  # what identifies its content without reading it (labelstore.teacher.units)


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
