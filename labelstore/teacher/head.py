"""The teacher's LM head: can extraction run straight from the hidden states (fused), and how.

The fused path runs the model's body (``model.base_model``) to its final hidden states and computes the logits
itself, one row block at a time (:func:`labelstore_kernels.extract_fused`), so a batch's ``[N, V]`` logits never
exist. That is only right if labelstore reproduces the model's head exactly, so :func:`plan_head`

1. reads the head: ``get_output_embeddings()`` (tied or not), its bias, and the post-processing it knows from
   the config: Gemma 2/3 ``final_logit_softcapping``, Cohere ``logit_scale``, Granite ``logits_scaling``;
2. refuses what it cannot reproduce (no output embedding, a quantized or sharded weight, no base model, forward
   hooks on the model or its head, which only ``model(...)`` runs), and
3. *probes*: one short sequence through ``model(...).logits`` and through body + head must agree to a few ulps.
   A model with any other post-processing (an unknown architecture's scale, a final norm in the head) fails
   here rather than silently producing other labels.

Under ``--lm-head auto`` (default) a refused head falls back to the materialised path with a one-line notice
naming why; ``--lm-head fused`` turns the refusal into an error; ``--lm-head materialized`` skips the fused path.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from labelstore.errors import LabelStoreError
from labelstore.teacher.options import LM_HEAD_MODES
from labelstore_kernels import LMHead, head_logits

PROBE_TOKENS = 32


class HeadUnsupportedError(LabelStoreError):
    """``--lm-head fused`` was asked for a teacher whose head labelstore cannot reproduce."""


@dataclass
class HeadPlan:
    """How a compile gets its logits.

    ``fused``: extraction from the hidden states, one row block at a time. Otherwise materialised: ``head`` None
    means ``model(...).logits`` as is; a ``head`` (``--head-dtype float32``, ``--mask-vocab-padding``) means the
    body's hidden states through that head, the whole batch at once. ``reason`` says why not fused.
    """

    head: LMHead | None
    fused: bool
    reason: str = ""


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def read_head(model, *, dtype: torch.dtype | None = None, valid_vocab: int | None = None) -> tuple[LMHead | None, str]:
    """The model's head as an :class:`LMHead`, or ``(None, why not)``."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    w = getattr(out, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return None, f"{type(model).__name__} has no plain output embedding matrix"
    if type(w) is not torch.nn.Parameter and type(w) is not torch.Tensor:
        return None, f"its head weight is a {type(w).__name__} (quantized or sharded)"
    if not w.is_floating_point() or w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None, f"its head weight has dtype {w.dtype} (quantized?)"
    if w.device.type == "meta":
        return None, "its head weight is offloaded (meta device)"
    for mod, what in ((model, type(model).__name__), (out, "its output embedding")):
        if getattr(mod, "_forward_hooks", None) or getattr(mod, "_forward_pre_hooks", None):
            return None, f"{what} has forward hooks, which the fused path would bypass"
    if getattr(model, "base_model", model) is model:
        return None, f"{type(model).__name__} exposes no base model to run to the hidden states"
    bias = getattr(out, "bias", None)
    cfg = _text_config(model)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(model, "logit_scale", None)
    if scale is None:
        scale = getattr(cfg, "logit_scale", None) if type(model).__name__.startswith("Cohere") else None
    divisor = getattr(cfg, "logits_scaling", None) if type(model).__name__.startswith("Granite") else None
    for name, v in (("logit_scale", scale), ("logits_scaling", divisor), ("final_logit_softcapping", softcap)):
        if v is not None and not isinstance(v, (int, float)):
            return None, f"its {name} is not a number ({type(v).__name__})"
    return LMHead(weight=w, bias=bias if isinstance(bias, torch.Tensor) else None,
                  scale=float(scale) if scale is not None else 1.0,
                  divisor=float(divisor) if divisor is not None else 1.0,
                  softcap=float(softcap) if softcap else None, valid_vocab=valid_vocab, dtype=dtype), ""


def body_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The final hidden states ``[B, T, D]`` (after the final norm): the body of ``model`` without its head."""
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def probe(model, head: LMHead, input_ids: torch.Tensor, device: torch.device) -> str:
    """``""`` if body + ``head`` reproduce ``model(input_ids).logits`` (in the model's dtype), else why not."""
    x = input_ids[None, :PROBE_TOKENS].to(device)
    m = torch.ones_like(x)
    try:
        with torch.inference_mode():
            ref = model(input_ids=x, attention_mask=m, use_cache=False).logits[0].float()
            h = body_hidden(model, x, m)[0]
            if h.shape[-1] != head.hidden_size:
                return f"its body returns width {h.shape[-1]}, its head expects {head.hidden_size}"
            own = head_logits(h, LMHead(head.weight, head.bias, head.scale, head.divisor, head.softcap)).float()
    except Exception as exc:  # any model-specific failure means: not reproducible, use the model's own forward
        return f"running its body alone failed ({type(exc).__name__}: {str(exc)[:120]})"
    if own.shape != ref.shape:
        return f"its head gives {tuple(own.shape)} logits, the model {tuple(ref.shape)}"
    eps = max(64 * torch.finfo(torch.float32).eps, 2 * torch.finfo(head.weight.dtype).eps)
    tol = eps * (1.0 + float(ref.abs().max()))
    diff = float((own - ref).abs().max())
    if not diff <= tol:
        return (f"body + head differ from model(...).logits by up to {diff:.3g} (> {tol:.2g}): the model "
                "post-processes its logits in a way labelstore does not know")
    return ""


def plan_head(model, mode: str, *, head_dtype: str = "auto", valid_vocab: int | None = None,
              probe_ids: torch.Tensor | None = None, device: torch.device | None = None,
              notice: bool = True) -> HeadPlan:
    """Decide fused or materialised for ``--lm-head mode`` (module docstring); prints the fallback notice.

    ``head_dtype="float32"`` and ``valid_vocab`` need a reproducible head even on the materialised path (it
    then applies the head itself to the whole batch): such a head that cannot be reproduced is an error.
    """
    if mode not in LM_HEAD_MODES:
        raise ValueError(f"--lm-head must be one of {', '.join(LM_HEAD_MODES)}, got {mode!r}")
    dtype = torch.float32 if head_dtype == "float32" else None
    needs_head = dtype is not None or valid_vocab is not None
    if mode == "materialized" and not needs_head:
        return HeadPlan(None, False, "--lm-head materialized")  # model(...).logits as is: nothing to probe
    head, why = read_head(model, dtype=dtype, valid_vocab=valid_vocab)
    if head is not None and probe_ids is not None and len(probe_ids):
        why = probe(model, head, probe_ids, device or head.weight.device)
        head = None if why else head
    if head is None and (mode == "fused" or needs_head):
        what = ("--lm-head fused" if mode == "fused" else
                "--head-dtype float32" if dtype is not None else "--mask-vocab-padding")
        raise HeadUnsupportedError(f"{what} needs labelstore to reproduce the teacher's LM head, and it cannot: "
                                   f"{why}. Drop {what} (the materialised path uses model(...).logits as is).")
    if mode == "materialized" or head is None:
        if head is None and notice:
            print(f"labelstore compile: note: materialised logits (no fused LM head): {why}", file=sys.stderr)
        return HeadPlan(head if needs_head else None, False, why or "--lm-head materialized")
    return HeadPlan(head, True)
