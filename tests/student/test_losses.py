"""Distillation losses against dense float64 references written out here, plus the fused op's two backends.

The references never call labelstore code: they build the student's full softmax in float64, the kept-set
indicator with Python loops over the ids, and each divergence from its textbook formula.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from labelstore.errors import ConfigMismatchError
from labelstore.student import losses, targets
from labelstore_kernels.bucket_logprobs_torch import student_bucket_logprobs_torch
from labelstore_kernels.sparse_kl_torch import SparseKLTerm, sparse_kl_torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ------------------------------------------------------------------------------------------ references
def make_batch(B=2, T=5, V=23, K=4, seed=0, full=False, dtype=torch.float64, min_count=0):
    """A loader-shaped batch from a dense random teacher, with holes: variable kept counts (padding id 0),
    positions without a teacher, ignored labels. Also returns the dense teacher distribution."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2.0, -1)
    student = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 1.5).to(dtype)
    if full:
        ids = torch.stack([torch.randperm(V, generator=g) for _ in range(B * T)]).reshape(B, T, V)
        counts = torch.full((B, T), V)
    else:
        ids = teacher.topk(K, -1).indices
        counts = torch.randint(min_count, K + 1, (B, T), generator=g)
        counts[0, 0] = K
    mask = torch.arange(ids.shape[-1]) < counts[..., None]
    ids = torch.where(mask, ids, 0)
    probs = torch.where(mask, teacher.gather(-1, ids), 0.0)
    kept = torch.zeros(B, T, V, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            for k in range(ids.shape[-1]):
                if mask[b, t, k]:
                    kept[b, t, ids[b, t, k]] = True
    tail = (teacher * ~kept).sum(-1)  # exact mass outside the kept set, summed over the non-kept tokens
    position_mask = torch.ones(B, T, dtype=torch.bool)
    position_mask[-1, -1] = False
    if not full:
        position_mask[0, 2] = False
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, -1] = -100
    labels[0, 1] = -100
    batch = dict(
        teacher_ids=ids,
        teacher_probs=probs.float(),
        teacher_tail=tail.float(),
        teacher_mask=mask,
        position_mask=position_mask,
        shift_labels=labels,
    )
    return student, batch, teacher, kept


def ref_buckets(z, batch, kept, temperature=1.0, tail=True):
    """(P, Qs, valid): teacher and student bucket probabilities [N, K+1] in float64, built densely."""
    V = z.shape[-1]
    q = torch.softmax(z.reshape(-1, V).double() / temperature, -1)
    ids = batch["teacher_ids"].reshape(q.shape[0], -1)
    mask = batch["teacher_mask"].reshape(ids.shape)
    p = batch["teacher_probs"].reshape(ids.shape).double() * mask
    t = batch["teacher_tail"].reshape(-1).double()
    if not tail:
        p = p / p.sum(1, keepdim=True)
        t = torch.zeros_like(t)
    q_out = (q * ~kept.reshape(q.shape)).sum(1)
    P = torch.cat([p, t[:, None]], 1)
    Qs = torch.cat([q.gather(1, ids) * mask, q_out[:, None]], 1)
    valid = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return P, Qs, valid


def xlogy_ratio(a, b):
    """a log(a / b) with 0 log 0 = 0."""
    pos = a > 0
    log_ratio = torch.log(torch.where(pos, a, 1.0)) - torch.log(torch.where(pos, b, 1.0))
    return torch.where(pos, a * log_ratio, 0.0)


def reduce_ref(rows, valid, reduction, lead):
    rows = torch.where(valid, rows, 0.0)
    if reduction == "mean":
        return rows.sum() / valid.sum()
    if reduction == "sum":
        return rows.sum()
    return rows.reshape(lead)


def ref_forward_kl(z, batch, kept, temperature=1.0, tail=True, reduction="mean"):
    P, Qs, valid = ref_buckets(z, batch, kept, temperature, tail)
    rows = torch.where(valid, xlogy_ratio(P, Qs), 0.0).sum(1) * temperature**2
    return reduce_ref(rows, batch["position_mask"].reshape(-1), reduction, z.shape[:-1])


def ref_reverse_kl(z, batch, kept, temperature=1.0, tail=True, reduction="mean", eps=1e-8):
    P, Qs, valid = ref_buckets(z, batch, kept, temperature, tail)
    rows = torch.where(valid, xlogy_ratio(Qs, P.clamp(min=eps)), 0.0).sum(1) * temperature**2
    return reduce_ref(rows, batch["position_mask"].reshape(-1), reduction, z.shape[:-1])


def ref_jsd(z, batch, kept, beta, temperature=1.0, tail=True, reduction="mean"):
    P, Qs, valid = ref_buckets(z, batch, kept, temperature, tail)
    M = beta * P + (1 - beta) * Qs
    rows = beta * torch.where(valid, xlogy_ratio(P, M), 0.0).sum(1)
    rows = rows + (1 - beta) * torch.where(valid, xlogy_ratio(Qs, M), 0.0).sum(1)
    return reduce_ref(rows * temperature**2, batch["position_mask"].reshape(-1), reduction, z.shape[:-1])


def ref_ce(z, labels, reduction="mean"):
    logq = torch.log_softmax(z.reshape(-1, z.shape[-1]).double(), -1)
    y = labels.reshape(-1)
    valid = y != -100
    rows = -logq.gather(1, y.clamp(min=0)[:, None])[:, 0]
    return reduce_ref(rows, valid, reduction, z.shape[:-1])


def value_and_grad(fn, z):
    z = z.detach().clone().requires_grad_(True)
    out = fn(z)
    out.sum().backward()
    return out.detach().double(), z.grad.double()


def assert_close_value_and_grad(ours, ref, z, atol=1e-10, rtol=1e-8):
    v1, g1 = value_and_grad(ours, z)
    v2, g2 = value_and_grad(ref, z)
    torch.testing.assert_close(v1, v2, atol=atol, rtol=rtol)
    torch.testing.assert_close(g1, g2, atol=atol, rtol=rtol)


# ------------------------------------------------------------------------------------------ soft labels
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("tail", [True, False])
def test_sparse_kl_matches_dense_reference(temperature, reduction, tail):
    # renormalising (tail=False) needs at least one kept entry at every teacher position
    z, batch, _, kept = make_batch(seed=1, min_count=0 if tail else 1)
    keys = ("teacher_ids", "teacher_probs", "teacher_tail", "teacher_mask", "position_mask")
    args = [batch[k] for k in keys]

    def ours(x):
        return losses.sparse_kl(x, *args, temperature=temperature, tail=tail, reduction=reduction)

    def ref(x):
        return ref_forward_kl(x, batch, kept, temperature, tail, reduction)

    assert_close_value_and_grad(ours, ref, z, atol=1e-6, rtol=1e-5)  # teacher probs are float32


def test_sparse_kl_with_full_support_equals_dense_kl():
    z, batch, teacher, _ = make_batch(V=17, full=True, seed=2)
    batch["teacher_probs"] = teacher.gather(-1, batch["teacher_ids"])  # float64, shuffled order
    batch["teacher_tail"] = torch.zeros(z.shape[:-1], dtype=torch.float64)
    pm = batch["position_mask"]

    def dense(x):
        logq = torch.log_softmax(x / 1.5, -1)
        rows = (teacher * (teacher.log() - logq)).sum(-1) * 1.5**2
        return rows[pm].mean()

    def ours(x):
        return losses.sparse_kl(
            x, batch["teacher_ids"], batch["teacher_probs"], batch["teacher_tail"], None, pm, temperature=1.5
        )

    assert_close_value_and_grad(ours, dense, z)
    # and the library's own dense path agrees with torch's kl_div
    kl = F.kl_div(torch.log_softmax(z / 1.5, -1), teacher, reduction="none").sum(-1)[pm].mean() * 1.5**2
    torch.testing.assert_close(losses.dense_kl(z, teacher.log() * 1.5, pm, temperature=1.5), kl)


def test_sparse_kl_tail_bucket_is_a_lower_bound_of_the_full_kl():
    z, batch, teacher, kept = make_batch(seed=3)
    pm = batch["position_mask"]
    full = (teacher * (teacher.log() - torch.log_softmax(z, -1))).sum(-1)
    keys = ("teacher_ids", "teacher_probs", "teacher_tail", "teacher_mask", "position_mask")
    sparse = losses.sparse_kl(z, *[batch[k] for k in keys], reduction="none")
    assert torch.all(sparse[pm] <= full[pm] + 1e-6)
    assert torch.all(sparse[~pm] == 0)


# ------------------------------------------------------------------------------------ spread tail rules
def ref_spread_target(batch, kept, prior, rule):
    """Dense float64 teacher target [N, V]: kept probabilities plus the tail spread by ``rule``, with the scale
    found by plain bisection per row (no labelstore code). Also returns how many rows hit the cap / fell back."""
    ids = batch["teacher_ids"].reshape(-1, batch["teacher_ids"].shape[-1])
    mask = batch["teacher_mask"].reshape(ids.shape)
    probs = batch["teacher_probs"].reshape(ids.shape).double()
    tail = batch["teacher_tail"].reshape(-1).double()
    kept = kept.reshape(ids.shape[0], -1)
    N, V = kept.shape
    target = torch.zeros(N, V, dtype=torch.float64)
    capped = fallback = 0
    for r in range(N):
        off = ~kept[r]
        g = torch.ones(V, dtype=torch.float64) if rule == "uniform" else prior.double().clone()
        g = torch.where(off, g, 0.0)
        cap = probs[r][mask[r]].min().item() if (rule == "prior" and mask[r].any()) else float("inf")
        t = tail[r].item()
        if t > cap * off.sum().item():  # cannot hold the tail under the cap: no cap
            cap, fallback = float("inf"), fallback + 1
        lo, hi = 0.0, t / g[off].min().item() + 1.0
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if torch.minimum(mid * g, torch.tensor(cap)).sum() < t else (lo, mid)
        row = torch.minimum(hi * g, torch.tensor(cap))
        capped += int(bool((row >= cap * (1 - 1e-12)).any()))
        for k in range(ids.shape[1]):
            if mask[r, k]:
                row[ids[r, k]] = probs[r, k]
        target[r] = row
    return target, capped, fallback


@pytest.mark.parametrize("rule", ["prior", "uniform"])
@pytest.mark.parametrize("temperature,reduction", [(1.0, "mean"), (2.0, "none"), (0.7, "sum")])
def test_spread_tail_matches_dense_reference(rule, temperature, reduction):
    z, batch, _, kept = make_batch(B=3, T=6, V=23, K=4, seed=21)
    # one position whose tail does not fit under its cap (0.39 > 21 x 0.01): the rule drops the cap there
    ids = batch["teacher_ids"][1, 3] = torch.tensor([5, 7, 0, 0])
    batch["teacher_probs"][1, 3] = torch.tensor([0.6, 0.01, 0.0, 0.0])
    batch["teacher_mask"][1, 3] = torch.tensor([True, True, False, False])
    batch["teacher_tail"][1, 3] = 0.39
    kept[1, 3] = False
    kept[1, 3, ids[:2]] = True
    prior = torch.rand(23, generator=torch.Generator().manual_seed(5), dtype=torch.float64) ** 4 + 0.01
    target, capped, fallback = ref_spread_target(batch, kept, prior, rule)
    if rule == "prior":  # the case covers both branches of the water-filling
        assert capped > 0 and fallback > 0
    pm = batch["position_mask"]
    keys = ("teacher_ids", "teacher_probs", "teacher_tail", "teacher_mask", "position_mask")

    def ours(x):
        return losses.sparse_kl(x, *[batch[k] for k in keys], temperature=temperature, tail=rule,
                                prior=prior if rule == "prior" else None, reduction=reduction)

    def ref(x):
        logq = torch.log_softmax(x.reshape(target.shape) / temperature, -1)
        rows = (torch.xlogy(target, target) - target * logq).sum(-1) * temperature**2
        return reduce_ref(rows, pm.reshape(-1), reduction, x.shape[:-1])

    assert_close_value_and_grad(ours, ref, z, atol=1e-9, rtol=1e-8)
    # the dense targets follow the same rule
    dense = targets.to_dense(batch["teacher_ids"], batch["teacher_probs"], batch["teacher_tail"],
                             batch["teacher_mask"], 23, prior=prior if rule == "prior" else None)
    rows = pm.reshape(-1) & (batch["teacher_mask"].reshape(-1, 4).any(-1) | (rule == "prior"))
    torch.testing.assert_close(dense.reshape(-1, 23)[rows].double(), target[rows], atol=2e-7, rtol=1e-5)


def test_spread_tail_gradcheck_and_prior_default():
    z, batch, _, kept = make_batch(B=1, T=4, V=9, K=3, seed=22)
    prior = torch.rand(9, generator=torch.Generator().manual_seed(6), dtype=torch.float64) + 0.05
    keys = ("teacher_ids", "teacher_probs", "teacher_tail", "teacher_mask", "position_mask")
    args = [batch[k] for k in keys]
    x = z.clone().requires_grad_(True)
    for rule in ("prior", "uniform"):
        assert torch.autograd.gradcheck(lambda v, r=rule: losses.sparse_kl(v, *args, tail=r, prior=prior,
                                                                            temperature=1.3), (x,))
    # defaults: a prior given (or carried by the batch) means the prior rule; without one, the bucket
    with_prior = losses.sparse_kl(z, *args, tail="prior", prior=prior)
    assert losses.sparse_kl(z, *args, prior=prior) == with_prior
    assert losses.distillation_loss(z, {**batch, "teacher_prior": prior.float()}) == pytest.approx(
        with_prior.item(), rel=1e-6)
    bucket = losses.sparse_kl(z, *args, tail="bucket")
    assert losses.distillation_loss(z, batch) == bucket == losses.sparse_kl(z, *args, tail=True)
    assert losses.distillation_loss(z, batch, tail="none") == losses.sparse_kl(z, *args, tail=False)
    assert with_prior != bucket
    # reverse KL / JSD have only the bucket forms; a prior in the batch does not change their default
    assert losses.distillation_loss(z, {**batch, "teacher_prior": prior}, method="reverse_kl") == \
        losses.reverse_kl(z, *args)
    with pytest.raises(ValueError, match="forward KL"):
        losses.reverse_kl(z, *args, tail="prior")
    with pytest.raises(ValueError, match="needs the tail prior"):
        losses.sparse_kl(z, *args, tail="prior")
    with pytest.raises(ValueError, match="tail must be one of"):
        losses.sparse_kl(z, *args, tail="gaussian")
    with pytest.raises(ConfigMismatchError, match="> 0 everywhere"):
        losses.sparse_kl(z, *args, prior=torch.zeros(9))
    with pytest.raises(ConfigMismatchError, match="9 entries"):
        losses.sparse_kl(z, *args, prior=torch.ones(10))


def test_water_fill_scale_matches_the_sorting_reference():
    from labelstore.reconstruction import kept_cap, prepare_prior, spread_fill, spread_tail, water_fill_scale

    g = torch.Generator().manual_seed(7)
    for trial in range(40):
        V, K, N = int(torch.randint(8, 60, (1,), generator=g)), 6, 8
        prior = (torch.rand(V, generator=g, dtype=torch.float64) ** 3 + 1e-3).float().double()
        if trial % 3 == 0:
            prior[:5] = 0.5  # ties
        teacher = torch.softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * 2, -1)
        ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(N)])
        mask = torch.rand(N, K, generator=g) > 0.3
        mask[1] = False  # nothing kept: no cap
        probs = torch.where(mask, teacher.gather(1, ids), 0.0)
        tail = torch.rand(N, generator=g, dtype=torch.float64) * (0.9 if trial % 2 else 0.05)
        tail[2] = 0.0
        cap = kept_cap(probs, mask)
        pp = prepare_prior(prior, V)
        fill = spread_fill(*water_fill_scale(tail, ids, mask, cap, pp, V), pp.weights, V)
        w = prior[None].expand(N, V).clone()
        rows, cols = mask.nonzero(as_tuple=True)
        w[rows, ids[rows, cols]] = 0
        fill[rows, ids[rows, cols]] = 0
        torch.testing.assert_close(fill, spread_tail(tail, w, cap), atol=1e-13, rtol=1e-12)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("tail", [True, False])
def test_jsd_and_reverse_kl_match_bucket_references(beta, tail):
    z, batch, _, kept = make_batch(seed=4, min_count=1)
    keys = ("teacher_ids", "teacher_probs", "teacher_tail", "teacher_mask", "position_mask")
    args = [batch[k] for k in keys]
    assert_close_value_and_grad(
        lambda x: losses.generalized_jsd(x, *args, beta=beta, temperature=2.0, tail=tail),
        lambda x: ref_jsd(x, batch, kept, beta, 2.0, tail),
        z,
    )
    assert_close_value_and_grad(
        lambda x: losses.reverse_kl(x, *args, temperature=0.7, tail=tail, reduction="sum"),
        lambda x: ref_reverse_kl(x, batch, kept, 0.7, tail, "sum"),
        z,
    )


def test_reverse_kl_and_jsd_with_full_support_equal_dense_formulas():
    z, batch, teacher, _ = make_batch(V=13, full=True, seed=5)
    batch["teacher_probs"] = teacher.gather(-1, batch["teacher_ids"])
    batch["teacher_tail"] = torch.zeros(z.shape[:-1], dtype=torch.float64)
    pm = batch["position_mask"]
    args = (batch["teacher_ids"], batch["teacher_probs"], batch["teacher_tail"], None, pm)

    def dense_rkl(x):
        q = torch.softmax(x, -1)
        return (q * (q.log() - teacher.log())).sum(-1)[pm].mean()

    def dense_jsd(x, beta=0.3):  # TRL GKD: beta KL(teacher || m) + (1 - beta) KL(student || m)
        q = torch.softmax(x, -1)
        m = beta * teacher + (1 - beta) * q
        rows = beta * (teacher * (teacher / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
        return rows[pm].mean()

    assert_close_value_and_grad(lambda x: losses.reverse_kl(x, *args), dense_rkl, z)
    assert_close_value_and_grad(lambda x: losses.generalized_jsd(x, *args, beta=0.3), dense_jsd, z)


def test_jsd_endpoints_are_forward_and_reverse_kl():
    z, batch, _, _ = make_batch(seed=6)
    keys = ("teacher_ids", "teacher_probs", "teacher_tail", "teacher_mask", "position_mask")
    args = [batch[k] for k in keys]
    torch.testing.assert_close(losses.generalized_jsd(z, *args, beta=0.0), losses.sparse_kl(z, *args))
    torch.testing.assert_close(losses.generalized_jsd(z, *args, beta=1.0), losses.reverse_kl(z, *args))
    with pytest.raises(ValueError, match="beta"):
        losses.generalized_jsd(z, *args, beta=1.5)


@pytest.mark.parametrize("hi, lo", [(8.0, -20.0), (50.0, -60.0)])
def test_log_q_stays_exact_when_the_kept_mass_is_nearly_one(hi, lo):
    # The student puts all but e^-(hi - lo) of its mass on the kept ids: 1 - sum(kept q) cancels to 0 in fp32,
    # and at e^-110 Q itself is below the smallest fp32 number; log Q must still be exact.
    V, K = 64, 4
    z = torch.full((1, V), lo)
    z[0, :K] = hi
    ids = torch.arange(K)[None]
    probs = torch.full((1, K), 0.2)
    tail = torch.tensor([0.2])
    ours = losses.sparse_kl(z, ids, probs, tail, backend="torch")
    zz = z.double()
    log_q = zz - torch.logsumexp(zz, -1, keepdim=True)
    log_q_out = torch.logsumexp(zz[:, K:], -1) - torch.logsumexp(zz, -1)
    ref = (0.2 * (torch.log(torch.tensor(0.2, dtype=torch.float64)) - log_q[0, :K])).sum()
    ref = ref + 0.2 * (torch.log(torch.tensor(0.2, dtype=torch.float64)) - log_q_out[0])
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=0)
    z.requires_grad_(True)
    losses.sparse_kl(z, ids, probs, tail, backend="torch").backward()
    assert torch.isfinite(z.grad).all()
    # off the kept set the gradient is q_v (1 - t / Q): here -t / (V - K) per token, to first order
    torch.testing.assert_close(z.grad[0, K:], torch.full((V - K,), -0.2 / (V - K)), rtol=1e-4, atol=0)


# ----------------------------------------------------------------------------------- hard labels, mixing
def test_hard_label_ce_uses_the_teacher_top_id_and_skips_masked_positions():
    z, batch, _, _ = make_batch(seed=7)
    top = batch["teacher_ids"][..., 0]
    valid = batch["position_mask"] & batch["teacher_mask"][..., 0]
    ref_labels = torch.where(valid, top, -100)

    def ref(x):
        return F.cross_entropy(x.reshape(-1, x.shape[-1]), ref_labels.reshape(-1), ignore_index=-100)

    assert_close_value_and_grad(
        lambda x: losses.hard_label_ce(
            x, batch["teacher_ids"], batch["teacher_mask"], batch["position_mask"]
        ),
        ref,
        z,
    )
    # a hard-label store: K = 1, no values
    hard = dict(teacher_ids=top[..., None], position_mask=batch["position_mask"])
    assert_close_value_and_grad(
        lambda x: losses.distillation_loss(x, hard, method="hard"),
        lambda x: F.cross_entropy(
            x.reshape(-1, x.shape[-1]),
            torch.where(batch["position_mask"], top, -100).reshape(-1),
            ignore_index=-100,
        ),
        z,
    )


@pytest.mark.parametrize("method", ["forward_kl", "reverse_kl", "jsd", "hard"])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_distillation_loss_mixes_with_label_ce(method, alpha):
    z, batch, _, kept = make_batch(seed=8)
    temperature = 2.0

    def ref(x):
        if method == "forward_kl":
            d = ref_forward_kl(x, batch, kept, temperature)
        elif method == "reverse_kl":
            d = ref_reverse_kl(x, batch, kept, temperature)
        elif method == "jsd":
            d = ref_jsd(x, batch, kept, 0.5, temperature)
        else:
            valid = batch["position_mask"] & batch["teacher_mask"][..., 0]
            d = ref_ce(x, torch.where(valid, batch["teacher_ids"][..., 0], -100))
        return alpha * d + (1 - alpha) * ref_ce(x, batch["shift_labels"])

    def ours(x):
        return losses.distillation_loss(x, batch, method=method, alpha=alpha, temperature=temperature)

    assert_close_value_and_grad(ours, ref, z, atol=1e-6, rtol=1e-5)
    parts = losses.distillation_loss(
        z, batch, method=method, alpha=alpha, temperature=temperature, return_components=True
    )
    if alpha < 1:
        torch.testing.assert_close(parts.ce.double(), ref_ce(z, batch["shift_labels"]))
    else:
        assert parts.ce is None
    if alpha > 0:
        ce = parts.ce if alpha < 1 else 0.0
        torch.testing.assert_close(parts.loss, alpha * parts.distill + (1 - alpha) * ce)


def test_masked_positions_get_no_loss_and_no_gradient():
    z, batch, _, _ = make_batch(seed=9)
    pm, labels = batch["position_mask"], batch["shift_labels"]
    dead = ~pm & (labels == -100)
    assert dead.any()
    z_a = z.clone().requires_grad_(True)
    loss_a = losses.distillation_loss(z_a, batch, alpha=0.5, temperature=2.0)
    loss_a.backward()
    assert torch.all(z_a.grad[dead] == 0)
    z_b = z.clone()
    z_b[dead] = 1e4 * torch.randn_like(z_b[dead])  # garbage on padding must not matter
    loss_b = losses.distillation_loss(z_b, batch, alpha=0.5, temperature=2.0)
    torch.testing.assert_close(loss_b, loss_a.detach())
    none = losses.distillation_loss(z, batch, alpha=0.5, reduction="none")
    assert none.shape == z.shape[:-1] and torch.all(none[dead] == 0)
    # padding entries (id 0, mask False) do not act as a kept token 0
    one = batch["teacher_mask"].clone()
    row = torch.nonzero(~one[..., -1] & pm)[0]
    b, t = row.tolist()
    assert batch["teacher_ids"][b, t, -1] == 0
    poisoned = dict(batch, teacher_probs=batch["teacher_probs"].clone())
    poisoned["teacher_probs"][b, t, -1] = 0.9  # value under a masked entry: ignored
    torch.testing.assert_close(losses.distillation_loss(z, poisoned), losses.distillation_loss(z, batch))


@pytest.mark.parametrize("fn", [losses.sparse_kl, losses.reverse_kl, losses.generalized_jsd])
def test_padding_id_zero_beside_a_real_token_zero(fn):
    # row 0 really keeps token 0 and pads with id 0 (before and after it); row 1 keeps nothing at all
    z = torch.randn(2, 9, dtype=torch.float64)
    padded_ids = torch.tensor([[0, 0, 5, 0], [0, 0, 0, 0]])
    padded_mask = torch.tensor([[False, True, True, False], [False, False, False, False]])
    padded_probs = torch.tensor([[0.7, 0.3, 0.2, 0.9], [0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
    tail = torch.tensor([0.5, 1.0], dtype=torch.float64)
    ids = torch.tensor([[0, 5], [0, 0]])
    mask = torch.tensor([[True, True], [False, False]])
    probs = torch.tensor([[0.3, 0.2], [0.0, 0.0]], dtype=torch.float64)
    assert_close_value_and_grad(
        lambda x: fn(x, padded_ids, padded_probs, tail, padded_mask, reduction="none"),
        lambda x: fn(x, ids, probs, tail, mask, reduction="none"),
        z,
    )
    v, g = value_and_grad(lambda x: fn(x, padded_ids, padded_probs, tail, padded_mask, reduction="none"), z)
    assert abs(v[1].item()) < 1e-12 and torch.all(g[1].abs() < 1e-12)  # teacher = student = one bucket
    # and the 2-entry row equals its dense bucket reference
    q = torch.softmax(z[0], -1)
    P = torch.tensor([0.3, 0.2, 0.5], dtype=torch.float64)
    Qs = torch.stack([q[0], q[5], 1 - q[0] - q[5]])
    if fn is losses.sparse_kl:
        torch.testing.assert_close(v[0], (P * (P / Qs).log()).sum())


def test_all_positions_masked_gives_zero_not_nan():
    z, batch, _, _ = make_batch(seed=10)
    batch["position_mask"][:] = False
    batch["shift_labels"][:] = -100
    z.requires_grad_(True)
    loss = losses.distillation_loss(z, batch, alpha=0.5)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(z.grad == 0)


# ------------------------------------------------------------------------------------------- the fused op
def _random_terms(N, V, K, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * 2, -1)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(N)])
    mask = torch.rand(N, K, generator=g) > 0.25
    ids = torch.where(mask, ids, 0)
    probs = torch.where(mask, teacher.gather(1, ids), 0.0)
    tail = (1 - probs.sum(1)).clamp(min=0)
    tail[0] = 0.0  # a row whose kept set carries everything
    weight = torch.rand(N, generator=g, dtype=torch.float64)
    weight[1] = 0.0
    labels = torch.randint(0, V, (N, 1), generator=g)
    kl = SparseKLTerm(ids, probs.to(dtype), tail.to(dtype), mask, weight.to(dtype), 1.7)
    ce = SparseKLTerm(labels, torch.ones(N, 1, dtype=dtype), None, None, (weight * 0.5).to(dtype), 1.0)
    return kl, ce


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_gradcheck_twin(reduction):
    kl, ce = _random_terms(6, 11, 4)
    z = torch.randn(6, 11, dtype=torch.float64, requires_grad=True)

    def f(x):
        return sparse_kl_torch(x, [kl, ce], reduction=reduction, chunk_rows=4)[0]

    assert torch.autograd.gradcheck(f, (z,))


def test_gradcheck_bucket_logprobs():
    kl, _ = _random_terms(5, 9, 3, seed=1)
    z = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: student_bucket_logprobs_torch(x, kl.ids, kl.mask, 1.3, chunk_rows=2), (z,)
    )


def test_gradcheck_reverse_kl_and_jsd():
    z, batch, _, _ = make_batch(B=1, T=3, V=7, K=3, seed=11)
    keys = ("teacher_ids", "teacher_probs", "teacher_tail", "teacher_mask", "position_mask")
    args = [batch[k] for k in keys]
    x = z.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: losses.reverse_kl(v, *args, temperature=1.3), (x,))
    assert torch.autograd.gradcheck(lambda v: losses.generalized_jsd(v, *args, beta=0.4), (x,))


def test_twin_chunking_inplace_and_low_precision_agree():
    kl, ce = _random_terms(9, 31, 5, dtype=torch.float32, seed=2)
    z = torch.randn(9, 31)
    ref_val, ref_grad = value_and_grad(lambda x: sparse_kl_torch(x, [kl, ce], chunk_rows=100)[0], z)
    for chunk in (1, 4):
        v, g = value_and_grad(lambda x, c=chunk: sparse_kl_torch(x, [kl, ce], chunk_rows=c)[0], z)
        torch.testing.assert_close(v, ref_val)
        torch.testing.assert_close(g, ref_grad)
    # inplace: the logits buffer becomes the gradient (single term only)
    _, g1 = value_and_grad(lambda x: sparse_kl_torch(x, [kl])[0], z)
    buf = z.clone().requires_grad_(True)
    work = buf * 1.0  # a non-leaf the op may overwrite
    sparse_kl_torch(work, [kl], inplace=True)[0].backward()
    torch.testing.assert_close(buf.grad.double(), g1)
    torch.testing.assert_close(work.detach().double(), g1)
    with pytest.raises(ValueError, match="exactly one term"):
        sparse_kl_torch(z.clone(), [kl, ce], inplace=True)
    # bf16 logits: fp32 math inside, gradient in bf16
    vb, gb = value_and_grad(lambda x: sparse_kl_torch(x, [kl, ce])[0], z.bfloat16())
    torch.testing.assert_close(vb, ref_val, atol=0.05, rtol=0.02)
    torch.testing.assert_close(gb, ref_grad, atol=0.02, rtol=0.02)


_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import json, os
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    from labelstore.errors import ConfigMismatchError
    from labelstore.reconstruction import kept_cap, prepare_prior, water_fill_scale
    from labelstore_kernels.sparse_kl_torch import SparseKLTerm, TailSpread, sparse_kl_torch
    from labelstore_kernels.sparse_kl_triton import sparse_kl_triton

    def spread(term, V, rule, seed):
        mask = term.mask
        prior = torch.rand(V, generator=torch.Generator().manual_seed(seed)) ** 3 + 0.01
        pp = prepare_prior(prior, V) if rule == "prior" else None
        cap = kept_cap(term.probs, mask) if pp is not None else torch.full_like(term.tail, float("inf"))
        c, cap = water_fill_scale(term.tail, term.ids, mask, cap, pp, V)
        return term._replace(spread=TailSpread(c, cap, None if pp is None else pp.weights))

    def terms(N, V, K, seed, tail_zero=False, full=False):
        g = torch.Generator().manual_seed(seed)
        teacher = torch.softmax(torch.randn(N, V, generator=g) * 2, -1)
        K = V if full else K
        perms = [torch.randperm(V, generator=g) for _ in range(N)]
        perms[0] = torch.cat([perms[0][perms[0] == 0], perms[0][perms[0] != 0]])  # row 0 really keeps token 0
        ids = torch.stack([perm[:K] for perm in perms])
        mask = torch.ones(N, K, dtype=torch.bool) if full else torch.rand(N, K, generator=g) > 0.3
        mask[0, :] = True
        ids = torch.where(mask, ids, 0)  # other rows pad with id 0
        probs = torch.where(mask, teacher.gather(1, ids), 0.0)
        tail = torch.zeros(N) if (tail_zero or full) else (1 - probs.sum(1)).clamp(min=0)
        w = torch.rand(N, generator=g) + 0.1
        w[N // 2] = 0.0
        labels = torch.randint(0, V, (N, 1), generator=g)
        return (SparseKLTerm(ids, probs, tail, mask, w, 1.7),
                SparseKLTerm(labels, torch.ones(N, 1), None, None, w * 0.3, 1.0))

    def run(fn, z, ts, reduction, **kw):
        x = z.clone().requires_grad_(True)
        out, parts = fn(x, ts, reduction=reduction, **kw)
        out.sum().backward()
        return out.detach(), parts, x.grad

    cases = {
        "one_tile": dict(N=5, V=37, K=5, block_v=None, reduction="sum"),
        "multi_tile": dict(N=6, V=50, K=5, block_v=16, reduction="none"),
        "k_not_pow2_two_terms": dict(N=4, V=70, K=7, block_v=32, reduction="sum", two=True),
        "no_tail": dict(N=4, V=40, K=3, block_v=16, reduction="sum", tail_zero=True),
        "full_support": dict(N=3, V=24, K=24, block_v=8, reduction="sum", full=True),
        "inplace": dict(N=4, V=33, K=4, block_v=16, reduction="sum", inplace=True),
        "extreme_range": dict(N=3, V=40, K=4, block_v=16, reduction="none", extreme=True),
        "prior_tail": dict(N=6, V=50, K=5, block_v=16, reduction="none", spread="prior", offset=40.0),
        "prior_tail_two_terms": dict(N=4, V=70, K=7, block_v=32, reduction="sum", two=True, spread="prior"),
        "uniform_tail": dict(N=5, V=37, K=5, block_v=None, reduction="sum", spread="uniform"),
        "prior_tail_inplace": dict(N=4, V=33, K=4, block_v=16, reduction="sum", inplace=True, spread="prior"),
    }
    report = {}
    torch.manual_seed(1234)
    for name, c in cases.items():
        kl, ce = terms(c["N"], c["V"], c["K"], seed=len(report), tail_zero=c.get("tail_zero", False),
                       full=c.get("full", False))
        if c.get("spread"):
            kl = spread(kl, c["V"], c["spread"], seed=len(report))
        ts = [kl, ce] if c.get("two") else [kl]
        z = torch.randn(c["N"], c["V"]) * 3 + c.get("offset", 0.0)
        if not (c.get("spread") and c["reduction"] == "sum"):  # (a spread tail on it makes the sum infinite)
            z[1, 3] = float("-inf")  # a masked-out vocabulary entry
        if c.get("extreme"):  # kept logits 110 nats above the rest: Q underflows fp32, log Q must not
            z = torch.full((c["N"], c["V"]), -60.0) + torch.rand(c["N"], c["V"])
            z.scatter_(1, torch.where(kl.mask, kl.ids, 0), 50.0)
        if c.get("inplace"):  # the gradient overwrites the (non-leaf) logits buffer
            out = []
            for fn in (sparse_kl_triton, sparse_kl_torch):
                leaf = z.clone().requires_grad_(True)
                work = leaf * 1.0
                loss, _ = fn(work, ts, inplace=True)
                loss.backward()
                out.append((loss.detach(), work.detach(), leaf.grad))
            (la, a, ga), (lb, b, gb) = out
            same = bool(torch.equal(a, ga) and torch.equal(b, gb))
            report[name] = dict(value=(la - lb).abs().max().item(), grad=(a - b).abs().max().item(),
                                scale=b.abs().max().item(), vscale=lb.abs().max().item(), same=same)
            continue
        va, pa, ga = run(sparse_kl_triton, z, ts, c["reduction"], block_v=c["block_v"])
        vb, pb, gb = run(sparse_kl_torch, z, ts, c["reduction"])
        if c.get("spread"):  # tail mass on the -inf logit: an infinite loss on that row, in both
            fin = torch.isfinite(vb)
            assert bool((va[~fin] == vb[~fin]).all()) and bool(fin.any()), (va, vb)
            va, vb = va[fin], vb[fin]
            pa, pb = pa[..., fin] if pa.dim() > 1 else pa, pb[..., fin] if pb.dim() > 1 else pb
        report[name] = dict(value=(va - vb).abs().max().item(), parts=(pa - pb).abs().max().item(),
                            grad=(ga - gb).abs().max().item(), scale=gb.abs().max().item(),
                            vscale=vb.abs().max().item(), zscale=z[torch.isfinite(z)].abs().max().item(),
                            finite=bool(torch.isfinite(va).all() and torch.isfinite(ga).all()))
    # guard: an id outside [0, V) is refused like the twin refuses it (a masked padding id is not checked)
    bad = kl._replace(ids=torch.where(kl.mask, kl.ids, 10**6))
    bad.ids[0, 0] = c["V"]
    errors = []
    for fn in (sparse_kl_triton, sparse_kl_torch):
        try:
            fn(torch.randn(c["N"], c["V"]), [bad])
            errors.append(None)
        except ConfigMismatchError as e:
            errors.append(str(e))
    report["id_guard"] = dict(errors=errors, padding_ok=bool(torch.isfinite(
        sparse_kl_triton(torch.randn(c["N"], c["V"]), [kl._replace(ids=torch.where(kl.mask, kl.ids, 10**6))])[0])))
    print("REPORT" + json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def interpreter_report():
    """The Triton kernel run by the interpreter on CPU tensors, compared with the twin, in a fresh process
    (TRITON_INTERPRET must be set before triton is first imported)."""
    path = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    cmd = [sys.executable, "-c", _INTERPRETER_SCRIPT]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("REPORT"))
    return json.loads(line[len("REPORT") :])


@pytest.mark.parametrize(
    "case",
    ["one_tile", "multi_tile", "k_not_pow2_two_terms", "no_tail", "full_support", "inplace", "extreme_range",
     "prior_tail", "prior_tail_two_terms", "uniform_tail", "prior_tail_inplace"],
)
def test_triton_kernel_matches_twin_in_interpreter(interpreter_report, case):
    r = interpreter_report[case]
    # float32 sums in a different order: a few ulps of the loss's magnitude
    assert r["value"] < 1e-6 * max(10.0, r["vscale"]), r
    # exp(z - lse) in fp32 carries an absolute error ~ |z| ulp: large logits (prior_tail: +40) scale the bound
    assert r["grad"] < 1e-6 * max(1.0, r["scale"]) * max(1.0, r.get("zscale", 0.0) / 10) + 1e-7, r
    assert r.get("parts", 0.0) < 1e-6 * max(10.0, r["vscale"]), r
    assert r.get("finite", True), r
    assert r.get("same", True), r


def test_triton_kernel_refuses_ids_outside_the_vocabulary(interpreter_report):
    r = interpreter_report["id_guard"]
    assert all(e is not None and "outside the student's vocabulary" in e for e in r["errors"]), r
    assert r["padding_ok"], r


def test_fused_op_guards_backward_and_inplace():
    kl, ce = _random_terms(6, 11, 4, seed=4)
    z = torch.randn(6, 11, dtype=torch.float64)
    # ids outside [0, V) on real entries are refused (a masked entry may hold anything)
    bad = kl._replace(ids=kl.ids.clone())
    bad.ids[0, 0] = 11
    with pytest.raises(ConfigMismatchError, match="outside the student's vocabulary"):
        sparse_kl_torch(z, [bad])
    bad.ids[0, 0] = -1
    with pytest.raises(ConfigMismatchError):
        sparse_kl_torch(z, [bad])
    # once-differentiable: a second-order gradient refuses instead of returning a wrong (zero) one
    x = z.clone().requires_grad_(True)
    v = torch.ones((), dtype=torch.float64, requires_grad=True)  # (Hessian-vector products look like this)
    (gx,) = torch.autograd.grad(sparse_kl_torch(x, [kl])[0], x, grad_outputs=v, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        gx.sum().backward()
    # the upstream gradient scales the saved one (no special case for 1), also on a retained second pass
    _, g1 = value_and_grad(lambda v: sparse_kl_torch(v, [kl, ce])[0], z)
    x = z.clone().requires_grad_(True)
    loss = sparse_kl_torch(x, [kl, ce])[0]
    (2.5 * loss).backward(retain_graph=True)
    torch.testing.assert_close(x.grad, 2.5 * g1)
    x.grad = None
    (-0.5 * loss).backward()
    torch.testing.assert_close(x.grad, -0.5 * g1)
    # inplace marks the logits dirty: a leaf that requires grad is refused, and so is an op that saved them
    with pytest.raises(RuntimeError, match="leaf"):
        sparse_kl_torch(z.clone().requires_grad_(True), [kl], inplace=True)
    leaf = z.clone().requires_grad_(True)
    work = leaf * 1.0
    other = work.sin()  # saves work for its backward
    loss = sparse_kl_torch(work, [kl], inplace=True)[0]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other.sum()).backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the interpreter test covers CPU)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rule", ["bucket", "prior"])
def test_triton_kernel_matches_twin_on_gpu(dtype, rule):
    from labelstore.reconstruction import kept_cap, prepare_prior, water_fill_scale
    from labelstore_kernels.sparse_kl_torch import TailSpread
    from labelstore_kernels.sparse_kl_triton import sparse_kl_triton

    kl, ce = _random_terms(64, 5000, 32, dtype=torch.float32, seed=3)
    kl = SparseKLTerm(*[x.cuda() if isinstance(x, torch.Tensor) else x for x in kl])
    ce = SparseKLTerm(*[x.cuda() if isinstance(x, torch.Tensor) else x for x in ce])
    if rule == "prior":
        pp = prepare_prior(torch.rand(5000, device="cuda") ** 4 + 1e-3, 5000)
        c, cap = water_fill_scale(kl.tail, kl.ids, kl.mask, kept_cap(kl.probs, kl.mask), pp, 5000)
        kl = kl._replace(spread=TailSpread(c, cap, pp.weights))
    z = (torch.randn(64, 5000, device="cuda") * 3).to(dtype)
    va, ga = value_and_grad(lambda x: sparse_kl_triton(x, [kl, ce])[0], z)
    vb, gb = value_and_grad(lambda x: sparse_kl_torch(x, [kl, ce])[0], z)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    # scale-relative: gradients are ~1e-4 each, so an absolute 1e-2 would accept anything
    torch.testing.assert_close(va, vb, atol=tol * vb.abs().item(), rtol=tol)
    torch.testing.assert_close(ga, gb, atol=tol * gb.abs().max().item(), rtol=tol)


def test_backend_dispatch(monkeypatch):
    z, batch, _, _ = make_batch(seed=12)
    monkeypatch.setenv("LABELSTORE_LOSS_BACKEND", "torch")
    assert losses.resolve_backend(z) == "torch"
    monkeypatch.setenv("LABELSTORE_LOSS_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="backend"):
        losses.distillation_loss(z, batch)
    monkeypatch.delenv("LABELSTORE_LOSS_BACKEND")
    assert losses.resolve_backend(z) == ("triton" if z.is_cuda else "torch")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA"):
        losses.distillation_loss(z, batch, backend="triton")


def test_argument_errors():
    z, batch, _, _ = make_batch(seed=13)
    with pytest.raises(ValueError, match="alpha"):
        losses.distillation_loss(z, batch, alpha=1.5)
    with pytest.raises(ValueError, match="labels"):
        losses.distillation_loss(z, {k: v for k, v in batch.items() if k != "shift_labels"}, alpha=0.5)
    with pytest.raises(ValueError, match="method='hard'"):
        losses.distillation_loss(z, dict(teacher_ids=batch["teacher_ids"][..., :1]), method="forward_kl")
    with pytest.raises(ValueError, match="reduction"):
        losses.sparse_kl(z, batch["teacher_ids"], batch["teacher_probs"], reduction="avg")
    with pytest.raises(ValueError, match="temperature"):
        losses.sparse_kl(z, batch["teacher_ids"], batch["teacher_probs"], temperature=0.0)
    with pytest.raises(ValueError, match="teacher ids"):
        losses.sparse_kl(z, batch["teacher_ids"][:, :-1], batch["teacher_probs"][:, :-1])
    # generalized_jsd honours backend where a kernel exists (beta = 0) and refuses it where none does
    args = [batch[k] for k in ("teacher_ids", "teacher_probs", "teacher_tail", "teacher_mask", "position_mask")]
    with pytest.raises(ValueError, match="no Triton kernel"):
        losses.generalized_jsd(z, *args, beta=0.5, backend="triton")
    with pytest.raises(ValueError, match="loss backend"):
        losses.generalized_jsd(z, *args, beta=0.5, backend="cuda")
    torch.testing.assert_close(losses.generalized_jsd(z, *args, beta=0.0, backend="torch"),
                               losses.sparse_kl(z, *args, backend="torch"))


# --------------------------------------------------------------------------------------- co-distillation
def test_codistillation_losses_values_and_gradient_isolation():
    torch.manual_seed(0)
    V, D = 19, 8
    emb = torch.nn.Embedding(V, D).double()
    teacher_head = torch.nn.Linear(D, V).double()
    student_head = torch.nn.Linear(D, V).double()
    x = torch.randint(0, V, (2, 6))
    labels = torch.randint(0, V, (2, 6))
    labels[:, -1] = -100
    h = emb(x).detach()
    t_logits, s_logits = teacher_head(h), student_head(h)
    out = losses.codistillation_losses(student_logits=s_logits, teacher_logits=t_logits, labels=labels, alpha=0.6,
                                       temperature=2.0)
    with pytest.raises(TypeError, match="keyword arguments only"):  # a positional call could swap the roles
        losses.codistillation_losses(t_logits, s_logits, labels)

    # hand reference
    valid = labels != -100
    ce_t = ref_ce(t_logits.detach(), labels)
    ce_s = ref_ce(s_logits.detach(), labels)
    p = torch.softmax(t_logits.detach() / 2.0, -1)
    logq = torch.log_softmax(s_logits.detach() / 2.0, -1)
    kl = (p * (p.log() - logq)).sum(-1)[valid].mean() * 4.0
    torch.testing.assert_close(out.teacher.detach(), ce_t)
    torch.testing.assert_close(out.student_kl, kl)
    torch.testing.assert_close(out.student_ce, ce_s)
    torch.testing.assert_close(out.student.detach(), 0.6 * kl + 0.4 * ce_s)

    # the student's loss sends nothing to the teacher
    g_teacher = torch.autograd.grad(out.student, list(teacher_head.parameters()), allow_unused=True)
    assert all(g is None or torch.all(g == 0) for g in g_teacher)
    # the teacher's loss sends nothing to the student; total = teacher + student trains each on its own loss
    g_student = torch.autograd.grad(out.teacher, list(student_head.parameters()), allow_unused=True)
    assert all(g is None or torch.all(g == 0) for g in g_student)
    g_total = torch.autograd.grad(out.total, [teacher_head.weight], retain_graph=True)[0]
    g_own = torch.autograd.grad(out.teacher, [teacher_head.weight])[0]
    torch.testing.assert_close(g_total, g_own)


def test_codistillation_module_runs_both_models():
    torch.manual_seed(1)
    V = 11
    teacher = torch.nn.Sequential(torch.nn.Embedding(V, 8), torch.nn.Linear(8, V))
    student = torch.nn.Sequential(torch.nn.Embedding(V, 4), torch.nn.Linear(4, V))
    module = losses.CoDistillation(teacher, student, alpha=0.5, temperature=1.0)
    x = torch.randint(0, V, (3, 5))
    out = module(x, torch.roll(x, -1, 1))
    out.total.backward()
    assert all(p.grad is not None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


# ------------------------------------------------------------------------------- the store's prior in batches
def test_collator_attaches_the_store_prior_and_the_loss_uses_it(tmp_path):
    import numpy as np
    from store_factory import make_meta

    from labelstore.store.writer import StoreWriter
    from labelstore.student.dataset import StoreDataset

    V, K = 40, 4
    rng = np.random.default_rng(0)
    with StoreWriter(tmp_path / "s", make_meta(V, K)) as w:
        for i in range(3):
            T = 6
            ids = np.concatenate([rng.choice(V, K, replace=False) for _ in range(T)])
            w.add(i, rng.integers(0, V, T), np.full(T, K), ids, rng.integers(0, 120, T * K).astype(np.uint8),
                  (rng.random(T) * 0.5).astype(np.float32))
        w.add_teacher_mass(rng.random(V) * 3, 10)
    ds = StoreDataset(tmp_path / "s")
    prior = ds.store.tail_prior()
    collate = ds.collator(dense=True)
    b1, b2 = collate([ds[0], ds[1]]), collate([ds[2]])
    assert b1["teacher_prior"] is b2["teacher_prior"]  # one tensor, not a copy per batch
    np.testing.assert_array_equal(b1["teacher_prior"].numpy(), prior)
    keys = ("teacher_ids", "teacher_probs", "teacher_tail", "teacher_mask", "position_mask")
    z = torch.randn(2, 6, V, dtype=torch.float64)
    ref = losses.sparse_kl(z, *[b1[k] for k in keys], tail="prior", prior=torch.from_numpy(prior))
    assert losses.distillation_loss(z, b1).item() == pytest.approx(ref.item(), rel=1e-6)
    dense = targets.to_dense(*[b1[k] for k in keys[:4]], V, prior=prior)
    torch.testing.assert_close(b1["teacher_dense"], dense)
    # the dense target's KL is the loss (the same rule in both)
    pm = b1["position_mask"]
    t = b1["teacher_dense"].double()
    rows = (torch.xlogy(t, t) - t * torch.log_softmax(z, -1)).sum(-1)
    assert rows[pm].mean().item() == pytest.approx(ref.item(), rel=1e-5)
    # an id map or re-tempering changes the distribution the prior describes: no prior attached
    assert "teacher_prior" not in StoreDataset(tmp_path / "s", id_map=np.arange(V)).collator()([ds[0]])
