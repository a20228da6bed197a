"""Fused LM-head top-k in Triton: ``hidden @ W^T`` tile by tile, top-k and the exact tail, no ``[N, V]`` logits.

Twin and contract: :func:`labelstore_kernels.fused_head_torch.extract_fused_torch` with a ``topk`` / ``argmax``
selection (same :class:`Extracted`). Two stages, "tile top-k, then merge":

1. **Tile kernel** (grid: row blocks of ``BM`` x vocabulary tiles of ``BV``). The program computes its logits
   tile ``z = post(h[rows] @ W[cols]^T + b)`` with ``tl.dot`` over ``BD``-wide slices of the hidden size
   (``post``: scale, divisor, soft-cap ``c tanh(z / c)`` via ``tanh(u) = 2 sigmoid(2u) - 1``; ids at or above the
   valid vocabulary get ``-inf``), then, per row of the tile,

   * ranks entries by the 64-bit key of :mod:`labelstore_kernels.extract_triton` (order-preserving image of the
     float32 logit in the high half, ``2^31 - 1 - id`` in the low half: unique keys, larger key = larger logit,
     ties to the smaller id) and keeps the ``KP = next_pow2(k)`` largest keys with ``tl.topk``;
   * sums the weights ``2^((z - m_t) c2)`` of the entries *below* the KP-th key (``m_t`` the tile's row max):
     only non-kept entries, a sum of positive terms, never ``1 - sum(kept)``;
   * flags NaN and ``+inf``.

   Columns past ``V`` get the minimal key (never kept, weight 0). Only ``KP`` keys, two floats and a flag per
   (row, tile) leave the program: ``N x ceil(V / BV) x (8 KP + 9)`` bytes, not ``N x V`` logits.
2. **Merge** (torch, :func:`merge_tiles`): the ``k`` largest of a row's ``ceil(V / BV) KP`` candidate keys are its
   kept entries, in the contract's order because keys are unique. With ``m`` the row max, ``tail = sum_t s_t
   2^((m_t - m) c2) + sum(weights of the candidates not kept)`` and ``lse = m / T + ln(tail + kept)``, as in
   the twin.

The matmul runs in float32 (``input_precision="ieee"``: no TF32) from inputs in the head's dtype; on a bf16 head
the float32 logits are rounded to bf16 before ``post`` (as ``nn.Linear`` returns them), so the twin's logits are
reproduced to float rounding (the soft-cap's ``tanh`` formula differs from torch's by ulps).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from labelstore.codecs import ValueCodec, get_codec
from labelstore.constants import LOG2E, TRITON_MAX_K
from labelstore_kernels.contract import Extracted, next_power_of_2, raise_invalid_rows
from labelstore_kernels.extract_torch import f32
from labelstore_kernels.extract_triton import _MINKEY, _make_key
from labelstore_kernels.fused_head_torch import LMHead, head_logits

_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _fused_head_tile_kernel(
    h_ptr, w_ptr, b_ptr, keys_ptr, sums_ptr, tmax_ptr, bad_ptr,
    N, V, D, VALID, n_tiles, stride_h, stride_w,
    scale, divisor, softcap, c2,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, ROUND: tl.constexpr,
    KP: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_v * BV + tl.arange(0, BV)
    in_r = rows < N
    in_c = cols < V
    acc = tl.zeros((BM, BV), dtype=tl.float32)
    for d0 in range(0, D, BD):
        dk = d0 + tl.arange(0, BD)
        a = tl.load(h_ptr + rows[:, None] * stride_h + dk[None, :], mask=in_r[:, None] & (dk < D)[None, :], other=0.0)
        b = tl.load(w_ptr + cols[None, :] * stride_w + dk[:, None], mask=in_c[None, :] & (dk < D)[:, None], other=0.0)
        acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    z = acc
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=in_c, other=0.0).to(tl.float32)[None, :]
    if ROUND == 1:  # the head's own rounding of its output (nn.Linear returns its dtype)
        z = z.to(tl.bfloat16).to(tl.float32)
    elif ROUND == 2:
        z = z.to(tl.float16).to(tl.float32)
    z = z * scale
    z = z / divisor
    if HAS_SOFTCAP:
        u = z / softcap
        z = (2.0 / (1.0 + tl.exp(-2.0 * u)) - 1.0) * softcap
    z = tl.where((cols < VALID)[None, :], z, float("-inf"))
    keys = _make_key(z, cols[None, :] + tl.zeros((BM, BV), dtype=tl.int32))
    keys = tl.where(in_c[None, :], keys, _MINKEY)
    top = tl.topk(keys, KP, dim=1)  # [BM, KP], descending
    kth = tl.min(top, axis=1)
    mt = tl.max(tl.where(in_c[None, :], z, float("-inf")), axis=1)
    ms = tl.where(mt == float("-inf"), 0.0, mt)
    e = tl.exp2((z - ms[:, None]) * c2)
    s = tl.sum(tl.where(in_c[None, :] & (keys < kth[:, None]), e, 0.0), axis=1)
    bad = tl.sum(((z != z) | (z == float("inf"))).to(tl.int32), axis=1)
    slot = rows * n_tiles + pid_v
    kk = tl.arange(0, KP)
    tl.store(keys_ptr + slot[:, None] * KP + kk[None, :], top, mask=in_r[:, None])
    tl.store(sums_ptr + slot, s, mask=in_r)
    tl.store(tmax_ptr + slot, mt, mask=in_r)
    tl.store(bad_ptr + slot, bad, mask=in_r)


def key_values(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(float32 logits, int64 ids)`` of 64-bit keys (the inverse of ``_make_key``)."""
    hi = (keys >> 32).to(torch.int32)
    b = hi ^ ((hi >> 31) & 0x7FFFFFFF)
    return b.view(torch.float32), 0x7FFFFFFF - (keys & 0x7FFFFFFF)


def merge_tiles(keys, sums, tmax, k: int, temperature: float, codec: ValueCodec) -> Extracted:
    """Stage 2 (module docstring): ``keys`` int64 ``[n, tiles, KP]``, ``sums`` / ``tmax`` float32 ``[n, tiles]``."""
    n = keys.shape[0]
    c2 = f32(LOG2E / temperature)
    inv_t = f32(1.0 / temperature)
    flat = keys.reshape(n, -1)
    top = torch.topk(flat, k, dim=1).values  # unique keys: sorted by (value desc, id asc)
    kval, kid = key_values(top)
    m = tmax.amax(1)
    e = lambda v: torch.exp2((v - m[:, None]) * c2)  # noqa: E731 - 0 for -inf
    cval, _ = key_values(flat)
    rest = torch.where(flat < top[:, -1:], e(cval), 0.0)  # candidates not kept (minimal keys: -inf -> 0)
    rest = torch.where(flat == _MINKEY.value, 0.0, rest)
    tail = (sums * torch.exp2((torch.where(torch.isfinite(tmax), tmax, m[:, None]) - m[:, None]) * c2)).sum(1)
    tail = tail + rest.sum(1)
    kept = e(kval).sum(1)
    total = tail + kept
    return Extracted(kid.to(torch.int32), codec.encode((kval - m[:, None]) * inv_t),
                     (kval > float("-inf")).sum(1).to(torch.int32), tail / total, m * inv_t + torch.log(total))


def extract_fused_topk_triton(hidden: torch.Tensor, head: LMHead, k: int, *, temperature: float = 1.0,
                              codec: str | dict | ValueCodec = "log8", block_m: int = 16, block_v: int | None = None,
                              block_d: int = 32) -> Extracted:
    """Top-k (``k=1``, codec ``none``: argmax) straight from ``hidden [N, D]`` (module docstring)."""
    cdc = get_codec(codec)
    head = head.to_compute_dtype()
    V, D = head.vocab_size, head.hidden_size
    if hidden.dim() != 2 or hidden.shape[1] != D:
        raise ValueError(f"hidden must be [N, {D}] (the head's input width), got {tuple(hidden.shape)}")
    k = min(int(k), V)
    if not 1 <= k <= TRITON_MAX_K:
        raise ValueError(f"the fused Triton kernel keeps 1..{TRITON_MAX_K} entries per row, got k={k}")
    kp = max(2, next_power_of_2(k))
    bv = block_v or max(kp, min(1024, next_power_of_2(V)))
    if bv < kp:
        raise ValueError(f"block_v={bv} must be >= next_pow2(k)={kp}")
    w = head.weight.contiguous()
    h = hidden.to(device=w.device, dtype=w.dtype).contiguous()
    n = h.shape[0]
    tiles = triton.cdiv(V, bv)
    keys = torch.empty(n, tiles, kp, dtype=torch.int64, device=w.device)
    sums = torch.empty(n, tiles, dtype=torch.float32, device=w.device)
    tmax = torch.empty(n, tiles, dtype=torch.float32, device=w.device)
    bad = torch.empty(n, tiles, dtype=torch.int32, device=w.device)
    if n:
        bias = head.bias.contiguous() if head.bias is not None else w
        grid = (triton.cdiv(n, block_m), tiles)
        _fused_head_tile_kernel[grid](
            h, w, bias, keys, sums, tmax, bad, n, V, D,
            V if head.valid_vocab is None else min(V, head.valid_vocab), tiles, h.stride(0), w.stride(0),
            f32(head.scale), f32(head.divisor), f32(head.softcap or 1.0), f32(LOG2E / temperature),
            HAS_BIAS=head.bias is not None, HAS_SOFTCAP=head.softcap is not None,
            ROUND={torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[w.dtype],
            KP=kp, BM=block_m, BV=bv, BD=block_d,
        )
    rows_bad = ((bad.sum(1) > 0) | ~torch.isfinite(tmax.amax(1))).nonzero().flatten() if n else bad[:0, 0]
    if rows_bad.numel():
        rows = rows_bad.tolist()[:8]
        z = torch.full((max(rows) + 1, V), 0.0, device=w.device)
        z[rows] = head_logits(h[rows], head).float()
        raise_invalid_rows(z, rows, int(rows_bad.numel()))
    return merge_tiles(keys, sums, tmax, k, float(temperature), cdc)
