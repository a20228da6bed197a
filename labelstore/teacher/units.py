"""``--plan units``: each rank reads and tokenizes only its own share of the inputs, in work units.

**Work units.** The inputs (:func:`labelstore.teacher.sources.expand_sources`, in their order) are cut into
units: one per input file or object, one per ``hf:NAME`` dataset or ``IterableDataset``, and one per
:data:`RECORDS_PER_UNIT` records of a list of records or rows of a ``datasets.Dataset`` given to
``compile_store(data=...)``. Listing them reads no
document. A unit is planned on its own (packing never spans two units: a unit's last sequence may be short) and
its batches never span two units.

**Sample ids** are a pure function of the inputs and the settings, whatever the number of ranks, without
tokenizing any other unit: sequence ``i`` of unit ``u`` is sample ``u * 2**SEQ_BITS + i``. Limits
(:func:`check_id_limits`): at most ``2**26`` (67,108,864) sequences per unit, and a row id of the sampler
(``sample_id * max_length + position``, docs/FORMAT.md 5b) must fit an int64: at most
``2**63 / (2**26 * max_length)`` units (65,536 at ``max_length`` 2**21; 67,108,864 at 2048).

**Ranks.** Rank ``r`` of ``N`` takes the ``r``-th contiguous block of units (:func:`rank_units`), so the shards of
all ranks, ordered by first sample id, list the rows in the 1-process order. Each rank tokenizes one unit at a
time into memory: no rank holds or writes a copy of the corpus's tokens.

**Resume** (:mod:`labelstore.teacher.unit_progress`): a rank's commit records carry its progress by unit; a
resume reads the newest record of each rank, skips the complete units without reading them, re-tokenizes only
the units it still has work in, and refuses (naming the file) when the input of a committed unit changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from labelstore.errors import InputDataError
from labelstore.teacher.records import Source

SEQ_BITS = 26
MAX_UNIT_SEQUENCES = 1 << SEQ_BITS
RECORDS_PER_UNIT = 4096  # records per unit of a list of records given to compile_store(data=...)
PLAN_MODES = ("global", "units")


# ------------------------------------------------------------------------------------------------ units
@dataclass(frozen=True)
class WorkUnit:
    """One unit of work: an input (or a slice of records) planned, batched and compiled on its own."""

    index: int
    source: Source
    name: str  # relative to the inputs' common prefix (what the store's config fingerprints)
    identity: str  # sha256 hex of the input's cheap identity (size + modification time, ETag, content hash)

    @property
    def first_id(self) -> int:
        return self.index << SEQ_BITS


def unit_of(sample_ids) -> np.ndarray:
    return np.asarray(sample_ids, dtype=np.int64) >> SEQ_BITS


def source_identity(src: Source) -> dict:
    """The cheap identity of an input: what says that it is still the same without reading it."""
    if src.identity is not None:
        return dict(src.identity)
    p = src.path
    if p is not None:
        try:
            if p.is_dir():  # a datasets.save_to_disk folder: its files' sizes and stamps
                files = sorted(f for f in p.rglob("*") if f.is_file())
                return {"files": [[f.relative_to(p).as_posix(), f.stat().st_size, f.stat().st_mtime_ns]
                                  for f in files]}
            st = p.stat()
            return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
        except OSError as exc:
            raise InputDataError(f"cannot read input {p}: {exc.strerror or exc}") from None
    return {}  # hf:NAME: its name only (docs: a dataset changed under the same name is not detected)


def relative_names(names: Sequence[str]) -> list[str]:
    """Names without their common directory prefix (inputs moved as a whole keep their names)."""
    if len(names) == 1:
        return [names[0].rsplit("/", 1)[-1]]
    cut = os.path.commonprefix(list(names)).rfind("/") + 1
    return [n[cut:] for n in names]


def make_units(sources: Sequence[Source]) -> list[WorkUnit]:
    """The work units of ``sources`` (one per source, in order), with their identities. Reads no document."""
    rel = relative_names([s.name for s in sources])
    out = []
    for i, (s, name) in enumerate(zip(sources, rel)):
        ident = json.dumps(source_identity(s), sort_keys=True, default=str)
        out.append(WorkUnit(i, s, name, hashlib.sha256(ident.encode()).hexdigest()))
    return out


def inputs_config(units: Sequence[WorkUnit]) -> dict:
    """``compile_config.data`` of a units store: how many units and their names, in order (compared on resume:
    another unit list would give other sample ids). The inputs' contents are checked unit by unit."""
    names = hashlib.sha256("\n".join(u.name for u in units).encode()).hexdigest()
    return {"units": len(units), "unit_names_sha256": names}


def rank_units(n: int, rank: int, world: int) -> range:
    """Rank ``rank``'s units: the ``rank``-th contiguous block (the first ``n % world`` ranks take one more)."""
    per, extra = divmod(n, world)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (1 if rank < extra else 0))


def check_id_limits(n_units: int, max_length: int) -> None:
    """Refuse a unit count whose sample ids (or the sampler's row ids) would not fit an int64."""
    limit = (1 << 63) // (MAX_UNIT_SEQUENCES * max_length)
    if n_units > limit:
        raise InputDataError(
            f"--plan units: {n_units:,} work units at --max-length {max_length} exceed the {limit:,} units whose "
            f"sample ids fit (unit * 2**{SEQ_BITS} + sequence, times max_length, must fit an int64): merge input "
            "files, or use --plan global")


def check_unit_size(unit: WorkUnit, n: int) -> None:
    if n > MAX_UNIT_SEQUENCES:
        raise InputDataError(f"--plan units: input {unit.source.name} holds more than {MAX_UNIT_SEQUENCES:,} "
                             "sequences, the most one unit may hold: split it into several files")


def _xor(a: str, b: str) -> str:
    return f"{int(a, 16) ^ int(b, 16):064x}"


ZERO = "0" * 64


# ------------------------------------------------------------------------------------------------ work
@dataclass
class UnitCounts:
    """What a rank's unit loop saw: for the compile's result and the whole-corpus checks at its end."""

    units: int = 0  # units of this rank's block
    skipped_units: int = 0  # completely committed before this run: not read
    tokenized_units: int = 0
    sequences: int = 0  # sequences of the units tokenized now
    skipped: int = 0  # sequences committed before this run (skipped_sequences + partly committed units)
    labelled_positions: int = 0
    stats: dict = field(default_factory=dict)
    chat_template_sha256: str | None = None

    def add_stats(self, plan) -> None:
        for k, v in plan.stats.items():
            self.stats[k] = self.stats.get(k, 0) + v


def unit_work(units: Sequence[WorkUnit], block: range, committed, tokenizer, cfg, vocab_size: int,
              tokens_per_batch: int, counts: UnitCounts, renderer=None):
    """Yield ``(plan, batches, todo masks)`` for each unit of ``block`` that still has work, tokenizing one unit
    at a time (none of the others). Completely committed units are skipped unread; a partly committed unit is
    re-tokenized and refused if its tokens differ from those its committed rows were computed from.

    ``cfg.max_samples`` (one rank only: :mod:`labelstore.teacher.compile` refuses it with several) keeps the first
    N sequences in unit order.
    """
    from labelstore.teacher.batching import plan_batches
    from labelstore.teacher.inputs import build_plan
    from labelstore.teacher.unit_progress import in_runs

    counts.units = len(block)
    counts.skipped = committed.skipped_sequences(block)
    left = cfg.max_samples
    if left is not None:
        left -= counts.skipped
    for u in block:
        unit = units[u]
        st = committed.status(u)
        if st.done:
            counts.skipped_units += 1
            continue
        if left is not None and left <= 0:
            return
        plan = build_plan([unit.source], tokenizer, cfg, vocab_size, unit=True, first_id=unit.first_id,
                          max_sequences=MAX_UNIT_SEQUENCES + 1 if left is None else left, renderer=renderer)
        check_unit_size(unit, len(plan))
        counts.tokenized_units += 1
        counts.sequences += len(plan)
        counts.labelled_positions += plan.labelled_positions
        counts.add_stats(plan)
        if plan.chat_template_sha256 is not None:
            counts.chat_template_sha256 = plan.chat_template_sha256
        if left is not None:
            left -= len(plan)
        if not len(plan):
            continue
        if st.sha is not None and st.sha != plan.fingerprint:
            raise InputDataError(
                f"input {unit.source.name} (work unit {u}) now gives other tokens than the ones its committed "
                "sequences were computed from (the file, the tokenizer or a setting changed): restore it to resume, "
                "or compile into a new --out directory (or pass --overwrite)")
        batches = plan_batches(plan, tokens_per_batch, cfg.pack)
        masks = [~in_runs(b - unit.first_id, st.runs) for b in batches]
        counts.skipped += sum(int((~m).sum()) for m in masks)
        plan.unit = unit
        yield plan, batches, masks


def __getattr__(name: str):
    """The progress and resume names live in :mod:`labelstore.teacher.unit_progress` (which imports this module);
    importing them from here still works."""
    if name in ("CommittedUnits", "RankProgress", "UnitStatus", "UnitTracker", "in_runs", "progress_from_ranges",
                "read_progress"):
        from labelstore.teacher import unit_progress

        return getattr(unit_progress, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
