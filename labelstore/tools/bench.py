"""`labelstore bench`: bytes per token against fidelity, for every selection setting and value codec.

Each setting is measured end to end: the extraction kernel's public function compresses the teacher's logits,
the real StoreWriter writes real shards, bytes per token is read off the disk, and the reader's decoded
targets are compared with the teacher's full distribution (labelstore.tools.fidelity, float64):
mean and 99th-percentile KL(teacher || reconstruction), kept mass, top-1 agreement.

Sources: the demo teacher on held-out standard-library text (real distributions), and SYNTHETIC Zipf-like
logits (labelstore.tools.synthetic) at chosen vocabulary sizes, labelled as such everywhere they are shown.

Every row is scored under every reconstruction rule (labelstore.reconstruction, docs/FORMAT.md 5c):
``uniform`` (the tail spread evenly), ``prior`` (spread like the teacher's mean distribution, water-filled under
the smallest kept probability) and ``bucket`` (the (K + 1)-bucket view the ``tail="bucket"`` loss trains on;
truncation is free there, so it only shows value and tail error). The prior is CROSS-FITTED: the positions are
split into two halves and each half is scored with the prior estimated on the other (mixed as the store mixes
it), never on the positions it scores. The prior file's bytes are amortised over ``--scale-tokens`` tokens.

DistillKit (arcee-ai/DistillKit, ``distillkit/compression``) is run from its own source when ``--distillkit-src``
names a checkout: its ``LogprobCompressor`` with the README's "budget" and "recommended" configurations
compresses the same distributions (log-probabilities in float64, so its least-squares tail fit runs in
float64), its decoder decodes them, and the result is scored under the same rules. Its rows then meet
labelstore's top-k zstd curve at equal KL, rule by rule: never across rules.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from labelstore.reconstruction import mixed_prior, uniform_fill
from labelstore.selection import check_selection, is_sampled
from labelstore.tools.bench_report import (
    costs_paragraph,
    distillkit_tables,
    markdown_table,
    plot,
    reference_table,
)

SEED_FP8_DENSE_GB = 5e12 * 1e5 / 1e9  # the seed's scenario: 5T tokens x 100k vocabulary x 1 byte = 5e8 GB
DENSE = {"fp32": 4, "bf16": 2, "fp8": 1}


# ------------------------------------------------------------------------------------------------ sources
def demo_source(positions: int, seq_len: int = 512, log=print):
    """(name, logits [N, V] float32, next tokens [N]) from the demo teacher on held-out text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from labelstore.tools.demo_model import (
        corpus_files,
        default_config,
        ensure_demo_teacher,
        read_texts,
        split_files,
        stdlib_root,
        tokenize_stream,
    )

    cfg = default_config()
    path = ensure_demo_teacher(cfg=cfg, log=log)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    root = stdlib_root()
    _, held = split_files(corpus_files(root), root, cfg.heldout_modulus)
    stream = tokenize_stream(tok, read_texts(held[:200]))
    n = max(1, min(positions // seq_len, (len(stream) - 1) // seq_len))
    x = torch.from_numpy(stream[: n * seq_len + 1].astype(np.int64))
    out = []
    with torch.inference_mode():
        for i in range(n):
            out.append(model(input_ids=x[i * seq_len:(i + 1) * seq_len][None]).logits[0].float())
    logits = torch.cat(out)
    return "demo teacher", logits, x[1: n * seq_len + 1]


def synthetic_source(vocab: int, positions: int, mean_entropy: float = 2.5, seed: int = 0):
    from labelstore.tools.synthetic import zipf_logits

    logits = zipf_logits(positions, vocab, mean_entropy=mean_entropy, seed=seed)
    g = torch.Generator().manual_seed(seed)
    nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)[:, 0]
    return f"SYNTHETIC V={vocab}", logits, nxt


# ------------------------------------------------------------------------------------------------ measuring
CURVE_K = (8, 12, 16, 20, 32, 50, 64, 72, 128)  # the sizes of every bytes-against-KL curve
ADAPTIVE_MEANS = (8, 12, 16, 20, 32, 40, 50, 64, 80, 96, 112, 128)  # mean entries per position of the adaptive curves


def default_settings() -> list[dict]:
    s = [{"mode": "topk", "k": k, "codec": "log8", "encoding": "packed"} for k in (1, 8, 16, 32, 64, 128)]
    s += [{"mode": "topk", "k": k, "codec": "log8", "encoding": enc}
          for enc in ("zstd", "expgolomb") for k in (1, *CURVE_K)]
    s += [{"mode": "topk", "k": k, "codec": "log8", "step": 0.5, "encoding": "expgolomb"} for k in CURVE_K]
    s += [{"mode": "topk", "k": k, "codec": "log8", **step, "encoding": "grouped"}
          for step in ({}, {"step": 0.5}) for k in CURVE_K]
    # adaptive: the same mean entries per position, spent where they lower the KL most (cap 4x the mean)
    s += [{"mode": "adaptive", "k": 4 * m, "mean_k": m, "codec": "log8", **step, "encoding": enc}
          for enc, step in (("expgolomb", {}), ("grouped", {"step": 0.25}), ("grouped", {"step": 0.5}))
          for m in ADAPTIVE_MEANS]
    s += [{"mode": "topk", "k": 32, "codec": c, "encoding": "packed"} for c in ("e4m3", "e5m2", "fp16")]
    s += [{"mode": "topp", "k": 128, "p": 0.8, "min_k": 4, "codec": "log8", "encoding": "zstd"},
          {"mode": "topk+sample", "k_exact": 8, "samples": 8, "k": 16, "codec": "log8", "encoding": "zstd"},
          {"mode": "sample", "samples": 12, "k": 12, "codec": "count8", "encoding": "zstd"},
          {"mode": "sample", "samples": 32, "k": 32, "codec": "count8", "encoding": "zstd"}]
    s += [{"mode": "argmax", "k": 1, "codec": "none", "encoding": enc} for enc in ("packed", "zstd")]
    return s


def codec_of(setting: dict):
    """The setting's value codec (``"step"``: the log8 step, default 1/16)."""
    from labelstore.codecs import get_codec

    return get_codec(setting["codec"], **({"step": setting["step"]} if "step" in setting else {}))


def codec_label(setting: dict) -> str:
    return setting["codec"] + (f"/{setting['step']:g}" if "step" in setting else "")


def selection_of(setting: dict) -> dict:
    """The store's ``meta["selection"]`` for a setting (its mode's keys, checked by the one selection schema)."""
    return check_selection(setting, setting["codec"])


def select(logits: torch.Tensor, setting: dict, seq_len: int = 256):
    """Run the extraction for one setting. Returns (ids [N, K] int, values [N, K*bpv] uint8, counts [N], tail [N]).

    Sampled modes draw with ``setting.get("seed", 0)`` and row ids ``0..N-1``; ``adaptive`` shares its entry
    budget within each row of ``seq_len`` positions (as a compile does within a sample)."""
    from labelstore_kernels import extract, extract_topk

    mode = setting["mode"]
    codec = codec_of(setting)
    if mode in ("topk", "argmax"):
        ex = extract_topk(logits, setting["k"], codec=codec)
        return ex.ids, ex.values, ex.counts, ex.tail
    if mode == "adaptive":
        groups = torch.arange(logits.shape[0], dtype=torch.int64) // seq_len
        ex = extract(logits, selection_of(setting), codec=codec, groups=groups)
        return ex.ids, ex.values, ex.counts, ex.tail
    if mode == "topp" or is_sampled(mode):
        ex = extract(logits, selection_of(setting), codec=codec, seed=setting.get("seed", 0))
        return ex.ids, ex.values, ex.counts, ex.tail
    raise ValueError(f"selection mode {mode!r} is not supported by this bench yet")


def ce_gap(teacher_logits: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor, tail: torch.Tensor,
           counts: torch.Tensor, chunk: int = 256) -> np.ndarray:
    """Per-row cross-entropy gap ``CE(q, p) - H(q) = KL(q || p)`` of the reconstruction ``q`` (kept entries plus
    the tail spread uniformly, as in labelstore.tools.fidelity) against the teacher ``p``, float64, nats.

    Why: the sampled modes' reconstruction gives 0 to every token not drawn (the reader reports tail 0 there,
    docs/FORMAT.md 5b), so KL(teacher || reconstruction) is infinite and ``kl_mean`` is reported as None. This
    direction is finite for every mode (``q > 0`` only where ``p > 0``), 0 only for an exact copy, and measures
    the sampled targets' noise (it shrinks like 1/S with S draws) as well as truncation. It is the extra code
    length, in nats, of the stored target under the teacher beyond the target's own entropy."""
    N, V = teacher_logits.shape
    K = ids.shape[1]
    out = np.empty(N)
    for a in range(0, N, chunk):
        b = min(N, a + chunk)
        lp = torch.log_softmax(teacher_logits[a:b].double(), dim=-1)
        mask = torch.arange(K)[None, :] < counts[a:b, None]
        fill = uniform_fill(tail[a:b].double(), counts[a:b].double(), V)
        q = fill[:, None].expand(b - a, V).clone()
        kid = torch.where(mask, ids[a:b].long(), 0)
        q.scatter_(1, kid, torch.where(mask, probs[a:b].double(), q.gather(1, kid)))
        terms = torch.where(q > 0, q * (torch.log(q.clamp_min(1e-300)) - lp), torch.zeros_like(q))
        out[a:b] = terms.sum(-1).clamp_min(0).numpy()
    return out


def bench_meta(setting: dict, V: int, K: int, codec) -> dict:
    """Store metadata shaped like a compile's (labelstore.teacher.compile.build_meta: compile_config and
    runtime with one data file), so that the shard fixed cost (the schema metadata is stored twice per shard)
    is measured at a realistic size."""
    hard = setting["mode"] == "argmax"
    return {"vocab_size": V, "label_kind": "hard" if hard else "soft",
            "selection": {**selection_of(setting), "k": K}, "value_codec": codec.to_json(),
            "encoding": {"name": setting["encoding"]}, "temperature": 1.0,
            "teacher": {"name": "bench-teacher", "hash": "0" * 64},
            "tokenizer": {"name": "bench-teacher", "hash": "1" * 64},
            "compile_config": {"data": {"sha256": "2" * 64, "samples": 1000, "tokens": 2048000},
                               "max_length": 2048, "packing": "pack", "text_field": "text",
                               "token_field": "input_ids", "max_samples": None, "dtype": "bfloat16",
                               "tail_prior": not hard, "add_special_tokens": True, "eos_between_documents": True},
            "runtime": {"data_files": ["/data/corpus/part-00000.jsonl"], "tokens_per_batch": 16384,
                        "device": "cuda:0", "world_size": 1, "labelstore": "0.0", "torch": torch.__version__,
                        "transformers": "4.x"}}


def crossfit_folds(logits: torch.Tensor, mix: float, seq_len: int = 256) -> list[tuple[slice, np.ndarray]]:
    """Two folds: each half of the positions (cut at a sequence boundary) with the mixed prior estimated on
    the OTHER half (mean teacher distribution, mixed with the uniform one as the store mixes it)."""
    N = logits.shape[0]
    cut = max(1, (N // 2) // seq_len) * seq_len if N > seq_len else N // 2
    halves = [slice(0, cut), slice(cut, N)]

    def mass(sl):
        return torch.softmax(logits[sl].double(), -1).sum(0).numpy()

    return [(halves[0], mixed_prior(mass(halves[1]), mix)), (halves[1], mixed_prior(mass(halves[0]), mix))]


def prior_kl_crossfit(logits, ids, probs, tail, counts, folds) -> np.ndarray:
    """Per-row KL under the prior rule, each fold scored with the prior of the other fold."""
    from labelstore.tools.fidelity import kl_to_reconstruction

    out = np.empty(logits.shape[0])
    for sl, prior in folds:
        out[sl] = kl_to_reconstruction(logits[sl], ids[sl], probs[sl], tail[sl], counts[sl], prior=prior)["kl"]
    return out


def shard_metadata_bytes(store: Path) -> int:
    """Bytes of one shard's schema metadata (stored twice per shard: schema message and footer)."""
    import pyarrow as pa

    shard = sorted((store / "shards").glob("r*.arrow"))[0]
    with pa.OSFile(str(shard), "rb") as f:
        md = pa.ipc.open_file(f).schema.metadata or {}
    return sum(len(k) + len(v) for k, v in md.items())


def write_twice(rows: list[tuple], meta: dict, teacher_mass: np.ndarray, positions: int, workdir: Path) -> list[int]:
    """Shard bytes of ``workdir/store1`` (every row once) and ``workdir/store2`` (every row twice), each one shard.

    Bytes per token is the marginal cost, ``(sizes[1] - sizes[0]) / positions``, so that the fixed cost of a shard
    (2 x the schema metadata, schema, footer) stays separate. ``rows``: the writer's ``add`` arguments after the
    sample id; the teacher mass goes in as a compile adds it (the store's tail prior)."""
    from labelstore.store.writer import StoreWriter

    sizes = []
    for copies in (1, 2):
        store = workdir / f"store{copies}"
        shutil.rmtree(store, ignore_errors=True)
        with StoreWriter(store, meta) as w:
            for rep in range(copies):
                for i, r in enumerate(rows):
                    w.add(rep * len(rows) + i, *r)
                w.add_teacher_mass(teacher_mass, positions)
        shards = list((store / "shards").glob("r*.arrow"))
        if len(shards) != 1:
            raise RuntimeError(f"the bench expects one shard per store, got {len(shards)}: raise shard_bytes")
        sizes.append(shards[0].stat().st_size)
    return sizes


def measure(logits: torch.Tensor, next_tokens: torch.Tensor, setting: dict, workdir: Path, seq_len: int = 256,
            scale_tokens: float = 5e12) -> dict:
    """One setting end to end. Soft modes also report ``ce_gap_mean`` (see :func:`ce_gap`); the sampled modes
    report the forward KLs as None: their reconstruction is 0 off the drawn ids, so the forward KL is infinite,
    and any epsilon floor would make the figure mostly ``missing mass * log(1/epsilon)``.

    KL columns: ``kl_mean`` (uniform rule), ``kl_mean_prior`` (prior rule, cross-fitted prior),
    ``kl_mean_prior_insample`` (prior estimated on the scored positions themselves: flattering, for reference),
    ``kl_mean_bucket`` (the bucket view)."""
    from labelstore.store.reader import LabelStore
    from labelstore.tools.fidelity import bucket_kl, kl_to_reconstruction, summarize

    N, V = logits.shape
    codec = codec_of(setting)
    hard = setting["mode"] == "argmax"
    t0 = time.perf_counter()
    ids, values, counts, tail = select(logits, setting, seq_len)
    t_extract = time.perf_counter() - t0
    K = ids.shape[1]
    meta = bench_meta(setting, V, K, codec)
    bpv = codec.bytes_per_value
    ids_np, val_np, cnt_np, tail_np = ids.numpy(), values.numpy(), counts.numpy().astype(np.int64), tail.numpy()
    nxt = next_tokens.numpy()
    # the input ids a compile stores: the token each position read, i.e. the previous position's next token
    # (position 0's is not in the source: 0), so input_ids[t + 1] is the token position t predicts
    inputs = np.concatenate([np.zeros(1, dtype=nxt.dtype), nxt[:-1]])
    rows = []
    for a in range(0, N, seq_len):
        b = min(N, a + seq_len)
        c = cnt_np[a:b]
        keep = np.arange(K)[None, :] < c[:, None]
        vals = val_np[a:b].reshape(b - a, K, bpv)[keep].reshape(-1) if bpv else np.zeros(0, np.uint8)
        rows.append((inputs[a:b], c, ids_np[a:b][keep], vals, tail_np[a:b] if not hard else np.zeros(0, np.float32)))
    teacher_mass = torch.softmax(logits.double(), -1).sum(0).numpy()
    sizes = write_twice(rows, meta, teacher_mass, N, workdir)
    shard_bytes = sizes[1] - sizes[0]
    store1 = workdir / "store1"
    prior_file = store1 / "tail_prior.f32"
    prior_bytes = prior_file.stat().st_size if prior_file.exists() else 0
    s = LabelStore(store1)
    rows = [s[i] for i in range(len(s))]
    r_ids = torch.cat([x.ids for x in rows])
    r_probs = torch.cat([x.probs for x in rows])
    r_tail = torch.cat([x.tail for x in rows])
    r_counts = torch.cat([x.counts for x in rows])
    out = {**setting, "k_stored": K, "positions": N, "vocab_size": V,
           "bytes_per_token": shard_bytes / N, "fixed_bytes_per_shard": sizes[0] - shard_bytes,
           "shard_metadata_bytes": shard_metadata_bytes(store1),
           "prior_file_bytes": prior_bytes, "scale_tokens": scale_tokens,
           "prior_bytes_per_token_at_scale": prior_bytes / scale_tokens,
           "prior_bytes_per_token_at_bench_positions": prior_bytes / N,
           "entries_per_token": float(cnt_np.mean()),
           "ratio_vs_dense": {n: b * V * N / shard_bytes for n, b in DENSE.items()},
           "extract_seconds": t_extract}
    if hard:
        top1 = (r_ids[:, 0] == logits.argmax(-1)).double().mean().item()
        out.update({"kl_mean": None, "kl_p99": None, "kept_mass": None, "top1_agreement": top1,
                    "kl_mean_prior": None, "kl_mean_prior_insample": None, "kl_mean_bucket": None})
    else:
        out.update(summarize(kl_to_reconstruction(logits, r_ids, r_probs, r_tail, r_counts)))
        mix = float(s.manifest["tail_prior"]["mix"])
        folds = crossfit_folds(logits, mix, seq_len)
        out["prior_mix"] = mix
        out["kl_mean_prior"] = float(prior_kl_crossfit(logits, r_ids, r_probs, r_tail, r_counts, folds).mean())
        out["kl_mean_prior_insample"] = None  # the flattering in-sample figure: on the comparison curve only
        if setting["mode"] == "topk" and setting["codec"] == "log8" and setting["encoding"] in ("zstd", "expgolomb"):
            out["kl_mean_prior_insample"] = float(
                kl_to_reconstruction(logits, r_ids, r_probs, r_tail, r_counts, prior=s.tail_prior())["kl"].mean())
        out["kl_mean_bucket"] = float(bucket_kl(logits, r_ids, r_probs, r_tail, r_counts).mean())
        out["ce_gap_mean"] = float(ce_gap(logits, r_ids, r_probs, r_tail, r_counts).mean())
        if is_sampled(setting["mode"]):  # zeros off the drawn ids: KL(teacher || .) is infinite (ce_gap)
            out.update({"kl_mean": None, "kl_p99": None, "kl_max": None, "kl_mean_prior": None,
                        "kl_mean_prior_insample": None, "kl_mean_bucket": None})
    out["projected_5T_tokens_GB"] = 5e12 * out["bytes_per_token"] / 1e9
    out["projected_vs_dense_fp8"] = SEED_FP8_DENSE_GB / out["projected_5T_tokens_GB"]
    return out


def run_bench(sources: list[tuple], settings: list[dict] | None = None, log=print,
              scale_tokens: float = 5e12) -> list[dict]:
    settings = settings or default_settings()
    results = []
    work = Path(tempfile.mkdtemp(prefix="labelstore-bench-"))
    try:
        for name, logits, nxt in sources:
            for st in settings:
                r = measure(logits, nxt, st, work, scale_tokens=scale_tokens)
                r["source"] = name
                results.append(r)
                kl = "-" if r["kl_mean"] is None else f"{r['kl_mean']:.4f} / {r['kl_mean_prior']:.4f}"
                log(f"{name:<22} {st['mode']:<8} k={st.get('mean_k', st['k']):<4} {codec_label(st):<8} "
                    f"{st['encoding']:<9} "
                    f"{r['bytes_per_token']:8.1f} B/tok  KL uniform / prior {kl}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


# ------------------------------------------------------------------------------------------------ CLI
def add_arguments(parser) -> None:
    parser.add_argument("--no-demo", action="store_true", help="skip the demo teacher's distributions")
    parser.add_argument("--demo-positions", type=int, default=4096)
    parser.add_argument("--synthetic-vocab", default="32000,131072,262144",
                        help="comma-separated vocabulary sizes of SYNTHETIC sources ('' for none)")
    parser.add_argument("--synthetic-positions", type=int, default=1024)
    parser.add_argument("--entropy", type=float, default=2.5, help="mean entropy (nats) of SYNTHETIC sources")
    parser.add_argument("--scale-tokens", type=float, default=5e12,
                        help="tokens the tail prior file is amortised over (default: the seed's 5T)")
    parser.add_argument("--distillkit-src", default=os.environ.get("LABELSTORE_DISTILLKIT_SRC"),
                        help="a checkout of github.com/arcee-ai/DistillKit: run its compressor on the same "
                             "distributions (default $LABELSTORE_DISTILLKIT_SRC)")
    parser.add_argument("--include", action="append", default=[],
                        help="compression.json of an earlier run whose sources are reported beside this run's "
                             "(repeatable; each run's parameters are kept in the output's 'runs')")
    parser.add_argument("--out", default="benchmarks/results", help="directory for compression.json/.md/.png")


def run(args) -> int:
    from labelstore.tools.distillkit_compare import (
        DISTILLKIT_CONFIGS,
        at_reference_fidelity,
        distillkit_measure,
        equal_fidelity,
        load_distillkit,
    )

    torch.manual_seed(0)
    sources = []
    if not args.no_demo:
        sources.append(demo_source(args.demo_positions))
    for v in [int(x) for x in args.synthetic_vocab.split(",") if x.strip()]:
        pos = max(64, args.synthetic_positions * 32000 // v)  # bounded generation cost at large V
        sources.append(synthetic_source(v, pos, args.entropy))
    for name, logits, _ in sources:
        lp = torch.log_softmax(logits.double(), -1)
        ent = float(-(lp.exp() * lp).sum(-1).mean())
        print(f"source {name}: {logits.shape[0]} positions, V={logits.shape[1]}, mean entropy {ent:.2f} nats "
              f"(log V = {math.log(logits.shape[1]):.2f})")
    results = run_bench(sources, scale_tokens=args.scale_tokens)
    dk, why = load_distillkit(args.distillkit_src)
    dk_rows, comparisons = [], []
    if dk is None:
        dk_note = f"DistillKit was not run: {why}."
    else:
        dk_note = (f"DistillKit's `LogprobCompressor` from {args.distillkit_src} (sha256 of its compression/*.py: "
                   f"{dk.source_sha256[:16]}), fed float64 log-probabilities so its least-squares fit runs in "
                   "float64 (in float32 its 6-term fit is ill-conditioned and moves with the thread count); decoded "
                   "by its own decoder; missing mass as its densify(SYMMETRIC_UNIFORM, renormalize=True). Bytes: "
                   "its compressed payload, without Parquet's overhead. Prior rule: the same cross-fitted priors.")
        for name, logits, _ in sources:
            mix = next(r["prior_mix"] for r in results if r["source"] == name and "prior_mix" in r)
            folds = crossfit_folds(logits, mix)
            for setting in DISTILLKIT_CONFIGS:
                d = distillkit_measure(logits, setting, dk, folds)
                d["source"] = name
                dk_rows.append(d)
                print(f"{name:<22} DistillKit {setting:<12} {d['bytes_per_token']:8.1f} B/tok  KL uniform / prior "
                      f"{d['kl_mean']:.4f} / {d['kl_mean_prior']:.4f}")
        comparisons = equal_fidelity(results, dk_rows)
    print(dk_note)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_info = {"machine": platform.machine(), "time": time.time(), "synthetic_mean_entropy": args.entropy,
                "synthetic_generator": "labelstore.tools.synthetic.zipf_logits", "scale_tokens": args.scale_tokens,
                "demo_positions": None if args.no_demo else args.demo_positions,
                "synthetic_vocab": args.synthetic_vocab, "synthetic_positions": args.synthetic_positions,
                "sources": [name for name, _, _ in sources]}
    runs = [run_info]
    for path in args.include:  # an earlier run's sources, reported beside these (not re-measured)
        prev = json.loads(Path(path).read_text())
        if prev.get("scale_tokens", args.scale_tokens) != args.scale_tokens:
            raise ValueError(f"{path} amortised the prior over {prev.get('scale_tokens')} tokens, not "
                             f"{args.scale_tokens}: rerun it with the same --scale-tokens")
        runs += prev.get("runs", [{k: v for k, v in prev.items() if k not in ("results", "distillkit")}])
        results = prev["results"] + results
        dk_rows = prev.get("distillkit", {}).get("rows", []) + dk_rows
        comparisons = prev.get("distillkit", {}).get("equal_fidelity", []) + comparisons
    doc = {**run_info, "runs": runs, "results": results,
           "distillkit": {"ran": bool(dk_rows), "note": dk_note, "rows": dk_rows, "equal_fidelity": comparisons}}
    (out / "compression.json").write_text(json.dumps(doc, indent=1))
    reference = at_reference_fidelity(results, 32, args.scale_tokens)
    doc["at_top32_fidelity"] = reference
    (out / "compression.json").write_text(json.dumps(doc, indent=1))
    table = "\n\n".join([markdown_table(results), costs_paragraph(results, args.scale_tokens),
                          reference_table(reference), distillkit_tables(dk_rows, comparisons, dk_note)])
    (out / "compression.md").write_text(table + "\n")
    plotted = plot(results, out / "compression.png", dk_rows)
    print(table)
    print(f"wrote {out / 'compression.json'}, {out / 'compression.md'}" + (", compression.png" if plotted else ""))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
