"""StoreSampler: DistributedSampler semantics with an exact mid-epoch resume.

Epoch ``e`` orders the ``N`` samples by a permutation seeded with ``seed + e`` (or store order with
``shuffle=False``), then makes the length a multiple of the world size ``W``, by repeating the first samples
of that order (``drop_last=False``) or dropping the last ones (``drop_last=True``), and gives rank ``r`` every
``W``-th sample starting at ``r``. So within an epoch the ranks' samples are disjoint (up to the padding
repeats), together cover the store (all of it unless ``drop_last``), and each rank gets the same count. The
order equals ``torch.utils.data.DistributedSampler``'s for the same seed and epoch.

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


class StoreSampler(torch.utils.data.Sampler):
    """Shard ``len(dataset)`` indices across ranks, shuffle per epoch, resume mid-epoch.

    Args:
        data_source: a sized dataset, or the number of samples.
        num_replicas, rank: world size and this rank (default: torch.distributed's, else 1 and 0).
        shuffle: a fresh permutation every epoch (seeded by ``seed + epoch``); else store order.
        seed: shared by all ranks.
        drop_last: drop the tail that does not divide evenly, instead of padding with repeats.
    """

    def __init__(self, data_source, *, num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        self.n = int(data_source) if isinstance(data_source, (int, np.integer)) else len(data_source)
        self.rank, self.num_replicas = rank_world(rank, num_replicas)
        self.shuffle = bool(shuffle)
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
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + e)
            order = torch.randperm(self.n, generator=g).numpy()
        else:
            order = np.arange(self.n)
        if self.drop_last:
            order = order[: self.total_size]
        elif self.total_size > self.n:
            pad = self.total_size - self.n
            order = np.concatenate([order, np.resize(order, pad)]) if self.n else order
        return order[self.rank: self.total_size: self.num_replicas].astype(np.int64)

    def __len__(self) -> int:
        return self.num_samples - self._start

    def __iter__(self):
        idx = self.epoch_indices()
        start, self._start = self._start, 0
        self._yielded = start
        for i in idx[start:]:
            self._yielded += 1
            yield int(i)

    def state_dict(self, consumed: int | None = None) -> dict:
        """Where this rank stands: epoch and samples consumed in it (default: the indices handed out)."""
        return {
            "epoch": self.epoch,
            "consumed": int(self._yielded if consumed is None else consumed),
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "num_replicas": self.num_replicas,
            "rank": self.rank,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; refuses a state from a different dataset size, seed or world layout."""
        for key in ("seed", "shuffle", "drop_last", "num_replicas", "rank", "num_samples"):
            if key in state and state[key] != getattr(self, key):
                raise ConfigMismatchError(
                    f"sampler state has {key}={state[key]!r} but this sampler has {getattr(self, key)!r}; resume "
                    "with the same store, seed, shuffle, drop_last and world layout"
                )
        consumed = int(state["consumed"])
        if not 0 <= consumed <= self.num_samples:
            raise ValueError(f"consumed={consumed} is outside [0, {self.num_samples}]")
        self.epoch = int(state["epoch"])
        self._start = consumed
        self._yielded = consumed
