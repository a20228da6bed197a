"""The teacher's mass for the store's tail prior: per-sequence sums of the full distribution (FORMAT.md 5c).

Two callers: the materialised path passes a batch's whole ``[N, V]`` logits to :func:`teacher_mass`; the fused
path (no ``[N, V]`` logits) adds each row block's logits as the head produces them, with :class:`MassAccumulator`.
Both sum ``p = exp(z / T - lse)`` in the same chunks of rows, so they agree to float32 rounding.
"""

from __future__ import annotations

import numpy as np
import torch

from labelstore.constants import LOG2E

MASS_CHUNK_ELEMS = {"cpu": 1 << 18, "cuda": 1 << 26}  # logits per chunk of the teacher-mass pass (cache-sized on CPU)


class MassAccumulator:
    """Per-sequence sums of ``softmax(z / T)`` over a batch whose rows (real positions) arrive in blocks.

    Args:
        lengths: real positions of each sequence of the batch; its rows are consecutive, in this order.
        V: vocabulary (columns of every block).
        temperature: the compile's temperature.
        device: where the sums live (the logits' device).
    """

    def __init__(self, lengths: np.ndarray, V: int, temperature: float, device: torch.device):
        self.ends = np.cumsum(lengths)
        self.starts = self.ends - lengths
        self.scale = LOG2E / temperature
        self.out = torch.zeros(len(lengths), V, dtype=torch.float32, device=device)
        self.chunk = max(1, MASS_CHUNK_ELEMS.get(torch.device(device).type, 1 << 22) // V)

    def add(self, s0: int, z: torch.Tensor, lse: torch.Tensor) -> None:
        """Add rows ``s0 .. s0 + len(z)`` of the batch: their logits ``z`` and ``lse = logsumexp(z / T)``."""
        shift = lse.float() * LOG2E
        for a in range(0, z.shape[0], self.chunk):
            b = min(z.shape[0], a + self.chunk)
            e = torch.mul(z[a:b].float(), self.scale)  # a new float32 buffer: the logits stay intact
            e.sub_(shift[a:b, None]).exp2_()
            ga, gb = s0 + a, s0 + b
            for s in range(int(np.searchsorted(self.ends, ga, side="right")), len(self.ends)):
                lo, hi = max(ga, int(self.starts[s])), min(gb, int(self.ends[s]))
                if lo >= hi:
                    break
                self.out[s] += e[lo - ga:hi - ga].sum(0)


def teacher_mass(flat: torch.Tensor, lse: torch.Tensor, lengths: np.ndarray, temperature: float) -> torch.Tensor:
    """Per-sequence sums of the teacher's full distribution, float32 ``[B, V]`` on the logits' device.

    ``p = exp(z / T - lse)`` row by row (``exp2`` form, the fast one on CPU), summed over each sequence's rows
    (consecutive in ``flat``): the writer turns these into the store's tail prior (docs/FORMAT.md section 5c).
    """
    acc = MassAccumulator(lengths, flat.shape[1], temperature, flat.device)
    acc.add(0, flat, lse)
    return acc.out
