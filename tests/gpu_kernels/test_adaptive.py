"""Selection mode ``adaptive`` (docs/FORMAT.md 5b, :mod:`labelstore_kernels.allocate_torch`).

References, each independent of the code under test: the KL curve against KL(teacher || uniform-tail
reconstruction) computed densely in float64 from the full softmax; the allocation against an exhaustive search
over every choice of ``k_i`` on tiny cases; the stored tail against the float64 softmax mass of the non-kept
tokens; the fused head against extraction on the materialised logits (bit-identical logits: an exact head).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from labelstore.codecs import get_codec
from labelstore.selection import SelectionError, check_selection
from labelstore.tools.synthetic import zipf_logits
from labelstore_kernels import LMHead, extract, extract_fused, extract_topk, head_logits
from labelstore_kernels.allocate_torch import allocate, kl_curve, topk_probs

NEG = float("-inf")


def logits_with_edges(n: int, V: int, seed: int) -> torch.Tensor:
    """Zipf-like rows plus the awkward ones: few finite tokens, ties, a near-one-hot row, a flat row."""
    x = zipf_logits(n, V, mean_entropy=2.0, seed=seed)
    x[1, 5:] = NEG  # fewer finite tokens than K
    x[2, :10] = 4.0  # ties at the top
    x[3, 17] = 80.0  # tail ~ 1e-30
    x[4] = 0.0  # uniform: every k costs the same KL (0)
    return x


def dense_kl(x: torch.Tensor, k: int, temperature: float = 1.0) -> torch.Tensor:
    """float64 KL(p || q_k) per row: q_k keeps the top k of the float64 softmax (order: logit desc, id asc) and
    spreads the rest uniformly over the other V - k tokens (docs/FORMAT.md 5)."""
    xd = x.double()
    p = torch.softmax(xd / temperature, -1)
    order = torch.sort(xd, dim=-1, descending=True, stable=True).indices
    V = x.shape[1]
    kept = torch.zeros_like(p, dtype=torch.bool).scatter_(1, order[:, :k], True)
    tail = torch.where(kept, 0.0, p).sum(1, keepdim=True)
    q = torch.where(kept, p, tail / max(V - k, 1))
    return torch.where(p > 0, p * (torch.log(p) - torch.log(q)), 0.0).sum(1)


# --------------------------------------------------------------------------------------------- KL curve
@pytest.mark.parametrize("T", [1.0, 0.7])
def test_kl_curve_matches_dense_float64_reference(T):
    V, K = 400, 12
    x = logits_with_edges(24, V, seed=1)
    ex = extract_topk(x, K, temperature=T)
    D = kl_curve(topk_probs(x, ex, T), ex.tail, V)
    ref_K = dense_kl(x, K, T)
    for k in range(1, K + 1):
        ref = dense_kl(x, k, T) - ref_K
        assert torch.allclose(D[:, k - 1], ref, rtol=1e-5, atol=2e-7), k
    assert (D[:, -1] == 0).all()
    assert torch.allclose(D[4], torch.zeros(K, dtype=torch.float64), atol=1e-7)  # uniform row: nothing to gain
    assert (D[:, :-1] >= D[:, 1:] - 1e-9).all()  # keeping more never costs KL under the uniform rule


def test_topk_probs_are_the_float64_softmax():
    x = logits_with_edges(16, 300, seed=2)
    ex = extract_topk(x, 9)
    ref = torch.softmax(x.double(), -1).gather(1, ex.ids.long())
    assert torch.allclose(topk_probs(x, ex, 1.0), ref, rtol=2e-6, atol=1e-30)


# --------------------------------------------------------------------------------------------- allocation
def brute_force(D: np.ndarray, counts: np.ndarray, budget: int) -> float:
    """The smallest sum of D[i, k_i - 1] over every choice 1 <= k_i <= counts_i with sum k_i <= budget."""
    best = math.inf
    for ks in itertools.product(*[range(1, int(c) + 1) for c in counts]):
        if sum(ks) <= budget:
            best = min(best, sum(D[i, k - 1] for i, k in enumerate(ks)))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_allocation_is_optimal_for_the_budget_it_uses_and_within_budget(seed):
    rng = np.random.default_rng(seed)
    n, K = int(rng.integers(1, 6)), int(rng.integers(1, 6))
    if seed % 2:  # arbitrary (non-convex, non-monotone) curves
        D = rng.exponential(1.0, size=(n, K))
    else:  # decreasing curves ending at 0, like real ones (still not convex)
        D = np.cumsum(rng.exponential(1.0, size=(n, K))[:, ::-1], 1)[:, ::-1]
        D = D - D[:, -1:]
    counts = rng.integers(1, K + 1, size=n)
    mean_k = float(rng.uniform(1, K))
    k = allocate(torch.from_numpy(D), torch.from_numpy(counts), mean_k).numpy()
    budget = math.floor(mean_k * n)
    used = int(k.sum())
    assert used <= budget
    assert ((k >= 1) & (k <= counts)).all()
    got = float(sum(D[i, k[i] - 1] for i in range(n)))
    assert got <= brute_force(D, counts, used) + 1e-12  # optimal among every choice using as many entries
    if seed % 2 == 0:  # strictly decreasing, continuous: only the row at the critical slope stops short of it
        assert used >= min(budget, int(counts.sum())) - (K - 1)


def test_allocation_spends_nearly_the_whole_budget_on_continuous_curves():
    """Generic curves: at the critical slope a single row sits between two hull points, so at most K - 1 unused."""
    x = zipf_logits(300, 2000, mean_entropy=2.5, seed=3)
    ex = extract_topk(x, 32)
    D = kl_curve(topk_probs(x, ex, 1.0), ex.tail, 2000)
    for mean_k in (2, 5.5, 16, 31):
        k = allocate(D, ex.counts, mean_k)
        budget = math.floor(mean_k * 300)
        assert budget - 31 <= int(k.sum()) <= budget, mean_k


def test_groups_have_their_own_budgets_and_negative_groups_none():
    x = zipf_logits(30, 500, seed=5)
    ex = extract_topk(x, 8)
    D = kl_curve(topk_probs(x, ex, 1.0), ex.tail, 500)
    counts = torch.full((30,), 8)
    groups = torch.tensor([7] * 10 + [3] * 12 + [-1] * 8)
    k = allocate(D, counts, 3.5, groups)
    assert int(k[:10].sum()) <= 35 and int(k[10:22].sum()) <= 42
    assert (k[22:] == 1).all()
    alone = [allocate(D[:10], counts[:10], 3.5), allocate(D[10:22], counts[10:22], 3.5)]
    assert torch.equal(k[:22], torch.cat(alone))


# --------------------------------------------------------------------------------------------- extract
def check_against_reference(x, ex, sel, groups, codec="log8"):
    """Every rule of FORMAT.md 5b for adaptive, against the float64 softmax and a plain top-K extraction."""
    K, mean_k = sel["k"], sel["mean_k"]
    top = extract_topk(x, K, codec=codec)
    c = ex.counts.long()
    assert torch.equal(ex.ids, top.ids) and torch.equal(ex.lse, top.lse)
    assert (c >= 1).all() and (c <= top.counts.long()).all()
    assert torch.equal(ex.ids[:, 0].long(), x.argmax(1))  # first entry: the argmax (no ties in the first slot here)
    bpv = get_codec(codec).bytes_per_value
    zero = get_codec(codec).encode(torch.full((1, 1), NEG)).view(-1)
    slot = torch.arange(K)[None, :]
    kept = slot < c[:, None]
    v, vt = ex.values.view(-1, K, bpv), top.values.view(-1, K, bpv)
    assert torch.equal(v[kept], vt[kept])  # kept entries: the codec bytes top-K stores
    assert (v[~kept] == zero).all()  # dropped: the zero code, like topp
    p = torch.softmax(x.double(), -1)
    kept_mass = torch.where(kept, p.gather(1, ex.ids.long()), 0.0).sum(1)
    ref_tail = p.sum(1) - kept_mass  # float64: the mass of every non-kept token
    assert torch.allclose(ex.tail.double(), ref_tail, rtol=1e-5, atol=1e-12)
    for g in torch.unique(groups):
        rows = groups == g
        assert int(c[rows].sum()) <= math.floor(mean_k * int(rows.sum())), int(g)


@pytest.mark.parametrize("mean_k", [1, 2.5, 6, 16])
def test_extract_adaptive_rules(mean_k):
    x = logits_with_edges(60, 700, seed=6)
    x[2, 0] = 4.5  # break the top tie so that the argmax is unique
    groups = torch.tensor([11] * 25 + [2] * 20 + [40] * 15)
    sel = {"mode": "adaptive", "k": 16, "mean_k": mean_k}
    ex = extract(x, sel, groups=groups)
    check_against_reference(x, ex, sel, groups)
    if mean_k == 1:
        assert (ex.counts == 1).all()
    else:
        assert len(set(ex.counts.tolist())) > 1  # variable widths really occur
    assert int(ex.counts[4]) == 1  # the uniform row: one entry costs no more KL than sixteen


def test_adaptive_beats_topk_at_equal_mean_entries():
    x = zipf_logits(512, 4000, mean_entropy=2.5, seed=8)
    V, m = 4000, 8
    ex = extract(x, {"mode": "adaptive", "k": 32, "mean_k": m})
    assert ex.counts.double().mean() <= m
    p = torch.softmax(x.double(), -1)

    def mean_kl(ids, counts, tail):
        kept = torch.arange(ids.shape[1])[None, :] < counts[:, None].long()
        mask = torch.zeros_like(p, dtype=torch.bool).scatter_(1, ids.long(), kept)
        q = torch.where(mask, p, tail.double()[:, None] / (V - counts.double()[:, None]))
        return float((p * (torch.log(p) - torch.log(q))).sum(1).mean())

    top = extract_topk(x, m)
    assert mean_kl(ex.ids, ex.counts, ex.tail) < 0.95 * mean_kl(top.ids, top.counts, top.tail)


def test_same_sample_same_entries_whatever_it_is_batched_with():
    x = zipf_logits(90, 600, mean_entropy=2.0, seed=9)
    groups = torch.tensor([5] * 30 + [1] * 40 + [9] * 20)
    sel = {"mode": "adaptive", "k": 12, "mean_k": 3}
    full = extract(x, sel, groups=groups)
    parts = [slice(0, 30), slice(30, 70), slice(70, 90)]
    for s in parts:  # alone, with the default single group
        alone = extract(x[s], sel)
        for a, b in zip(alone, full):
            assert torch.equal(a, b[s])
    perm = torch.randperm(90, generator=torch.Generator().manual_seed(0))
    shuffled = extract(x[perm], sel, groups=groups[perm])
    for a, b in zip(shuffled, full):
        assert torch.equal(a, b[perm])
    pair = extract(torch.cat([x[70:], x[:30]]), sel, groups=torch.tensor([9] * 20 + [5] * 30))
    assert torch.equal(pair.counts, torch.cat([full.counts[70:], full.counts[:30]]))


@pytest.mark.parametrize("codec", ["log8", "fp16"])
def test_fused_head_equals_extraction_on_the_logits(codec):
    """An exact head (small integers: every product and sum is exact in float32, whatever the matmul's blocking)
    gives bit-identical logits on both paths, so the results must be identical, with samples spanning blocks."""
    g = torch.Generator().manual_seed(10)
    V, D, n = 257, 6, 50
    w = torch.randint(-3, 4, (V, D), generator=g).float()
    h = torch.randint(-2, 3, (n, D), generator=g).float()
    head = LMHead(w, scale=0.5)
    groups = torch.tensor([3] * 13 + [0] * 20 + [8] * 17)
    sel = {"mode": "adaptive", "k": 10, "mean_k": 2.5}
    want = extract(head_logits(h, head), sel, codec=codec, groups=groups)
    seen = []
    got = extract_fused(h, head, sel, codec=codec, groups=groups, block_elems=V * 7, backend="torch",
                        on_block=lambda s0, z, e: seen.append(e.counts.clone()))
    assert len(seen) == 8 and all((c == 10).all() for c in seen[:-1])  # each block: plain top-K
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    check_against_reference(head_logits(h, head), got, sel, groups, codec)


# --------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("selection,codec,key", [
    ({"mode": "adaptive", "k": 8}, "log8", "mean_k"),
    ({"mode": "adaptive", "k": 8, "mean_k": 0.5}, "log8", "mean_k"),
    ({"mode": "adaptive", "k": 8, "mean_k": 9}, "log8", "mean_k"),
    ({"mode": "adaptive", "k": 8, "mean_k": "4"}, "log8", "mean_k"),
    ({"mode": "adaptive", "k": 8, "mean_k": True}, "log8", "mean_k"),
    ({"mode": "adaptive", "k": 8, "mean_k": float("nan")}, "log8", "mean_k"),
    ({"mode": "adaptive", "k": 0, "mean_k": 1}, "log8", "k"),
    ({"mode": "adaptive", "k": 8, "mean_k": 4}, "none", "codec"),
    ({"mode": "adaptive", "k": 8, "mean_k": 4}, "count8", "codec"),
])
def test_bad_adaptive_selection_is_rejected_naming_the_key(selection, codec, key):
    with pytest.raises(SelectionError) as e:
        check_selection(selection, codec, extraction=True)
    assert e.value.key == key and e.value.mode == "adaptive"
    with pytest.raises(ValueError, match=key if key != "codec" else "codec|count8"):
        extract(torch.randn(2, 20), selection, codec=codec)


def test_check_selection_keeps_mean_k_and_bounds_k():
    assert check_selection({"mode": "adaptive", "k": 64, "mean_k": 16, "x": 1}, "log8") == \
        {"mode": "adaptive", "k": 64, "mean_k": 16}
    with pytest.raises(SelectionError, match="k"):
        check_selection({"mode": "adaptive", "k": 5000, "mean_k": 16}, "log8", max_k=4096)


def test_bad_groups_are_refused():
    with pytest.raises(ValueError, match="groups must be 4 integers"):
        extract(torch.randn(4, 30), {"mode": "adaptive", "k": 4, "mean_k": 2}, groups=torch.zeros(3))
    with pytest.raises(ValueError, match="groups must be 4 integers"):
        extract(torch.randn(4, 30), {"mode": "adaptive", "k": 4, "mean_k": 2}, groups=torch.zeros(4))
