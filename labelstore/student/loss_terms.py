"""Shared pieces of the distillation losses: argument checks, row masks and weights, the tail rules' plumbing,
the teacher's rows for the fused op and the batch's ``teacher_info`` checks. The losses themselves are in
:mod:`labelstore.student.losses` (soft and hard labels) and :mod:`labelstore.student.codistill`."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from labelstore.constants import IGNORE_INDEX
from labelstore.errors import ConfigMismatchError
from labelstore.reconstruction import SPREAD_RULES, PreparedPrior, kept_cap, prepare_prior, water_fill_scale
from labelstore_kernels.bucket_logprobs_torch import student_bucket_logprobs_torch
from labelstore_kernels.sparse_kl_torch import SparseKLTerm, TailSpread, sparse_kl_torch

_REDUCTIONS = ("mean", "sum", "none")
_METHODS = ("forward_kl", "reverse_kl", "jsd", "hard")
TAIL_CHOICES = ("bucket", "none", *SPREAD_RULES)
_TAIL_ALIASES = {True: "bucket", False: "none"}


# ----------------------------------------------------------------------------------------------- helpers
def resolve_backend(logits: torch.Tensor, backend: str | None = None) -> str:
    """'triton' or 'torch' for these logits: ``backend`` if given, else $LABELSTORE_LOSS_BACKEND, else Triton
    exactly when the logits live on CUDA and Triton imports."""
    choice = (backend or os.environ.get("LABELSTORE_LOSS_BACKEND") or "auto").lower()
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"loss backend must be 'auto', 'torch' or 'triton', got {choice!r}")
    if choice == "auto":
        if not logits.is_cuda:
            return "torch"
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch"
        return "triton"
    if choice == "triton" and not logits.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "the triton loss backend needs CUDA logits (or TRITON_INTERPRET=1 for CPU tensors); "
            "use backend='torch' on CPU"
        )
    return choice


def _run_sparse(logits2d, terms, reduction, backend, inplace=False):
    """Dispatch the fused op. ``reduction`` here is 'sum' or 'none' (weights already hold the normaliser)."""
    if resolve_backend(logits2d, backend) == "triton":
        from labelstore_kernels.sparse_kl_triton import sparse_kl_triton

        return sparse_kl_triton(logits2d, terms, reduction=reduction, inplace=inplace)
    return sparse_kl_torch(logits2d, terms, reduction=reduction, inplace=inplace)


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _as_rows(logits: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    if logits.dim() < 2:
        raise ValueError(f"student logits must be [..., V], got shape {tuple(logits.shape)}")
    lead = tuple(logits.shape[:-1])
    return logits.reshape(-1, logits.shape[-1]), lead


def _row_mask(mask: torch.Tensor | None, lead: tuple[int, ...], device) -> torch.Tensor:
    if mask is None:
        return torch.ones(lead, dtype=torch.bool, device=device).reshape(-1)
    if tuple(mask.shape) != lead:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the logits' leading shape {lead}")
    return mask.to(device).bool().reshape(-1)


def _cdt(logits: torch.Tensor) -> torch.dtype:
    """Compute dtype: float64 for float64 logits (tests, gradcheck), float32 otherwise."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _row_weights(valid: torch.Tensor, reduction: str, scale: float = 1.0, dtype=torch.float32):
    """Per-row weights implementing the reduction: ``valid / n_valid`` for a mean, ``valid`` otherwise."""
    w = valid.to(dtype) * scale
    if reduction == "mean":
        w = w / valid.sum().clamp(min=1).to(dtype)
    return w


def _finish(out: torch.Tensor, reduction: str, lead: tuple[int, ...]) -> torch.Tensor:
    return out.reshape(lead) if reduction == "none" else out


def resolve_tail(tail, prior=None, allowed: tuple[str, ...] = TAIL_CHOICES) -> str:
    """The tail rule a loss uses: ``tail`` (True/False are "bucket"/"none"), or when None "prior" if a prior is
    given and "bucket" otherwise. Raises ValueError for an unknown rule, a rule this loss does not implement,
    or "prior" without a prior."""
    if tail is None:
        rule = "prior" if prior is not None and "prior" in allowed else "bucket"
    else:
        rule = _TAIL_ALIASES.get(tail, tail) if isinstance(tail, bool) else tail
    if rule not in TAIL_CHOICES:
        raise ValueError(f"tail must be one of {TAIL_CHOICES} (or True/False for 'bucket'/'none'), got {tail!r}")
    if rule not in allowed:
        raise ValueError(
            f"tail={rule!r} is implemented for the forward KL (sparse_kl, method='forward_kl') only; this loss "
            f"takes {allowed}"
        )
    if rule == "prior" and prior is None:
        raise ValueError(
            "tail='prior' needs the tail prior: pass prior=LabelStore.tail_prior() (a batch from the store's "
            "collator carries it as 'teacher_prior'), or use tail='uniform' for a store without one"
        )
    return rule


_PRIOR_CACHE: list = []  # [(source object, its version, device, PreparedPrior)]: the collator's prior is reused


def _prepared_prior(prior, vocab: int, device) -> PreparedPrior:
    """``prepare_prior`` once per prior object (batches share one tensor) and device."""
    version = getattr(prior, "_version", None)
    for src, ver, dev, prepared in _PRIOR_CACHE:
        if src is prior and ver == version and dev == device and prepared.weights.numel() == vocab:
            return prepared
    prepared = prepare_prior(prior, vocab, device)
    _PRIOR_CACHE[:] = [(prior, version, device, prepared)]
    return prepared


def _spread(rule, prior, ids, probs, t, mask, vocab) -> TailSpread | None:
    """The ``TailSpread`` of a spread rule (None for "bucket"/"none")."""
    if rule not in SPREAD_RULES:
        return None
    m = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask
    if rule == "uniform":
        scale, cap = water_fill_scale(t, ids, m, torch.full_like(t, float("inf")), None, vocab)
        return TailSpread(scale, cap, None)
    pp = _prepared_prior(prior, vocab, ids.device)
    scale, cap = water_fill_scale(t, ids, m, kept_cap(probs, m), pp, vocab)
    return TailSpread(scale, cap, pp.weights)


def _teacher_rows(logits2d, lead, teacher_ids, teacher_probs, teacher_tail, teacher_mask, tail):
    """Flattened teacher tensors [N, K], [N, K], [N], [N, K]; applies the ``"none"`` renormalisation."""
    dev = logits2d.device
    k = teacher_ids.shape[-1]
    if tuple(teacher_ids.shape) != lead + (k,) or teacher_probs.shape != teacher_ids.shape:
        raise ValueError(
            f"teacher ids/probs must be {lead + (k,)} to match the logits, got "
            f"{tuple(teacher_ids.shape)} / {tuple(teacher_probs.shape)}"
        )
    ids = teacher_ids.reshape(-1, k).to(dev, torch.long)
    mask = None if teacher_mask is None else teacher_mask.reshape(-1, k).to(dev, torch.bool)
    probs = teacher_probs.reshape(-1, k).to(dev, _cdt(logits2d))
    if mask is not None:
        probs = torch.where(mask, probs, 0.0)
    if tail in (False, "none"):
        total = probs.sum(1, keepdim=True)
        return ids, torch.where(total > 0, probs / total.clamp(min=1e-30), 0.0), None, mask
    if teacher_tail is None:
        # Only when the caller has no stored tail; the store records the exact one.
        t = (1.0 - probs.sum(1)).clamp(min=0.0)
    else:
        t = teacher_tail.reshape(-1).to(dev, probs.dtype)
    return ids, probs, t, mask


def _label_term(labels: torch.Tensor, lead, device, reduction, scale, ignore_index, dtype,
                denominator: torch.Tensor | None = None) -> SparseKLTerm:
    """Cross-entropy on one label per row as a sparse term (S = {y}, p_y = 1, t = 0)."""
    if tuple(labels.shape) != lead:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match the logits' leading dims {lead}")
    y = labels.reshape(-1).to(device, torch.long)
    valid = y != ignore_index
    ids = torch.where(valid, y, 0)[:, None]
    ones = torch.ones(ids.shape, device=device, dtype=dtype)
    if denominator is None:
        weights = _row_weights(valid, reduction, scale, dtype)
    else:
        weights = valid.to(dtype) * scale / denominator.to(device, dtype)
    return SparseKLTerm(ids, ones, None, valid[:, None], weights, 1.0)


def _denominator(num_items, key: str) -> torch.Tensor | None:
    """``num_items[key]`` as a positive tensor (None when ``num_items`` is None)."""
    if num_items is None:
        return None
    if key not in num_items:
        raise ValueError(f"num_items must give the denominator of each term ('distill', 'ce'); {key!r} is missing")
    return torch.as_tensor(num_items[key], dtype=torch.float64).clamp(min=1)


def _items_weights(valid, reduction, scale, dtype, num_items, key):
    den = _denominator(num_items, key)
    if den is None:
        return _row_weights(valid, reduction, scale, dtype)
    return valid.to(dtype) * scale / den.to(valid.device, dtype)


def _check_batch_info(student_logits, batch, method, alpha, beta, temperature) -> float:
    """Check the batch's ``teacher_info`` against the loss's arguments; return the temperature to use."""
    info = batch.get("teacher_info")
    if not isinstance(info, Mapping):
        return 1.0 if temperature is None else float(temperature)
    tv = info.get("vocab_size")
    if tv is not None and student_logits.shape[-1] != int(tv):
        raise ConfigMismatchError(
            f"the student's logits have {student_logits.shape[-1]} entries per position but the batch's teacher "
            f"targets index a vocabulary of {tv}: the student does not use the store's tokenizer, or its head has "
            "another size. Build the dataset with the student (StoreDataset(store, student=(model, tokenizer))): "
            "a student with the teacher's tokenizer and a padded or smaller head then works with "
            "id_map='shared_prefix', another tokenizer needs an explicit id_map"
        )
    tt = float(info.get("temperature", 1.0))
    if temperature is not None and float(temperature) != tt and alpha > 0 and method != "hard":
        raise ConfigMismatchError(
            f"temperature={temperature} tempers only the student, but the batch's teacher targets are at "
            f"temperature {tt}: teacher and student would be compared at different temperatures. Re-temper the "
            f"targets on read (StoreDataset(store, temperature={temperature})) or leave temperature unset (the "
            "targets' own is used)"
        )
    sampled = info.get("estimator") == "sampled"
    if sampled and alpha > 0 and (method == "reverse_kl" or (method == "jsd" and beta > 0)):
        raise ConfigMismatchError(
            f"method {method!r} on a sampled store (selection {info.get('selection')!r}): its values are unbiased "
            "estimates of the teacher only inside terms linear in p (the forward KL's cross-entropy); reverse KL and "
            "JSD take log p of the estimate, which is 0 off the drawn ids, and would optimise something else. Use "
            "method='forward_kl' (unbiased here), or compile a topk/topp store for reverse KL or JSD"
        )
    return tt if temperature is None else float(temperature)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _bucket_rows(student_logits, teacher_ids, teacher_probs, teacher_tail, teacher_mask, temperature, tail):
    """Student bucket log-probs L [N, K+1], teacher bucket probs P [N, K+1], bucket validity [N, K+1]."""
    tail = resolve_tail(tail, None, ("bucket", "none"))
    logits2d, lead = _as_rows(student_logits)
    ids, probs, t, mask = _teacher_rows(
        logits2d, lead, teacher_ids, teacher_probs, teacher_tail, teacher_mask, tail
    )
    if t is None:
        t = torch.zeros(ids.shape[0], device=logits2d.device, dtype=probs.dtype)
    if mask is None:
        mask = torch.ones_like(ids, dtype=torch.bool)
    log_q = student_bucket_logprobs_torch(logits2d, ids, mask, temperature)
    p = torch.cat([probs, t[:, None]], dim=1).to(log_q.dtype)
    valid = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    finite = valid & torch.isfinite(log_q)
    log_q = torch.where(finite, log_q, 0.0)  # finite everywhere, so masked branches give no NaN gradients
    q = torch.where(finite, torch.exp(log_q), 0.0)
    return logits2d, lead, log_q, q, p, valid


def _reduce_rows(per_row, position_mask, lead, device, reduction, temperature):
    valid = _row_mask(position_mask, lead, device)
    w = _row_weights(valid, reduction, 1.0, per_row.dtype) * (temperature * temperature)
    rows = torch.where(valid, per_row * w, 0.0)
    return _finish(rows if reduction == "none" else rows.sum(), reduction, lead)


def _hard_labels(teacher_ids, position_mask, teacher_mask, lead, device) -> torch.Tensor:
    """Labels ``[*lead]`` for the hard-label term: the teacher's first kept id, IGNORE_INDEX where the position
    has no teacher or its first kept entry is padding. ``teacher_ids``/``teacher_mask`` may be [..., K] or [...]."""
    top = teacher_ids if tuple(teacher_ids.shape) == lead else teacher_ids[..., 0]
    valid = _row_mask(position_mask, lead, device)
    if teacher_mask is not None:
        first = teacher_mask if tuple(teacher_mask.shape) == lead else teacher_mask[..., 0]
        valid = valid & _row_mask(first, lead, device)
    return torch.where(valid.reshape(lead), top.to(device, torch.long), IGNORE_INDEX)
