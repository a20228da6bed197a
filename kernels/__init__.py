"""labelstore's compute kernels (repository folder ``kernels/``, import package ``labelstore_kernels``).

The folder is installed under another name on purpose: Hugging Face's PyPI package ``kernels`` is probed by
transformers, and a top-level ``kernels`` of ours would be mistaken for it (see ``tests/test_packaging.py``).
No ``__version__`` here for the same reason.

Extraction (teacher logits -> top-k ids, encoded values, exact tail, logsumexp)::

    from labelstore_kernels import extract_topk
    out = extract_topk(logits, k=64, temperature=1.0, codec="log8")   # Extracted(ids, values, counts, tail, lse)

:func:`extract_topk` runs the Triton kernel on CUDA tensors when Triton is usable and the pure-torch twin
otherwise; ``LABELSTORE_EXTRACT_BACKEND=torch|triton`` (or ``backend=``) forces one. The contract is in
:mod:`labelstore_kernels.contract`.
"""

from __future__ import annotations

import functools
import os

import torch

from labelstore.codecs import ValueCodec
from labelstore.constants import TRITON_MAX_K
from labelstore.selection import top_width
from labelstore_kernels.contract import Extracted
from labelstore_kernels.extract_torch import extract_topk_torch

BACKEND_ENV = "LABELSTORE_EXTRACT_BACKEND"
BACKENDS = ("torch", "triton")

__all__ = [
    "BACKEND_ENV",
    "Extracted",
    "extract_hard_labels",
    "extract_topk",
    "extract_topk_torch",
    "extract_topk_triton",
    "triton_available",
]


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install failing at import
        return False
    return True


def triton_available(device: torch.device | str | None = None) -> bool:
    """Whether the Triton kernel can run on ``device``: CUDA with Triton importable, or the interpreter."""
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type != "cuda":
        return os.environ.get("TRITON_INTERPRET") == "1" and _triton_importable()
    return _triton_importable() and torch.cuda.is_available()


def extract_topk_triton(
    logits: torch.Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    codec: str | dict | ValueCodec = "log8",
    **tuning,
) -> Extracted:
    """The Triton kernel (imported on first use: importing triton costs about a second)."""
    from labelstore_kernels.extract_triton import extract_topk_triton as impl

    return impl(logits, k, temperature=temperature, codec=codec, **tuning)


def _resolve_backend(logits: torch.Tensor, k: int, backend: str | None) -> str:
    name = backend if backend is not None else os.environ.get(BACKEND_ENV, "").strip().lower() or None
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not isinstance(k, int):
        return "torch"  # the twin's argument checks raise the error
    if name is None:
        small_k = min(k, logits.shape[1]) <= TRITON_MAX_K
        return "triton" if logits.is_cuda and small_k and triton_available(logits.device) else "torch"
    if name not in BACKENDS:
        src = "backend=" if backend is not None else f"{BACKEND_ENV}="
        raise ValueError(f"unknown extraction backend {src}{name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "triton" and not triton_available(logits.device):
        raise ValueError(
            f"the triton extraction backend cannot run on a {logits.device.type} tensor here: it needs a CUDA "
            "tensor with triton installed (or TRITON_INTERPRET=1 for CPU tensors, slow); use backend='torch'"
        )
    return name


def extract_topk(
    logits: torch.Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    codec: str | dict | ValueCodec = "log8",
    backend: str | None = None,
) -> Extracted:
    """Compress teacher logits ``[N, V]`` to the top ``k`` entries per row (``k > V`` is clipped to ``V``).

    Returns :class:`Extracted` ``(ids int32 [N, k], values uint8 [N, k * bytes_per_value], counts int32 [N],
    tail float32 [N], lse float32 [N])``; see :mod:`labelstore_kernels.contract`. Raises
    :class:`labelstore.errors.InvalidLogitsError` naming rows with NaN, +inf or no finite entry.
    """
    if _resolve_backend(logits, k, backend) == "triton":
        return extract_topk_triton(logits, k, temperature=temperature, codec=codec)
    return extract_topk_torch(logits, k, temperature=temperature, codec=codec)


def extract_hard_labels(
    logits: torch.Tensor, *, temperature: float = 1.0, backend: str | None = None
) -> Extracted:
    """Argmax ids (ties: smaller id) with their exact tail ``1 - p_top`` and ``lse``; no value bytes."""
    return extract_topk(logits, 1, temperature=temperature, codec="none", backend=backend)


from labelstore_kernels.bucket_logprobs_torch import student_bucket_logprobs_torch  # noqa: E402,F401,I001
from labelstore_kernels.sparse_kl_torch import SparseKLTerm, sparse_kl_torch  # noqa: E402,F401,I001


# ------------------------------------------------------------------- selection modes beyond top-k (FORMAT.md 5b)
from labelstore_kernels.select_torch import extract_select_torch, parse_selection  # noqa: E402,I001


def extract_select_triton(logits: torch.Tensor, selection: dict, **kwargs) -> Extracted:
    """Every selection mode on the Triton kernels (imported on first use)."""
    from labelstore_kernels.select_triton import extract_select_triton as impl

    return impl(logits, selection, **kwargs)


def extract(
    logits: torch.Tensor,
    selection: dict,
    *,
    temperature: float = 1.0,
    codec: str | dict | ValueCodec = "log8",
    seed: int = 0,
    row_ids=None,
    backend: str | None = None,
    groups=None,
) -> Extracted:
    """Compress teacher logits ``[N, V]`` with any selection mode; ``selection`` is the store's ``meta["selection"]``.

    ``{"mode": "topk", "k"}`` (= :func:`extract_topk`), ``{"mode": "topp", "k", "p", "min_k"}``,
    ``{"mode": "sample", "k": S, "samples": S}`` (codec ``count8``), ``{"mode": "topk+sample", "k_exact",
    "samples": S, "k": k_exact + S}`` (a 1-byte codec), ``{"mode": "adaptive", "k": K, "mean_k": m}``. Returns
    :class:`Extracted`; row ``i``'s first ``counts[i]`` entries are what the store keeps (docs/FORMAT.md 5b,
    :mod:`labelstore_kernels.select_torch`).

    ``adaptive`` spends ``floor(m * n_g)`` entries on each group of ``n_g`` rows sharing a budget: ``groups``
    (int64 ``[N]``, e.g. the sample id of each row; negative: no budget, 1 entry; default: all rows one group).
    The top-``K`` runs on the dispatched kernel, the allocation in torch on the ``[N, K]`` result
    (:mod:`labelstore_kernels.allocate_torch`). A group's entries depend only on its own rows, so a compile passes
    whole samples.

    The sampled modes are deterministic given ``seed`` and ``row_ids`` (int64 ``[N]``, one *global* id per row,
    e.g. ``sample_id * max_len + t``; default ``arange(N)``): the same row id draws the same samples whatever
    the batch, chunking or rank. Backend choice as in :func:`extract_topk`. Raises
    :class:`labelstore.errors.InvalidLogitsError` for rows with NaN, +inf or no finite entry.
    """
    sel, _ = parse_selection(selection, codec)
    k_top = top_width(sel)
    kwargs = dict(temperature=temperature, codec=codec, seed=seed, row_ids=row_ids, groups=groups)
    if _resolve_backend(logits, k_top, backend) == "triton":
        return extract_select_triton(logits, selection, **kwargs)
    return extract_select_torch(logits, selection, **kwargs)


__all__ += ["extract", "extract_select_torch", "extract_select_triton", "parse_selection"]


# ------------------------------------------------------------- fused LM head: extraction from hidden states
from labelstore_kernels.fused_head_torch import LMHead, extract_fused_torch, head_logits  # noqa: E402,I001


def extract_fused(
    hidden: torch.Tensor,
    head: LMHead,
    selection: dict,
    *,
    temperature: float = 1.0,
    codec: str | dict | ValueCodec = "log8",
    seed: int = 0,
    row_ids=None,
    backend: str | None = None,
    on_block=None,
    block_elems: int | None = None,
    groups=None,
) -> Extracted:
    """``extract(head_logits(hidden, head), selection, ...)`` without ever holding the ``[N, V]`` logits.

    ``hidden`` ``[N, D]`` are the teacher's final hidden states, ``head`` an :class:`LMHead` (weight, bias,
    scale, soft-cap, vocabulary mask, compute dtype). The result is that of :func:`extract` on the materialised
    logits (same contract, same draws for the same ``row_ids``). The pure-torch path
    (:mod:`labelstore_kernels.fused_head_torch`) runs the head on row blocks of bounded size and extracts each
    block with the dispatched extraction kernel; ``backend="torch"`` forces the torch twin throughout.
    ``on_block(s0, z, ex)`` sees each block's logits (used for the tail prior's teacher mass); ``block_elems``
    bounds a block's logits (default :data:`labelstore_kernels.fused_head_torch.FUSED_BLOCK_ELEMS`).

    ``adaptive`` (``groups`` as in :func:`extract`): each block is extracted as top-``K`` and its entries' exact
    probabilities kept; the allocation runs once every block is there (a sample's rows may span blocks).

    ``backend="triton"`` (or ``LABELSTORE_EXTRACT_BACKEND=triton``) runs the fused Triton kernel
    (:mod:`labelstore_kernels.fused_head_triton`: matmul tiles, tile top-k, merge; vocabulary tiles, no ``[R, V]``
    block) for ``topk`` / ``argmax`` selections without ``on_block``. It is opt-in until its GPU speed is measured
    (``benchmarks/gpu_check.sh``); by default CUDA tensors take the row-block path with the Triton extraction.
    """
    name = backend if backend is not None else os.environ.get(BACKEND_ENV, "").strip().lower() or None
    if name == "triton":
        sel, cdc = parse_selection(selection, codec)
        if sel["mode"] not in ("topk", "argmax") or on_block is not None:
            raise ValueError("the fused Triton kernel does topk and argmax selections without on_block (no tail "
                             f"prior); got mode {sel['mode']!r}{' with on_block' if on_block else ''}: use "
                             "backend='torch' or None")
        if not triton_available(hidden.device):
            raise ValueError(f"the fused Triton kernel cannot run on a {hidden.device.type} tensor here: it needs "
                             "CUDA with triton (or TRITON_INTERPRET=1 for CPU tensors); use backend='torch'")
        from labelstore_kernels.fused_head_triton import extract_fused_topk_triton

        return extract_fused_topk_triton(hidden, head, sel["k"], temperature=temperature, codec=cdc)
    return extract_fused_torch(hidden, head, selection, temperature=temperature, codec=codec, seed=seed,
                               row_ids=row_ids, backend=backend, on_block=on_block, block_elems=block_elems,
                               groups=groups)


__all__ += ["LMHead", "extract_fused", "extract_fused_torch", "head_logits"]
