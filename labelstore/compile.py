"""`labelstore compile`: run a teacher LM once over a corpus and stream its compressed labels into a store.

Pipeline (one process per rank; ``torchrun`` starts several)::

    inputs -> plan (token sequences, sample id = index) -> batches (deterministic, <= tokens_per_batch)
    main thread:    batch -> teacher forward (inference_mode) -> extract_topk on the real positions
                    (+ per-sequence sums of the full distribution, for the store's tail prior) -> queue
    writer thread:  queue -> device-to-host copy -> per-sample rows -> StoreWriter.add -> shards on disk

The queue is bounded, so memory holds a few batches whatever the corpus size, and the teacher never waits
for the disk. Padding positions are never extracted nor stored.

Resume and scale-out: batch ``b`` belongs to rank ``b % world_size``. Batches are planned from the inputs
and ``--tokens-per-batch`` alone, so a rerun (or another world size) computes every sample in the same
batch as before, with the same numerics. A batch whose samples are all committed is skipped; one that is
partly committed (the shard rolled over inside it) is recomputed and only its missing samples are added.
Every rank writes its own shards; rank 0 writes the manifest after a barrier.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import shlex
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from .codecs import CODEC_NAMES, DEFAULT_CODEC, get_codec
from .errors import ConfigMismatchError, InputDataError, InvalidLogitsError, LabelStoreError, StoreWriteError
from .inputs import InputConfig, Plan, build_plan

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SORT_WINDOW = 64  # truncate mode: sequences are length-sorted within windows of this many batches' worth
QUEUE_BATCHES = 2  # extracted batches waiting for the writer thread (bounds memory)
SAMPLE_VALUES = 4096  # values per parameter tensor hashed into the teacher fingerprint
SELECTIONS = ("topk", "topp", "sample", "topk+sample")  # docs/FORMAT.md 5b (argmax is --hard-labels)
SAMPLED = ("sample", "topk+sample")
MAX_SAMPLES = 255  # count8 holds 1..255 draws


# --------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", required=True,
                        help="teacher model: a local directory (or hub name) for AutoModelForCausalLM")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory or name (default: --teacher)")
    parser.add_argument("--data", required=True, nargs="+", action="extend", metavar="PATH",
                        help="input files or directories: text, .jsonl, .parquet, .arrow (repeatable)")
    parser.add_argument("--out", required=True, help="store directory (created, or resumed if it exists)")
    parser.add_argument("--k", type=int, default=32,
                        help="kept entries per position (topk), the maximum per position (topp) (default 32)")
    parser.add_argument("--selection", default="topk", choices=SELECTIONS,
                        help="which entries a position keeps (docs/FORMAT.md 5b): the k most probable (topk, "
                             "default), the smallest set with mass >= --top-p (topp), the distinct ids of "
                             "--samples draws (sample, unbiased), or the --k-exact most probable plus draws "
                             "from the rest (topk+sample)")
    parser.add_argument("--top-p", type=float, default=0.9, help="topp: mass to reach per position (default 0.9)")
    parser.add_argument("--min-k", type=int, default=1, help="topp: minimum entries per position (default 1)")
    parser.add_argument("--samples", type=int, default=16,
                        help=f"sample, topk+sample: draws per position, 1..{MAX_SAMPLES} (default 16)")
    parser.add_argument("--k-exact", type=int, default=8,
                        help="topk+sample: exact most probable entries per position (default 8)")
    parser.add_argument("--seed", type=int, default=0,
                        help="sample, topk+sample: random seed (recorded; a resume draws the same samples)")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1)")
    parser.add_argument("--codec", default=None, choices=[c for c in CODEC_NAMES if c != "none"],
                        help=f"value codec for the kept probabilities (default {DEFAULT_CODEC}; count8, the "
                             "only choice, for --selection sample)")
    parser.add_argument("--max-length", type=int, default=2048, help="tokens per sequence (default 2048)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--pack", dest="pack", action="store_true", default=True,
                      help="concatenate documents with EOS separators, cut into max-length sequences (default)")
    mode.add_argument("--truncate", dest="pack", action="store_false",
                      help="one sequence per document, cut to max-length")
    parser.add_argument("--text-field", default="text", help="JSONL field / table column holding the text")
    parser.add_argument("--token-field", default="input_ids",
                        help="table column of pre-tokenized ids, used when the text column is absent")
    parser.add_argument("--max-samples", type=int, default=None, help="compile only the first N sequences")
    parser.add_argument("--hard-labels", action="store_true",
                        help="store only the teacher's argmax token per position (no values, no tail)")
    parser.add_argument("--no-tail-prior", dest="tail_prior", action="store_false",
                        help="skip the teacher's mean distribution (the store's tail prior, one extra pass "
                             "over the logits)")
    parser.add_argument("--tokens-per-batch", type=int, default=16384,
                        help="padded tokens per teacher forward (default 16384)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="teacher weights dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if available)")
    parser.add_argument("--shard-mb", type=float, default=256.0, help="shard size in MiB (default 256)")
    parser.add_argument("--encoding", default="packed", choices=["packed", "zstd"],
                        help="row encoding: packed (format v1, fastest reads) or zstd (format v2, entropy-coded "
                             "ids and values, about a third smaller on real teachers; docs/FORMAT.md 6b)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the teacher's own modelling code (passed to from_pretrained only if given)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar nor summary")


def run(args: argparse.Namespace) -> int:
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    opts = CompileOptions.from_args(args)
    try:
        opts.validate()
    except ValueError as exc:
        print(f"labelstore compile: error: {exc}", file=sys.stderr)
        return 2
    try:
        result = compile_store(opts)
    except KeyboardInterrupt:
        # compile_store has stopped the writer thread and discarded only the open shard (see _run_batches)
        print(interrupted_message(opts.out), file=sys.stderr, flush=True)
        return 130
    if result.rank == 0 and not args.quiet:
        from .info import format_summary, summary

        print(format_summary(summary(result.out)))
        print(f"compiled        {result.samples:,} sequences, {result.tokens:,} tokens in {result.seconds:.1f}s "
              f"({result.tokens / max(result.seconds, 1e-9):,.0f} tokens/s"
              f"{'' if result.world_size == 1 else f' on rank 0 of {result.world_size}'}"
              f"{f', {result.skipped:,} already committed' if result.skipped else ''})")
    return 0


@dataclass
class CompileOptions:
    teacher: str
    data: list[str]
    out: str
    tokenizer: str | None = None
    k: int = 32
    temperature: float = 1.0
    codec: str | None = None  # None: DEFAULT_CODEC, or count8 for selection "sample"
    selection: str = "topk"
    top_p: float = 0.9
    min_k: int = 1
    samples: int = 16
    k_exact: int = 8
    seed: int = 0
    max_length: int = 2048
    pack: bool = True
    text_field: str = "text"
    token_field: str = "input_ids"
    max_samples: int | None = None
    hard_labels: bool = False
    tail_prior: bool = True
    tokens_per_batch: int = 16384
    dtype: str = "auto"
    device: str = "auto"
    shard_mb: float = 256.0
    encoding: str = "packed"
    trust_remote_code: bool = False
    progress: bool = True

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CompileOptions:
        names = {f for f in cls.__dataclass_fields__ if f != "progress"}
        return cls(**{n: getattr(args, n) for n in names}, progress=not args.quiet)

    @property
    def codec_name(self) -> str:
        """The value codec this compile writes (``--codec`` resolved against the selection mode)."""
        if self.hard_labels:
            return "none"
        if self.codec is None:
            return "count8" if self.selection == "sample" else DEFAULT_CODEC
        return self.codec

    def selection_meta(self, vocab_size: int | None = None) -> dict:
        """``meta["selection"]`` exactly as docs/FORMAT.md 5b spells it (k clipped to the vocabulary)."""
        if self.hard_labels:
            return {"mode": "argmax", "k": 1}
        k = self.k if vocab_size is None else min(self.k, vocab_size)
        if self.selection == "topk":
            return {"mode": "topk", "k": k}
        if self.selection == "topp":
            return {"mode": "topp", "k": k, "p": float(self.top_p), "min_k": min(self.min_k, k)}
        if self.selection == "sample":
            return {"mode": "sample", "k": self.samples, "samples": self.samples}
        return {"mode": "topk+sample", "k_exact": self.k_exact, "samples": self.samples,
                "k": self.k_exact + self.samples}

    def validate(self) -> None:
        if self.k < 1:
            raise ValueError(f"--k must be >= 1, got {self.k}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"--selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if self.hard_labels and self.selection != "topk":
            raise ValueError(f"--hard-labels stores the argmax only; it cannot be combined with --selection "
                             f"{self.selection}")
        if self.selection == "topp":
            if not 0 < self.top_p <= 1:
                raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
            if not 1 <= self.min_k <= self.k:
                raise ValueError(f"--min-k must be in [1, --k={self.k}], got {self.min_k}")
        if self.selection in SAMPLED and not 1 <= self.samples <= MAX_SAMPLES:
            raise ValueError(f"--samples must be in [1, {MAX_SAMPLES}] (count8 stores the draws), got {self.samples}")
        if self.selection == "topk+sample" and self.k_exact < 0:
            raise ValueError(f"--k-exact must be >= 0, got {self.k_exact}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"--seed must be a non-negative integer, got {self.seed!r}")
        if not self.hard_labels:
            name = self.codec_name
            if self.selection == "sample" and name != "count8":
                raise ValueError(f"--selection sample stores draw counts: its codec is count8, not --codec {name}")
            if self.selection != "sample" and name == "count8":
                raise ValueError(f"--codec count8 belongs to --selection sample only, not {self.selection}")
            if self.selection == "topk+sample" and name not in ("log8", "e4m3", "e5m2"):
                raise ValueError(f"--selection topk+sample needs a 1-byte codec (log8, e4m3, e5m2), not {name}")
        if not (self.temperature > 0 and np.isfinite(self.temperature)):
            raise ValueError(f"--temperature must be a positive number, got {self.temperature}")
        if self.tokens_per_batch < 1:
            raise ValueError(f"--tokens-per-batch must be >= 1, got {self.tokens_per_batch}")
        if not self.shard_mb > 0:
            raise ValueError(f"--shard-mb must be positive, got {self.shard_mb}")


@dataclass
class CompileResult:
    out: str
    rank: int
    world_size: int
    samples: int  # sequences this rank added
    tokens: int  # tokens this rank added
    skipped: int  # sequences of this rank's batches already committed before this run
    seconds: float  # wall time of the batch loop (forward, extraction, writes)
    cpu_seconds: float = 0.0  # process CPU time of the same loop, all threads


# ------------------------------------------------------------------------------------------ teacher
def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def load_teacher(name: str, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False):
    """``AutoModelForCausalLM.from_pretrained`` exactly as a user would call it, in eval mode on ``device``."""
    import transformers
    from transformers import AutoModelForCausalLM

    kwargs = {}
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    kwargs["dtype" if (major, minor) >= (4, 56) else "torch_dtype"] = dtype
    if trust_remote_code:  # never passed unless the user asked for it
        kwargs["trust_remote_code"] = True
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise LabelStoreError(f"cannot load teacher {name!r}: {exc}") from None
    return model.to(device).eval()


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    kwargs = {"trust_remote_code": True} if trust_remote_code else {}
    try:
        return AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise LabelStoreError(f"cannot load tokenizer {name!r}: {exc}") from None


def config_vocab_size(name: str, trust_remote_code: bool = False) -> int:
    """The teacher's vocabulary from its config alone (inputs are validated before the weights load)."""
    from transformers import AutoConfig

    kwargs = {"trust_remote_code": True} if trust_remote_code else {}
    try:
        cfg = AutoConfig.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise LabelStoreError(f"cannot load the config of teacher {name!r}: {exc}") from None
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return int(text.vocab_size)


def output_vocab_size(model) -> int:
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def teacher_fingerprint(model) -> str:
    """SHA-256 over every parameter's name, shape and up to 4096 evenly spaced values (fast for any size)."""
    h = hashlib.sha256(json.dumps(list(getattr(model.config, "architectures", None) or [])).encode())
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLE_VALUES)
        sample = flat[::step][:SAMPLE_VALUES].float().cpu().numpy()
        h.update(f"{name}:{tuple(p.shape)}".encode())
        h.update(sample.tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        data = backend.to_str()
    else:
        data = json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([tokenizer.eos_token, tokenizer.bos_token, type(tokenizer).__name__])
    return hashlib.sha256((data + extra).encode()).hexdigest()


def display_name(name: str) -> str:
    p = Path(name)
    return p.resolve().name if p.exists() else name


# ------------------------------------------------------------------------------------------ batches
def plan_batches(plan: Plan, tokens_per_batch: int, pack: bool) -> list[np.ndarray]:
    """Deterministic batches of sample ids, each with ``len(batch) * longest <= tokens_per_batch`` (or one).

    Packed plans keep sample order; truncated plans sort by length inside windows, to limit padding.
    """
    lengths = plan.lengths()
    n = len(lengths)
    order = np.arange(n, dtype=np.int64)
    if not pack and n:
        window = max(1, SORT_WINDOW * max(1, tokens_per_batch // max(1, int(lengths.max()))))
        parts = []
        for a in range(0, n, window):
            idx = order[a:a + window]
            parts.append(idx[np.lexsort((idx, -lengths[idx]))])
        order = np.concatenate(parts)
    batches, cur, longest = [], [], 0
    for i in order:
        L = int(lengths[i])
        if cur and (len(cur) + 1) * max(longest, L) > tokens_per_batch:
            batches.append(np.asarray(cur, dtype=np.int64))
            cur, longest = [], 0
        cur.append(int(i))
        longest = max(longest, L)
    if cur:
        batches.append(np.asarray(cur, dtype=np.int64))
    return batches


def collate(plan: Plan, batch: np.ndarray, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Right-padded ``input_ids``, ``attention_mask`` and the lengths of one batch."""
    lengths = np.asarray([plan.offsets[i + 1] - plan.offsets[i] for i in batch], dtype=np.int64)
    T = int(lengths.max())
    x = np.full((len(batch), T), pad_id, dtype=np.int64)
    m = np.zeros((len(batch), T), dtype=np.int64)
    for r, i in enumerate(batch):
        x[r, :lengths[r]] = plan.sequence(int(i))
        m[r, :lengths[r]] = 1
    return torch.from_numpy(x), torch.from_numpy(m), lengths


LOG2E = 1.4426950408889634
MASS_CHUNK_ELEMS = {"cpu": 1 << 18, "cuda": 1 << 26}  # logits per chunk of the teacher-mass pass (cache-sized on CPU)


def teacher_mass(flat: torch.Tensor, lse: torch.Tensor, lengths: np.ndarray, temperature: float) -> torch.Tensor:
    """Per-sequence sums of the teacher's full distribution, float32 ``[B, V]`` on the logits' device.

    ``p = exp(z / T - lse)`` row by row (``exp2`` form, the fast one on CPU), summed over each sequence's rows
    (consecutive in ``flat``): the writer turns these into the store's tail prior (docs/FORMAT.md section 5c).
    """
    n, V = flat.shape
    ends = np.cumsum(lengths)
    starts = ends - lengths
    out = torch.zeros(len(lengths), V, dtype=torch.float32, device=flat.device)
    c = max(1, MASS_CHUNK_ELEMS.get(flat.device.type, 1 << 22) // V)
    scale = LOG2E / temperature
    shift = lse.float() * LOG2E
    for a in range(0, n, c):
        b = min(n, a + c)
        e = torch.mul(flat[a:b].float(), scale)  # a new float32 buffer: the logits stay intact
        e.sub_(shift[a:b, None]).exp2_()
        for s in range(int(np.searchsorted(ends, a, side="right")), len(lengths)):
            lo, hi = max(a, int(starts[s])), min(b, int(ends[s]))
            if lo >= hi:
                break
            out[s] += e[lo - a:hi - a].sum(0)
    return out


# ------------------------------------------------------------------------------------------ writer thread
class _WriterThread(threading.Thread):
    """Takes extracted batches off a bounded queue, copies them to the host and adds them to the store."""

    def __init__(self, writer, plan: Plan, hard: bool, bytes_per_value: int, bar):
        super().__init__(name="labelstore-writer", daemon=True)
        from .format import has_tail_column

        self.writer, self.plan, self.hard, self.bpv, self.bar = writer, plan, hard, bytes_per_value, bar
        self.has_tail = has_tail_column(writer.meta)  # False for hard labels and pure `sample` stores
        self.queue: queue.Queue = queue.Queue(maxsize=QUEUE_BATCHES)
        self.error: BaseException | None = None
        self.samples = self.tokens = self.payload = 0
        meta = writer.meta
        self._bits, self._count_bytes = meta["id_bits"], meta["count_bytes"]
        self._t0 = time.perf_counter()

    def run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain so the producer never blocks
            try:
                self._write(*item)
            except BaseException as exc:  # handed to the main thread
                self.error = exc

    def _write(self, batch: np.ndarray, lengths: np.ndarray, todo: np.ndarray, ex, mass) -> None:
        from .bitpack import packed_nbytes

        mass = mass.cpu().numpy() if mass is not None else None
        ids = ex.ids.cpu().numpy()
        counts = ex.counts.cpu().numpy()
        values = ex.values.cpu().numpy()
        tail = ex.tail.cpu().numpy()
        k = ids.shape[1]
        ends = np.cumsum(lengths)
        for r, sid in enumerate(batch):
            if not todo[r]:
                continue
            a, b = int(ends[r] - lengths[r]), int(ends[r])
            c = counts[a:b]
            if self.hard or bool((c == k).all()):
                s_ids = ids[a:b].reshape(-1)
                s_vals = values[a:b].reshape(-1)
            else:
                keep = np.arange(k)[None, :] < c[:, None]
                s_ids = ids[a:b][keep]
                s_vals = values[a:b].reshape(b - a, k, self.bpv)[keep].reshape(-1)
            ds = self.plan.doc_starts(int(sid))
            if mass is not None:  # before add(): a shard committed by add() then owns this sequence's mass
                self.writer.add_teacher_mass(mass[r], b - a)
            self.writer.add(int(sid), self.plan.sequence(int(sid)), c, s_ids, s_vals,
                            tail[a:b] if self.has_tail else np.zeros(0, np.float32), ds)
            T, n = b - a, int(c.sum())
            self.samples += 1
            self.tokens += T
            self.payload += (16 + packed_nbytes(T, self._bits) + T * self._count_bytes
                             + packed_nbytes(n, self._bits) + n * self.bpv + (4 * T if self.has_tail else 0)
                             + 4 * ds.size)
        if self.bar is not None:
            dt = max(time.perf_counter() - self._t0, 1e-9)
            self.bar.update(int(todo.sum()))
            self.bar.set_postfix_str(f"{self.tokens / dt:,.0f} tok/s, {self.payload / max(self.tokens, 1):.1f} B/tok",
                                     refresh=False)


# ------------------------------------------------------------------------------------------ distributed
def _dist_env() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


# ------------------------------------------------------------------------------------------ main
def build_meta(opts: CompileOptions, plan: Plan, vocab_size: int, k: int, dtype: torch.dtype,
               device: torch.device, teacher_hash: str, tokenizer_hash: str, world: int) -> dict:
    """Store metadata: ``compile_config`` holds every setting that changes the labels (compared on resume)."""
    import transformers

    from . import __version__

    codec = get_codec(opts.codec_name)
    selection = opts.selection_meta(vocab_size)
    sampled = selection["mode"] in SAMPLED
    config = {"seed": int(opts.seed)} if sampled else {}  # only sampled labels depend on it (older stores resume)
    return {
        "vocab_size": vocab_size,
        "label_kind": "hard" if opts.hard_labels else "soft",
        "selection": selection,
        "value_codec": codec.to_json(),
        "encoding": {"name": opts.encoding},
        "temperature": float(opts.temperature),
        "teacher": {"name": display_name(opts.teacher), "hash": teacher_hash},
        "tokenizer": {"name": display_name(opts.tokenizer or opts.teacher), "hash": tokenizer_hash},
        "compile_config": {
            "data": {"sha256": plan.fingerprint, "samples": len(plan), "tokens": plan.num_tokens},
            "max_length": opts.max_length,
            "packing": "pack" if opts.pack else "truncate",
            "text_field": opts.text_field,
            "token_field": opts.token_field,
            "max_samples": opts.max_samples,
            "dtype": str(dtype).removeprefix("torch."),
            "tail_prior": uses_tail_prior(opts),
            "add_special_tokens": True,
            "eos_between_documents": True,
            **config,
        },
        "runtime": {
            "data_files": plan.files[:1000],
            "tokens_per_batch": opts.tokens_per_batch,
            "device": str(device),
            "world_size": world,
            "labelstore": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }


def uses_tail_prior(opts: CompileOptions) -> bool:
    """The tail prior spreads a stored tail: hard labels and pure ``sample`` stores have none."""
    return bool(opts.tail_prior and not opts.hard_labels and opts.selection != "sample")


def interrupted_message(out) -> str:
    """What a Ctrl-C'd compile prints: what is kept, and the exact command that resumes it."""
    from .manifest import list_commits

    try:
        n = len(list_commits(Path(out)))
    except (LabelStoreError, OSError):
        n = "?"
    argv = sys.argv[1:]
    cmd = "labelstore " + shlex.join(argv[argv.index("compile"):]) if "compile" in argv else None
    return (f"labelstore compile: interrupted: {n} shards committed in {out}; rerun the same command to resume"
            + (f":\n  {cmd}" if cmd else ""))


def compile_store(opts: CompileOptions) -> CompileResult:
    """Compile (or resume) the store ``opts.out``; see the module docstring. Returns this rank's figures."""
    from labelstore_kernels import extract, extract_topk

    from .writer import StoreWriter, finalize_store

    opts.validate()
    rank, world, local_rank = _dist_env()
    device = resolve_device(opts.device, local_rank)
    dtype = resolve_dtype(opts.dtype, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        # ranks may finish far apart (a resumed store, uneven documents): wait long at the final barrier
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                             timeout=timedelta(hours=24))
    try:
        tokenizer = load_tokenizer(opts.tokenizer or opts.teacher, opts.trust_remote_code)
        V = config_vocab_size(opts.teacher, opts.trust_remote_code)
        if len(tokenizer) > V:
            raise ConfigMismatchError(
                f"the tokenizer has {len(tokenizer):,} tokens but the teacher's output vocabulary is {V:,}: "
                "they do not belong together; pass the teacher's own tokenizer (--tokenizer)"
            )
        codec = get_codec(opts.codec_name)
        k = 1 if opts.hard_labels else min(opts.k, V)
        in_cfg = InputConfig(max_length=opts.max_length, pack=opts.pack, text_field=opts.text_field,
                             token_field=opts.token_field, max_samples=opts.max_samples)
        with tempfile.TemporaryDirectory(prefix="labelstore-plan-") as workdir:
            plan = build_plan(opts.data, tokenizer, in_cfg, V, workdir=workdir)  # validates every input
            model = load_teacher(opts.teacher, dtype, device, opts.trust_remote_code)
            if output_vocab_size(model) != V:
                raise ConfigMismatchError(f"the teacher's output layer has {output_vocab_size(model):,} rows but "
                                          f"its config says vocab_size {V:,}; fix the model's config.json")
            meta = build_meta(opts, plan, V, k, dtype, device, teacher_fingerprint(model),
                              tokenizer_fingerprint(tokenizer), world)
            _check_inputs_still_there(opts.out, plan)
            batches = plan_batches(plan, opts.tokens_per_batch, opts.pack)
            mine = batches[rank::world]
            try:
                writer = StoreWriter(opts.out, meta, rank=rank, world_size=world,
                                     shard_bytes=max(1, int(opts.shard_mb * (1 << 20))))
            except OSError as exc:  # e.g. the lock file of a read-only store (the writer wraps its other I/O)
                raise StoreWriteError(
                    f"cannot open {opts.out} for writing: {exc.strerror or exc}"
                    f"{f' ({exc.filename})' if exc.filename else ''}. Nothing was changed; make --out writable "
                    "(permissions, free space) or choose another directory, then rerun the same command."
                ) from None
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            if meta["selection"]["mode"] in ("topk", "argmax"):
                def extract_fn(flat, row_ids):
                    return extract_topk(flat, k, temperature=opts.temperature, codec=codec)  # k=1 "none": argmax
            else:
                def extract_fn(flat, row_ids):
                    return extract(flat, meta["selection"], temperature=opts.temperature, codec=codec,
                                   seed=opts.seed, row_ids=row_ids)
            result = _run_batches(model, plan, mine, writer, extract_fn, V, codec, opts, device,
                                  pad_id, rank, world)
        _barrier(world)
        if world > 1 and rank == 0:
            finalize_store(opts.out, world)
        _barrier(world)
        return result
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _check_inputs_still_there(out, plan: Plan) -> None:
    """On resume: if the data changed because input files the store was compiled from vanished, name them.

    (The config check would refuse the resume anyway, but only as a changed data fingerprint.) Input files are
    read once, while planning: after that a compile runs from the plan's own copy of the tokens.
    """
    from .manifest import CONFIG

    cfg_path = Path(out) / CONFIG
    try:
        cfg = json.loads(cfg_path.read_text())
        old_sha, old_files = cfg["compile_config"]["data"]["sha256"], list(cfg["runtime"]["data_files"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # a new store, or a damaged config that the writer reports
    if old_sha == plan.fingerprint:
        return
    now = set(plan.files)
    gone = [f for f in old_files if f not in now and not Path(f).exists()]
    if gone:
        raise InputDataError(
            f"{out} was compiled from input file(s) that no longer exist: {', '.join(gone[:5])}"
            f"{f' and {len(gone) - 5} more' if len(gone) > 5 else ''}. Restore them and rerun the same command to "
            "resume; committed shards are intact."
        )


def _row_ids(batch: np.ndarray, lengths: np.ndarray, max_length: int) -> np.ndarray:
    """Global row id ``sample_id * max_length + position`` of every real position of a batch (FORMAT.md 5b)."""
    return np.concatenate([int(sid) * max_length + np.arange(int(n), dtype=np.int64)
                           for sid, n in zip(batch, lengths)]).astype(np.int64)


def _run_batches(model, plan, mine, writer, extract_fn, V, codec, opts, device, pad_id, rank, world):
    committed = writer.committed_sample_ids()
    todo_masks = [~np.isin(b, committed) for b in mine]
    total = int(sum(int(t.sum()) for t in todo_masks))
    skipped = int(sum(len(b) for b in mine)) - total
    bar = None
    if opts.progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="seq", desc=f"compile{'' if world == 1 else f' rank 0/{world}'}",
                   file=sys.stderr, dynamic_ncols=True, disable=None)
    thread = _WriterThread(writer, plan, opts.hard_labels, codec.bytes_per_value, bar)
    thread.start()
    t0, c0 = time.perf_counter(), time.process_time()
    ok = False
    try:
        with torch.inference_mode():
            for batch, todo in zip(mine, todo_masks):
                if not todo.any():
                    continue
                if thread.error is not None:
                    break
                x, m, lengths = collate(plan, batch, pad_id)
                padded = bool((m == 0).any())
                logits = model(input_ids=x.to(device), attention_mask=m.to(device), use_cache=False).logits
                if logits.shape[-1] != V:
                    raise ConfigMismatchError(f"the teacher returned {logits.shape[-1]} logits per position, "
                                              f"expected its output vocabulary of {V}")
                flat = logits.reshape(-1, V)
                if padded:  # padding positions are never extracted
                    flat = flat[m.reshape(-1).nonzero().flatten().to(device)]
                try:
                    ex = extract_fn(flat, _row_ids(batch, lengths, opts.max_length))
                except InvalidLogitsError as exc:
                    raise _locate_invalid(exc, batch, lengths) from None
                mass = teacher_mass(flat, ex.lse, lengths, opts.temperature) if uses_tail_prior(opts) else None
                del logits, flat
                thread.queue.put((batch, lengths, todo, ex, mass))
        thread.queue.put(None)
        thread.join()
        if thread.error is not None:
            raise thread.error
        writer.close()
        ok = True
    finally:
        if not ok:
            # Error or Ctrl-C: let the writer thread finish the row it is adding (a shard it is committing
            # completes), drop the queued batches, then discard only the open shard. A second Ctrl-C
            # meanwhile is ignored so that the cleanup cannot be cut short; it takes at most one batch.
            old = None
            if threading.current_thread() is threading.main_thread():
                old = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                if thread.is_alive():
                    thread.error = thread.error or RuntimeError("aborted")
                    thread.queue.put(None)
                    thread.join()
                writer.abort()
            finally:
                if old is not None:
                    signal.signal(signal.SIGINT, old)
        if bar is not None:
            bar.close()
    return CompileResult(out=str(opts.out), rank=rank, world_size=world, samples=thread.samples,
                         tokens=thread.tokens, skipped=skipped, seconds=time.perf_counter() - t0,
                         cpu_seconds=time.process_time() - c0)


def _locate_invalid(exc: InvalidLogitsError, batch: np.ndarray, lengths: np.ndarray) -> InvalidLogitsError:
    """Rename the kernel's row numbers as (sample id, position) pairs."""
    ends = np.cumsum(lengths)
    where = []
    for row in exc.rows[:4]:
        r = int(np.searchsorted(ends, row, side="right"))
        where.append(f"sample {int(batch[r])} position {int(row - (ends[r] - lengths[r]))}")
    msg = (f"the teacher produced invalid logits at {', '.join(where)}: {exc}. Nothing of this batch was "
           "stored; committed shards are intact.")
    return InvalidLogitsError(msg, rows=exc.rows)
