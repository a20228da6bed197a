"""Distillation losses for soft labels, hard labels and co-distillation, on student logits [B, T, V].

Notation: ``q = softmax(z / T)`` is the student at temperature ``T``; the teacher, as stored, keeps a set
``S`` of ids with absolute probabilities ``p_i`` and the exact mass ``t`` outside it (``sum_S p + t = 1``);
the student's mass outside ``S`` is ``Q = sum_{v not in S} q_v``, computed as a logsumexp over the non-kept
logits.

Soft labels compare the (|S| + 1)-bucket projections of both distributions (the kept ids plus one "everything
else" bucket). For a full teacher distribution (S = vocabulary, t = 0) these are the usual divergences; for a
truncated one they are the exact divergences between the coarsened distributions (never larger than the full
ones), using only what the store knows:

- forward KL   ``sum_S p_i log(p_i / q_i) + t log(t / Q)``                       (``sparse_kl``)
- reverse KL   ``sum_S q_i log(q_i / max(p_i, eps)) + Q log(Q / max(t, eps))``    (``reverse_kl``)
- generalised JSD (TRL's GKD convention) with ``M = beta P + (1 - beta) Q_s`` on the buckets::

      JSD_beta = beta KL(P || M) + (1 - beta) KL(Q_s || M);  beta = 0 -> forward KL, beta = 1 -> reverse KL
                                                                                     (``generalized_jsd``)

Tail rules (``tail=``): what the teacher's tail mass ``t`` stands for.

- ``"bucket"`` (alias ``True``): one "everything else" bucket, as above (the exact divergence between the
  coarsened distributions; the student's tail mass is matched, its shape is free).
- ``"none"`` (alias ``False``): plain renormalised top-k: the teacher becomes ``p_i / sum_S p`` with no tail
  (``t = 0``), i.e. the student is asked to put all its mass on S.
- ``"uniform"``: ``t`` spread evenly over the ``V - |S|`` other tokens (``labelstore.reconstruction``).
- ``"prior"``: ``t`` spread over the other tokens in proportion to a prior ``g`` (a store's
  ``LabelStore.tail_prior()``, or a batch's ``teacher_prior``), no token above the position's smallest kept
  probability (water-filling, docs/FORMAT.md 5c): ``r_v = min(c g_v, p_min)`` with ``sum r = t``.

The two spread rules give the full-vocabulary forward KL ``sum_S p log(p / q) + sum_{v not in S} r_v log(r_v /
q_v)``, computed in the same pass over the vocabulary as the student's logsumexp (``sparse_kl`` only; no dense
target is built). When a batch carries ``teacher_prior`` (the collator attaches the store's prior),
``distillation_loss``'s forward KL defaults to ``"prior"``; otherwise the default is ``"bucket"``. Reverse KL and
JSD accept ``"bucket"`` and ``"none"``.

Temperature divides the student's logits and every divergence is multiplied by ``T^2`` (Hinton et al.), so
gradient magnitudes do not shrink with T. The teacher is used as stored: re-temper it when reading the store
(the loader can) or extract it at the temperature you distill at. Hard labels and ground-truth labels are
cross-entropies at T = 1.

Masks and reductions: positions where ``position_mask`` is False (and labels equal to ``ignore_index``)
contribute nothing. ``reduction="mean"`` (default) averages each term over its own valid positions (0 when
there are none), ``"sum"`` sums them, ``"none"`` returns per-position values with the leading shape of the
logits (0 at invalid positions).

The forward KL, the hard-label CE and the label CE all run on one fused op (``labelstore_kernels``): the
Triton kernel on CUDA, its pure-torch twin elsewhere; ``LABELSTORE_LOSS_BACKEND=torch|triton`` (or
``backend=``) overrides the choice. Both compute the gradient during the forward pass into one logits-sized
buffer shared by all terms, so a mixed loss ``alpha * KL + (1 - alpha) * CE`` costs one gradient buffer, not
several [B*T, V] fp32 intermediates. Reverse KL and JSD use a chunked torch op for the bucket
log-probabilities.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch

from labelstore.constants import IGNORE_INDEX
from labelstore.errors import ConfigMismatchError
from labelstore.student.loss_terms import (
    _METHODS,
    TAIL_CHOICES,
    _as_rows,
    _bucket_rows,
    _cdt,
    _check_batch_info,
    _check_reduction,
    _check_temperature,
    _denominator,
    _finish,
    _hard_labels,
    _items_weights,
    _label_term,
    _reduce_rows,
    _row_mask,
    _row_weights,
    _run_sparse,
    _spread,
    _teacher_rows,
    resolve_backend,
    resolve_tail,
)
from labelstore_kernels.sparse_kl_torch import SparseKLTerm

__all__ = [
    "CoDistillation",
    "CodistillationLosses",
    "DistillationLoss",
    "codistillation_losses",
    "dense_kl",
    "distillation_loss",
    "generalized_jsd",
    "hard_label_ce",
    "label_ce",
    "resolve_backend",
    "resolve_tail",
    "reverse_kl",
    "sparse_kl",
]
# ------------------------------------------------------------------------------------------- soft labels
def sparse_kl(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_probs: torch.Tensor,
    teacher_tail: torch.Tensor | None = None,
    teacher_mask: torch.Tensor | None = None,
    position_mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    tail: bool | str | None = None,
    prior: torch.Tensor | None = None,
    reduction: str = "mean",
    backend: str | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """Forward KL(teacher || student) from sparse teacher targets, with a tail rule (module docstring).

    Args:
        student_logits: [..., V] (e.g. [B, T, V]); any float dtype.
        teacher_ids: [..., K] kept ids (unique per position; padding entries masked by ``teacher_mask``).
        teacher_probs: [..., K] absolute teacher probabilities.
        teacher_tail: [...] exact teacher mass outside the kept set (None: ``max(0, 1 - sum kept)``).
        teacher_mask: [..., K] bool, True on real kept entries (None: all).
        position_mask: [...] bool, True where a teacher distribution exists (None: all).
        temperature: divides the student logits; the loss is scaled by T^2.
        tail: "bucket" (True), "none" (False: plain renormalised top-k), "uniform" or "prior" (module
            docstring); None: "prior" when ``prior`` is given, else "bucket".
        prior: [V] positive tail prior for ``tail="prior"`` (``LabelStore.tail_prior()``, a batch's
            ``teacher_prior``); indexed once per tensor and device, then reused.
        reduction: "mean" over valid positions, "sum", or "none" ([...] per position).
        backend: "torch", "triton" or None (auto / $LABELSTORE_LOSS_BACKEND).
        inplace: overwrite ``student_logits`` with the gradient (saves one logits-sized buffer; the logits
            are unusable afterwards, and autograd refuses if another op saved them or they are a leaf that
            requires grad).
    """
    _check_reduction(reduction)
    _check_temperature(temperature)
    rule = resolve_tail(tail, prior)
    logits2d, lead = _as_rows(student_logits)
    ids, probs, t, mask = _teacher_rows(
        logits2d, lead, teacher_ids, teacher_probs, teacher_tail, teacher_mask, rule
    )
    valid = _row_mask(position_mask, lead, logits2d.device)
    weights = _row_weights(valid, reduction, 1.0, probs.dtype)
    spread = _spread(rule, prior, ids, probs, t, mask, logits2d.shape[-1])
    term = SparseKLTerm(ids, probs, t, mask, weights, float(temperature), spread)
    loss, _ = _run_sparse(logits2d, [term], "none" if reduction == "none" else "sum", backend, inplace)
    return _finish(loss, reduction, lead)


def reverse_kl(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_probs: torch.Tensor,
    teacher_tail: torch.Tensor | None = None,
    teacher_mask: torch.Tensor | None = None,
    position_mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    tail: bool | str = True,
    reduction: str = "mean",
    eps: float = 1e-8,
) -> torch.Tensor:
    """Reverse KL(student || teacher) on the buckets: ``sum_S q log(q / p) + Q log(Q / t)``.

    Teacher bucket probabilities are floored at ``eps`` inside the log (a zero-probability teacher bucket with
    student mass would be infinite). Arguments as in ``sparse_kl``.
    """
    _check_reduction(reduction)
    _check_temperature(temperature)
    logits2d, lead, log_q, q, p, valid = _bucket_rows(
        student_logits, teacher_ids, teacher_probs, teacher_tail, teacher_mask, temperature, tail
    )
    terms = torch.where(valid & (q > 0), q * (log_q - torch.log(p.clamp(min=eps))), 0.0)
    return _reduce_rows(terms.sum(1), position_mask, lead, logits2d.device, reduction, temperature)


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_probs: torch.Tensor,
    teacher_tail: torch.Tensor | None = None,
    teacher_mask: torch.Tensor | None = None,
    position_mask: torch.Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    tail: bool | str = True,
    reduction: str = "mean",
    backend: str | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Generalised JSD on the buckets: ``beta KL(P||M) + (1 - beta) KL(Q||M)``, ``M = beta P + (1 - beta) Q``.

    ``P`` is the teacher, ``Q`` the student (TRL GKD's convention); ``beta = 0`` is the forward KL
    (``sparse_kl``), ``beta = 1`` the reverse KL (``reverse_kl``), as in TRL. Arguments as in ``sparse_kl``
    (``tail``: "bucket"/True or "none"/False). ``backend`` applies to ``beta = 0`` (the fused forward KL); any other
    beta runs on the chunked torch op, and an explicit ``backend="triton"`` there is refused rather than ignored.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta > 0.0 and backend is not None and backend.lower() == "triton":
        raise ValueError(f"generalized_jsd with beta={beta} has no Triton kernel (only beta=0, the forward KL, "
                         "does); pass backend=None or 'torch'")
    if backend is not None:
        resolve_backend(student_logits, backend)  # validates the name
    args = (student_logits, teacher_ids, teacher_probs, teacher_tail, teacher_mask, position_mask)
    if beta == 0.0:
        return sparse_kl(*args, temperature=temperature, tail=tail, reduction=reduction, backend=backend)
    if beta == 1.0:
        return reverse_kl(*args, temperature=temperature, tail=tail, reduction=reduction, eps=eps)
    _check_reduction(reduction)
    _check_temperature(temperature)
    logits2d, lead, log_q, q, p, valid = _bucket_rows(*args[:5], temperature, tail)
    m = beta * p + (1.0 - beta) * q
    log_m = torch.log(torch.where(m > 0, m, 1.0))
    kl_p = torch.where(valid & (p > 0), p * (torch.log(torch.where(p > 0, p, 1.0)) - log_m), 0.0)
    kl_q = torch.where(valid & (q > 0), q * (log_q - log_m), 0.0)
    per_row = beta * kl_p.sum(1) + (1.0 - beta) * kl_q.sum(1)
    return _reduce_rows(per_row, position_mask, lead, logits2d.device, reduction, temperature)


# ------------------------------------------------------------------------------------------- hard labels
def hard_label_ce(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_mask: torch.Tensor | None = None,
    position_mask: torch.Tensor | None = None,
    *,
    reduction: str = "mean",
    backend: str | None = None,
) -> torch.Tensor:
    """Cross-entropy on the teacher's top id ``teacher_ids[..., 0]`` (a hard-label store's only id).

    Positions without a teacher (``position_mask``) or whose first kept entry is padding (``teacher_mask``)
    are skipped. ``teacher_ids`` and ``teacher_mask`` may be [..., K] or [...]. Positional order as in
    ``sparse_kl``: student logits, teacher tensors, then the position mask.
    """
    _check_reduction(reduction)
    logits2d, lead = _as_rows(student_logits)
    labels = _hard_labels(teacher_ids, position_mask, teacher_mask, lead, logits2d.device)
    return label_ce(student_logits, labels, reduction=reduction, backend=backend)


def label_ce(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    backend: str | None = None,
) -> torch.Tensor:
    """Cross-entropy on true next-token labels [...] (``ignore_index`` skipped), on the fused op."""
    _check_reduction(reduction)
    logits2d, lead = _as_rows(student_logits)
    term = _label_term(labels, lead, logits2d.device, reduction, 1.0, ignore_index, _cdt(logits2d))
    loss, _ = _run_sparse(logits2d, [term], "none" if reduction == "none" else "sum", backend)
    return _finish(loss, reduction, lead)


# ------------------------------------------------------------------------------------- mixing with labels
class DistillationLoss(NamedTuple):
    """``loss = alpha * distill + (1 - alpha) * ce``; ``distill`` and ``ce`` are detached (None if unused)."""

    loss: torch.Tensor
    distill: torch.Tensor | None
    ce: torch.Tensor | None


def distillation_loss(
    student_logits: torch.Tensor,
    batch: Mapping[str, torch.Tensor],
    *,
    method: str = "forward_kl",
    alpha: float = 1.0,
    temperature: float | None = None,
    tail: bool | str | None = None,
    prior: torch.Tensor | None = None,
    beta: float = 0.5,
    eps: float = 1e-8,
    reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
    backend: str | None = None,
    return_components: bool = False,
    num_items: Mapping[str, int | torch.Tensor] | None = None,
) -> torch.Tensor | DistillationLoss:
    """``alpha * distillation + (1 - alpha) * CE(student, shift_labels)`` on a loader batch.

    Args:
        student_logits: [B, T, V], aligned with the batch (position t predicts ``shift_labels[:, t]``, the
            token at t + 1, and is compared with the teacher's distribution at t).
        batch: mapping with ``teacher_ids`` [B, T, K] and, as available, ``teacher_probs``, ``teacher_tail``,
            ``teacher_mask``, ``position_mask``, ``shift_labels`` (needed when ``alpha < 1``; a batch with only
            Hugging Face-convention ``labels`` is refused, see :func:`labelstore.student.collate.shift_labels`),
            ``teacher_info`` (the store's mode, estimator, temperature and vocabulary: checked, see below) and
            ``teacher_prior`` ([V], the store's tail prior, attached by the collator).
        tail: the tail rule (module docstring); None: "prior" for the forward KL when a prior is known
            (``prior=`` or ``batch["teacher_prior"]``), else "bucket". Reverse KL and JSD take "bucket"/"none".
        prior: [V] tail prior overriding ``batch["teacher_prior"]``.
        method: "forward_kl" (``sparse_kl``), "reverse_kl", "jsd" (``generalized_jsd`` with ``beta``) or
            "hard" (``hard_label_ce`` on ``teacher_ids[..., 0]``; temperature unused).
        alpha: weight of the distillation term, in [0, 1].
        temperature: divides the student logits (T^2-scaled loss). None: the targets' own temperature
            (``teacher_info``; 1 without it). A value that differs from the targets' is refused: the teacher and
            the student would be compared at different temperatures. Re-temper the targets when reading the store
            (``StoreDataset(..., temperature=T)``) to distil at another temperature.
        reduction: each term is reduced over its own valid positions ("mean": teacher positions for the
            distillation term, shift_labels != ignore_index for the CE), then mixed.
        return_components: return a ``DistillationLoss`` (loss, detached unweighted terms) instead.
        num_items: with ``reduction="mean"``, the denominators of the means, ``{"distill": n, "ce": m}``
            (e.g. counted over every micro-batch of a gradient-accumulation step and every device:
            :class:`labelstore.student.hf.DistillationTrainer` does); default: this batch's own counts.

    With ``teacher_info`` in the batch, refused (ConfigMismatchError): logits whose width is not the targets'
    vocabulary; a temperature other than the targets'; ``reverse_kl`` and ``jsd`` (beta > 0) on sampled stores
    (their values are unbiased estimates of the teacher only inside expectations linear in p, as the forward KL's
    cross-entropy; reverse KL and JSD take log p of the estimate, which is 0 off the drawn ids).
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    _check_reduction(reduction)
    temperature = _check_batch_info(student_logits, batch, method, alpha, beta, temperature)
    _check_temperature(temperature)
    if num_items is not None and reduction != "mean":
        raise ValueError(f"num_items sets the denominators of reduction='mean', not of {reduction!r}")
    logits2d, lead = _as_rows(student_logits)
    dev = logits2d.device
    fused_reduction = "none" if reduction == "none" else "sum"
    labels = batch.get("shift_labels")
    if alpha < 1.0 and labels is None:
        if batch.get("labels") is not None:
            raise ConfigMismatchError(
                "alpha < 1 mixes in CE on the next tokens, read from the batch's 'shift_labels' (pre-shifted: "
                "shift_labels[:, t] is the token at t + 1); this batch has only 'labels', which in the Hugging Face "
                "convention are unshifted. labelstore's collator emits both; for your own batch add "
                "batch['shift_labels'] = labelstore.student.collate.shift_labels(batch['labels'])"
            )
        raise ValueError("alpha < 1 mixes in CE on true labels, but the batch has no 'shift_labels'")
    position_mask = batch.get("position_mask")
    teacher_mask = batch.get("teacher_mask")
    if alpha > 0.0 and method != "hard" and batch.get("teacher_probs") is None:
        raise ValueError(
            f"method {method!r} needs 'teacher_probs'; a hard-label store (ids only) needs method='hard'"
        )

    fused_kl = method == "forward_kl" or (method == "jsd" and beta == 0.0)
    prior = batch.get("teacher_prior") if prior is None else prior
    if method != "hard":
        tail = resolve_tail(tail, prior, TAIL_CHOICES if fused_kl else ("bucket", "none"))
    terms: list[SparseKLTerm] = []
    names: list[str] = []
    distill_unfused = None
    if alpha > 0.0:
        if fused_kl:
            ids, probs, t, mask = _teacher_rows(
                logits2d, lead, batch["teacher_ids"], batch["teacher_probs"], batch.get("teacher_tail"),
                teacher_mask, tail,
            )
            valid = _row_mask(position_mask, lead, dev)
            weights = _items_weights(valid, reduction, alpha, probs.dtype, num_items, "distill")
            spread = _spread(tail, prior, ids, probs, t, mask, logits2d.shape[-1])
            terms.append(SparseKLTerm(ids, probs, t, mask, weights, temperature, spread))
            names.append("distill")
        elif method == "hard":
            hard = _hard_labels(batch["teacher_ids"], position_mask, teacher_mask, lead, dev)
            terms.append(_label_term(hard, lead, dev, reduction, alpha, IGNORE_INDEX, _cdt(logits2d),
                                     _denominator(num_items, "distill")))
            names.append("distill")
        else:
            red = "sum" if num_items is not None else reduction
            fn_kwargs = dict(temperature=temperature, tail=tail, reduction=red, eps=eps)
            if method == "jsd":
                fn_kwargs.update(beta=beta, backend=backend)
            fn = reverse_kl if method == "reverse_kl" else generalized_jsd
            distill_unfused = fn(
                student_logits, batch["teacher_ids"], batch["teacher_probs"], batch.get("teacher_tail"),
                teacher_mask, position_mask, **fn_kwargs,
            )
            if num_items is not None:
                distill_unfused = distill_unfused / _denominator(num_items, "distill").to(distill_unfused)
    if alpha < 1.0:
        terms.append(_label_term(labels, lead, dev, reduction, 1.0 - alpha, ignore_index, _cdt(logits2d),
                                 _denominator(num_items, "ce")))
        names.append("ce")

    total = None
    parts: dict[str, torch.Tensor] = {}
    if terms:
        fused, fused_parts = _run_sparse(logits2d, terms, fused_reduction, backend)
        total = _finish(fused, reduction, lead)
        weight_of = {"distill": alpha, "ce": 1.0 - alpha}
        for name, part in zip(names, fused_parts):
            parts[name] = _finish(part / weight_of[name], reduction, lead)
    if distill_unfused is not None:
        parts["distill"] = distill_unfused.detach()
        weighted = alpha * distill_unfused
        total = weighted if total is None else total + weighted.to(total.dtype)
    if total is None:  # alpha = 0 with no labels is rejected above; alpha = 1 always has a distill term
        raise AssertionError("unreachable: no loss term")
    if return_components:
        return DistillationLoss(total, parts.get("distill"), parts.get("ce"))
    return total


# dense and online losses live in labelstore.student.codistill; importable from here as before
from labelstore.student.codistill import (  # noqa: E402
    CoDistillation,
    CodistillationLosses,
    codistillation_losses,
    dense_kl,
)
