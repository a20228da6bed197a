"""Fused top-k extraction in Triton: one read of the logits per row.

Contract: :mod:`labelstore_kernels.contract` (twin: :mod:`labelstore_kernels.extract_torch`).

One program handles one row ``x[0:V]`` and streams it in tiles of ``BLOCK_V`` logits. Per tile it does

1. **Online max** ``m`` with base-2 exponentials (``c2 = log2(e) / T``, so ``exp((x - m) / T) =
   2^((x - m) c2)``). The logsumexp needs no separate sum: every weight ends up either in the tail sum
   ``t`` (below, rescaled by ``2^((m - m') c2)`` whenever the max moves to ``m'``) or among the kept
   entries, so ``lse = m / T + ln(t + kept)``. Masked lanes load ``-inf`` and weigh ``2^-inf = 0``.

2. **Top-k selection by a rising bound.** Entries are ranked by a 64-bit key: the high 32 bits are an
   order-preserving integer image of the float32 logit (``b ^ ((b >> 31) & 0x7fffffff)`` on the bits ``b``;
   ``-0.0`` is first folded to ``+0.0``), the low 32 bits are ``2^31 - 1 - id``. Keys are unique and
   ``key_a > key_b`` iff ``x_a > x_b or (x_a == x_b and id_a < id_b)``: the contract's order, so
   ``tl.topk`` / ``tl.max`` over keys carry the ids along. Let ``KP = next_pow2(k)``. The program keeps a
   lower bound of the ``KP``-th largest key seen so far; an entry below it can never be kept. Later tiles
   have larger ids than every entry seen, so for them "key above the bound" is the float test
   ``x >= lo``, ``lo`` being the next float32 above the bound's value (ties lose to the earlier id): the hot
   loop compares floats only.

   Entries passing the test (*candidates*) are appended to the row's scratch buffer (positions from
   ``tl.cumsum`` of the candidate mask: a stream compaction). When it holds more than ``2 KP`` keys it is
   *flushed*: ``tl.topk`` keeps the best ``KP`` (chunk by chunk, merging into a running top ``KP``, so no
   sort is wider than ``CHUNK``) and their ``KP``-th key raises the bound. After the first few tiles the
   bound is close to the final ``KP``-th logit and tiles add almost nothing, so the bitonic sorts run on a
   few hundred keys a few times per row, not on ``V`` logits. When a tile has more candidates than the
   buffer has room (the first tile, ascending rows), it is first thinned with its *group maxima*: with
   ``2 KP`` groups, the ``KP``-th largest group maximum ``g`` is a key with ``KP`` distinct entries
   ``>= g``, hence ``g <=`` the ``KP``-th largest key: entries below ``g`` are dropped and the bound rises
   to ``g``. Heavy ties can leave up to ``BLOCK_V`` candidates; the scratch row holds ``4 KP + BLOCK_V``.

3. **Exact tail in the same pass.** Every entry is added to ``t`` at the moment it is known not to be
   kept: a non-candidate, a candidate dropped by the group test, a buffer entry evicted by a flush, or a
   final entry ranked ``k..KP-1``. Each entry is counted once and only non-kept entries are ever summed, so
   ``tail = t / (t + kept)`` has relative precision, never the cancellation of ``1 - sum(kept)``.

4. **Encoding** of ``r = (x - m) / T`` for the ``k`` kept entries with integer ops (no float8 casts, which
   need sm_89 on GPU and round wrongly in the interpreter, triton #8322).

A per-row status flags NaN (it is never a candidate, so it poisons ``t``), ``+inf`` and rows without a
finite entry (``m``); the launcher raises :class:`labelstore.errors.InvalidLogitsError` naming them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from labelstore.codecs import ValueCodec
from labelstore.constants import LOG2E, TRITON_MAX_K
from labelstore_kernels.contract import (
    Extracted,
    empty_outputs,
    next_power_of_2,
    prepare,
    raise_invalid_rows,
)
from labelstore_kernels.extract_torch import f32

CODEC_IDS = {"log8": 0, "e4m3": 1, "e5m2": 2, "fp16": 3, "none": 4}
SCRATCH_BYTES = 64 << 20  # per launch; more rows are processed in several launches

_MINKEY = tl.constexpr(-9223372036854775807)  # below every real key (the -inf keys are ~ -2^63 + 2^55)


@triton.jit
def _make_key(x, idx):
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 -> +0.0: equal floats get equal high halves
    b = x.to(tl.int32, bitcast=True)
    k32 = b ^ ((b >> 31) & 0x7FFFFFFF)  # flip the magnitude bits of negatives: signed order == float order
    return (k32.to(tl.int64) << 32) | (0x7FFFFFFF - idx).to(tl.int64)


@triton.jit
def _key_value(key):
    k32 = (key >> 32).to(tl.int32)
    b = k32 ^ ((k32 >> 31) & 0x7FFFFFFF)  # the map above is an involution
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _key_index(key):
    return 0x7FFFFFFF - (key & 0x7FFFFFFF).to(tl.int32)


@triton.jit
def _fp8_code(w, MBITS: tl.constexpr, EBIAS: tl.constexpr):
    """float8 bits (e4m3fn: MBITS=3, EBIAS=7; e5m2: 2, 15) of ``w`` in [0, max finite], round to nearest even.

    Normal range (float32 exponent ``E >= 128 - EBIAS``): add the rounding bias to the float32 bits and
    shift the mantissa from 23 to MBITS bits; a carry rolls into the exponent as it should. Subnormal
    range: ``code = rne(w / 2^(1 - EBIAS - MBITS)) = rne(M * 2^(E - 150) * 2^(EBIAS + MBITS - 1))``, an
    integer right shift of the 24-bit significand ``M`` by ``s = 151 - EBIAS - MBITS - E`` with
    round-half-even on the shifted-out bits. Code 2^MBITS is the smallest normal, so both ranges agree.
    """
    u = w.to(tl.int32, bitcast=True)
    E = (u >> 23) & 0xFF
    SHIFT: tl.constexpr = 23 - MBITS
    normal = ((u + ((1 << (SHIFT - 1)) - 1) + ((u >> SHIFT) & 1)) >> SHIFT) - ((127 - EBIAS) << MBITS)
    M = tl.where(E > 0, (u & 0x7FFFFF) | 0x800000, u & 0x7FFFFF)
    s = tl.minimum(tl.maximum(151 - EBIAS - MBITS - tl.maximum(E, 1), 1), 31)
    q = M >> s
    rem = M & ((1 << s) - 1)
    half = 1 << (s - 1)
    q = q + ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(tl.int32)
    return tl.where(E >= 128 - EBIAS, normal, q)


@triton.jit
def _raise_lo(lo, key):
    """Candidate bound after learning that ``key`` is <= the KP-th largest key.

    Entries of later tiles with ``x == value(key)`` have larger ids, hence smaller keys: they lose, and the
    bound becomes the next float32 above ``value(key)`` (high key half + 1; above ``-inf`` it is -FLT_MAX).
    """
    k32 = (key >> 32).to(tl.int32) + 1
    b = k32 ^ ((k32 >> 31) & 0x7FFFFFFF)
    return tl.maximum(lo, b.to(tl.float32, bitcast=True))


@triton.jit
def _select(buf, n_buf, m_ref, c2, KP: tl.constexpr, SIZE: tl.constexpr):
    """Best KP keys of ``buf[0:n_buf]`` (n_buf <= SIZE), sorted; and the summed weight of the others."""
    offs = tl.arange(0, SIZE)
    in_b = offs < n_buf
    bk = tl.load(buf + offs, mask=in_b, other=_MINKEY)
    top = tl.topk(bk, KP)
    kth = tl.min(top, axis=0)
    ev = tl.exp2((_key_value(bk) - m_ref) * c2)  # garbage on masked lanes; where() drops it
    return top, tl.sum(tl.where(in_b & (bk < kth), ev, 0.0), axis=0)


@triton.jit
def _reduce_buffer(buf, n_buf, m_ref, c2, KP: tl.constexpr, CHUNK: tl.constexpr):
    """Best KP keys of ``buf[0:n_buf]`` (any n_buf), sorted; and the summed weight of the others.

    Chunks of CHUNK keys: the chunk's top KP is merged into the running top KP (a sort of 2 KP keys), so
    no sort is wider than CHUNK whatever the buffer holds. Each evicted entry is counted once: when it loses
    in its chunk, or when it loses a merge.
    """
    run = tl.full([KP], _MINKEY, tl.int64)
    ev = tl.full([], 0.0, tl.float32)
    for c0 in range(0, n_buf, CHUNK):
        top, ev_c = _select(buf + c0, n_buf - c0, m_ref, c2, KP, CHUNK)
        both = tl.reshape(tl.join(run, top), (2 * KP,))
        run = tl.topk(both, KP)
        lost = (both != _MINKEY) & (both < tl.min(run, axis=0))
        ev += ev_c + tl.sum(tl.where(lost, tl.exp2((_key_value(both) - m_ref) * c2), 0.0), axis=0)
    return run, ev


@triton.jit
def _extract_topk_kernel(
    X, stride_x, V,
    IDS, VALS, COUNTS, TAIL, LSE, STATUS, SCRATCH,
    k, inv_t, c2, step,
    BLOCK_V: tl.constexpr, KP: tl.constexpr, CAP: tl.constexpr, NG: tl.constexpr, CHUNK: tl.constexpr,
    CODEC: tl.constexpr, BPV: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    buf = SCRATCH + row * (CAP + BLOCK_V)
    offs = tl.arange(0, BLOCK_V)
    kp_offs = tl.arange(0, KP)
    NEG_INF: tl.constexpr = float("-inf")

    m = tl.full([], NEG_INF, tl.float32)  # running max of x
    t = tl.full([], 0.0, tl.float32)  # sum of exp((x - m) / T) over entries known not to be kept
    lo = tl.full([], NEG_INF, tl.float32)  # candidates: x >= lo (-inf: no bound yet, all are)
    n_buf = tl.full([], 0, tl.int32)

    x_next = tl.load(x_row + offs, mask=offs < V, other=NEG_INF, eviction_policy="evict_first")
    for start in range(0, V, BLOCK_V):
        idx = start + offs
        valid = idx < V
        x = x_next.to(tl.float32)
        # prefetch the next tile while this one is processed (two tiles in flight per program)
        x_next = tl.load(x_row + idx + BLOCK_V, mask=idx + BLOCK_V < V, other=NEG_INF,
                         eviction_policy="evict_first")

        # 1. online max; m_ref keeps -inf - -inf out of the exponent. The sum itself is t + kept, see 3.
        x_max = tl.max(x, axis=0)
        m_new = tl.maximum(m, x_max)
        m_ref = tl.where(m_new == NEG_INF, 0.0, m_new)
        t = t * tl.exp2((m - m_ref) * c2)
        m = m_new

        # 2-3. candidates (NaN never is one). Every other entry is never kept: its weight goes to the tail
        #    right away. A NaN lands there too and poisons t, which is how the row is reported.
        cand = valid & (x >= lo)
        t += tl.sum(tl.where(cand, 0.0, tl.exp2((x - m_ref) * c2)), axis=0)
        if x_max >= lo:
            n_c = tl.sum(cand.to(tl.int32), axis=0)
            key = _make_key(x, idx)
            if n_c > CAP - n_buf:
                # many candidates (early tiles): thin the tile with the KP-th largest of its NG = 2 KP
                # group maxima, a key g with KP distinct entries >= g, so g <= the KP-th largest key
                gmax = tl.max(tl.reshape(tl.where(cand, key, _MINKEY), (NG, BLOCK_V // NG)), axis=1)
                g = tl.min(tl.topk(gmax, KP), axis=0)
                if g != _MINKEY:
                    drop = cand & (key < g)
                    t += tl.sum(tl.where(drop, tl.exp2((x - m_ref) * c2), 0.0), axis=0)
                    cand = cand & (key >= g)
                    n_c = tl.sum(cand.to(tl.int32), axis=0)
                    lo = _raise_lo(lo, g)
            # stream compaction: candidate j goes to buf[n_buf + (number of candidates before j)].
            # n_buf <= CAP / 2 here and n_c <= BLOCK_V: the row's scratch holds CAP + BLOCK_V keys.
            pos = n_buf + tl.cumsum(cand.to(tl.int32), axis=0) - 1
            tl.store(buf + pos, key, mask=cand)
            n_buf += n_c

        if n_buf > CAP // 2:
            # flush: keep the best KP keys (n_buf > KP, so they are all real), evict the rest into t
            tl.debug_barrier()
            top, ev = _reduce_buffer(buf, n_buf, m_ref, c2, KP, CHUNK)
            t += ev
            tl.debug_barrier()
            tl.store(buf + kp_offs, top)
            n_buf = n_buf * 0 + KP
            lo = _raise_lo(lo, tl.min(top, axis=0))
            tl.debug_barrier()

    # bad row: a NaN (t is NaN), +inf (m), or no finite entry (m = -inf); the launcher names them
    bad = (t != t) | (m == float("inf")) | (m == NEG_INF)

    # final selection: the best KP of the buffer, sorted by key (= the contract's order)
    m_ref = tl.where(m == NEG_INF, 0.0, m)
    tl.debug_barrier()
    top, ev = _select(buf, n_buf, m_ref, c2, KP, 2 * KP)  # every tile ends with n_buf <= CAP / 2 = 2 KP
    t += ev

    real = kp_offs < n_buf  # V >= k, so ranks < k are always real
    keep = kp_offs < k
    tx = _key_value(top)
    te = tl.where(real, tl.exp2((tx - m_ref) * c2), 0.0)
    t += tl.sum(tl.where(keep, 0.0, te), axis=0)  # ranks k..KP-1 are not kept
    total = t + tl.sum(tl.where(keep, te, 0.0), axis=0)

    tl.store(STATUS + row, bad.to(tl.int32))
    tl.store(TAIL + row, t / total)
    tl.store(LSE + row, m_ref * inv_t + tl.log(total))
    tl.store(COUNTS + row, tl.sum((keep & (tx > NEG_INF)).to(tl.int32), axis=0))
    tl.store(IDS + row * k + kp_offs, _key_index(top), mask=keep)

    # 4. values: r = log p - log p_max = (x - m) / T, encoded exactly like labelstore.codecs
    r = (tx - m_ref) * inv_t
    vals = VALS + row * (k * BPV)
    if CODEC == 0:  # log8: min(254, floor(-r / step + 0.5)); 255 for p = 0
        q = tl.minimum(tl.maximum(tl.floor(tl.math.div_rn(-r, step) + 0.5), 0.0), 254.0)
        code = tl.where(r == NEG_INF, 255, q.to(tl.int32))
        tl.store(vals + kp_offs, code.to(tl.uint8), mask=keep)
    elif CODEC == 1:  # e4m3fn bits of clamp(exp(r) * 256, 0, 448)
        w = tl.minimum(tl.maximum(tl.exp(r) * 256.0, 0.0), 448.0)
        tl.store(vals + kp_offs, _fp8_code(w, 3, 7).to(tl.uint8), mask=keep)
    elif CODEC == 2:  # e5m2 bits of clamp(exp(r) * 32768, 0, 57344)
        w = tl.minimum(tl.maximum(tl.exp(r) * 32768.0, 0.0), 57344.0)
        tl.store(vals + kp_offs, _fp8_code(w, 2, 15).to(tl.uint8), mask=keep)
    elif CODEC == 3:  # float16 bits of exp(r) * 1024, little-endian
        h = (tl.exp(r) * 1024.0).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        tl.store(vals + 2 * kp_offs, (h & 0xFF).to(tl.uint8), mask=keep)
        tl.store(vals + 2 * kp_offs + 1, (h >> 8).to(tl.uint8), mask=keep)


def default_block_v(V: int, kp: int) -> int:
    """Tile width: 2048 logits (4 KiB of bf16) once V allows; at least 2 KP (the thinning groups)."""
    return max(2 * kp, min(2048, next_power_of_2(V)))


def extract_topk_triton(
    logits: torch.Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    codec: str | dict | ValueCodec = "log8",
    block_v: int | None = None,
    num_warps: int | None = None,
    validate: bool = True,
) -> Extracted:
    """Top-k extraction with the Triton kernel (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

    ``block_v`` (a power of two ``>= 2 * next_pow2(k)``) and ``num_warps`` are tuning knobs; the result does
    not depend on them. ``k`` is limited to 256. ``validate=False`` skips the bad-row check (and its device
    sync), for benchmarks only: rows with NaN / +inf / no finite entry then come back as garbage.
    """
    x, k, temperature, cdc = prepare(logits, k, temperature, codec)
    if k > TRITON_MAX_K:
        raise ValueError(f"the Triton extraction kernel supports k <= {TRITON_MAX_K}, got {k}; use the torch twin")
    if x.stride(-1) != 1:
        x = x.contiguous()
    n_rows, V = x.shape
    if V >= 2**31 - 1:
        raise ValueError(f"vocabulary too large for the Triton kernel: V = {V}")
    out = empty_outputs(n_rows, k, cdc, x.device)
    if n_rows == 0:
        return out
    kp = max(2, next_power_of_2(k))  # tl.topk(x, 1) breaks on older Triton (a 0-d hypercube)
    cap = 4 * kp
    bv = block_v if block_v is not None else default_block_v(V, kp)
    if bv & (bv - 1) or bv < 2 * kp:
        raise ValueError(f"block_v must be a power of two >= 2 * next_pow2(k) = {2 * kp}, got {bv}")
    warps = num_warps if num_warps is not None else (8 if bv >= 4096 else 4)
    chunk = max(cap, 256)  # flush sort width: wider chunks mean fewer merges (and a faster interpreter)
    status = torch.empty(n_rows, dtype=torch.int32, device=x.device)
    rows_per_launch = max(1, min(n_rows, SCRATCH_BYTES // ((cap + bv) * 8)))
    scratch = torch.empty(rows_per_launch, cap + bv, dtype=torch.int64, device=x.device)
    inv_t = f32(1.0 / temperature)
    c2 = f32(LOG2E / temperature)
    step = f32(cdc.param.get("step", 1.0))
    for s0 in range(0, n_rows, rows_per_launch):
        n = min(rows_per_launch, n_rows - s0)
        _extract_topk_kernel[(n,)](
            x[s0:], x.stride(0), V,
            out.ids[s0:], out.values[s0:], out.counts[s0:], out.tail[s0:], out.lse[s0:], status[s0:], scratch,
            k, inv_t, c2, step,
            BLOCK_V=bv, KP=kp, CAP=cap, NG=2 * kp, CHUNK=chunk,
            CODEC=CODEC_IDS[cdc.name], BPV=cdc.bytes_per_value,
            num_warps=warps,
        )  # fmt: skip
    if not validate:
        return out
    bad = (status != 0).nonzero().flatten()
    if bad.numel():
        raise_invalid_rows(x, bad[:8].tolist(), bad.numel())
    return out
