"""Pure-torch twin of the extraction kernel: the CPU path and the test oracle.

Same contract as :func:`labelstore_kernels.extract_triton.extract_topk_triton` (see
:mod:`labelstore_kernels.contract`). Rows are processed in chunks of about ``chunk_elems`` logits, so the
peak extra memory is one float32 chunk buffer plus small per-chunk tensors, never an ``[N, V]`` copy.

Why it beats ``log_softmax -> topk -> cast``: ``torch.topk`` over the whole vocabulary (~1.4 ns/logit on
one CPU core) and the full log-softmax write dominate that sequence. Here every pass over the vocabulary
is a cheap vectorised stream over a cache-resident chunk (convert, block max, ``exp2``, block sum), and
the selection runs on a few blocks only:

* Split each row into ``nb`` blocks of ``B`` logits (``nb >= k``) and take the block maxima ``bm``.
  Let ``thr`` be the k-th largest block maximum. The ``k`` blocks whose maxima are ``>= thr`` each hold a
  distinct logit ``>= thr``, so the k-th largest logit is ``>= thr``: every kept entry, *and every entry
  tied with the k-th*, lies in a block with ``bm >= thr``. Selecting among those blocks only (about
  ``k * B`` logits) is exact, ties included.
* ``e = exp2((x - max) * log2(e) / T)`` in place; block sums ``bs``. The tail is summed from non-kept
  entries only: ``bs`` of the unselected blocks plus the non-kept ``e`` inside the selected blocks.
  ``lse = max / T + log(tail + kept)``: a sum of positives, no cancellation.
* Order ``(row, value desc, id asc)`` by two stable sorts of the candidates (nonzero yields them id-ascending),
  so tie-breaking by the smaller id is exact (``torch.topk`` does not order equal values).

Caveat: the twin issues a few dozen torch ops per chunk. On an oversubscribed CPU (load above the core
count) OpenMP's default spin-waiting makes each parallel op wait for a descheduled worker, and the twin can
then fall behind the naive sequence (five big ops); ``OMP_WAIT_POLICY=PASSIVE`` or fewer torch threads
avoid it (see ``benchmarks/bench_extract.py``).
"""

from __future__ import annotations

import torch

from labelstore.codecs import ValueCodec
from labelstore.constants import LOG2E
from labelstore_kernels.contract import (
    Extracted,
    empty_outputs,
    prepare,
    raise_invalid_rows,
)

MAX_CHUNK_ELEMS = 1 << 20  # 4 MiB float32 working buffer: stays in the last-level cache
MIN_CHUNK_ELEMS = 1 << 18
MAX_CHUNK_ELEMS_CUDA = 1 << 27  # on a GPU, fewer and larger chunks (512 MiB at most): launches dominate
MAX_BLOCK = 64


def f32(x: float) -> float:
    """Round a Python float to float32 (the launcher passes scalars to the kernel as float32)."""
    return float(torch.tensor(x, dtype=torch.float32))


def extract_topk_torch(
    logits: torch.Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    codec: str | dict | ValueCodec = "log8",
    chunk_elems: int | None = None,
) -> Extracted:
    """Top-k extraction in plain torch (any device). See :mod:`labelstore_kernels.contract`.

    ``chunk_elems`` bounds the float32 working buffer (rows are processed ``chunk_elems // V`` at a time,
    at least one); by default ``N * V / 16`` clamped to ``[2^18, 2^20]`` (``2^27`` on CUDA), i.e. at most
    ~1/8 of a bf16 input's size and 4 MiB (512 MiB on CUDA).
    """
    x, k, temperature, cdc = prepare(logits, k, temperature, codec)
    n_rows, V = x.shape
    out = empty_outputs(n_rows, k, cdc, x.device)
    if n_rows == 0:
        return out
    inv_t = f32(1.0 / temperature)
    c2 = f32(LOG2E / temperature)  # exp((x - m) / T) == exp2((x - m) * c2)
    B = max(1, min(MAX_BLOCK, V // k))  # block size: nb = ceil(V / B) >= k blocks
    nb = -(-V // B)
    W = nb * B  # padded row width; the padding holds -inf (weight 0, never a candidate)
    if chunk_elems is None:
        top = MAX_CHUNK_ELEMS_CUDA if x.is_cuda else MAX_CHUNK_ELEMS
        chunk_elems = min(top, max(MIN_CHUNK_ELEMS, n_rows * V // 16))
    C = max(1, min(n_rows, int(chunk_elems) // W))
    buf = torch.empty(C, W, dtype=torch.float32, device=x.device)
    lane = torch.arange(B, device=x.device)

    for s0 in range(0, n_rows, C):
        xc = x[s0 : s0 + C]
        n = xc.shape[0]
        b = buf[:n]
        b[:, :V].copy_(xc)
        if W > V:
            b[:, V:].fill_(float("-inf"))
        bm = b.view(n, nb, B).amax(-1)  # [n, nb] block maxima
        m = bm.amax(-1)  # row max; NaN if the row has a NaN, +inf / -inf flag the other bad rows
        bad = ~torch.isfinite(m)
        if bool(bad.any()):
            rows = (bad.nonzero().flatten() + s0).tolist()
            raise_invalid_rows(x, rows, len(rows))

        # k-th largest block maximum: a lower bound of the k-th largest logit (see the module docstring)
        thr = torch.topk(bm, k, dim=1, sorted=False).values.amin(1)
        sel = bm >= thr[:, None]
        prow, pblk = sel.nonzero(as_tuple=True)  # candidate blocks, row-major, block-ascending

        flat = prow * nb + pblk
        bv = b.view(n * nb, B)
        xs = bv.index_select(0, flat)  # [P, B] raw logits of the selected blocks (padding: -inf)

        # Exponentials in place: e = exp((x - m) / T), 0 for -inf and the padding.
        b.sub_(m[:, None]).mul_(c2).exp2_()
        bs = b.view(n, nb, B).sum(-1)
        tail = bs.masked_fill(sel, 0.0).sum(1)  # unselected blocks hold no kept entry
        es = bv.index_select(0, flat)  # [P, B] their weights

        cols = pblk[:, None] * B + lane  # [P, B] token ids
        cand = xs >= thr[prow][:, None]
        if W > V:
            cand &= cols < V
        cp, co = cand.nonzero(as_tuple=True)  # ascending (row, id)
        crow = prow[cp]
        cval = xs[cp, co]

        # (row asc, value desc, id asc): stable sort by value, then stable sort by row.
        order = torch.sort(cval, descending=True, stable=True).indices
        order = order[torch.sort(crow[order], stable=True).indices]
        cnt = torch.bincount(crow, minlength=n)
        start = torch.cumsum(cnt, 0) - cnt
        rank = torch.arange(order.numel(), device=x.device) - start[crow[order]]
        kept = order[rank < k]  # exactly k per row: each row has >= k candidates
        if kept.numel() != n * k:  # pragma: no cover - guards the block-max argument above
            raise AssertionError("internal error: fewer than k candidates in a row")
        kp, ko = cp[kept], co[kept]

        kval = cval[kept].view(n, k)
        ke = es[kp, ko].view(n, k)
        es[kp, ko] = 0.0
        tail.index_add_(0, prow, es.sum(1))  # non-kept entries of the selected blocks
        total = tail + ke.sum(1)

        o = slice(s0, s0 + n)
        out.ids[o] = (cols[kp, ko]).view(n, k).to(torch.int32)
        out.values[o] = cdc.encode((kval - m[:, None]) * inv_t)
        out.counts[o] = (kval > float("-inf")).sum(1).to(torch.int32)
        out.tail[o] = tail / total
        out.lse[o] = m * inv_t + torch.log(total)
    return out
