"""Fixed-width bit packing of non-negative integers (token ids) into bytes.

Layout (little-endian bit order, see docs/FORMAT.md): value ``i`` occupies bits
``[i*w, (i+1)*w)`` of the byte string, where bit ``j`` is bit ``j % 8`` of byte ``j // 8``.
The last byte is zero-padded. ``w = ceil(log2(vocab_size))`` (at least 1), so a 32000-token
vocabulary costs 15 bits per id and a 2**20 vocabulary 20 bits, with no upper limit below 2**32.
"""

from __future__ import annotations

import numpy as np

MAX_BITS = 32


def bits_for(vocab_size: int) -> int:
    """Bits needed for ids in ``[0, vocab_size)``."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return max(1, int(vocab_size - 1).bit_length())


def packed_nbytes(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def pack(values: np.ndarray, bits: int) -> bytes:
    """Pack ``values`` (any integer dtype, each in ``[0, 2**bits)``) at ``bits`` bits each."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [1, {MAX_BITS}], got {bits}")
    v = np.ascontiguousarray(values, dtype=np.uint32).reshape(-1)
    n = v.size
    if n == 0:
        return b""
    # Explode each value into its `bits` low bits, then let packbits fuse them.
    bitmat = np.unpackbits(v.view(np.uint8).reshape(n, 4), axis=1, bitorder="little")[:, :bits]
    return np.packbits(bitmat.reshape(-1), bitorder="little").tobytes()


def unpack(buf, bits: int, n: int, out_dtype=np.int64) -> np.ndarray:
    """Inverse of :func:`pack`: the first ``n`` values of ``buf`` (bytes-like or uint8 array)."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [1, {MAX_BITS}], got {bits}")
    if n == 0:
        return np.zeros(0, dtype=out_dtype)
    raw = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf.view(np.uint8)
    need = packed_nbytes(n, bits)
    if raw.size < need:
        raise ValueError(f"packed buffer holds {raw.size} bytes, {need} needed for {n} values of {bits} bits")
    # Eight consecutive values fill exactly `bits` bytes, so value 8g+j starts at byte g*bits + (j*bits)//8,
    # bit (j*bits)%8: for each lane j, one strided (unaligned, no-copy) little-endian 64-bit view reads every
    # group's window; bits + 7 <= 39 < 64, so one window always covers a value.
    groups = (n + 7) // 8
    padded = np.zeros(groups * bits + 8, dtype=np.uint8)
    padded[:need] = raw[:need]
    out = np.empty((groups, 8), dtype=np.uint64)
    for j in range(8):
        lane = np.ndarray((groups,), dtype="<u8", buffer=padded, offset=(j * bits) >> 3, strides=(bits,))
        np.right_shift(lane, np.uint64((j * bits) & 7), out=out[:, j])
    out &= np.uint64((1 << bits) - 1)
    vals = out.reshape(-1)[:n]
    return vals.view(np.int64) if np.dtype(out_dtype) == np.int64 else vals.astype(out_dtype)
