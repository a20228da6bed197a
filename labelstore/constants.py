"""Numbers that several stages share, each stated once.

Everything here is a plain constant or a one-line rule about one; the format's own sanity limits live in
:mod:`labelstore.store.format`, the selection modes in :mod:`labelstore.selection`.
"""

from __future__ import annotations

LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * LOG2E), the fast form on CPU and GPU
IGNORE_INDEX = -100  # label of positions without a target (PyTorch's and Hugging Face's convention)
MAX_SAMPLES = 255  # draws per position in the sampled modes: count8 stores 1..255
TRITON_MAX_K = 256  # widest top-k the Triton extraction kernel keeps; larger k runs on the torch twin
MAX_ONE_BYTE_COUNT = 255  # per-position kept counts fit one byte up to this k, two bytes beyond


def count_bytes(k: int) -> int:
    """Bytes per stored per-position count for a store of width ``k`` (docs/FORMAT.md, column ``counts``)."""
    return 1 if k <= MAX_ONE_BYTE_COUNT else 2


def count_dtype(nbytes: int) -> str:
    """The numpy dtype of a ``counts`` column of ``nbytes`` bytes per position (little-endian)."""
    return "<u1" if nbytes == 1 else "<u2"
