"""The demo's code path with tiny settings: teacher build, atomic cache, from_pretrained round trip, figures.

The real demo teacher (minutes of CPU training) is never trained here: a 1-layer model learns for a few steps
on a handful of real standard-library files, through exactly the functions `labelstore demo` uses.
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

from labelstore.tools import demo_model
from labelstore.tools.demo import run_demo
from labelstore.tools.demo_model import INFO_FILE, DemoConfig, corpus_files, ensure_demo_teacher, stdlib_root

TINY = DemoConfig(vocab_size=320, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seq_len=64,
                  batch_size=4, steps=4, warmup_steps=2, tokenizer_chars=100_000, train_chars=100_000,
                  heldout_modulus=4)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A few real standard-library sources, at their relative paths."""
    root = tmp_path_factory.mktemp("stdlib")
    src = stdlib_root()
    picked = [f for f in corpus_files(src) if 2_000 < f.stat().st_size < 15_000][:40]
    for f in picked:
        dst = root / f.relative_to(src)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dst)
    return root


def test_demo_builds_caches_and_reports(tmp_path, corpus):
    lines: list[str] = []
    cache = tmp_path / "cache"
    first = run_demo(cache_dir=cache, config=TINY, corpus_root=corpus, samples=6, max_length=64,
                     fidelity_samples=2, log=lines.append, out=str(tmp_path / "store"))
    teacher = cache / TINY.cache_name()
    assert first["built"] and first["teacher"] == str(teacher)
    assert sorted(p.name for p in cache.iterdir()) == [teacher.name]  # no temporary folder left behind
    for name in ("config.json", "model.safetensors", "tokenizer.json", INFO_FILE):
        assert (teacher / name).is_file()

    # the saved teacher loads back through the same path as a user's model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(teacher)
    tok = AutoTokenizer.from_pretrained(teacher)
    assert len(tok) == TINY.vocab_size == model.config.vocab_size
    text = "def f(x):\n    return x + 1\n"
    assert tok.decode(tok(text)["input_ids"]) == text

    # the demo compiles with the compile default: a sampled store of 16 draws per position
    s, fid = first["summary"], first["fidelity"]
    assert s["samples"] == 6 and s["vocab_size"] == TINY.vocab_size
    assert fid["mode"] == "sample" and fid["draws"] == 16 and fid["positions"] == 2 * 64
    assert 0 < fid["entropy"] <= math.log(TINY.vocab_size) + 1e-9
    ref = _reference_sampled(tmp_path / "store", model, 2)
    for key in ("kept_mass", "kl_store_teacher", "first_is_argmax", "entries"):
        assert fid[key] == pytest.approx(ref[key], rel=1e-9, abs=1e-12), key
    out = "\n".join(lines)
    assert "bytes per token" in out and "log V" in out and "KL(store || teacher)" in out

    # --selection topk: the top-k report, against a float64 reference written out here
    topk = run_demo(cache_dir=cache, config=TINY, corpus_root=corpus, samples=6, max_length=64, selection="topk",
                    fidelity_samples=2, log=lines.append, out=str(tmp_path / "store-topk"))
    assert not topk["built"] and topk["teacher"] == first["teacher"]
    fid = topk["fidelity"]
    assert fid["mode"] == "topk" and 0 < fid["kept_mass"] <= 1 and fid["positions"] == 2 * 64
    ref = _reference_fidelity(tmp_path / "store-topk", model, 2)
    assert fid["kl_mean_uniform_tail"] == pytest.approx(ref["kl_uniform"], rel=1e-6)
    assert fid["kept_mass"] == pytest.approx(ref["kept_mass"], rel=1e-9)
    assert fid["first_is_argmax"] == ref["first_is_argmax"]
    assert "KL(teacher || store)" in "\n".join(lines)

    again = run_demo(cache_dir=cache, config=TINY, corpus_root=corpus, samples=6, max_length=64,
                     fidelity_samples=2, log=lines.append, out=str(tmp_path / "store2"))
    assert not again["built"] and again["fidelity"] == first["fidelity"]  # same teacher, same seed, same store


@torch.inference_mode()
def _reference_sampled(path, model, n):
    """A sampled store against the dense float64 teacher, position by position: q = count / draws."""
    from labelstore import LabelStore

    store = LabelStore(path)
    S = store.meta["selection"]["samples"]
    kept, rkl, first, entries = [], [], [], []
    for i in range(n):
        s = store[i]
        p = torch.softmax(model(input_ids=s.input_ids[None]).logits[0].double(), -1)
        for t in range(p.shape[0]):
            c = int(s.counts[t])
            ids = [int(x) for x in s.ids[t, :c]]
            q = [float(x) for x in s.probs[t, :c]]
            draws = [qj * S for qj in q]  # each stored frequency is a whole number of the S draws, all stored
            assert all(abs(d - round(d)) < 1e-4 and round(d) >= 1 for d in draws) and round(sum(draws)) == S
            kept.append(sum(float(p[t, j]) for j in ids))
            rkl.append(sum(qj * (math.log(qj) - math.log(float(p[t, j]))) for qj, j in zip(q, ids)))
            best = max(range(c), key=lambda e: (q[e], -e))
            first.append(float(ids[best] == int(p[t].argmax())))
            entries.append(c)
    assert S == 16
    return {"kept_mass": np.mean(kept), "kl_store_teacher": np.mean(rkl), "first_is_argmax": np.mean(first),
            "entries": np.mean(entries)}


@torch.inference_mode()
def _reference_fidelity(path, model, n):
    """Dense float64 KL(teacher || kept + uniform tail), kept mass and first-entry agreement, written out here."""
    from labelstore import LabelStore

    store = LabelStore(path)
    V = store.vocab_size
    kl, kept, agree = [], [], []
    for i in range(n):
        s = store[i]
        p = torch.softmax(model(input_ids=s.input_ids[None]).logits[0].double(), -1)
        for t in range(p.shape[0]):
            c = int(s.counts[t])
            ids, probs = s.ids[t, :c], s.probs[t, :c].double()
            q = torch.full((V,), float(s.tail[t]) / (V - c), dtype=torch.float64)
            q[ids] = probs
            kl.append(float((p[t] * (p[t].log() - q.log())).sum()))
            kept.append(float(p[t, ids].sum()))
            agree.append(float(int(ids[0]) == int(p[t].argmax())))
    return {"kl_uniform": sum(kl) / len(kl), "kept_mass": sum(kept) / len(kept),
            "first_is_argmax": sum(agree) / len(agree)}


def test_demo_teacher_is_deterministic(tmp_path, corpus):
    a = ensure_demo_teacher(tmp_path / "a", TINY, log=lambda _: None, root=corpus)
    b = ensure_demo_teacher(tmp_path / "b", TINY, log=lambda _: None, root=corpus)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_failed_build_leaves_no_cache_entry(tmp_path, corpus, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(demo_model, "train_model", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        ensure_demo_teacher(tmp_path / "c", TINY, log=lambda _: None, root=corpus)
    assert list((tmp_path / "c").iterdir()) == []


def test_cache_names_separate_configurations():
    assert DemoConfig().cache_name() == "demo-teacher-v1"
    assert TINY.cache_name().startswith("demo-teacher-v1-") and TINY.cache_name() != DemoConfig().cache_name()


def test_the_demo_trains_in_float32_where_bf16_is_not_native(monkeypatch):
    """bf16 autocast is emulated (about 12x slower) on CPUs without AVX512-BF16/AMX: the default demo teacher is
    then the float32-trained one, under its own cache name."""
    monkeypatch.setattr(demo_model, "native_bf16", lambda: True)
    assert demo_model.default_config() == DemoConfig() and DemoConfig().bf16_autocast
    monkeypatch.setattr(demo_model, "native_bf16", lambda: False)
    fp32 = demo_model.default_config()
    assert not fp32.bf16_autocast and fp32.cache_name() != DemoConfig().cache_name()

