"""CPU benchmark: fused LM-head extraction against the materialised logits, side by side on the same batch.

Teacher: the demo teacher's body (3.3M-parameter Llama, hidden 192; the cached one if built, else the same
architecture with random weights, marked so) with a SYNTHETIC-weights LM head of V = 151,936 rows (Qwen's
vocabulary; Gaussian weights scaled so the logits spread like a teacher's, std ~2.5). Inputs: SYNTHETIC random
token ids. One batch of ``--sequences`` x ``--length`` tokens (2048 by default) goes through the compile's own
per-batch functions (:mod:`labelstore.teacher.pipeline`), each doing body forward, head, top-k extraction
(k = 32, log8) and the tail prior's teacher mass:

    materialised:  model(...).logits  [N, V]  -> extract_topk -> teacher_mass
    fused:         body(...) hidden   [N, D]  -> row blocks of [R, V] logits -> extract + mass per block

Reported: tokens/s (median of interleaved repeats, same batch) and the peak extra resident memory of one batch
above the resident memory before it (Linux VmHWM, a fresh subprocess per method with a fixed malloc mmap
threshold, as in bench_extract.py), against the size of the materialised float32 logits. Targets (issue 14):
fused peak extra <= 1/10 of the materialised logits, fused tokens/s no worse. Also checked: both paths give
the same ids, counts and tails (within the issue's tolerances). Results: benchmarks/results/teacher.json.

    python benchmarks/bench_teacher.py [--reps 5] [--sequences 8] [--length 256] [--threads N]

``--head-dtype-kl`` instead measures what ``--head-dtype float32`` buys on the demo teacher (built first if not
cached) loaded in bfloat16, on ``--positions`` held-out positions of real text: KL from the float32 teacher to
(a) the full softmax and (b) the stored top-k reconstruction (k = 32, log8, uniform tail) of the bf16 teacher,
with its head in bf16 (``auto``) and in float32. Results: benchmarks/results/teacher_head_dtype.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extract import _status_kb  # noqa: E402  (peak-RSS probe shared with the extraction benchmark)

RESULTS = Path(__file__).resolve().parent / "results" / "teacher.json"
RESULTS_HEAD_DTYPE = Path(__file__).resolve().parent / "results" / "teacher_head_dtype.json"
V_HEAD = 151_936
K = 32


def build(seed: int = 0):
    """(model with the synthetic V_HEAD head, body description)."""
    from transformers import AutoModelForCausalLM

    from labelstore.tools.demo_model import INFO_FILE, DemoConfig, default_cache_root, default_config, make_model

    cached = default_cache_root() / default_config().cache_name()
    if (cached / INFO_FILE).exists():
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32)
        body = f"demo teacher (trained, {cached})"
    else:
        torch.manual_seed(seed)
        model = make_model(DemoConfig(), eos_id=0)
        body = "demo teacher architecture, SYNTHETIC random weights (demo teacher not built)"
    model.eval()
    D = model.config.hidden_size
    g = torch.Generator().manual_seed(seed + 1)
    head = torch.nn.Linear(D, V_HEAD, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V_HEAD, D, generator=g) * (2.5 / D**0.5))
    model.lm_head = head
    model.config.vocab_size = V_HEAD
    model.config.tie_word_embeddings = False
    return model, body


def batch(n_seq: int, length: int, vocab_in: int, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab_in, (n_seq, length), generator=g)
    return x, torch.ones_like(x), np.full(n_seq, length, dtype=np.int64)


def runners(model, n_seq: int, length: int):
    """{method: () -> (Extracted, mass)} for one batch, through the compile's per-batch functions."""
    from labelstore.codecs import get_codec
    from labelstore.teacher.head import plan_head
    from labelstore.teacher.options import CompileOptions
    from labelstore.teacher.pipeline import fused_batch, materialised_batch
    from labelstore_kernels import extract_topk

    opts = CompileOptions(teacher="-", data=["-"], out="-", selection="topk", k=K, max_length=length, device="cpu")
    codec = get_codec(opts.codec_name)
    vocab_in = model.get_input_embeddings().weight.shape[0]
    x, m, lengths = batch(n_seq, length, vocab_in)
    ids = np.arange(n_seq, dtype=np.int64)
    rids = np.concatenate([i * length + np.arange(length, dtype=np.int64) for i in ids])
    cpu = torch.device("cpu")
    fused = plan_head(model, "fused", probe_ids=x[0], device=cpu)
    mat = plan_head(model, "materialized", probe_ids=x[0], device=cpu, notice=False)

    def extract_fn(flat, _rids):
        return extract_topk(flat, K, temperature=1.0, codec=codec)

    def run_fused():
        with torch.inference_mode():
            return fused_batch(model, fused, ids, x, m, lengths, rids, opts.selection_meta(V_HEAD), codec, opts, cpu)

    def run_mat():
        with torch.inference_mode():
            return materialised_batch(model, mat, ids, x, m, lengths, rids, extract_fn, V_HEAD, opts, cpu)

    return {"materialised": run_mat, "fused": run_fused}


def _mem_probe(method: str, n_seq: int, length: int) -> None:
    model, _ = build()
    runners(model, 1, 8)[method]()  # first-call initialisation (thread pools, lazy tables)
    fn = runners(model, n_seq, length)[method]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kb("VmRSS")
    out = fn()
    peak = _status_kb("VmHWM")
    del out
    print(json.dumps({"extra_mb": (peak - before) / 1024}))


def peak_extra_mb(method: str, n_seq: int, length: int, threads: int | None) -> float | None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # a fixed threshold: big frees return to the OS
    cmd = [sys.executable, __file__, "--mem-probe", method, str(n_seq), str(length)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["extra_mb"]


def agreement(a, b) -> dict:
    """How the two paths' outputs compare (issue 14 tolerances: ids/counts equal, tails 1e-5 relative)."""
    ea, ma = a
    eb, mb = b
    tail_rel = ((ea.tail - eb.tail).abs() / eb.tail.abs().clamp_min(1e-30)).max().item()
    return {"rows": int(ea.ids.shape[0]),
            "ids_equal_rows": float((ea.ids == eb.ids).all(1).float().mean()),
            "counts_equal": bool((ea.counts == eb.counts).all()),
            "max_value_code_diff": int((ea.values.int() - eb.values.int()).abs().max()),
            "max_tail_rel_diff": tail_rel,
            "max_lse_abs_diff": (ea.lse - eb.lse).abs().max().item(),
            "max_mass_rel_diff": ((ma - mb).abs().max() / mb.abs().max()).item()}


def _kl_dense(ref: torch.Tensor, z: torch.Tensor) -> np.ndarray:
    lp = torch.log_softmax(ref.double(), -1)
    return (lp.exp() * (lp - torch.log_softmax(z.double(), -1))).sum(-1).numpy()


def head_dtype_kl(positions: int, seq_len: int = 256) -> dict:
    """The demo teacher in bf16, head in bf16 vs float32, against the float32 teacher (module docstring)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from labelstore.codecs import get_codec
    from labelstore.reconstruction import reconstruct
    from labelstore.teacher.head import body_hidden, read_head
    from labelstore.tools.demo_model import (
        corpus_files,
        default_config,
        ensure_demo_teacher,
        read_texts,
        split_files,
        stdlib_root,
        tokenize_stream,
    )
    from labelstore.tools.fidelity import kl_to_reconstruction
    from labelstore_kernels import extract_topk, head_logits

    cfg = default_config()
    path = ensure_demo_teacher(cfg=cfg)
    tok = AutoTokenizer.from_pretrained(path)
    ref_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    bf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    _, held = split_files(corpus_files(stdlib_root()), stdlib_root(), cfg.heldout_modulus)
    stream = tokenize_stream(tok, read_texts(held[:200]))
    n = max(1, min(positions // seq_len, len(stream) // seq_len))
    x = torch.from_numpy(stream[: n * seq_len].astype(np.int64)).view(n, seq_len)
    head32 = read_head(bf16, dtype=torch.float32)[0]
    ref, z_auto, z_f32 = [], [], []
    with torch.inference_mode():
        for i in range(n):
            xi = x[i:i + 1]
            m = torch.ones_like(xi)
            ref.append(ref_model(input_ids=xi, attention_mask=m).logits[0].float())
            z_auto.append(bf16(input_ids=xi, attention_mask=m).logits[0])  # bf16 logits, as the compile gets them
            z_f32.append(head_logits(body_hidden(bf16, xi, m)[0], head32))
    ref, z_auto, z_f32 = torch.cat(ref), torch.cat(z_auto), torch.cat(z_f32)
    codec = get_codec("log8")
    out = {"positions": int(ref.shape[0]), "vocab": int(ref.shape[1]), "teacher": str(path), "k": K,
           "codec": "log8", "reference": "the same teacher in float32"}
    for name, z in (("head_bf16_auto", z_auto), ("head_float32", z_f32)):
        ex = extract_topk(z, K, codec=codec)
        w = codec.decode(ex.values).numpy()
        probs = torch.from_numpy(reconstruct(w, ex.tail.numpy()))
        rec = kl_to_reconstruction(ref, ex.ids, probs, ex.tail, ex.counts)
        out[name] = {"kl_dense_mean": float(_kl_dense(ref, z).mean()),
                     "kl_stored_topk_mean": float(rec["kl"].mean()),
                     "top1_agree": float(rec["top1"].mean())}
    out["kl_dense_reduction"] = out["head_bf16_auto"]["kl_dense_mean"] - out["head_float32"]["kl_dense_mean"]
    out["kl_stored_reduction"] = (out["head_bf16_auto"]["kl_stored_topk_mean"]
                                  - out["head_float32"]["kl_stored_topk_mean"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default benchmarks/results/teacher.json, "
                                                           "or teacher_head_dtype.json with --head-dtype-kl)")
    ap.add_argument("--head-dtype-kl", action="store_true", help="measure --head-dtype float32 (bf16 demo teacher)")
    ap.add_argument("--positions", type=int, default=2048, help="--head-dtype-kl: held-out positions")
    ap.add_argument("--mem-probe", nargs=3, metavar=("METHOD", "SEQUENCES", "LENGTH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mem_probe:
        method, n_seq, length = args.mem_probe
        _mem_probe(method, int(n_seq), int(length))
        return
    if args.head_dtype_kl:
        res = head_dtype_kl(args.positions)
        print(f"demo teacher in bf16, {res['positions']} held-out positions, KL from the float32 teacher (nats):")
        print(f"{'head':>16} {'dense KL':>10} {'top-32 KL':>10} {'top-1':>6}")
        for name in ("head_bf16_auto", "head_float32"):
            r = res[name]
            print(f"{name:>16} {r['kl_dense_mean']:>10.5f} {r['kl_stored_topk_mean']:>10.5f} {r['top1_agree']:>6.3f}")
        out_path = args.out or RESULTS_HEAD_DTYPE
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps({"benchmark": "--head-dtype float32 vs auto on the bf16 demo teacher",
                                        "torch": torch.__version__, "results": res}, indent=2) + "\n")
        print(f"wrote {out_path}")
        return
    if os.environ.get("OMP_WAIT_POLICY") is None:  # see bench_extract.py: spinning OpenMP on a loaded machine
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, __file__, *sys.argv[1:]])

    model, body = build()
    n = args.sequences * args.length
    fns = runners(model, args.sequences, args.length)
    outs = {name: f() for name, f in fns.items()}  # warm-up, and the agreement check
    agree = agreement(outs["fused"], outs["materialised"])
    del outs
    times = {name: [] for name in fns}
    load0 = os.getloadavg()
    for _ in range(args.reps):  # interleaved, so background load hits both alike
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    mem = {name: peak_extra_mb(name, args.sequences, args.length, args.threads) for name in fns}
    logits_mb = n * V_HEAD * 4 / 2**20
    tok = {name: n / statistics.median(ts) for name, ts in times.items()}
    res = {
        "tokens": n,
        "V": V_HEAD,
        "k": K,
        "materialised_logits_mb": round(logits_mb, 1),
        "tokens_per_s": {k: round(v) for k, v in tok.items()},
        "fused_speed_ratio": round(tok["fused"] / tok["materialised"], 3),
        "peak_extra_mb": {k: None if v is None else round(v, 1) for k, v in mem.items()},
        "fused_extra_over_logits": None if mem["fused"] is None else round(mem["fused"] / logits_mb, 4),
        "times_s": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "agreement": agree,
    }
    print(f"SYNTHETIC head V = {V_HEAD:,}, {n} tokens ({args.sequences} x {args.length}), body: {body}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {load0}")
    print(f"{'method':>13} {'tokens/s':>9} {'peak extra MB':>14}   (materialised fp32 logits: {logits_mb:,.0f} MB)")
    for name in fns:
        print(f"{name:>13} {res['tokens_per_s'][name]:>9,} {res['peak_extra_mb'][name]!s:>14}")
    print(f"fused/materialised speed {res['fused_speed_ratio']}x; fused extra = {res['fused_extra_over_logits']} "
          f"of the logits (target <= 0.1); agreement {agree}")
    out = {
        "benchmark": "fused LM-head extraction vs materialised logits (CPU), SYNTHETIC head weights and inputs",
        "body": body,
        "targets": {"fused_extra_over_logits_max": 0.1, "fused_speed_ratio_min": 1.0},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
                    "loadavg_start": load0, "loadavg_end": os.getloadavg()},
        "reps": args.reps,
        "results": res,
    }
    out_path = args.out or RESULTS
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
