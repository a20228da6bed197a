"""Extraction straight from the teacher's final hidden states, pure torch: the CPU path and the oracle.

A causal LM ends with ``logits = post(hidden @ W^T + b)``, ``W`` the ``[V, D]`` output embedding (tied or not)
and ``post`` what some architectures add: a scale (Cohere's ``logit_scale``, Granite's ``/ logits_scaling``) and
a final soft-cap ``c tanh(z / c)`` (Gemma 2/3's ``final_logit_softcapping``). :class:`LMHead` describes such a
head; :func:`head_logits` applies it, op for op in the order Hugging Face's models do, so the fused path sees
the same numbers as ``model(...).logits``.

:func:`extract_fused_torch` never holds the ``[N, V]`` logits of a batch: it runs the head on blocks of ``R`` rows
(``R = FUSED_BLOCK_ELEMS // V``, 128 MiB of float32 logits on CPU) and hands each ``[R, V]`` block to the
existing extraction (:func:`labelstore_kernels.extract`: online max, candidate blocks, exact tail, every
selection mode), so the peak extra memory is one block whatever ``N``. Row ids travel with the rows, so sampled
modes draw exactly what the materialised path draws. The Triton kernel
(:mod:`labelstore_kernels.fused_head_triton`) goes further and tiles the vocabulary too.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from labelstore.codecs import ValueCodec
from labelstore.errors import InvalidLogitsError
from labelstore_kernels.contract import Extracted

# Logits per row block: 128 MiB (CPU), 1 GiB (CUDA) of float32. Each block streams the whole [V, D] head weight
# once, so blocks need enough rows to amortise it: on CPU (V = 151,936, D = 192, one thread) 256-row blocks
# cost the same as one 1024-row block, 64-row blocks 38 % more (benchmarks/bench_teacher.py).
FUSED_BLOCK_ELEMS = {"cpu": 1 << 25, "cuda": 1 << 28}

BlockHook = Callable[[int, torch.Tensor, Extracted], None]


@dataclass(frozen=True)
class LMHead:
    """A reproducible LM head: ``z = hidden @ weight^T (+ bias)``, then ``* scale``, ``/ divisor``, soft-cap.

    Attributes:
        weight: ``[V, D]`` output embedding (the input embedding when tied).
        bias: ``[V]`` or None.
        scale: multiplies the logits (Cohere ``logit_scale``); 1.0 for none.
        divisor: divides the logits (Granite ``logits_scaling``); 1.0 for none.
        softcap: ``c`` of ``c * tanh(z / c)`` (Gemma 2/3 ``final_logit_softcapping``), or None.
        valid_vocab: ids ``>=`` this get ``-inf`` (padding rows of a head larger than the tokenizer), or None.
        dtype: compute dtype of the matmul and everything after it; None is the weight's (the model's).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    divisor: float = 1.0
    softcap: float | None = None
    valid_vocab: int | None = None
    dtype: torch.dtype | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    def to_compute_dtype(self) -> LMHead:
        """The same head with weight and bias cast once to ``dtype`` (no per-block casts)."""
        dt = self.dtype or self.weight.dtype
        if self.weight.dtype == dt and (self.bias is None or self.bias.dtype == dt):
            return self
        return replace(self, weight=self.weight.to(dt), bias=None if self.bias is None else self.bias.to(dt))


@torch.no_grad()
def head_logits(hidden: torch.Tensor, head: LMHead, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[n, D]`` hidden states -> ``[n, V]`` logits, exactly as the model computes them (module docstring).

    ``out`` (``[n, V]``, the compute dtype, contiguous) receives them: reusing one buffer for every block saves
    the page faults of a fresh allocation per block (measured: ~10 % of the head's time on CPU).
    """
    dt = head.dtype or head.weight.dtype
    w = head.weight if head.weight.dtype == dt else head.weight.to(dt)
    b = head.bias if head.bias is None or head.bias.dtype == dt else head.bias.to(dt)
    h = hidden.to(device=w.device, dtype=dt)
    if out is None:
        z = F.linear(h, w, b)
    elif b is None:
        z = torch.mm(h, w.t(), out=out)
    else:
        z = torch.addmm(b, h, w.t(), out=out)
    if head.scale != 1.0:
        z.mul_(head.scale)
    if head.divisor != 1.0:
        z.div_(head.divisor)
    if head.softcap is not None:
        z.div_(head.softcap).tanh_().mul_(head.softcap)
    if head.valid_vocab is not None and head.valid_vocab < z.shape[1]:
        z[:, head.valid_vocab:] = float("-inf")
    return z


def rows_per_block(V: int, device: torch.device, block_elems: int | None = None) -> int:
    """Rows of one ``[R, V]`` logits block: ``block_elems // V`` (default :data:`FUSED_BLOCK_ELEMS`), >= 1."""
    if block_elems is None:
        block_elems = FUSED_BLOCK_ELEMS.get(device.type, FUSED_BLOCK_ELEMS["cuda"])
    return max(1, int(block_elems) // max(1, V))


def _shift_rows(exc: InvalidLogitsError, s0: int) -> InvalidLogitsError:
    """The block's error with row numbers of the whole input."""
    msg = re.sub(r"\brow (\d+)", lambda m: f"row {int(m[1]) + s0}", str(exc))
    return InvalidLogitsError(msg, rows=[int(r) + s0 for r in exc.rows])


@torch.no_grad()
def extract_fused_torch(
    hidden: torch.Tensor,
    head: LMHead,
    selection: dict,
    *,
    temperature: float = 1.0,
    codec: str | dict | ValueCodec = "log8",
    seed: int = 0,
    row_ids=None,
    block_elems: int | None = None,
    backend: str | None = "torch",
    on_block: BlockHook | None = None,
    groups=None,
) -> Extracted:
    """Every selection mode from ``[N, D]`` hidden states, one ``[R, V]`` logits block at a time.

    Returns what ``extract(head_logits(hidden, head), selection, ...)`` returns (same contract, same draws for
    the same ``row_ids``). ``backend`` picks the per-block extraction (``"torch"``: this twin end to end; None:
    the dispatcher's choice, the Triton extraction kernel on CUDA). ``on_block(s0, z, ex)`` is called with each
    block's first row, its logits and its extraction (the compile sums the tail prior's teacher mass there).
    Raises :class:`labelstore.errors.InvalidLogitsError` naming rows of ``hidden`` whose logits are invalid.

    ``adaptive`` (``groups``: rows sharing a budget, :func:`labelstore_kernels.extract`): the allocation needs every
    row of a group, which may span blocks, and the exact probabilities of the kept entries, which need the block's
    logits. So each block is extracted as plain top-``K`` (``on_block`` sees that) and its entries' float64
    probabilities are kept (``[R, K]``, small); the allocation and the cut run once on the whole batch.
    """
    from labelstore_kernels import extract
    from labelstore_kernels.select_torch import parse_selection

    if hidden.dim() != 2 or hidden.shape[1] != head.hidden_size:
        raise ValueError(f"hidden must be [N, {head.hidden_size}] (the head's input width), got "
                         f"{tuple(hidden.shape)}")
    n = hidden.shape[0]
    head = head.to_compute_dtype()
    rid = np.arange(n, dtype=np.int64) if row_ids is None else row_ids
    if isinstance(rid, torch.Tensor):
        rid = rid.detach().cpu().numpy()
    rid = np.asarray(rid, dtype=np.int64)
    if rid.shape != (n,):
        raise ValueError(f"row_ids must be {n} integers (one global id per row), got shape {rid.shape}")
    sel, cdc = parse_selection(selection, codec)
    adaptive = sel["mode"] == "adaptive"
    block_sel = {"mode": "topk", "k": sel["k"]} if adaptive else selection
    R = rows_per_block(head.vocab_size, head.weight.device, block_elems)
    buf = torch.empty(min(R, max(n, 1)), head.vocab_size, dtype=head.weight.dtype, device=head.weight.device)
    parts, probs = [], []
    for s0 in range(0, max(n, 1), R):
        z = head_logits(hidden[s0:s0 + R], head, out=buf[:min(R, n - s0)])
        try:
            ex = extract(z, block_sel, temperature=temperature, codec=cdc, seed=seed, row_ids=rid[s0:s0 + R],
                         backend=backend)
        except InvalidLogitsError as exc:
            raise _shift_rows(exc, s0) from None
        if on_block is not None and z.shape[0]:
            on_block(s0, z, ex)
        parts.append(ex)
        if adaptive:
            from labelstore_kernels.allocate_torch import topk_probs

            probs.append(topk_probs(z, ex, temperature))
    out = parts[0] if len(parts) == 1 else Extracted(*(torch.cat(list(t)) for t in zip(*parts)))
    if adaptive:
        from labelstore_kernels.allocate_torch import adaptive_from_topk

        out = adaptive_from_topk(out, torch.cat(probs), head.vocab_size, sel, cdc, groups)
    return out
