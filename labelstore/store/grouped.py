"""Tie-grouped ids (format version 6, encoding "grouped"): "expgolomb" minus the order of ids that tie in value.

In a top-k store the stored value codes of a position are non-decreasing along its slots, and many consecutive
entries share one code (a "tie group"; most with a coarse log8 step). Inside such a group the order of the ids
tells a reader nothing (every member decodes to the same weight), yet encoding "expgolomb" pays for it:
``log2(m!)`` bits per group of ``m``. This encoding (docs/FORMAT.md 6d) removes it:

1. **Canonical order.** The writer sorts the ids inside each group by their next-token-swapped code ``c``
   (FORMAT.md 6c), ascending. A group is a maximal run of consecutive slots ``1 .. n - 1`` of one position with
   byte-identical values, so the rule needs no assumption about the codec's byte order (fp16 and e4m3 bytes are
   not ordered like log8 codes) and the values themselves never move. Slot 0 (the teacher's argmax, which
   consumers read as such) is a group of its own and never moves.
2. **Gaps.** The first member of a group is coded as in "expgolomb" (symbol byte plus raw extra bits); every later
   member codes ``c_j - c_{j-1}`` with the same symbol table (not ``- 1``: the writer API accepts one id twice in a
   position, which a gap of 0 still codes, and the measured cost of the extra 1 is nil). The reader knows the
   groups from the values, which it decodes first. Group-first symbols and gap symbols have different
   distributions and go into two zstd frames (measured: about 0.3 to 1 byte per position smaller than one
   interleaved frame on the demo teacher; slot-major order gained under 0.1 byte, so both stay in entry order);
   the extra bits stay one raw stream.

The selection modes whose values are not a descending ranking of one distribution (``sample``, ``topk+sample``,
``argmax``, and every hard-label store: codec ``none``) have no groups: every entry is group-first, the gap frame
is empty, and the ids are coded exactly as "expgolomb" codes them, in the order given.

Values, ``input_ids``, ``counts``, ``tail`` and ``doc_starts`` are exactly the "expgolomb" encoding's. Decoding
is vectorized numpy over a whole row.
"""

from __future__ import annotations

import struct

import numpy as np

from labelstore.errors import StoreCorruptError
from labelstore.store import entropy
from labelstore.store.expgolomb import ExpGolombCoder, _full, decode_codes, encode_codes, swap_next

UNGROUPED_MODES = ("sample", "topk+sample", "argmax")  # their entries are not one descending ranking (FORMAT.md 5b)


def groups_apply(meta: dict) -> bool:
    """Whether a store's ids are tie-grouped (FORMAT.md 6d): every selection mode but the sampled ones and argmax
    (a future monotone mode, e.g. "adaptive", is grouped), and only with stored values (not codec ``none``)."""
    return meta["selection"]["mode"] not in UNGROUPED_MODES and meta["value_codec"]["name"] != "none"


def group_starts(values: np.ndarray, counts: np.ndarray, bpv: int) -> np.ndarray:
    """bool [n]: the entries that start a group. Slots 0 and 1 of every position always do; a later slot does when
    its value bytes differ from the previous slot's (``bpv`` bytes per value, position-major ``values``)."""
    n = int(counts.sum())
    v = np.asarray(values, dtype=np.uint8)
    if bpv == 2:
        v = v.view("<u2")
    elif bpv != 1:
        raise ValueError(f"grouped ids need 1- or 2-byte values, not {bpv}")
    if v.size != n:
        raise ValueError(f"{v.size} values for {n} entries")
    first = np.empty(n, dtype=bool)
    if n == 0:
        return first
    first[0] = True
    np.not_equal(v[1:], v[:-1], out=first[1:])  # one flat comparison; then slots 0 and 1 of every position
    k = _full(counts)
    if k is not None:
        first.reshape(-1, k)[:, :min(k, 2)] = True
    else:
        starts = (np.cumsum(counts) - counts)[counts > 0]
        first[starts] = True
        first[starts[counts[counts > 0] > 1] + 1] = True
    return first


def _ungap(x: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Codes (uint64) from group-first codes and gaps ``x``: running sums restarted at every group-first entry.

    One cumulative sum over the row in uint64 (it cannot overflow: each term is below ``2**26``), minus the sum
    before each group carried over the group by a running maximum (the sums before successive groups never
    decrease). Measured faster than one masked add per slot of a [T, k] grid (2x at k = 32)."""
    cs = np.cumsum(x, dtype=np.uint64)
    base = cs - x
    base *= first  # the sum before each group-first entry, 0 elsewhere ...
    np.maximum.accumulate(base, out=base)  # ... carried over its group
    cs -= base
    return cs


class GroupedCoder(ExpGolombCoder):
    """Encoder and decoder of the "grouped" encoding's ``ids`` column (``values`` and the rest: "expgolomb").

    ``groups``: :func:`groups_apply` of the store's metadata (False: every entry is group-first)."""

    def __init__(self, level: int = entropy.DEFAULT_LEVEL, groups: bool = True):
        super().__init__(level)
        self.groups = groups

    def canonical(self, ids, counts, input_ids, values, bpv):
        """(swapped codes uint32 in canonical order, group-start mask or None): what :meth:`encode` stores."""
        c = swap_next(ids, counts, input_ids)
        if not self.groups or c.size == 0:
            return c, None
        first = group_starts(values, counts, bpv)
        gid = np.cumsum(first, dtype=np.int64)
        # groups are contiguous runs in entry order: sorting by (group, code) sorts inside each group only
        order = np.argsort((gid << 26) | c.astype(np.int64), kind="stable")
        return c[order], first

    def encode(self, id_bits, bpv, input_ids, counts_bytes, counts, ids, values, tail_bytes) -> dict[str, bytes]:
        counts = np.asarray(counts, dtype=np.int64)
        out = self.encode_rest(id_bits, bpv, input_ids, counts_bytes, counts, values, tail_bytes)
        c, first = self.canonical(ids, counts, input_ids, values, bpv)
        x = c.astype(np.int64)
        if first is not None:
            gap = np.flatnonzero(~first)  # never entry 0 (slot 0 starts a group)
            x[gap] -= c[gap - 1]  # >= 0: sorted inside the group (0 where the writer was given one id twice)
        sym, extra = encode_codes(x)
        z = self.zc._c.compress
        if first is None:
            fa, fg = z(sym.tobytes()), z(b"")
        else:
            fa, fg = z(sym[first].tobytes()), z(sym[~first].tobytes())
        out["ids"] = struct.pack("<I", len(fa)) + fa + struct.pack("<I", len(fg)) + fg + extra
        return out

    def ids(self, buf, id_bits: int, counts: np.ndarray, input_ids: np.ndarray, n: int, where: str,
            codes: np.ndarray | None = None, bpv: int = 1) -> np.ndarray:
        """The row's ids (int64), in the stored (canonical) order; ``codes``: the row's decoded value bytes (needed
        when groups apply: they say where the groups are)."""
        buf = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf
        if self.groups and n:
            first = group_starts(codes, counts, bpv)
            na = int(np.count_nonzero(first))
        else:
            first, na = None, n
        frames = []
        at = 0
        for what, size in (("ids group-first symbols", na), ("ids gap symbols", n - na)):
            if buf.size < at + 4:
                raise StoreCorruptError(f"{where}: ids column of {buf.size} bytes has no frame length for its {what};"
                                        " damaged")
            flen = int(buf[at:at + 4].view("<u4")[0])
            if at + 4 + flen > buf.size:
                raise StoreCorruptError(f"{where}: {what} frame of {flen} bytes overruns its column; damaged")
            frames.append(np.frombuffer(self.zd.frame(buf[at + 4:at + 4 + flen], size, where, what), np.uint8))
            at += 4 + flen
        if first is None or na == n:
            return swap_next(decode_codes(frames[0], buf[at:], id_bits, where), counts, input_ids,
                             inplace=True).astype(np.int64)
        sym = np.empty(n, dtype=np.uint8)  # both streams back in entry order (index arrays: faster than masks)
        sym[np.flatnonzero(first)] = frames[0]
        sym[np.flatnonzero(~first)] = frames[1]
        c = _ungap(decode_codes(sym, buf[at:], id_bits, where), first)
        if int(c.max()) >> id_bits:
            raise StoreCorruptError(f"{where}: an ids group's gaps run past {id_bits}-bit ids (beyond the "
                                    "vocabulary); damaged")
        return swap_next(c.astype(np.uint32), counts, input_ids, inplace=True).astype(np.int64)
