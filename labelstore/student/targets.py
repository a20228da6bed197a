"""Teacher targets on the student side: the vocabulary check, id mapping, re-tempering and dense targets.

All functions here act on one sequence's padded targets (numpy, ``[T, K]``) or on a batch (torch, ``[B, T, K]``)
and keep the format's invariant: on every position that carries a teacher distribution, the kept probabilities
plus the tail sum to 1.

Dense reconstruction rule
-------------------------
The store keeps ``n`` entries per position and the exact mass ``t`` of everything else; which tokens hold ``t``,
and how, is not stored. The dense target spreads ``t`` *uniformly* over the ``V - n`` tokens that are not kept::

    dense[v] = p_v                  v kept
             = t / (V - n)          otherwise

This is the maximum-entropy completion (it assumes nothing about the tail) and the rule the fidelity figures in
the field notes use. With a tail prior ``g`` (``to_dense(..., prior=)``; the collator passes the store's) the tail
follows the prior rule of docs/FORMAT.md 5c instead, the same rule as ``sparse_kl(tail="prior")``::

    dense[v] = min(c g_v, p_min)    v not kept   (c such that these sum to t; p_min = smallest kept probability)

If every token is kept (``n = V``) the kept probabilities are rescaled to sum to 1.

Re-tempering
------------
A store holds ``p = softmax(z / T0)`` (``T0`` = the store's ``temperature``). The target at temperature ``T`` is
``softmax(z / T) ∝ p ** a`` with ``a = T0 / T``. On the kept set this is exact up to the value codec's error
(a relative ratio ``p_i / p_j`` becomes ``(p_i / p_j) ** a``; the codec's log-domain error is multiplied by ``a``,
so sharpening, ``T < T0``, magnifies it). The tail cannot be re-tempered exactly: its mass ``t`` is known, its
shape is not, and ``sum_tail q ** a`` depends on the shape. Two rules are offered:

``"uniform"`` (default)
    the tail as ``V - n`` equal tokens: tempered tail mass ``(V - n) * (t / (V - n)) ** a``. Consistent with the
    dense rule: densify-then-temper equals temper-then-densify.
``"bucket"``
    the tail as one token (a "ghost token"): tempered tail mass ``t ** a``.

For ``a < 1`` (flattening, ``T > T0``) the true tempered tail mass lies between the bucket value (a lower bound,
all tail mass on one token) and the uniform value (an upper bound, by concavity of ``x ** a``); for ``a > 1`` the
bounds swap. The further ``a`` is from 1 and the larger ``t``, the wider the gap: flattening a heavily truncated
distribution mostly manufactures tail mass the store cannot place. Tokens never kept stay indistinguishable.
Re-tempering is refused for sampled stores (``sample``, ``topk+sample``), whose values are estimator weights,
not teacher probabilities.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from labelstore.errors import ConfigMismatchError
from labelstore.reconstruction import TAIL_RULES, kept_cap, prepare_prior, spread_fill, uniform_fill, water_fill_scale
from labelstore.selection import is_sampled

DEFAULT_DENSE_BUDGET_BYTES = 2 << 30


# ----------------------------------------------------------------------------------------------- vocabulary
SHARED_PREFIX = "shared_prefix"  # id_map shorthand: same tokenizer, only the vocabulary sizes differ
ESTIMATORS = ("exact", "sampled", "hard")  # what a store's values are (the ``estimator`` of a batch's teacher_info)


def tokenizer_hash(tokenizer) -> str:
    """The tokenizer identity a store records (``meta["tokenizer"]["hash"]``), computed as ``labelstore compile``
    computes it (:func:`labelstore.fingerprints.tokenizer_fingerprint`)."""
    from labelstore.fingerprints import tokenizer_fingerprint

    return tokenizer_fingerprint(tokenizer)


def model_vocab_size(model) -> int | None:
    """A model's output vocabulary: its output layer's rows (a padded head counts), else its config's size."""
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return int(emb.weight.shape[0])
    v = getattr(getattr(model, "config", None), "vocab_size", None)
    return None if v is None else int(v)


def _is_tokenizer(obj) -> bool:
    return hasattr(obj, "get_vocab") and (hasattr(obj, "backend_tokenizer") or hasattr(obj, "convert_tokens_to_ids"))


def describe_student(student) -> tuple[int | None, str | None]:
    """(vocabulary size, tokenizer hash) of a student given as a model, a config, a tokenizer, a vocabulary size, or
    a tuple of these (e.g. ``(model, tokenizer)``); None where the object does not say.

    A model's vocabulary is its output layer's width, a config's its (text) ``vocab_size``. A tokenizer gives its
    hash only: its length may be smaller than the model's padded head, so it does not fix the vocabulary.
    """
    if student is None:
        return None, None
    if isinstance(student, (tuple, list)):
        vocab = thash = None
        for part in student:
            v, h = describe_student(part)
            vocab, thash = (v if v is not None else vocab), (h if h is not None else thash)
        return vocab, thash
    if isinstance(student, (int, np.integer)) and not isinstance(student, bool):
        return int(student), None
    if _is_tokenizer(student):
        return None, tokenizer_hash(student)
    if isinstance(student, torch.nn.Module):
        return model_vocab_size(student), None
    cfg = student.get_text_config() if hasattr(student, "get_text_config") else student
    if getattr(cfg, "vocab_size", None) is not None:
        return int(cfg.vocab_size), None
    raise TypeError(f"student must be a model, a config, a tokenizer, a vocabulary size or a tuple of these, got "
                    f"{type(student).__name__}")


def _vocab_hint(tv: int, sv: int) -> str:
    if sv < tv:
        return (f"If the student uses the teacher's tokenizer and only its output layer is smaller (a teacher head "
                f"padded past the tokenizer, as Qwen's 151,936 rows for 151,646 tokens), pass "
                f"id_map='{SHARED_PREFIX}': teacher ids >= {sv} then join the tail. ")
    return (f"If the student uses the teacher's tokenizer and only pads its embedding beyond {tv}, pass "
            f"id_map='{SHARED_PREFIX}'. ")


def check_student(meta: dict, vocab_size: int | None = None, tokenizer_hash: str | None = None,
                  id_map=None) -> tuple[int, np.ndarray | None]:
    """Check that a student can learn from a store's teacher; return (student vocab size, id map or None).

    Without ``id_map`` the student must use the teacher's tokenizer: a ``vocab_size`` or ``tokenizer_hash`` that
    differs from the store's refuses with :class:`ConfigMismatchError` (``None`` skips that comparison).
    ``id_map="shared_prefix"`` says the student uses the teacher's tokenizer but a different vocabulary size (a
    padded head): ids below ``min(teacher, student)`` keep their number, teacher ids past the student's vocabulary
    join the tail; the tokenizer hash is still compared. With an explicit ``id_map`` (integer array
    ``[teacher_vocab]``, ``id_map[teacher_id] = student_id`` or ``-1`` for "no counterpart"; injective on its
    non-negative entries), any tokenizer is accepted: the caller vouches for the mapping.
    """
    tv = int(meta["vocab_size"])
    tok = meta.get("tokenizer") or {}
    th = tok.get("hash")
    if id_map is None or (isinstance(id_map, str) and id_map == SHARED_PREFIX):
        if tokenizer_hash is not None and th is not None and str(tokenizer_hash) != str(th):
            raise ConfigMismatchError(
                f"student tokenizer hash {tokenizer_hash!r} differs from the store's teacher tokenizer hash {th!r} "
                f"({tok.get('name')!r}): the same ids may mean different tokens. Use the teacher's tokenizer "
                "(labelstore.student.targets.tokenizer_hash(tokenizer) must equal the store's), or pass an explicit "
                "id_map (teacher id -> student id, -1 for none)"
            )
        if id_map is None:
            if vocab_size is not None and int(vocab_size) != tv:
                raise ConfigMismatchError(
                    f"student vocabulary size {vocab_size} differs from the store's teacher ({tv}, tokenizer "
                    f"{tok.get('name')!r}): the stored token ids would index the wrong tokens. "
                    + _vocab_hint(tv, int(vocab_size))
                    + "A student with another tokenizer needs an explicit id_map (teacher id -> student id, -1 for "
                    "none)"
                )
            return tv, None
        if vocab_size is None:
            raise ConfigMismatchError(f"id_map='{SHARED_PREFIX}' needs the student's vocabulary size: pass "
                                      "student=model (or its config) or student_vocab_size")
        sv = int(vocab_size)
        m = np.arange(tv, dtype=np.int64)
        m[m >= sv] = -1
        return sv, m
    if isinstance(id_map, str):
        raise ConfigMismatchError(f"id_map must be an integer array or '{SHARED_PREFIX}', got {id_map!r}")
    m = torch.as_tensor(id_map).numpy() if isinstance(id_map, torch.Tensor) else np.asarray(id_map)
    if m.ndim != 1 or m.shape[0] != tv or not np.issubdtype(m.dtype, np.integer):
        raise ConfigMismatchError(
            f"id_map must be a 1-D integer array of length {tv} (the teacher's vocabulary), got shape "
            f"{tuple(m.shape)} dtype {m.dtype}"
        )
    m = m.astype(np.int64)
    sv = int(vocab_size) if vocab_size is not None else int(m.max()) + 1
    if m.size and (m.min() < -1 or m.max() >= sv):
        raise ConfigMismatchError(f"id_map values must lie in [-1, {sv}) (student vocabulary size {sv})")
    valid = m[m >= 0]
    if np.unique(valid).size != valid.size:
        raise ConfigMismatchError("id_map maps two teacher ids to the same student id; it must be injective")
    return sv, m


def teacher_info(meta: dict, temperature: float | None, vocab_size: int) -> dict:
    """What a batch's teacher targets are (a batch's ``teacher_info``, :mod:`labelstore.student.collate`): the
    store's selection mode, the estimator kind its values are, the targets' temperature (``temperature`` if they were
    re-tempered on read, else the store's) and the vocabulary width they index."""
    mode = (meta.get("selection") or {}).get("mode")
    estimator = "hard" if meta.get("label_kind") == "hard" else ("sampled" if is_sampled(mode) else "exact")
    t = float(meta["temperature"]) if temperature is None else float(temperature)
    return {"selection": mode, "estimator": estimator, "temperature": t, "vocab_size": int(vocab_size)}


def map_ids(id_map: np.ndarray, input_ids, ids, probs, tail, mask):
    """Teacher ids -> student ids for one sequence. Kept entries without a student id join the tail."""
    x = id_map[input_ids]
    if x.size and x.min() < 0:
        bad = int(input_ids[np.argmax(x < 0)])
        raise ConfigMismatchError(f"input token {bad} has no student id in id_map; the student cannot read the text")
    sid = id_map[ids]
    drop = mask & (sid < 0)
    if drop.any():
        tail = tail + np.where(drop, probs, 0).sum(axis=1, dtype=np.float32)
        probs = np.where(drop, 0, probs).astype(np.float32, copy=False)
        mask = mask & ~drop
    sid = np.where(mask, sid, 0)
    return x, sid, probs, tail, mask


# ----------------------------------------------------------------------------------------------- temperature
def retemper(probs: np.ndarray, tail: np.ndarray, mask: np.ndarray, exponent: float, vocab_size: int,
             tail_rule: str = "uniform") -> tuple[np.ndarray, np.ndarray]:
    """``p ** exponent`` over the kept set plus the tail, renormalised (see the module docstring).

    Args: probs float32 [T, K], tail float32 [T], mask bool [T, K] (real entries), the teacher's vocab size.
    Positions that carry no mass stay zero. Returns new (probs, tail).
    """
    if tail_rule not in TAIL_RULES:
        raise ValueError(f"tail_rule must be one of {TAIL_RULES}, got {tail_rule!r}")
    a = float(exponent)
    with np.errstate(divide="ignore"):
        lk = np.where(mask, a * np.log(probs, dtype=np.float64), -np.inf)
        lt = np.log(tail, dtype=np.float64)
        if tail_rule == "uniform":
            m = (vocab_size - mask.sum(axis=1)).astype(np.float64)
            lm = np.log(np.maximum(m, 1.0))
            lt = np.where((m > 0) & (tail > 0), lm + a * (lt - lm), -np.inf)
        else:
            lt = a * lt
    mx = np.maximum(lk.max(axis=1, initial=-np.inf), lt)
    ok = np.isfinite(mx)
    mx = np.where(ok, mx, 0.0)
    ek = np.exp(lk - mx[:, None])
    et = np.exp(lt - mx)
    z = ek.sum(axis=1) + et
    z = np.where(ok, z, 1.0)
    return (ek / z[:, None]).astype(np.float32), np.where(ok, et / z, 0.0).astype(np.float32)


def temper_exponent(meta: dict, temperature: float | None) -> float | None:
    """Exponent ``a = T0 / T`` turning the stored distribution into the one at ``temperature``; None if none."""
    if temperature is None:
        return None
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    mode = (meta.get("selection") or {}).get("mode")
    if is_sampled(mode):
        raise ConfigMismatchError(
            f"cannot re-temper a store with selection mode {mode!r}: its values are sampling estimator weights, "
            "not teacher probabilities; recompile at the wanted temperature instead"
        )
    a = float(meta["temperature"]) / t
    return None if a == 1.0 else a


# ----------------------------------------------------------------------------------------------- dense
def dense_nbytes(batch: int, seq_len: int, vocab_size: int) -> int:
    return int(batch) * int(seq_len) * int(vocab_size) * 4


def check_dense_budget(batch: int, seq_len: int, vocab_size: int, budget_bytes: int) -> None:
    """Refuse (ConfigMismatchError) a dense [B, T, V] float32 target larger than ``budget_bytes``."""
    need = dense_nbytes(batch, seq_len, vocab_size)
    if need > budget_bytes:
        raise ConfigMismatchError(
            f"dense targets for a batch of {batch} x {seq_len} positions x {vocab_size} tokens need "
            f"{need / 2**30:.2f} GiB of float32, over the dense budget of {budget_bytes / 2**30:.2f} GiB. "
            "Use sparse targets (the default; labelstore.student.losses consumes them directly), shrink the batch or "
            "the "
            "sequence length, or raise dense_budget_bytes if the memory really is there"
        )


def to_dense(ids: torch.Tensor, probs: torch.Tensor, tail: torch.Tensor, mask: torch.Tensor,
             vocab_size: int, out: torch.Tensor | None = None, prior=None) -> torch.Tensor:
    """Dense float32 [..., V] targets from sparse ones, by the module's tail rule: uniform, or with ``prior``
    ([V], e.g. ``LabelStore.tail_prior()``) the prior rule with the water-filling cap.

    ``ids`` must be unique among a position's real entries (as stores write them). Positions with no mass
    (padding) come out all zero. ``out``: a float32 [..., V] tensor to write into (e.g. in shared memory).
    """
    n = mask.sum(dim=-1)
    rest = vocab_size - n
    # every token kept: no tail tokens to carry t, so the kept mass is rescaled to 1
    scale = torch.where(rest > 0, torch.ones_like(tail), 1.0 / (1.0 - tail).clamp_min(1e-30))
    shape = (*tail.shape, vocab_size)
    dense = torch.empty(shape, dtype=torch.float32, device=probs.device) if out is None else out
    if prior is None:
        fill = uniform_fill(tail, n, vocab_size)
        dense.copy_(fill.unsqueeze(-1).expand(shape))
    else:
        k = ids.shape[-1]
        ids2, m2, p2 = ids.reshape(-1, k), mask.reshape(-1, k), probs.reshape(-1, k)
        pp = prepare_prior(prior, vocab_size, ids.device)
        c, cap = water_fill_scale(tail.reshape(-1), ids2, m2, kept_cap(p2, m2), pp, vocab_size)
        for a in range(0, c.shape[0], 256):  # row chunks: no [N, V] float64 temporary
            b = min(c.shape[0], a + 256)
            dense.view(-1, vocab_size)[a:b] = spread_fill(c[a:b], cap[a:b], pp.weights, vocab_size)
    # kept ids receive p - fill on top of the fill; padding entries (id 0) add exactly 0
    src = torch.where(mask, probs * scale.unsqueeze(-1) - dense.gather(-1, ids), torch.zeros_like(probs))
    dense.scatter_add_(-1, ids, src)
    return dense
