"""Torch datasets over a label store: map-style (random access) and iterable (streaming in store order).

An item is one stored sequence as a dict of numpy arrays, padded to the store's K::

    sample_id      int
    input_ids      int64   [T]
    teacher_ids    int64   [T, K]  0 on padding entries
    teacher_probs  float32 [T, K]  absolute probabilities, 0 on padding entries
    teacher_tail   float32 [T]     mass outside the kept ids
    teacher_mask   bool    [T, K]  real kept entries
    position_mask  bool    [T]     positions that carry a teacher distribution

At position ``t`` the teacher distribution is the teacher's prediction of token ``t + 1`` (next-token
alignment). Reconstruction follows docs/FORMAT.md: ``p = (1 - t) * w / sum(w)``, so kept + tail = 1 (to float32
rounding). A position is valid when it stores any mass at all; a position whose kept weights all decode to 0
(no real store writes one: the top token's weight is 1) has only its tail, which then carries the whole mass.
Arrays may be read-only views (of the memory map, or broadcast): copy before writing in place. Batches come from
:class:`labelstore.student.collate.Collator`; :meth:`StoreDataset.collator` builds one with the right K and vocabulary.

Both datasets are picklable by reference: pickling holds the store's path and reader options, never its bytes or
its decoders, and each DataLoader worker (``fork``, ``spawn`` or ``forkserver``) reopens the store and its own
memory maps, refusing (StoreCorruptError) a store whose manifest changed in between.

The student is checked when the dataset is built (``student=``: a model, a config, a tokenizer, or a tuple such as
``(model, tokenizer)``; see :func:`labelstore.student.targets.check_student`), and every batch carries the targets'
``teacher_info`` (mode, estimator, temperature, vocabulary), which the losses check against the student's logits.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from labelstore.distributed import rank_world
from labelstore.errors import StoreCorruptError
from labelstore.reconstruction import TAIL_RULES
from labelstore.store.reader import LabelStore, RawRow
from labelstore.student.collate import Collator
from labelstore.student.targets import (
    DEFAULT_DENSE_BUDGET_BYTES,
    check_student,
    describe_student,
    map_ids,
    retemper,
    teacher_info,
    temper_exponent,
)


def as_store(store, verify_rows: bool, **store_options) -> LabelStore:
    """``store`` itself if open, else the store at that path or URL (``store_options``: LabelStore's remote
    options, storage_options, cache_dir, cache_bytes, prefetch; None values are left out)."""
    if isinstance(store, LabelStore):
        return store
    opts = {k: v for k, v in store_options.items() if v is not None}
    return LabelStore(store if isinstance(store, str) else str(store), verify_rows=verify_rows, **opts)


def manifest_digest(store: LabelStore) -> str:
    return hashlib.sha256(json.dumps(store.manifest, sort_keys=True).encode()).hexdigest()


class StoreRef:
    """A :class:`LabelStore` pickled by reference: its path (or URL), reader options, manifest digest and, for a
    remote store, the announced read order. ``open()`` reopens it (in a DataLoader worker) and refuses a store whose
    manifest is no longer the one pickled."""

    def __init__(self, store: LabelStore):
        self.path = str(store.path)
        self.options = store.open_options()
        self.digest = manifest_digest(store)
        self.plan = store.shard_plan

    def open(self) -> LabelStore:
        store = LabelStore(self.path, **self.options)
        if self.plan is not None:
            store.shard_plan = self.plan
        if manifest_digest(store) != self.digest:
            raise StoreCorruptError(f"store {self.path} changed since this dataset was pickled (its manifest differs); "
                                    "rebuild the dataset from the store as it is now")
        return store


class TargetDecoder:
    """Decoding options shared by both datasets: the student check, id mapping and re-tempering."""

    def __init__(self, store, *, student=None, student_vocab_size=None, student_tokenizer_hash=None, id_map=None,
                 temperature=None, tail_rule="uniform", verify_rows=True, storage_options=None, cache_dir=None,
                 cache_bytes=None, prefetch=None):
        self.store = as_store(store, verify_rows, storage_options=storage_options, cache_dir=cache_dir,
                              cache_bytes=cache_bytes, prefetch=prefetch)
        meta = self.store.meta
        vocab, thash = describe_student(student)
        for name, given, found in (("student_vocab_size", student_vocab_size, vocab),
                                   ("student_tokenizer_hash", student_tokenizer_hash, thash)):
            if given is not None and found is not None and given != found:
                raise ValueError(f"{name}={given!r} contradicts the student passed ({found!r}); pass one of them")
        vocab = student_vocab_size if student_vocab_size is not None else vocab
        thash = student_tokenizer_hash if student_tokenizer_hash is not None else thash
        self.vocab_size, self.id_map = check_student(meta, vocab, thash, id_map)
        self.exponent = temper_exponent(meta, temperature)
        self.info = teacher_info(meta, temperature, self.vocab_size)
        self.tail_rule = tail_rule
        if tail_rule not in TAIL_RULES:
            raise ValueError(f"tail_rule must be one of {TAIL_RULES}, got {tail_rule!r}")
        self.k = self.store.k

    @property
    def meta(self) -> dict:
        return self.store.meta

    def __getstate__(self):  # by reference: never the store's bytes, nor its (unpicklable) decoders
        state = self.__dict__.copy()
        state["store"] = StoreRef(self.store)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.store = state["store"].open()

    def teacher_info(self) -> dict:
        """The ``teacher_info`` of this dataset's batches (:mod:`labelstore.student.collate`)."""
        return dict(self.info)

    def decode(self, i: int) -> dict:
        return self.finish_raw(self.store.get_raw(i))

    def finish_raw(self, raw: RawRow) -> dict:
        """A decoded row -> an item: pad to K (the format's reconstruction), re-temper, map ids."""
        ids, probs = raw.padded(self.store.k)
        return self._finish(raw.sample_id, raw.input_ids, ids, probs, raw.tail, raw.counts)

    def _finish(self, sample_id, input_ids, ids, probs, tail, counts) -> dict:
        k = ids.shape[1]
        if counts.size and counts.min() == k:  # every position full (top-k stores): no mask to compute
            mask = np.broadcast_to(np.True_, ids.shape)
        else:  # pad_row leaves 0 in ids and probs past counts
            mask = np.arange(k) < counts[:, None]
        kept = probs.sum(axis=1, dtype=np.float32)  # 1 - tail by the reconstruction rule, unless all weights are 0
        valid = (kept > 0) | (tail > 0)
        lost = valid & (kept == 0)
        if lost.any():  # kept weights all decode to 0: the position's whole mass is the (unplaceable) tail
            tail = np.where(lost, np.float32(1), tail).astype(np.float32)
        if self.exponent is not None:
            probs, tail = retemper(probs, tail, mask, self.exponent, self.store.vocab_size, self.tail_rule)
        if self.id_map is not None:
            input_ids, ids, probs, tail, mask = map_ids(self.id_map, input_ids, ids, probs, tail, mask)
        return {
            "sample_id": int(sample_id),
            "input_ids": input_ids,
            "teacher_ids": ids,
            "teacher_probs": probs,
            "teacher_tail": tail.astype(np.float32, copy=False),
            "teacher_mask": mask,
            "position_mask": valid,
        }

    def collator(self, *, dense: bool = False, dense_budget_bytes: int = DEFAULT_DENSE_BUDGET_BYTES,
                 **kwargs) -> Collator:
        """A :class:`Collator` for this dataset's items (K = the store's k, V = the student's vocabulary).

        Batches carry ``teacher_info`` (what the targets are). The collator also attaches the store's tail prior
        (``teacher_prior``) when the store has one and the targets are the stored ones over the teacher's
        vocabulary (no ``id_map``, no re-tempering: the prior describes exactly that distribution); pass
        ``prior=None`` to leave it out, or your own ``prior=``.
        """
        kwargs.setdefault("teacher_info", self.teacher_info())
        if "prior" not in kwargs and self.id_map is None and self.exponent is None:
            kwargs["prior"] = self.store.tail_prior()
        return Collator(self.k, self.vocab_size, dense=dense, dense_budget_bytes=dense_budget_bytes, **kwargs)


class StoreDataset(torch.utils.data.Dataset):
    """Map-style dataset: ``ds[i]`` is sequence ``i`` of the store (store order), as an item dict.

    Args:
        store: a store directory or an open :class:`LabelStore`.
        student: the student model, its config, its tokenizer, or a tuple of these (e.g. ``(model, tokenizer)``):
            its vocabulary size and tokenizer hash are checked against the store's (ConfigMismatchError on a
            mismatch, with what to do). Give it: without it only the losses' check of the logits' width remains.
        student_vocab_size, student_tokenizer_hash: the same facts given directly (the hash as
            :func:`labelstore.student.targets.tokenizer_hash` computes it). ``None`` skips a comparison.
        id_map: ``"shared_prefix"`` for a student with the teacher's tokenizer and another vocabulary size (a
            padded head, e.g. Qwen's); or an explicit teacher id -> student id array for another tokenizer (see
            :func:`labelstore.student.targets.check_student`).
        temperature: re-temper targets to this absolute temperature (None: as stored); see
            :mod:`labelstore.student.targets` for what this can and cannot recover.
        tail_rule: how re-tempering treats the tail, ``"uniform"`` or ``"bucket"``.
        verify_rows: check each row's CRC32 while decoding.
        storage_options, cache_dir, cache_bytes, prefetch: for a store given as a URL (``s3://bucket/prefix``),
            :class:`~labelstore.store.reader.LabelStore`'s remote options.
    """

    def __init__(self, store, **options):
        self.targets = TargetDecoder(store, **options)

    def will_read(self, indices) -> None:
        """Announce the indices about to be read, in order: a remote store downloads their shards ahead."""
        self.targets.store.will_read(indices)

    def __len__(self) -> int:
        return len(self.targets.store)

    def __getitem__(self, i: int) -> dict:
        return self.targets.decode(int(i))

    @property
    def store(self) -> LabelStore:
        return self.targets.store

    @property
    def vocab_size(self) -> int:
        """The student's vocabulary size (the teacher's unless an id map says otherwise)."""
        return self.targets.vocab_size

    def collator(self, **kwargs) -> Collator:
        return self.targets.collator(**kwargs)


class StoreIterableDataset(torch.utils.data.IterableDataset):
    """Streaming reads in store order, split across ranks and DataLoader workers.

    Rank ``r`` of ``W`` reads a contiguous block of the store (good locality: neighbouring rows share shards),
    all blocks equally long: the last rank's block wraps around to the start of the store when ``N`` is not a
    multiple of ``W`` (``drop_last=False``, DistributedSampler's padding) or the remainder is dropped
    (``drop_last=True``). Within a rank, work is dealt to DataLoader workers round-robin:

    - ``batch_size=None``: yields items; worker ``w`` of ``n`` takes the rank's items ``w, w + n, ...`` (every item
      once, but a DataLoader batch then holds one worker's items, so batches depend on ``num_workers``).
    - ``batch_size=B``: yields collated batches (use ``DataLoader(ds, batch_size=None)``); worker ``w`` takes
      batches ``w, w + n, ...``, and the DataLoader returns them in order, so the stream of batches is the same
      for any ``num_workers``.

    Options are those of :class:`StoreDataset`, plus ``rank``/``world_size`` (default: torch.distributed's),
    ``drop_last``, ``batch_size`` and ``collator`` (default: :meth:`collator`).
    """

    def __init__(self, store, *, rank=None, world_size=None, drop_last=False, batch_size=None, collator=None,
                 **options):
        self.targets = TargetDecoder(store, **options)
        self.rank, self.world_size = rank_world(rank, world_size)
        self.drop_last = bool(drop_last)
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = None if batch_size is None else int(batch_size)
        self._collate = collator

    def collator(self, **kwargs) -> Collator:
        return self.targets.collator(**kwargs)

    @property
    def vocab_size(self) -> int:
        return self.targets.vocab_size

    def rank_indices(self) -> np.ndarray:
        """Store indices this rank reads, in order."""
        n, w = len(self.targets.store), self.world_size
        per = n // w if self.drop_last else -(-n // w)
        return (np.arange(self.rank * per, (self.rank + 1) * per) % max(n, 1)) if n else np.zeros(0, np.int64)

    def __len__(self) -> int:
        """Items (or batches, with ``batch_size``) this rank yields."""
        n = len(self.rank_indices())
        return n if self.batch_size is None else -(-n // self.batch_size)

    def __iter__(self):
        idx = self.rank_indices()
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.batch_size is None:
            self.targets.store.will_read(idx[wid::nw])
            for i in idx[wid::nw]:
                yield self.targets.decode(int(i))
            return
        collate = self._collate or self.collator()
        starts = list(range(0, len(idx), self.batch_size))[wid::nw]
        mine = [idx[b: b + self.batch_size] for b in starts]
        self.targets.store.will_read(np.concatenate(mine) if mine else idx[:0])
        for b in starts:
            yield collate([self.targets.decode(int(i)) for i in idx[b: b + self.batch_size]])
