"""StoreSampler: DistributedSampler semantics with an exact mid-epoch resume.

Epoch ``e`` orders the ``N`` samples by a permutation seeded with ``seed + e`` (or store order with
``shuffle=False``), then makes the length a multiple of the world size ``W``, by repeating the first samples
of that order (``drop_last=False``) or dropping the last ones (``drop_last=True``), and gives rank ``r`` every
``W``-th sample starting at ``r``. So within an epoch the ranks' samples are disjoint (up to the padding
repeats), together cover the store (all of it unless ``drop_last``), and each rank gets the same count. The
order equals ``torch.utils.data.DistributedSampler``'s for the same seed and epoch.

``shuffle="shards"`` (for stores read from object storage or larger than a cache): epoch ``e`` permutes the
store's shards, groups them ``shard_window`` at a time in that order, permutes the rows inside each group, and
gives rank ``r`` the ``r``-th *contiguous* block of the result (after the same padding or dropping). Each rank
then reads about ``1 / W`` of the shards, a group at a time, instead of every shard within its first batches; a
batch mixes the rows of ``shard_window`` shards rather than of the whole store (rows of one shard are
neighbouring sequences of the corpus: use a window of several shards). Not DistributedSampler's order.

Resuming: ``state_dict()`` records the epoch and how many of this rank's samples have been consumed;
``load_state_dict()`` makes the next ``__iter__`` continue from there. The sampler counts the indices it has
handed out, which equals what the training loop consumed only when nothing prefetches: a DataLoader with
workers runs ahead by ``num_workers * prefetch_factor`` batches. Pass the true count, ``state_dict(consumed=n)``,
or let :class:`labelstore.student.loader.StoreLoader` count delivered batches for you.
"""

from __future__ import annotations

import numpy as np
import torch

from labelstore.distributed import rank_world
from labelstore.errors import ConfigMismatchError

SHARDS_ORDER = 2  # the shuffle="shards" order: 2 = groups permuted by (seed, epoch, group) generators (0.4.0)


def shard_starts_of(data_source) -> np.ndarray:
    """The global index of each shard's first row, and the row count last, of the one store under a dataset."""
    store = getattr(data_source, "store", None)
    if store is None or not hasattr(store, "shard_starts") or hasattr(data_source, "parts"):
        raise ValueError("shuffle='shards' needs a dataset over one label store (a StoreDataset); use shuffle=True "
                         "for other datasets and for mixtures")
    return np.asarray(store.shard_starts, dtype=np.int64)


class StoreSampler(torch.utils.data.Sampler):
    """Shard ``len(dataset)`` indices across ranks, shuffle per epoch, resume mid-epoch.

    Args:
        data_source: a sized dataset, or the number of samples.
        num_replicas, rank: world size and this rank (default: torch.distributed's, else 1 and 0).
        shuffle: a fresh permutation every epoch (seeded by ``seed + epoch``); ``"shards"``: a two-level shuffle by
            groups of ``shard_window`` shards (above; needs a dataset over one store); False: store order.
        shard_window: shards whose rows are mixed together with ``shuffle="shards"``.
        seed: shared by all ranks.
        drop_last: drop the tail that does not divide evenly, instead of padding with repeats.
    """

    def __init__(self, data_source, *, num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool | str = True, seed: int = 0, drop_last: bool = False, shard_window: int = 4):
        self.n = int(data_source) if isinstance(data_source, (int, np.integer)) else len(data_source)
        self.rank, self.num_replicas = rank_world(rank, num_replicas)
        if shuffle == "shards":
            self._starts = shard_starts_of(data_source)
            if int(self._starts[-1]) != self.n:
                raise ValueError(f"the store's shards hold {int(self._starts[-1])} rows, the dataset {self.n}")
            if not isinstance(shard_window, int) or shard_window < 1:
                raise ValueError(f"shard_window must be a positive integer, got {shard_window!r}")
        elif not isinstance(shuffle, bool):
            raise ValueError(f"shuffle must be True, False or 'shards', got {shuffle!r}")
        self.shuffle = shuffle
        self.shard_window = int(shard_window)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        W = self.num_replicas
        self.num_samples = self.n // W if drop_last else -(-self.n // W)
        self.total_size = self.num_samples * W
        self.epoch = 0
        self._start = 0  # samples of this epoch to skip (a resume)
        self._yielded = 0  # samples of this epoch handed out so far

    def set_epoch(self, epoch: int) -> None:
        """Select epoch ``epoch``'s permutation; a resume offset loaded for another epoch is discarded."""
        if int(epoch) != self.epoch:
            self._start = 0
        self.epoch = int(epoch)

    def epoch_indices(self, epoch: int | None = None) -> np.ndarray:
        """This rank's full index list for ``epoch`` (default: the current one)."""
        e = self.epoch if epoch is None else int(epoch)
        parts = list(self._rank_chunks(e, 0))
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def _rank_chunks(self, epoch: int, start: int):
        """This rank's indices of ``epoch`` from its ``start``-th on, in chunks. ``shuffle="shards"`` and
        ``shuffle=False`` never hold more than a group of shards (or this rank's share) at once; ``shuffle=True``
        holds the epoch's permutation, one int64 per row of the store (use ``"shards"`` for stores of billions of
        rows: 2.4e9 rows would be 19 GB per rank)."""
        n, W, r = self.n, self.num_replicas, self.rank
        if n == 0 or start >= self.num_samples:
            return
        if self.shuffle == "shards":  # contiguous blocks: each rank reads its own groups of shards
            yield from self._order_range(epoch, r * self.num_samples + start, (r + 1) * self.num_samples)
        elif self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            order = torch.randperm(n, generator=g).numpy()
            yield order[(np.arange(r + start * W, self.total_size, W) % n)].astype(np.int64)
        else:  # store order, every W-th position; positions past n repeat the order's start (the padding)
            step = 1 << 20
            for a in range(r + start * W, self.total_size, step * W):
                yield np.arange(a, min(self.total_size, a + step * W), W, dtype=np.int64) % n

    def _groups(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Epoch ``epoch``'s shard permutation and the row offset of each group of ``shard_window`` shards in it
        (one int64 per shard, never per row)."""
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        starts = self._starts
        shards = torch.randperm(len(starts) - 1, generator=g).numpy()
        rows = np.diff(starts)[shards]
        sizes = np.add.reduceat(rows, np.arange(0, len(shards), self.shard_window)) if len(shards) else rows
        return shards, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def _group_rows(self, epoch: int, shards: np.ndarray, gi: int) -> np.ndarray:
        """The rows of group ``gi``, permuted by a generator seeded with ``(seed, epoch, gi)`` alone, so any group
        can be produced without the ones before it."""
        starts = self._starts
        members = shards[gi * self.shard_window: (gi + 1) * self.shard_window]
        rows = np.concatenate([np.arange(starts[s], starts[s + 1], dtype=np.int64) for s in members])
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed % (1 << 64), epoch, gi])))
        return rows[rng.permutation(len(rows))]

    def _order_range(self, epoch: int, a: int, b: int):
        """Positions ``[a, b)`` of the epoch's two-level order (position ``p`` past the store's ``n`` rows repeats
        position ``p mod n``: the padding), one group at a time."""
        shards, goff = self._groups(epoch)
        n = self.n
        cached = (-1, None)
        p = a
        while p < b:
            q = p % n
            gi = int(np.searchsorted(goff, q, side="right")) - 1
            if cached[0] != gi:
                cached = (gi, self._group_rows(epoch, shards, gi))
            rows = cached[1]
            lo = q - int(goff[gi])
            take = min(len(rows) - lo, b - p)
            yield rows[lo: lo + take]
            p += take

    def _shard_order(self, epoch: int) -> np.ndarray:
        """The whole two-level order of ``epoch`` (shards permuted, taken ``shard_window`` at a time, rows permuted
        within each group), before padding: the definition the rank blocks are cut from."""
        parts = list(self._order_range(epoch, 0, self.n))
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return self.num_samples - self._start

    def __iter__(self):
        start, self._start = self._start, 0
        self._yielded = start
        for chunk in self._rank_chunks(self.epoch, start):
            for i in chunk.tolist():
                self._yielded += 1
                yield i

    def state_dict(self, consumed: int | None = None) -> dict:
        """Where this rank stands: epoch and samples consumed in it (default: the indices handed out)."""
        return {
            "epoch": self.epoch,
            "consumed": int(self._yielded if consumed is None else consumed),
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shard_window": self.shard_window,
            "drop_last": self.drop_last,
            "num_replicas": self.num_replicas,
            "rank": self.rank,
            "num_samples": self.num_samples,
            **({"shards_order": SHARDS_ORDER} if self.shuffle == "shards" else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; refuses a state from a different dataset size, seed or world layout."""
        for key in ("seed", "shuffle", "drop_last", "num_replicas", "rank", "num_samples", "shard_window"):
            if key == "shard_window" and self.shuffle != "shards":
                continue
            if key in state and state[key] != getattr(self, key):
                raise ConfigMismatchError(
                    f"sampler state has {key}={state[key]!r} but this sampler has {getattr(self, key)!r}; resume "
                    "with the same store, seed, shuffle, drop_last and world layout"
                )
        if self.shuffle == "shards" and state.get("shards_order", 1) != SHARDS_ORDER and int(state["consumed"]):
            raise ConfigMismatchError(
                f"sampler state from another shuffle='shards' order (version {state.get('shards_order', 1)}, "
                f"labelstore 0.3; this one is version {SHARDS_ORDER}): continuing mid-epoch would repeat some rows and "
                "skip others. Resume at the start of the next epoch (set_epoch(state['epoch'] + 1)) instead"
            )
        consumed = int(state["consumed"])
        if not 0 <= consumed <= self.num_samples:
            raise ValueError(f"consumed={consumed} is outside [0, {self.num_samples}]")
        self.epoch = int(state["epoch"])
        self._start = consumed
        self._yielded = consumed
