"""Tiny randomly initialised teachers (Llama-style and GPT-2-style) and corpora for the compile tests.

Everything is saved with ``save_pretrained`` into a directory and loaded back by the code under test through
``from_pretrained``, exactly like a user's model.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from labelstore.tools.demo_model import train_tokenizer

WORDS = ("the of and to in is was for on that with as by at from his her which or def return class import "
         "self value data model token label store teacher student shard write read batch loss mass tail").split()


def make_documents(n: int, seed: int = 0, min_words: int = 3, max_words: int = 120) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 99999)))
        docs.append(" ".join(words) + rng.choice([".", "!", "?\n", ""]))
    return docs


def make_tokenizer(vocab_size: int = 300, seed: int = 0):
    return train_tokenizer(make_documents(400, seed=seed + 100), vocab_size)


def _llama(vocab: int, eos: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.2, tie_word_embeddings=False, eos_token_id=eos, bos_token_id=eos)
    return LlamaForCausalLM(cfg)


def _gpt2(vocab: int, eos: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=512, n_inner=64,
                     initializer_range=0.2, eos_token_id=eos, bos_token_id=eos)
    return GPT2LMHeadModel(cfg)


ARCHS = {"llama": _llama, "gpt2": _gpt2}


def save_teacher(path: Path, arch: str, tokenizer, *, extra_vocab: int = 0, seed: int = 0,
                 nan_token: int | None = None) -> Path:
    """A tiny random ``arch`` teacher with ``tokenizer`` saved next to it; returns ``path``.

    ``extra_vocab`` pads the output vocabulary beyond the tokenizer's (as many real models do).
    ``nan_token`` poisons that token's input embedding with NaN: every position that sees it gets NaN logits.
    """
    torch.manual_seed(seed)
    model = ARCHS[arch](len(tokenizer) + extra_vocab, tokenizer.eos_token_id).eval()
    if nan_token is not None:
        with torch.no_grad():
            model.get_input_embeddings().weight[nan_token] = float("nan")
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_corpus(root: Path, docs: list[str], kind: str = "txt", text_field: str = "text") -> list[Path]:
    """Write ``docs`` as text files (one per doc), one JSONL file, or one Parquet file; returns the paths."""
    root.mkdir(parents=True, exist_ok=True)
    if kind == "txt":
        paths = []
        for i, d in enumerate(docs):
            p = root / f"doc{i:04d}.txt"
            p.write_text(d, encoding="utf-8")
            paths.append(p)
        return paths
    if kind == "jsonl":
        p = root / "docs.jsonl"
        p.write_text("".join(json.dumps({text_field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
        return [p]
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        p = root / "docs.parquet"
        pq.write_table(pa.table({text_field: docs}), p)
        return [p]
    raise ValueError(kind)


def load_model(teacher_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()


@torch.inference_mode()
def dense_logprobs(model, input_ids: torch.Tensor) -> torch.Tensor:
    """float64 log-softmax of the teacher on one unpadded sequence: the reference of every check."""
    logits = model(input_ids=input_ids[None].long()).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)


# ------------------------------------------------------------------------------------------ store helpers
def raw_store_rows(path) -> dict[int, dict]:
    """Every stored sample by id, as the bytes on disk decode them *before* any reconstruction: input ids,
    counts, kept ids, raw value bytes (codec codes, or draw counts), stored tail and document starts."""
    import numpy as np

    from labelstore.store import bitpack
    from labelstore.store.format import PAYLOAD_COLUMNS
    from labelstore.store.reader import LabelStore

    s = LabelStore(path)
    assert s.meta.get("encoding", {"name": "packed"})["name"] == "packed"
    count_dt = "<u1" if s.meta["count_bytes"] == 1 else "<u2"
    rows = {}
    for i in range(len(s)):
        si, b, r = s.locate(i)
        v = s._shard(si).views(b)
        part = {n: v[n][1][v[n][0][r]: v[n][0][r + 1]].copy() for n in PAYLOAD_COLUMNS}
        sid, T = int(v["sample_id"][r]), int(v["num_tokens"][r])
        counts = np.frombuffer(part["counts"].tobytes(), dtype=count_dt).astype(np.int64)
        assert sid not in rows, f"sample {sid} stored twice"
        rows[sid] = {
            "input_ids": bitpack.unpack(part["input_ids"], s.id_bits, T),
            "counts": counts,
            "ids": bitpack.unpack(part["ids"], s.id_bits, int(counts.sum())),
            "values": part["values"],
            "tail": np.frombuffer(part["tail"].tobytes(), dtype="<f4"),
            "doc_starts": np.frombuffer(part["doc_starts"].tobytes(), dtype="<i4"),
        }
    return rows


def raw_rows_differences(a: dict, b: dict) -> list[str]:
    """Why two :func:`raw_store_rows` results differ (empty: identical)."""
    import numpy as np

    out = []
    if sorted(a) != sorted(b):
        out.append(f"sample ids differ: {len(a)} vs {len(b)} samples, only in the first "
                   f"{sorted(set(a) - set(b))[:5]}, only in the second {sorted(set(b) - set(a))[:5]}")
    for sid in sorted(set(a) & set(b)):
        for name in a[sid]:
            if not np.array_equal(a[sid][name], b[sid][name]):
                out.append(f"sample {sid}: {name} differ")
    return out


def snapshot(path) -> dict[str, str]:
    """SHA-256 of every file under ``path`` (lock files excepted): byte identity of a store or a part of it."""
    import hashlib

    path = Path(path)
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


def committed_files(path) -> dict[str, str]:
    """SHA-256 of the committed shards and their commit records only (what must survive any failure)."""
    import hashlib

    from labelstore.store.manifest import commit_name, list_commits

    path = Path(path)
    out = {}
    for c in list_commits(path):
        for rel in (c["path"], commit_name(c["rank"], c["seq"])):
            out[rel] = hashlib.sha256((path / rel).read_bytes()).hexdigest()
    return out


# A compile slowed down (a sleep before each batch) so that a test can interrupt it half-way.
SLOW_COMPILE = """
import signal, sys, time
# Ctrl-C as a terminal delivers it, whatever the test process left behind: a signal mask or an ignored SIGINT
# is inherited through exec (seen in the full suite: the child then finished, exit 0, never interrupted)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
signal.signal(signal.SIGINT, signal.default_int_handler)
import labelstore.teacher.pipeline as c
slow = c.pad_batch
def collate(*a, **k):
    time.sleep(DELAY)
    return slow(*a, **k)
c.pad_batch = collate
from labelstore.cli import main
sys.exit(main(sys.argv[1:]))
"""


def slow_compile_script(delay: float = 0.05) -> str:
    return SLOW_COMPILE.replace("DELAY", repr(float(delay)))


def interrupt_compile(args: list[str], out: Path, cwd: Path, after_commits: int) -> tuple[int, str]:
    """Run a slowed `labelstore compile ARGS` in a subprocess, send it SIGINT once ``after_commits`` shards are
    committed in ``out``, and return (exit status, stderr). Fails if the compile ends before it is interrupted."""
    proc = subprocess.Popen([sys.executable, "-c", slow_compile_script(0.1), *args], cwd=cwd,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while (time.monotonic() < deadline and proc.poll() is None
           and len(list((Path(out) / "commits").glob("r*.json"))) < after_commits):
        time.sleep(0.01)
    assert proc.poll() is None, f"compile ended before it could be interrupted: {proc.communicate()}"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


class Interrupt(BaseException):
    pass


def interrupt_after(monkeypatch, commits: int):
    """Stop the compile (as Ctrl-C would) once ``commits`` shards are committed."""
    from labelstore.store.writer import StoreWriter

    real = StoreWriter.commit
    seen = []

    def commit(self):
        real(self)
        seen.append(1)
        if len(seen) == commits:
            raise Interrupt()

    monkeypatch.setattr(StoreWriter, "commit", commit)
