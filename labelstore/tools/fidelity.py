"""How faithful a stored distribution is to the teacher's: KL, kept mass, top-1 agreement.

Reconstruction rule (docs/FORMAT.md): the kept entries get their stored (renormalised) probabilities and
the stored tail mass is spread uniformly over the ``V - count`` tokens that were not kept::

    q_v = p_stored_v                   for v kept
    q_v = tail / (V - count)           otherwise

Every metric is computed against the teacher's full distribution in float64, in row chunks.
"""

from __future__ import annotations

import numpy as np
import torch

from labelstore.reconstruction import spread_tail, uniform_fill


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
        else:
            pr = torch.as_tensor(np.asarray(prior), dtype=torch.float64)[None, :].expand(n, V).clone()
            pr[rr, kid[rr, ss]] = 0.0
            pk = torch.where(mask, probs[a:b].double(), torch.full_like(probs[a:b].double(), float("inf")))
            cap = pk.min(-1).values if capped else torch.full((n,), float("inf"), dtype=torch.float64)
            q = spread_tail(tail[a:b].double(), pr, cap).clamp_min(1e-300)
        q[rr, kid[rr, ss]] = probs[a:b].double()[rr, ss]  # only real kept entries (padding ids are ignored)
        logq = torch.log(q.clamp_min(1e-300))
        kl = torch.where(p > 0, p * (lp - logq), torch.zeros_like(p)).sum(-1)
        kept = torch.where(mask, p.gather(1, kid), torch.zeros_like(kid, dtype=torch.float64)).sum(-1)
        out["kl"][a:b] = kl.clamp_min(0).numpy()
        out["kept_mass"][a:b] = kept.numpy()
        out["top1"][a:b] = (q.argmax(-1) == lp.argmax(-1)).double().numpy()
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
