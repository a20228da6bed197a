"""Selection modes beyond top-k, pure-torch twin: the CPU path and the test oracle of ``select_triton``.

What each mode stores is docs/FORMAT.md section 5b; the public entry point is :func:`labelstore_kernels.extract`,
which takes the store's ``meta["selection"]`` dict. Every mode returns an :class:`Extracted` whose first
``counts[i]`` entries of row ``i`` are what the writer stores (``StoreWriter.add`` takes them flattened):

``topp``         top-k extraction (width ``min(k, V)``), then per row the smallest most-probable prefix with mass
                 ``>= p``, clamped to ``[min_k, k]`` (and to the finite entries). Entries past the count keep
                 their (distinct) top-k ids and carry the codec's zero code. ``tail`` is the exact mass outside
                 the kept prefix: the top-k tail plus the dropped top-k entries, a sum of positive terms.
``sample``       ``S`` draws with replacement from ``softmax(z / T)``; the distinct ids ordered by count descending,
                 then smaller id, with ``count8`` bytes (the number of draws). ``counts`` = distinct ids,
                 ``tail`` = 0 (not stored), ``lse`` = ``logsumexp(z / T)``. Width ``S``.
``topk+sample``  the ``k_exact`` most probable tokens exactly (top-k extraction: codec bytes, exact ``tail`` and
                 ``lse``), then the distinct ids of ``S`` draws from the teacher restricted to the other tokens
                 (renormalised), ``count8`` bytes. Width ``min(k_exact, V) + S``. Rows whose tail is exactly 0
                 (no other finite token, or a tail below float32's range) draw nothing: the samples would carry
                 weight ``t * c / S = 0``. Draws exist only where the top part is full, which is what the
                 reader's "slot < k_exact is exact" rule needs.
``adaptive``     top-k extraction (width ``min(k, V)``), then per row the ``k_i`` entries a per-group budget of
                 ``mean_k`` entries per row allocates (:mod:`labelstore_kernels.allocate_torch`); padded as
                 ``topp`` (ids kept, the codec's zero code), ``tail`` exact in the same way.
Padding of the sampled part: id 0 with count byte 0 (weight 0).

Random numbers: counter-based, bit-identical in the Triton kernel
-----------------------------------------------------------------
splitmix64 (Steele, Lea and Flood 2014; Java's ``SplittableRandom``), used as a hash of a counter. All
arithmetic is modulo 2^64, ``G = 0x9E3779B97F4A7C15``::

    mix(z)     = z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB; z ^ (z >> 31)
    key(s, r)  = mix(mix(s + G) ^ r)                   s: the seed, r: the row id (two's complement of the int64)
    u_j        = (mix(key(s, r) + (j + 1) G) >> 11) * 2^-53          draw j = 0 .. S-1, u_j in [0, 1)

Draw ``j`` of a row depends on ``(seed, row id, j)`` and the row's logits only: never on the batch, its order,
the chunking or the rank. The caller passes global row ids (compile: ``sample_id * max_len + t``).

Inverse-CDF sampling, float64
-----------------------------
Over the tokens sampled from (all of them, or all but the top ``k_exact``; excluded and ``-inf`` tokens weigh
0), with ``m`` their largest logit: ``e_v = exp((z_v - m) * (1/T))`` and ``cdf = cumsum(e)`` in float64, in
vocabulary order; ``Z = cdf[V-1]``. Target ``t_j = min(u_j Z, prev_float(Z))`` and draw ``j`` is token
``#{v : cdf_v <= t_j}``, the first ``v`` with ``cdf_v > t_j`` (``searchsorted(right=True)``): since the cdf
is non-decreasing and ``t_j < Z``, the token exists and has ``e > 0``. Precision: the float64 running sum is
off by at most ``~V 2^-53 Z``, so each token's probability is exact to ``~2 V 2^-53`` absolute (``4e-12`` at
``V = 2^15``, ``3e-11`` at ``2^17``), against a sampling noise of ``sqrt(p / S)``. The Triton kernel sums in
tiles (a different rounding order), so its draws equal the twin's unless a target falls within that distance
of a cdf boundary (probability ``~V 2^-52`` per draw).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch

from labelstore.codecs import ValueCodec, get_codec
from labelstore.selection import check_selection
from labelstore_kernels.contract import Extracted, prepare, raise_invalid_rows
from labelstore_kernels.extract_torch import extract_topk_torch

# The draws' definition (splitmix64 keys, inverse-CDF in float64, see above). Bump it whenever the samples a
# (seed, row id, logits) triple produces change: a store records it, and a resume refuses a different one.
SAMPLER_VERSION = 1
GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
_U64 = np.uint64
MAX_CHUNK_ELEMS = 1 << 20  # float64 working buffers of 8 MiB each
MAX_CHUNK_ELEMS_CUDA = 1 << 26


# ------------------------------------------------------------------------------------------ arguments
def parse_selection(selection: Mapping, codec: str | dict | ValueCodec) -> tuple[dict, ValueCodec]:
    """Check a ``meta["selection"]`` dict for extraction (:func:`labelstore.selection.check_selection`); returns
    (plain dict, codec)."""
    cdc = get_codec(codec)
    return check_selection(selection, cdc.name, extraction=True), cdc


def as_row_ids(row_ids, n: int) -> np.ndarray:
    """Row ids as int64 numpy ``[n]`` (default ``arange(n)``: only deterministic for a fixed batching)."""
    if row_ids is None:
        return np.arange(n, dtype=np.int64)
    if isinstance(row_ids, torch.Tensor):
        row_ids = row_ids.detach().cpu().numpy()
    r = np.asarray(row_ids)
    if r.shape != (n,) or not (np.issubdtype(r.dtype, np.integer) or r.size == 0):
        raise ValueError(f"row_ids must be {n} integers (one global id per logits row), got shape {r.shape} {r.dtype}")
    return r.astype(np.int64)


# ------------------------------------------------------------------------------------------ random numbers
def _mix(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = (z ^ (z >> _U64(30))) * _U64(MIX1)
        z = (z ^ (z >> _U64(27))) * _U64(MIX2)
    return z ^ (z >> _U64(31))


def row_keys(seed: int, row_ids: np.ndarray) -> np.ndarray:
    """``key(seed, r)`` per row as int64 (the uint64 bit pattern): the Triton kernel's input."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int, got {seed!r}")
    with np.errstate(over="ignore"):
        s = _mix(np.array([int(seed) % 2**64], dtype=_U64) + _U64(GOLDEN))
    return _mix(s ^ np.asarray(row_ids, dtype=np.int64).view(_U64)).view(np.int64)


def uniforms(keys: np.ndarray, n_draws: int) -> np.ndarray:
    """float64 ``[N, n_draws]``: ``u_j = (mix(key + (j + 1) G) >> 11) * 2^-53`` (module docstring)."""
    j = np.arange(1, n_draws + 1, dtype=_U64)
    with np.errstate(over="ignore"):
        state = np.asarray(keys, dtype=np.int64).view(_U64)[:, None] + j[None, :] * _U64(GOLDEN)
    return (_mix(state) >> _U64(11)).astype(np.float64) * 2.0**-53


# ------------------------------------------------------------------------------------------ drawing
def draw_torch(
    logits: torch.Tensor,
    keys: np.ndarray,
    draw_rows: torch.Tensor,
    samples: int,
    temperature: float,
    exclude: torch.Tensor | None = None,
    chunk_elems: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token index of every draw, by inverse-CDF sampling in float64 (module docstring).

    Args:
        logits: ``[N, V]`` (validated by the caller when ``exclude`` is given, here otherwise).
        keys: int64 ``[N]`` row keys (:func:`row_keys`).
        draw_rows: bool ``[N]``: rows that draw; the others get no draws.
        samples: ``S``, draws per row.
        exclude: int ``[N, E]`` token ids that weigh 0 (the exact top part), or None.

    Returns ``(draws int64 [N, S]`` with -1 for no draw, ``lse float64 [N]``: ``logsumexp(z / T)`` over the
    tokens sampled from; -inf where none is finite).
    """
    n_rows, V = logits.shape
    dev = logits.device
    inv_t = 1.0 / float(temperature)
    draws = torch.full((n_rows, samples), -1, dtype=torch.int64, device=dev)
    lse = torch.empty(n_rows, dtype=torch.float64, device=dev)
    if n_rows == 0:
        return draws, lse
    u_all = torch.from_numpy(uniforms(keys, samples)).to(dev)
    if chunk_elems is None:
        chunk_elems = MAX_CHUNK_ELEMS_CUDA if logits.is_cuda else MAX_CHUNK_ELEMS
    C = max(1, min(n_rows, int(chunk_elems) // V))
    for s0 in range(0, n_rows, C):
        o = slice(s0, s0 + C)
        x = logits[o].to(torch.float64, copy=True)
        if exclude is not None and exclude.shape[1]:
            x.scatter_(1, exclude[o].long(), float("-inf"))
        m = x.amax(1)
        if exclude is None:
            bad = ~torch.isfinite(m)  # NaN, +inf, or no finite entry
            if bool(bad.any()):
                rows = (bad.nonzero().flatten() + s0).tolist()
                raise_invalid_rows(logits, rows, len(rows))
        ms = torch.where(torch.isfinite(m), m, 0.0)
        cdf = x.sub_(ms[:, None]).mul_(inv_t).exp_().cumsum_(1)  # -inf -> weight 0
        Z = cdf[:, -1]
        top = torch.nextafter(Z, torch.zeros_like(Z))
        t = torch.minimum(u_all[o] * Z[:, None], top[:, None])
        idx = torch.searchsorted(cdf, t.contiguous(), right=True)
        draws[o] = torch.where(draw_rows[o, None], idx, -1)
        lse[o] = ms * inv_t + torch.log(Z)
    return draws, lse


def finalize_draws(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct drawn ids per row, ordered by count descending then id ascending.

    ``draws`` int64 ``[N, S]`` (-1: no draw). Returns ``(ids int32 [N, S], counts uint8 [N, S], distinct
    int32 [N])``; padding is id 0 with count 0.
    """
    n, S = draws.shape
    d = draws.sort(1).values
    valid = d >= 0
    first = valid.clone()
    first[:, 1:] &= d[:, 1:] != d[:, :-1]
    g = torch.cumsum(first.long(), 1) - 1  # group (distinct id) of each draw, id-ascending
    dummy = torch.full_like(g, S)
    cnt = torch.zeros(n, S + 1, dtype=torch.int64, device=d.device)
    cnt.scatter_add_(1, torch.where(valid, g, dummy), valid.long())
    ids = torch.zeros(n, S + 1, dtype=torch.int64, device=d.device)
    ids.scatter_(1, torch.where(first, g, dummy), torch.where(first, d, 0))
    cnt, ids = cnt[:, :S], ids[:, :S]
    order = torch.sort(cnt, dim=1, descending=True, stable=True).indices  # ties keep id order; padding last
    return (ids.gather(1, order).to(torch.int32), cnt.gather(1, order).to(torch.uint8),
            first.sum(1).to(torch.int32))


# ------------------------------------------------------------------------------------------ nucleus
def topp_from_topk(logits: torch.Tensor, ex: Extracted, p: float, min_k: int, temperature: float,
                   codec: ValueCodec) -> Extracted:
    """Cut a top-k extraction to the nucleus (the ``[N, k]``-wide part of ``topp``, shared by both backends).

    The mass of the first ``j`` entries is ``(1 - t_k) * cum_j / S_k`` in float64, with ``e_i = exp((z_i - z_0) / T)``
    of the kept logits, ``cum_j`` their running sum, ``S_k`` the sum of all ``k`` and ``t_k`` the extraction's exact
    tail: exact for ties (``e = 1``) and within ~1e-7 relative of the float64 softmax otherwise. The new tail
    ``t_k + (1 - t_k) * sum_{i >= count} e_i / S_k`` sums non-kept entries only.
    """
    n, k = ex.ids.shape
    if n == 0:
        return ex
    z = logits.gather(1, ex.ids.long()).to(torch.float64)
    e = torch.exp((z - z[:, :1]) * (1.0 / temperature))  # 0 for the -inf padding entries
    cum = torch.cumsum(e, 1)
    s_k = cum[:, -1:]
    kept_frac = 1.0 - ex.tail.to(torch.float64)[:, None]
    reached = cum / s_k * kept_frac >= p  # non-decreasing along the row
    n_p = (~reached).sum(1) + 1  # first prefix reaching p (k + 1 when none does)
    cnt = torch.minimum(n_p.clamp(min_k, k), ex.counts.long())
    slot = torch.arange(k, device=e.device)[None, :]
    drop = slot >= cnt[:, None]
    rest = torch.where(drop, e, 0.0).sum(1)
    tail = ex.tail.to(torch.float64) + kept_frac[:, 0] * rest / s_k[:, 0]
    bpv = codec.bytes_per_value
    zero = codec.encode(torch.full((1, 1), float("-inf"))).to(ex.values.device).view(1, 1, bpv)
    values = torch.where(drop[:, :, None], zero, ex.values.view(n, k, bpv)).reshape(n, k * bpv)
    return Extracted(ex.ids, values.contiguous(), cnt.to(torch.int32), tail.to(torch.float32), ex.lse)


# ------------------------------------------------------------------------------------------ composition
TopkFn = Callable[..., Extracted]
DrawFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def extract_selection(logits: torch.Tensor, selection: Mapping, *, temperature: float, codec, seed: int, row_ids,
                      topk_fn: TopkFn, draw_fn: DrawFn, groups=None) -> Extracted:
    """Every mode from a top-k extractor and a drawer (the torch pair here, the Triton pair in select_triton).
    ``groups`` (``adaptive`` only): which rows share a budget (:mod:`labelstore_kernels.allocate_torch`)."""
    sel, cdc = parse_selection(selection, codec)
    mode, k = sel["mode"], sel["k"]
    if mode in ("topk", "argmax"):
        return topk_fn(logits, k, temperature=temperature, codec=cdc)
    if mode == "topp":
        ex = topk_fn(logits, k, temperature=temperature, codec=cdc)
        return topp_from_topk(logits, ex, sel["p"], sel["min_k"], float(temperature), cdc)
    if mode == "adaptive":
        from labelstore_kernels.allocate_torch import adaptive_from_topk, topk_probs

        ex = topk_fn(logits, k, temperature=temperature, codec=cdc)
        return adaptive_from_topk(ex, topk_probs(logits, ex, temperature), logits.shape[1], sel, cdc, groups)

    x, _, t, _ = prepare(logits, 1, temperature, cdc)
    n, S = x.shape[0], sel["samples"]
    keys = row_keys(seed, as_row_ids(row_ids, n))
    dev = x.device
    if mode == "sample":
        draws, lse = draw_fn(x, keys, torch.ones(n, dtype=torch.bool, device=dev), S, t)
        ids, cnt, distinct = finalize_draws(draws)
        return Extracted(ids, cnt, distinct, torch.zeros(n, dtype=torch.float32, device=dev), lse.to(torch.float32))

    ke = sel["k_exact"]
    if ke:
        top = topk_fn(x, ke, temperature=t, codec=cdc)
        tail, lse_top = top.tail, top.lse
        draw_rows = tail > 0  # implies a full top part (else every other token is -inf)
        draws, _ = draw_fn(x, keys, draw_rows, S, t, exclude=top.ids)
    else:
        top = None
        draws, lse_top = draw_fn(x, keys, torch.ones(n, dtype=torch.bool, device=dev), S, t)
        tail, lse_top = torch.ones(n, dtype=torch.float32, device=dev), lse_top.to(torch.float32)
    ids, cnt, distinct = finalize_draws(draws)
    if top is None:
        return Extracted(ids, cnt, distinct, tail, lse_top)
    return Extracted(torch.cat([top.ids, ids], 1), torch.cat([top.values, cnt], 1), top.counts + distinct,
                     tail, lse_top)


def extract_select_torch(logits: torch.Tensor, selection: Mapping, *, temperature: float = 1.0,
                         codec: str | dict | ValueCodec = "log8", seed: int = 0, row_ids=None,
                         chunk_elems: int | None = None, groups=None) -> Extracted:
    """The twin of every selection mode (see :func:`labelstore_kernels.extract`)."""

    def topk(x, k, **kw):
        return extract_topk_torch(x, k, chunk_elems=chunk_elems, **kw)

    def draw(*args, **kw):
        return draw_torch(*args, chunk_elems=chunk_elems, **kw)

    return extract_selection(logits, selection, temperature=temperature, codec=codec, seed=seed, row_ids=row_ids,
                             topk_fn=topk, draw_fn=draw, groups=groups)
