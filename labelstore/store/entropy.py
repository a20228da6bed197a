"""Entropy-coded row streams (format version 2, encoding "zstd").

Token ids are where a store's bytes are. Version 2 keeps the same Arrow columns as version 1 but stores each
row's streams transformed for compressibility and compressed with zstandard, one frame per column per row
(so random access to a row still touches only that row):

``input_ids``, ``ids``
    each id as ``w`` little-endian bytes (``w = ceil(id_bits / 8)``), then *byte-plane shuffled* (all low
    bytes, then all second bytes, ...), then zstd. Frequent tokens repeat in the low plane and the high planes
    are highly repetitive, which zstd's entropy stage exploits.
``values``
    1-byte codecs: per position, the first code, then differences to the previous code modulo 256
    (codes of a position are sorted, so the differences are small); 2-byte codecs: byte-plane shuffled.
    Then zstd.
``counts``
    raw, then zstd (a fixed-k store compresses to almost nothing).
``tail``
    float32 byte-plane shuffled, then zstd (the exponent bytes are repetitive).
``doc_starts``
    raw int32 (small), uncompressed.

Decompression is bounded: every frame's output size is known from ``num_tokens`` and ``counts`` before it is
decompressed, so a hostile frame cannot make the reader allocate more than the row's true size.
"""

from __future__ import annotations

import numpy as np
import zstandard

from labelstore.errors import StoreCorruptError

DEFAULT_LEVEL = 3


def _has_allow_extra_data() -> bool:
    try:
        zstandard.ZstdDecompressor().decompress(zstandard.ZstdCompressor().compress(b""), allow_extra_data=False)
    except TypeError:
        return False
    return True


_STRICT_DECOMPRESS = _has_allow_extra_data()


def id_width(id_bits: int) -> int:
    return (id_bits + 7) // 8


def _planes(values: np.ndarray, width: int) -> bytes:
    """``values`` (uint) as ``width`` byte planes: plane j holds byte j of every value."""
    v = np.ascontiguousarray(values, dtype="<u4").view(np.uint8).reshape(-1, 4)[:, :width]
    return np.ascontiguousarray(v.T).tobytes()


def _unplanes(buf: bytes, width: int, n: int) -> np.ndarray:
    planes = np.frombuffer(buf, dtype=np.uint8).reshape(width, n)
    out = np.zeros(n, dtype=np.int64)
    for j in range(width):
        out |= planes[j].astype(np.int64) << (8 * j)
    return out


def _delta_codes(codes: np.ndarray, counts: np.ndarray) -> np.ndarray:
    d = codes.astype(np.int16)
    out = np.empty_like(codes)
    out[1:] = (d[1:] - d[:-1]).astype(np.uint8)
    if codes.size:
        out[0] = codes[0]
        starts = (np.cumsum(counts) - counts)[counts > 0]
        out[starts] = codes[starts]
    return out


def _undelta_codes(deltas: np.ndarray, counts: np.ndarray) -> np.ndarray:
    n = deltas.size
    if n == 0:
        return deltas.copy()
    c = np.cumsum(deltas, dtype=np.int64)
    starts = (np.cumsum(counts) - counts)[counts > 0]
    # restart the running sum at each position: subtract the sum just before each start
    base = np.zeros(n, dtype=np.int64)
    before = np.concatenate([[0], c[:-1]])[starts]
    base[starts] = before - np.concatenate([[0], before[:-1]])
    return ((c - np.cumsum(base)) % 256).astype(np.uint8)


class RowCompressor:
    """zstd encoder for the streams of one row (holds a reusable compression context)."""

    def __init__(self, level: int = DEFAULT_LEVEL):
        self.level = level
        self._c = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)

    def encode(self, id_bits, bpv, input_ids, counts_bytes, counts, ids, values, tail_bytes) -> dict[str, bytes]:
        w = id_width(id_bits)
        if bpv == 1:
            vstream = _delta_codes(np.asarray(values, dtype=np.uint8), counts).tobytes()
        elif bpv == 2:
            vstream = _planes(np.frombuffer(np.asarray(values, np.uint8).tobytes(), "<u2"), 2)
        else:
            vstream = b""
        tail_stream = _planes(np.frombuffer(tail_bytes, dtype="<u4"), 4) if tail_bytes else b""
        z = self._c.compress
        return {
            "input_ids": z(_planes(input_ids, w)),
            "counts": z(counts_bytes),
            "ids": z(_planes(ids, w)),
            "values": z(vstream) if vstream else b"",
            "tail": z(tail_stream) if tail_stream else b"",
        }


class RowDecompressor:
    def __init__(self):
        self._d = zstandard.ZstdDecompressor()

    def _decompress(self, buf: bytes, expected: int) -> bytes | None:
        """The frame's content, or None if bytes follow the frame (a column is exactly one frame)."""
        if _STRICT_DECOMPRESS:
            try:
                return self._d.decompress(buf, max_output_size=expected, allow_extra_data=False)
            except zstandard.ZstdError as exc:
                if "unused data" in str(exc):
                    return None
                raise
        dobj = self._d.decompressobj()  # zstandard < 0.23: no allow_extra_data; the declared size was checked
        out = dobj.decompress(buf)
        return out if dobj.eof and not dobj.unused_data else None

    def frame(self, buf, expected: int, where: str, what: str) -> bytes:
        """One column of one row: exactly one zstd frame whose header declares ``expected`` bytes, nothing after
        it (docs/FORMAT.md 6b); a stream of 0 bytes may also be stored as an empty column (no frame)."""
        if expected == 0 and len(buf) == 0:
            return b""
        try:
            size = zstandard.frame_content_size(bytes(buf[:18]))
        except zstandard.ZstdError:
            size = -2
        if size != expected:
            raise StoreCorruptError(f"{where}: {what} frame declares {size} bytes, the row needs {expected}; damaged")
        try:
            out = self._decompress(bytes(buf), expected)
        except zstandard.ZstdError as exc:
            raise StoreCorruptError(f"{where}: {what} does not decompress ({exc}); damaged") from None
        if out is None:
            raise StoreCorruptError(f"{where}: {what} holds bytes after its zstd frame; damaged")
        if len(out) != expected:
            raise StoreCorruptError(f"{where}: {what} decompressed to {len(out)} bytes, expected {expected}")
        return out

    def ids(self, buf, id_bits: int, n: int, where: str, what: str) -> np.ndarray:
        w = id_width(id_bits)
        return _unplanes(self.frame(buf, n * w, where, what), w, n)

    def values(self, buf, bpv: int, counts: np.ndarray, n: int, where: str) -> np.ndarray:
        raw = self.frame(buf, n * bpv, where, "values")
        if bpv == 1:
            return _undelta_codes(np.frombuffer(raw, dtype=np.uint8), counts)
        if bpv == 2:
            return _unplanes(raw, 2, n).astype("<u2").view(np.uint8)
        return np.zeros(0, dtype=np.uint8)

    def tail(self, buf, T: int, where: str) -> np.ndarray:
        raw = self.frame(buf, 4 * T, where, "tail")
        return _unplanes(raw, 4, T).astype("<u4").view("<f4")
