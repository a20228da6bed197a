"""Corpus inputs: sources -> documents -> token sequences, in one deterministic plan.

Sources (files, folders, Hugging Face datasets, Python objects) are described in
:mod:`labelstore.teacher.sources`; conversations and instruction pairs in :mod:`labelstore.teacher.chat`.

Text documents are tokenized with the teacher's tokenizer (``add_special_tokens=True``: a BOS where the
tokenizer adds one); conversations are rendered with the chat template; an EOS is appended where the tokenizer
defines one (it belongs to the turn it closes). Then either

- **pack**: all documents are concatenated and cut into sequences of exactly ``max_length`` tokens (the last
  one shorter); each sequence records the offsets where a document starts inside it (``doc_starts``); or
- **truncate**: each document is one sequence, cut to ``max_length`` tokens (``doc_starts == [0]``); the plan
  counts the documents and tokens cut off (``plan.stats``).

**Label positions.** With ``assistant_only``, position ``t`` of a document keeps a label only when token
``t + 1`` belongs to an assistant turn (or a prompt/completion pair's completion); the plan holds one flag per
token (``plan.label_mask``) and the compile stores count 0 and tail 0 at the other positions (docs/FORMAT.md
3, ``label_positions``), which the student loader reads as ``position_mask == False``. The teacher still reads
every token. Without it every position keeps a label.

Sequence ``i`` of the plan has sample id ``i`` (``first_id + i`` in a work unit's plan): the same inputs and settings
always give the same ids.
The plan's tokens live in a memory-mapped scratch file when a work directory is given, so memory stays small
whatever the corpus size, and its SHA-256 fingerprint (tokens, document starts and label flags) identifies the
data in the store's config.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from labelstore.errors import InputDataError
from labelstore.teacher.chat import Chat, ChatRenderer, Pair
from labelstore.teacher.records import Source, SourceConfig
from labelstore.teacher.sources import expand_sources

TOKENIZE_BATCH = 256  # documents per tokenizer call
PROGRESS_EVERY = 10.0  # seconds between tokenizing progress lines (when asked for)


@dataclass(frozen=True)
class InputConfig:
    """Every input setting that changes which sequences the plan holds."""

    max_length: int = 2048
    pack: bool = True
    text_field: str = "text"
    token_field: str = "input_ids"
    max_samples: int | None = None  # keep only the first N sequences of the plan
    assistant_only: bool = False  # labels only where the next token is an assistant's (or a completion's)
    chat_template: str | None = None  # template text (None: the tokenizer's own)
    text_glob: tuple[str, ...] = ()
    split: str | None = None
    streaming: bool = False

    def __post_init__(self):
        if not isinstance(self.max_length, int) or self.max_length < 1:
            raise ValueError(f"max_length must be a positive integer, got {self.max_length!r}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples must be a positive integer, got {self.max_samples!r}")

    @property
    def sources(self) -> SourceConfig:
        return SourceConfig(text_field=self.text_field, token_field=self.token_field,
                            text_glob=tuple(self.text_glob), split=self.split, streaming=self.streaming)


def expand_paths(paths: Sequence[str | os.PathLike], text_glob: Sequence[str] = ()) -> list[Path]:
    """The local files ``paths`` stand for, in plan order (see :func:`labelstore.teacher.sources.expand_sources`)."""
    return [s.path for s in expand_sources(paths, SourceConfig(text_glob=tuple(text_glob))) if s.path is not None]


# -------------------------------------------------------------------------------------------- tokens
def _eos_id(tokenizer) -> int | None:
    eos = getattr(tokenizer, "eos_token_id", None)
    return int(eos) if eos is not None else None


@dataclass
class Tokenized:
    """One document's token ids and, per token, whether it is a target (assistant or completion token)."""

    ids: np.ndarray  # int32 [n]
    targets: np.ndarray | None  # bool [n]; None: a plain document (no target tokens)


LONG_DOC_CHARS = 1 << 20  # text documents longer than this are tokenized in pieces (bounded memory per call)


def _pieces(text: str, size: int):
    """``text`` in pieces of at most ``size`` characters, each cut just after a newline (else a space) if it has
    one, so that a tokenizer's pre-tokenization rarely straddles a cut."""
    a = 0
    while a < len(text):
        b = min(len(text), a + size)
        if b < len(text):
            cut = text.rfind("\n", a, b)
            if cut <= a:
                cut = text.rfind(" ", a, b)
            if cut > a:
                b = cut + 1
        yield text[a:b]
        a = b


def _special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids ``add_special_tokens=True`` puts before and after a text (e.g. ``[BOS]`` and ``[]``)."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return list(full[:i]), list(full[i + len(plain):])
    return [], []


def tokenize_long(tokenizer, text: str, size: int | None = None) -> np.ndarray:
    """A long text document's ids, tokenized a piece at a time (:func:`_pieces`): memory per call stays bounded
    whatever the document's size (a 50 MB single-line file tokenized whole took 7 GB). Tokens at a cut can differ
    from tokenizing the whole text at once where a pre-token would have spanned the cut (a whitespace run)."""
    size = size or LONG_DOC_CHARS
    head, tail = _special_tokens(tokenizer)
    parts = [np.asarray(head, dtype=np.int64)]
    parts += [np.asarray(tokenizer(p, add_special_tokens=False)["input_ids"], dtype=np.int64)
              for p in _pieces(text, size)]
    parts.append(np.asarray(tail, dtype=np.int64))
    return np.concatenate(parts)


def iter_token_documents(sources: Sequence[Source], cfg: InputConfig, tokenizer, vocab_size: int,
                         renderer: ChatRenderer | None = None) -> Iterator[Tokenized]:
    """Documents as int32 token arrays (text tokenized in batches), each ending with EOS where there is one."""
    eos = _eos_id(tokenizer)
    renderer = renderer or ChatRenderer(tokenizer, cfg.chat_template)
    pending: list = []
    chars = 0

    def flush():
        texts = [d for d in pending if isinstance(d, str) and len(d) <= LONG_DOC_CHARS]
        encoded = iter(tokenizer(texts, add_special_tokens=True)["input_ids"]) if texts else iter(())
        for d in pending:
            targets = None
            if isinstance(d, str):
                if len(d) > LONG_DOC_CHARS:
                    ids = tokenize_long(tokenizer, d)
                else:
                    ids = np.asarray(next(encoded), dtype=np.int64)
                if not d:  # an empty document contributes nothing (not even an EOS)
                    continue
            elif isinstance(d, Chat):
                ids, targets = renderer.render_chat(d)
            elif isinstance(d, Pair):
                ids, targets = renderer.render_pair(d)
            else:
                ids = np.asarray(d, dtype=np.int64)
                if ids.size == 0:
                    continue
            if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                raise InputDataError(
                    f"a document holds token id {int(ids.max() if ids.max() >= vocab_size else ids.min())}, "
                    f"outside the teacher's vocabulary [0, {vocab_size}): were the token ids made with another "
                    "tokenizer?"
                )
            if eos is not None and (ids.size == 0 or ids[-1] != eos):
                ids = np.append(ids, eos)
                if targets is not None:  # the EOS closes the last turn: a target if that turn is one
                    targets = np.append(targets, bool(targets[-1]) if targets.size else False)
            if ids.size:
                yield Tokenized(ids.astype(np.int32), targets)
        pending.clear()

    for src in sources:
        for doc in src.documents():
            if cfg.assistant_only and not isinstance(doc, (Chat, Pair)):
                where = getattr(doc, "where", src.name)
                raise InputDataError(
                    f"{where}: --assistant-only keeps labels only for assistant turns ('messages' records) and "
                    f"completions ('prompt'+'completion' records), but this source holds plain "
                    f"{'token ids' if isinstance(doc, np.ndarray) else 'text'}: drop --assistant-only or the source")
            pending.append(doc)
            chars += len(doc) if isinstance(doc, str) and len(doc) <= LONG_DOC_CHARS else 0
            if len(pending) >= TOKENIZE_BATCH or chars > LONG_DOC_CHARS:  # bounded text per tokenizer call
                yield from flush()
                chars = 0
    yield from flush()


def label_flags(doc: Tokenized) -> np.ndarray:
    """Per position of a document: keep a label there (its next token is a target)."""
    keep = np.zeros(doc.ids.size, dtype=np.uint8)
    if doc.targets is not None and doc.ids.size > 1:
        keep[:-1] = doc.targets[1:]
    return keep


def iter_sequences(docs: Iterator[Tokenized], cfg: InputConfig, stats: dict | None = None
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(tokens int32 [T], doc_starts int32 [D], label flags uint8 [T]) per sequence, packed or truncated.

    ``stats`` (a dict) receives ``documents``, ``document_tokens`` and, in truncate mode,
    ``truncated_documents`` and ``truncated_tokens`` (the tokens cut off), plus, with ``assistant_only``,
    ``truncated_label_positions`` (label positions cut off), counted over what was yielded.
    """
    stats = {} if stats is None else stats
    for key in ("documents", "document_tokens", "truncated_documents", "truncated_tokens"):
        stats.setdefault(key, 0)
    if cfg.assistant_only and not cfg.pack:
        stats.setdefault("truncated_label_positions", 0)
    L = cfg.max_length
    if not cfg.pack:
        for d in docs:
            stats["documents"] += 1
            stats["document_tokens"] += d.ids.size
            keep = label_flags(d)
            if d.ids.size > L:
                stats["truncated_documents"] += 1
                stats["truncated_tokens"] += d.ids.size - L
                if cfg.assistant_only:  # labels a long conversation loses past max_length
                    stats["truncated_label_positions"] += int(keep[L:].sum())
            yield d.ids[:L], np.zeros(1, dtype=np.int32), keep[:L]
        return
    buf: list[np.ndarray] = []
    flags: list[np.ndarray] = []
    starts: list[int] = []
    fill = 0
    for d in docs:
        stats["documents"] += 1
        stats["document_tokens"] += d.ids.size
        keep = label_flags(d)
        pos = 0
        while pos < d.ids.size:
            if pos == 0:
                starts.append(fill)
            take = min(L - fill, d.ids.size - pos)
            buf.append(d.ids[pos:pos + take])
            flags.append(keep[pos:pos + take])
            fill += take
            pos += take
            if fill == L:
                yield np.concatenate(buf), np.asarray(starts, dtype=np.int32), np.concatenate(flags)
                buf, flags, starts, fill = [], [], [], 0
    if fill:
        yield np.concatenate(buf), np.asarray(starts, dtype=np.int32), np.concatenate(flags)


# -------------------------------------------------------------------------------------------- plan
@dataclass
class Plan:
    """The compile's sequences: tokens and document starts of sample ``i`` for every ``i < len(plan)``.

    ``label_mask`` (uint8, one per token, or None when every position keeps a label) says which positions keep
    a label; ``stats`` counts documents, their tokens and, in truncate mode, what was cut off.
    """

    tokens: np.ndarray
    offsets: np.ndarray
    doc_starts_flat: np.ndarray
    doc_offsets: np.ndarray
    fingerprint: str
    files: list[str]
    label_mask: np.ndarray | None = None
    stats: dict = field(default_factory=dict)
    chat_template_sha256: str | None = None  # set when a conversation was rendered with a chat template
    first_id: int = 0  # sample id of sequence 0 (a unit's plan: labelstore.teacher.units)
    unit: object = None  # the WorkUnit of a unit's plan

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def labelled_positions(self) -> int:
        return self.num_tokens if self.label_mask is None else int(np.count_nonzero(self.label_mask))

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sequence(self, sample_id: int) -> np.ndarray:
        i = sample_id - self.first_id
        return np.asarray(self.tokens[self.offsets[i]:self.offsets[i + 1]])

    def doc_starts(self, sample_id: int) -> np.ndarray:
        i = sample_id - self.first_id
        return np.asarray(self.doc_starts_flat[self.doc_offsets[i]:self.doc_offsets[i + 1]])

    def keep(self, sample_id: int) -> np.ndarray:
        """Label flags (bool, one per token) of one sequence (of a plan with ``label_mask``)."""
        i = sample_id - self.first_id
        return np.asarray(self.label_mask[self.offsets[i]:self.offsets[i + 1]], dtype=bool)

    def keep_rows(self, row_ids: np.ndarray, max_length: int) -> np.ndarray | None:
        """Label flags (bool) of global rows ``sample_id * max_length + position``; None: keep all."""
        if self.label_mask is None:
            return None
        sid, pos = np.divmod(np.asarray(row_ids, dtype=np.int64), max_length)
        return np.asarray(self.label_mask[self.offsets[sid - self.first_id] + pos], dtype=bool)


class _Progress:
    """A line on stderr every ``every`` seconds while tokenizing (a silent minute looks like a hang)."""

    def __init__(self, every: float | None):
        self.every, self.t0 = every, time.monotonic()
        self.last = self.t0

    def __call__(self, stats: dict, sequences: int) -> None:
        now = time.monotonic()
        if self.every is None or now - self.last < self.every:
            return
        self.last = now
        rate = stats.get("document_tokens", 0) / max(now - self.t0, 1e-9)
        print(f"tokenizing: {stats.get('documents', 0):,} documents, {stats.get('document_tokens', 0):,} tokens, "
              f"{sequences:,} sequences ({rate:,.0f} tokens/s)", file=sys.stderr, flush=True)


def build_plan(paths: Sequence[str | os.PathLike] | Sequence[Source], tokenizer, cfg: InputConfig, vocab_size: int,
               workdir: str | os.PathLike | None = None, progress_every: float | None = None, *,
               first_id: int = 0, max_sequences: int | None = None, unit: bool = False,
               renderer: ChatRenderer | None = None) -> Plan:
    """Read, tokenize and cut every input into sequences; validates all inputs before returning.

    ``paths``: ``--data`` entries, or :class:`Source` objects. With ``workdir`` the tokens go to a scratch file
    there (memory-mapped back), otherwise into memory. ``progress_every``: print a tokenizing progress line to
    stderr every that many seconds. Raises :class:`InputDataError` for missing, unreadable or non-UTF-8 files,
    missing fields and empty corpora.

    ``unit`` (a ``--plan units`` work unit, :mod:`labelstore.teacher.units`): sample ids from ``first_id``, at most
    ``max_sequences`` (default ``cfg.max_samples``); no label position or no text is no error (whole-corpus checks).
    """
    if cfg.pack and _eos_id(tokenizer) is None:
        raise InputDataError("packing needs an EOS token between documents but the tokenizer has none; "
                             "use --truncate or a tokenizer with an eos_token")
    sources = list(paths) if paths and all(isinstance(p, Source) for p in paths) else \
        expand_sources(paths, cfg.sources)
    renderer = renderer or ChatRenderer(tokenizer, cfg.chat_template)
    limit = cfg.max_samples if max_sequences is None else max_sequences
    sink = open(Path(workdir) / "plan-tokens.bin", "wb") if workdir is not None else None  # noqa: SIM115
    parts: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    lengths: list[int] = []
    starts: list[np.ndarray] = []
    digest = hashlib.sha256()
    stats: dict = {}
    progress = _Progress(progress_every)
    try:
        docs = iter_token_documents(sources, cfg, tokenizer, vocab_size, renderer)
        for tokens, ds, keep in iter_sequences(docs, cfg, stats):
            digest.update(np.int64(tokens.size).tobytes())
            digest.update(tokens.tobytes())
            digest.update(np.int64(ds.size).tobytes())
            digest.update(ds.tobytes())
            if cfg.assistant_only:  # plans without label flags keep the fingerprint of earlier versions
                digest.update(keep.tobytes())
                masks.append(keep)
            lengths.append(tokens.size)
            starts.append(ds)
            if sink is not None:
                sink.write(tokens.tobytes())
            else:
                parts.append(tokens)
            progress(stats, len(lengths))
            if limit is not None and len(lengths) >= limit:
                break
    finally:
        if sink is not None:
            sink.close()
    names = [s.name for s in sources]
    if not lengths and unit:
        return Plan(np.zeros(0, np.int32), np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(1, np.int64),
                    digest.hexdigest(), names, np.zeros(0, np.uint8) if cfg.assistant_only else None, stats,
                    None, first_id)
    if not lengths:
        raise InputDataError(
            f"the corpus is empty: {len(names)} input(s) ({', '.join(names[:3])}"
            f"{', ...' if len(names) > 3 else ''}) hold no text; check --data and --text-field"
        )
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if sink is not None:
        tokens = np.memmap(sink.name, dtype=np.int32, mode="r", shape=(int(offsets[-1]),))
    else:
        tokens = np.concatenate(parts)
    doc_offsets = np.zeros(len(starts) + 1, dtype=np.int64)
    np.cumsum([s.size for s in starts], out=doc_offsets[1:])
    label_mask = np.concatenate(masks) if cfg.assistant_only else None
    if label_mask is not None and not label_mask.any() and not unit:
        raise InputDataError(f"--assistant-only: no position of the {len(lengths):,} sequences is followed by an "
                             "assistant or completion token (no assistant turns?); nothing would be stored")
    return Plan(tokens, offsets, np.concatenate(starts), doc_offsets, digest.hexdigest(), names, label_mask, stats,
                renderer.template_sha256 if renderer.used_template else None, first_id)
