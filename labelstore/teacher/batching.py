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

    Packed plans keep sample order; truncated plans sort by length inside windows, to limit padding. The ids are
    the plan's (``plan.first_id + i``: a work unit's plan starts at its unit's first id).
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
    if plan.first_id:
        batches = [b + plan.first_id for b in batches]
    return batches


def pad_batch(plan: Plan, batch: np.ndarray, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Right-padded ``input_ids``, ``attention_mask`` and the lengths of one batch."""
    first = plan.first_id
    lengths = np.asarray([plan.offsets[i - first + 1] - plan.offsets[i - first] for i in batch], dtype=np.int64)
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


# ------------------------------------------------------------------------------------------ --tokens-per-batch auto
AUTO_MAX_TOKENS = 1 << 16  # larger batches buy nothing once the device is busy
AUTO_FRACTION = {"cuda": 0.5, "cpu": 0.25}  # of the free memory: the rest is the model's, the writer's, others'


def free_memory(device: torch.device) -> int:
    """Free bytes on ``device``: ``cudaMemGetInfo`` on CUDA, ``MemAvailable`` of /proc/meminfo on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30  # unknown: assume a modest machine


def bytes_per_token(config, V: int, max_length: int, weight_bytes: int, fused: bool, head_bytes: int) -> int:
    """Peak working memory per token of a teacher forward + extraction (an upper estimate).

    Body: hidden states and MLP activations of one layer at a time (``8 D + 2 I`` values) plus eager attention's
    ``heads x max_length`` float32 scores. Materialised path: the ``[N, V]`` logits in the head's dtype and a
    float32 copy; the fused path holds one fixed-size block instead (accounted separately).
    """
    D = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 4096)
    inter = int(getattr(config, "intermediate_size", 0) or getattr(config, "n_inner", 0) or 4 * D)
    heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0) or 32)
    body = weight_bytes * (8 * D + 2 * inter) + 4 * heads * max_length
    return body + (0 if fused else V * (head_bytes + 4))


def auto_tokens_per_batch(free: int, device_type: str, per_token: int, fixed: int, max_length: int) -> int:
    """``--tokens-per-batch auto``: what fits ``AUTO_FRACTION`` of ``free`` bytes after ``fixed`` ones, as a
    multiple of ``max_length`` in ``[max_length, AUTO_MAX_TOKENS]`` (one sequence at least)."""
    budget = free * AUTO_FRACTION.get(device_type, 0.5) - fixed
    n = int(max(0.0, budget) // max(1, per_token))
    n = min(n, max(AUTO_MAX_TOKENS, max_length))
    return max(max_length, n // max_length * max_length)
