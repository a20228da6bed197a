"""The extraction contract shared by the Triton kernel and its pure-torch twin.

``extract_topk(logits [N, V], k)`` keeps, per row (position), the ``k`` most probable tokens of
``softmax(logits / T)`` and returns an :class:`Extracted`:

``ids``     int32 ``[N, k]``: token ids by descending probability; ties by the smaller id. Probability order
            is the order of the raw logits (``T > 0`` preserves it), so two logits that differ stay ordered
            even when ``logit / T`` rounds them to the same float32.
``values``  uint8 ``[N, k * codec.bytes_per_value]``: the value codec's bytes for each kept entry, same order,
            of ``r = log p - log p_max = (z - z_max) / T`` (see :mod:`labelstore.codecs`).
``counts``  int32 ``[N]``: kept entries with ``p > 0``, i.e. ``min(k, number of finite logits)``. Entries past
            the count are ``-inf`` logits (the smallest such ids) and carry the codec's zero code.
``tail``    float32 ``[N]``: exact probability mass outside the kept set, summed over the non-kept entries
            (never ``1 - sum(kept)``, which cancels when the kept mass is near 1).
``lse``     float32 ``[N]``: ``logsumexp(logits / T)``.

``k > V`` is clipped to ``V`` (the outputs are ``[N, min(k, V)]`` wide). Rows with NaN, ``+inf`` or no finite
entry raise :class:`labelstore.errors.InvalidLogitsError` naming the rows.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from labelstore.codecs import ValueCodec, get_codec
from labelstore.errors import InvalidLogitsError

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Extracted(NamedTuple):
    """Compact top-k form of one block of teacher logits (see the module docstring)."""

    ids: torch.Tensor
    values: torch.Tensor
    counts: torch.Tensor
    tail: torch.Tensor
    lse: torch.Tensor


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def prepare(
    logits: torch.Tensor, k: int, temperature: float, codec: str | dict | ValueCodec
) -> tuple[torch.Tensor, int, float, ValueCodec]:
    """Validate the arguments; returns ``(logits, k clipped to V, temperature, codec)``."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [N, V], got shape {tuple(logits.shape)}; flatten the leading dims")
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"logits dtype {logits.dtype} is not supported; use float32, bfloat16 or float16")
    if logits.shape[1] < 1:
        raise ValueError("logits have an empty vocabulary dimension (V = 0)")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    return logits, min(k, logits.shape[1]), t, get_codec(codec)


def empty_outputs(n: int, k: int, codec: ValueCodec, device) -> Extracted:
    return Extracted(
        ids=torch.empty(n, k, dtype=torch.int32, device=device),
        values=torch.empty(n, k * codec.bytes_per_value, dtype=torch.uint8, device=device),
        counts=torch.empty(n, dtype=torch.int32, device=device),
        tail=torch.empty(n, dtype=torch.float32, device=device),
        lse=torch.empty(n, dtype=torch.float32, device=device),
    )


def raise_invalid_rows(logits: torch.Tensor, rows: list[int], n_bad: int | None = None) -> None:
    """Raise :class:`InvalidLogitsError` naming the first bad rows (ascending) and what is wrong with each."""
    rows = sorted(rows)[:8]
    shown = []
    for r in rows:
        xr = logits[r]
        what = []
        if bool(torch.isnan(xr).any()):
            what.append("NaN")
        if bool(torch.isposinf(xr).any()):
            what.append("+inf")
        if not what:
            what.append("no finite entry (all -inf)")
        shown.append(f"row {r}: {' and '.join(what)}")
    more = "" if n_bad is None or n_bad <= len(shown) else f" (and {n_bad - len(shown)} more rows)"
    raise InvalidLogitsError(
        f"invalid teacher logits: {'; '.join(shown)}{more}. NaN/+inf usually means a float16 overflow in the "
        "teacher forward pass (run it in bfloat16 or float32); all -inf means the position is fully masked: "
        "drop it before extraction.",
        rows=rows,
    )
