"""Selection mode ``adaptive``: a per-sample budget of entries, spent where it buys the most fidelity (pure torch).

A fixed top-k gives every position the same ``k``. A peaked position needs one or two entries, a flat one many:
with the same *mean* number of entries per position, choosing each position's ``k_i`` to minimise the summed
KL(teacher || reconstruction) of the uniform tail rule (docs/FORMAT.md 5) loses less than top-k at every budget
measured (``benchmarks/bench_adaptive.py``). Top-p at the same mean entries has 1.9 to 2.5 times the mean KL of
top-k there: equal kept mass is not what the reconstruction's error depends on. What is stored is docs/FORMAT.md
5b (``adaptive``).

Everything here runs on ``[N, K]`` tensors after the top-``K`` extraction (the dispatched top-k kernel, Triton on
CUDA), so it is plain torch on any device; no ``[N, V]`` pass and no Triton kernel of its own.

The KL curve
------------
Row probabilities sorted ``p_1 >= p_2 >= ... >= p_K`` (exact, float64: :func:`topk_probs`) and ``t_K`` the exact
tail beyond them. Keeping the top ``k`` and spreading ``t_k = t_K + sum_{k<j<=K} p_j`` uniformly over the other
``V - k`` tokens costs ``KL_k = sum_{j>k} p_j log p_j - t_k log(t_k / (V - k))``. The tokens beyond ``K`` enter
every ``KL_k`` with the same ``sum_{j>K} p_j log p_j``, so the differences

    ``D_k = KL_k - KL_K = sum_{k<j<=K} p_j log p_j - t_k log(t_k / (V - k)) + t_K log(t_K / (V - K))``

need nothing beyond the top ``K`` and ``t_K`` (:func:`kl_curve`; ``0 log 0 = 0``). Only differences matter for
the allocation.

The allocation
--------------
Positions share a budget by *group* (the compile: one group per sample, ``row_id // max_length``): group ``g`` of
``n_g`` positions may keep ``B_g = floor(mean_k * n_g)`` entries in all. :func:`allocate` picks, per group, the
Lagrangian solution ``k_i(lam) = argmin_{1 <= k <= c_i} D_k + lam * k`` (``c_i`` the row's finite entries; ties:
the smaller ``k``) for the smallest ``lam >= LAM_MIN`` found with ``sum_i k_i(lam) <= B_g``: ``lam`` is bisected in
float64 over ``[LAM_MIN, lam_max_g]`` (``lam_max_g = 2 max_i (D_1 - min_k D_k)`` gives ``k_i = 1`` everywhere, which
always fits since ``mean_k >= 1``), :data:`BISECT_STEPS` steps, vectorised over the groups of a batch.

Properties. (1) Never over budget. (2) Optimal for the budget it uses: any Lagrangian choice minimises
``sum D_{k_i}`` among all choices using at most ``sum k_i`` entries. (3) ``D_k`` need not be convex in ``k``, so
the solution sits on each row's lower convex hull and may leave part of the budget unused: the hull step at the
critical slope that no longer fits (under ``K`` entries on continuous curves, more when several rows share that
slope exactly). The remainder is left unspent rather than filled greedily, which would lose property (2).
(4) Deterministic and per group: a group's result depends only on its own rows (``lam_max_g``, the bisection and
the integer sums are per group, and nothing depends on the rows' order), so the same sample gets the same entries
whatever batch, batch size or rank it is compiled in, for the same logits. Rows with a negative group have no
budget: they keep 1 entry (the compile uses it for positions that store no label, ``--assistant-only``).

Exactness of the stored tail: a trimmed position's tail is ``t_K`` plus the exact float64 probabilities of its
dropped entries (:func:`cut_to_counts`), a sum of non-kept terms as everywhere in the contract, never ``1 - kept``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from labelstore.codecs import ValueCodec
from labelstore_kernels.contract import Extracted

BISECT_STEPS = 64  # [LAM_MIN, lam_max] halved 64 times: below float64 resolution of lam_max
# The smallest price of an entry, in nats: an entry that lowers the KL by less is not kept even when the budget
# allows it. Such gains are the float64 rounding noise of the curve (a uniform tail gains exactly 0, computed as
# +-1e-17), far below what a float32 probability or tail can even express.
LAM_MIN = 1e-12


def topk_probs(logits: torch.Tensor, ex: Extracted, temperature: float) -> torch.Tensor:
    """Exact probabilities (float64 ``[N, K]``, 0 past ``counts``) of a top-``K`` extraction's entries.

    ``p_j = (1 - t_K) * e_j / sum_i e_i`` with ``e_j = exp((z_j - z_1) / T)`` from the raw logits in float64 and
    ``t_K`` the extraction's exact tail: the softmax of the kept entries rescaled to the kept mass (the same
    formula as ``topp``; within ~1e-7 relative of the float64 softmax, the float32 tail's precision).
    """
    if ex.ids.shape[0] == 0:
        return torch.zeros(ex.ids.shape, dtype=torch.float64, device=ex.ids.device)
    z = logits.gather(1, ex.ids.long().to(logits.device)).to(torch.float64)
    e = torch.exp((z - z[:, :1]) * (1.0 / float(temperature)))  # -inf padding entries -> 0
    return e * ((1.0 - ex.tail.to(torch.float64)) / e.sum(1))[:, None]


def kl_curve(probs: torch.Tensor, tail: torch.Tensor, V: int) -> torch.Tensor:
    """``D[:, k - 1] = KL_k - KL_K`` for ``k = 1 .. K`` (float64 ``[N, K]``; module docstring).

    ``probs`` float64 ``[N, K]`` (descending, 0 for missing entries), ``tail`` the exact mass beyond them, ``V``
    the vocabulary size the uniform rule spreads over.
    """
    p = probs.to(torch.float64)
    n, K = p.shape
    t_K = tail.to(torch.float64)
    plogp = torch.xlogy(p, p)
    # suffix sums over the dropped slots k .. K-1 (slot s holds p_{s+1}); index K is the empty suffix
    zero = torch.zeros(n, 1, dtype=torch.float64, device=p.device)
    suf_p = torch.cat([p.flip(1).cumsum(1).flip(1), zero], 1)[:, 1:]  # [:, k-1] = sum of slots >= k
    suf_pl = torch.cat([plogp.flip(1).cumsum(1).flip(1), zero], 1)[:, 1:]
    t_k = t_K[:, None] + suf_p
    rest = (V - torch.arange(1, K + 1, device=p.device, dtype=torch.float64))[None, :]

    def spread(t, r):  # t log(t / r), 0 where t = 0 (r = 0 only with t = 0: nothing left to spread over)
        return torch.where(t > 0, t * (torch.log(t) - torch.log(r.clamp(min=1.0))), torch.zeros_like(t))

    return suf_pl - spread(t_k, rest) + spread(t_K[:, None], rest[:, -1:])


def _group_index(groups, n: int, device) -> tuple[torch.Tensor, int]:
    """Compact group indices ``[n]`` (-1: no budget) and the number of groups."""
    if groups is None:
        return torch.zeros(n, dtype=torch.int64, device=device), 1 if n else 0
    g = torch.as_tensor(groups, device=device)
    if g.shape != (n,) or g.dtype.is_floating_point or g.dtype == torch.bool:
        raise ValueError(f"groups must be {n} integers (one budget group per row, e.g. sample ids; negative: no "
                         f"budget), got shape {tuple(g.shape)} {g.dtype}")
    g = g.to(torch.int64)
    idx = torch.full((n,), -1, dtype=torch.int64, device=device)
    has = g >= 0
    if bool(has.any()):
        uniq, inv = torch.unique(g[has], return_inverse=True)
        idx[has] = inv
        return idx, int(uniq.numel())
    return idx, 0


def allocate(D: torch.Tensor, counts: torch.Tensor, mean_k: float, groups=None) -> torch.Tensor:
    """Entries per row (int64 ``[N]``, in ``[1, counts_i]``) under a per-group budget (module docstring).

    ``D`` float64 ``[N, K]`` (:func:`kl_curve`), ``counts`` the rows' finite entries (``>= 1``), ``mean_k`` the
    budget per position, ``groups`` int ``[N]`` (rows sharing a budget; negative: no budget, 1 entry; default:
    all rows one group).
    """
    n, K = D.shape
    dev = D.device
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=dev)
    if not (isinstance(mean_k, (int, float)) and not isinstance(mean_k, bool) and 1 <= mean_k):
        raise ValueError(f"mean_k must be a number >= 1, got {mean_k!r}")
    gi, n_groups = _group_index(groups, n, dev)
    cnt = counts.to(dev, torch.int64).clamp(1, K)
    ks = torch.arange(1, K + 1, device=dev)
    # entries past a row's count are -inf logits: never kept (cost +inf), so argmin stays within [1, counts]
    Dm = torch.where(ks[None, :] <= cnt[:, None], D.to(torch.float64), math.inf)
    ksf = ks.to(torch.float64)[None, :]
    active = gi >= 0
    ga = torch.where(active, gi, n_groups)  # inactive rows go to a dummy group n_groups
    size = torch.zeros(n_groups + 1, dtype=torch.int64, device=dev).scatter_add_(0, ga, torch.ones_like(ga))
    budget = torch.floor(size.to(torch.float64) * float(mean_k)).to(torch.int64)

    def choose(lam_rows):
        return torch.argmin(Dm + lam_rows[:, None] * ksf, dim=1) + 1  # first minimum: the smaller k on ties

    def used(k):
        return torch.zeros(n_groups + 1, dtype=torch.int64, device=dev).scatter_add_(0, ga, k)

    finite_min = torch.where(torch.isfinite(Dm), Dm, math.inf).amin(1)
    span = (Dm[:, 0] - finite_min).clamp(min=0.0)
    # 2 * max span: every row at k = 1 with a margin for the rounding of D_k + lam * k
    hi = 2.0 * torch.zeros(n_groups + 1, dtype=torch.float64, device=dev).scatter_reduce_(0, ga, span, "amax")
    lo = torch.full_like(hi, LAM_MIN)
    fits0 = used(choose(lo[ga])) <= budget  # the smallest price already fits: the unconstrained optimum
    hi = torch.where(fits0, LAM_MIN, hi.clamp(min=LAM_MIN))
    for _ in range(BISECT_STEPS):
        mid = 0.5 * (lo + hi)
        fit = used(choose(mid[ga])) <= budget
        hi = torch.where(fit, mid, hi)
        lo = torch.where(fit, lo, mid)
    k = choose(hi[ga])
    over = (used(k) > budget)[ga]  # cannot happen (hi always fits); k = 1 is the safe answer if it did
    return torch.where(active & ~over, k, torch.ones_like(k))


def cut_to_counts(ex: Extracted, probs: torch.Tensor, keep: torch.Tensor, codec: ValueCodec) -> Extracted:
    """Keep the first ``keep[i]`` entries of row ``i`` of a top-``K`` extraction.

    Dropped slots keep their (distinct) ids and carry the codec's zero code, as ``topp`` pads (contract:
    entries past ``counts``). ``tail = t_K + sum of the dropped entries' exact probabilities`` (float64, then
    float32): only non-kept terms, no cancellation.
    """
    n, K = ex.ids.shape
    if n == 0:
        return ex
    slot = torch.arange(K, device=probs.device)[None, :]
    keep = keep.to(probs.device, torch.int64)
    drop = slot >= keep[:, None]
    tail = ex.tail.to(torch.float64) + torch.where(drop, probs, 0.0).sum(1)
    bpv = codec.bytes_per_value
    zero = codec.encode(torch.full((1, 1), float("-inf"))).to(ex.values.device).view(1, 1, bpv)
    drop = drop.to(ex.values.device)
    values = torch.where(drop[:, :, None], zero, ex.values.view(n, K, bpv)).reshape(n, K * bpv)
    return Extracted(ex.ids, values.contiguous(), keep.to(ex.ids.device, torch.int32),
                     tail.to(ex.tail.device, torch.float32), ex.lse)


def adaptive_from_topk(ex: Extracted, probs: torch.Tensor, V: int, selection: Mapping, codec: ValueCodec,
                       groups=None) -> Extracted:
    """Mode ``adaptive`` from a top-``K`` extraction and its exact probabilities (:func:`topk_probs`).

    The second half of the mode, separate so that the fused head can collect ``ex`` and ``probs`` block by block
    and allocate once the whole batch (every row of every group) is there.
    """
    D = kl_curve(probs, ex.tail, V)
    keep = allocate(D, ex.counts, selection["mean_k"], groups)
    return cut_to_counts(ex, probs, keep, codec)
