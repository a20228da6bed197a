"""`labelstore compile --selection topp|sample|topk+sample` against `labelstore_kernels.extract` run directly.

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
}


@pytest.mark.parametrize("mode", list(MODES))
def test_stored_entries_equal_extract_on_a_direct_forward(env, tmp_path, mode):
    kw, selection, codec = MODES[mode]
    out = tmp_path / "s"
    compile_store(opts(env, out, **kw))
    store = LabelStore(out)
    assert store.meta["selection"] == selection and store.meta["value_codec"]["name"] == codec
    sampled = mode != "topp"
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


def test_sampled_compile_interrupted_and_resumed_equals_an_uninterrupted_one(env, tmp_path):
    """SIGINT (Ctrl-C) half-way, then the same command: the resumed store draws exactly the same samples."""
    kw = ["--selection", "topk+sample", "--k-exact", "2", "--samples", "8", "--seed", "5"]
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
                       (["--selection", "topk", "--log8-step", "2"], "--log8-step must be in (0, 1]")]:
        assert cli_main(base + extra) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
