"""The teacher's mass for the store's tail prior: per-sequence sums of the full distribution (FORMAT.md 5c)."""

from __future__ import annotations

import numpy as np
import torch

from labelstore.constants import LOG2E

MASS_CHUNK_ELEMS = {"cpu": 1 << 18, "cuda": 1 << 26}  # logits per chunk of the teacher-mass pass (cache-sized on CPU)


def teacher_mass(flat: torch.Tensor, lse: torch.Tensor, lengths: np.ndarray, temperature: float) -> torch.Tensor:
    """Per-sequence sums of the teacher's full distribution, float32 ``[B, V]`` on the logits' device.

    ``p = exp(z / T - lse)`` row by row (``exp2`` form, the fast one on CPU), summed over each sequence's rows
    (consecutive in ``flat``): the writer turns these into the store's tail prior (docs/FORMAT.md section 5c).
    """
    n, V = flat.shape
    ends = np.cumsum(lengths)
    starts = ends - lengths
    out = torch.zeros(len(lengths), V, dtype=torch.float32, device=flat.device)
    c = max(1, MASS_CHUNK_ELEMS.get(flat.device.type, 1 << 22) // V)
    scale = LOG2E / temperature
    shift = lse.float() * LOG2E
    for a in range(0, n, c):
        b = min(n, a + c)
        e = torch.mul(flat[a:b].float(), scale)  # a new float32 buffer: the logits stay intact
        e.sub_(shift[a:b, None]).exp2_()
        for s in range(int(np.searchsorted(ends, a, side="right")), len(lengths)):
            lo, hi = max(a, int(starts[s])), min(b, int(ends[s]))
            if lo >= hi:
                break
            out[s] += e[lo - a:hi - a].sum(0)
    return out
