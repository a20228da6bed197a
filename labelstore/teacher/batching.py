"""Batches of a compile: which sequences go through the teacher together, padded, and their global row ids.

Batches are a pure function of the plan and ``tokens_per_batch``, so a resumed compile (or another world size)
computes every sample in the same batch, with the same numerics.
"""

from __future__ import annotations

import numpy as np
import torch

from labelstore.teacher.inputs import Plan

SORT_WINDOW = 64  # truncate mode: sequences are length-sorted within windows of this many batches' worth


def plan_batches(plan: Plan, tokens_per_batch: int, pack: bool) -> list[np.ndarray]:
    """Deterministic batches of sample ids, each with ``len(batch) * longest <= tokens_per_batch`` (or one).

    Packed plans keep sample order; truncated plans sort by length inside windows, to limit padding.
    """
    lengths = plan.lengths()
    n = len(lengths)
    order = np.arange(n, dtype=np.int64)
    if not pack and n:
        window = max(1, SORT_WINDOW * max(1, tokens_per_batch // max(1, int(lengths.max()))))
        parts = []
        for a in range(0, n, window):
            idx = order[a:a + window]
            parts.append(idx[np.lexsort((idx, -lengths[idx]))])
        order = np.concatenate(parts)
    batches, cur, longest = [], [], 0
    for i in order:
        L = int(lengths[i])
        if cur and (len(cur) + 1) * max(longest, L) > tokens_per_batch:
            batches.append(np.asarray(cur, dtype=np.int64))
            cur, longest = [], 0
        cur.append(int(i))
        longest = max(longest, L)
    if cur:
        batches.append(np.asarray(cur, dtype=np.int64))
    return batches


def pad_batch(plan: Plan, batch: np.ndarray, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Right-padded ``input_ids``, ``attention_mask`` and the lengths of one batch."""
    lengths = np.asarray([plan.offsets[i + 1] - plan.offsets[i] for i in batch], dtype=np.int64)
    T = int(lengths.max())
    x = np.full((len(batch), T), pad_id, dtype=np.int64)
    m = np.zeros((len(batch), T), dtype=np.int64)
    for r, i in enumerate(batch):
        x[r, :lengths[r]] = plan.sequence(int(i))
        m[r, :lengths[r]] = 1
    return torch.from_numpy(x), torch.from_numpy(m), lengths


def rank_batches(batches: list, rank: int, world: int) -> list:
    """This rank's batches: a contiguous block of the plan's batches (the first ``len % world`` ranks take one more).

    Contiguous blocks (not round-robin) keep every rank's sample ids in one range, so that the store's shards,
    ordered by first sample id, list the rows in the same order as a 1-process compile (packed plans, where batches
    hold consecutive ids): a student's loader then sees the same store whatever the world size.
    """
    per, extra = divmod(len(batches), world)
    start = rank * per + min(rank, extra)
    return batches[start:start + per + (1 if rank < extra else 0)]


def row_ids(batch: np.ndarray, lengths: np.ndarray, max_length: int) -> np.ndarray:
    """Global row id ``sample_id * max_length + position`` of every real position of a batch (FORMAT.md 5b)."""
    return np.concatenate([int(sid) * max_length + np.arange(int(n), dtype=np.int64)
                           for sid, n in zip(batch, lengths)]).astype(np.int64)
