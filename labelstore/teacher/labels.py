"""Label positions: a store writer that keeps entries only where the plan says a position has a label.

With ``--assistant-only`` the plan flags, per token, whether its position keeps a label (its next token is an
assistant's or a completion's; :mod:`labelstore.teacher.inputs`). The teacher and the extraction run on every
position, whatever produced the rows (the extraction kernels, a fused head); this writer then stores count 0,
no entry and tail 0 at the other positions (docs/FORMAT.md 3, ``label_positions``). Kept positions hold exactly
what an all-positions compile stores there (sampled modes draw by row id, not by position in the batch).
"""

from __future__ import annotations

import numpy as np

from labelstore.codecs import get_codec


class LabelPositionsWriter:
    """Wraps a :class:`~labelstore.store.writer.StoreWriter`; ``add`` drops the entries of unlabelled positions.

    Every other attribute is the wrapped writer's.
    """

    def __init__(self, writer, plan):
        if plan is not None and plan.label_mask is None:  # None: set_plan() comes before the first row
            raise ValueError("LabelPositionsWriter needs a plan with label flags (assistant_only)")
        self._writer, self._plan = writer, plan
        self._bpv = get_codec(writer.meta["value_codec"]).bytes_per_value

    def set_plan(self, plan) -> None:
        """The plan the next rows come from (a ``--plan units`` compile has one plan per work unit)."""
        self._plan = plan

    def __getattr__(self, name):
        return getattr(self._writer, name)

    def add(self, sample_id: int, input_ids, counts, ids, values, tail, doc_starts=None) -> None:
        plan = self._plan
        keep = plan.keep(sample_id)
        counts = np.asarray(counts).reshape(-1)
        if keep.size != counts.size:
            raise ValueError(f"sample {sample_id}: {counts.size} counts for {keep.size} planned positions")
        if not keep.all():
            entries = np.repeat(keep, counts)
            ids = np.asarray(ids).reshape(-1)[entries]
            if self._bpv:
                values = np.asarray(values, dtype=np.uint8).reshape(-1, self._bpv)[entries].reshape(-1)
            counts = np.where(keep, counts, 0).astype(counts.dtype)
            tail = np.asarray(tail, dtype=np.float32).reshape(-1)
            if tail.size:
                tail = np.where(keep, tail, np.float32(0))
        self._writer.add(sample_id, input_ids, counts, ids, values, tail, doc_starts)
