"""`labelstore bench`: bytes per token against fidelity, for every selection setting and value codec.

Each setting is measured end to end: the extraction kernel's public function compresses the teacher's logits,
the real StoreWriter writes real shards, bytes per token is read off the disk, and the reader's decoded
targets are compared with the teacher's full distribution (labelstore.tools.fidelity, float64):
mean and 99th-percentile KL(teacher || reconstruction), kept mass, top-1 agreement.

Sources: the demo teacher on held-out standard-library text (real distributions), and SYNTHETIC Zipf-like
logits (labelstore.tools.synthetic) at chosen vocabulary sizes, labelled as such everywhere they are shown.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from labelstore.reconstruction import uniform_fill
from labelstore.selection import check_selection, is_sampled

SEED_FP8_DENSE_GB = 5e12 * 1e5 / 1e9  # the seed's scenario: 5T tokens x 100k vocabulary x 1 byte = 5e8 GB
DENSE = {"fp32": 4, "bf16": 2, "fp8": 1}


# ------------------------------------------------------------------------------------------------ sources
def demo_source(positions: int, seq_len: int = 512, log=print):
    """(name, logits [N, V] float32, next tokens [N]) from the demo teacher on held-out text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from labelstore.tools.demo_model import (
        DemoConfig,
        corpus_files,
        ensure_demo_teacher,
        read_texts,
        split_files,
        stdlib_root,
        tokenize_stream,
    )

    cfg = DemoConfig()
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
def default_settings() -> list[dict]:
    s = [{"mode": "topk", "k": k, "codec": "log8", "encoding": "packed"} for k in (1, 8, 16, 32, 64, 128)]
    s += [{"mode": "topk", "k": k, "codec": "log8", "encoding": "zstd"}
          for k in (1, 8, 12, 16, 20, 32, 50, 64, 72, 128)]
    s += [{"mode": "topk", "k": 32, "codec": c, "encoding": "packed"} for c in ("e4m3", "e5m2", "fp16")]
    s += [{"mode": "topp", "k": 128, "p": 0.8, "min_k": 4, "codec": "log8", "encoding": "zstd"},
          {"mode": "topk+sample", "k_exact": 8, "samples": 8, "k": 16, "codec": "log8", "encoding": "zstd"},
          {"mode": "sample", "samples": 12, "k": 12, "codec": "count8", "encoding": "zstd"},
          {"mode": "sample", "samples": 32, "k": 32, "codec": "count8", "encoding": "zstd"}]
    s += [{"mode": "argmax", "k": 1, "codec": "none", "encoding": enc} for enc in ("packed", "zstd")]
    return s


def selection_of(setting: dict) -> dict:
    """The store's ``meta["selection"]`` for a setting (its mode's keys, checked by the one selection schema)."""
    return check_selection(setting, setting["codec"])


def select(logits: torch.Tensor, setting: dict):
    """Run the extraction for one setting. Returns (ids [N, K] int, values [N, K*bpv] uint8, counts [N], tail [N]).

    Sampled modes draw with ``setting.get("seed", 0)`` and row ids ``0..N-1``."""
    from labelstore_kernels import extract, extract_topk

    mode = setting["mode"]
    if mode in ("topk", "argmax"):
        ex = extract_topk(logits, setting["k"], codec=setting["codec"])
        return ex.ids, ex.values, ex.counts, ex.tail
    if mode == "topp" or is_sampled(mode):
        ex = extract(logits, selection_of(setting), codec=setting["codec"], seed=setting.get("seed", 0))
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


def measure(logits: torch.Tensor, next_tokens: torch.Tensor, setting: dict, workdir: Path, seq_len: int = 256) -> dict:
    """One setting end to end. Soft modes also report ``ce_gap_mean`` (see :func:`ce_gap`); the sampled modes
    report ``kl_mean``/``kl_p99``/``kl_max`` as None: their reconstruction is 0 off the drawn ids, so the forward
    KL is infinite, and any epsilon floor would make the figure mostly ``missing mass * log(1/epsilon)``."""
    from labelstore.codecs import get_codec
    from labelstore.store.reader import LabelStore
    from labelstore.store.writer import StoreWriter
    from labelstore.tools.fidelity import kl_to_reconstruction, summarize

    N, V = logits.shape
    codec = get_codec(setting["codec"])
    hard = setting["mode"] == "argmax"
    t0 = time.perf_counter()
    ids, values, counts, tail = select(logits, setting)
    t_extract = time.perf_counter() - t0
    K = ids.shape[1]
    meta = {"vocab_size": V, "label_kind": "hard" if hard else "soft",
            "selection": {**selection_of(setting), "k": K}, "value_codec": codec.to_json(), "temperature": 1.0,
            "teacher": {"name": "bench", "hash": "-"}, "tokenizer": {"name": "bench", "hash": "-"},
            "encoding": {"name": setting["encoding"]}}
    bpv = codec.bytes_per_value
    ids_np, val_np, cnt_np, tail_np = ids.numpy(), values.numpy(), counts.numpy().astype(np.int64), tail.numpy()
    nxt = next_tokens.numpy()
    rows = []
    for a in range(0, N, seq_len):
        b = min(N, a + seq_len)
        c = cnt_np[a:b]
        keep = np.arange(K)[None, :] < c[:, None]
        vals = val_np[a:b].reshape(b - a, K, bpv)[keep].reshape(-1) if bpv else np.zeros(0, np.uint8)
        rows.append((nxt[a:b], c, ids_np[a:b][keep], vals, tail_np[a:b] if not hard else np.zeros(0, np.float32)))
    teacher_mass = torch.softmax(logits.double(), -1).sum(0).numpy()
    # Bytes per token is the marginal cost: a store holding every row twice minus a store holding it once,
    # so the fixed cost of a shard (schema and footer, ~2 KB) does not inflate small measurements.
    sizes = []
    for copies in (1, 2):
        store = workdir / f"store{copies}"
        shutil.rmtree(store, ignore_errors=True)
        with StoreWriter(store, meta) as w:
            for rep in range(copies):
                for i, r in enumerate(rows):
                    w.add(rep * len(rows) + i, *r)
                w.add_teacher_mass(teacher_mass, N)  # as compile does: the store's tail prior
        sizes.append(sum(p.stat().st_size for p in (store / "shards").glob("r*.arrow")))
    shard_bytes = sizes[1] - sizes[0]
    s = LabelStore(workdir / "store1")
    rows = [s[i] for i in range(len(s))]
    r_ids = torch.cat([x.ids for x in rows])
    r_probs = torch.cat([x.probs for x in rows])
    r_tail = torch.cat([x.tail for x in rows])
    r_counts = torch.cat([x.counts for x in rows])
    out = {**setting, "k_stored": K, "positions": N, "vocab_size": V,
           "bytes_per_token": shard_bytes / N, "fixed_bytes_per_shard": sizes[0] - shard_bytes,
           "entries_per_token": float(cnt_np.mean()),
           "ratio_vs_dense": {n: b * V * N / shard_bytes for n, b in DENSE.items()},
           "extract_seconds": t_extract}
    if hard:
        top1 = (r_ids[:, 0] == logits.argmax(-1)).double().mean().item()
        out.update({"kl_mean": None, "kl_p99": None, "kept_mass": None, "top1_agreement": top1,
                    "kl_mean_prior": None})
    else:
        out.update(summarize(kl_to_reconstruction(logits, r_ids, r_probs, r_tail, r_counts)))
        prior_kl = kl_to_reconstruction(logits, r_ids, r_probs, r_tail, r_counts, prior=s.tail_prior())["kl"]
        out["kl_mean_prior"] = float(prior_kl.mean())
        out["ce_gap_mean"] = float(ce_gap(logits, r_ids, r_probs, r_tail, r_counts).mean())
        if is_sampled(setting["mode"]):  # zeros off the drawn ids: KL(teacher || .) is infinite (ce_gap)
            out.update({"kl_mean": None, "kl_p99": None, "kl_max": None, "kl_mean_prior": None})
    out["projected_5T_tokens_GB"] = 5e12 * out["bytes_per_token"] / 1e9
    out["projected_vs_dense_fp8"] = SEED_FP8_DENSE_GB / out["projected_5T_tokens_GB"]
    return out


def run_bench(sources: list[tuple], settings: list[dict] | None = None, log=print) -> list[dict]:
    settings = settings or default_settings()
    results = []
    work = Path(tempfile.mkdtemp(prefix="labelstore-bench-"))
    try:
        for name, logits, nxt in sources:
            for st in settings:
                r = measure(logits, nxt, st, work)
                r["source"] = name
                results.append(r)
                kl = "-" if r["kl_mean"] is None else f"{r['kl_mean']:.4f}"
                log(f"{name:<22} {st['mode']:<7} k={st['k']:<4} {st['codec']:<5} {st['encoding']:<6} "
                    f"{r['bytes_per_token']:8.1f} B/tok  KL {kl}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


# ------------------------------------------------------------------------------------------------ reporting
def markdown_table(results: list[dict]) -> str:
    lines = ["| source | mode | k | codec | encoding | bytes/token | entries/token | x dense fp32 | x dense fp8 | "
             "KL mean | KL p99 | KL mean, prior tail | KL(rec||teacher) | kept mass | top-1 agree | 5T tokens (GB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        def f(x, fmt):
            return "-" if x is None else format(x, fmt)
        lines.append(
            f"| {r['source']} | {r['mode']} | {r['k']} | {r['codec']} | {r['encoding']} | {r['bytes_per_token']:.1f} | "
            f"{r['entries_per_token']:.1f} | {r['ratio_vs_dense']['fp32']:,.0f} | {r['ratio_vs_dense']['fp8']:,.0f} | "
            f"{f(r['kl_mean'], '.4f')} | {f(r['kl_p99'], '.3f')} | {f(r.get('kl_mean_prior'), '.4f')} | "
            f"{f(r.get('ce_gap_mean'), '.4f')} | "
            f"{f(r['kept_mass'], '.3f')} | "
            f"{r['top1_agreement']:.3f} | {r['projected_5T_tokens_GB']:,.0f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5.5))
    groups: dict[tuple, list] = {}
    for r in results:
        if r["kl_mean"] is None or r["codec"] != "log8":
            continue
        groups.setdefault((r["source"], r["mode"], r["encoding"]), []).append(r)
    for (src, mode, enc), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["bytes_per_token"])
        ax.plot([r["bytes_per_token"] for r in rs], [max(r["kl_mean"], 1e-6) for r in rs], marker="o",
                label=f"{src} {mode} {enc}")
    for label, x in (("DistillKit k=50 (~114 B)", 114), ("DistillKit k=128 (~300 B)", 300),
                     ("Megatron k=128 (~640 B, pre-zstd)", 640), ("sampled ~12 (~37 B)", 37)):
        ax.axvline(x, color="grey", ls=":", lw=1)
        ax.text(x, 1.0, label, rotation=90, va="top", ha="right", fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bytes per token on disk")
    ax.set_ylabel("mean KL(teacher || stored), nats")
    ax.set_title("labelstore: storage against fidelity (log8 values; SYNTHETIC sources labelled)")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------ CLI
def add_arguments(parser) -> None:
    parser.add_argument("--no-demo", action="store_true", help="skip the demo teacher's distributions")
    parser.add_argument("--demo-positions", type=int, default=4096)
    parser.add_argument("--synthetic-vocab", default="32000,131072,262144",
                        help="comma-separated vocabulary sizes of SYNTHETIC sources ('' for none)")
    parser.add_argument("--synthetic-positions", type=int, default=1024)
    parser.add_argument("--entropy", type=float, default=2.5, help="mean entropy (nats) of SYNTHETIC sources")
    parser.add_argument("--out", default="benchmarks/results", help="directory for compression.json/.md/.png")


def run(args) -> int:
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
    results = run_bench(sources)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"machine": platform.machine(), "time": time.time(), "synthetic_mean_entropy": args.entropy,
           "synthetic_generator": "labelstore.tools.synthetic.zipf_logits", "results": results}
    (out / "compression.json").write_text(json.dumps(doc, indent=1))
    table = markdown_table(results)
    (out / "compression.md").write_text(table + "\n")
    plotted = plot(results, out / "compression.png")
    print(table)
    print(f"wrote {out / 'compression.json'}, {out / 'compression.md'}" + (", compression.png" if plotted else ""))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
