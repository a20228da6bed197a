"""Student log-probabilities on the teacher's buckets (the kept ids plus "everything else"), for the losses that
need them explicitly (reverse KL, generalised JSD): chunked over rows, with its own backward."""

from __future__ import annotations

import torch

from labelstore_kernels.sparse_kl_torch import _compute_dtype, _fill_kept_, default_chunk_rows


class _StudentBuckets(torch.autograd.Function):
    """Student log-probabilities of the kept ids and of the bucket of everything else, chunked over rows.

    Backward, for an upstream gradient G (G_i on kept entry i, G_Q on the tail bucket), with
    d log q_i / dz'_v = [v = i] - q_v and d log Q / dz'_v = [v not in S] q_v / Q - q_v::

        dL/dz'_v = sum_i G_i [v = i] + G_Q [v not in S] q_v / Q - q_v (sum_i G_i + G_Q)
    """

    @staticmethod
    def forward(ctx, logits, ids, mask, temperature, chunk_rows):
        n, vocab = logits.shape
        cdt = _compute_dtype(logits)
        chunk = chunk_rows or default_chunk_rows(vocab)
        out = torch.empty(n, ids.shape[1] + 1, dtype=cdt, device=logits.device)
        lse_all = torch.empty(n, dtype=cdt, device=logits.device)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            z = logits[s:e].to(cdt, copy=True).div_(temperature)
            lse = torch.logsumexp(z, dim=1, keepdim=True)
            out[s:e, :-1] = torch.where(mask[s:e], z.gather(1, ids[s:e]) - lse, 0.0)
            _fill_kept_(z, ids[s:e], mask[s:e], float("-inf"))
            out[s:e, -1] = torch.logsumexp(z, dim=1) - lse[:, 0]
            lse_all[s:e] = lse[:, 0]
        ctx.save_for_backward(logits, ids, mask, lse_all, out[:, -1].clone())
        ctx.temperature, ctx.chunk = temperature, chunk
        return out

    @staticmethod
    def backward(ctx, g_out):
        logits, ids, mask, lse_all, log_q_out = ctx.saved_tensors
        n = logits.shape[0]
        cdt = lse_all.dtype
        grad = torch.empty_like(logits)
        g_kept = torch.where(mask, g_out[:, :-1].to(cdt), 0.0)
        # With Q = 0 (nothing outside the kept set) the bucket has no logits to move.
        g_tail = torch.where(torch.isfinite(log_q_out), g_out[:, -1].to(cdt), 0.0)
        total = g_kept.sum(1) + g_tail
        for s in range(0, n, ctx.chunk):
            e = min(n, s + ctx.chunk)
            z = logits[s:e].to(cdt, copy=True).div_(ctx.temperature).sub_(lse_all[s:e, None])  # log q
            q = torch.exp(z)
            lq_out = torch.where(torch.isfinite(log_q_out[s:e]), log_q_out[s:e], 0.0)
            tail_part = torch.exp(z.sub_(lq_out[:, None]))  # q_v / Q ...
            _fill_kept_(tail_part, ids[s:e], mask[s:e], 0.0)  # ... off S only
            g = tail_part.mul_(g_tail[s:e, None]).sub_(q.mul_(total[s:e, None]))
            g.scatter_add_(1, ids[s:e], g_kept[s:e])
            grad[s:e] = g.div_(ctx.temperature)
        return grad, None, None, None, None


def student_bucket_logprobs_torch(
    logits: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """[N, K + 1] student log-probabilities of the buckets: ``log q_i`` at the kept ids, then ``log Q``.

    Differentiable in ``logits`` with O(chunk_rows x V) temporaries; any divergence between (K+1)-bucket
    distributions (reverse KL, JSD) can then be written on these [N, K + 1] tensors. Masked entries hold 0
    and receive no gradient; ``log Q`` is ``-inf`` when the kept set covers the vocabulary.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    ids = ids.to(logits.device, torch.long)
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.to(logits.device, torch.bool)
    return _StudentBuckets.apply(logits, ids, mask, float(temperature), chunk_rows)
