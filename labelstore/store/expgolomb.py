"""Exp-Golomb-coded ids (format version 5, encoding "expgolomb"): fewer bytes for the same entries.

The bytes of a store are in the kept token ids. Encoding "zstd" (version 2) stores them as byte planes under zstd,
which on a 17-bit vocabulary costs *more* than plain bit packing (the third plane holds one bit per id). This
encoding codes each kept id in two parts (docs/FORMAT.md 6c):

1. **Next-token swap.** At every position but a row's last, the next input token ``x = input_ids[t + 1]`` (the
   token the position predicts, which the row already stores) and token 0 trade places: ``c = 0`` if
   ``id == x``, ``c = x`` if ``id == 0``, else ``c = id``. A bijection on ``[0, V)``; a teacher that ranks the
   true next token among its entries then pays for it as the cheapest symbol.
2. **Log buckets.** ``c < 16`` is symbol ``c`` with no extra bits. Otherwise, with ``e = bit_length(c) - 1``
   (4 .. 25) and ``s`` the 3 bits below the leading one, the symbol is ``16 + 8 (e - 4) + s`` and the ``e - 3``
   low bits of ``c`` are extra bits. The symbols (one byte each) go under zstd, whose Huffman stage codes the
   skew of the ids (small ids are frequent in BPE vocabularies, and every swapped next token is symbol 0); the
   extra bits, nearly uniform within a bucket, are bit-packed raw.

Values (1-byte codecs) are the "zstd" encoding's per-position deltas, stored **slot-major** (every position's
first entry, then every second entry, ...), so a zstd block sees the deltas of one rank together. Everything else
(``input_ids``, ``counts``, 2-byte values, ``tail``, ``doc_starts``) is exactly the "zstd" encoding's.

Decoding is vectorized numpy over a whole row (no per-symbol Python); zstd does the entropy decoding in C.
"""

from __future__ import annotations

import struct

import numpy as np

from labelstore.errors import StoreCorruptError
from labelstore.store import entropy

SMALL = 16  # c < SMALL: the symbol is c itself, no extra bits
SUB_BITS = 3  # bits below the leading one that go into the symbol


def num_symbols(id_bits: int) -> int:
    """Symbols a store of ``id_bits`` can hold: codes ``< 2**id_bits`` (a decoded symbol at or above is corrupt)."""
    if id_bits <= 4:
        return 1 << id_bits
    return SMALL + (id_bits - 4) * 8


def _symbol_luts():
    """Per symbol (0..255): its extra bits, and its code's high part (code = high << extra | low)."""
    sym = np.arange(256, dtype=np.int64)
    nb = np.where(sym < SMALL, 0, (sym - SMALL) // 8 + 1)  # e - 3, e = 4 + (sym - 16) // 8
    high = np.where(sym < SMALL, sym, 8 + ((sym - SMALL) & 7))  # the leading one and the 3 symbol bits
    return nb.astype(np.uint32), high.astype(np.uint32)


_NB_LUT, _HIGH_LUT = _symbol_luts()
# one gather per symbol when decoding: (h << b) << 5 | b, with h << b < 2**26 and b < 32
_DECODE_LUT = ((_HIGH_LUT << _NB_LUT) << np.uint32(5)) | _NB_LUT


def _full(counts: np.ndarray) -> int | None:
    """The common count of every position when all are equal and nonzero (a fixed-k row), else None."""
    if counts.size and counts[0] > 0 and (counts == counts[0]).all():
        return int(counts[0])
    return None


_NONE = np.uint32(0xFFFFFFFF)  # "no next token" (a row's last position): equal to no code (codes < 2**26)


def _next_tokens(input_ids: np.ndarray, T: int) -> np.ndarray:
    nxt = np.full(T, _NONE, dtype=np.uint32)
    if T > 1:
        nxt[:-1] = np.asarray(input_ids)[1:]
    return nxt


def swap_next(ids: np.ndarray, counts: np.ndarray, input_ids: np.ndarray, inplace: bool = False) -> np.ndarray:
    """The next-token swap (its own inverse) as uint32: per entry of position ``t`` (not a row's last), trade
    ``input_ids[t + 1]`` and 0. ``ids`` must be below 2**26 (any code a store holds); ``inplace``: ``ids`` is a
    uint32 array this call may overwrite."""
    out = ids.reshape(-1) if inplace else np.array(ids, dtype=np.uint32).reshape(-1)
    T = counts.size
    if out.size == 0 or T < 2:
        return out
    nxt = _next_tokens(input_ids, T)
    k = _full(counts)
    if k is not None:  # a fixed-k row: compare over [T, k] by broadcasting
        hit = np.flatnonzero(out.reshape(T, k) == nxt[:, None])
    else:
        hit = np.flatnonzero(out == np.repeat(nxt, counts))
    zero = np.flatnonzero(out == 0)
    if zero.size:
        pos = zero // k if k is not None else np.searchsorted(np.cumsum(counts), zero, side="right")
        x = nxt[pos]
        keep = x != _NONE
        out[zero[keep]] = x[keep]
    out[hit] = 0
    return out


def encode_codes(codes: np.ndarray) -> tuple[np.ndarray, bytes]:
    """(symbols uint8, extra bits packed little-endian bit order) of non-negative codes ``< 2**26``, in 32-bit
    arithmetic."""
    c = np.asarray(codes).reshape(-1).astype(np.int32)
    if c.size == 0:
        return np.zeros(0, np.uint8), b""
    # e = floor(log2 c): the exponent field of float32(c), less one where rounding to float32 reached the next
    # power of two (c >= 2**24); c = 0 gives -127 (then nb = 0 and the symbol is 0)
    e = (c.astype(np.float32).view(np.int32) >> 23) - 127
    e -= (c >> np.maximum(e, 0)) == 0
    nb = np.maximum(e - SUB_BITS, 0)  # 0 for every c < 16 (e <= 3)
    sym = (c >> nb) & 7
    sym += 8 * e - 16  # 16 + 8 (e - 4) + s
    sym = np.where(c < SMALL, c, sym).astype(np.uint8)
    c &= (np.int32(1) << nb) - 1
    return sym, _pack_varbits(c, _NB_LUT.take(sym))


def _pack_varbits(vals: np.ndarray, nbits: np.ndarray) -> bytes:
    """Concatenate ``nbits[i]`` (<= 25) low bits of ``vals[i]`` (already ``< 2**nbits[i]``), least significant
    first, into bytes (the last one zero-padded). Into 32-bit words: the values starting in a word are OR-ed
    together (their bits are disjoint), and the one value a word can spill over adds its high bits to the next."""
    n = nbits.size
    nbits = nbits.astype(np.uint32, copy=False)
    pos = np.cumsum(nbits, dtype=np.uint32 if n < (1 << 27) else np.int64)
    total = int(pos[-1]) if n else 0
    if total == 0:
        return b""
    pos -= nbits.astype(pos.dtype, copy=False)  # each value's first bit
    word = pos >> 5
    shift = (pos & 31).astype(np.uint32, copy=False)
    v = vals.astype(np.uint32)
    words = np.zeros(total // 32 + 2, dtype="<u4")
    first = np.empty(n, dtype=bool)
    first[0] = True
    np.not_equal(word[1:], word[:-1], out=first[1:])
    first = np.flatnonzero(first)
    words[word[first]] = np.bitwise_or.reduceat(v << shift, first)  # bits past 32 fall off here ...
    spill = np.flatnonzero(shift + nbits > 32)
    words[word[spill] + 1] |= v[spill] >> (np.uint32(32) - shift[spill])  # ... and land in the next word
    return words.view(np.uint8)[: (total + 7) // 8].tobytes()


def decode_codes(sym: np.ndarray, extra: np.ndarray, id_bits: int, where: str) -> np.ndarray:
    """Inverse of :func:`encode_codes` (uint32 codes); refuses a symbol beyond ``id_bits``'s range, extra bits of
    another length than the symbols need, and nonzero padding bits. (In place on 32-bit arrays where it can: a
    row's temporaries are what decoding costs.)"""
    n = sym.size
    if n and int(sym.max()) >= num_symbols(id_bits):
        raise StoreCorruptError(f"{where}: ids symbol {int(sym.max())} is out of range for {id_bits}-bit ids; damaged")
    base = _DECODE_LUT.take(sym)
    nb = base & np.uint32(31)
    base >>= np.uint32(5)  # h << b: the code without its extra bits
    # bit offsets: 32-bit while they fit (at most 22 extra bits per entry)
    pos = np.cumsum(nb, dtype=np.uint32 if n < (1 << 27) else np.int64)
    total = int(pos[-1]) if n else 0
    need = (total + 7) // 8
    if extra.size != need:
        raise StoreCorruptError(f"{where}: ids carry {extra.size} bytes of extra bits, the symbols need {need}; "
                                "damaged")
    if total % 8 and int(extra[-1]) >> (total % 8):
        raise StoreCorruptError(f"{where}: the ids' extra bits have nonzero padding; damaged")
    if total == 0:
        return base
    pos -= nb.astype(pos.dtype, copy=False)  # each entry's first bit
    padded = np.zeros(need + 4, dtype=np.uint8)
    padded[:need] = extra
    # every value (<= 22 bits at a bit offset <= 7) lies in the 4 bytes from its first byte: one unaligned
    # little-endian uint32 read per value
    win = np.ndarray((need + 1,), dtype="<u4", buffer=padded, strides=(1,)).take(pos >> 3)
    pos &= 7
    win >>= pos.astype(np.uint32, copy=False)
    np.left_shift(np.uint32(1), nb, out=nb)
    nb -= np.uint32(1)  # now each entry's mask of b low bits
    win &= nb
    base |= win
    return base


def _slot_major(entries: np.ndarray, counts: np.ndarray, to_slot: bool) -> np.ndarray:
    """Reorder a row's entries between position-major (the row's order) and slot-major order: every position's
    entry 0 (positions ascending), then every entry 1 of the positions that have one, and so on."""
    T = counts.size
    k = _full(counts)
    if k is not None:
        if to_slot:
            return np.ascontiguousarray(entries.reshape(T, k).T).reshape(-1)
        return np.ascontiguousarray(entries.reshape(k, T).T).reshape(-1)
    K = int(counts.max()) if T else 0
    mask = np.arange(K)[None, :] < counts[:, None]  # [T, K]: position t has an entry in slot j
    if to_slot:
        grid = np.zeros((T, K), dtype=entries.dtype)
        grid[mask] = entries
        return grid.T[mask.T]
    grid = np.zeros((K, T), dtype=entries.dtype)
    grid[mask.T] = entries
    return grid.T[mask]


def _undelta_slot_major(raw: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Position-major codes from slot-major per-position deltas: running sums mod 256 over each position's slots,
    one vector add per slot on a [K, T] grid (numpy's uint8 cumsum is several times slower)."""
    T = counts.size
    k = _full(counts)
    if raw.size == 0:
        return raw.copy()
    if k is not None:
        grid = raw.reshape(k, T).copy()
        mask = None
    else:
        K = int(counts.max())
        mask = np.arange(K)[:, None] < counts[None, :]  # [K, T]
        grid = np.zeros((K, T), dtype=np.uint8)
        grid[mask] = raw  # positions past their count stay 0: harmless in the sums, dropped below
    for j in range(1, grid.shape[0]):
        np.add(grid[j], grid[j - 1], out=grid[j])
    if mask is None:
        return np.ascontiguousarray(grid.T).reshape(-1)
    return grid.T[mask.T]


class ExpGolombCoder:
    """Encoder and decoder of the "expgolomb" encoding's ``ids`` and ``values`` columns (the rest is "zstd")."""

    def __init__(self, level: int = entropy.DEFAULT_LEVEL):
        self.zc = entropy.RowCompressor(level)
        self.zd = entropy.RowDecompressor()

    def encode(self, id_bits, bpv, input_ids, counts_bytes, counts, ids, values, tail_bytes) -> dict[str, bytes]:
        counts = np.asarray(counts, dtype=np.int64)
        out = self.encode_rest(id_bits, bpv, input_ids, counts_bytes, counts, values, tail_bytes)
        sym, extra = encode_codes(swap_next(ids, counts, input_ids))
        frame = self.zc._c.compress(sym.tobytes())
        out["ids"] = struct.pack("<I", len(frame)) + frame + extra
        return out

    def encode_rest(self, id_bits, bpv, input_ids, counts_bytes, counts, values, tail_bytes) -> dict[str, bytes]:
        """Every column but ``ids`` (shared with encoding "grouped", FORMAT.md 6d)."""
        z = self.zc._c.compress
        w = entropy.id_width(id_bits)
        if bpv == 1:
            deltas = entropy._delta_codes(np.asarray(values, dtype=np.uint8), counts)
            vstream = _slot_major(deltas, counts, True).tobytes()
        elif bpv == 2:
            vstream = entropy._planes(np.frombuffer(np.asarray(values, np.uint8).tobytes(), "<u2"), 2)
        else:
            vstream = b""
        tail_stream = entropy._planes(np.frombuffer(tail_bytes, dtype="<u4"), 4) if tail_bytes else b""
        return {
            "input_ids": z(entropy._planes(input_ids, w)),
            "counts": z(counts_bytes),
            "values": z(vstream) if vstream else b"",
            "tail": z(tail_stream) if tail_stream else b"",
        }

    def ids(self, buf, id_bits: int, counts: np.ndarray, input_ids: np.ndarray, n: int, where: str) -> np.ndarray:
        buf = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf
        if buf.size < 4:
            raise StoreCorruptError(f"{where}: ids column of {buf.size} bytes has no symbol-frame length; damaged")
        flen = int(buf[:4].view("<u4")[0])
        if 4 + flen > buf.size:
            raise StoreCorruptError(f"{where}: ids symbol frame of {flen} bytes overruns its column; damaged")
        sym = np.frombuffer(self.zd.frame(buf[4:4 + flen], n, where, "ids symbols"), dtype=np.uint8)
        codes = decode_codes(sym, buf[4 + flen:], id_bits, where)
        return swap_next(codes, counts, input_ids, inplace=True).astype(np.int64)

    def values(self, buf, bpv: int, counts: np.ndarray, n: int, where: str) -> np.ndarray:
        if bpv != 1:
            return self.zd.values(buf, bpv, counts, n, where)
        raw = np.frombuffer(self.zd.frame(buf, n, where, "values"), dtype=np.uint8)
        return _undelta_slot_major(raw, counts)
