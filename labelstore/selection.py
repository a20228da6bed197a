"""The selection modes: which entries of a teacher distribution a store keeps (docs/FORMAT.md section 5b).

One schema, validated here and nowhere else: the writer and reader (through the format), the extraction
kernels, the compile options and the student side all call :func:`check_selection`.

``topk``         the ``k`` most probable tokens.
``topp``         the smallest most-probable prefix with mass ``>= p``, clamped to ``[min_k, k]``.
``sample``       the distinct ids of ``samples`` draws from the teacher (unbiased), ``count8`` values.
``topk+sample``  the ``k_exact`` most probable tokens plus the distinct ids of ``samples`` draws from the rest.
``argmax``       the teacher's top token only (hard labels: ``k = 1``, no values).
``adaptive``     per position the ``k_i <= k`` most probable tokens, ``k_i`` chosen per sample so that the mean is
                 at most ``mean_k`` and the summed KL(teacher || uniform-tail reconstruction) is smallest
                 (:mod:`labelstore_kernels.allocate_torch`).
"""

from __future__ import annotations

from collections.abc import Mapping

from labelstore.codecs import DEFAULT_CODEC
from labelstore.constants import MAX_SAMPLES

MODES = ("topk", "topp", "sample", "topk+sample", "argmax", "adaptive")
COMPILE_MODES = ("topk", "topp", "sample", "topk+sample", "adaptive")  # `compile --selection`; argmax is --hard-labels
SAMPLED_MODES = ("sample", "topk+sample")  # values are sampling estimator weights, not probabilities
ONE_BYTE_CODECS = ("log8", "e4m3", "e5m2")  # topk+sample shares one byte per entry between codes and counts


def is_sampled(mode: str) -> bool:
    return mode in SAMPLED_MODES


def default_codec(mode: str) -> str:
    """The value codec a mode stores unless told otherwise: draw counts for ``sample``."""
    return "count8" if mode == "sample" else DEFAULT_CODEC


def has_tail(label_kind: str, mode: str) -> bool:
    """Soft stores keep an exact tail per position, except pure ``sample`` stores (their samples stand for it)."""
    return label_kind == "soft" and mode != "sample"


class SelectionError(ValueError):
    """A selection that breaks a rule of docs/FORMAT.md 5b. ``key`` names the offending setting (``"mode"``,
    ``"k"``, ``"p"``, ``"min_k"``, ``"samples"``, ``"k_exact"``, ``"mean_k"`` or ``"codec"``), ``got`` its value, so
    that a caller (the CLI) can phrase the error in its own terms."""

    def __init__(self, message: str, *, mode, key: str, got, requirement: str = ""):
        super().__init__(message)
        self.mode, self.key, self.got, self.requirement = mode, key, got, requirement


def _int(sel: Mapping, key: str, lo: int, hi: int | None = None) -> int:
    v = sel.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        rng = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise SelectionError(f"selection {sel.get('mode')} needs an int {key} {rng}, got {v!r}",
                             mode=sel.get("mode"), key=key, got=v, requirement=rng)
    return v


def check_selection(selection, codec_name: str | None, *, max_k: int | None = None,
                    extraction: bool = False) -> dict:
    """Validate a ``meta["selection"]`` dict against docs/FORMAT.md 5b and the value codec's name.

    Returns the selection as a plain dict holding only the mode's keys. Raises :class:`SelectionError` (a
    ``ValueError``) naming the offending key (``TypeError`` if ``selection`` is not a mapping). ``max_k`` bounds
    ``k`` (the format's limit). ``extraction`` adds what producing labels needs beyond what a readable store allows: a
    ``sample`` extraction is exactly ``samples`` wide, and ``argmax`` is ``k = 1`` with codec ``none``.
    """
    if not isinstance(selection, Mapping):
        raise TypeError(f"selection must be a dict like {{'mode': 'topk', 'k': 64}}, got {type(selection).__name__}")
    mode = selection.get("mode")
    if mode not in MODES:
        raise SelectionError(f"unknown selection mode {mode!r}; choose one of {', '.join(MODES)}", mode=mode,
                             key="mode", got=mode)
    sel = {"mode": mode, "k": _int(selection, "k", 1, max_k)}
    k = sel["k"]
    if mode == "sample":
        sel["samples"] = s = _int(selection, "samples", 1, MAX_SAMPLES)
        if extraction and k != s:
            raise SelectionError(f"selection sample needs k == samples (got k={k}, samples={s}): S draws can yield "
                                 "up to S distinct ids, and dropping some would bias the stored estimate",
                                 mode=mode, key="k", got=k, requirement=f"== samples ({s})")
        if k > s:
            raise SelectionError(f"selection sample keeps at most samples={s} unique ids, got k={k}", mode=mode,
                                 key="k", got=k, requirement=f"<= samples ({s})")
        if codec_name != "count8":
            raise SelectionError(f"selection sample stores draw counts: the codec must be count8, got {codec_name!r}",
                                 mode=mode, key="codec", got=codec_name, requirement="count8")
        return sel
    if codec_name == "count8":
        raise SelectionError(f"codec count8 belongs to the sampled modes only, not to {mode}", mode=mode,
                             key="codec", got=codec_name)
    if mode == "argmax" and extraction and (k != 1 or codec_name != "none"):
        raise SelectionError(f"selection argmax needs k = 1 and codec 'none', got k={k}, codec {codec_name!r}",
                             mode=mode, key="codec" if k == 1 else "k", got=codec_name if k == 1 else k)
    if mode == "topp":
        p = selection.get("p")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise SelectionError(f"selection topp needs p in (0, 1], got {p!r}", mode=mode, key="p", got=p,
                                 requirement="in (0, 1]")
        sel["p"] = float(p)
        sel["min_k"] = _int(selection, "min_k", 1, k)
        if extraction and codec_name == "none":
            raise SelectionError("selection topp stores probabilities: codec 'none' is for argmax only", mode=mode,
                                 key="codec", got=codec_name)
    elif mode == "adaptive":
        m = selection.get("mean_k")
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 1 <= m <= k:  # NaN fails too
            raise SelectionError(f"selection adaptive needs a number mean_k in [1, k={k}] (the mean entries per "
                                 f"position; k is the most one position keeps), got {m!r}", mode=mode, key="mean_k",
                                 got=m, requirement=f"in [1, {k}]")
        sel["mean_k"] = m
        if codec_name == "none":
            raise SelectionError("selection adaptive stores probabilities: codec 'none' is for argmax only",
                                 mode=mode, key="codec", got=codec_name)
    elif mode == "topk+sample":
        sel["k_exact"] = ke = _int(selection, "k_exact", 0, k)
        sel["samples"] = s = _int(selection, "samples", 1, MAX_SAMPLES)
        if k != ke + s:
            raise SelectionError(f"selection topk+sample needs k = k_exact + samples ({ke} + {s}), got k={k}",
                                 mode=mode, key="k", got=k, requirement=f"== k_exact + samples ({ke + s})")
        if codec_name not in ONE_BYTE_CODECS:
            raise SelectionError(f"selection topk+sample needs a 1-byte value codec ({', '.join(ONE_BYTE_CODECS)}), "
                                 f"got {codec_name!r}", mode=mode, key="codec", got=codec_name,
                                 requirement=f"a 1-byte codec ({', '.join(ONE_BYTE_CODECS)})")
    return sel


def top_width(selection: Mapping) -> int:
    """How many most-probable entries a mode extracts exactly (the top-k part of the kernels' work)."""
    mode = selection["mode"]
    if mode == "sample":
        return 1
    if mode == "topk+sample":
        return max(1, selection.get("k_exact", 1))
    return selection["k"]
