"""The reconstruction rules: how stored entries and the exact tail become a teacher distribution again.

Stated once, here; the reader, the student's dense targets, the fidelity metrics and the benchmarks call these.
docs/FORMAT.md section 5 is the normative text.

Kept entries (every mode but the sampled part of the sampled modes)::

    p_i = (1 - t) * w_i / sum_j w_j          w: decoded codec weights, t: the position's exact tail

Sampled modes (5b): ``sample`` gives ``p_j = c_j / sum(c)`` (draw counts) and no tail; ``topk+sample`` gives
its first ``k_exact`` entries ``(1 - t) * w / sum(w)`` and its drawn ones ``t * c / sum(c)``; the tail is 0
wherever a draw exists (the draws stand for it).

Tail rules (where the mass ``t`` outside the ``n`` kept ids goes, over the ``V - n`` other tokens):

``uniform``  ``t / (V - n)`` each (the maximum-entropy completion).
``prior``    in proportion to the store's tail prior, no token above the smallest kept probability
             (water-filling, :func:`spread_tail`, FORMAT.md 5c).

Both are ``q_v = min(c g_v, cap)`` off the kept set: ``uniform`` is ``g = 1, cap = inf``. The per-position scale
``c`` is :func:`water_fill_scale` (O(K log V) per position against a prior prepared once, no [n, V] work), so the
student losses and dense targets can apply the rule one vocabulary tile at a time; :func:`spread_tail` is the
dense (sorting) form of the same rule, kept as the reference.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from labelstore.errors import ConfigMismatchError
from labelstore.selection import SAMPLED_MODES

TAIL_RULES = ("uniform", "bucket")  # re-tempering's two views of the tail (labelstore.student.targets)
SPREAD_RULES = ("uniform", "prior")  # tail rules that place the tail on tokens (the losses add "bucket", "none")


# ----------------------------------------------------------------------------------------------- kept entries
# Decoding precision (FORMAT.md section 5, normative): a position's probabilities depend on that position's own
# bytes only. Per position: S = the exact sum of its float32 weights, rounded once to float64 (what Python's
# math.fsum returns; no summation order is involved), scale = m / S in float64 with m the mass of the part
# (1 - t, t or 1), and p_i = float32(w_i * scale): the float64 product, rounded to float32.
def position_sums(weights: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """float64 ``[T]``: each position's weights summed exactly and rounded once to float64 (``math.fsum`` of the
    position's weights; 0 for a position without entries).

    Every float32 weight is an integer multiple of the ulp ``2^Q`` of the row's smallest one. Where no position
    sum reaches ``2^52`` ulps, float64 sums are exact in any order; below ``2^62`` ulps they are exact int64 sums
    with one rounding to float64; beyond (log8 steps above ~1/12 with a wide K) each position goes through
    ``math.fsum``. All three give the same bits.
    """
    w = np.asarray(weights, dtype=np.float32).reshape(-1)
    counts = np.asarray(counts, dtype=np.int64).reshape(-1)
    T, n = counts.size, w.size
    if n == 0:
        return np.zeros(T)
    aw = np.abs(w)
    wmin = float(aw.min())
    if wmin == 0:
        nz = aw[aw > 0]
        if nz.size == 0:
            return np.zeros(T)
        wmin = float(nz.min())
    qexp = max(int(np.frexp(np.float32(wmin))[1]) - 24, -149)  # ulp of the smallest weight (float32 subnormals)
    full = n == T * int(counts[0]) and bool((counts == counts[0]).all())
    if full:
        s64 = w.reshape(T, -1).sum(axis=1, dtype=np.float64)
        if math.ldexp(float(np.abs(s64).max()), -qexp) < 2.0**52:  # every partial sum exact: any order will do
            return s64
    bound = float(counts.max()) * float(aw.max())
    if math.ldexp(bound, -qexp) < 2.0**62:
        return int_position_sums(_scale_pow2(w, -qexp).astype(np.int64), counts, -qexp)  # exact integers
    return _per_position_sums(w, aw, counts)


def _per_position_sums(w: np.ndarray, aw: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """:func:`position_sums` where the row's weights span too many binades for one integer scale (a coarse log8
    step: codes reach 127 nats below the top). Each position gets its own scale, the ulp of its own smallest
    weight: its weights are then exact int64 multiples of it wherever ``count * max < 2^62`` of those units, and
    their integer sum is rounded once (the same bits as ``math.fsum``). Only positions wider than that (entries
    more than ~33 binades apart at k = 32) go through ``math.fsum``, one by one."""
    T = counts.size
    out = np.zeros(T)
    has = counts > 0
    if not has.any():
        return out
    ends = np.cumsum(counts)
    starts = ends - counts
    big = np.float32(np.inf)
    masked = np.where(aw > 0, aw, big)
    sidx = starts[has]
    wmin = np.minimum.reduceat(masked, sidx)  # per position with entries (reduceat over non-empty segments)
    wmax = np.maximum.reduceat(aw, sidx)
    pos_q = np.zeros(T, dtype=np.int64)
    finite = wmin < big
    q = np.maximum(np.frexp(np.where(finite, wmin, np.float32(1)))[1].astype(np.int64) - 24, -149)
    ok_h = finite & (np.ldexp(wmax.astype(np.float64) * counts[has], -q) < 2.0**62)
    pos_q[np.flatnonzero(has)] = q
    ok = np.zeros(T, dtype=bool)
    ok[np.flatnonzero(has)] = ok_h
    zero = np.zeros(T, dtype=bool)
    zero[np.flatnonzero(has)] = ~finite  # every weight 0: the sum is 0
    per = np.repeat(ok, counts)
    eq = np.repeat(pos_q, counts)
    iw = np.zeros(w.size, dtype=np.int64)
    iw[per] = np.ldexp(w[per].astype(np.float64), -eq[per]).astype(np.int64)
    cs = np.concatenate([np.zeros(1, np.int64), np.cumsum(iw)])  # wraps modulo 2^64; each difference is exact
    seg = cs[ends] - cs[starts]
    out[ok] = np.ldexp(seg[ok].astype(np.float64), pos_q[ok])
    for t in np.flatnonzero(has & ~ok & ~zero).tolist():
        out[t] = math.fsum(w[starts[t]:ends[t]].tolist())
    return out


def int_position_sums(iw: np.ndarray, counts: np.ndarray, q: int) -> np.ndarray:
    """:func:`position_sums` of weights given as exact int64 multiples ``iw`` of ``2^-q`` (no position's sum may
    reach ``2^63``): integer sums, in any order, then one rounding to float64."""
    T = counts.size
    if T and iw.size == T * int(counts[0]) and bool((counts == counts[0]).all()):
        seg = iw.reshape(T, -1).sum(axis=1)
    else:  # int64 running sums may wrap modulo 2^64, but each difference (one position's sum) is exact
        cs = np.concatenate([np.zeros(1, np.int64), np.cumsum(iw)])
        ends = np.cumsum(counts)
        seg = cs[ends] - cs[ends - counts]
    return seg.astype(np.float64) * 2.0**-q  # int64 -> float64: the one rounding (times 2^-q: exact)


def _scale_pow2(w: np.ndarray, e: int) -> np.ndarray:
    """float32 ``w * 2^e``, exact (no overflow by the caller's bound), in steps float32 can represent."""
    out = w
    while e:
        step = max(-126, min(126, e))
        out = out * np.float32(2.0**step)
        e -= step
    return out


def kept_scale(weight_sums: np.ndarray, tail: np.ndarray) -> np.ndarray:
    """Per-position float64 factor ``(1 - t) / S`` turning decoded weights into absolute probabilities (``S`` 0:
    the weights are all 0, and so are the probabilities)."""
    s = np.asarray(weight_sums, dtype=np.float64)
    return (1.0 - np.asarray(tail, dtype=np.float64)) / np.where(s > 0, s, 1.0)


def scaled(weights: np.ndarray, counts: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Flat float32 ``float32(w_i * scale[position of i])``: the product in float64, rounded once."""
    w = np.asarray(weights, dtype=np.float32).reshape(-1)
    out = np.empty(w.size, dtype=np.float32)
    T = counts.size
    if T and w.size == T * int(counts[0]) and (counts == counts[0]).all():
        np.multiply(w.reshape(T, -1), scale[:, None], out=out.reshape(T, -1), casting="unsafe")
    else:
        np.multiply(w, np.repeat(scale, counts), out=out, casting="unsafe")
    return out


def kept_probs(weights: np.ndarray, counts: np.ndarray, tail: np.ndarray, sums: np.ndarray | None = None
               ) -> np.ndarray:
    """Flat float32 probabilities of a row's kept entries: ``float32(w_i * ((1 - t) / S))`` per position, ``S``
    the exactly rounded sum of the position's weights (FORMAT.md section 5, bit for bit); ``sums``: ``S`` if the
    caller has it already (the reader, from its integer table)."""
    counts = np.asarray(counts, dtype=np.int64)
    s = position_sums(weights, counts) if sums is None else sums
    return scaled(weights, counts, kept_scale(s, tail))


def reconstruct(weights: np.ndarray, tail: np.ndarray, counts_mask: np.ndarray | None = None) -> np.ndarray:
    """Absolute probabilities ``[T, K]`` from decoded weights ``[T, K]`` and the exact tail ``[T]``, by the
    reader's rule (:func:`kept_probs`); rows whose weights sum to 0 get 0; entries outside ``counts_mask`` are
    ignored (0)."""
    w = np.asarray(weights, dtype=np.float32)
    w = w if counts_mask is None else np.where(counts_mask, w, np.float32(0))
    T, k = int(np.prod(w.shape[:-1])), w.shape[-1]
    counts = np.full(T, k, dtype=np.int64)
    return kept_probs(w.reshape(-1), counts, np.asarray(tail).reshape(-1)).reshape(w.shape)


def pad_row(input_ids: np.ndarray, counts: np.ndarray, ids: np.ndarray, weights: np.ndarray | None,
            tail: np.ndarray, k: int, normalize: bool = True, sums: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """One flat row -> ``(ids [T, K] int64, probs [T, K] float32)``, 0 past each position's count.

    ``weights`` None (hard labels): every kept id has probability 1. ``normalize``: apply the kept-entry rule
    (:func:`kept_probs`); otherwise the weights are returned as they are (decoded weights, or probabilities
    already made absolute: :func:`sampled_probs`). A position's output bits depend on its own entries only.
    ``sums``: the positions' exact weight sums, if known (:func:`kept_probs`).
    """
    T = input_ids.size
    n = ids.size
    if weights is None:
        flat = np.ones(n, dtype=np.float32)
    elif normalize:
        flat = kept_probs(weights, counts, tail, sums)
    else:
        flat = np.asarray(weights, dtype=np.float32)
    if T and n == T * k:  # every position full: a reshape, no scatter
        return ids.reshape(T, k), flat.reshape(T, k)
    pos = np.repeat(np.arange(T), counts)
    slot = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)
    out_ids = np.zeros((T, k), dtype=np.int64)
    out_ids[pos, slot] = ids
    probs = np.zeros((T, k), dtype=np.float32)
    probs[pos, slot] = flat
    return out_ids, probs


def sampled_probs(mode: str, k_exact: int, counts: np.ndarray, weights: np.ndarray,
                  tail: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sampled modes: decoded weights (codes, then draw counts) -> ``(absolute probabilities, tail)``, flat.

    Per position and part, as :func:`kept_probs`: ``float32(w_i * (m / S))`` with ``S`` the part's float64
    left-to-right sum and ``m`` its mass: ``1 - t`` for the first ``k_exact`` entries (``topk+sample``), ``t``
    for the drawn ones (``topk+sample``), 1 for ``sample``. The tail becomes 0 wherever a draw exists.
    """
    if mode not in SAMPLED_MODES:
        raise ValueError(f"sampled_probs is for the sampled modes {SAMPLED_MODES}, not {mode!r}")
    counts = np.asarray(counts, dtype=np.int64)
    T = counts.size
    w = np.asarray(weights, dtype=np.float32)
    slot = np.arange(w.size) - np.repeat(np.cumsum(counts) - counts, counts)
    t = np.asarray(tail, dtype=np.float64)
    exact = np.zeros(w.size, dtype=bool) if mode == "sample" else slot < k_exact
    n_exact = np.minimum(counts, 0 if mode == "sample" else k_exact)
    s_exact = position_sums(w[exact], n_exact)
    s_samp = position_sums(w[~exact], counts - n_exact)
    m_samp = np.ones(T) if mode == "sample" else t
    scale_exact = (1.0 - t) / np.where(s_exact > 0, s_exact, 1.0)
    scale_samp = m_samp / np.where(s_samp > 0, s_samp, 1.0)
    pos = np.repeat(np.arange(T), counts)
    p = np.empty(w.size, dtype=np.float32)
    np.multiply(w, np.where(exact, scale_exact[pos], scale_samp[pos]), out=p, casting="unsafe")
    return p, np.where(s_samp > 0, np.float32(0), np.asarray(tail, dtype=np.float32)).astype(np.float32)


# ----------------------------------------------------------------------------------------------- tail rules
def uniform_fill(tail: torch.Tensor, kept: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The uniform tail rule: each of the ``V - n`` non-kept tokens gets ``t / (V - n)`` (0 when all are kept)."""
    rest = vocab_size - kept
    return torch.where(rest > 0, tail / rest.clamp_min(1), torch.zeros_like(tail))


def spread_tail(tail: torch.Tensor, weights: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    """Spread ``tail [n]`` over tokens in proportion to ``weights [n, V]`` (0 = excluded), no token above ``cap [n]``.

    Water-filling: ``q_v = min(c * w_v, cap)`` with ``c`` such that ``sum q = tail``. With the weights sorted in
    descending order the capped tokens are a prefix; for each prefix length j the scale is
    ``c_j = (tail - j cap) / sum_{i >= j} w_(i)`` and the right j is the first whose next token stays under the
    cap. Rows that cannot hold their tail under the cap (more tail than ``cap * support``) fall back to no cap.
    """
    n, V = weights.shape
    w, order = weights.sort(dim=-1, descending=True)
    suffix = w.flip(-1).cumsum(-1).flip(-1)  # suffix[j] = sum_{i >= j} w_(i)
    j = torch.arange(V, dtype=torch.float64)[None, :]
    c = (tail[:, None] - j * cap[:, None]) / suffix.clamp_min(1e-300)
    ok = (c * w <= cap[:, None] * (1 + 1e-12)) & (c > 0) & (suffix > 0)
    first = torch.where(ok.any(-1), ok.float().argmax(-1), torch.zeros(n, dtype=torch.long))
    cj = c.gather(1, first[:, None])
    q_sorted = torch.minimum(cj * w, cap[:, None].expand(n, V))
    q_sorted = torch.where(ok.any(-1, keepdim=True), q_sorted,
                           tail[:, None] * w / w.sum(-1, keepdim=True).clamp_min(1e-300))
    return torch.empty_like(q_sorted).scatter_(1, order, q_sorted)


def mixed_prior(prior: np.ndarray, mix: float) -> np.ndarray:
    """The shape a store's tail is spread in: ``mix * prior / sum(prior) + (1 - mix) / V`` (FORMAT.md 5c)."""
    prior = np.asarray(prior, dtype=np.float64)
    return (mix * prior / max(prior.sum(), 1e-300) + (1 - mix) / prior.size).astype(np.float32)


# ----------------------------------------------------------------------------------- the rule, one scale per row
class PreparedPrior(NamedTuple):
    """A tail prior ready for :func:`water_fill_scale` (build it with :func:`prepare_prior`, once per prior).

    Attributes:
        weights: [V] float64, the prior as given (any positive scale: only ratios matter).
        sorted: [V] float64, the weights in descending order.
        rank: [V] int64, ``rank[v]`` = position of token v in ``sorted``.
        suffix: [V + 1] float64, ``suffix[j] = sum_{i >= j} sorted[i]`` (``suffix[V] = 0``).
    """

    weights: torch.Tensor
    sorted: torch.Tensor
    rank: torch.Tensor
    suffix: torch.Tensor


def prepare_prior(prior, vocab_size: int, device=None) -> PreparedPrior:
    """Validate a tail prior (1-D, ``vocab_size`` long, finite, every entry > 0) and index it for the rule.

    Raises ConfigMismatchError otherwise: a token with prior 0 could never receive tail mass, so a prior with
    zeros is refused rather than silently changing the rule (mix it with the uniform distribution first, e.g.
    :func:`mixed_prior` with ``mix < 1``, as stores do).
    """
    w = torch.as_tensor(prior).detach()
    device = w.device if device is None else torch.device(device)
    if w.dim() != 1 or w.shape[0] != int(vocab_size):
        raise ConfigMismatchError(
            f"the tail prior must be a 1-D tensor of {vocab_size} entries (the logits' vocabulary), got shape "
            f"{tuple(w.shape)}; a store's prior covers the teacher's vocabulary (LabelStore.tail_prior())"
        )
    w64 = w.to(device, torch.float64)
    if not bool(torch.isfinite(w64).all()) or not bool((w64 > 0).all()):
        raise ConfigMismatchError(
            "the tail prior must be finite and > 0 everywhere (a token with prior 0 could never hold tail mass); "
            "mix it with the uniform distribution first: labelstore.reconstruction.mixed_prior(prior, 0.9)"
        )
    srt, order = w64.sort(descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=device)
    suffix = torch.cat([srt.flip(0).cumsum(0).flip(0), srt.new_zeros(1)])
    return PreparedPrior(w64, srt, rank, suffix)


def kept_cap(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The water-filling cap of each row: its smallest kept probability (``inf`` for a row with no kept entry)."""
    return torch.where(mask, probs, torch.full_like(probs, float("inf"))).amin(-1)


def water_fill_scale(tail: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, cap: torch.Tensor,
                     prior: PreparedPrior | None, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(c, cap)`` such that ``q_v = min(c g_v, cap)`` over the non-kept tokens sums to ``tail``.

    ``prior`` None is the uniform rule (``g = 1``): ``c = t / (V - n)``, no cap. Otherwise the capped tokens
    are the non-kept ones with the largest ``g``. With ``J`` tokens of the global descending order capped (``n_J``
    of them not kept) the scale is ``c_J = (t - n_J cap) / S_J``, ``S_J`` the prior mass of the non-kept tokens
    after them; the right ``J`` is the first whose next token stays under the cap, ``c_J g_(J) <= cap``. That
    condition is monotone in ``J`` (``t <= cap (n_J + S_J / g_(J))``, non-decreasing), so a binary search over
    ``J`` finds it with ``O(K)`` work per step. Rows that cannot hold their tail under the cap
    (``t > cap * (V - n)``) fall back to no cap, as :func:`spread_tail` does; rows with nothing outside the kept
    set get ``c = 0``. Returns float64 tensors ``[N]`` (``cap`` is ``inf`` where no cap applies).
    """
    t = tail.to(torch.float64)
    mask = mask.to(torch.bool)
    n = mask.sum(-1)
    if prior is None:
        rest = (vocab_size - n).to(torch.float64)
        c = torch.where(rest > 0, t / rest.clamp_min(1), torch.zeros_like(t))
        return c, torch.full_like(c, float("inf"))
    V = prior.sorted.numel()
    dev = prior.sorted.device
    ids = ids.to(dev, torch.long)
    mask, t, n = mask.to(dev), t.to(dev), n.to(dev)
    cap = cap.to(dev, torch.float64)
    rk = torch.where(mask, prior.rank[ids.clamp(0, V - 1)], V)  # padding entries: rank V, never counted
    gk = torch.where(mask, prior.sorted[rk.clamp(max=V - 1)], 0.0)

    def parts(J):  # capped non-kept count, non-kept mass after J, non-kept tokens after J
        before = rk < J[:, None]
        n_cap = J - before.sum(-1)
        s = prior.suffix[J] - torch.where(before, 0.0, gk).sum(-1)
        left = (V - J) - (mask & ~before).sum(-1)
        return n_cap, s, left

    finite = torch.isfinite(cap)
    cap_f = torch.where(finite, cap, 0.0)
    lo = torch.zeros_like(n)
    hi = torch.full_like(n, V)  # V: no J works
    for _ in range(int(V).bit_length() + 1):
        mid = (lo + hi) // 2
        n_cap, s, left = parts(mid.clamp(max=V - 1))
        ok = (left > 0) & ((t - n_cap * cap_f) * prior.sorted[mid.clamp(max=V - 1)] <= cap_f * s * (1 + 1e-12))
        active = lo < hi
        hi = torch.where(active & ok, mid, hi)
        lo = torch.where(active & ~ok, mid + 1, lo)
    found = (lo < V) & finite
    n_cap, s, _ = parts(lo.clamp(max=V - 1))
    c_capped = ((t - n_cap * cap_f) / torch.where(s > 0, s, 1.0)).clamp_min(0.0)
    _, s0, left0 = parts(torch.zeros_like(n))
    c_free = torch.where(left0 > 0, t / torch.where(s0 > 0, s0, 1.0), 0.0)
    c = torch.where(found, c_capped, c_free)
    return c, torch.where(found, cap, torch.full_like(cap, float("inf")))


def spread_fill(scale: torch.Tensor, cap: torch.Tensor, weights: torch.Tensor | None, vocab_size: int,
                dtype=torch.float64) -> torch.Tensor:
    """Dense ``[n, V]`` ``min(c g_v, cap)`` (kept tokens included: the caller overwrites them). ``weights`` None:
    uniform (``g = 1``)."""
    c = scale.to(dtype)[:, None]
    cp = cap.to(dtype)[:, None]
    if weights is None:
        return torch.minimum(c, cp).expand(c.shape[0], vocab_size).clone()
    return torch.minimum(c * weights.to(c.device, dtype)[None, :], cp)
