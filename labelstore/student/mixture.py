"""Several stores read as one dataset: a corpus compiled as independent parts, trained as one.

A 5-trillion-token run is compiled as many stores (one per corpus part, per time window, per cluster job);
:class:`StoreMixture` concatenates their datasets into one map-style dataset, so :class:`StoreLoader`, its
sampler and its mid-epoch resume work over all of them unchanged. With ``weights``, an epoch draws each part in
proportion to its weight instead of its size (up- or down-sampling a source).

The parts must mean the same thing by a target: the same teacher, tokenizer, vocabulary, temperature, selection
mode and ``k`` (a batch has one ``K``). Anything else is refused, naming the part and the field that differs.
"""

from __future__ import annotations

import numpy as np
import torch

from labelstore.errors import ConfigMismatchError

# what must agree between parts (paths into a store's metadata)
AGREE = (("vocab_size",), ("label_kind",), ("temperature",), ("selection", "mode"), ("selection", "k"),
         ("teacher", "hash"), ("tokenizer", "hash"), ("value_codec", "name"))


def _get(meta: dict, path: tuple[str, ...]):
    for key in path:
        meta = meta.get(key) if isinstance(meta, dict) else None
    return meta


class StoreMixture(torch.utils.data.Dataset):
    """Map-style dataset over several store datasets (e.g. :class:`~labelstore.student.dataset.StoreDataset`).

    Args:
        parts: datasets with a ``store`` (its ``meta``), ``__len__``, ``__getitem__`` and ``collator()``; a part
            given as a path is opened as a ``StoreDataset`` with ``dataset_options``.
        weights: optional non-negative weight per part. Without weights, index ``i`` runs through part 0, then
            part 1, ... (every item once per epoch). With weights, an epoch has as many items as all parts
            together, part ``j`` contributing ``round(w_j / sum(w) * total)`` of them, taken in a seeded
            permutation of the part that repeats when a part is drawn more often than its size.
        seed: the permutation seed for ``weights`` (the same seed gives the same epoch).
        dataset_options: options for parts given as paths (student vocabulary, temperature, ...).

    Items are the parts' items with one more key, ``store_index`` (which part the item came from), since sample
    ids repeat across independently compiled parts.
    """

    def __init__(self, parts, weights=None, *, seed: int = 0, **dataset_options):
        from labelstore.student.dataset import StoreDataset

        self.parts = [StoreDataset(p, **dataset_options) if not hasattr(p, "collator") else p for p in parts]
        if not self.parts:
            raise ValueError("StoreMixture needs at least one store")
        metas = [p.store.meta for p in self.parts]
        for j, meta in enumerate(metas[1:], start=1):
            for path in AGREE:
                a, b = _get(metas[0], path), _get(meta, path)
                if a != b:
                    raise ConfigMismatchError(
                        f"store {j} ({self.parts[j].store.path}) has {'.'.join(path)} = {b!r} but store 0 "
                        f"({self.parts[0].store.path}) has {a!r}: their targets cannot share a batch. Mix stores of "
                        "one teacher, tokenizer and selection only (recompile the odd one, or train on it separately)"
                    )
        sizes = np.array([len(p) for p in self.parts], dtype=np.int64)
        self.sizes = sizes
        # index i of the mixture lies in part j = searchsorted(offsets, i, "right") - 1: one int64 per part, never
        # one per row (a 5T-token mixture has billions of rows)
        if weights is None:
            self.weights = None
            self.counts = sizes
            self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            self._perms = None
            return
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (len(self.parts),) or not np.all(np.isfinite(w)) or w.min() < 0 or w.sum() <= 0:
            raise ValueError(f"weights must be {len(self.parts)} non-negative numbers, not all zero; got {weights!r}")
        if np.any((w > 0) & (sizes == 0)):
            raise ValueError("a store with a positive weight is empty")
        self.weights = w / w.sum()
        total = int(sizes.sum())
        counts = np.floor(self.weights * total).astype(np.int64)
        short = total - int(counts.sum())  # largest remainders first, ties to the earlier part
        order = np.argsort(-(self.weights * total - counts), kind="stable")
        counts[order[:short]] += 1
        rng = np.random.default_rng(seed)
        # part j's items are its rows in a seeded permutation, repeated when it is drawn more often than its size;
        # the permutations are the only per-row state (int32 where the part allows it)
        self._perms = []
        for n, size in zip(counts, sizes):
            perm = rng.permutation(size) if n else np.zeros(0, np.int64)
            self._perms.append(perm.astype(np.int32) if size < 2**31 else perm)
        self.counts = counts
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def _locate_many(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(part, row in the part) of mixture indices ``idx`` (in range)."""
        part = np.searchsorted(self._offsets, idx, side="right") - 1
        k = idx - self._offsets[part]
        if self._perms is None:
            return part, k
        row = np.empty_like(k)
        for j in np.unique(part).tolist():
            sel = part == j
            row[sel] = self._perms[j][k[sel] % self.sizes[j]]
        return part, row

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """(part, index in the part) of mixture index ``i``."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a mixture of {n} items")
        part, row = self._locate_many(np.array([int(i) % n], dtype=np.int64))
        return int(part[0]), int(row[0])

    def __getitem__(self, i: int) -> dict:
        j, r = self.locate(i)
        item = self.parts[j][r]
        item["store_index"] = j
        return item

    def will_read(self, indices) -> None:
        """Announce the mixture indices about to be read, in order, to each part that can use it (remote stores)."""
        idx = np.asarray(indices, dtype=np.int64) % max(len(self), 1)
        part, row = self._locate_many(idx)
        for j, p in enumerate(self.parts):
            if hasattr(p, "will_read"):
                p.will_read(row[part == j])

    @property
    def store(self):
        """The first part's store (the parts agree on every field a batch depends on)."""
        return self.parts[0].store

    @property
    def vocab_size(self) -> int:
        return self.parts[0].vocab_size

    def collator(self, **kwargs):
        return self.parts[0].collator(**kwargs)
