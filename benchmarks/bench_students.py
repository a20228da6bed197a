"""Do stored labels train good students? Students distilled from stores against CE-only and online distillation.

The demo teacher (:mod:`labelstore.tools.demo_model`) and a smaller student of the same tokenizer (a fresh
Llama-style model: half the teacher's width and depth, about 0.3x its parameters, initialised from the run's
seed) train for the same budget of steps and tokens, on the same training sequences in the same order, with:

- ``ce``: ground-truth next-token cross-entropy only;
- ``hard``: the teacher's argmax from a hard-label store (``compile`` with ``hard_labels``);
- ``topk{1,8,32}``, ``topp90``, ``sample16``, ``topk8+sample16``: stored soft labels (the compile's selection
  modes, default codecs) through ``distillation_loss`` forward KL with the tail bucket;
- ``online``: the teacher runs on every batch and ``dense_kl`` compares full distributions (the upper bound);
- loss variants on the top-32 store: ``topk32-prior`` (the prior-shaped tail), ``topk32-a0.9`` (alpha 0.9),
  ``topk32-rkl`` (reverse KL), ``topk32-jsd`` (JSD, beta 0.5); ``sample16-a0.9`` and ``online-a0.9``.

Every distilling method uses the same mix ``alpha * distill + (1 - alpha) * CE(ground truth)``; ``ce`` is
``alpha = 0``. The stores are compiled once, from the same training text (standard-library files the teacher
trained on), and reused by every seed. Each student is then scored on held-out standard-library text the teacher
never saw: mean next-token cross-entropy, and mean KL(teacher || student) over full (dense) distributions.

Label sources are rows of ``METHODS``: a selection mode that ``compile`` learns (top-p, sampling) is one more row.

Two teachers (regimes): the demo teacher, and with ``--teacher-temperature T`` the demo teacher's logits divided
by T saved as a model of its own (``sharpened_teacher``: a different, sharper model that stores, online
distillation and the held-out KL all use).

    python benchmarks/bench_students.py --steps 24 --methods ...                           # students-base.json/md
    python benchmarks/bench_students.py --teacher-temperature 0.55 --steps 24 --methods ... # students-sharp.json/md
    python benchmarks/bench_students.py --steps 96 --name students-base-long --methods ...  # longer budget
    python benchmarks/bench_students.py --combine   # students.json, students.md and students.png from all four
    python benchmarks/bench_students.py --quick     # 1 seed, 2 methods, a tiny budget (smoke test)

Results are rewritten after every run (methods outer, seeds inner), so a benchmark cut short leaves whole rows;
``--resume`` keeps the runs already in the results file and adds the missing ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import platform
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from labelstore.student.dataset import StoreDataset
from labelstore.student.losses import dense_kl, distillation_loss, label_ce
from labelstore.teacher.compile import CompileOptions, compile_store
from labelstore.teacher.model import load_teacher, load_tokenizer

RESULTS = Path(__file__).resolve().parent / "results"
COMMAND = "python benchmarks/bench_students.py"


# --------------------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """One row of the benchmark: how the student is trained and, for stored labels, which store it reads.

    ``loss``: "ce" (ground truth only), "hard" (hard-label store), "soft" (stored soft labels, forward KL with
    the tail bucket) or "online" (the teacher's dense logits each step). ``store``: ``CompileOptions`` fields of
    its store (None: the method reads only the token ids, shared by every store).
    """

    name: str
    loss: str
    store: dict | None = None
    label: str = ""
    div: str = "forward_kl"  # soft labels: distillation_loss's method (forward_kl, reverse_kl, jsd with beta 0.5)
    tail: str = "bucket"  # soft labels: the tail rule ("bucket", "prior", ...)
    alpha: float | None = None  # None: the config's alpha


TOPK32 = {"selection": "topk", "k": 32}  # the store setting of the top-32 rows (the compile default is sample)

METHODS: tuple[Method, ...] = (
    Method("ce", "ce", None, "ground-truth CE only"),
    Method("hard", "hard", {"hard_labels": True}, "hard labels (store, argmax)"),
    Method("topk1", "soft", {"selection": "topk", "k": 1}, "soft labels, stored top-1 + tail"),
    Method("topk8", "soft", {"selection": "topk", "k": 8}, "soft labels, stored top-8 + tail"),
    Method("topk32", "soft", TOPK32, "soft labels, stored top-32 + tail"),
    Method("topp90", "soft", {"selection": "topp", "top_p": 0.9, "k": 32},
           "soft labels, stored top-p 0.9 (at most 32) + tail"),
    Method("sample16", "soft", {"selection": "sample", "samples": 16}, "soft labels, 16 stored draws (unbiased)"),
    Method("topk8+sample16", "soft", {"selection": "topk+sample", "k_exact": 8, "samples": 16},
           "soft labels, stored top-8 + 16 draws from the rest"),
    Method("online", "online", None, "online dense distillation (teacher every step)"),
    Method("topk32-prior", "soft", TOPK32, "soft labels, stored top-32, tail spread by the store's prior",
           tail="prior"),
    Method("topk32-a0.9", "soft", TOPK32, "soft labels, stored top-32 + tail, alpha 0.9", alpha=0.9),
    Method("topk32-rkl", "soft", TOPK32, "soft labels, stored top-32 + tail, reverse KL", div="reverse_kl"),
    Method("topk32-jsd", "soft", TOPK32, "soft labels, stored top-32 + tail, JSD (beta 0.5)", div="jsd"),
    Method("sample16-a0.9", "soft", {"selection": "sample", "samples": 16}, "16 stored draws, alpha 0.9",
           alpha=0.9),
    Method("online-a0.9", "online", None, "online dense distillation, alpha 0.9", alpha=0.9),
)
METHOD_BY_NAME = {m.name: m for m in METHODS}
QUICK_METHODS = ("topk32", "online")


@dataclass(frozen=True)
class BenchConfig:
    """The training budget and recipe, identical for every method and seed."""

    steps: int = 64
    batch_size: int = 8  # sequences per step; every step sees batch_size * seq_len tokens (one epoch, no reuse)
    seq_len: int = 256  # the demo teacher's training length
    lr: float = 3e-3
    warmup: int = 8
    weight_decay: float = 0.1
    alpha: float = 0.5  # distill weight: alpha * distill + (1 - alpha) * CE; the "ce" method is alpha = 0
    width: float = 0.5  # student hidden / intermediate size relative to the teacher's
    depth: float = 0.5  # student layers relative to the teacher's
    bf16: bool = True  # bf16 autocast for the student's (and the online teacher's) training forward on CPU
    eval_windows: int = 32  # held-out windows of seq_len tokens
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = tuple(m.name for m in METHODS)

    @property
    def train_sequences(self) -> int:
        return self.steps * self.batch_size

    @property
    def train_tokens(self) -> int:
        return self.steps * self.batch_size * self.seq_len


QUICK = BenchConfig(steps=12, batch_size=4, eval_windows=8, seeds=(0,), methods=QUICK_METHODS)


# --------------------------------------------------------------------------------------------- models
def student_config(teacher_config, width: float, depth: float):
    """A Llama config of the teacher's vocabulary and special tokens, ``width`` x as wide, ``depth`` x as deep."""
    from transformers import LlamaConfig

    hidden = max(16, int(round(teacher_config.hidden_size * width / 16)) * 16)
    heads = max(1, hidden // 48)
    while hidden % heads or (hidden // heads) % 2:
        heads -= 1
    inter = max(16, int(round(teacher_config.intermediate_size * width / 16)) * 16)
    return LlamaConfig(
        vocab_size=teacher_config.vocab_size,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=max(1, int(round(teacher_config.num_hidden_layers * depth))),
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=teacher_config.max_position_embeddings,
        tie_word_embeddings=bool(getattr(teacher_config, "tie_word_embeddings", True)),
        bos_token_id=teacher_config.bos_token_id,
        eos_token_id=teacher_config.eos_token_id,
        pad_token_id=getattr(teacher_config, "pad_token_id", None),
    )


def make_student(config, seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------- data
def heldout_windows(tokenizer, texts: Sequence[str], seq_len: int, n: int) -> torch.Tensor:
    """``n`` windows of ``seq_len`` tokens, evenly spaced over the held-out texts (tokenized, EOS-separated)."""
    from labelstore.tools.demo_model import tokenize_stream

    stream = tokenize_stream(tokenizer, list(texts))
    if len(stream) < seq_len:
        raise ValueError(f"held-out text too short: {len(stream)} tokens for one window of {seq_len}")
    n = min(n, len(stream) // seq_len)
    starts = np.linspace(0, len(stream) - seq_len, n).astype(np.int64)
    return torch.from_numpy(np.stack([stream[s:s + seq_len] for s in starts]).astype(np.int64))


def pick_train_files(files: Sequence[Path], tokens: int, seed: int = 1234, chars_per_token: float = 8.0) -> list:
    """A deterministic shuffle of ``files``, cut once they hold comfortably more than ``tokens`` tokens' text."""
    files = list(files)
    random.Random(seed).shuffle(files)
    out, total = [], 0
    for f in files:
        try:
            size = len(Path(f).read_bytes().decode("utf-8").strip())
        except (OSError, UnicodeDecodeError):  # compile refuses what it cannot decode
            continue
        if not size:
            continue
        out.append(f)
        total += size
        if total >= tokens * chars_per_token:
            break
    return out


def store_key(teacher: Path, train_files: Sequence, cfg: BenchConfig) -> str:
    """Cache key of the compiled stores: teacher weights' identity, data files and the sequence budget."""
    weights = sorted(Path(teacher).glob("*.safetensors")) or sorted(Path(teacher).glob("*.bin"))
    ident = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights]
    blob = json.dumps({"teacher": str(Path(teacher).resolve()), "weights": ident,
                       "data": [str(f) for f in train_files], "samples": cfg.train_sequences,
                       "seq_len": cfg.seq_len}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def compile_stores(teacher: Path, train_files: Sequence, methods: Sequence[Method], cfg: BenchConfig,
                   store_root: Path, log: Callable[[str], None] = print) -> dict[str, dict]:
    """Compile (or reuse) one store per distinct store setting; returns {method name: store info}."""
    from labelstore.store.info import summary
    from labelstore.store.reader import LabelStore

    store_root.mkdir(parents=True, exist_ok=True)
    stores: dict[str, dict] = {}
    by_setting: dict[str, dict] = {}
    needed = [m for m in methods if m.store is not None] or [METHOD_BY_NAME["hard"]]  # ids come from a store
    for m in needed:
        setting = json.dumps(m.store, sort_keys=True)
        if setting in by_setting:
            stores[m.name] = by_setting[setting]
            continue
        name = "-".join(f"{k}={v}" for k, v in sorted(m.store.items()))
        out = store_root / name
        try:
            reuse = LabelStore(out, verify_rows=False)
            ok = len(reuse) == cfg.train_sequences
        except Exception:  # missing or unfinished: compile it again
            ok = False
        t0 = time.perf_counter()
        if not ok:
            shutil.rmtree(out, ignore_errors=True)
            opts = CompileOptions(teacher=str(teacher), data=[str(f) for f in train_files], out=str(out),
                                  max_length=cfg.seq_len, max_samples=cfg.train_sequences,
                                  tokens_per_batch=8 * cfg.seq_len, device="cpu", dtype="float32", progress=False,
                                  **m.store)
            compile_store(opts)
        s = summary(out)
        if s["samples"] != cfg.train_sequences:
            raise RuntimeError(f"store {out} holds {s['samples']} sequences, the budget needs "
                               f"{cfg.train_sequences}: give more training text")
        info = {"path": str(out), "setting": m.store, "bytes_per_token": s["bytes_per_token"],
                "selection": s["selection"], "value_codec": s["value_codec"]["name"], "tokens": s["tokens"],
                "compile_seconds": round(time.perf_counter() - t0, 1), "reused": ok}
        how = "reused" if ok else f"compiled in {info['compile_seconds']:.0f}s"
        log(f"  store {name:<16} {s['tokens']:,} tokens, {s['bytes_per_token']:.1f} B/token ({how})")
        stores[m.name] = by_setting[setting] = info
    # every method must see the very same token sequences
    sha = {LabelStore(i["path"], verify_rows=False).meta["compile_config"]["data"]["sha256"] for i in stores.values()}
    if len(sha) != 1:
        raise RuntimeError(f"the stores hold different training text ({len(sha)} data hashes)")
    return stores


# --------------------------------------------------------------------------------------------- evaluation
@torch.inference_mode()
def teacher_logprobs(teacher, windows: torch.Tensor, chunk: int = 8, bf16: bool = False) -> torch.Tensor:
    """float32 log-softmax of the teacher on the held-out windows [N, T, V] (fp32 weights; ``bf16``: under
    the bf16 autocast the online method trains with)."""
    out = []
    for i in range(0, len(windows), chunk):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = teacher(input_ids=windows[i:i + chunk]).logits
        out.append(torch.log_softmax(logits.float(), dim=-1))
    return torch.cat(out)


def mean_kl(lp: torch.Tensor, lq: torch.Tensor) -> float:
    """Mean over positions of KL(exp(lp) || exp(lq)), both log-probabilities [..., V]."""
    return float((lp.exp() * (lp - lq)).sum(-1).double().mean())


@torch.inference_mode()
def evaluate(student, windows: torch.Tensor, teacher_lp: torch.Tensor, chunk: int = 8) -> dict:
    """Held-out mean CE (next token) and mean KL(teacher || student) over the positions that have a next token."""
    was_training = student.training
    student.eval()
    ce_sum = kl_sum = 0.0
    n = 0
    for i in range(0, len(windows), chunk):
        x = windows[i:i + chunk]
        lq = torch.log_softmax(student(input_ids=x).logits.float(), dim=-1)[:, :-1]
        lp = teacher_lp[i:i + chunk, :-1]
        ce_sum += float(-lq.gather(-1, x[:, 1:, None]).double().sum())
        kl_sum += float((lp.exp() * (lp - lq)).sum(-1).double().sum())
        n += lq.shape[0] * lq.shape[1]
    student.train(was_training)
    return {"heldout_ce": ce_sum / n, "heldout_kl": kl_sum / n, "positions": n}


# --------------------------------------------------------------------------------------------- training
def lr_at(step: int, cfg: BenchConfig) -> float:
    """Linear warm-up, then cosine decay to 10 % of ``cfg.lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))


def step_loss(method: Method, logits: torch.Tensor, batch: dict, teacher, cfg: BenchConfig) -> torch.Tensor:
    if method.loss == "ce":
        return label_ce(logits, batch["shift_labels"])
    alpha = cfg.alpha if method.alpha is None else method.alpha
    if method.loss == "hard":
        return distillation_loss(logits, batch, method="hard", alpha=alpha)
    if method.loss == "soft":
        return distillation_loss(logits, batch, method=method.div, alpha=alpha, tail=method.tail)
    if method.loss == "online":
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        kl = dense_kl(logits, t_logits.float(), batch["attention_mask"].bool())
        return alpha * kl + (1.0 - alpha) * label_ce(logits, batch["shift_labels"])
    raise ValueError(f"unknown loss {method.loss!r}")


def train_student(method: Method, seed: int, cfg: BenchConfig, scfg, dataset: StoreDataset, teacher,
                  log: Callable[[str], None] = print):
    """Train one student; returns (model, training record). Batch order depends on the seed only."""
    student = make_student(scfg, seed)
    student.train()
    decay = [p for p in student.parameters() if p.ndim >= 2]
    no_decay = [p for p in student.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    order = np.random.default_rng(seed).permutation(cfg.train_sequences)
    collate = dataset.collator(pad_id=scfg.pad_token_id or 0)
    losses = []
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        batch = collate([dataset[int(i)] for i in order[step * cfg.batch_size:(step + 1) * cfg.batch_size]])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = step_loss(method, logits.float(), batch, teacher, cfg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"{method.name} seed {seed}: loss {losses[-1]} at step {step}")
    seconds = time.perf_counter() - t0
    w = max(1, min(10, cfg.steps // 4))
    record = {"train_seconds": round(seconds, 2), "train_loss_first": float(np.mean(losses[:w])),
              "train_loss_last": float(np.mean(losses[-w:])), "train_losses": [round(x, 5) for x in losses]}
    return student, record


# --------------------------------------------------------------------------------------------- the benchmark
@dataclass
class BenchResult:
    config: dict
    stores: dict
    runs: list[dict]
    summary: list[dict]
    reference: dict
    students: dict = field(default_factory=dict)  # (method, seed) -> model, only with keep_students


def run_benchmark(teacher: Path, train_files: Sequence, heldout_texts: Sequence[str], cfg: BenchConfig,
                  store_root: Path, *, keep_students: bool = False, windows: torch.Tensor | None = None,
                  log: Callable[[str], None] = print,
                  on_run: Callable[[BenchResult], None] | None = None,
                  done: Sequence[dict] = ()) -> BenchResult:
    """The whole benchmark for any teacher directory and corpus (the script passes the demo teacher's).

    ``done``: runs of an earlier invocation with the same config (``--resume``): kept, and not run again."""
    methods = [METHOD_BY_NAME[n] for n in cfg.methods]
    t_start = time.perf_counter()
    tokenizer = load_tokenizer(str(teacher))
    model = load_teacher(str(teacher), torch.float32, torch.device("cpu"))
    scfg = student_config(model.config, cfg.width, cfg.depth)
    if windows is None:
        windows = heldout_windows(tokenizer, heldout_texts, cfg.seq_len, cfg.eval_windows)
    t_lp = teacher_logprobs(model, windows)
    t_ce = float(-t_lp[:, :-1].gather(-1, windows[:, 1:, None]).double().mean())
    t_ent = float(-(t_lp.exp() * t_lp).sum(-1).double().mean())
    online_gap = None
    if cfg.bf16 and any(m.loss == "online" for m in methods):  # what bf16 autocast costs the online teacher
        online_gap = mean_kl(t_lp, teacher_logprobs(model, windows, bf16=True))
    log(f"teacher {Path(teacher).name}: {n_params(model) / 1e6:.2f}M parameters; student "
        f"{n_params(make_student(scfg, 0)) / 1e6:.2f}M ({scfg.num_hidden_layers} layers x {scfg.hidden_size}); "
        f"held-out: {windows.numel():,} tokens, teacher CE {t_ce:.3f}, entropy {t_ent:.3f} nats")
    log(f"budget: {cfg.steps} steps x {cfg.batch_size} x {cfg.seq_len} = {cfg.train_tokens:,} tokens per run, "
        f"alpha {cfg.alpha}, seeds {list(cfg.seeds)}")
    stores = compile_stores(teacher, train_files, methods, cfg, store_root, log)
    datasets = {name: StoreDataset(info["path"], student_vocab_size=scfg.vocab_size) for name, info in stores.items()}
    ids_source = next(iter(datasets.values()))
    runs, students, init = [r for r in done if r["method"] in cfg.methods and r["seed"] in cfg.seeds], {}, {}
    have = {(r["method"], r["seed"]) for r in runs}
    for seed in cfg.seeds:
        init[seed] = evaluate(make_student(scfg, seed), windows, t_lp)
    reference = {
        "teacher": {"heldout_ce": t_ce, "heldout_entropy": t_ent, "parameters": n_params(model),
                    "kl_fp32_to_bf16_autocast": online_gap},
        "student_init": {s: {k: v for k, v in e.items() if k != "positions"} for s, e in init.items()},
        "heldout_positions": init[cfg.seeds[0]]["positions"] if cfg.seeds else 0,
        "student_parameters": n_params(make_student(scfg, 0)),
        "student_config": {k: getattr(scfg, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                         "num_attention_heads", "vocab_size")},
        "seconds": None,
    }
    # methods outer, seeds inner: a run cut short leaves whole rows (every seed) for the methods it reached
    for m in methods:
        for seed in cfg.seeds:
            if (m.name, seed) in have:
                continue
            ds = datasets.get(m.name, ids_source)
            student, rec = train_student(m, seed, cfg, scfg, ds, model if m.loss == "online" else None, log)
            ev = evaluate(student, windows, t_lp)
            run = {"method": m.name, "seed": seed, **{k: v for k, v in ev.items() if k != "positions"}, **rec}
            runs.append(run)
            if keep_students:
                students[(m.name, seed)] = student
            log(f"  seed {seed} {m.name:<14} held-out CE {ev['heldout_ce']:.4f}  KL {ev['heldout_kl']:.4f}  "
                f"train loss {rec['train_loss_first']:.3f} -> {rec['train_loss_last']:.3f}  "
                f"{rec['train_seconds']:.0f}s")
            if on_run is not None:
                reference["seconds"] = round(time.perf_counter() - t_start, 1)
                on_run(BenchResult(dataclasses.asdict(cfg), stores, list(runs), summarize(runs, methods, stores),
                                   reference))
    summary = summarize(runs, methods, stores)
    reference["seconds"] = round(time.perf_counter() - t_start, 1)
    return BenchResult(dataclasses.asdict(cfg), stores, runs, summary, reference, students)


def summarize(runs: list[dict], methods: Sequence[Method], stores: dict) -> list[dict]:
    """Mean and sample standard deviation (ddof=1; 0 for one seed) of each metric, per method."""
    out = []
    for m in methods:
        rs = [r for r in runs if r["method"] == m.name]
        if not rs:
            continue
        row = {"method": m.name, "label": m.label, "seeds": [r["seed"] for r in rs],
               "bytes_per_token": stores[m.name]["bytes_per_token"] if m.name in stores else None}
        for key in ("heldout_ce", "heldout_kl", "train_seconds"):
            v = np.array([r[key] for r in rs], dtype=np.float64)
            row[key] = float(v.mean())
            row[key + "_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
        # paired by seed against online distillation (same initialisation and batch order): the seed's own
        # difficulty cancels, which the per-method std above does not
        ref = {r["seed"]: r["heldout_kl"] for r in runs if r["method"] == "online"}
        d = np.array([r["heldout_kl"] - ref[r["seed"]] for r in rs if r["seed"] in ref], dtype=np.float64)
        if len(d):
            row["kl_minus_online"] = float(d.mean())
            row["kl_minus_online_std"] = float(d.std(ddof=1)) if len(d) > 1 else 0.0
        out.append(row)
    return out


# --------------------------------------------------------------------------------------------- report
def format_table(res: BenchResult) -> str:
    ref = res.reference
    n = len(res.config["seeds"])
    lines = ["| method | label source | bytes/token | held-out CE (nats) | held-out KL(teacher ‖ student) | "
             "KL − online KL, paired by seed | s/run |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in res.summary:
        bpt = "—" if r["bytes_per_token"] is None else f"{r['bytes_per_token']:.1f}"
        dk = "—" if "kl_minus_online" not in r else f"{r['kl_minus_online']:+.4f} ± {r['kl_minus_online_std']:.4f}"
        lines.append(f"| {r['method']} | {r['label']} | {bpt} | {r['heldout_ce']:.4f} ± {r['heldout_ce_std']:.4f} | "
                     f"{r['heldout_kl']:.4f} ± {r['heldout_kl_std']:.4f} | {dk} | {r['train_seconds']:.0f} |")
    init = list(ref["student_init"].values())
    lines.append(f"| (untrained student) | — | — | {np.mean([e['heldout_ce'] for e in init]):.4f} | "
                 f"{np.mean([e['heldout_kl'] for e in init]):.4f} | — | — |")
    lines.append(f"| (teacher) | — | — | {ref['teacher']['heldout_ce']:.4f} | 0 | — | — |")
    lines.append("")
    lines.append(f"mean ± sample std over {n} seed(s) {res.config['seeds']}; per-seed values in the JSON. The paired "
                 "column is the mean ± std over seeds of (this method's KL − online's KL, same seed). "
                 "s/run: wall seconds of training, on whatever else the machine was running.")
    return "\n".join(lines)


def format_markdown(res: BenchResult, command: str, title: str = "Do stored labels train good students?") -> str:
    c, ref = res.config, res.reference
    sc = ref["student_config"]
    codecs = sorted({st["value_codec"] for st in res.stores.values() if st["selection"]["mode"] != "argmax"})
    codec = "/".join(f"`{x}`" for x in codecs) or "—"
    g = ref["teacher"].get("kl_fp32_to_bf16_autocast")
    gap = "" if g is None else f" (the online teacher's bf16 logits are {g:.1e} nats KL from its fp32 ones)"
    head = [
        f"## {title}",
        "",
        f"Student: a fresh {ref['student_parameters'] / 1e6:.2f}M-parameter Llama ({sc['num_hidden_layers']} layers x "
        f"{sc['hidden_size']}, vocabulary {sc['vocab_size']:,}) against the "
        f"{ref['teacher']['parameters'] / 1e6:.2f}M-parameter demo teacher. Every run: {c['steps']} steps x "
        f"{c['batch_size']} sequences x {c['seq_len']} tokens = {c['steps'] * c['batch_size'] * c['seq_len']:,} "
        f"training tokens (the same sequences, in a seed-dependent order shared by all methods), AdamW lr "
        f"{c['lr']}, loss `{c['alpha']} * distill + {1 - c['alpha']:.1f} * CE` (`ce`: CE only). Soft labels: "
        "`distillation_loss(method=\"forward_kl\", tail=True)` on stores compiled once (fp32 teacher, codec "
        f"{codec}) from the same training text; online: `dense_kl` against the teacher's logits each step. "
        f"Training forwards run {'under bf16 autocast' if c['bf16'] else 'in fp32'}{gap}. "
        f"Held-out: {ref['heldout_positions']:,} positions of "
        "standard-library files the teacher never trained on, scored in fp32; KL is over the full vocabulary.",
        "",
        format_table(res),
        "",
        "Reproduce:",
        "",
        "```",
        command,
        "```",
        "",
    ]
    return "\n".join(head)


def write_results(res: BenchResult, out_dir: Path, command: str, extra: dict,
                  name: str = "students") -> tuple[Path, Path]:
    """``<name>.json`` and ``<name>.md`` in ``out_dir`` (written atomically: a partial run's files are whole)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"command": command, **extra, "config": res.config, "reference": res.reference, "stores": res.stores,
           "summary": res.summary, "runs": res.runs}
    jp, mp = out_dir / f"{name}.json", out_dir / f"{name}.md"
    md = format_markdown(res, command, extra.get("title", "Do stored labels train good students?"))
    for path, text in ((jp, json.dumps(doc, indent=1) + "\n"), (mp, md)):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return jp, mp


# --------------------------------------------------------------------------------------------- regimes
def sharpened_teacher(teacher: Path, temperature: float, root: Path) -> Path:
    """A copy of ``teacher`` whose logits are its own divided by ``temperature``: a different, sharper model.

    A Llama's logits are ``W_head @ (g * rmsnorm(h))``, linear in the final norm's gain ``g``, so dividing ``g``
    by ``temperature`` divides every logit by it (tied embeddings stay untouched: inputs are unchanged). Stores
    compiled from it record temperature 1; students, online distillation and the held-out KL all see the
    sharpened distribution. Cached next to the stores, keyed by the source weights and the temperature.
    """
    from transformers import AutoModelForCausalLM

    weights = sorted(Path(teacher).glob("*.safetensors"))
    ident = json.dumps([str(Path(teacher).resolve()), temperature,
                        [(w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in weights]])
    out = root / f"teacher-T{temperature:g}-{hashlib.sha256(ident.encode()).hexdigest()[:10]}"
    if (out / "config.json").exists():
        return out
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=root))
    model = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.div_(temperature)
    model.save_pretrained(tmp)
    for f in Path(teacher).iterdir():  # tokenizer and the demo's own files
        if f.is_file() and not (tmp / f.name).exists():
            shutil.copy2(f, tmp / f.name)
    tmp.rename(out)
    return out


def combine(out_dir: Path, names: Sequence[str]) -> list[Path]:
    """``students.json`` (every regime's document), ``students.md`` (their tables) and ``students.png``."""
    docs = {n: json.loads((out_dir / f"{n}.json").read_text()) for n in names if (out_dir / f"{n}.json").exists()}
    jp, mp, pp = out_dir / "students.json", out_dir / "students.md", out_dir / "students.png"
    parts = []
    for d in docs.values():  # summaries and tables recomputed from the runs (partial files included)
        methods = [METHOD_BY_NAME[n] for n in d["config"]["methods"]]
        d["summary"] = summarize(d["runs"], methods, d["stores"])
        res = BenchResult(d["config"], d["stores"], d["runs"], d["summary"], d["reference"])
        parts.append(format_markdown(res, d["command"], d.get("title", "Do stored labels train good students?")))
    jp.write_text(json.dumps({"regimes": docs}, indent=1) + "\n")
    mp.write_text("\n".join(parts))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(2, len(docs))
    rows_n = -(-len(docs) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(8.5 * cols, 5 * rows_n), squeeze=False)
    for ax in axes.flat[len(docs):]:
        ax.axis("off")
    for ax, (n, d) in zip(axes.flat, docs.items()):
        paired = all("kl_minus_online" in r for r in d["summary"])  # KL minus online's, same seed
        key = "kl_minus_online" if paired else "heldout_kl"
        rows = sorted(d["summary"], key=lambda r: r[key])
        y = np.arange(len(rows))
        ax.barh(y, [r[key] for r in rows], xerr=[r[key + "_std"] for r in rows], color=[
            "tab:gray" if r["bytes_per_token"] is None else "tab:blue" for r in rows], capsize=3)
        names = [f"{r['method']}  (KL {r['heldout_kl']:.3f}" + (")" if r["bytes_per_token"] is None else
                                                              f", {r['bytes_per_token']:.0f} B/tok)") for r in rows]
        ax.set_yticks(y, names, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(0.0, color="black", linewidth=0.6)
        t = d["reference"]["teacher"]
        c = d["config"]
        ax.set_title(f"{d.get('regime_label', n)}\nteacher held-out entropy {t['heldout_entropy']:.2f} nats; "
                     f"{c['steps'] * c['batch_size'] * c['seq_len']:,} tokens per run", fontsize=9)
        ax.set_xlabel(("held-out KL(teacher || student) − online's, same seed" if paired else
                       "held-out KL(teacher || student)") + ", nats (mean ± std over seeds; lower is better)",
                      fontsize=8)
    fig.tight_layout()
    fig.savefig(pp, dpi=110)
    plt.close(fig)
    return [jp, mp, pp]


# --------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, methods topk32 + online, 12 steps (smoke test)")
    ap.add_argument("--steps", type=int, default=None, help=f"training steps (default {BenchConfig.steps})")
    ap.add_argument("--batch-size", type=int, default=None, help=f"sequences per step ({BenchConfig.batch_size})")
    ap.add_argument("--alpha", type=float, default=None, help=f"distillation weight ({BenchConfig.alpha})")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="student seeds (default 0 1 2)")
    ap.add_argument("--methods", nargs="+", default=None, choices=list(METHOD_BY_NAME), help="methods to run")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--cache-dir", default=None, help="demo teacher cache (default $LABELSTORE_CACHE or ~/.cache)")
    ap.add_argument("--store-dir", default=None,
                    help="where the compiled stores are kept (default: <cache>/bench-students/<key>; "
                         "--quick: a temporary folder)")
    ap.add_argument("--out", default=None, help=f"results folder (default {RESULTS}; --quick writes nothing)")
    ap.add_argument("--teacher-temperature", type=float, default=1.0,
                    help="the sharp regime: the teacher is the demo teacher with its logits divided by this (a "
                         "different, sharper model; 1: the demo teacher itself)")
    ap.add_argument("--name", default=None,
                    help="results file stem (default students-base, or students-sharp with --teacher-temperature)")
    ap.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                    help="bf16 autocast for training forwards (auto: only where the CPU has native bf16)")
    ap.add_argument("--eval-windows", type=int, default=None, help=f"held-out windows ({BenchConfig.eval_windows})")
    ap.add_argument("--resume", action="store_true",
                    help="keep the runs already in the results file (same budget and recipe) and add the missing ones")
    ap.add_argument("--combine", nargs="*", default=None, metavar="NAME",
                    help="only merge results files (default students-base students-sharp) into students.json, "
                         "students.md and students.png")
    args = ap.parse_args(argv)
    if args.combine is not None:
        out_dir = Path(args.out) if args.out else RESULTS
        for path in combine(out_dir, args.combine or ["students-base", "students-sharp", "students-base-long",
                                                      "students-sharp-long"]):
            print(f"wrote {path}")
        return 0

    from transformers.utils import logging as hf_logging

    from labelstore.tools.demo_model import (
        corpus_files,
        default_cache_root,
        default_config,
        ensure_demo_teacher,
        native_bf16,
        read_texts,
        split_files,
        stdlib_root,
    )

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else BenchConfig()
    overrides = {"steps": args.steps, "batch_size": args.batch_size, "alpha": args.alpha,
                 "seeds": tuple(args.seeds) if args.seeds else None,
                 "methods": tuple(args.methods) if args.methods else None, "eval_windows": args.eval_windows,
                 "bf16": {"on": True, "off": False}.get(args.bf16, None)}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if args.bf16 == "auto":  # emulated bf16 is ~12x slower than fp32 on CPUs without it (demo_model.native_bf16)
        cfg = dataclasses.replace(cfg, bf16=native_bf16())
    demo = default_config()  # the teacher this machine builds (fp32-trained without native bf16)
    cfg = dataclasses.replace(cfg, seq_len=demo.seq_len)
    sharp = args.teacher_temperature != 1.0
    name = args.name or ("students-sharp" if sharp else "students-base")

    t0 = time.perf_counter()
    cache_root = Path(args.cache_dir) if args.cache_dir else default_cache_root()
    teacher = ensure_demo_teacher(cache_root, demo)
    if sharp:
        (cache_root / "bench-students").mkdir(parents=True, exist_ok=True)
        teacher = sharpened_teacher(teacher, args.teacher_temperature, cache_root / "bench-students")
    label = (f"demo teacher at temperature {args.teacher_temperature:g} (its logits / {args.teacher_temperature:g}: "
             "a different, sharper model)" if sharp else "demo teacher")
    root = stdlib_root()
    train, heldout = split_files(corpus_files(root), root, demo.heldout_modulus)
    train_files = pick_train_files(train, cfg.train_tokens)
    heldout_texts = read_texts(heldout)
    tmp = None
    if args.store_dir:
        store_root = Path(args.store_dir)
    elif args.quick:
        tmp = tempfile.mkdtemp(prefix="labelstore-bench-students-")
        store_root = Path(tmp)
    else:
        store_root = cache_root / "bench-students" / store_key(teacher, train_files, cfg)
    argv_s = " ".join(sys.argv[1:] if argv is None else argv)
    command = f"{COMMAND} {argv_s}".strip()
    write = not args.quick or args.out
    out_dir = Path(args.out) if args.out else RESULTS
    title = f"Do stored labels train good students? Teacher: {label}; {cfg.train_tokens:,} tokens per run"

    def extra(seconds: float) -> dict:
        return {"regime": "sharp" if sharp else "base", "regime_label": label, "title": title,
                "teacher_temperature": args.teacher_temperature, "total_seconds": round(seconds, 1),
                "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                "python": platform.python_version(), "torch": torch.__version__, "teacher_dir": str(teacher),
                "train_files": len(train_files), "heldout_files": len(heldout)}

    def on_run(partial: BenchResult) -> None:  # results after every run: a cut-off benchmark leaves usable data
        if write:
            write_results(partial, out_dir, command, {**extra(time.perf_counter() - t0), "partial": True}, name)

    done: list[dict] = []
    if args.resume and (out_dir / f"{name}.json").exists():
        prev = json.loads((out_dir / f"{name}.json").read_text())
        same = {k: v for k, v in prev["config"].items() if k != "methods"}
        now = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(cfg))).items() if k != "methods"}
        if same != now:
            raise SystemExit(f"--resume: {out_dir / f'{name}.json'} has another config: {same} vs {now}")
        done = prev["runs"]
        cfg = dataclasses.replace(cfg, methods=tuple(dict.fromkeys([*prev["config"]["methods"], *cfg.methods])))
        print(f"resuming: {len(done)} runs kept from {out_dir / f'{name}.json'}")
    try:
        res = run_benchmark(teacher, train_files, heldout_texts, cfg, store_root, on_run=on_run, done=done)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    total = time.perf_counter() - t0
    print()
    print(format_table(res))
    print(f"\ntotal {total:.0f}s ({torch.get_num_threads()} torch threads)")
    if write:
        jp, mp = write_results(res, out_dir, command, {**extra(total), "partial": False}, name)
        print(f"wrote {jp} and {mp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
