"""CompileOptions: every setting of a compile, declared once; the `labelstore compile` flags are generated from it.

Each field's ``metadata`` holds its command-line help (and, where it differs from ``--field-name``, its flags),
so a new option is one new field. :meth:`CompileOptions.validate` is the only place the settings are checked;
selection settings are checked by the one selection schema, :func:`labelstore.selection.check_selection`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from labelstore.codecs import CODEC_NAMES, DEFAULT_CODEC, get_codec
from labelstore.constants import MAX_SAMPLES
from labelstore.selection import COMPILE_MODES, SelectionError, check_selection, default_codec
from labelstore.store.format import MAX_K

LM_HEAD_MODES = ("auto", "fused", "materialized")  # labelstore.teacher.head reads these
HEAD_DTYPES = ("auto", "float32")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # from_pretrained's named placements

DTYPE_NAMES = ("float32", "bfloat16", "float16")
ENCODING_NAMES = ("packed", "zstd", "expgolomb", "grouped")  # expgolomb: format v5, FORMAT.md 6c; grouped: v6, 6d
# The default selection: sampled stores trained students closer to online distillation than top-k stores at a
# third of the bytes in both regimes of benchmarks/bench_students.py (README "Defaults, from this table").
DEFAULT_SELECTION = "sample"
DEFAULT_K = 32  # topk / topp


DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
FLAGS = {"k": "--k", "p": "--top-p", "min_k": "--min-k", "samples": "--samples", "k_exact": "--k-exact"}
MAX_K_FACTOR = 4  # adaptive: --max-k defaults to this many times --k (the mean), capped at the format's MAX_K


def tokens_arg(text: str) -> int | str:
    """``--tokens-per-batch``: a positive int or ``auto``."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of tokens or auto, got {text!r}") from None


def _opt(default, help: str, **cli):
    return field(default=default, metadata={"help": help, **cli})


def _req(help: str, **cli):
    return field(metadata={"help": help, "required": True, **cli})


def cli_message(exc: SelectionError) -> str:
    """A selection error in the terms of the `labelstore compile` flags."""
    if exc.key == "codec":
        if exc.mode == "sample":
            return f"--selection sample stores draw counts: its codec is count8, not --codec {exc.got}"
        if exc.got == "count8":
            return f"--codec count8 belongs to --selection sample only, not {exc.mode}"
        if exc.mode == "topk+sample":
            return f"--selection topk+sample needs a 1-byte codec (log8, e4m3, e5m2), not {exc.got}"
    if exc.mode == "adaptive" and exc.key == "mean_k":
        return (f"--selection adaptive: --k {exc.got} (the mean entries per position) must be at most --max-k "
                f"(the most one position keeps, {exc.requirement.split(', ')[-1].rstrip(']')}); pass a larger "
                "--max-k or a smaller --k")
    if exc.key in FLAGS and exc.requirement:
        return f"{FLAGS[exc.key]} must be {exc.requirement}, got {exc.got}"
    return f"--selection {exc.mode}: {exc}"


@dataclass
class CompileOptions:
    """The settings of one compile (see ``labelstore compile --help`` for each)."""

    teacher: str = _req("teacher model: a local directory (or hub name) for AutoModelForCausalLM")
    data: list[str] = _req("inputs (repeatable): text, .jsonl, .json, .parquet, .arrow files (.gz/.bz2/.xz/.zst "
                           "compressed text, JSON and JSONL too), folders of them, datasets.save_to_disk folders, or "
                           "hf:NAME for datasets.load_dataset (local files or the local cache); also URLs: "
                           "s3://bucket/key, globs (s3://bucket/corpus/*.parquet), prefixes (s3://bucket/corpus/)",
                           nargs="+", action="extend", metavar="PATH")
    out: str = _req("store directory or object-storage URL such as s3://bucket/prefix (created, or resumed if it "
                    "exists)")
    tokenizer: str | None = _opt(None, "tokenizer directory or name (default: --teacher)")
    k: int | None = _opt(None, f"kept entries per position (--selection topk), the maximum per position (topp), "
                               f"the mean per position (adaptive) (default {DEFAULT_K}; sample and topk+sample "
                               "stores are sized by --samples and --k-exact, and refuse --k)", type=int)
    max_k: int | None = _opt(None, f"adaptive: the most entries one position keeps (default {MAX_K_FACTOR} x --k, "
                                   f"at most {MAX_K})", type=int)
    selection: str | None = _opt(None, "which entries a position keeps (docs/FORMAT.md 5b): the distinct ids of "
                                       "--samples draws (sample, unbiased; the default, chosen by the student "
                                       "benchmark, README 'Defaults, from this table'), the k most probable "
                                       "(topk), the smallest set with mass >= --top-p (topp), the --k-exact most "
                                       "probable plus draws from the rest (topk+sample), or a mean of --k most "
                                       "probable per position, allocated within each sequence where it lowers the KL "
                                       f"most, at most --max-k each (adaptive) (default {DEFAULT_SELECTION}; topk "
                                       "with --hard-labels)", choices=COMPILE_MODES)
    top_p: float = _opt(0.9, "topp: mass to reach per position")
    min_k: int = _opt(1, "topp: minimum entries per position")
    samples: int = _opt(16, f"sample, topk+sample: draws per position, 1..{MAX_SAMPLES}")
    k_exact: int = _opt(8, "topk+sample: exact most probable entries per position")
    seed: int = _opt(0, "sample, topk+sample: random seed (recorded; a resume draws the same samples)")
    temperature: float = _opt(1.0, "softmax temperature")
    codec: str | None = _opt(None, f"value codec for the kept probabilities (default {DEFAULT_CODEC}; count8, the "
                                   "only choice, for --selection sample)",
                             choices=[c for c in CODEC_NAMES if c != "none"])
    log8_step: float | None = _opt(None, "log8: nats between value codes (default 1/16; 0.5 stores ~7-10 B/token "
                                         "less at top-32..50 for +0.003 nats KL, benchmarks/results/compression.md)",
                                   type=float)
    max_length: int | None = _opt(None, "tokens per sequence (default: the teacher's context length from its config, "
                                        "at most --tokens-per-batch; 2048 if the config names none)", type=int)
    pack: bool = _opt(True, "concatenate documents with EOS separators, cut into max-length sequences (default)",
                      negative=("--truncate",), negative_help="one sequence per document, cut to max-length")
    text_field: str = _opt("text", "JSONL field / table column holding the text")
    token_field: str = _opt("input_ids", "table column of pre-tokenized ids, used when the text column is absent")
    max_samples: int | None = _opt(None, "compile only the first N sequences (--plan units: one process only)",
                                   type=int)
    plan: str = _opt("global", "global: every rank tokenizes the whole corpus into one plan (sample id = sequence "
                               "index); units: each rank reads and tokenizes only its block of work units (one per "
                               "input file; sample id = unit * 2**26 + sequence in the unit; packing never spans two "
                               "files), and a resume reads only the newest commit record of each rank",
                     choices=("global", "units"))
    assistant_only: bool = _opt(False, "store labels only at positions whose next token belongs to an assistant turn "
                                       "('messages' records) or a completion ('prompt'+'completion' records); the "
                                       "teacher still reads every token")
    chat_template: str | None = _opt(None, "a Jinja chat template FILE for 'messages' records (default: the "
                                           "tokenizer's own)", metavar="FILE")
    text_glob: list[str] | None = _opt(None, "in --data folders, read files matching this pattern as plain text "
                                             "(e.g. '*.py'; repeatable); other unknown files are refused",
                                       action="append", metavar="PATTERN")
    split: str | None = _opt(None, "dataset split for hf:NAME and save_to_disk DatasetDict inputs")
    streaming: bool = _opt(False, "hf:NAME inputs: stream the dataset (datasets.load_dataset(streaming=True))")
    overwrite: bool = _opt(False, "discard the store at --out (its committed shards too) and compile it anew")
    hard_labels: bool = _opt(False, "store only the teacher's argmax token per position (no values, no tail)")
    tail_prior: bool = _opt(True, "skip the teacher's mean distribution (the store's tail prior, one extra pass over "
                                  "the logits)", negative=("--no-tail-prior",))
    tokens_per_batch: int | str = _opt(16384, "padded tokens per teacher forward, or auto: sized from the device's "
                                              "free memory, the vocabulary and whether the logits are materialised "
                                              "(a resume reuses the store's value)", type=tokens_arg)
    dtype: str = _opt("auto", "teacher weights dtype (default: bfloat16 on CUDA, float32 on CPU)",
                      choices=("auto", *DTYPE_NAMES))
    device: str = _opt("auto", "cpu, cuda, cuda:N (default: cuda if available)")
    device_map: str | None = _opt(None, "auto: place a teacher too large for one device across this node's GPUs "
                                        "(then CPU memory) with accelerate (from_pretrained's device_map); one "
                                        "process per node, not under torchrun", choices=DEVICE_MAPS)
    tp_size: int = _opt(1, "under torchrun: ranks per tensor-parallel group (transformers' tp_plan=auto); groups "
                           "split the data and one rank per group writes")
    lm_head: str = _opt("auto", "where the logits come from: fused (extraction straight from the final hidden states "
                                "in row blocks; the [N, V] logits never exist), materialized (model(...).logits), "
                                "or auto: fused when labelstore can reproduce the teacher's head, else "
                                "materialized with a one-line notice naming why", choices=LM_HEAD_MODES)
    head_dtype: str = _opt("auto", "dtype of the LM head matmul and everything after it: auto (the teacher's) or "
                                   "float32 (exact logits from a bfloat16 teacher; changes the labels)",
                           choices=HEAD_DTYPES)
    mask_vocab_padding: bool = _opt(False, "give ids >= the tokenizer's vocabulary probability 0 (padding rows of "
                                           "a larger head); the store's vocabulary stays the head's rows")
    shard_mb: float = _opt(256.0, "shard size in MiB")
    encoding: str = _opt("packed", "row encoding: packed (fastest reads), zstd (entropy-coded ids and values, about a "
                                   "third smaller on real teachers; docs/FORMAT.md 6b) or expgolomb (smaller still: "
                                   "id magnitudes under zstd plus raw bits, the next input token nearly free; format "
                                   "version 5, docs/FORMAT.md 6c) or grouped (smaller again: expgolomb without the "
                                   "order of ids whose values tie; version 6, docs/FORMAT.md 6d)",
                           choices=ENCODING_NAMES)
    trust_remote_code: bool = _opt(False, "allow the teacher's own modelling code (passed to from_pretrained only "
                                          "if given)")
    progress: bool = _opt(True, "no progress bar nor summary", negative=("--quiet",))

    def __post_init__(self):
        if self.selection is None:  # not given: the default, or topk for --hard-labels (which stores the argmax)
            self.selection = "topk" if self.hard_labels else DEFAULT_SELECTION

    @property
    def kept(self) -> int:
        """``--k`` resolved: the kept entries of a topk/topp compile (:data:`DEFAULT_K` when not given)."""
        return DEFAULT_K if self.k is None else self.k

    @property
    def adaptive_max_k(self) -> int:
        """``--max-k`` resolved: :data:`MAX_K_FACTOR` x the mean (``--k``) when not given, at most ``MAX_K``."""
        return min(MAX_K_FACTOR * self.kept, MAX_K) if self.max_k is None else self.max_k

    # ------------------------------------------------------------------------------------------ CLI
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per field: ``--field-name`` (``store_true`` for a False bool), or the field's own flags."""
        for f in dataclasses.fields(cls):
            meta = dict(f.metadata)
            help_text = meta.pop("help")
            flag = f"--{f.name.replace('_', '-')}"
            negative, negative_help = meta.pop("negative", None), meta.pop("negative_help", None)
            if isinstance(f.default, bool):
                if negative and negative_help:  # a pair of switches: --pack | --truncate
                    group = parser.add_mutually_exclusive_group()
                    group.add_argument(flag, dest=f.name, action="store_true", default=f.default, help=help_text)
                    group.add_argument(*negative, dest=f.name, action="store_false", help=negative_help)
                elif negative:  # only the switch that turns a default-on setting off: --no-tail-prior, --quiet
                    parser.add_argument(*negative, dest=f.name, action="store_false", default=f.default,
                                        help=help_text)
                else:
                    parser.add_argument(flag, dest=f.name, action="store_true", default=f.default, help=help_text)
                continue
            if f.default is dataclasses.MISSING:
                parser.add_argument(flag, dest=f.name, help=help_text, **meta)
                continue
            if "type" not in meta and f.default is not None:
                meta["type"] = type(f.default)
            if f.default is not None:
                help_text += f" (default {f.default})"
            parser.add_argument(flag, dest=f.name, default=f.default, help=help_text, **meta)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CompileOptions:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    # ------------------------------------------------------------------------------------------ derived
    @property
    def codec_name(self) -> str:
        """The value codec this compile writes (``--codec`` resolved against the selection mode)."""
        if self.hard_labels:
            return "none"
        return default_codec(self.selection) if self.codec is None else self.codec

    @property
    def value_codec(self):
        """The :class:`~labelstore.codecs.ValueCodec` this compile writes (``--codec`` with ``--log8-step``)."""
        if self.log8_step is None:
            return get_codec(self.codec_name)
        return get_codec(self.codec_name, step=self.log8_step)

    def selection_meta(self, vocab_size: int | None = None) -> dict:
        """``meta["selection"]`` exactly as docs/FORMAT.md 5b spells it (k clipped to the vocabulary)."""
        if self.hard_labels:
            return {"mode": "argmax", "k": 1}
        k = self.kept if vocab_size is None else min(self.kept, vocab_size)
        if self.selection == "topk":
            return {"mode": "topk", "k": k}
        if self.selection == "topp":  # min_k follows k when the vocabulary clips it
            return {"mode": "topp", "k": k, "p": float(self.top_p),
                    "min_k": self.min_k if vocab_size is None else min(self.min_k, k)}
        if self.selection == "adaptive":  # --k is the mean; both clipped to the vocabulary
            top = self.adaptive_max_k if vocab_size is None else min(self.adaptive_max_k, vocab_size)
            return {"mode": "adaptive", "k": top, "mean_k": self.kept if vocab_size is None else min(self.kept, top)}
        if self.selection == "sample":
            return {"mode": "sample", "k": self.samples, "samples": self.samples}
        return {"mode": "topk+sample", "k_exact": self.k_exact, "samples": self.samples,
                "k": self.k_exact + self.samples}

    def head_settings(self) -> dict:
        """The head settings that change the labels, for ``compile_config`` (empty by default: old stores
        resume)."""
        out = {}
        if self.head_dtype != "auto":
            out["head_dtype"] = self.head_dtype
        if self.mask_vocab_padding:
            out["mask_vocab_padding"] = True
        return out

    @property
    def uses_tail_prior(self) -> bool:
        """The tail prior spreads a stored tail: hard labels and pure ``sample`` stores have none."""
        return bool(self.tail_prior and not self.hard_labels and self.selection != "sample")

    # ------------------------------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ``ValueError`` naming the flag at fault (the CLI exits 2 with it)."""
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1):
            raise ValueError(f"--k must be >= 1, got {self.k}")
        if self.k is not None and not self.hard_labels and self.selection in ("sample", "topk+sample"):
            # --k used to mean "top-k entries" by default; silently ignoring it would store another kind of label
            keeps = "the distinct ids of --samples draws" if self.selection == "sample" else \
                "--k-exact entries plus --samples draws"
            raise ValueError(f"--k {self.k} sizes --selection topk, topp and adaptive stores; --selection "
                             f"{self.selection} keeps {keeps}. Pass --selection topk to keep the {self.k} most "
                             "probable entries, or drop --k")
        if self.max_k is not None and (self.hard_labels or self.selection != "adaptive"):
            raise ValueError("--max-k sizes --selection adaptive stores only (the most entries one position keeps); "
                             "drop it, or pass --selection adaptive (--k is then the mean per position)")
        if self.max_k is not None and (isinstance(self.max_k, bool) or not isinstance(self.max_k, int)
                                       or not 1 <= self.max_k <= MAX_K):
            raise ValueError(f"--max-k must be in [1, {MAX_K}] (the format's widest position), got {self.max_k!r}")
        if self.selection not in COMPILE_MODES:
            raise ValueError(f"--selection must be one of {', '.join(COMPILE_MODES)}, got {self.selection!r}")
        if self.hard_labels and self.selection != "topk":
            raise ValueError(f"--hard-labels stores the argmax only; it cannot be combined with --selection "
                             f"{self.selection}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"--seed must be a non-negative integer, got {self.seed!r}")
        if not self.hard_labels:
            try:  # the one selection schema: every mode parameter, and the codec against the mode
                check_selection(self.selection_meta(), self.codec_name, extraction=True)
            except SelectionError as exc:
                raise ValueError(cli_message(exc)) from None
        if self.log8_step is not None:
            if self.codec_name != "log8":
                raise ValueError(f"--log8-step sets the log8 codec's step; this compile writes codec "
                                 f"{self.codec_name!r}: pass --codec log8 (with --selection topk, topp or "
                                 "topk+sample) or drop --log8-step")
            step = self.log8_step
            if isinstance(step, bool) or not isinstance(step, (int, float)) or not (0 < step <= 1):
                raise ValueError(f"--log8-step must be in (0, 1] nats, got {step!r}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"--temperature must be a positive number, got {self.temperature}")
        tpb = self.tokens_per_batch
        if tpb != "auto" and (isinstance(tpb, bool) or not isinstance(tpb, int) or tpb < 1):
            raise ValueError(f"--tokens-per-batch must be >= 1, got {tpb}")
        if isinstance(self.tp_size, bool) or not isinstance(self.tp_size, int) or self.tp_size < 1:
            raise ValueError(f"--tp-size must be >= 1, got {self.tp_size}")
        if self.lm_head not in LM_HEAD_MODES:
            raise ValueError(f"--lm-head must be one of {', '.join(LM_HEAD_MODES)}, got {self.lm_head!r}")
        if self.head_dtype not in HEAD_DTYPES:
            raise ValueError(f"--head-dtype must be one of {', '.join(HEAD_DTYPES)}, got {self.head_dtype!r}")
        if self.device_map is not None and self.device_map not in DEVICE_MAPS:
            raise ValueError(f"--device-map must be one of {', '.join(DEVICE_MAPS)}, got {self.device_map!r}")
        if not self.shard_mb > 0:
            raise ValueError(f"--shard-mb must be positive, got {self.shard_mb}")
        if self.max_length is not None and (isinstance(self.max_length, bool) or not isinstance(self.max_length, int)
                                            or self.max_length < 1):  # None: the teacher's context length
            raise ValueError(f"--max-length must be a positive integer, got {self.max_length!r}")
        if self.max_samples is not None and (not isinstance(self.max_samples, int) or self.max_samples < 1):
            raise ValueError(f"--max-samples must be a positive integer, got {self.max_samples!r}")
        if self.plan not in ("global", "units"):
            raise ValueError(f"--plan must be global or units, got {self.plan!r}")
        check_device(self.device)
        if self.chat_template is not None and not Path(self.chat_template).is_file():
            raise ValueError(f"--chat-template {self.chat_template}: no such file (a Jinja template file)")


def check_device(name: str) -> None:
    """Refuse a ``--device`` torch cannot use here, in the CLI's terms (before torch fails deep inside)."""
    import torch

    if not isinstance(name, str) or not DEVICE_RE.match(name):
        raise ValueError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: MPS is not available here; use --device cpu (or auto)")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
            raise ValueError(f"--device {name}: {why}; use --device cpu (or auto)")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
