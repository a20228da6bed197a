"""Tiny randomly initialised teachers (Llama-style and GPT-2-style) and corpora for the compile tests.

Everything is saved with ``save_pretrained`` into a directory and loaded back by the code under test through
``from_pretrained``, exactly like a user's model.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from labelstore.demo_model import train_tokenizer

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
