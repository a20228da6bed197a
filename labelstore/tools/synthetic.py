"""Synthetic teacher-like logits (clearly synthetic: every figure computed from them must say so).

Real LM next-token distributions are peaked and heavy-tailed: a few tokens hold most of the mass, then
probabilities fall roughly as a power of the rank, and the entropy varies a lot from position to position
(near 0 on predictable tokens, several nats on open ones). The generator reproduces that shape:

    logit(rank r) = -s * log(r) + sigma * noise,     r = 1..V,  token ids randomly permuted per row

with the Zipf exponent ``s`` of each row chosen so the row's entropy hits a target drawn from the entropy
profile: ``entropy ~ mean_entropy * Gamma(shape, 1/shape)`` clipped to [0.02, 0.9 log V]. ``shape`` sets how
spread the per-position entropies are (large = all alike).
"""

from __future__ import annotations

import math

import torch


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    lp = torch.log_softmax(logits, dim=-1)
    return -(lp.exp() * lp).sum(-1)


def zipf_logits(n: int, vocab_size: int, *, mean_entropy: float = 2.5, shape: float = 2.0, sigma: float = 0.5,
                seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """``[n, vocab_size]`` synthetic teacher logits with the entropy profile described in the module doc."""
    if n < 1 or vocab_size < 2:
        raise ValueError("need n >= 1 and vocab_size >= 2")
    g = torch.Generator().manual_seed(seed)
    logv = math.log(vocab_size)
    target = torch.distributions.Gamma(torch.tensor(float(shape)), torch.tensor(float(shape)))
    torch.manual_seed(seed)
    ent = (target.sample((n,)) * mean_entropy).clamp(0.02, 0.9 * logv)
    base = -torch.log(torch.arange(1, vocab_size + 1, dtype=torch.float32))
    noise = torch.randn(n, vocab_size, generator=g) * sigma
    # Bisection on the exponent s per row (entropy decreases monotonically in s for this family).
    lo = torch.zeros(n)
    hi = torch.full((n,), 12.0)
    for _ in range(22):
        mid = (lo + hi) / 2
        h = _entropy(mid[:, None] * base[None, :] + noise)
        too_flat = h > ent
        lo = torch.where(too_flat, mid, lo)
        hi = torch.where(too_flat, hi, mid)
    logits = ((lo + hi) / 2)[:, None] * base[None, :] + noise
    perm = torch.argsort(torch.rand(n, vocab_size, generator=g), dim=-1)
    out = torch.empty_like(logits)
    out.scatter_(1, perm, logits)
    return (out * 1.0).to(dtype)
