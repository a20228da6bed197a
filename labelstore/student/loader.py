"""StoreLoader: a DataLoader over a label store that knows where it stands, for exact mid-epoch resume.

    ds = StoreDataset("store/", student_vocab_size=model.config.vocab_size)
    loader = StoreLoader(ds, batch_size=8, rank=rank, world_size=world, num_workers=2, seed=0)
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            ...                              # batch: see labelstore.student.collate
            ckpt["loader"] = loader.state_dict()

    loader.load_state_dict(ckpt["loader"])   # the next iteration yields exactly the batches not yet seen

It is a ``torch.utils.data.DataLoader`` driven by a :class:`~labelstore.student.sampler.StoreSampler`
(DistributedSampler semantics). Prefetching workers make the sampler run ahead of the training loop, so the loader
counts the samples of the batches it has *delivered*; that count, not the sampler's, is what ``state_dict()`` records.
"""

from __future__ import annotations

import torch

from labelstore.student.sampler import StoreSampler


class StoreLoader:
    """Batches of a :class:`~labelstore.student.dataset.StoreDataset` for one rank, resumable mid-epoch.

    Args:
        dataset: a :class:`~labelstore.student.dataset.StoreDataset` (or any map-style dataset of items).
        batch_size: sequences per batch.
        shuffle, seed, drop_last, shard_window: the sampler's (a fresh seeded permutation per epoch, or
            ``shuffle="shards"``: by groups of ``shard_window`` shards, for remote stores; drop_last trims the store
            to a multiple of the world size instead of padding with repeats).
        rank, world_size: default torch.distributed's, else 0 and 1.
        collate_fn: default ``dataset.collator(dense=dense, **collate_kwargs)``.
        num_workers, **loader_kwargs: passed to the DataLoader (pin_memory, prefetch_factor, ...).
    """

    def __init__(self, dataset, batch_size: int, *, shuffle: bool | str = True, seed: int = 0,
                 drop_last: bool = False, rank: int | None = None, world_size: int | None = None, collate_fn=None,
                 dense: bool = False, collate_kwargs: dict | None = None, num_workers: int = 0,
                 shard_window: int = 4, **loader_kwargs):
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.sampler = StoreSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                    drop_last=drop_last, shard_window=shard_window)
        self.collate_fn = collate_fn or dataset.collator(dense=dense, **(collate_kwargs or {}))
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, sampler=self.sampler,
                                                  collate_fn=self.collate_fn, num_workers=num_workers,
                                                  **loader_kwargs)
        self._consumed = 0

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.sampler.epoch:
            self._consumed = 0
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self):
        self._consumed = self.sampler.num_samples - len(self.sampler)  # a loaded resume offset
        if hasattr(self.dataset, "will_read"):  # a remote store fetches shards in the order this epoch reads them
            self.dataset.will_read(self.sampler.epoch_indices()[self._consumed:])
        for batch in self.loader:
            self._consumed += int(batch["input_ids"].shape[0])
            yield batch

    def state_dict(self) -> dict:
        """The sampler's state with the samples delivered so far in this epoch."""
        return self.sampler.state_dict(consumed=self._consumed)

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self._consumed = int(state["consumed"])
