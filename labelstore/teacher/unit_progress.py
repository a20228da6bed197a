"""Progress of a ``--plan units`` compile, by work unit: what each commit record says, and what a resume skips.

A rank's commit records carry its progress (docs/FORMAT.md 7, item 7, ``units``): the unit ranges it committed
completely, with the XOR of those units' input identities, and the units it committed part of, with their token
digest and committed sequence runs. A resume reads the newest record of each rank only (every record when a
rank's sequence numbers have a gap: :func:`read_progress`), skips the complete units without reading them, and
refuses (naming the file) when the input of a committed unit changed: its size and modification time (an
object's size and ETag; the records of a list given to ``compile_store``, their content) differ, or a partly
committed unit tokenizes differently (checked in :func:`labelstore.teacher.units.unit_work`).
"""

from __future__ import annotations

import bisect
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from labelstore.errors import InputDataError, StoreFormatError
from labelstore.teacher.units import SEQ_BITS, ZERO, WorkUnit, _xor


def _merge(ranges: list[list[int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


@dataclass
class RankProgress:
    """What one rank committed, by unit (the ``units`` entry of its newest commit record, docs/FORMAT.md 7).

    ``done``: ``[first unit, end unit, sequences]`` runs of units this rank committed completely;
    ``done_identity``: the XOR of those units' identities; ``partial``: unit -> (token sha256 or None, identity
    or None, committed ``[start, end)`` runs of its local sequence indices).
    """

    done: list[list[int]] = field(default_factory=list)
    done_identity: str = ZERO
    partial: dict[int, tuple[str | None, str | None, list[list[int]]]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"done": [list(r) for r in self.done], "done_identity": self.done_identity,
                "partial": [[u, sha, ident, [list(r) for r in runs]] for u, (sha, ident, runs)
                            in sorted(self.partial.items())]}

    @classmethod
    def from_json(cls, d, where: str) -> RankProgress:
        def ints(x, n):
            return isinstance(x, list) and len(x) == n and all(isinstance(v, int) and not isinstance(v, bool)
                                                                and v >= 0 for v in x)
        hexre = re.compile(r"[0-9a-f]{64}")
        try:
            ok = isinstance(d, dict) and isinstance(d.get("done"), list) and all(ints(r, 3) and r[0] < r[1]
                                                                                for r in d["done"])
            ok = ok and isinstance(d.get("done_identity"), str) and hexre.fullmatch(d["done_identity"])
            ok = ok and isinstance(d.get("partial"), list)
            partial = {}
            for e in d["partial"] if ok else []:
                ok = ok and isinstance(e, list) and len(e) == 4 and isinstance(e[0], int) and e[0] >= 0
                ok = ok and all(x is None or (isinstance(x, str) and hexre.fullmatch(x)) for x in e[1:3])
                ok = ok and isinstance(e[3], list) and all(ints(r, 2) and r[0] < r[1] for r in e[3])
                if ok:
                    partial[e[0]] = (e[1], e[2], _merge([list(r) for r in e[3]]))
        except (TypeError, KeyError):
            ok = False
        if not ok:
            raise StoreFormatError(f"{where}: its 'units' progress entry is malformed")
        done = sorted([list(r) for r in d["done"]])
        if any(b[0] < a[1] for a, b in zip(done, done[1:])):
            raise StoreFormatError(f"{where}: its 'units' progress entry lists a unit as done twice")
        return cls(done, d["done_identity"], partial)

    def done_units(self) -> Iterator[int]:
        for a, b, _ in self.done:
            yield from range(a, b)


def progress_from_ranges(ranges: np.ndarray) -> RankProgress:
    """A rank's progress rebuilt from the sample ranges of its commit records (every unit partial, no digests):
    what a resume uses when a rank's records have a gap. Those units are re-tokenized, nothing is recomputed."""
    partial: dict[int, list[list[int]]] = {}
    for a, b in np.asarray(ranges, dtype=np.int64).reshape(-1, 2).tolist():
        while a < b:
            u = a >> SEQ_BITS
            end = min(b, (u + 1) << SEQ_BITS)
            partial.setdefault(u, []).append([a - (u << SEQ_BITS), end - (u << SEQ_BITS)])
            a = end
    return RankProgress(partial={u: (None, None, _merge(r)) for u, r in partial.items()})


COMMIT_NAME = re.compile(r"r([0-9]{5})-([0-9]{6})\.json", re.ASCII)


def read_progress(root, records: list[dict] | None = None) -> dict[int, RankProgress]:
    """Every rank's committed units: from the newest commit record of each rank (reading one record per rank:
    not linear in the number of committed shards), or from all of a rank's records when its sequence numbers
    have a gap (a record was removed) or its newest record has no ``units`` entry.

    ``records``: the commit records when they are already in memory (an object-storage store); else they are
    read from ``root/commits``.
    """
    from labelstore.store.manifest import list_commits, read_json, validate_commit_record
    from labelstore.store.writer import merged_ranges

    seqs: dict[int, list[int]] = {}
    by_key = {}
    if records is not None:
        for r in records:
            seqs.setdefault(r["rank"], []).append(r["seq"])
            by_key[(r["rank"], r["seq"])] = r
    else:
        cdir = Path(root) / "commits"
        for name in (os.listdir(cdir) if cdir.is_dir() else []):
            m = COMMIT_NAME.fullmatch(name)
            if m:
                seqs.setdefault(int(m.group(1)), []).append(int(m.group(2)))
    out = {}
    for rank, ss in sorted(seqs.items()):
        last = max(ss)
        rec = None
        if len(set(ss)) == last + 1:  # records 0..last all there: the newest one holds the rank's progress
            if records is not None:
                rec = by_key[(rank, last)]
            else:
                p = Path(root) / "commits" / f"r{rank:05d}-{last:06d}.json"
                rec = validate_commit_record(read_json(p, "commit record"), str(p))
        if rec is not None and "units" in rec:
            out[rank] = RankProgress.from_json(rec["units"], f"commit record r{rank:05d}-{last:06d}.json")
        else:
            recs = [r for r in records if r["rank"] == rank] if records is not None else list_commits(root, rank)
            out[rank] = progress_from_ranges(merged_ranges(recs))
    return out


class UnitTracker:
    """This rank's progress while it compiles: told of every row before the writer adds it (so that a commit
    record written inside ``add`` covers exactly the rows of the committed shards), it gives the writer the
    ``units`` entry of each commit record (:meth:`record`)."""

    def __init__(self, own: RankProgress | None = None):
        own = own or RankProgress()
        self.p = RankProgress([list(r) for r in own.done], own.done_identity,
                              {u: (s, i, [list(r) for r in runs]) for u, (s, i, runs) in own.partial.items()})
        self.unit: WorkUnit | None = None
        self.completed: list[list] = []  # units completed since the last record: [unit, identity]

    def begin(self, unit: WorkUnit, n: int, sha: str) -> None:
        """The rows that follow belong to ``unit`` (``n`` sequences, token digest ``sha``)."""
        self.unit, self.n, self.sha = unit, n, sha
        _, _, runs = self.p.partial.get(unit.index, (sha, unit.identity, []))
        self.runs = [list(r) for r in runs]
        self.covered = sum(b - a for a, b in self.runs)

    def add(self, sample_id: int) -> None:
        u = self.unit
        i = int(sample_id) - u.first_id
        if not 0 <= i < self.n:
            raise ValueError(f"sample {sample_id} is not one of unit {u.index}'s {self.n} sequences")
        runs = self.runs
        if runs and runs[-1][1] == i:  # the common case: the next sequence in order
            runs[-1][1] += 1
        else:
            j = bisect.bisect_right(runs, [i, i + 1])
            if (j and runs[j - 1][1] > i) or (j < len(runs) and runs[j][0] <= i):
                raise ValueError(f"sample {sample_id} is committed already")
            runs.insert(j, [i, i + 1])
            if j + 1 < len(runs) and runs[j + 1][0] == i + 1:  # join the neighbours it touches (O(1) merges)
                runs[j][1] = runs.pop(j + 1)[1]
            if j and runs[j - 1][1] == i:
                runs[j - 1][1] = runs.pop(j)[1]
        self.covered += 1
        if self.covered == self.n:  # the unit is complete: one done run instead of its sequence runs
            self.p.partial.pop(u.index, None)
            self._add_done(u.index, self.n)
            self.p.done_identity = _xor(self.p.done_identity, u.identity)
            self.completed.append([u.index, u.identity])
        else:
            self.p.partial[u.index] = (self.sha, u.identity, runs)

    def _add_done(self, u: int, n: int) -> None:
        done = self.p.done
        if done and done[-1][1] == u:
            done[-1][1] += 1
            done[-1][2] += n
            return
        j = bisect.bisect_right(done, [u, u + 1, n])
        done.insert(j, [u, u + 1, n])

    def record(self) -> dict:
        """The ``units`` entry of the commit record being written (progress so far; units completed since the
        previous record)."""
        rec = {**self.p.to_json(), "completed": self.completed}
        self.completed = []
        return rec


# ------------------------------------------------------------------------------------------------ resume
@dataclass
class UnitStatus:
    done: bool  # committed completely (by some rank)
    sha: str | None  # token digest recorded for a partly committed unit
    runs: list[list[int]]  # committed local sequence runs (partly committed)


class CommittedUnits:
    """Every rank's progress, asked unit by unit (binary searches over each rank's done runs)."""

    def __init__(self, progress: dict[int, RankProgress]):
        self.progress = progress
        self._starts = {r: [d[0] for d in p.done] for r, p in progress.items()}

    def _done_run(self, u: int):
        for r, p in self.progress.items():
            j = bisect.bisect_right(self._starts[r], u) - 1
            if j >= 0 and p.done[j][1] > u:
                return p.done[j]
        return None

    def status(self, u: int) -> UnitStatus:
        if self._done_run(u) is not None:
            return UnitStatus(True, None, [])
        shas = {p.partial[u][0] for p in self.progress.values() if u in p.partial} - {None}
        if len(shas) > 1:
            raise StoreFormatError(f"unit {u} was committed by two ranks from different tokens: the store's commit "
                                   "records disagree; compile into a new --out directory")
        runs = _merge([list(r) for p in self.progress.values() if u in p.partial for r in p.partial[u][2]])
        return UnitStatus(False, shas.pop() if shas else None, runs)

    def skipped_sequences(self, block: range) -> int:
        """Sequences of completely committed units counted for ``block``: each done run counts for the block
        holding its first unit (so the ranks' figures add up to the store's)."""
        return sum(n for p in self.progress.values() for a, _, n in p.done if a in block)

    def check_identities(self, units: Sequence[WorkUnit], root=None, records: list[dict] | None = None) -> None:
        """Refuse when the input of a committed unit changed, naming it: the records (``records``, else those
        read from ``root``) say which completed unit had which identity."""
        for rank, p in self.progress.items():
            for u, (_, ident, _) in p.partial.items():
                if ident is not None and (u >= len(units) or units[u].identity != ident):
                    raise _changed(units, u)
            acc = ZERO
            for u in p.done_units():
                if u >= len(units):
                    raise _changed(units, u)
                acc = _xor(acc, units[u].identity)
            if acc != p.done_identity:
                raise _changed(units, _find_changed(root, records, rank, units))


def _find_changed(root, records, rank: int, units: Sequence[WorkUnit]) -> int | None:
    from labelstore.store.manifest import list_commits

    try:
        if records is not None:
            recs = [r for r in records if r.get("rank") == rank]
        elif root is not None:
            recs = list_commits(root, rank)
        else:
            return None
        for rec in recs:
            for u, ident in rec.get("units", {}).get("completed", []):
                if u >= len(units) or units[u].identity != ident:
                    return u
    except (OSError, StoreFormatError, ValueError, TypeError):
        return None
    return None


def _changed(units: Sequence[WorkUnit], u: int | None) -> InputDataError:
    what = (f"input {units[u].source.name} (work unit {u})" if u is not None and u < len(units)
            else "an input file")
    return InputDataError(
        f"{what} changed after its labels were committed (size, modification time, ETag or content differ from "
        "what the store recorded): restore it to resume (committed shards are intact), or compile the new inputs "
        "into a new --out directory (or pass --overwrite)")


def in_runs(local: np.ndarray, runs: list[list[int]]) -> np.ndarray:
    """bool mask: which local sequence indices lie in the sorted, merged ``[start, end)`` runs."""
    if not runs:
        return np.zeros(local.shape, dtype=bool)
    r = np.asarray(runs, dtype=np.int64)
    j = np.searchsorted(r[:, 0], local, side="right") - 1
    return (j >= 0) & (local < r[np.maximum(j, 0), 1])
