"""DistillKit under the same rules: its own compressor, run from its source on the distributions `labelstore bench`
measures, scored with labelstore's fidelity metrics, and the equal-KL comparison between the two tools."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from labelstore.tools.bench import prior_kl_crossfit

# The two configurations DistillKit's README recommends (arcee-ai/DistillKit README, "Recommended configuration"
# and "budget pick"); ``d`` is set to the source's vocabulary.
DISTILLKIT_CONFIGS = {
    "budget": {"k": 50, "exact_k": 1, "exact_dtype": "bfloat16", "polynomial_terms": [0, 1, "sqrt"],
               "term_dtype": "float32", "residual_bins": [], "delta_encoding": False, "error_diffusion": False},
    "recommended": {"k": 128, "exact_k": 16, "exact_dtype": "bfloat16", "polynomial_terms": [0, 1, 2, 3, 4, "sqrt"],
                    "term_dtype": "float32", "residual_bins": [], "delta_encoding": False,
                    "error_diffusion": False},
}
DISTILLKIT_MISSING_FLOOR = 1e-8  # DistillKit's densify(SYMMETRIC_UNIFORM) floors each missing token at 1e-8


def load_distillkit(src: str | None):
    """DistillKit's ``distillkit.compression`` from a source checkout (its own code, not a copy), or None with
    the reason. Needs only torch and pydantic."""
    import hashlib
    import importlib
    import sys

    if not src:
        return None, "no --distillkit-src given (a checkout of github.com/arcee-ai/DistillKit)"
    root = Path(src)
    if not (root / "distillkit" / "compression" / "compressor.py").exists():
        return None, f"{root} holds no distillkit/compression/compressor.py"
    sys.path.insert(0, str(root))
    try:
        mod = importlib.import_module("distillkit.compression")
        mod.LogprobCompressor  # noqa: B018 (resolves the lazy export: imports the compressor and its deps)
    except ImportError as e:
        return None, f"DistillKit's compression code does not import here: {e}"
    h = hashlib.sha256()
    for f in sorted((root / "distillkit" / "compression").glob("*.py")):
        h.update(f.read_bytes())
    mod.source_sha256 = h.hexdigest()
    return mod, None


def distillkit_measure(logits: torch.Tensor, name: str, dk, folds, chunk: int = 256) -> dict:
    """Run DistillKit's compressor (configuration ``name``) on the teacher's log-probabilities in float64 and
    score its decoded targets under every rule.

    Decoded entries: ``p_i = exp(decoded log-prob)``; DistillKit stores no tail, so the missing mass is
    ``1 - sum p`` floored as DistillKit's own ``densify(..., SYMMETRIC_UNIFORM)`` floors it (``1e-8`` per
    missing token), and the whole is renormalised (``renormalize=True``). Under the uniform rule this is
    exactly DistillKit's densified target; the prior rule spreads the same missing mass by the cross-fitted
    prior. Bytes: the compressor's output (``compressed_logprobs`` + ``bytepacked_indices``) per position,
    without Parquet's own overhead.
    """
    from labelstore.tools.fidelity import bucket_kl, kl_to_reconstruction

    N, V = logits.shape
    cfg = dk.DistributionQuantizationConfig(d=V, **DISTILLKIT_CONFIGS[name])
    comp = dk.LogprobCompressor(cfg)
    ids_l, p_l, t_l, nbytes = [], [], [], 0
    t0 = time.perf_counter()
    for a in range(0, N, chunk):
        b = min(N, a + chunk)
        row = comp.compress(torch.log_softmax(logits[a:b].double(), -1))
        nbytes += sum(v.numel() * v.element_size() for v in row.values())
        ids, vals = comp.decompress_to_sparse(row)
        p = vals.double().exp()
        t = (1 - p.sum(-1)).clamp_min((V - p.shape[1]) * DISTILLKIT_MISSING_FLOOR)
        total = p.sum(-1) + t
        ids_l.append(ids.long())
        p_l.append(p / total[:, None])
        t_l.append(t / total)
    seconds = time.perf_counter() - t0
    ids, probs, tail = torch.cat(ids_l), torch.cat(p_l), torch.cat(t_l)
    counts = torch.full((N,), ids.shape[1], dtype=torch.long)
    uni = kl_to_reconstruction(logits, ids, probs, tail, counts)
    return {"tool": "DistillKit", "setting": name, "config": {"d": V, **DISTILLKIT_CONFIGS[name]},
            "positions": N, "vocab_size": V, "bytes_per_token": nbytes / N,
            "documented_bytes_per_token": cfg.total_bits() / 8, "fit_dtype": "float64",
            "kl_mean": float(uni["kl"].mean()), "kl_p99": float(np.quantile(uni["kl"], 0.99)),
            "kl_mean_prior": float(prior_kl_crossfit(logits, ids, probs, tail, counts, folds).mean()),
            "kl_mean_bucket": float(bucket_kl(logits, ids, probs, tail, counts).mean()),
            "kept_mass": float(uni["kept_mass"].mean()), "top1_agreement": float(uni["top1"].mean()),
            "compress_decompress_seconds": seconds}


RULE_KEYS = {"uniform": "kl_mean", "prior": "kl_mean_prior"}  # the rules a comparison at equal KL can use


CURVE_MODES = ("topk", "adaptive")  # modes whose rows form a bytes-against-KL curve by their size parameter
DEFAULT_STEP = 1.0 / 16.0  # log8's default step (labelstore.codecs.LOG8_DEFAULT_STEP)


def family_of(r: dict) -> tuple | None:
    """A curve's identity: (mode, log8 step, encoding). Rows of one family keep the same kind of entries at
    every size and differ only in how many; None for rows that are no curve's (other codecs, sampled modes)."""
    if r.get("mode") not in CURVE_MODES or r.get("codec") != "log8" or r.get("kl_mean") is None:
        return None
    return (r["mode"], float(r.get("step", DEFAULT_STEP)), r["encoding"])


def family_label(fam: tuple) -> str:
    mode, step, enc = fam
    st = "" if step == DEFAULT_STEP else f" step {step:g}"
    return f"{mode} log8{st} {enc}"


def size_of(r: dict):
    """A row's size parameter on its curve: k for topk, the mean entries for adaptive."""
    return r.get("mean_k", r["k"]) if r["mode"] == "adaptive" else r["k"]


def curves(results: list[dict], source: str, encodings=None) -> dict[tuple, list[dict]]:
    """Every family's rows of ``source``, each sorted by bytes per token."""
    out: dict[tuple, list[dict]] = {}
    for r in results:
        fam = family_of(r)
        if r["source"] == source and fam is not None and (encodings is None or fam[2] in encodings):
            out.setdefault(fam, []).append(r)
    return {f: sorted(rs, key=lambda r: r["bytes_per_token"]) for f, rs in sorted(out.items())}


def bytes_at_kl(curve: list[dict], key: str, target: float, extra: float = 0.0) -> dict:
    """The smallest measured row of ``curve`` whose ``key`` is at most ``target``, and the bytes at exactly
    ``target`` interpolated between it and the previous point (log-linear in KL: an estimate, not a store)."""
    match = next((r for r in curve if r[key] <= target), None)
    row = {"match": match, "bytes": None if match is None else match["bytes_per_token"] + extra,
           "interpolated_bytes": None}
    if match is not None:
        i = curve.index(match)
        if i > 0 and curve[i - 1][key] > target > 0 and match[key] < target:  # not needed at a measured point
            lo, hi = curve[i - 1], match
            f = math.log(lo[key] / target) / math.log(lo[key] / hi[key])
            row["interpolated_bytes"] = (lo["bytes_per_token"] + f * (hi["bytes_per_token"] - lo["bytes_per_token"])
                                         + extra)
    return row


def equal_fidelity(results: list[dict], dk_rows: list[dict], encodings=None) -> list[dict]:
    """For each DistillKit row, rule and labelstore curve (a family: mode topk or adaptive, log8 step, encoding;
    ``encodings`` filters): the smallest measured labelstore row whose KL under the SAME rule is at most
    DistillKit's, and the byte ratio. Under the prior rule both sides pay the prior file amortised at the scale
    (DistillKit would need the same file to use that rule). Curves never mix: each is matched on its own rows.

    The bucket rule is left out: it makes truncation free, so a smaller k would always "match"."""
    out = []
    for d in dk_rows:
        for fam, curve in curves(results, d["source"], encodings).items():
            for rule, key in RULE_KEYS.items():
                out.append(_match(d, curve, fam, rule, key))
    return out


def _match(d: dict, curve: list[dict], fam: tuple, rule: str, key: str) -> dict:
    extra = curve[0]["prior_bytes_per_token_at_scale"] if rule == "prior" else 0.0
    hit = bytes_at_kl(curve, key, d[key], extra)
    match = hit["match"]
    row = {"source": d["source"], "rule": rule, "distillkit": d["setting"], "encoding": fam[2],
           "family": family_label(fam), "mode": fam[0], "step": fam[1],
           "distillkit_bytes": d["bytes_per_token"] + extra, "distillkit_kl": d[key],
           "labelstore_k": None, "labelstore_bytes": None, "labelstore_kl": None, "ratio": None,
           "interpolated_bytes": None, "interpolated_ratio": None}
    if match is not None:
        row.update(labelstore_k=size_of(match), labelstore_bytes=hit["bytes"], labelstore_kl=match[key],
                   ratio=hit["bytes"] / row["distillkit_bytes"])
        if hit["interpolated_bytes"] is not None:
            row.update(interpolated_bytes=hit["interpolated_bytes"],
                       interpolated_ratio=hit["interpolated_bytes"] / row["distillkit_bytes"])
    return row


def at_reference_fidelity(results: list[dict], reference_k: int = 32, scale_tokens: float = 5e12) -> list[dict]:
    """The seed scenario's question per source and curve: bytes per token at the mean KL (uniform rule) of
    top-``reference_k`` log8 (step 1/16) expgolomb, interpolated on each curve, and the store at ``scale_tokens``."""
    out = []
    for src in dict.fromkeys(r["source"] for r in results):
        ref = next((r for r in results if r["source"] == src and r["k"] == reference_k
                    and family_of(r) == ("topk", DEFAULT_STEP, "expgolomb")), None)
        if ref is None:
            continue
        for fam, curve in curves(results, src).items():
            hit = bytes_at_kl(curve, "kl_mean", ref["kl_mean"])
            b = hit["interpolated_bytes"] if hit["interpolated_bytes"] is not None else hit["bytes"]
            out.append({"source": src, "family": family_label(fam), "reference_k": reference_k,
                        "reference_kl": ref["kl_mean"], "bytes_per_token": b,
                        "measured_size": None if hit["match"] is None else size_of(hit["match"]),
                        "measured_bytes": hit["bytes"], "interpolated": hit["interpolated_bytes"] is not None,
                        "store_TB": None if b is None else b * scale_tokens / 1e12})
    return out
