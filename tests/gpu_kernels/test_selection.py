"""Selection modes beyond top-k (docs/FORMAT.md 5b): topp against a float64 reference, statistical unbiasedness of
the sampled modes (and of the sparse-KL gradient they feed), determinism of the counter-based draws, the store
round trip, and the Triton drawer against the twin in the CPU interpreter.

Statistical bounds, and why. A row's draw counts are Multinomial(S, p) (rows draw from independent streams:
distinct (seed, row id) keys), so the estimate ``c_v / S`` has mean ``p_v`` and variance ``p_v (1 - p_v) / S``;
the mean over ``M`` rows has standard deviation ``sd_v = sqrt(p_v (1 - p_v) / (S M))`` and is close to normal
(``S M >= 6e4`` draws). We require ``|mean - p_v| <= Z * sd_v + 1e-7`` for every token, ``Z = 5``: each
coordinate fails with probability ``5.7e-7``, all ``V <= 64`` together with ``<= 4e-5`` (union bound); the
``1e-7`` covers float32 rounding. The master seeds are fixed, so a pass is reproducible. The pooled counts of
all ``M S`` draws are Multinomial(M S, p): Pearson's statistic over the ``d + 1`` tokens with ``p > 0`` is
approximately chi-square with ``d`` degrees of freedom (mean ``d``, sd ``sqrt(2 d)``); we require it below
``d + 7 sqrt(2 d)`` (beyond the 1e-6 upper quantile for ``d`` in 20..60).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pytest
import torch

from labelstore.codecs import get_codec
from labelstore.errors import InvalidLogitsError
from labelstore.store.reader import LabelStore
from labelstore.store.writer import StoreWriter
from labelstore.student.losses import sparse_kl
from labelstore.tools.synthetic import zipf_logits
from labelstore_kernels import extract, extract_select_torch, extract_topk_torch
from labelstore_kernels.select_torch import row_keys, uniforms
from tests.store_factory import make_meta

NEG = float("-inf")
Z_BOUND = 5.0
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --------------------------------------------------------------------------------------------- references
def ref_topp(x: torch.Tensor, k: int, p: float, min_k: int, temperature: float = 1.0):
    """float64 truth: order by (logit desc, id asc), smallest prefix with mass >= p clamped to [min_k, k] and to
    the finite entries; tail = sum of the probabilities of every other token. Returns (counts, ids, tail,
    margin), margin = distance of the decisive cumulative mass to p (a row with margin ~1e-9 is ambiguous)."""
    xd = x.double()
    prob = torch.softmax(xd / temperature, -1)
    order = torch.sort(xd, dim=-1, descending=True, stable=True).indices
    ps = prob.gather(1, order)
    cum = torch.cumsum(ps, -1)
    finite = (xd > NEG).sum(-1)
    counts, tails, margins = [], [], []
    for i in range(x.shape[0]):
        hit = (cum[i] >= p).nonzero()
        n = int(hit[0]) + 1 if hit.numel() else x.shape[1] + 1
        c = min(max(min(n, k), min_k), int(finite[i]), k)
        counts.append(c)
        tails.append(float(ps[i, c:].sum()))
        margins.append(float((cum[i, : min(k, x.shape[1])] - p).abs().min()))
    return torch.tensor(counts), order, torch.tensor(tails, dtype=torch.float64), torch.tensor(margins)


def splitmix_uniform(seed: int, row: int, j: int) -> float:
    """The documented generator in plain Python ints (independent of the numpy implementation)."""
    M = 2**64 - 1

    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
        return z ^ (z >> 31)

    G = 0x9E3779B97F4A7C15
    key = mix(mix((seed + G) & M) ^ (row & M))
    return (mix((key + (j + 1) * G) & M) >> 11) * 2.0**-53


def dense_from(ex, V: int, mode: str, k_exact: int = 0, codec: str = "log8") -> torch.Tensor:
    """The reconstruction of docs/FORMAT.md 5b from an extraction, as a dense float64 [N, V]."""
    n, width = ex.ids.shape
    slot = torch.arange(width)[None, :]
    real = slot < ex.counts[:, None].long()
    vals = ex.values.long()
    out = torch.zeros(n, V, dtype=torch.float64)
    t = ex.tail.double()[:, None]
    samp = real & (slot >= k_exact) if mode == "topk+sample" else real
    c = torch.where(samp, vals, 0).double()
    c_sum = c.sum(1, keepdim=True).clamp_min(1)
    scale = 1.0 if mode == "sample" else t
    out.scatter_add_(1, ex.ids.long(), c / c_sum * scale)
    if mode == "topk+sample":
        exact = real & (slot < k_exact)
        lut = torch.from_numpy(get_codec(codec).decode_lut()).double()
        w = torch.where(exact, lut[vals], 0.0)
        out.scatter_add_(1, ex.ids.long(), (1 - t) * w / w.sum(1, keepdim=True).clamp_min(1e-300))
    return out


def teacher_row(V: int, seed: int, n_neg_inf: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(V, generator=g) * 1.5
    x[torch.randperm(V, generator=g)[:n_neg_inf]] = NEG
    return x


# --------------------------------------------------------------------------------------------- topp
@pytest.mark.parametrize("k,p,min_k,T,dtype", [(32, 0.9, 1, 1.0, torch.float32), (64, 0.5, 4, 0.7, torch.bfloat16),
                                               (8, 0.99, 2, 1.3, torch.float32), (300, 0.95, 1, 1.0, torch.float32)])
def test_topp_matches_float64_reference(k, p, min_k, T, dtype):
    x = torch.cat([zipf_logits(48, 1000, mean_entropy=2.0, seed=k), torch.randn(16, 1000) * 2]).to(dtype)
    x[3, 5:] = NEG  # fewer finite entries than min_k / k
    ex = extract(x, {"mode": "topp", "k": k, "p": p, "min_k": min_k}, temperature=T)
    counts, order, tail, margin = ref_topp(x, k, p, min_k, T)
    clear = margin > 1e-6  # rows whose decision is within float32 rounding of p are not comparable
    assert int(clear.sum()) >= x.shape[0] - 1
    assert torch.equal(ex.counts.long()[clear], counts[clear])
    top = extract_topk_torch(x, k, temperature=T)
    assert torch.equal(ex.ids, top.ids) and torch.equal(ex.lse, top.lse)
    for i in range(x.shape[0]):
        c = int(ex.counts[i])
        assert torch.equal(ex.ids[i, :c].long(), order[i, :c])
        assert torch.equal(ex.values[i, :c], top.values[i, :c])  # the kept values are top-k's
        assert bool((ex.values[i, c:] == 255).all())  # log8's zero code past the count
    assert torch.allclose(ex.tail.double()[clear], tail[clear], rtol=2e-5, atol=1e-9)


# (logits, k, p, min_k, expected count, expected tail): equal logits give exactly representable masses.
FOUR = [0.0] * 4 + [NEG] * 12
SIXTEEN = [0.0] * 16
PEAKED = [20.0] + [0.0] * 63
BOUNDARY_CASES = [
    (FOUR, 8, 0.5, 1, 2, 0.5),  # mass exactly p: the prefix reaching it is kept, not one more
    (FOUR, 8, 0.5000001, 1, 3, 0.25),  # just above p: one more
    (FOUR, 8, 0.75, 1, 3, 0.25),
    (FOUR, 8, 1.0, 1, 4, 0.0),  # p = 1: every finite entry (no 1 - sum rounding)
    (FOUR, 8, 0.1, 6, 4, 0.0),  # min_k above the finite entries: the finite entries
    (FOUR, 2, 1.0, 1, 2, 0.5),  # max clamp
    (SIXTEEN, 8, 0.25, 1, 4, 0.75),  # exact boundary where the top-k tail is not zero
    (SIXTEEN, 8, 0.75, 1, 8, 0.5),  # p beyond the top-k's mass: max clamp
    (PEAKED, 16, 0.5, 1, 1, None),  # one dominant token
    (PEAKED, 16, 0.5, 3, 3, None),  # min clamp
]


@pytest.mark.parametrize("row,k,p,min_k,count,tail", BOUNDARY_CASES)
@pytest.mark.parametrize("T", [1.0, 0.5])
def test_topp_boundaries(row, k, p, min_k, count, tail, T):
    x = torch.tensor([row])
    ex = extract(x, {"mode": "topp", "k": k, "p": p, "min_k": min_k}, temperature=T)
    rc, _, rt, _ = ref_topp(x, k, p, min_k, T)
    assert int(ex.counts[0]) == count == int(rc[0])
    want = tail if tail is not None else float(rt[0])
    assert math.isclose(float(ex.tail[0]), want, rel_tol=2e-6, abs_tol=1e-30)
    if tail is None:
        assert float(ex.tail[0]) > 0  # ~63 e^-20 / T: computed from the dropped entries, not 1 - sum


# --------------------------------------------------------------------------------------------- sampling
def test_generator_is_the_documented_splitmix64():
    rows = np.array([0, 1, 77, 2**40 + 3, -5], dtype=np.int64)
    for seed in (0, 12345, 2**63 + 7):
        u = uniforms(row_keys(seed, rows), 4)
        for i, r in enumerate(rows.tolist()):
            for j in range(4):
                assert u[i, j] == splitmix_uniform(seed, r, j)
    assert 0.0 <= u.min() and u.max() < 1.0


def test_uniforms_are_uniform():
    """Kolmogorov-Smirnov on 2^20 draws over consecutive row ids and draw indices: D * sqrt(n) < 1.95 (the 0.1 %
    critical value); and the draws of neighbouring rows are uncorrelated (|r| < 5 / sqrt(n))."""
    u = uniforms(row_keys(3, np.arange(1 << 16)), 16)
    s = np.sort(u.ravel())
    n = s.size
    d = max(np.max(np.arange(1, n + 1) / n - s), np.max(s - np.arange(n) / n))
    assert d * math.sqrt(n) < 1.95
    r = np.corrcoef(u[:-1, 0], u[1:, 0])[0, 1]
    assert abs(r) < 5 / math.sqrt(u.shape[0])


def draw_many(x_row: torch.Tensor, selection: dict, codec: str, n_seeds: int, rows: int, master: int, T=1.0):
    """Extractions of one teacher row repeated ``rows`` times under ``n_seeds`` seeds from a master seed."""
    seeds = np.random.default_rng(master).integers(0, 2**62, size=n_seeds)
    xs = x_row[None].expand(rows, -1).contiguous()
    return [extract(xs, selection, codec=codec, seed=int(s), row_ids=torch.arange(rows) * 31 + 5, temperature=T)
            for s in seeds]


def assert_unbiased(mean: torch.Tensor, p: torch.Tensor, sd: torch.Tensor):
    dev = (mean - p).abs()
    assert bool((dev <= Z_BOUND * sd + 1e-7).all()), f"max z = {float((dev / sd.clamp_min(1e-30)).max()):.2f}"


def assert_chi2(pooled: torch.Tensor, p: torch.Tensor, n: int):
    support = p > 0
    assert float(pooled[~support].sum()) == 0  # zero-probability tokens are never drawn
    e = n * p[support]
    chi2 = float(((pooled[support] - e) ** 2 / e).sum())
    d = int(support.sum()) - 1
    assert chi2 < d + 7 * math.sqrt(2 * d), (chi2, d)


def test_sample_is_unbiased():
    V, S, T = 48, 16, 0.8
    x = teacher_row(V, seed=1, n_neg_inf=6)
    p = torch.softmax(x.double() / T, -1)
    exs = draw_many(x, {"mode": "sample", "k": S, "samples": S}, "count8", n_seeds=25, rows=1000, master=2024, T=T)
    est = torch.cat([dense_from(ex, V, "sample") for ex in exs])
    M = est.shape[0]
    for ex in exs:
        n = ex.counts.long()
        c = ex.values.long()
        assert bool((c.sum(1) == S).all()) and torch.equal(n, (c > 0).sum(1))
        assert torch.equal(ex.tail, torch.zeros_like(ex.tail))
        for i in range(4):  # order: count descending, then the smaller id; distinct ids
            key = [(-int(c[i, j]), int(ex.ids[i, j])) for j in range(int(n[i]))]
            assert key == sorted(set(key))
    assert_unbiased(est.mean(0), p, (p * (1 - p) / (S * M)).sqrt())
    assert_chi2((est * S).sum(0).round(), p, S * M)


def test_topk_sample_tail_part_is_unbiased():
    V, ke, S, T = 64, 5, 8, 1.3
    x = teacher_row(V, seed=3, n_neg_inf=4)
    p = torch.softmax(x.double() / T, -1)
    sel = {"mode": "topk+sample", "k_exact": ke, "samples": S, "k": ke + S}
    exs = draw_many(x, sel, "log8", n_seeds=80, rows=250, master=7, T=T)
    top = torch.sort(x.double(), descending=True, stable=True).indices[:ke]
    t_ref = float(p.sum() - p[top].sum())
    rest = torch.ones(V, dtype=torch.bool)
    rest[top] = False
    for ex in exs:
        assert bool((ex.ids[:, :ke].long() == top).all())
        assert torch.allclose(ex.tail.double(), torch.full_like(ex.tail.double(), t_ref), rtol=2e-6)
        assert bool((ex.values[:, ke:].long().sum(1) == S).all())
        assert not bool(torch.isin(ex.ids[:, ke:][ex.values[:, ke:] > 0], top.int()).any())  # tail draws only
    est = torch.cat([dense_from(ex, V, "topk+sample", ke) for ex in exs])
    M = est.shape[0]
    t = exs[0].tail.double()[0]
    pr = p[rest] / t  # the restricted, renormalised distribution the samples come from
    assert_unbiased(est.mean(0)[rest], p[rest], t * (pr * (1 - pr) / (S * M)).sqrt())
    assert_chi2((est[:, rest] / t * S).sum(0).round(), pr, S * M)
    assert torch.allclose(est.sum(1), torch.ones(M, dtype=torch.float64), atol=1e-6)


def test_sparse_kl_gradient_is_unbiased_with_sampled_targets():
    """E[grad sparse_kl(student; c/S, tail 0)] = grad KL(p || q) = q - p, within Z sd (sd as in the module doc:
    per row the gradient is q - c/S since sum(c/S) + 0 = 1)."""
    V, S, rows = 40, 16, 4000
    x = teacher_row(V, seed=5)
    p = torch.softmax(x.double(), -1)
    ex = extract(x[None].expand(rows, -1).contiguous(), {"mode": "sample", "k": S, "samples": S}, codec="count8",
                 seed=99, row_ids=torch.arange(rows))
    probs = ex.values.float() / S
    mask = torch.arange(S)[None, :] < ex.counts[:, None]
    zs = torch.randn(V, generator=torch.Generator().manual_seed(6))
    student = zs[None].expand(rows, -1).clone().requires_grad_(True)
    sparse_kl(student, ex.ids.long(), probs, torch.zeros(rows), mask, reduction="sum").backward()
    dense = torch.softmax(zs.double(), -1) - p
    assert_unbiased(student.grad.double().mean(0), dense, (p * (1 - p) / (S * rows)).sqrt() + 1e-6)
    # and the mean target equals the teacher (the estimator the gradient is linear in)
    assert_unbiased((dense_from(ex, V, "sample")).mean(0), p, (p * (1 - p) / (S * rows)).sqrt())


# --------------------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("selection,codec", [({"mode": "sample", "k": 32, "samples": 32}, "count8"),
                                             ({"mode": "topk+sample", "k_exact": 4, "samples": 12, "k": 16}, "log8"),
                                             ({"mode": "topk+sample", "k_exact": 0, "samples": 6, "k": 6}, "e4m3")])
def test_draws_depend_on_seed_and_row_id_only(selection, codec):
    x = zipf_logits(40, 3000, mean_entropy=3.0, seed=11)
    rid = torch.arange(40) * 512 + 1000
    full = extract(x, selection, codec=codec, seed=5, row_ids=rid)
    tiny = extract_select_torch(x, selection, codec=codec, seed=5, row_ids=rid, chunk_elems=1)  # one row per chunk
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    shuffled = extract(x[perm], selection, codec=codec, seed=5, row_ids=rid[perm])
    halves = [extract(x[a:b], selection, codec=codec, seed=5, row_ids=rid[a:b]) for a, b in ((0, 13), (13, 40))]
    for part in range(5):
        assert torch.equal(tiny[part], full[part])
        assert torch.equal(shuffled[part], full[part][perm])
        assert torch.equal(torch.cat([h[part] for h in halves]), full[part])
    other_seed = extract(x, selection, codec=codec, seed=6, row_ids=rid)
    other_rows = extract(x, selection, codec=codec, seed=5, row_ids=rid + 1)
    assert not torch.equal(other_seed.ids, full.ids) and not torch.equal(other_rows.ids, full.ids)


@pytest.mark.parametrize("selection,codec", [({"mode": "topp", "k": 8, "p": 0.9, "min_k": 1}, "log8"),
                                             ({"mode": "sample", "k": 8, "samples": 8}, "count8"),
                                             ({"mode": "topk+sample", "k_exact": 2, "samples": 4, "k": 6}, "log8"),
                                             ({"mode": "topk+sample", "k_exact": 0, "samples": 4, "k": 4}, "log8"),
                                             ({"mode": "adaptive", "k": 8, "mean_k": 3}, "log8")])
@pytest.mark.parametrize("bad", ["nan", "inf", "all-inf"])
def test_invalid_rows_raise(selection, codec, bad):
    x = torch.randn(5, 50)
    x[3, 7] = {"nan": float("nan"), "inf": float("inf"), "all-inf": NEG}[bad]
    if bad == "all-inf":
        x[3] = NEG
    with pytest.raises(InvalidLogitsError) as e:
        extract(x, selection, codec=codec)
    assert e.value.rows == [3]


@pytest.mark.parametrize("selection,codec,msg", [
    ({"mode": "sample", "k": 8, "samples": 16}, "count8", "k == samples"),
    ({"mode": "sample", "k": 8, "samples": 8}, "log8", "count8"),
    ({"mode": "sample", "k": 300, "samples": 300}, "count8", "samples"),
    ({"mode": "topk+sample", "k_exact": 4, "samples": 8, "k": 8}, "log8", "k_exact"),
    ({"mode": "topk+sample", "k_exact": 4, "samples": 8, "k": 12}, "fp16", "1-byte"),
    ({"mode": "topp", "k": 8, "p": 0.0, "min_k": 1}, "log8", "p in"),
    ({"mode": "topp", "k": 8, "p": 0.5, "min_k": 9}, "log8", "min_k"),
    ({"mode": "topk", "k": 8}, "count8", "count8"),
    ({"mode": "nucleus", "k": 8}, "log8", "unknown selection mode"),
])
def test_bad_selection_is_rejected(selection, codec, msg):
    with pytest.raises(ValueError, match=msg):
        extract(torch.randn(2, 20), selection, codec=codec)


# --------------------------------------------------------------------------------------------- store round trip
ROUND_TRIP = [({"mode": "topk", "k": 8}, "log8", "packed"),
              ({"mode": "topp", "k": 16, "p": 0.8, "min_k": 2}, "log8", "packed"),
              ({"mode": "topp", "k": 16, "p": 0.8, "min_k": 2}, "fp16", "zstd"),
              ({"mode": "sample", "k": 12, "samples": 12}, "count8", "packed"),
              ({"mode": "sample", "k": 12, "samples": 12}, "count8", "zstd"),
              ({"mode": "topk+sample", "k_exact": 4, "samples": 8, "k": 12}, "log8", "packed"),
              ({"mode": "topk+sample", "k_exact": 4, "samples": 8, "k": 12}, "e4m3", "zstd"),
              ({"mode": "adaptive", "k": 16, "mean_k": 5}, "log8", "packed"),
              ({"mode": "adaptive", "k": 16, "mean_k": 2.5}, "e4m3", "zstd")]


@pytest.mark.parametrize("selection,codec,encoding", ROUND_TRIP)
def test_store_round_trip(tmp_path, selection, codec, encoding):
    V, max_len, lengths = 700, 64, [9, 0, 17, 5]
    x = zipf_logits(sum(lengths), V, mean_entropy=2.5, seed=4)
    x[2, 4:] = NEG  # a position with only k_exact finite tokens: no samples, tail 0
    sids = [3, 4, 8, 9]
    rid = torch.cat([torch.arange(n) + s * max_len for s, n in zip(sids, lengths)])
    ex = extract(x, selection, codec=codec, seed=17, row_ids=rid)
    mode = selection["mode"]
    meta = make_meta(V, k=selection["k"], codec=codec, selection=selection, encoding={"name": encoding})
    if encoding == "zstd":
        meta["encoding"]["level"] = 3
    bpv = get_codec(codec).bytes_per_value
    width = ex.ids.shape[1]
    keep = torch.arange(width)[None, :] < ex.counts[:, None]
    flat_values = []
    with StoreWriter(tmp_path / "s", meta) as w:
        a = 0
        for s, n in zip(sids, lengths):
            o = slice(a, a + n)
            vals = ex.values[o].view(n, width, bpv)[keep[o]].reshape(-1).numpy()
            flat_values.append(vals)
            w.add(s, np.arange(n) % V, ex.counts[o].numpy(), ex.ids[o][keep[o]].numpy(), vals, ex.tail[o].numpy())
            a += n
    if encoding == "packed":  # the value bytes on disk are what extract returned
        shard = next((tmp_path / "s" / "shards").glob("r*.arrow"))
        with pa.OSFile(str(shard), "rb") as f:
            on_disk = pa.ipc.open_file(f).read_all().column("values").to_pylist()
        assert [bytes(b) for b in on_disk] == [v.tobytes() for v in flat_values]
    store = LabelStore(tmp_path / "s")
    want = None if mode in ("topk", "topp", "adaptive") else dense_from(ex, V, mode, selection.get("k_exact", 0), codec)
    a = 0
    for i, n in enumerate(lengths):
        smp = store[i]
        o = slice(a, a + n)
        a += n
        assert torch.equal(smp.counts, ex.counts[o].long())
        kept_probs = torch.where(smp.mask, smp.probs, 0).double()
        got = torch.zeros(n, V, dtype=torch.float64).scatter_add_(1, smp.ids, kept_probs)
        if want is None:  # codec rule: p = (1 - t) w / sum w, stored tail = extracted tail
            w = get_codec(codec).decode(ex.values[o].view(n, width, bpv)).double().reshape(n, width)
            w = torch.where(keep[o], w, 0.0)
            ref = torch.zeros(n, V, dtype=torch.float64).scatter_add_(
                1, ex.ids[o].long(), (1 - ex.tail[o].double())[:, None] * w / w.sum(1, keepdim=True))
            assert torch.equal(smp.tail, ex.tail[o])
        else:
            ref = want[o]
            sampled = ex.counts[o] > (selection.get("k_exact", 0) if mode == "topk+sample" else 0)
            assert torch.equal(smp.tail, torch.where(sampled, 0.0, ex.tail[o]))
        assert torch.allclose(got, ref, rtol=2e-6, atol=1e-7)
        if n:
            assert torch.allclose(got.sum(1) + smp.tail.double(), torch.ones(n, dtype=torch.float64), atol=2e-6)
    if mode == "topk+sample":
        assert int(ex.counts[2]) == 4 and float(ex.tail[2]) == 0.0  # the truncated position drew nothing


# --------------------------------------------------------------------------------------------- Triton interpreter
PARITY_SCRIPT = textwrap.dedent("""
    import torch
    from labelstore.errors import InvalidLogitsError
    from labelstore_kernels import extract
    from labelstore_kernels.select_triton import draw_triton
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 333, generator=g) * 3
    x[1, 9:] = float("-inf")            # fewer finite tokens than k_exact + samples
    x[2] = 0.0                          # all tied
    x[3, :6] = 5.0                      # ties across the k_exact boundary
    x[4, 100] = 60.0                    # tail ~1e-24
    cases = [({"mode": "topp", "k": 16, "p": 0.7, "min_k": 2}, "log8", torch.float32, 1.0),
             ({"mode": "sample", "k": 16, "samples": 16}, "count8", torch.float32, 0.8),
             ({"mode": "sample", "k": 5, "samples": 5}, "count8", torch.bfloat16, 1.0),
             ({"mode": "topk+sample", "k_exact": 4, "samples": 9, "k": 13}, "log8", torch.float32, 1.3),
             ({"mode": "topk+sample", "k_exact": 0, "samples": 3, "k": 3}, "e5m2", torch.bfloat16, 1.0),
             ({"mode": "adaptive", "k": 16, "mean_k": 3}, "log8", torch.float32, 1.0)]  # Triton top-k, torch rest
    for sel, codec, dt, T in cases:
        xi = x.to(dt)
        rid = torch.arange(7) * 1000 + 3
        a = extract(xi, sel, codec=codec, seed=42, row_ids=rid, temperature=T, backend="triton")
        b = extract(xi, sel, codec=codec, seed=42, row_ids=rid, temperature=T, backend="torch")
        for name in ("ids", "values", "counts"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (sel, name)
        assert torch.allclose(a.tail, b.tail, rtol=2e-5, atol=1e-30), sel
        assert torch.allclose(a.lse, b.lse, rtol=2e-6, atol=2e-5), sel
    # tiles: several, with skipped ones, on a wide row
    w = torch.randn(3, 2100, generator=g) * 4
    keys = __import__("numpy").arange(3, dtype="int64") * 977
    from labelstore_kernels.select_torch import draw_torch
    rows = torch.ones(3, dtype=torch.bool)
    da, la = draw_triton(w, keys, rows, 7, 1.0, block=64)
    db, lb = draw_torch(w, keys, rows, 7, 1.0)
    assert torch.equal(da, db) and torch.allclose(la, lb, rtol=1e-12)
    bad = x.clone()
    bad[5, 3] = float("nan")
    try:
        extract(bad, {"mode": "sample", "k": 4, "samples": 4}, codec="count8", backend="triton")
        raise SystemExit("no error for a NaN row")
    except InvalidLogitsError as e:
        assert e.rows == [5]
    print("PARITY OK")
""")


def test_triton_drawer_matches_twin_in_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-c", PARITY_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "PARITY OK" in r.stdout, r.stdout + r.stderr
