"""Defaults sized from the teacher: ``--max-length`` from its context length, refused above it."""

from __future__ import annotations

import pytest
import torch
from _teachers import make_documents, make_tokenizer, write_corpus
from transformers import GPT2Config, GPT2LMHeadModel

from labelstore.cli import main as cli_main
from labelstore.store.reader import LabelStore
from labelstore.teacher.model import resolve_max_length

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("defaults")
    tok = make_tokenizer()
    write_corpus(base / "corpus", make_documents(12, seed=5))
    teacher = base / "gpt2"
    torch.manual_seed(0)  # a short context (40 positions): the corpus packs into several sequences of it
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=40, n_inner=64,
                               eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)).save_pretrained(teacher)
    tok.save_pretrained(teacher)
    return {"teacher": teacher, "corpus": base / "corpus"}


def args(env, out, *extra):
    return ["compile", "--teacher", str(env["teacher"]), "--data", str(env["corpus"]), "--out", str(out), "--k", "4",
            "--device", "cpu", "--quiet", *extra]


def test_max_length_above_the_context_is_refused_before_anything_is_written(env, tmp_path, capsys):
    out = tmp_path / "s"
    assert cli_main(args(env, out, "--max-length", "64")) == 1
    err = capsys.readouterr().err
    assert "--max-length 64 exceeds the teacher's context length 40 (" in err, err
    assert not out.exists()  # the corrected command then starts clean


def test_max_length_defaults_to_the_context_length(env, tmp_path):
    out = tmp_path / "s"
    assert cli_main(args(env, out)) == 0
    store = LabelStore(out)
    assert store.meta["compile_config"]["max_length"] == 40
    lengths = [len(store[i].input_ids) for i in range(len(store))]
    assert max(lengths) == 40 and len(lengths) > 2  # packed into context-length sequences


def test_resolve_max_length_rules():
    assert resolve_max_length(None, (131072, "max_position_embeddings"), 16384) == 16384  # capped by the batch
    assert resolve_max_length(None, (None, ""), 16384) == 2048
    assert resolve_max_length(100, (1024, "n_positions"), 16384) == 100
