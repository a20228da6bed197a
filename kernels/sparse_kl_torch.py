"""Sparse forward KL with a tail bucket, in plain torch: the CPU path and the oracle of ``sparse_kl_triton``.

The math (one row r; the Triton kernel computes exactly the same thing)
-----------------------------------------------------------------------
Student logits ``z`` in R^V, temperature ``T``, ``z' = z / T``, ``q = softmax(z')``, ``lse = logsumexp(z')``.
The teacher keeps a set ``S`` of token ids with absolute probabilities ``p_i`` and stores the exact mass
outside it, ``t`` (so ``sum_S p + t = 1``). The student's mass outside ``S`` is

    log Q = logsumexp_{v not in S} z'_v - lse

computed over the non-kept logits with their own max (then ``lse = logaddexp(lse_out, logsumexp(z'_S))``),
never as ``log(1 - sum_S q)``, which cancels when the kept mass is near 1; ``log Q`` stays exact even where
``Q`` underflows as a probability.
The loss is the KL divergence between the two (|S| + 1)-bucket projections (the kept tokens plus one bucket
for everything else)::

    KL_r = sum_{i in S} p_i (log p_i - log q_i) + t (log t - log Q)          (0 log 0 = 0)

It equals the full KL(p || q) when S is the whole vocabulary (t = 0), and never exceeds it otherwise. Its
gradient with respect to the tempered logits is::

    dKL/dz'_v = mass q_v - p_v           v in S
              = mass q_v - t q_v / Q     v not in S,     mass = sum_S p + t

(``sum_i p_i d(-log q_i)`` gives ``sum_S p q_v - p_v [v in S]``; ``-t d(log Q)`` gives
``t q_v - t q_v / Q [v not in S]``.) For a normalised teacher ``mass = 1``: ``q_v - p_v`` on S and
``q_v (1 - t / Q)`` off S; using the actual ``mass`` keeps the gradient exact for unnormalised targets too
(e.g. sampled estimates). ``q_v / Q`` is evaluated as ``exp(z'_v - lse_out)`` (``lse_out``: logsumexp of the
non-kept logits), which stays bounded when Q underflows.

Each row contributes ``w_r * T^2 * KL_r`` (``w_r``: the caller's row weight, e.g. 1/n_valid for a mean, 0 for
padding) and its gradient with respect to ``z`` is ``w_r * T * dKL/dz'``.

Spread tail (``term.spread``, the ``"uniform"`` and ``"prior"`` rules of ``labelstore.reconstruction``)
------------------------------------------------------------------------------------------------------
Instead of one bucket, the teacher's tail is placed on the non-kept tokens, ``r_v = min(c g_v, cap)`` (``c``
and ``cap`` per row from ``water_fill_scale``, ``g`` the prior, 1 for the uniform rule; ``sum r = t``), and the
loss is the full-vocabulary KL of that target::

    KL_r = sum_{i in S} p_i (log p_i - log q_i) + sum_{v not in S} r_v (log r_v - log q_v)
    dKL/dz'_v = mass q_v - p_v (v in S),   mass q_v - r_v (v not in S),   mass = sum_S p + sum r

No [N, V] target exists: ``r_v`` is recomputed from ``g`` tile by tile, beside the logsumexp.

Cross-entropy on one label ``y`` is the special case ``S = {y}, p_y = 1, t = 0`` (``KL_r = -log q_y``),
which is how the hard-label and ground-truth terms reuse this code. Several terms on the same logits (a
distillation term plus a cross-entropy term, each with its own weights and temperature) accumulate into ONE
gradient buffer.

Memory: the gradient is computed in the forward pass, chunk by chunk, straight into a logits-sized buffer (or
into the logits themselves with ``inplace=True``), as fused cross-entropy kernels do; besides it only
``chunk_rows x V`` temporaries exist. Kept ids must be unique within a row (padding entries are masked out).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from labelstore.errors import ConfigMismatchError

__all__ = [
    "SparseKLTerm",
    "TailSpread",
    "SparseKLTorchFunction",
    "sparse_kl_rows_torch",
    "sparse_kl_torch",
    "default_chunk_rows",
]

# Elements per chunk of rows: 16 MB per fp32 temporary. Few large ops beat many small ones on a busy CPU
# (every op is a parallel region); the chunk stays small next to the logits of any real batch.
_CHUNK_ELEMENTS = 1 << 22


class TailSpread(NamedTuple):
    """Where a term's tail goes when it is spread over tokens: ``r_v = min(scale_r * weights_v, cap_r)`` off S.

    Attributes:
        scale: [N] per-row ``c`` (``labelstore.reconstruction.water_fill_scale``).
        cap: [N] per-row cap (``inf``: none).
        weights: [V] the prior ``g`` (positive), or None for the uniform rule (``g = 1``).
    """

    scale: torch.Tensor
    cap: torch.Tensor
    weights: torch.Tensor | None = None


class SparseKLTerm(NamedTuple):
    """One sparse target on a [N, V] logits matrix (see the module docstring for the math).

    Attributes:
        ids: [N, K] integer token ids of the kept set (values at masked entries are ignored).
        probs: [N, K] absolute teacher probabilities of the kept ids.
        tail: [N] teacher mass outside the kept set, or None for 0.
        mask: [N, K] bool, True on real kept entries, or None for all True.
        weight: [N] row weights (0 skips the row: loss 0, gradient 0).
        temperature: divides the logits before the softmax; the row loss is scaled by T^2.
        spread: None for the tail bucket; a ``TailSpread`` to place the tail on the non-kept tokens instead.
    """

    ids: torch.Tensor
    probs: torch.Tensor
    tail: torch.Tensor | None
    mask: torch.Tensor | None
    weight: torch.Tensor
    temperature: float = 1.0
    spread: TailSpread | None = None


def default_chunk_rows(vocab: int) -> int:
    """Rows per chunk so that one fp32 chunk holds about 4M elements."""
    return max(1, _CHUNK_ELEMENTS // max(1, vocab))


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _fill_kept_(z: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, value: float) -> torch.Tensor:
    """``z[r, ids[r, k]] = value`` for every real kept entry (mask True), in place, with one small scatter.

    Padding entries must not touch their (arbitrary, often 0) id: they are redirected to the row's first real
    entry (written with the same value), or, in a row with no real entry, write their own value back.
    """
    has_any = mask.any(1, keepdim=True)
    first = mask.to(torch.int32).argmax(1, keepdim=True)  # the first True (argmax returns the first maximum)
    target = torch.where(mask, ids, torch.where(has_any, ids.gather(1, first), ids))
    src = torch.where(mask | has_any, torch.full_like(z[:, :1], value), z.gather(1, ids))
    return z.scatter_(1, target, src)


def sparse_kl_rows_torch(
    logits: torch.Tensor,
    term: SparseKLTerm,
    grad: torch.Tensor | None = None,
    accumulate: bool = False,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Per-row weighted losses ``w_r T^2 KL_r`` of one term; writes (or adds) the gradient into ``grad``.

    Args:
        logits: [N, V] student logits (any float dtype; math in fp32, fp64 for fp64 logits).
        term: the sparse target.
        grad: [N, V] buffer receiving d(sum of row losses)/d logits, or None to skip the gradient. May be
            ``logits`` itself (each chunk is copied before it is overwritten) when not accumulating.
        accumulate: add into ``grad`` instead of overwriting it.
        chunk_rows: rows per chunk (default: ``default_chunk_rows(V)``).

    Returns:
        [N] losses in the compute dtype (0 on rows with weight 0).
    """
    n, vocab = logits.shape
    cdt = _compute_dtype(logits)
    dev = logits.device
    # Working straight in the gradient buffer (it ends up holding the gradient) needs no [chunk, V] temporary,
    # so such chunks can be 8x larger: fewer, larger ops.
    direct = grad is not None and not accumulate and grad.dtype == cdt
    # (the spread tail needs [chunk, V] temporaries of its own: no larger chunks there)
    chunk = chunk_rows or default_chunk_rows(vocab) * (8 if direct and term.spread is None else 1)
    temp = float(term.temperature)
    ids = term.ids.to(dev, torch.long)
    mask = torch.ones_like(ids, dtype=torch.bool) if term.mask is None else term.mask.to(dev, torch.bool)
    probs = torch.where(mask, term.probs.to(dev, cdt), 0.0)
    tail = torch.zeros(n, dtype=cdt, device=dev) if term.tail is None else term.tail.to(dev, cdt)
    weight = term.weight.to(dev, cdt)
    spread = term.spread
    losses = torch.empty(n, dtype=cdt, device=dev)

    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        w, t, p, m, idx = weight[s:e], tail[s:e], probs[s:e], mask[s:e], ids[s:e]
        if direct:
            z = grad[s:e]
            if temp != 1.0:
                torch.div(logits[s:e], temp, out=z)
            elif z.data_ptr() != logits[s:e].data_ptr():
                z.copy_(logits[s:e])
        else:
            z = logits[s:e].to(cdt, copy=True)
            if temp != 1.0:
                z.div_(temp)
        if spread is not None:
            losses[s:e] = _spread_chunk(z, idx, m, p, spread, s, e, vocab, w, temp, grad is not None)
            if grad is None:
                continue
            if accumulate:
                grad[s:e] += z.to(grad.dtype)
            elif not direct:
                grad[s:e] = z
            continue
        z_kept = torch.where(m, z.gather(1, idx), float("-inf"))  # [c, K] tempered kept logits
        _fill_kept_(z, idx, m, float("-inf"))  # z now holds only the non-kept logits
        # Non-kept logsumexp with its own max (exact however small Q is), then lse = logaddexp(out, kept).
        m_out = z.amax(1, keepdim=True)
        m_out = torch.where(torch.isfinite(m_out), m_out, 0.0)
        ex = z.sub_(m_out).exp_()  # exp(z'_v - m_out) off S, exactly 0 on S
        s_out = ex.sum(1)
        lse_out = m_out[:, 0] + torch.log(s_out)  # -inf when nothing is outside the kept set
        lse = torch.logaddexp(lse_out, torch.logsumexp(z_kept, 1))
        log_q_kept = torch.where(m, z_kept - lse[:, None], 0.0)
        log_q_out = lse_out - lse  # log Q
        has_tail = t > 0
        log_t = torch.log(torch.where(has_tail, t, 1.0))
        kl = torch.where(m, torch.xlogy(p, p) - p * log_q_kept, 0.0).sum(1)
        kl = kl + torch.where(has_tail, t * (log_t - log_q_out), 0.0)
        live = w != 0
        losses[s:e] = torch.where(live, w * (temp * temp) * kl, 0.0)
        if grad is None:
            continue
        # Off the kept set: mass q_v - t q_v / Q = (q_v / Q) (mass Q - t), with q_v / Q = ex_v / s_out: the
        # factor stays bounded when Q underflows (t / Q alone could overflow).
        mass = p.sum(1) + t
        scale = torch.where(live, w * temp, 0.0)
        coef = torch.where(s_out > 0, scale * (mass * torch.exp(log_q_out) - t) / s_out, 0.0)
        g = ex.mul_(coef[:, None])
        # On the kept set: mass q_v - p_v (masked entries add 0, so a padding id 0 is harmless).
        g_kept = torch.where(m, mass[:, None] * torch.exp(log_q_kept) - p, 0.0)
        g.scatter_add_(1, idx, g_kept * scale[:, None])
        if accumulate:
            grad[s:e] += g.to(grad.dtype)
        elif not direct:
            grad[s:e] = g
    return losses


def _spread_chunk(z, idx, m, p, spread: TailSpread, s: int, e: int, vocab: int, w, temp: float, want_grad: bool):
    """Rows ``s:e`` of a spread-tail term: returns the weighted losses; leaves the gradient in ``z`` (the
    tempered logits, overwritten) when ``want_grad``. Temporaries: ``r`` and ``log r`` ([rows, V] each) and
    logsumexp's own; the row sums are matrix products (no product temporaries)."""
    cdt = z.dtype
    c = spread.scale[s:e].to(z.device, cdt)[:, None]
    cap = spread.cap[s:e].to(z.device, cdt)[:, None]
    r = c.expand_as(z) if spread.weights is None else c * spread.weights.to(z.device, cdt)[None, :]
    r = torch.minimum(r, cap)
    _fill_kept_(r, idx, m, 0.0)  # the target is p on S, r off S
    lse = torch.logsumexp(z, 1, keepdim=True)
    log_q = z.sub_(lse)  # z now holds log q
    rows = torch.arange(e - s, device=z.device)
    a = torch.einsum("ij,ij->i", r, log_q)  # sum r log q
    bad = torch.isnan(a)  # 0 x (-inf): a token with no target mass and a -inf logit
    if bool(bad.any()):
        sub = rows[bad]
        a[bad] = torch.where(r[sub] > 0, r[sub] * log_q[sub], 0.0).sum(1)
    b = torch.einsum("ij,ij->i", r, torch.log(r).nan_to_num_(neginf=0.0))  # sum r log r (0 log 0 = 0)
    log_q_kept = torch.where(m, log_q.gather(1, idx), 0.0)
    kl = b - a + torch.where(m, torch.xlogy(p, p) - p * log_q_kept, 0.0).sum(1)
    live = w != 0
    out = torch.where(live, w * (temp * temp) * kl, 0.0)
    if want_grad:
        mass = p.sum(1) + r.sum(1)
        scale = torch.where(live, w * temp, 0.0)
        g = log_q.exp_().mul_((mass * scale)[:, None]).sub_(r.mul_(scale[:, None]))
        g.scatter_add_(1, idx, torch.where(m, -p, 0.0) * scale[:, None])
    return out


def check_ids(logits: torch.Tensor, terms: Sequence[SparseKLTerm]) -> None:
    """Every real kept id must lie in [0, V). On CPU a violation raises ConfigMismatchError; on CUDA the check
    is an asynchronous device assertion (no host synchronisation; it aborts the CUDA context, as an
    out-of-range index in torch's own gather does)."""
    vocab = logits.shape[1]
    for term in terms:
        ids = term.ids.to(logits.device)
        mask = None if term.mask is None else term.mask.to(logits.device, torch.bool)
        bad = (ids < 0) | (ids >= vocab)
        if mask is not None:
            bad &= mask
        msg = (f"a teacher id lies outside the student's vocabulary [0, {vocab}): the store's teacher has a larger "
               "vocabulary than these logits. Map teacher ids to student ids (StoreDataset(id_map=...)) or use "
               "logits over the teacher's vocabulary")
        if ids.is_cuda:
            torch._assert_async(~bad.any(), msg)
        elif bool(bad.any()):
            raise ConfigMismatchError(msg)


def _check_terms(logits: torch.Tensor, terms: Sequence[SparseKLTerm], inplace: bool) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    if not terms:
        raise ValueError("at least one SparseKLTerm is needed")
    if inplace and len(terms) != 1:
        raise ValueError("inplace=True overwrites the logits with the gradient: it allows exactly one term")
    n = logits.shape[0]
    for term in terms:
        if term.ids.dim() != 2 or term.ids.shape[0] != n or term.probs.shape != term.ids.shape:
            raise ValueError(
                f"term ids/probs must both be [N={n}, K], got {tuple(term.ids.shape)} / "
                f"{tuple(term.probs.shape)}"
            )
        if term.weight.shape != (n,):
            raise ValueError(f"term weight must be [N={n}], got {tuple(term.weight.shape)}")
        if term.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {term.temperature}")
        sp = term.spread
        if sp is not None and (sp.scale.shape != (n,) or sp.cap.shape != (n,) or (
                sp.weights is not None and sp.weights.shape != (logits.shape[1],))):
            raise ValueError(
                f"term spread must hold scale [N={n}], cap [N] and weights [V={logits.shape[1]}] or None, got "
                f"{tuple(sp.scale.shape)}, {tuple(sp.cap.shape)}, "
                f"{None if sp.weights is None else tuple(sp.weights.shape)}"
            )
    check_ids(logits, terms)


def run_sparse_kl_terms(rows_fn, logits, terms, reduction, inplace, needs_grad, **kwargs):
    """Shared forward of the torch and Triton autograd Functions: every term's rows, one gradient buffer.

    Returns (loss, parts, grad): loss is the sum of the rows (``reduction="sum"``) or the rows themselves
    (``"none"``); parts stacks each term's contribution (detached); grad is the [N, V] buffer or None.
    """
    _check_terms(logits, terms, inplace)
    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction must be 'sum' or 'none' here, got {reduction!r}")
    grad = None
    if needs_grad:
        grad = logits if inplace else torch.empty_like(logits)
    rows = [rows_fn(logits, term, grad=grad, accumulate=i > 0, **kwargs) for i, term in enumerate(terms)]
    per_row = torch.stack(rows)  # [n_terms, N]
    if reduction == "sum":
        parts = per_row.sum(1)
        return parts.sum(), parts, grad
    return per_row.sum(0), per_row, grad


def scale_saved_grad(ctx, grad_out: torch.Tensor) -> torch.Tensor:
    """Backward of both Functions: the saved d(loss)/d logits times the upstream gradient.

    A scalar loss (``reduction="sum"``) scales the saved buffer in place: no allocation, and no host
    synchronisation to test for an upstream gradient of 1 (multiplying by 1 is exact). The factor applied is
    remembered, so a later backward through the same graph (``retain_graph=True``, gradcheck) divides it out
    again, out of place; that rare path refuses (with a host check) if the first factor was 0. Per-row losses
    (``"none"``) scale out of place.
    """
    grad = ctx.grad
    g = grad_out.to(grad.dtype)
    if ctx.reduction == "none":
        return grad * g[:, None]
    applied = getattr(ctx, "applied", None)
    if applied is None:
        ctx.applied = g.detach().clone()
        return grad.mul_(g)
    if bool(applied == 0):
        raise RuntimeError(
            "a second backward through a fused sparse-KL loss whose first backward had an upstream gradient of 0: "
            "the saved gradient is gone; run the loss again instead of retain_graph=True"
        )
    return grad * (g / applied)


def save_forward(ctx, logits, loss, parts, grad, reduction, inplace):
    """Forward bookkeeping shared by both Functions: saves the gradient buffer, and with ``inplace`` (when the
    logits really were overwritten) marks them dirty and returns them as a third output, so autograd refuses
    any other op that saved the logits and a leaf that requires grad."""
    ctx.grad, ctx.reduction, ctx.applied = grad, reduction, None
    ctx.mark_non_differentiable(parts)
    if inplace and grad is not None:
        ctx.mark_dirty(logits)
        return loss, parts, logits
    return loss, parts


class SparseKLTorchFunction(torch.autograd.Function):
    """Autograd Function over ``sparse_kl_rows_torch``: the gradient is computed in forward, in chunks."""

    @staticmethod
    def forward(ctx, logits, terms, reduction, inplace, chunk_rows):
        needs_grad = ctx.needs_input_grad[0]
        loss, parts, grad = run_sparse_kl_terms(
            sparse_kl_rows_torch, logits, terms, reduction, inplace, needs_grad, chunk_rows=chunk_rows
        )
        return save_forward(ctx, logits, loss, parts, grad, reduction, inplace)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_parts, *_dirty):
        return scale_saved_grad(ctx, grad_out), None, None, None, None


def sparse_kl_torch(
    logits: torch.Tensor,
    terms: Sequence[SparseKLTerm],
    reduction: str = "sum",
    inplace: bool = False,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sparse forward KL (plus any cross-entropy terms) on [N, V] logits, differentiable in logits.

    Args:
        logits: [N, V] student logits.
        terms: the sparse targets (see ``SparseKLTerm``); their gradients share one buffer.
        reduction: "sum" -> scalar sum of the weighted row losses; "none" -> [N] per-row sums over terms.
        inplace: write the gradient into ``logits`` (saves one logits-sized buffer; the logits are destroyed).
        chunk_rows: rows per chunk.

    Returns:
        (loss, parts): ``parts`` holds each term's detached contribution ([n_terms] or [n_terms, N]).
    """
    out = SparseKLTorchFunction.apply(logits, list(terms), reduction, inplace, chunk_rows)
    return out[0], out[1]
