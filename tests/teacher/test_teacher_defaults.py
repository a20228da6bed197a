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
    return ["compile", "--teacher", str(env["teacher"]), "--data", str(env["corpus"]), "--out", str(out),
            "--selection", "topk", "--k", "4",
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


def test_tokens_per_batch_auto_sizing_rules():
    from types import SimpleNamespace

    from labelstore.teacher.batching import auto_tokens_per_batch, bytes_per_token

    cfg = SimpleNamespace(hidden_size=192, intermediate_size=512, num_attention_heads=3)
    fused = bytes_per_token(cfg, 151_936, 256, 4, True, 4)
    mat = bytes_per_token(cfg, 151_936, 256, 4, False, 4)
    assert fused == 4 * (8 * 192 + 2 * 512) + 4 * 3 * 256 and mat == fused + 151_936 * 8
    # 4 GiB free on CPU: a quarter of it, in whole sequences; the fused path is capped, not the materialised one
    assert auto_tokens_per_batch(4 << 30, "cpu", mat, 0, 256) == (1 << 30) // mat // 256 * 256 == 768
    assert auto_tokens_per_batch(4 << 30, "cpu", fused, 0, 256) == 1 << 16
    assert auto_tokens_per_batch(1 << 20, "cpu", mat, 0, 256) == 256  # never below one sequence


def test_tokens_per_batch_auto_is_recorded_and_reused_on_resume(env, tmp_path, monkeypatch):
    from labelstore.teacher import pipeline
    from labelstore.teacher.options import CompileOptions

    out = tmp_path / "s"
    assert cli_main(args(env, out, "--tokens-per-batch", "auto")) == 0
    tpb = LabelStore(out).meta["runtime"]["tokens_per_batch"]
    assert isinstance(tpb, int) and tpb >= 40 and tpb % 40 == 0
    monkeypatch.setattr(pipeline, "free_memory", lambda device: 0)  # a fresh sizing would now give one sequence
    opts = CompileOptions(teacher=str(env["teacher"]), data=[str(env["corpus"])], out=str(out), max_length=40,
                          tokens_per_batch="auto")
    assert pipeline.resolve_tokens_per_batch(opts, None, 300, torch.device("cpu")) == tpb
    fresh = CompileOptions(**{**opts.__dict__, "out": str(tmp_path / "new")})
    from labelstore.teacher.model import load_teacher

    model = load_teacher(str(env["teacher"]), torch.float32, torch.device("cpu"))
    assert pipeline.resolve_tokens_per_batch(fresh, model, len(model.get_output_embeddings().weight),
                                             torch.device("cpu")) == 40
