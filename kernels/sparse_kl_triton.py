"""Fused sparse forward KL with a tail bucket: Triton kernel, launcher and autograd Function.

Same math, signature and results as ``sparse_kl_torch`` (read its docstring for the derivation)::

    KL_r = sum_{i in S} p_i (log p_i - log q_i) + t (log t - log Q),   q = softmax(z / T)
    dKL/dz'_v = mass q_v - p_v (v in S),   mass q_v - t q_v / Q (v not in S),   mass = sum_S p + t (= 1)

One program per row, two sweeps over the vocabulary in BLOCK_V tiles:

1. online logsumexp (running max, rescaled sum) of the NON-kept tempered logits, ``lse_out`` (a tile entry
   is kept if it equals one of the row's K ids: a [BLOCK_V, BLOCK_K] comparison); the K kept logits are
   then gathered and complete ``lse = logaddexp(lse_out, logsumexp(z'_S))``, so ``log Q = lse_out - lse``
   never cancels (no ``1 - sum_S q``) and keeps its own range; the row loss is stored;
2. the gradient, written tile by tile into the logits-sized buffer (which may be the logits themselves,
   as fused cross-entropy kernels do): ``w T (mass q_v - p_v)`` on S and
   ``w T (mass Q - t) exp(z'_v - lse_out)`` (= ``w T (mass q_v - t q_v / Q)``) off S.

Spread tail (``SPREAD``: the ``"uniform"`` and ``"prior"`` rules; ``r_v = min(c g_v, cap)`` off S, ``c`` and
``cap`` per row, ``g`` the prior or 1)::

    KL_r = sum_S p (log p - log q) + sum_{v not in S} r_v (log r_v - log q_v)
         = sum_S p (log p - z'_S + lse) + B - A + R (lse - shift)
    A = sum_{v not in S} r_v (z'_v - shift),  B = sum r_v log r_v,  R = sum r_v

``A``, ``B`` and ``R`` accumulate in sweep 1 beside the logsumexp (``shift`` = the largest kept logit, so that
``A`` and ``R lse`` do not cancel at large logits); sweep 2 writes ``w T (mass q_v - r_v)`` off S with
``mass = sum_S p + R``. No target row is materialised: ``r_v`` is recomputed from ``g`` per tile.

No [N, V] buffer exists besides the gradient; the backward pass only rescales it by the upstream gradient.
Guards: ids outside [0, V) are refused before launch (``check_ids``), the backward is once-differentiable, and
``inplace=True`` marks the logits dirty.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .sparse_kl_torch import SparseKLTerm, run_sparse_kl_terms, save_forward, scale_saved_grad

__all__ = ["SparseKLTritonFunction", "sparse_kl_rows_triton", "sparse_kl_triton"]


@triton.jit
def _sparse_kl_kernel(
    z_ptr,
    z_row_stride,
    g_ptr,
    g_row_stride,
    ids_ptr,  # [N, K] int32, -1 on masked entries
    p_ptr,  # [N, K] fp32, 0 on masked entries
    k_row_stride,
    tail_ptr,  # [N] fp32
    w_ptr,  # [N] fp32 row weights
    loss_ptr,  # [N] fp32 out
    prior_ptr,  # [V] fp32 tail prior g (SPREAD and not UNIFORM)
    scale_ptr,  # [N] fp32 spread scale c (SPREAD)
    cap_ptr,  # [N] fp32 spread cap (SPREAD; inf = none)
    V,
    K,
    inv_temp,
    temp,
    COMPUTE_GRAD: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    SPREAD: tl.constexpr,
    UNIFORM: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_row_stride
    g_row = g_ptr + row * g_row_stride
    w = tl.load(w_ptr + row)
    if w == 0.0:
        # Weightless row (padding): loss 0, gradient 0, nothing read.
        tl.store(loss_ptr + row, 0.0)
        if COMPUTE_GRAD:
            if not ACCUMULATE:
                for v0 in range(0, V, BLOCK_V):
                    offs = v0 + tl.arange(0, BLOCK_V)
                    tl.store(g_row + offs, tl.zeros([BLOCK_V], dtype=g_ptr.dtype.element_ty), mask=offs < V)
        return

    koffs = tl.arange(0, BLOCK_K)
    ids = tl.load(ids_ptr + row * k_row_stride + koffs, mask=koffs < K, other=-1)
    p = tl.load(p_ptr + row * k_row_stride + koffs, mask=koffs < K, other=0.0)
    valid = ids >= 0
    t = tl.load(tail_ptr + row)

    # Sweep 1: online logsumexp of the NON-kept tempered logits only (running max m_out, rescaled sum s_out),
    # so that log Q = lse_out - lse is exact however small Q is. m_out starts finite so that exp(m - m_new)
    # and exp(x - m_new) never see (-inf) - (-inf).
    zk = tl.load(z_row + ids, mask=valid, other=0.0).to(tl.float32) * inv_temp
    zk = tl.where(valid, zk, float("-inf"))
    zk_max = tl.max(zk, axis=0)
    shift = tl.where(zk_max > -1.0e30, zk_max, 0.0)
    c = 0.0
    cap = 0.0
    if SPREAD:
        c = tl.load(scale_ptr + row)
        cap = tl.load(cap_ptr + row)
    acc_a = 0.0  # sum r_v (z'_v - shift) off S
    acc_b = 0.0  # sum r_v log r_v off S
    acc_r = 0.0  # sum r_v off S
    m_out = -1.0e30
    s_out = 0.0
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(z_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_temp
        kept = tl.sum((offs[:, None] == ids[None, :]).to(tl.int32), axis=1) > 0
        if SPREAD:
            if UNIFORM:
                gv = tl.where(offs < V, 1.0, 0.0)
            else:
                gv = tl.load(prior_ptr + offs, mask=offs < V, other=0.0)
            r = tl.where(kept, 0.0, tl.minimum(c * gv, cap))
            pos = r > 0.0
            acc_a += tl.sum(r * tl.where(pos, x - shift, 0.0), axis=0)  # -inf stays where r > 0
            acc_b += tl.sum(tl.where(pos, r * tl.log(tl.where(pos, r, 1.0)), 0.0), axis=0)
            acc_r += tl.sum(r, axis=0)
        x = tl.where(kept, float("-inf"), x)
        m_new = tl.maximum(m_out, tl.max(x, axis=0))
        s_out = s_out * tl.exp(m_out - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m_out = m_new
    lse_out = m_out + tl.log(s_out)  # -inf when the kept set covers every token

    # The kept logits complete the logsumexp: lse = logaddexp(lse_out, logsumexp(z'_S)).
    top = tl.maximum(lse_out, zk_max)
    lse = top + tl.log(tl.exp(lse_out - top) + tl.sum(tl.exp(zk - top), axis=0))
    log_q_out = lse_out - lse

    # KL = sum_S p (log p - log q) + t (log t - log Q), with 0 log 0 = 0.
    log_q = tl.where(valid, zk - lse, 0.0)
    p_log_p = tl.where(p > 0.0, p * tl.log(tl.where(p > 0.0, p, 1.0)), 0.0)
    kl = tl.sum(tl.where(valid, p_log_p - p * log_q, 0.0), axis=0)
    if SPREAD:
        kl += acc_b - acc_a + acc_r * (lse - shift)
    else:
        has_tail = t > 0.0
        log_t = tl.log(tl.where(has_tail, t, 1.0))
        kl += tl.where(has_tail, t * (log_t - log_q_out), 0.0)
    tl.store(loss_ptr + row, w * temp * temp * kl)

    if COMPUTE_GRAD and SPREAD:
        # Sweep 2 (spread tail): dL/dz_v = w T (mass q_v - target_v), target = p on S, r off S.
        mass_s = tl.sum(p, axis=0) + acc_r
        scale_s = w * temp
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            x = tl.load(z_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_temp
            hit = offs[:, None] == ids[None, :]
            kept = tl.sum(hit.to(tl.int32), axis=1) > 0
            p_v = tl.sum(tl.where(hit, p[None, :], 0.0), axis=1)
            if UNIFORM:
                gv = tl.where(offs < V, 1.0, 0.0)
            else:
                gv = tl.load(prior_ptr + offs, mask=offs < V, other=0.0)
            target = tl.where(kept, p_v, tl.minimum(c * gv, cap))
            g = scale_s * (mass_s * tl.exp(x - lse) - target)
            if ACCUMULATE:
                g += tl.load(g_row + offs, mask=offs < V, other=0.0).to(tl.float32)
            tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=offs < V)
    elif COMPUTE_GRAD:
        # Sweep 2: dL/dz_v = w T (mass q_v - p_v) on S, and off S w T (mass q_v - t q_v / Q)
        # = w T (mass Q - t) exp(z'_v - lse_out), bounded even when Q underflows.
        mass = tl.sum(p, axis=0) + t
        scale = w * temp
        coef_out = tl.where(s_out > 0.0, scale * (mass * tl.exp(log_q_out) - t), 0.0)
        lse_out_safe = tl.where(s_out > 0.0, lse_out, 0.0)
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            x = tl.load(z_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_temp
            hit = offs[:, None] == ids[None, :]
            kept = tl.sum(hit.to(tl.int32), axis=1) > 0
            p_v = tl.sum(tl.where(hit, p[None, :], 0.0), axis=1)
            g_in = scale * (mass * tl.exp(x - lse) - p_v)
            g_out = coef_out * tl.exp(x - lse_out_safe)
            g = tl.where(kept, g_in, g_out)
            if ACCUMULATE:
                g += tl.load(g_row + offs, mask=offs < V, other=0.0).to(tl.float32)
            tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=offs < V)


def _block_sizes(vocab: int, k: int, block_v: int | None) -> tuple[int, int]:
    block_k = max(2, triton.next_power_of_2(max(1, k)))
    if block_v is None:
        # Keep the [BLOCK_V, BLOCK_K] membership comparison around 16K elements per tile.
        block_v = min(4096, max(64, 16384 // block_k), max(16, triton.next_power_of_2(vocab)))
    return block_v, block_k


def sparse_kl_rows_triton(
    logits: torch.Tensor,
    term: SparseKLTerm,
    grad: torch.Tensor | None = None,
    accumulate: bool = False,
    block_v: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Per-row weighted losses of one term; writes (or adds) the gradient into ``grad`` (see the torch twin).

    Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (the tests do this).
    """
    n, vocab = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("logits must be contiguous in the vocabulary dimension")
    dev = logits.device
    k = term.ids.shape[1]
    mask = torch.ones_like(term.ids, dtype=torch.bool) if term.mask is None else term.mask.to(dev, torch.bool)
    ids = torch.where(mask, term.ids.to(dev), -1).to(torch.int32).contiguous()
    probs = torch.where(mask, term.probs.to(dev, torch.float32), 0.0).contiguous()
    tail = (
        torch.zeros(n, dtype=torch.float32, device=dev)
        if term.tail is None
        else term.tail.to(dev, torch.float32).contiguous()
    )
    weight = term.weight.to(dev, torch.float32).contiguous()
    sp = term.spread
    if sp is None:
        spread_scale = spread_cap = prior = weight  # placeholders, never read (SPREAD is False)
    else:
        spread_scale = sp.scale.to(dev, torch.float32).contiguous()
        spread_cap = sp.cap.to(dev, torch.float32).contiguous()
        prior = weight if sp.weights is None else sp.weights.to(dev, torch.float32).contiguous()
    losses = torch.empty(n, dtype=torch.float32, device=dev)
    bv, bk = _block_sizes(vocab, k, block_v)
    if num_warps is None:
        num_warps = 8 if bv * bk >= 16384 else 4
    if n == 0:
        return losses
    g = grad if grad is not None else logits  # never written when COMPUTE_GRAD is False
    _sparse_kl_kernel[(n,)](
        logits,
        logits.stride(0),
        g,
        g.stride(0),
        ids,
        probs,
        max(1, k),
        tail,
        weight,
        losses,
        prior,
        spread_scale,
        spread_cap,
        vocab,
        k,
        1.0 / float(term.temperature),
        float(term.temperature),
        COMPUTE_GRAD=grad is not None,
        ACCUMULATE=bool(accumulate),
        SPREAD=sp is not None,
        UNIFORM=sp is not None and sp.weights is None,
        BLOCK_V=bv,
        BLOCK_K=bk,
        num_warps=num_warps,
    )
    return losses


class SparseKLTritonFunction(torch.autograd.Function):
    """Autograd Function over the fused kernel: gradient computed in forward, rescaled in backward."""

    @staticmethod
    def forward(ctx, logits, terms, reduction, inplace, block_v):
        needs_grad = ctx.needs_input_grad[0]
        loss, parts, grad = run_sparse_kl_terms(
            sparse_kl_rows_triton, logits, terms, reduction, inplace, needs_grad, block_v=block_v
        )
        return save_forward(ctx, logits, loss, parts, grad, reduction, inplace)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_parts, *_dirty):
        return scale_saved_grad(ctx, grad_out), None, None, None, None


def sparse_kl_triton(
    logits: torch.Tensor,
    terms: Sequence[SparseKLTerm],
    reduction: str = "sum",
    inplace: bool = False,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused-kernel twin of ``sparse_kl_torch`` (same arguments and results; ``block_v`` tunes the tile)."""
    out = SparseKLTritonFunction.apply(logits, list(terms), reduction, inplace, block_v)
    return out[0], out[1]
