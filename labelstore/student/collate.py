"""Collate dataset items (see :mod:`labelstore.student.dataset`) into padded training batches.

A batch is a dict of tensors (B sequences, padded to the longest, T; K = the store's k)::

    input_ids       int64   [B, T]     pad_id on padding
    attention_mask  int64   [B, T]     1 on real tokens
    labels          int64   [B, T]     labels[:, t] = input_ids[:, t + 1]; ignore_index on padding and on each
                                       sequence's last position (its next token is not in the sample)
    teacher_ids     int64   [B, T, K]  0 on padding entries
    teacher_probs   float32 [B, T, K]  0 on padding entries
    teacher_tail    float32 [B, T]
    teacher_mask    bool    [B, T, K]  real kept entries
    position_mask   bool    [B, T]     True where a teacher distribution exists (the last position has one too:
                                       the teacher's prediction past the window needs no label)
    sample_ids      int64   [B]        store sample ids, for bookkeeping
    teacher_dense   float32 [B, T, V]  dense mode only (added; the sparse fields stay), by the tail rule of
                                       :mod:`labelstore.student.targets` (the prior rule when a prior is given)
    teacher_prior   float32 [V]        only when the collator has a tail prior (the store's): the SAME tensor in
                                       every batch; ``distillation_loss`` then spreads the tail by it

Padding is a handful of slice copies per sequence (no per-position Python work); dense targets are one
``scatter_add_``. Inside a DataLoader worker the tensors are allocated in shared memory, so handing a batch to
the training process copies nothing. Dense mode checks B x T x V x 4 bytes against ``dense_budget_bytes``
before allocating.
"""

from __future__ import annotations

import math

import torch

from labelstore.constants import IGNORE_INDEX
from labelstore.errors import ConfigMismatchError
from labelstore.student.targets import DEFAULT_DENSE_BUDGET_BYTES, check_dense_budget, to_dense

ITEM_KEYS = ("sample_id", "input_ids", "teacher_ids", "teacher_probs", "teacher_tail", "teacher_mask",
             "position_mask")
BATCH_KEYS = ("input_ids", "attention_mask", "labels", "teacher_ids", "teacher_probs", "teacher_tail",
              "teacher_mask", "position_mask")
TEACHER_KEYS = ("teacher_ids", "teacher_probs", "teacher_tail", "teacher_mask", "position_mask")


def new_tensor(shape: tuple, dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """An uninitialised tensor; in shared memory when ``shared`` (inside a DataLoader worker), so that sending
    the batch to the main process moves no data (as torch's ``default_collate`` does)."""
    if not shared:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(max(math.prod(shape), 1) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


class Collator:
    """Callable turning a list of items into a batch dict (picklable, so it runs inside DataLoader workers).

    Args:
        k: entries per position (the store's k).
        vocab_size: the student's vocabulary size (dense mode's V).
        dense: also emit ``teacher_dense`` [B, T, V].
        dense_budget_bytes: refuse (ConfigMismatchError) a dense batch above this many bytes.
        pad_id: input id written on padding positions.
        ignore_index: label on positions without a next token.
        pad_to_multiple_of: round T up to a multiple of this.
        prior: [V] tail prior attached to every batch as ``teacher_prior`` (None: none).
    """

    def __init__(self, k: int, vocab_size: int, *, dense: bool = False,
                 dense_budget_bytes: int = DEFAULT_DENSE_BUDGET_BYTES, pad_id: int = 0,
                 ignore_index: int = IGNORE_INDEX, pad_to_multiple_of: int | None = None, prior=None):
        self.k = int(k)
        self.vocab_size = int(vocab_size)
        self.dense = bool(dense)
        self.dense_budget_bytes = int(dense_budget_bytes)
        self.pad_id = int(pad_id)
        self.ignore_index = int(ignore_index)
        self.multiple = int(pad_to_multiple_of or 1)
        self.prior = None if prior is None else torch.as_tensor(prior, dtype=torch.float32)

    def check_dense(self, batch_size: int, seq_len: int) -> None:
        """Raise now, rather than mid-epoch, if dense batches of this shape would exceed the budget."""
        if self.dense:
            check_dense_budget(batch_size, seq_len, self.vocab_size, self.dense_budget_bytes)

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        missing = [key for key in ITEM_KEYS if items and key not in items[0]]
        if missing:
            raise ConfigMismatchError(
                f"items lack {missing} (they have {sorted(items[0])}): something removed them, e.g. "
                "transformers.Trainer with remove_unused_columns=True. Use labelstore.student.hf.DistillationTrainer "
                "or "
                "pass remove_unused_columns=False"
            )
        B = len(items)
        lens = [int(it["input_ids"].shape[0]) for it in items]
        T = max(lens, default=0)
        T = -(-T // self.multiple) * self.multiple
        K = self.k
        self.check_dense(B, T)
        shared = torch.utils.data.get_worker_info() is not None
        shapes = {"teacher_ids": (B, T, K), "teacher_probs": (B, T, K), "teacher_mask": (B, T, K)}
        dtypes = {"teacher_probs": torch.float32, "teacher_tail": torch.float32, "teacher_mask": torch.bool,
                  "position_mask": torch.bool}
        batch = {k: new_tensor(shapes.get(k, (B, T)), dtypes.get(k, torch.int64), shared) for k in BATCH_KEYS}
        # numpy views of the tensors; every element is written exactly once below (the row, then its padding)
        input_ids, attn, labels, ids, probs, tail, mask, pos = (batch[k].numpy() for k in BATCH_KEYS)
        for b, (it, L) in enumerate(zip(items, lens)):
            x = it["input_ids"]
            input_ids[b, :L] = x
            input_ids[b, L:] = self.pad_id
            attn[b, :L] = 1
            attn[b, L:] = 0
            n = max(L - 1, 0)
            labels[b, :n] = x[1:L]
            labels[b, n:] = self.ignore_index
            ids[b, :L] = it["teacher_ids"]
            probs[b, :L] = it["teacher_probs"]
            mask[b, :L] = it["teacher_mask"]
            tail[b, :L] = it["teacher_tail"]
            pos[b, :L] = it["position_mask"]
            if L < T:
                ids[b, L:] = 0
                probs[b, L:] = 0
                mask[b, L:] = False
                tail[b, L:] = 0
                pos[b, L:] = False
        batch["sample_ids"] = torch.tensor([int(it["sample_id"]) for it in items], dtype=torch.int64)
        if self.dense:
            dense = new_tensor((B, T, self.vocab_size), torch.float32, shared)
            batch["teacher_dense"] = to_dense(batch["teacher_ids"], batch["teacher_probs"], batch["teacher_tail"],
                                              batch["teacher_mask"], self.vocab_size, out=dense, prior=self.prior)
        if self.prior is not None:
            batch["teacher_prior"] = self.prior
        return batch
