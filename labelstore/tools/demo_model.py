"""The embedded demo teacher: a small Llama-style causal LM trained on the Python standard library.

No model hub is reachable on the project machines, so the demo brings its own teacher. Everything it needs is
present wherever Python is: the standard library's ``.py`` sources (``sysconfig.get_paths()["stdlib"]``).

1. The file list is deterministic (sorted relative paths); a file is held out when ``crc32(path) % 20 == 0``,
   so the split does not depend on which other files exist.
2. A byte-level BPE tokenizer (``tokenizers``) is trained on part of the training files.
3. A Llama-style model (~3 M parameters) is trained for a fixed number of steps (a few CPU minutes) on random
   windows of the tokenized training text. Seeded: the same machine and thread count give the same weights.
4. Model and tokenizer are saved with ``save_pretrained`` into a temporary folder which is renamed into the
   cache (``$LABELSTORE_CACHE`` or ``~/.cache/labelstore``) only when complete, and are loaded back through
   ``from_pretrained`` like any user's model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sysconfig
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

EOS_TOKEN = "<|endoftext|>"
CACHE_VERSION = "demo-teacher-v1"
INFO_FILE = "labelstore_demo.json"
EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class DemoConfig:
    """Every setting of the demo teacher. The default is the cached `demo-teacher-v1`."""

    vocab_size: int = 8192
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 3
    intermediate_size: int = 512
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 360
    bf16_autocast: bool = True  # bf16 matmuls on CPU: ~1.4x faster training here, weights stay fp32
    lr: float = 3e-3
    warmup_steps: int = 20
    seed: int = 0
    tokenizer_chars: int = 6_000_000  # characters of training text the BPE tokenizer learns from
    train_chars: int = 12_000_000  # characters of training text tokenized into the training pool
    heldout_modulus: int = 20  # a file is held out when crc32(relative path) % heldout_modulus == 0

    def cache_name(self) -> str:
        """The cache folder name: `demo-teacher-v1` for the default, a hashed suffix otherwise."""
        if self == DemoConfig():
            return CACHE_VERSION
        digest = hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()
        return f"{CACHE_VERSION}-{digest[:10]}"


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX). Without it, bf16 autocast is emulated:
    measured 12x slower than float32 for the demo teacher's training step on an AVX2-only CPU (174 vs 2,127
    tokens/s, one thread), which turned a 5-minute first build into hours."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def default_config() -> DemoConfig:
    """The demo teacher this machine builds: :class:`DemoConfig` (``demo-teacher-v1``, bf16 autocast) where bf16 is
    native, else the same model trained in float32 (its own cache name, so the two never mix)."""
    return DemoConfig() if native_bf16() else DemoConfig(bf16_autocast=False)


# --------------------------------------------------------------------------------------------------- corpus
def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: Path | None = None) -> list[Path]:
    """All ``.py`` files under the standard library (no site-packages), sorted by relative path."""
    root = Path(root) if root is not None else stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def split_files(files: list[Path], root: Path | None = None, modulus: int = 20) -> tuple[list[Path], list[Path]]:
    """(train, held-out): a file is held out when ``crc32(relative path) % modulus == 0``."""
    root = Path(root) if root is not None else stdlib_root()
    train, heldout = [], []
    for f in files:
        key = zlib.crc32(f.relative_to(root).as_posix().encode())
        (heldout if key % modulus == 0 else train).append(f)
    return train, heldout


def utf8_files(files: list[Path]) -> list[Path]:
    """The files that are non-empty UTF-8 text (the standard library ships a few deliberately broken ones)."""
    out = []
    for f in files:
        try:
            if f.read_text(encoding="utf-8").strip():
                out.append(f)
        except (OSError, UnicodeDecodeError):
            continue
    return out


def read_texts(files: list[Path], max_chars: int | None = None) -> list[str]:
    """UTF-8 contents of ``files`` in order (undecodable or empty files skipped), up to ``max_chars``."""
    texts, total = [], 0
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if not text.strip():
            continue
        texts.append(text)
        total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    return texts


# ------------------------------------------------------------------------------------------------ tokenizer
def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2 style pre-tokenization) wrapped as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN)


def tokenize_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """All texts tokenized and concatenated, each followed by EOS (int32)."""
    eos = tokenizer.eos_token_id
    enc = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    parts = []
    for e in enc:
        parts.append(np.asarray(e.ids, dtype=np.int32))
        parts.append(np.asarray([eos], dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


# -------------------------------------------------------------------------------------------------- model
def make_model(cfg: DemoConfig, eos_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=max(2048, cfg.seq_len),
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    return LlamaForCausalLM(config)


def _lr_at(step: int, cfg: DemoConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))


def train_model(model, stream: np.ndarray, cfg: DemoConfig, log: Callable[[str], None] = print) -> dict:
    """Train ``model`` in place on random ``seq_len`` windows of ``stream``; returns training statistics."""
    if len(stream) <= cfg.seq_len + 1:
        raise ValueError(f"training stream too short: {len(stream)} tokens for windows of {cfg.seq_len}")
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    data = torch.from_numpy(stream.astype(np.int64))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )
    model.train()
    offsets = torch.arange(cfg.seq_len + 1)
    t0 = time.perf_counter()
    losses = []
    log_every = max(1, cfg.steps // 10)
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        starts = torch.randint(0, len(data) - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
        window = data[starts[:, None] + offsets]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
            logits = model(input_ids=window[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            elapsed = time.perf_counter() - t0
            tps = (step + 1) * cfg.batch_size * cfg.seq_len / elapsed
            recent = sum(losses[-log_every:]) / len(losses[-log_every:])
            log(f"  step {step + 1:4d}/{cfg.steps}  loss {recent:.3f}  {tps:,.0f} tok/s  {elapsed:.0f}s")
    model.eval()
    elapsed = time.perf_counter() - t0
    return {
        "steps": cfg.steps,
        "train_tokens": cfg.steps * cfg.batch_size * cfg.seq_len,
        "train_seconds": round(elapsed, 1),
        "train_tokens_per_second": round(cfg.steps * cfg.batch_size * cfg.seq_len / elapsed, 1),
        "final_loss": round(sum(losses[-log_every:]) / len(losses[-log_every:]), 4),
    }


@torch.inference_mode()
def mean_entropy(model, stream: np.ndarray, seq_len: int, max_tokens: int = 16384) -> dict:
    """Mean next-token entropy and held-out loss (nats) of ``model`` on windows of ``stream``."""
    n = min(len(stream) // seq_len, max(1, max_tokens // seq_len))
    if n == 0:
        raise ValueError(f"held-out stream too short: {len(stream)} tokens")
    x = torch.from_numpy(stream[: n * seq_len].astype(np.int64)).view(n, seq_len)
    ent, nll = [], []
    for i in range(0, n, 8):
        lp = torch.log_softmax(model(input_ids=x[i:i + 8]).logits.float(), dim=-1)
        ent.append(-(lp.exp() * lp).sum(-1).reshape(-1))
        nll.append(-lp[:, :-1].gather(-1, x[i:i + 8, 1:, None]).reshape(-1))
    return {"entropy": float(torch.cat(ent).mean()), "loss": float(torch.cat(nll).mean()), "tokens": n * seq_len}


# -------------------------------------------------------------------------------------------------- threads
def threads_for_load() -> int:
    """CPU threads to use now: torch's default, fewer when other processes already keep the cores busy.

    OpenMP teams larger than the idle cores spin against each other: on a busy 2-core machine a 2-thread
    training runs several times slower than a 1-thread one. The thread count does not change the weights
    (the CPU kernels do not split reductions across threads), so this choice costs no determinism.
    """
    n = torch.get_num_threads()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return n
    idle = (os.cpu_count() or n) - load
    return max(1, min(n, int(idle + 0.5)))


class cpu_threads:
    """Context manager: run with ``n`` torch CPU threads, then restore the previous count."""

    def __init__(self, n: int):
        self.n, self.prev = n, None

    def __enter__(self):
        self.prev = torch.get_num_threads()
        torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self.prev)
        return False


# -------------------------------------------------------------------------------------------------- cache
def default_cache_root() -> Path:
    env = os.environ.get("LABELSTORE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "labelstore"


def build_demo_teacher(out_dir: Path, cfg: DemoConfig, log: Callable[[str], None] = print,
                       root: Path | None = None) -> dict:
    """Train the demo tokenizer and model and ``save_pretrained`` both into ``out_dir``; returns the info."""
    with cpu_threads(threads_for_load()):
        return _build(out_dir, cfg, log, root)


def _build(out_dir: Path, cfg: DemoConfig, log: Callable[[str], None], root: Path | None) -> dict:
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    root = Path(root) if root is not None else stdlib_root()
    train_files, heldout_files = split_files(corpus_files(root), root, cfg.heldout_modulus)
    if not train_files or not heldout_files:
        raise RuntimeError(f"no Python sources found under {root}: the demo trains on the standard library")
    random.Random(cfg.seed).shuffle(train_files)
    log(f"demo teacher: training a {cfg.vocab_size}-token BPE tokenizer on {root} "
        f"({len(train_files)} training files, {len(heldout_files)} held out)")
    tokenizer = train_tokenizer(read_texts(train_files, cfg.tokenizer_chars), cfg.vocab_size)
    stream = tokenize_stream(tokenizer, read_texts(train_files, cfg.train_chars))
    heldout = tokenize_stream(tokenizer, read_texts(heldout_files))
    model = make_model(cfg, tokenizer.eos_token_id)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"demo teacher: {n_params / 1e6:.1f}M-parameter Llama, {cfg.steps} steps of {cfg.batch_size}x{cfg.seq_len} "
        f"tokens on {len(stream):,} training tokens ({torch.get_num_threads()} CPU threads)")
    stats = train_model(model, stream, cfg, log)
    ev = mean_entropy(model, heldout, cfg.seq_len)
    info = {
        "name": CACHE_VERSION,
        "config": dataclasses.asdict(cfg),
        "parameters": n_params,
        "vocab_size": len(tokenizer),
        "log_vocab": math.log(len(tokenizer)),
        "heldout_entropy": round(ev["entropy"], 4),
        "heldout_loss": round(ev["loss"], 4),
        "heldout_tokens": ev["tokens"],
        "training": stats,
        "build_seconds": round(time.perf_counter() - t0, 1),
        "corpus": {"root": str(root), "train_files": len(train_files), "heldout_files": len(heldout_files),
                   "train_stream_tokens": int(len(stream))},
        "torch_threads": torch.get_num_threads(),
    }
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (Path(out_dir) / INFO_FILE).write_text(json.dumps(info, indent=1))
    log(f"demo teacher: held-out entropy {info['heldout_entropy']:.2f} nats (log V = {info['log_vocab']:.2f}), "
        f"loss {info['heldout_loss']:.2f}, built in {info['build_seconds']:.0f}s")
    return info


def ensure_demo_teacher(cache_root: Path | None = None, cfg: DemoConfig | None = None,
                        log: Callable[[str], None] = print, rebuild: bool = False, root: Path | None = None) -> Path:
    """The cached demo teacher's directory, building it first if missing (atomically: temp dir + rename).

    ``root`` replaces the standard library as the training corpus (tests use a tiny one).
    """
    cfg = cfg or default_config()
    cache_root = Path(cache_root) if cache_root is not None else default_cache_root()
    target = cache_root / cfg.cache_name()
    if rebuild and target.exists():
        shutil.rmtree(target)
    if (target / INFO_FILE).exists():
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=cache_root))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        build_demo_teacher(tmp, cfg, log, root)
        if target.exists() and not (target / INFO_FILE).exists():
            shutil.rmtree(target)  # a damaged cache entry (never left by this code)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / INFO_FILE).exists():  # not "another process finished first"
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def demo_info(path: Path) -> dict:
    return json.loads((Path(path) / INFO_FILE).read_text())
