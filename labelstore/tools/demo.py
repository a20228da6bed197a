"""`labelstore demo`: build the embedded demo teacher (cached), compile held-out text, show what it costs.

1. The demo teacher (:mod:`labelstore.tools.demo_model`) is trained on the Python standard library's sources the
   first time (a few CPU minutes) and cached; later runs load it at once.
2. `labelstore compile` runs it, through ``from_pretrained`` like any user's model, over the held-out
   standard-library files into a store (a temporary one unless ``--out`` is given).
3. The store's `info` summary is printed, then its fidelity against the teacher's dense distributions on a
   subset of positions: mean entropy against log V (a random model would sit at log V and make every
   compression figure meaningless), then per selection mode:

   - ``sample`` (the compile default): teacher mass on the stored ids, KL(store || teacher) over the stored ids
     (KL(teacher || store) is infinite for a store without a tail), and how often the most-drawn entry is the
     teacher's argmax;
   - ``topk``: KL(teacher || stored reconstruction) with the store's tail prior (and uniformly), kept mass, and
     how often the stored first entry is the teacher's argmax.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from labelstore.codecs import CODEC_NAMES, DEFAULT_CODEC
from labelstore.teacher.options import DEFAULT_SELECTION
from labelstore.tools.demo_model import (
    DemoConfig,
    corpus_files,
    cpu_threads,
    default_cache_root,
    default_config,
    demo_info,
    ensure_demo_teacher,
    split_files,
    stdlib_root,
    threads_for_load,
    utf8_files,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", default=None,
                        help="where the demo teacher is cached (default: $LABELSTORE_CACHE or ~/.cache/labelstore)")
    parser.add_argument("--out", default=None, help="keep the compiled store here (default: a temporary folder)")
    parser.add_argument("--selection", default=DEFAULT_SELECTION, choices=("sample", "topk"),
                        help=f"what each position keeps, as in `labelstore compile` (default {DEFAULT_SELECTION}, "
                             "the compile default)")
    parser.add_argument("--draws", type=int, default=16,
                        help="--selection sample: draws per position (compile's --samples; default 16)")
    parser.add_argument("--k", type=int, default=32, help="--selection topk: kept entries per position (default 32)")
    parser.add_argument("--codec", default=None, choices=[c for c in CODEC_NAMES if c != "none"],
                        help=f"value codec (default: {DEFAULT_CODEC} for topk, count8 for sample)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens per sequence (default: the teacher's training length, 256)")
    parser.add_argument("--samples", type=int, default=128, help="held-out sequences to compile (default 128)")
    parser.add_argument("--fidelity-samples", type=int, default=16,
                        help="sequences whose dense teacher distributions are compared (default 16)")
    parser.add_argument("--rebuild", action="store_true", help="retrain the demo teacher even if cached")


def run(args: argparse.Namespace) -> int:
    run_demo(cache_dir=args.cache_dir, out=args.out, selection=args.selection, draws=args.draws, k=args.k,
             codec=args.codec, max_length=args.max_length,
             samples=args.samples, fidelity_samples=args.fidelity_samples, rebuild=args.rebuild)
    return 0


def run_demo(**kwargs) -> dict:
    """The whole demo; returns its figures (also printed). Uses fewer CPU threads on a busy machine."""
    with cpu_threads(threads_for_load()):
        return _run_demo(**kwargs)


def _run_demo(*, cache_dir=None, out=None, selection: str = DEFAULT_SELECTION, draws: int = 16, k: int = 32,
              codec: str | None = None, max_length: int | None = None,
              samples: int = 128, fidelity_samples: int = 16, rebuild: bool = False,
              config: DemoConfig | None = None, corpus_root: Path | None = None, log=print) -> dict:
    from transformers.utils import logging as hf_logging

    from labelstore.store.info import format_summary, summary
    from labelstore.teacher.compile import CompileOptions, compile_store
    from labelstore.teacher.model import load_teacher

    hf_logging.disable_progress_bar()  # "Loading weights" bars would drown the demo's own report
    t_start = time.perf_counter()
    cfg = config or default_config()
    max_length = max_length or cfg.seq_len  # RoPE positions past the training length would be extrapolated
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    built = not (cache_root / cfg.cache_name()).exists() or rebuild
    teacher = ensure_demo_teacher(cache_root, cfg, log=log, rebuild=rebuild, root=corpus_root)
    info = demo_info(teacher)
    t_teacher = time.perf_counter() - t_start
    log(f"demo teacher    {teacher}  ({info['parameters'] / 1e6:.1f}M parameters, vocab {info['vocab_size']:,}, "
        f"{'built' if built else 'cached'} in {t_teacher:.1f}s)")

    root = Path(corpus_root) if corpus_root is not None else stdlib_root()
    _, heldout = split_files(corpus_files(root), root, cfg.heldout_modulus)
    heldout = utf8_files(heldout)
    tmp = None
    if out is None:
        tmp = tempfile.mkdtemp(prefix="labelstore-demo-")
        out = str(Path(tmp) / "store")
    try:
        chosen = {"selection": "topk", "k": k} if selection == "topk" else {"selection": selection, "samples": draws}
        opts = CompileOptions(teacher=str(teacher), data=[str(f) for f in heldout], out=out, codec=codec, **chosen,
                              max_length=max_length, max_samples=samples, tokens_per_batch=8 * max_length,
                              device="cpu", dtype="float32", progress=True)
        t0 = time.perf_counter()
        res = compile_store(opts)
        t_compile = time.perf_counter() - t0
        s = summary(out)
        log(format_summary(s))
        log(f"compile         {res.tokens:,} tokens in {t_compile:.1f}s ({res.tokens / t_compile:,.0f} tokens/s)")
        model = load_teacher(str(teacher), torch.float32, torch.device("cpu"))
        fid = store_fidelity(out, model, fidelity_samples)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    V = s["vocab_size"]
    log(f"teacher entropy {fid['entropy']:.2f} nats mean over {fid['positions']:,} held-out positions "
        f"(log V = {math.log(V):.2f}: a random teacher would be near-uniform); top-1 prob {fid['top1_prob']:.2f}")
    if fid["mode"] == "sample":
        log(f"fidelity        {fid['draws']} draws per position keep {fid['entries']:.1f} distinct ids holding "
            f"{fid['kept_mass']:.3f} of the teacher's mass; KL(store || teacher) {fid['kl_store_teacher']:.4f} nats "
            f"mean over the stored ids; most-drawn entry = teacher argmax {fid['first_is_argmax']:.3f}. A sampled "
            "store is an unbiased estimate of the teacher (its expected frequencies are the teacher's "
            "probabilities), so KL(teacher || store) is not its measure: README 'Do stored labels train good "
            "students?' compares what students learn from it")
    else:
        tail_note = "" if fid["tail"] == "uniform" else \
            f" (tail spread by the store's prior; uniformly: {fid['kl_mean_uniform_tail']:.4f})"
        log(f"fidelity        KL(teacher || store) {fid['kl_mean']:.4f} nats mean{tail_note}, p99 "
            f"{fid['kl_p99']:.4f}; kept mass {fid['kept_mass']:.3f}; stored first entry = teacher argmax "
            f"{fid['first_is_argmax']:.3f} (argmax of the 8-bit reconstruction: {fid['top1_agreement']:.3f}; "
            "lower where quantised values tie)")
    total = time.perf_counter() - t_start
    log(f"demo finished in {total:.1f}s on {torch.get_num_threads()} CPU thread(s)"
        f"{'' if tmp is None else ' (temporary store removed; --out DIR keeps it)'}")
    return {"teacher": str(teacher), "built": built, "teacher_seconds": t_teacher, "compile_seconds": t_compile,
            "total_seconds": total, "summary": s, "fidelity": fid, "teacher_info": info}


@torch.inference_mode()
def store_fidelity(path, model, max_samples: int = 16) -> dict:
    """Entropy of the teacher and fidelity of the store on its first ``max_samples`` sequences."""
    from labelstore.store.reader import LabelStore
    from labelstore.tools.fidelity import kl_to_reconstruction, summarize

    store = LabelStore(path)
    if store.meta["selection"]["mode"] == "sample":
        return sampled_fidelity(store, model, max_samples)
    temp = float(store.meta["temperature"])
    prior = store.tail_prior()  # None for a store without one
    metrics, uniform, ent, top1p, first = [], [], [], [], []
    for i in range(min(max_samples, len(store))):
        s = store[i]
        logits = model(input_ids=s.input_ids[None]).logits[0].float()
        lp = torch.log_softmax(logits.double() / temp, dim=-1)
        ent.append((-(lp.exp() * lp).sum(-1)).numpy())
        top1p.append(lp.max(-1).values.exp().numpy())
        first.append((s.ids[:, 0] == logits.argmax(-1)).numpy())  # the store keeps the teacher's order
        metrics.append(kl_to_reconstruction(logits, s.ids, s.probs, s.tail, s.counts, temperature=temp,
                                            prior=prior))
        if prior is not None:
            uniform.append(kl_to_reconstruction(logits, s.ids, s.probs, s.tail, s.counts, temperature=temp)["kl"])
    merged = {key: np.concatenate([m[key] for m in metrics]) for key in metrics[0]}
    out = summarize(merged)
    out["tail"] = "uniform" if prior is None else "prior"
    out["kl_mean_uniform_tail"] = float(np.concatenate(uniform).mean()) if uniform else out["kl_mean"]
    out["entropy"] = float(np.concatenate(ent).mean())
    out["top1_prob"] = float(np.concatenate(top1p).mean())
    out["first_is_argmax"] = float(np.concatenate(first).mean())
    out["positions"] = int(merged["kl"].size)
    out["mode"] = store.meta["selection"]["mode"]
    return out


@torch.inference_mode()
def sampled_fidelity(store, model, max_samples: int = 16) -> dict:
    """A ``sample`` store on its first ``max_samples`` sequences: teacher mass on the stored ids, KL(store ||
    teacher) over them (the stored frequencies q against the teacher's p: ``sum q log(q / p)``, finite), and the
    most-drawn entry against the teacher's argmax (ties between equal counts go to the first stored)."""
    temp = float(store.meta["temperature"])
    kept, rkl, first, entries, ent, top1p = [], [], [], [], [], []
    for i in range(min(max_samples, len(store))):
        s = store[i]
        lp = torch.log_softmax(model(input_ids=s.input_ids[None]).logits[0].double() / temp, dim=-1)
        ent.append((-(lp.exp() * lp).sum(-1)).numpy())
        top1p.append(lp.max(-1).values.exp().numpy())
        K = s.ids.shape[1]
        mask = torch.arange(K)[None, :] < s.counts[:, None].long()
        q = torch.where(mask, s.probs.double(), torch.zeros((), dtype=torch.float64))
        lpk = lp.gather(1, s.ids.long())
        kept.append(torch.where(mask, lpk.exp(), torch.zeros((), dtype=torch.float64)).sum(-1).numpy())
        rkl.append(torch.where(q > 0, q * (q.clamp_min(1e-300).log() - lpk), torch.zeros_like(q)).sum(-1).numpy())
        top = q.argmax(-1)  # the first of equal counts
        first.append((s.ids.long().gather(1, top[:, None])[:, 0] == lp.argmax(-1)).numpy())
        entries.append(s.counts.numpy())
    cat = np.concatenate
    return {"mode": "sample", "draws": int(store.meta["selection"]["samples"]), "positions": int(cat(kept).size),
            "kept_mass": float(cat(kept).mean()), "kl_store_teacher": float(cat(rkl).mean()),
            "first_is_argmax": float(cat(first).mean()), "entries": float(cat(entries).mean()),
            "entropy": float(cat(ent).mean()), "top1_prob": float(cat(top1p).mean())}
