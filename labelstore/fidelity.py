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
            fill = (tail[a:b].double() / (V - c).clamp_min(1)).clamp_min(1e-300)
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


def summarize(metrics: dict[str, np.ndarray]) -> dict[str, float]:
    kl = metrics["kl"]
    return {
        "kl_mean": float(kl.mean()),
        "kl_p99": float(np.quantile(kl, 0.99)),
        "kl_max": float(kl.max()),
        "kept_mass": float(metrics["kept_mass"].mean()),
        "top1_agreement": float(metrics["top1"].mean()),
    }
