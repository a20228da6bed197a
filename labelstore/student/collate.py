"""Collate dataset items (see :mod:`labelstore.student.dataset`) into padded training batches.

A batch is a dict of tensors (B sequences, padded to the longest, T; K = the store's k)::

    input_ids       int64   [B, T]     pad_id on padding
    attention_mask  int64   [B, T]     1 on real tokens
    labels          int64   [B, T]     Hugging Face convention, NOT shifted: labels[:, t] = input_ids[:, t],
                                       ignore_index on padding. ``model(**batch)`` (and Trainer) shift it internally.
    shift_labels    int64   [B, T]     pre-shifted: shift_labels[:, t] = input_ids[:, t + 1]; ignore_index on
                                       padding and on each sequence's last position (its next token is not in the
                                       sample). Aligned with the logits and the teacher targets: what labelstore's
                                       losses read (Hugging Face's name for pre-shifted labels). Both are
                                       ignore_index where the store has no label (position_mask False: the prompts
                                       and user turns of an --assistant-only store), so no CE trains on them.
    teacher_ids     int64   [B, T, K]  0 on padding entries
    teacher_probs   float32 [B, T, K]  0 on padding entries
    teacher_tail    float32 [B, T]
    teacher_mask    bool    [B, T, K]  real kept entries
    position_mask   bool    [B, T]     True where a teacher distribution exists (the last position has one too:
                                       the teacher's prediction past the window needs no label)
    sample_ids      int64   [B]        store sample ids, for bookkeeping
    teacher_info    dict               what the targets are (not a tensor; present when the collator was built by a
                                       dataset): ``selection`` (the store's mode), ``estimator`` (``"exact"``: kept
                                       probabilities + exact tail; ``"sampled"``: unbiased sample estimates;
                                       ``"hard"``: the teacher's top id), ``temperature`` (of the targets, after any
                                       re-tempering on read) and ``vocab_size`` (the width the targets index).
                                       :func:`labelstore.student.losses.distillation_loss` uses it and refuses a
                                       mismatch.
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
BATCH_KEYS = ("input_ids", "attention_mask", "labels", "shift_labels", "teacher_ids", "teacher_probs", "teacher_tail",
              "teacher_mask", "position_mask")
TEACHER_KEYS = ("teacher_ids", "teacher_probs", "teacher_tail", "teacher_mask", "position_mask")
INFO_KEYS = ("selection", "estimator", "temperature", "vocab_size")


class TeacherInfo(dict):
    """A batch's ``teacher_info``: a plain dict of facts (see the module docstring) that rides along with the
    tensors. ``to``/``cuda``/``cpu``/``pin_memory`` return it unchanged, so loops that move every value of a batch
    (``{k: v.to(device) for k, v in batch.items()}``) keep working."""

    def to(self, *args, **kwargs) -> TeacherInfo:
        return self

    def cuda(self, *args, **kwargs) -> TeacherInfo:
        return self

    def cpu(self) -> TeacherInfo:
        return self

    def pin_memory(self, *args, **kwargs) -> TeacherInfo:
        return self


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Hugging Face-convention ``labels`` [..., T] (unshifted) -> pre-shifted ``shift_labels`` [..., T]:
    ``out[..., t] = labels[..., t + 1]`` and ``ignore_index`` at the last position (what HF's causal-LM loss does)."""
    out = torch.full_like(labels, ignore_index)
    out[..., :-1] = labels[..., 1:]
    return out


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
        teacher_info: the ``teacher_info`` dict every batch carries (see the module docstring); datasets fill it
            (:meth:`labelstore.student.dataset.StoreDataset.collator`). None: batches carry none, and the losses
            cannot check them against the store.
        prior: [V] tail prior attached to every batch as ``teacher_prior`` (None: none).
    """

    def __init__(self, k: int, vocab_size: int, *, dense: bool = False,
                 dense_budget_bytes: int = DEFAULT_DENSE_BUDGET_BYTES, pad_id: int = 0,
                 ignore_index: int = IGNORE_INDEX, pad_to_multiple_of: int | None = None,
                 teacher_info: dict | None = None, prior=None):
        self.k = int(k)
        self.vocab_size = int(vocab_size)
        self.dense = bool(dense)
        self.dense_budget_bytes = int(dense_budget_bytes)
        self.pad_id = int(pad_id)
        self.ignore_index = int(ignore_index)
        self.multiple = int(pad_to_multiple_of or 1)
        if teacher_info is not None:
            missing = [key for key in INFO_KEYS if key not in teacher_info]
            if missing:
                raise ValueError(f"teacher_info lacks {missing}; build it with TargetDecoder.teacher_info()")
            teacher_info = {key: teacher_info[key] for key in INFO_KEYS}
        self.teacher_info = teacher_info
        self.prior = None if prior is None else torch.as_tensor(prior, dtype=torch.float32)

    def check_dense(self, batch_size: int, seq_len: int) -> None:
        """Raise now, rather than mid-epoch, if dense batches of this shape would exceed the budget."""
        if self.dense:
            check_dense_budget(batch_size, seq_len, self.vocab_size, self.dense_budget_bytes)

    def __call__(self, items: list[dict]) -> dict:
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
        input_ids, attn, labels, shifted, ids, probs, tail, mask, pos = (batch[k].numpy() for k in BATCH_KEYS)
        for b, (it, L) in enumerate(zip(items, lens)):
            x = it["input_ids"]
            input_ids[b, :L] = x
            input_ids[b, L:] = self.pad_id
            attn[b, :L] = 1
            attn[b, L:] = 0
            labels[b, :L] = x
            labels[b, L:] = self.ignore_index
            n = max(L - 1, 0)
            shifted[b, :n] = x[1:L]
            shifted[b, n:] = self.ignore_index
            unlabelled = ~it["position_mask"][:n]
            if unlabelled.any():  # an --assistant-only store: no CE on the tokens the teacher has no label for
                shifted[b, :n][unlabelled] = self.ignore_index
                labels[b, 1:L][unlabelled] = self.ignore_index
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
        if self.teacher_info is not None:
            batch["teacher_info"] = TeacherInfo(self.teacher_info)
        if self.dense:
            dense = new_tensor((B, T, self.vocab_size), torch.float32, shared)
            batch["teacher_dense"] = to_dense(batch["teacher_ids"], batch["teacher_probs"], batch["teacher_tail"],
                                              batch["teacher_mask"], self.vocab_size, out=dense, prior=self.prior)
        if self.prior is not None:
            batch["teacher_prior"] = self.prior
        return batch
