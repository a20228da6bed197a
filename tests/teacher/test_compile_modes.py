"""`labelstore compile --selection topp|sample|topk+sample|adaptive` against `labelstore_kernels.extract` run directly.

The reference is a direct forward of the same teacher on the same tokens (one unpadded sequence per forward,
exactly like the compile's batches here, so the logits are bit-identical), then ``extract`` with the store's
selection, codec, seed and the global row ids ``sample_id * max_length + position``. The stored bytes must
equal its output exactly: same ids, same value bytes (codec codes or draw counts), same tails.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _teachers import (
    interrupt_compile,
    load_model,
    make_documents,
    make_tokenizer,
    raw_rows_differences,
    raw_store_rows,
    save_teacher,
    write_corpus,
)

from labelstore.cli import main as cli_main
from labelstore.codecs import get_codec
from labelstore.store.reader import LabelStore
from labelstore.store.verify import verify_store
from labelstore.teacher.compile import CompileOptions, compile_store
from labelstore_kernels import extract

L = 32  # max_length; tokens_per_batch = L: one unpadded sequence per forward


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("modes")
    tok = make_tokenizer()
    write_corpus(base / "corpus", make_documents(16, seed=3))
    return {"base": base, "teacher": save_teacher(base / "llama", "llama", tok, extra_vocab=5),
            "corpus": base / "corpus"}


def opts(env, out, **kw) -> CompileOptions:
    base = dict(teacher=str(env["teacher"]), data=[str(env["corpus"])], out=str(out), selection="topk", k=8,
                max_length=L, tokens_per_batch=L, device="cpu", progress=False)
    base.update(kw)
    if base["selection"] in ("sample", "topk+sample") and "k" not in kw:  # --k sizes topk/topp stores only
        del base["k"]
    return CompileOptions(**base)


MODES = {
    "topp": (dict(selection="topp", k=24, top_p=0.1, min_k=2),
             {"mode": "topp", "k": 24, "p": 0.1, "min_k": 2}, "log8"),
    "sample": (dict(selection="sample", samples=12, seed=7),
               {"mode": "sample", "k": 12, "samples": 12}, "count8"),
    "topk+sample": (dict(selection="topk+sample", k_exact=3, samples=6, seed=11, codec="e4m3"),
                    {"mode": "topk+sample", "k_exact": 3, "samples": 6, "k": 9}, "e4m3"),
    # --k is the mean per position; one sample per forward, so extract's default group (all rows) is the sample
    "adaptive": (dict(selection="adaptive", k=3, max_k=16),
                 {"mode": "adaptive", "k": 16, "mean_k": 3}, "log8"),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_stored_entries_equal_extract_on_a_direct_forward(env, tmp_path, mode):
    kw, selection, codec = MODES[mode]
    out = tmp_path / "s"
    compile_store(opts(env, out, **kw))
    store = LabelStore(out)
    assert store.meta["selection"] == selection and store.meta["value_codec"]["name"] == codec
    sampled = mode in ("sample", "topk+sample")
    assert store.meta["compile_config"].get("seed") == (kw["seed"] if sampled else None)
    assert ("tail_prior" in store.manifest) == (mode != "sample")  # a pure sample store has no tail to spread
    assert verify_store(out)["ok"]
    rows = raw_store_rows(out)
    assert sorted(rows) == list(range(len(store)))
    model = load_model(env["teacher"])
    varied = 0
    for sid, row in rows.items():
        x = torch.from_numpy(row["input_ids"])[None]
        with torch.inference_mode():
            logits = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits[0]
        T = logits.shape[0]
        ex = extract(logits, selection, temperature=1.0, codec=codec, seed=kw.get("seed", 0),
                     row_ids=sid * L + np.arange(T, dtype=np.int64))
        c = ex.counts.numpy()
        keep = np.arange(ex.ids.shape[1])[None, :] < c[:, None]
        np.testing.assert_array_equal(row["counts"], c, err_msg=f"sample {sid}")
        np.testing.assert_array_equal(row["ids"], ex.ids.numpy()[keep], err_msg=f"sample {sid}")
        np.testing.assert_array_equal(row["values"], ex.values.numpy()[keep].reshape(-1), err_msg=f"sample {sid}")
        if mode == "sample":
            assert row["tail"].size == 0
            assert (ex.values.numpy().astype(int).sum(1) == kw["samples"]).all()  # counts sum to S per position
        else:
            np.testing.assert_array_equal(row["tail"], ex.tail.numpy(), err_msg=f"sample {sid}")
        varied += int(len(set(c.tolist())) > 1)
        if mode == "adaptive":  # the per-sample budget, and the argmax first
            assert c.sum() <= 3 * T and (c >= 1).all()
            np.testing.assert_array_equal(ex.ids[:, 0].numpy(), logits.argmax(1).numpy())
    assert varied > 0  # variable-length positions really occur (the test would not see a counts mix-up else)


def test_log8_step_is_recorded_and_stored_values_are_that_codecs_codes(env, tmp_path):
    """``--log8-step 0.5``: the store's codec records the step, its value bytes are exactly what the extraction
    with that codec writes, and the decoded weights are within half a step (in log space) of the teacher's."""
    out = tmp_path / "coarse"
    compile_store(opts(env, out, k=6, log8_step=0.5))
    store = LabelStore(out)
    assert store.meta["value_codec"] == {"name": "log8", "params": {"step": 0.5}}
    codec = get_codec("log8", step=0.5)
    model = load_model(env["teacher"])
    coarse = 0
    for sid, row in raw_store_rows(out).items():
        x = torch.from_numpy(row["input_ids"])[None]
        with torch.inference_mode():
            logits = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits[0]
        ex = extract(logits, {"mode": "topk", "k": 6}, codec=codec)
        np.testing.assert_array_equal(row["values"], ex.values.numpy().reshape(-1), err_msg=f"sample {sid}")
        np.testing.assert_array_equal(row["ids"], ex.ids.numpy().reshape(-1), err_msg=f"sample {sid}")
        lp = torch.log_softmax(logits.double(), -1)
        r = lp.gather(1, ex.ids.long()) - lp.max(-1, keepdim=True).values  # log p - log p_max, float64
        w = torch.from_numpy(codec.decode_numpy(row["values"]).reshape(r.shape)).double()
        assert (torch.log(w) - r).abs().max() <= 0.25 + 1e-6
        coarse += int((row["values"] % 8 != 0).sum())  # codes of a 1/16 step would not all be multiples
    assert coarse > 0
    # resuming with another step is another store: refused, naming the codec
    with pytest.raises(Exception, match="value_codec"):
        compile_store(opts(env, out, k=6, log8_step=0.25))


@pytest.mark.parametrize("kw", [["--selection", "topk+sample", "--k-exact", "2", "--samples", "8", "--seed", "5"],
                                ["--selection", "adaptive", "--k", "3", "--max-k", "10"]], ids=["sampled", "adaptive"])
def test_compile_interrupted_and_resumed_equals_an_uninterrupted_one(env, tmp_path, kw):
    """SIGINT (Ctrl-C) half-way, then the same command: the resumed store draws exactly the same samples (sampled
    modes) and allocates exactly the same entries (adaptive: the recomputed batch holds whole samples)."""
    out = tmp_path / "resumed"
    args = ["compile", "--teacher", str(env["teacher"]), "--data", str(env["corpus"]), "--out", str(out),
            "--max-length", str(L), "--tokens-per-batch", str(L), "--device", "cpu", "--shard-mb", "0.002",
            "--quiet", *kw]
    returncode, err = interrupt_compile(args, out, tmp_path, after_commits=2)
    assert returncode == 130, err
    assert "rerun the same command to resume" in err
    assert not (out / "manifest.json").exists()
    assert cli_main(args) == 0  # the same command resumes and finishes
    clean = tmp_path / "clean"
    assert cli_main([a if a != str(out) else str(clean) for a in args]) == 0
    assert raw_rows_differences(raw_store_rows(out), raw_store_rows(clean)) == []
    assert verify_store(out)["ok"]


def test_invalid_selection_settings_are_refused(env, tmp_path, capsys):
    base = ["compile", "--teacher", str(env["teacher"]), "--data", str(env["corpus"]), "--out", str(tmp_path / "s"),
            "--device", "cpu", "--quiet"]
    for extra, msg in [(["--selection", "sample", "--codec", "log8"], "codec is count8"),
                       (["--selection", "topk", "--codec", "count8"], "count8 belongs to --selection sample"),
                       (["--selection", "topp", "--top-p", "1.5"], "--top-p must be in"),
                       (["--selection", "sample", "--samples", "300"], "--samples must be in"),
                       (["--selection", "topk+sample", "--codec", "fp16"], "1-byte codec"),
                       (["--log8-step", "0.5"], "--log8-step sets the log8 codec's step"),
                       (["--selection", "topk", "--codec", "e4m3", "--log8-step", "0.5"], "pass --codec log8"),
                       (["--selection", "topk", "--log8-step", "2"], "--log8-step must be in (0, 1]"),
                       (["--selection", "adaptive", "--k", "40", "--max-k", "20"],
                        "--k 40 (the mean entries per position) must be at most --max-k"),
                       (["--selection", "adaptive", "--max-k", "5000"], "--max-k must be in [1, 4096]"),
                       (["--selection", "topk", "--max-k", "8"], "--max-k sizes --selection adaptive stores only"),
                       (["--selection", "adaptive", "--codec", "count8"], "count8 belongs to --selection sample")]:
        assert cli_main(base + extra) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


# --------------------------------------------------------------------------------------------- adaptive
def test_adaptive_store_is_the_same_whatever_the_batching(env, tmp_path):
    """The budget is per sample: several samples per forward (and other batch sizes) store the same entries, and
    each sample's mean entries stay within --k. The teacher's own numerics may change with the batch (the short
    last sequence is padded when it shares a forward, and its top-k tail moves by an ulp), so the topk stores of
    the same batchings say which samples saw the same logits: those must store the same adaptive entries."""
    batchings = (1, 3, 5)
    topk = [raw_store_rows(_compile(env, tmp_path / f"t{n}", selection="topk", k=12, tokens_per_batch=n * L))
            for n in batchings]
    same = [sid for sid in topk[0] if all(raw_rows_differences({sid: topk[0][sid]}, {sid: t[sid]}) == []
                                          for t in topk[1:])]
    assert len(same) >= len(topk[0]) - 1  # all but the short last sequence
    kw = dict(selection="adaptive", k=3, max_k=12)
    rows = [raw_store_rows(_compile(env, tmp_path / f"a{n}", tokens_per_batch=n * L, **kw)) for n in batchings]
    for other in rows[1:]:
        assert raw_rows_differences({s: rows[0][s] for s in same}, {s: other[s] for s in same}) == []
    for row in rows[0].values():
        assert row["counts"].sum() <= 3 * row["counts"].size and row["counts"].min() >= 1
    assert len({int(c) for row in rows[0].values() for c in row["counts"]}) > 3


def _compile(env, out, **kw):
    compile_store(opts(env, out, **kw))
    return out


def test_adaptive_resume_with_other_settings_is_refused_and_info_shows_it(env, tmp_path, capsys):
    out = tmp_path / "s"
    base = ["compile", "--teacher", str(env["teacher"]), "--data", str(env["corpus"]), "--out", str(out),
            "--max-length", str(L), "--tokens-per-batch", str(L), "--device", "cpu", "--quiet",
            "--selection", "adaptive", "--k", "4"]
    assert cli_main(base) == 0
    assert LabelStore(out).meta["selection"] == {"mode": "adaptive", "k": 16, "mean_k": 4}  # --max-k: 4 x --k
    capsys.readouterr()
    for other, what in [(["--k", "5"], "selection"), (["--max-k", "8"], "selection")]:
        args = base[:-2] + ["--k", "4"] + other if other[0] == "--max-k" else base[:-2] + other
        assert cli_main(args) == 1
        err = capsys.readouterr().err
        assert what in err and "write to a new --out" in err, err
    assert cli_main(base) == 0  # the same settings: nothing left to do, accepted
    assert cli_main(["info", str(out)]) == 0
    assert "selection       adaptive k=16 mean_k=4" in capsys.readouterr().out


def test_adaptive_store_feeds_the_student_side(env, tmp_path):
    """Variable counts like topp: the collator's sparse targets, dense targets (uniform and the tail prior's
    water-filling, docs/FORMAT.md 5c) and the sparse KL all read it; checked against a dense float64 reference."""
    from labelstore.student.dataset import StoreDataset
    from labelstore.student.losses import sparse_kl

    out = _compile(env, tmp_path / "s", selection="adaptive", k=2, max_k=10)
    store = LabelStore(out)
    assert store.tail_prior() is not None
    ds = StoreDataset(out)
    V = store.meta["vocab_size"]
    items = [ds[i] for i in range(4)]
    for prior in (None, store.tail_prior()):
        batch = ds.collator(dense=True, prior=prior)(items)
        ids, probs, tail, mask = (batch[k] for k in ("teacher_ids", "teacher_probs", "teacher_tail", "teacher_mask"))
        dense = batch["teacher_dense"].double()
        pos = batch["position_mask"]
        assert len(set(mask.sum(-1)[pos].tolist())) > 1  # counts vary per position
        assert torch.allclose(dense.sum(-1)[pos], torch.ones(int(pos.sum()), dtype=torch.float64), atol=1e-5)
        kept = torch.zeros_like(dense, dtype=torch.int64).scatter_add_(-1, ids, mask.long()) > 0  # padding: id 0
        assert torch.allclose(dense.gather(-1, ids)[mask], probs.double()[mask], rtol=1e-5, atol=1e-8)
        n = mask.sum(-1, keepdim=True).double()
        rest = torch.where(kept, 0.0, dense)
        if prior is None:  # uniform: the tail over the V - count other tokens
            want = torch.where(kept, 0.0, tail.double()[..., None] / (V - n))
            assert torch.allclose(rest[pos], want[pos], rtol=1e-5, atol=1e-9)
        else:  # water-filling: no other token above the smallest kept probability, and the tail all placed
            p_min = torch.where(mask, probs, 2.0).amin(-1).double()
            assert (rest.amax(-1)[pos] <= p_min[pos] * (1 + 1e-5)).all()
            assert torch.allclose(rest.sum(-1)[pos], tail.double()[pos], rtol=1e-4, atol=1e-7)
        student = torch.randn(*dense.shape, generator=torch.Generator().manual_seed(1))
        loss = sparse_kl(student, ids, probs, tail, mask, pos, tail="uniform" if prior is None else "prior",
                         prior=prior, reduction="none")
        logq = torch.log_softmax(student.double(), -1)
        ref = (torch.xlogy(dense, dense) - dense * logq).sum(-1)
        assert torch.allclose(loss.double()[pos], ref[pos], rtol=1e-4, atol=1e-5)
