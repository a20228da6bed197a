"""Fused LM-head extraction (from the final hidden states, no [N, V] logits) against the materialised path.

Reference: ``model(...).logits`` of the same tiny teacher, then ``extract`` with the same selection, codec, seed
and row ids. Tolerances of issue 14: identical ids and counts wherever the logits have no ties within float
tolerance, value codes within one codec step, tails within 1e-5 relative. Architectures: Llama (untied and
tied), GPT-NeoX (untied), GPT-2 (tied), Gemma 2 (tied, final logit soft-capping) and Cohere (logit scale).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _teachers import make_documents, make_tokenizer, raw_store_rows, save_teacher, write_corpus

from labelstore.store.reader import LabelStore
from labelstore.teacher.compile import CompileOptions, compile_store
from labelstore.teacher.head import HeadUnsupportedError, body_hidden, plan_head, read_head
from labelstore_kernels import extract, extract_fused

pytestmark = pytest.mark.usefixtures("one_thread")

V_TOK = 300  # tokens of the tiny models; some heads get padding rows beyond it
TIE_TOL = 1e-5  # logits closer than this are "tied within float tolerance"


def _build(arch: str, V: int):
    import transformers as tf

    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.3, bos_token_id=0,
                  eos_token_id=0, pad_token_id=0)
    if arch == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common, tie_word_embeddings=False))
    if arch == "llama-tied":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common, tie_word_embeddings=True))
    if arch == "neox":
        return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                                      num_hidden_layers=2, num_attention_heads=2,
                                                      max_position_embeddings=128, initializer_range=0.3,
                                                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0))
    if arch == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=128,
                                                n_inner=64, initializer_range=0.3, bos_token_id=0,
                                                eos_token_id=0))
    if arch == "gemma2":  # soft-cap small enough that tanh bends these logits
        return tf.Gemma2ForCausalLM(tf.Gemma2Config(**common, head_dim=16, final_logit_softcapping=3.0,
                                                    query_pre_attn_scalar=16, sliding_window=16))
    if arch == "cohere":
        return tf.CohereForCausalLM(tf.CohereConfig(**common, logit_scale=0.5))
    raise ValueError(arch)


ARCHS = ["llama", "llama-tied", "neox", "gpt2", "gemma2", "cohere"]
MODES = {
    "topk": ({"mode": "topk", "k": 8}, "log8"),
    "topp": ({"mode": "topp", "k": 24, "p": 0.3, "min_k": 2}, "log8"),
    "sample": ({"mode": "sample", "k": 12, "samples": 12}, "count8"),
    "topk+sample": ({"mode": "topk+sample", "k_exact": 3, "samples": 6, "k": 9}, "e4m3"),
    "argmax": ({"mode": "argmax", "k": 1}, "none"),
}


@pytest.fixture(scope="module")
def models():
    out = {}
    for i, arch in enumerate(ARCHS):
        torch.manual_seed(i)
        out[arch] = _build(arch, V_TOK + 5).eval()
    return out


def near_tie_rows(z: torch.Tensor, width: int) -> np.ndarray:
    """Rows where two of the ``width + 1`` largest logits are within :data:`TIE_TOL` (their order is float noise)."""
    top = torch.topk(z.double(), min(width + 1, z.shape[1]), dim=1).values
    return ((top[:, :-1] - top[:, 1:]) < TIE_TOL).any(1).numpy()


def assert_agree(ex_f, ex_m, z, selection, codec):
    n = z.shape[0]
    sampled = "samples" in selection
    skip = np.zeros(n, bool) if sampled else near_tie_rows(z, selection["k"])
    ok = ~skip
    assert ok.mean() > 0.8  # the comparison covers most rows
    np.testing.assert_array_equal(ex_f.counts.numpy()[ok], ex_m.counts.numpy()[ok])
    np.testing.assert_array_equal(ex_f.ids.numpy()[ok], ex_m.ids.numpy()[ok])
    vf, vm = ex_f.values.numpy()[ok].astype(int), ex_m.values.numpy()[ok].astype(int)
    if codec == "count8":
        np.testing.assert_array_equal(vf, vm)
    elif codec == "e4m3" or codec == "log8":  # sampled part of topk+sample: draw counts, exact
        ke = selection.get("k_exact", selection["k"])
        assert np.abs(vf[:, :ke] - vm[:, :ke]).max(initial=0) <= 1
        np.testing.assert_array_equal(vf[:, ke:], vm[:, ke:])
    np.testing.assert_allclose(ex_f.tail.numpy()[ok], ex_m.tail.numpy()[ok], rtol=1e-5, atol=1e-30)
    np.testing.assert_allclose(ex_f.lse.numpy(), ex_m.lse.numpy(), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_equals_materialised_every_mode(models, arch):
    model = models[arch]
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V_TOK, (3, 20), generator=g)
    m = torch.ones_like(x)
    m[2, 13:] = 0  # a padded sequence: its padding rows are dropped before extraction, as in the compile
    real = m.reshape(-1).nonzero().flatten()
    head, why = read_head(model)
    assert head is not None, why
    assert plan_head(model, "fused", probe_ids=x[0], device=torch.device("cpu")).fused
    if arch == "gemma2":
        assert head.softcap == 3.0
    if arch == "cohere":
        assert head.scale == 0.5
    with torch.inference_mode():
        z = model(input_ids=x, attention_mask=m, use_cache=False).logits.reshape(-1, V_TOK + 5)[real]
        h = body_hidden(model, x, m).reshape(-1, 32)[real]
    if arch == "gemma2":
        assert z.abs().max() < 3.0 and z.abs().max() > 1.5  # the cap is active
    rid = np.arange(z.shape[0], dtype=np.int64) * 7 + 3
    for sel, codec in MODES.values():
        ex_m = extract(z, sel, codec=codec, seed=5, row_ids=rid, backend="torch")
        # 7 rows per block: several blocks, one of them partial
        ex_f = extract_fused(h, head, sel, codec=codec, seed=5, row_ids=rid, backend="torch",
                             block_elems=7 * (V_TOK + 5))
        assert_agree(ex_f, ex_m, z, sel, codec)


def test_vocabulary_padding_masked_only_when_asked(models):
    model = models["llama"]
    x = torch.randint(0, V_TOK, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        h = body_hidden(model, x, torch.ones_like(x))[0]
    sel = {"mode": "topk", "k": V_TOK + 5}
    plain, _ = read_head(model)
    masked, _ = read_head(model, valid_vocab=V_TOK)
    ex = extract_fused(h, plain, sel, backend="torch")
    exm = extract_fused(h, masked, sel, backend="torch")
    assert (ex.counts == V_TOK + 5).all() and (exm.counts == V_TOK).all()
    assert (exm.ids[:, :V_TOK] < V_TOK).all()
    # the masked distribution is the plain one renormalised over the tokenizer's ids
    z = torch.nn.functional.linear(h, plain.weight.detach()).double()
    ref = torch.logsumexp(z[:, :V_TOK], 1)
    np.testing.assert_allclose(exm.lse.numpy(), ref.numpy(), rtol=1e-6)


class _DoubledHead(torch.nn.Linear):
    """A head that post-processes its logits in a way labelstore cannot know."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_unknown_head_falls_back_with_a_notice(models, capsys):
    model = _build("llama", V_TOK + 5).eval()
    old = model.lm_head
    model.lm_head = _DoubledHead(32, V_TOK + 5, bias=False)
    model.lm_head.weight = old.weight
    x = torch.randint(0, V_TOK, (12,))
    hp = plan_head(model, "auto", probe_ids=x, device=torch.device("cpu"))
    assert not hp.fused and hp.head is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "materialised logits" in err and "differ from model(...).logits" in err
    with pytest.raises(HeadUnsupportedError, match="--lm-head fused needs"):
        plan_head(model, "fused", probe_ids=x, device=torch.device("cpu"))
    with pytest.raises(HeadUnsupportedError, match="--head-dtype float32 needs"):
        plan_head(model, "auto", head_dtype="float32", probe_ids=x, device=torch.device("cpu"))
    # a known head passes the same probe silently
    assert plan_head(models["llama"], "auto", probe_ids=x, device=torch.device("cpu")).fused
    assert capsys.readouterr().err == ""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("fused")
    tok = make_tokenizer()
    write_corpus(base / "corpus", make_documents(10, seed=4))
    return {"tok": tok, "corpus": base / "corpus", "base": base}


@pytest.mark.parametrize("arch,kw", [("llama", dict(selection="topk+sample", k_exact=3, samples=6, seed=2)),
                                     ("gpt2", dict(selection="topk", k=8, tokens_per_batch=100))])
def test_fused_store_equals_materialised_store(env, tmp_path, arch, kw):
    """Whole compiles (padded batches for gpt2, several row blocks): same rows, same tail prior."""
    teacher = save_teacher(env["base"] / arch, arch, env["tok"], extra_vocab=3)
    stores = {}
    for mode in ("fused", "materialized"):
        out = tmp_path / mode
        compile_store(CompileOptions(teacher=str(teacher), data=[str(env["corpus"])], out=str(out), max_length=32,
                                     device="cpu", progress=False, lm_head=mode, **{"tokens_per_batch": 32, **kw}))
        stores[mode] = raw_store_rows(out)
    a, b = stores["fused"], stores["materialized"]
    assert sorted(a) == sorted(b) and len(a) > 3
    for sid in a:
        np.testing.assert_array_equal(a[sid]["counts"], b[sid]["counts"])
        np.testing.assert_array_equal(a[sid]["ids"], b[sid]["ids"])
        assert np.abs(a[sid]["values"].astype(int) - b[sid]["values"].astype(int)).max() <= 1
        np.testing.assert_allclose(a[sid]["tail"], b[sid]["tail"], rtol=1e-5)
    pa, pb = LabelStore(tmp_path / "fused").tail_prior(), LabelStore(tmp_path / "materialized").tail_prior()
    np.testing.assert_allclose(pa, pb, rtol=1e-5, atol=1e-12)


def test_head_settings_are_recorded_and_change_the_labels_only_as_asked(env, tmp_path):
    """--mask-vocab-padding keeps ids below the tokenizer's size; --head-dtype float32 is recorded (a resume
    with another head setting is refused); on a float32 teacher the float32 head gives the same labels."""
    from labelstore.errors import ConfigMismatchError

    teacher = save_teacher(env["base"] / "padded", "llama", env["tok"], extra_vocab=40)
    base = dict(teacher=str(teacher), data=[str(env["corpus"])], max_length=32, tokens_per_batch=32,
                selection="topk", k=64, device="cpu", progress=False)
    compile_store(CompileOptions(out=str(tmp_path / "plain"), **base))
    compile_store(CompileOptions(out=str(tmp_path / "masked"), mask_vocab_padding=True, **base))
    compile_store(CompileOptions(out=str(tmp_path / "f32"), head_dtype="float32", **base))
    plain, masked, f32 = (raw_store_rows(tmp_path / n) for n in ("plain", "masked", "f32"))
    n_tok = len(env["tok"])
    assert any((r["ids"] >= n_tok).any() for r in plain.values())  # padding rows do get mass unmasked
    assert all((r["ids"] < n_tok).all() for r in masked.values())
    for sid in plain:
        np.testing.assert_array_equal(plain[sid]["ids"], f32[sid]["ids"])
        np.testing.assert_array_equal(plain[sid]["values"], f32[sid]["values"])
    cfg = LabelStore(tmp_path / "f32").meta["compile_config"]
    assert cfg["head_dtype"] == "float32" and "head_dtype" not in LabelStore(tmp_path / "plain").meta["compile_config"]
    assert LabelStore(tmp_path / "masked").meta["compile_config"]["mask_vocab_padding"] is True
    with pytest.raises(ConfigMismatchError, match="head_dtype"):
        compile_store(CompileOptions(out=str(tmp_path / "plain"), head_dtype="float32", **base))
