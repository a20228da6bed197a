"""Tensor-parallel teachers under torchrun (``--tp-size N``): ranks form groups, groups split the data.

``world`` ranks make ``world / N`` groups of ``N`` consecutive ranks (rank ``r`` is member ``r % N`` of group
``r // N``). Each group loads one copy of the teacher through transformers' own tensor parallelism
(``from_pretrained(tp_plan="auto")`` on the group's slice of a ``(groups, N)`` device mesh); for the store a
group is one rank: batch ``b`` belongs to group ``b mod groups`` and only the group's first member (its
*leader*) extracts and writes, as rank ``group`` of ``groups``. The other members run the same forwards, in
the same order, because every forward is a collective of the group: they skip exactly the batches the leader
skips, reading the same commit records (:class:`FollowerWriter`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from labelstore.errors import LabelStoreError
from labelstore.store.writer import StoreWriter


@dataclass(frozen=True)
class TPLayout:
    """This process's place: ``group`` of ``groups`` (the store's rank and world), ``member`` of ``tp_size``."""

    group: int
    groups: int
    member: int
    tp_size: int

    @property
    def leader(self) -> bool:
        return self.member == 0


def tp_layout(rank: int, world: int, tp_size: int) -> TPLayout:
    """Split ``world`` ranks into groups of ``tp_size``; refuses sizes that do not divide the world."""
    if tp_size < 1 or world % tp_size:
        raise LabelStoreError(f"--tp-size {tp_size} must divide the number of ranks ({world}): start torchrun with "
                              f"a multiple of {tp_size} processes (--nproc-per-node)")
    return TPLayout(rank // tp_size, world // tp_size, rank % tp_size, tp_size)


def tp_mesh(layout: TPLayout, device: torch.device):
    """This group's 1-D tensor-parallel slice of a ``(groups, tp_size)`` device mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (layout.groups, layout.tp_size), mesh_dim_names=("dp", "tp"))
    return mesh["tp"]


class FollowerWriter:
    """What a non-leader member needs of the store: the committed sample ids (read-only, no lock)."""

    def __init__(self, root):
        self.root = root

    def committed_ranges(self) -> np.ndarray:
        """int64 [n, 2]: merged ``[start, end)`` runs of the committed sample ids (never expanded id by id)."""
        from labelstore.store.locations import commit_records
        from labelstore.store.writer import merged_ranges

        return merged_ranges(commit_records(self.root))

    def commit_records(self) -> list[dict]:
        from labelstore.store.locations import commit_records

        return commit_records(self.root)

    committed_mask = StoreWriter.committed_mask


def same_on_all_ranks(value: int, world: int) -> int:
    """Rank 0's ``value`` on every rank (``--tokens-per-batch auto`` must plan the same batches everywhere)."""
    if world <= 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return int(box[0])
