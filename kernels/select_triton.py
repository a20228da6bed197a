"""Sampled selection modes in Triton: the inverse-CDF drawer (twin: :func:`select_torch.draw_torch`).

Everything ``[N, V]``-wide runs here or in the top-k kernel (:mod:`labelstore_kernels.extract_triton`); the
``[N, k]``-wide steps (cutting the nucleus, ordering distinct draws) are the twin's torch code, shared.

One program draws the ``S`` samples of one row in three passes over its logits, in tiles of ``BLOCK``:

1. ``m`` = the largest logit among the tokens sampled from. In ``topk+sample`` the exact top part is excluded
   without a list lookup: the top ``k_exact`` are exactly the tokens ranked above the ``k_exact``-th kept entry
   ``(xe, ie)`` in the contract's order, i.e. ``x > xe or (x == xe and id <= ie)``.
2. ``Z`` = the last value of the float64 running sum of ``e = exp((x - m) * (1/T))``: per tile
   ``cdf = carry + cumsum(e)`` and ``carry = max(cdf)`` (the cdf is non-decreasing, so its max is its last
   value; padding lanes weigh 0).
3. The same running sum again (same ops, so the same bits), and for each draw ``j`` with target
   ``t_j = min(u_j Z, prev_float(Z))`` the count ``idx_j += #{v in tile : cdf_v <= t_j}``: at the end
   ``idx_j`` is the first token whose cdf exceeds ``t_j`` (``searchsorted(right=True)`` in the twin). A tile
   none of whose targets lies in ``[cdf_first, cdf_last)`` adds ``0`` or its whole width without comparing.

``u_j`` is splitmix64 of ``(row key, j)`` in uint64 arithmetic, bit-identical to the twin (select_torch's
docstring). Only the tile-wise summation order differs from the twin's running sum (see there for what that
means for parity). Not tuned on a GPU yet: the per-tile ``[SP, BLOCK]`` comparison is sized to stay in
registers (``SP * BLOCK <= 8192``).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from labelstore.codecs import ValueCodec
from labelstore_kernels.contract import Extracted, next_power_of_2, raise_invalid_rows
from labelstore_kernels.extract_triton import extract_topk_triton
from labelstore_kernels.select_torch import extract_selection


@triton.jit
def _mix64(z):
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


@triton.jit
def _masked_logits(x_row, idx, V, xe, ie, HAS_EXCL: tl.constexpr):
    valid = idx < V
    x = tl.load(x_row + idx, mask=valid, other=float("-inf")).to(tl.float32)
    if HAS_EXCL:
        x = tl.where((x > xe) | ((x == xe) & (idx <= ie)), float("-inf"), x)
    return x, valid


@triton.jit
def _draw_kernel(
    X, stride_x, V, KEYS, DRAW_ROWS, EXCL_X, EXCL_ID, INV_T, DRAWS, LSE, S,
    SP: tl.constexpr, BLOCK: tl.constexpr, HAS_EXCL: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    offs = tl.arange(0, BLOCK)
    jj = tl.arange(0, SP)
    xe = 0.0
    ie = 0
    if HAS_EXCL:
        xe = tl.load(EXCL_X + row)
        ie = tl.load(EXCL_ID + row)
    idx_j = tl.full([SP], 0, tl.int64)
    lse = tl.full([], float("-inf"), tl.float64)
    if tl.load(DRAW_ROWS + row) != 0:
        # 1. the largest logit among the tokens sampled from
        m = tl.full([], float("-inf"), tl.float32)
        for start in range(0, V, BLOCK):
            x, valid = _masked_logits(x_row, start + offs, V, xe, ie, HAS_EXCL)
            m = tl.maximum(m, tl.max(x, axis=0))
        m64 = m.to(tl.float64)
        inv_t = tl.load(INV_T)

        # 2. Z = the running sum's last value
        carry = tl.full([], 0.0, tl.float64)
        for start in range(0, V, BLOCK):
            x, valid = _masked_logits(x_row, start + offs, V, xe, ie, HAS_EXCL)
            e = tl.exp((x.to(tl.float64) - m64) * inv_t)  # 0 for -inf (excluded, masked, padding)
            carry = tl.max(carry + tl.cumsum(e, axis=0), axis=0)
        Z = carry
        lse = m64 * inv_t + tl.log(Z)

        # targets t_j = min(u_j Z, prev_float(Z)); u_j = (mix(key + (j + 1) G) >> 11) * 2^-53
        key = tl.load(KEYS + row).to(tl.uint64, bitcast=True)
        h = _mix64(key + (jj.to(tl.uint64) + 1) * 0x9E3779B97F4A7C15)
        u = (h >> 11).to(tl.int64).to(tl.float64) * 1.1102230246251565e-16
        z_prev = (Z.to(tl.int64, bitcast=True) - 1).to(tl.float64, bitcast=True)
        tgt = tl.minimum(u * Z, z_prev)

        # 3. idx_j = #{v : cdf_v <= t_j}, tile by tile
        carry = tl.full([], 0.0, tl.float64)
        for start in range(0, V, BLOCK):
            idx = start + offs
            x, valid = _masked_logits(x_row, idx, V, xe, ie, HAS_EXCL)
            e = tl.exp((x.to(tl.float64) - m64) * inv_t)
            cdf = carry + tl.cumsum(e, axis=0)
            lo = tl.min(cdf, axis=0)
            carry = tl.max(cdf, axis=0)
            inside = (tgt >= lo) & (tgt < carry)
            if tl.sum(inside.to(tl.int32), axis=0) > 0:
                le = (cdf[None, :] <= tgt[:, None]) & valid[None, :]
                idx_j += tl.sum(le.to(tl.int64), axis=1)
            else:
                n_valid = tl.minimum(V - start, BLOCK).to(tl.int64)
                idx_j += tl.where(tgt >= carry, n_valid, 0)
        idx_j = tl.where(jj < S, idx_j, -1)
    else:
        idx_j = tl.full([SP], -1, tl.int64)
    tl.store(DRAWS + row * SP + jj, idx_j)
    tl.store(LSE + row, lse)


def draw_triton(
    logits: torch.Tensor,
    keys: np.ndarray,
    draw_rows: torch.Tensor,
    samples: int,
    temperature: float,
    exclude: torch.Tensor | None = None,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`labelstore_kernels.select_torch.draw_torch` (CUDA, or CPU under TRITON_INTERPRET=1)."""
    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    n_rows, V = x.shape
    dev = x.device
    SP = next_power_of_2(samples)
    draws = torch.empty(n_rows, SP, dtype=torch.int64, device=dev)
    lse = torch.empty(n_rows, dtype=torch.float64, device=dev)
    if n_rows == 0:
        return draws[:, :samples], lse
    has_excl = exclude is not None and exclude.shape[1] > 0
    if exclude is None:
        m = x.amax(1)  # NaN propagates
        bad = ~torch.isfinite(m)
        if bool(bad.any()):
            rows = bad.nonzero().flatten()
            raise_invalid_rows(x, rows[:8].tolist(), rows.numel())
    if has_excl:
        last = exclude[:, -1:].long()
        excl_x = x.gather(1, last)[:, 0].float().contiguous()
        excl_id = last[:, 0].to(torch.int32).contiguous()
    else:
        excl_x = torch.zeros(1, dtype=torch.float32, device=dev)
        excl_id = torch.zeros(1, dtype=torch.int32, device=dev)
    bl = block if block is not None else max(16, min(1024, 8192 // SP, next_power_of_2(V)))
    keys_t = torch.from_numpy(np.ascontiguousarray(keys, dtype=np.int64)).to(dev)
    inv_t = torch.tensor([1.0 / float(temperature)], dtype=torch.float64, device=dev)
    _draw_kernel[(n_rows,)](
        x, x.stride(0), V, keys_t, draw_rows.to(torch.int8).contiguous(), excl_x, excl_id, inv_t, draws, lse,
        samples, SP=SP, BLOCK=bl, HAS_EXCL=has_excl, num_warps=4,
    )  # fmt: skip
    return draws[:, :samples], lse


def extract_select_triton(logits: torch.Tensor, selection: dict, *, temperature: float = 1.0,
                          codec: str | dict | ValueCodec = "log8", seed: int = 0, row_ids=None,
                          groups=None) -> Extracted:
    """Every selection mode with the Triton kernels (top-k and drawing); see :func:`labelstore_kernels.extract`.
    ``adaptive`` allocates in torch after the Triton top-k (:mod:`labelstore_kernels.allocate_torch`)."""
    return extract_selection(logits, selection, temperature=temperature, codec=codec, seed=seed, row_ids=row_ids,
                             topk_fn=extract_topk_triton, draw_fn=draw_triton, groups=groups)
