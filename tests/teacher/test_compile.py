"""`labelstore compile` against independent references: a dense softmax of the same teacher on the same tokens.

Teachers are tiny random Llama-style and GPT-2-style models saved with ``save_pretrained`` in temporary
folders; the code under test loads them through ``from_pretrained``. Near-ties are the only allowed
disagreement on ids: the batched forward and the unbatched reference may differ in the last float bits.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _teachers import (
    Interrupt,
    dense_logprobs,
    interrupt_after,
    load_model,
    make_documents,
    make_tokenizer,
    save_teacher,
    write_corpus,
)

from labelstore.cli import main as cli_main
from labelstore.codecs import get_codec
from labelstore.errors import ConfigMismatchError, InputDataError, InvalidLogitsError
from labelstore.store.reader import LabelStore
from labelstore.store.verify import verify_store
from labelstore.teacher.compile import CompileOptions, compile_store
from labelstore.tools.fidelity import kl_to_reconstruction

REPO = Path(__file__).resolve().parents[2]
TIE = 1e-4  # log-prob gap under which two tokens count as tied between batched and unbatched forwards


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("compile")
    tok = make_tokenizer()
    docs = make_documents(60, seed=1)
    env = {
        "base": base,
        "tok": tok,
        "docs": docs,
        "llama": save_teacher(base / "llama", "llama", tok, extra_vocab=13),
        "gpt2": save_teacher(base / "gpt2", "gpt2", tok),
        "corpus": base / "corpus",
    }
    write_corpus(env["corpus"], docs)
    return env


def opts(env, out, **kw) -> CompileOptions:
    base = dict(teacher=str(env["llama"]), data=[str(env["corpus"])], out=str(out), selection="topk", k=8,
                max_length=64, tokens_per_batch=256, device="cpu", progress=False)
    base.update(kw)
    if base["selection"] in ("sample", "topk+sample") and "k" not in kw:  # --k sizes topk/topp stores only
        del base["k"]
    return CompileOptions(**base)


def store_rows(path) -> dict[int, tuple]:
    """Every stored sample by id, as plain arrays (what two equal stores must share)."""
    s = LabelStore(path)
    rows = {}
    for i in range(len(s)):
        x = s[i]
        rows[x.sample_id] = tuple(t.numpy().copy() for t in (x.input_ids, x.ids, x.probs, x.tail, x.counts,
                                                              x.doc_starts))
    return rows


def assert_same_rows(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for sid in a:
        for x, y in zip(a[sid], b[sid]):
            np.testing.assert_array_equal(x, y, err_msg=f"sample {sid}")


def raw_prior(path) -> np.ndarray:
    """The store's tail prior as written (the teacher's mean distribution, before the reader's mix)."""
    return np.fromfile(Path(path) / "tail_prior.f32", dtype="<f4")


def snapshot(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


def reference_stream(tok, docs) -> list[int]:
    return [t for d in docs for t in list(tok(d)["input_ids"]) + [tok.eos_token_id]]


# ------------------------------------------------------------------------------------------ fidelity
@pytest.mark.parametrize("arch,pack,codec", [("llama", True, "log8"), ("gpt2", False, "log8"),
                                             ("gpt2", True, "fp16")])
def test_stored_labels_match_the_dense_teacher(env, tmp_path, arch, pack, codec):
    k, L = 8, 64
    res = compile_store(opts(env, tmp_path / "s", teacher=str(env[arch]), pack=pack, codec=codec, k=k,
                             max_length=L))
    store = LabelStore(tmp_path / "s")
    model = load_model(env[arch])
    V = model.get_output_embeddings().weight.shape[0]
    assert store.meta["vocab_size"] == V and store.meta["selection"] == {"mode": "topk", "k": k}
    assert res.samples == len(store) and res.tokens == store.num_tokens
    samples = sorted((store[i] for i in range(len(store))), key=lambda s: s.sample_id)
    assert [s.sample_id for s in samples] == list(range(len(store)))

    # Input tokens: packed = one EOS-separated stream cut every L tokens; truncated = one document each.
    if pack:
        stream = reference_stream(env["tok"], env["docs"])
        assert np.concatenate([s.input_ids.numpy() for s in samples]).tolist() == stream
        assert all(len(s.input_ids) == L for s in samples[:-1])
    else:
        want = [(list(env["tok"](d)["input_ids"]) + [env["tok"].eos_token_id])[:L] for d in env["docs"]]
        assert [s.input_ids.tolist() for s in samples] == want  # no padding position stored

    step = get_codec(codec).param.get("step", 0.0)
    log_tol = step + 1e-3 if codec == "log8" else 2e-3  # |log p_store - log p| bound of the codec
    kl_gap = []
    mass = torch.zeros(V, dtype=torch.float64)
    for s in samples:
        lp = dense_logprobs(model, s.input_ids)
        mass += lp.exp().sum(0)
        top = torch.topk(lp, k, dim=-1)
        assert (s.counts == k).all()
        # ids: exact top-k of the dense softmax, up to near-ties
        mism = s.ids != top.indices
        if mism.any():
            got = lp.gather(1, s.ids)
            assert torch.allclose(got[mism], top.values[mism], atol=TIE), f"sample {s.sample_id}: wrong ids"
        # tail: exact mass outside the stored ids
        kept_ref = lp.exp().gather(1, s.ids).sum(-1)
        torch.testing.assert_close(s.tail.double(), 1 - kept_ref, rtol=1e-4, atol=1e-6)
        # probabilities: within the codec's error
        err = (torch.log(s.probs.double()) - lp.gather(1, s.ids)).abs().max()
        assert err <= log_tol, f"sample {s.sample_id}: log-prob error {err:.4f} > {log_tol}"
        # KL to the teacher: the codec adds almost nothing over an exact top-k with the same tail
        logits = lp.float()
        stored = kl_to_reconstruction(logits, s.ids, s.probs, s.tail, s.counts)["kl"]
        exact = kl_to_reconstruction(logits, top.indices, top.values.exp().float(),
                                     (1 - top.values.exp().sum(-1)).float())["kl"]
        kl_gap.append(stored - exact)
    assert float(np.mean(np.concatenate(kl_gap))) < (2e-3 if codec == "log8" else 1e-5)
    # the tail prior: the teacher's mean next-token distribution over every stored position
    np.testing.assert_allclose(raw_prior(tmp_path / "s"), (mass / store.num_tokens).numpy(), rtol=1e-4, atol=1e-9)
    # `info`'s bytes on disk: every file a reader needs, the prior included
    from labelstore.store.info import summary

    root = tmp_path / "s"
    files = [*root.glob("shards/*.arrow"), root / "manifest.json", root / "index.arrow", root / "tail_prior.f32",
             root / "config.json"]
    assert all(f.is_file() for f in files)
    assert summary(root)["bytes_on_disk"] == sum(f.stat().st_size for f in files)


def test_hard_labels_are_the_teacher_argmax(env, tmp_path):
    compile_store(opts(env, tmp_path / "hard", teacher=str(env["gpt2"]), hard_labels=True))
    compile_store(opts(env, tmp_path / "soft", teacher=str(env["gpt2"])))
    hard = LabelStore(tmp_path / "hard")
    assert hard.meta["label_kind"] == "hard" and hard.meta["value_codec"]["name"] == "none"
    model = load_model(env["gpt2"])
    for i in range(len(hard)):
        s = hard[i]
        lp = dense_logprobs(model, s.input_ids)
        assert s.ids.shape[1] == 1 and (s.counts == 1).all()
        best = lp.max(-1).values
        assert torch.allclose(lp.gather(1, s.ids)[:, 0], best, atol=TIE)
    size = {n: sum(p.stat().st_size for p in (tmp_path / n / "shards").iterdir()) for n in ("hard", "soft")}
    assert size["hard"] < size["soft"] / 4
    assert "tail_prior" not in hard.manifest  # no tail to spread


# ------------------------------------------------------------------------------------------ resume
KILLABLE = textwrap.dedent("""
    import sys, time
    import labelstore.teacher.pipeline as c
    slow = c.pad_batch
    def collate(*a, **k):  # slow the compile down so that the test can kill it half-way
        time.sleep(0.05)
        return slow(*a, **k)
    c.pad_batch = collate
    from labelstore.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def cli_args(env, out, **kw) -> list[str]:
    o = opts(env, out, **kw)
    args = ["compile", "--teacher", o.teacher, "--data", *o.data, "--out", o.out,
            "--selection", o.selection, *(["--k", str(o.k)] if o.k is not None else []),
            "--max-length", str(o.max_length), "--tokens-per-batch", str(o.tokens_per_batch),
            "--device", "cpu", "--shard-mb", str(o.shard_mb), "--quiet"]
    return args


def test_sigkill_then_rerun_equals_an_uninterrupted_compile(env, tmp_path):
    out = tmp_path / "killed"
    kw = dict(shard_mb=0.004, tokens_per_batch=64)  # one sequence per batch, a shard every few sequences
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, *cli_args(env, out, **kw)], cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list((out / "commits").glob("r*.json"))) >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"compile ended before it could be killed: {proc.communicate()[0].decode()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()

    resumed = compile_store(opts(env, out, **kw))
    assert resumed.skipped >= 3  # committed sequences were not recomputed
    compile_store(opts(env, tmp_path / "clean", **kw))
    assert_same_rows(store_rows(out), store_rows(tmp_path / "clean"))
    np.testing.assert_allclose(raw_prior(out), raw_prior(tmp_path / "clean"), rtol=1e-6)


def test_torchrun_two_ranks_equal_one(env, tmp_path):
    kw = dict(shard_mb=0.01)
    compile_store(opts(env, tmp_path / "one", **kw))  # one thread, like each rank (OMP_NUM_THREADS=1)
    run_env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "labelstore", *cli_args(env, tmp_path / "two", **kw)]
    p = subprocess.run(cmd, cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    shards = sorted(x.name for x in (tmp_path / "two" / "shards").iterdir())
    assert any(s.startswith("r00000-") for s in shards) and any(s.startswith("r00001-") for s in shards)
    assert_same_rows(store_rows(tmp_path / "one"), store_rows(tmp_path / "two"))
    np.testing.assert_allclose(raw_prior(tmp_path / "one"), raw_prior(tmp_path / "two"), rtol=1e-6)
    # and the same store for a student: rows in the same order, so a seeded loader yields the same batches
    one, two = LabelStore(tmp_path / "one"), LabelStore(tmp_path / "two")
    np.testing.assert_array_equal(one.sample_ids(), two.sample_ids())
    from labelstore import StoreDataset, StoreLoader

    def batches(path):
        return list(StoreLoader(StoreDataset(path), batch_size=3, seed=7, rank=0, world_size=1))

    for a, b in zip(batches(tmp_path / "one"), batches(tmp_path / "two"), strict=True):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def test_rank_batches_split_the_plan_into_contiguous_blocks():
    from labelstore.teacher.batching import rank_batches

    batches = [np.array([i]) for i in range(11)]
    for world in (1, 2, 3, 4, 11, 12):
        blocks = [rank_batches(batches, r, world) for r in range(world)]
        assert [int(b[0]) for block in blocks for b in block] == list(range(11))  # every batch once, in order
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_changed_config_is_refused_and_the_store_left_intact(env, tmp_path):
    out = tmp_path / "s"
    first = compile_store(opts(env, out))
    before = snapshot(out)
    with pytest.raises(ConfigMismatchError, match=r"selection\.k: 8 in the store, 4 now"):
        compile_store(opts(env, out, k=4))
    with pytest.raises(ConfigMismatchError, match=r"temperature"):
        compile_store(opts(env, out, temperature=2.0))
    with pytest.raises(ConfigMismatchError, match=r"compile_config\.data\.sha256"):
        compile_store(opts(env, out, data=[str(p) for p in sorted(env["corpus"].iterdir())[:10]]))
    with pytest.raises(ConfigMismatchError, match=r"teacher\.hash"):
        compile_store(opts(env, out, teacher=str(env["gpt2"])))
    # batch composition changes the teacher's numerics (padding, matmul shapes): a resume must keep it
    with pytest.raises(ConfigMismatchError, match=r"compile_config\.tokens_per_batch: 256 in the store, 1024 now"):
        compile_store(opts(env, out, tokens_per_batch=1024))
    assert snapshot(out) == before
    # the same command again: nothing to do, same store (runtime settings such as the shard size may change)
    again = compile_store(opts(env, out, shard_mb=1.0))
    assert again.samples == 0 and again.skipped == first.samples
    assert store_rows(out).keys() == set(range(first.samples))


def test_a_store_from_before_tokens_per_batch_was_compared_resumes_only_with_its_own(tmp_path):
    """Stores written by 0.1 kept tokens_per_batch under `runtime`: the same value resumes, another is refused."""
    from labelstore.teacher.resume_checks import accept_older_config

    old = {"format_version": 2, "compile_config": {"max_length": 64}, "runtime": {"tokens_per_batch": 256}}
    (tmp_path / "config.json").write_text(json.dumps(old))
    meta = {"compile_config": {"max_length": 64, "tokens_per_batch": 256}}
    accept_older_config(tmp_path, meta)
    assert meta == {"compile_config": {"max_length": 64}}  # now equal to what the store recorded
    with pytest.raises(ConfigMismatchError, match="tokens_per_batch 256, this run asks for 512"):
        accept_older_config(tmp_path, {"compile_config": {"max_length": 64, "tokens_per_batch": 512}})
    new = {"compile_config": {"tokens_per_batch": 512}}
    accept_older_config(tmp_path / "absent", new)  # a new store: nothing to reconcile
    assert new == {"compile_config": {"tokens_per_batch": 512}}


# ------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_get_clear_errors_and_leave_the_store_intact(env, tmp_path, capsys):
    out = tmp_path / "s"
    assert cli_main(cli_args(env, out)) == 0
    before = snapshot(out)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.txt").write_text("")
    (bad / "fields.jsonl").write_text('{"content": "no text field"}\n')
    (bad / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    cases = [
        ([bad / "empty.txt"], InputDataError, "corpus is empty"),
        ([bad / "fields.jsonl"], InputDataError, "has no field 'text'"),
        ([bad / "latin1.txt"], InputDataError, "not valid UTF-8"),
        ([bad / "nowhere.txt"], InputDataError, "does not exist"),
    ]
    for data, err, msg in cases:
        with pytest.raises(err, match=msg):
            compile_store(opts(env, out, data=[str(d) for d in data]))
        assert snapshot(out) == before
    # the CLI reports the same errors as one line on stderr, exit status 1
    assert cli_main(cli_args(env, out)[:4] + [str(bad / "fields.jsonl")] + cli_args(env, out)[5:]) == 1
    assert "labelstore compile: error:" in capsys.readouterr().err
    # a tokenizer that does not belong to the teacher (larger vocabulary than the model's outputs)
    big = make_tokenizer(vocab_size=400)
    big.save_pretrained(tmp_path / "bigtok")
    with pytest.raises(ConfigMismatchError, match="tokenizer has 400 tokens but the teacher's output"):
        compile_store(opts(env, out, tokenizer=str(tmp_path / "bigtok")))
    assert snapshot(out) == before
    assert len(LabelStore(out)) > 0


def test_nan_logits_name_the_sample_and_keep_committed_shards(env, tmp_path):
    tok = env["tok"]
    z = tok.convert_tokens_to_ids("z")
    assert all(z not in tok(d)["input_ids"] for d in env["docs"])
    poison = save_teacher(tmp_path / "nan", "llama", tok, nan_token=z)
    corpus = tmp_path / "corpus"
    write_corpus(corpus, env["docs"] + ["a zebra"])  # only the last document holds the token
    kw = dict(teacher=str(poison), data=[str(corpus)], shard_mb=0.004, tokens_per_batch=64)
    out = tmp_path / "s"
    with pytest.raises(InvalidLogitsError, match=r"invalid logits at sample \d+ position \d+.*NaN"):
        compile_store(opts(env, out, **kw))
    committed = snapshot(out / "shards")
    assert committed and not (out / "manifest.json").exists()
    with pytest.raises(InvalidLogitsError):  # the rerun fails the same way and keeps what was committed
        compile_store(opts(env, out, **kw))
    assert snapshot(out / "shards") == committed
    # an existing store of another teacher is refused before anything runs
    good = tmp_path / "good"
    compile_store(opts(env, good))
    before = snapshot(good)
    with pytest.raises(ConfigMismatchError):
        compile_store(opts(env, good, teacher=str(poison)))
    assert snapshot(good) == before


def test_zstd_encoding_stores_the_same_labels_smaller(env, tmp_path):
    packed = compile_store(opts(env, tmp_path / "p", k=8, max_length=64))
    zstd = compile_store(opts(env, tmp_path / "z", k=8, max_length=64, encoding="zstd"))
    assert packed.tokens == zstd.tokens
    assert LabelStore(tmp_path / "z").meta["encoding"]["name"] == "zstd"
    assert_same_rows(store_rows(tmp_path / "p"), store_rows(tmp_path / "z"))
    size = {name: sum(p.stat().st_size for p in (tmp_path / name / "shards").glob("*.arrow")) for name in "pz"}
    assert size["z"] < size["p"]
    assert verify_store(tmp_path / "z")["ok"]


def test_expgolomb_encoding_compiles_format_5_with_the_same_labels(env, tmp_path):
    """A real compile with --encoding expgolomb (FORMAT.md 6c): version 5, the packed store's labels bit for bit,
    fewer bytes than packed, verified; the stored input ids make the next-token swap real here."""
    compile_store(opts(env, tmp_path / "p", k=8, max_length=64))
    compile_store(opts(env, tmp_path / "e", k=8, max_length=64, encoding="expgolomb"))
    s = LabelStore(tmp_path / "e")
    assert s.meta["format_version"] == 5 and s.meta["encoding"]["name"] == "expgolomb"
    assert_same_rows(store_rows(tmp_path / "p"), store_rows(tmp_path / "e"))
    size = {name: sum(p.stat().st_size for p in (tmp_path / name / "shards").glob("*.arrow")) for name in "pe"}
    assert size["e"] < size["p"]
    assert verify_store(tmp_path / "e")["ok"]


def test_interrupted_then_resumed_on_two_ranks_equals_one_process(env, tmp_path, monkeypatch):
    """A resume on another world size: the shards of the resumed ranks carry the store's recorded metadata (its
    runtime included), so the store reads back, and equals an uninterrupted 1-process compile."""
    kw = dict(shard_mb=0.004, tokens_per_batch=64)
    with monkeypatch.context() as m:
        interrupt_after(m, 3)
        with pytest.raises(Interrupt):
            compile_store(opts(env, tmp_path / "s", **kw))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "labelstore", *cli_args(env, tmp_path / "s", **kw)]
    p = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert LabelStore(tmp_path / "s").meta["runtime"]["world_size"] == 1  # the store's first run's
    compile_store(opts(env, tmp_path / "clean", **kw))
    assert_same_rows(store_rows(tmp_path / "s"), store_rows(tmp_path / "clean"))
