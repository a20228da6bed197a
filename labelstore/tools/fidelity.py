"""How faithful a stored distribution is to the teacher's: KL, kept mass, top-1 agreement.

Reconstruction rules (docs/FORMAT.md 5, 5c; ``labelstore.reconstruction``): the kept entries get their stored
(renormalised) probabilities and the stored tail mass is spread over the ``V - count`` tokens that were not
kept, uniformly (default) or by a prior with the water-filling cap (``prior=``)::

    q_v = p_stored_v                   for v kept
    q_v = tail / (V - count)           otherwise (uniform)
    q_v = min(c g_v, p_min)            otherwise (prior g; c such that the tail sums to t)

:func:`bucket_kl` scores the third rule, the (K + 1)-bucket view a ``tail="bucket"`` loss trains on.
Every metric is computed against the teacher's full distribution in float64, in row chunks.
"""

from __future__ import annotations

import numpy as np
import torch

from labelstore.reconstruction import kept_cap, prepare_prior, spread_fill, uniform_fill, water_fill_scale


def kl_to_reconstruction(teacher_logits: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor,
                         tail: torch.Tensor, counts: torch.Tensor | None = None, *, temperature: float = 1.0,
                         chunk: int = 256, prior=None, capped: bool = True) -> dict[str, np.ndarray]:
    """Per-row metrics of stored targets against the teacher.

    Args:
        teacher_logits: ``[N, V]`` the teacher's logits (divided by ``temperature`` to get p).
        ids, probs: ``[N, K]`` kept ids and their reconstructed probabilities (0 past ``counts``).
        tail: ``[N]`` stored tail mass. counts: ``[N]`` kept entries per row (default: all K).

    ``prior`` (float [V], e.g. ``LabelStore.tail_prior()``): spread the tail in proportion to it over the
    non-kept tokens instead of uniformly, no token above the smallest kept probability (``capped``; a top-k
    store knows that much), docs/FORMAT.md section 5c.

    Returns a dict of float64 numpy arrays ``[N]``: ``kl`` (KL(teacher || reconstruction), nats),
    ``kept_mass`` (teacher mass on the kept ids), ``top1`` (1.0 where the reconstruction's argmax is the
    teacher's argmax).
    """
    N, V = teacher_logits.shape
    K = ids.shape[1]
    if counts is None:
        counts = torch.full((N,), K, dtype=torch.long)
    pp = None if prior is None else prepare_prior(torch.as_tensor(np.asarray(prior)), V)
    out = {"kl": np.empty(N), "kept_mass": np.empty(N), "top1": np.empty(N)}
    for a in range(0, N, chunk):
        b = min(N, a + chunk)
        lp = torch.log_softmax(teacher_logits[a:b].double() / temperature, dim=-1)
        p = lp.exp()
        n = b - a
        mask = torch.arange(K)[None, :] < counts[a:b, None]
        c = counts[a:b].double()
        kid = ids[a:b].long()
        rr, ss = mask.nonzero(as_tuple=True)
        if prior is None:
            fill = uniform_fill(tail[a:b].double(), c, V).clamp_min(1e-300)
            q = fill[:, None].expand(n, V).clone()
        else:  # the water-filling scale per row (labelstore.reconstruction; tested against spread_tail)
            pk = probs[a:b].double()
            cap = kept_cap(pk, mask) if capped else torch.full((n,), float("inf"), dtype=torch.float64)
            c, cap = water_fill_scale(tail[a:b].double(), kid, mask, cap, pp, V)
            q = spread_fill(c, cap, pp.weights, V).clamp_min(1e-300)
        q[rr, kid[rr, ss]] = probs[a:b].double()[rr, ss]  # only real kept entries (padding ids are ignored)
        logq = torch.log(q.clamp_min(1e-300))
        kl = torch.where(p > 0, p * (lp - logq), torch.zeros_like(p)).sum(-1)
        kept = torch.where(mask, p.gather(1, kid), torch.zeros_like(kid, dtype=torch.float64)).sum(-1)
        out["kl"][a:b] = kl.clamp_min(0).numpy()
        out["kept_mass"][a:b] = kept.numpy()
        out["top1"][a:b] = (q.argmax(-1) == lp.argmax(-1)).double().numpy()
    return out


def bucket_kl(teacher_logits: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor, tail: torch.Tensor,
              counts: torch.Tensor | None = None, *, temperature: float = 1.0, chunk: int = 256) -> np.ndarray:
    """Per-row KL between the (K + 1)-bucket projections of the teacher and of the stored targets (nats):
    ``sum_S p log(p / p_stored) + t log(t / t_stored)``, ``t`` the teacher's exact mass outside the stored ids
    (summed over those tokens, not ``1 - kept``). What the ``tail="bucket"`` loss sees: the error of the
    stored values and tail, with truncation itself free."""
    N, V = teacher_logits.shape
    K = ids.shape[1]
    if counts is None:
        counts = torch.full((N,), K, dtype=torch.long)
    out = np.empty(N)
    for a in range(0, N, chunk):
        b = min(N, a + chunk)
        p = torch.softmax(teacher_logits[a:b].double() / temperature, dim=-1)
        mask = torch.arange(K)[None, :] < counts[a:b, None]
        kid = torch.where(mask, ids[a:b].long(), 0)
        pk = torch.where(mask, p.gather(1, kid), 0.0)
        rest = p.clone()
        rr, ss = mask.nonzero(as_tuple=True)
        rest[rr, kid[rr, ss]] = 0.0
        t = rest.sum(-1)
        q = torch.cat([torch.where(mask, probs[a:b].double(), 0.0), tail[a:b].double()[:, None]], 1)
        pt = torch.cat([pk, t[:, None]], 1)
        logr = torch.log(pt.clamp_min(1e-300)) - torch.log(q.clamp_min(0))
        out[a:b] = torch.where(pt > 0, pt * logr, torch.zeros_like(pt)).sum(-1).clamp_min(0).numpy()
    return out


def summarize(metrics: dict[str, np.ndarray]) -> dict[str, float]:
    kl = metrics["kl"]
    return {
        "kl_mean": float(kl.mean()),
        "kl_p99": float(np.quantile(kl, 0.99)),
        "kl_max": float(kl.max()),
        "kept_mass": float(metrics["kept_mass"].mean()),
        "top1_agreement": float(metrics["top1"].mean()),
    }
