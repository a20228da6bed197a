"""Other trainers, safe by default (issue 16): each silent misuse of the student side is now right or refused.

A real store compiled from a tiny Llama teacher whose output layer is padded 13 rows past its tokenizer (as Qwen's
is), and students built with ``transformers``: Hugging Face label conventions, the targets' temperature, sampled
stores under reverse KL / JSD, the student's vocabulary and tokenizer, DataLoader workers under ``spawn`` and
``forkserver``, and gradient accumulation in :class:`DistillationTrainer`.
"""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _teachers import make_documents, make_tokenizer, save_teacher, write_corpus
from _trainer_step import tiny_student as student
from _trainer_step import train_one_step

from labelstore.errors import ConfigMismatchError
from labelstore.student.collate import shift_labels
from labelstore.student.dataset import StoreDataset
from labelstore.student.hf import to_hf_dataset
from labelstore.student.loader import StoreLoader
from labelstore.student.losses import distillation_loss, label_ce, sparse_kl
from labelstore.student.targets import tokenizer_hash
from labelstore.teacher.compile import CompileOptions, compile_store
from labelstore.teacher.model import tokenizer_fingerprint

pytestmark = pytest.mark.usefixtures("one_thread")
PAD = 13  # teacher head rows past the tokenizer


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("trainers")
    tok = make_tokenizer()
    write_corpus(base / "corpus", make_documents(24, seed=3, max_words=40))
    teacher = save_teacher(base / "teacher", "llama", tok, extra_vocab=PAD)
    stores = {}
    for name, kw in {"topk": {"pack": False}, "zstd": {"encoding": "zstd"},
                     "sample": {"selection": "sample", "samples": 8, "encoding": "zstd"}}.items():
        opts = CompileOptions(teacher=str(teacher), data=[str(base / "corpus")], out=str(base / name),
                              max_length=32, tokens_per_batch=256, device="cpu", progress=False,
                              **({"selection": "topk", "k": 8} | kw if "selection" not in kw else kw))
        compile_store(opts)
        stores[name] = base / name
    return {"tok": tok, "V": len(tok) + PAD, "stores": stores, "base": base}


def first_batch(ds, batch_size=4):
    return next(iter(StoreLoader(ds, batch_size=batch_size, shuffle=False)))


# ---------------------------------------------------------------------------------- 1. labels, end to end
def test_model_forward_on_the_batch_trains_on_the_next_token(env):
    """``model(**batch)`` shifts ``labels`` itself: its loss must be the next-token CE, which labelstore computes on
    ``shift_labels``; checked against a plain-torch CE over (token t -> token t + 1) pairs, for three steps."""
    tok = env["tok"]
    ds = StoreDataset(env["stores"]["topk"], student=(student(env["V"]), tok))
    model = student(env["V"])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _, batch in zip(range(3), StoreLoader(ds, batch_size=4, seed=0)):
        out = model(**batch)  # every key rides along; Hugging Face ignores what it does not use
        x, attn = batch["input_ids"], batch["attention_mask"].bool()
        pair = attn[:, :-1] & attn[:, 1:]  # both tokens real
        ref = F.cross_entropy(out.logits[:, :-1][pair].double(), x[:, 1:][pair])
        ours = distillation_loss(out.logits, batch, alpha=0.0)  # labelstore's CE on shift_labels
        torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
        loss = 0.5 * out.loss + 0.5 * distillation_loss(out.logits, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    # a batch with only Hugging Face-convention labels is refused by the mixed loss, with the fix in the message
    only = {k: v for k, v in batch.items() if k != "shift_labels"}
    with pytest.raises(ConfigMismatchError, match="shift_labels"):
        distillation_loss(out.logits, only, alpha=0.5)
    assert torch.equal(shift_labels(batch["labels"]), batch["shift_labels"])


# ---------------------------------------------------------------------------------- 2. temperature
def test_loss_uses_the_targets_temperature_and_refuses_another(env):
    store = env["stores"]["topk"]
    plain = first_batch(StoreDataset(store))
    z = torch.randn(*plain["input_ids"].shape, env["V"], dtype=torch.float64)
    assert plain["teacher_info"]["temperature"] == 1.0 and plain["teacher_info"]["selection"] == "topk"
    with pytest.raises(ConfigMismatchError, match="tempers only the student"):
        distillation_loss(z, plain, temperature=2.0)
    hot = first_batch(StoreDataset(store, temperature=2.0))  # re-tempered teacher: the loss follows it
    assert hot["teacher_info"]["temperature"] == 2.0
    args = [hot[k] for k in ("teacher_ids", "teacher_probs", "teacher_tail", "teacher_mask", "position_mask")]
    torch.testing.assert_close(distillation_loss(z, hot), sparse_kl(z, *args, temperature=2.0))
    torch.testing.assert_close(distillation_loss(z, hot, temperature=2.0), sparse_kl(z, *args, temperature=2.0))


# ---------------------------------------------------------------------------------- 3. sampled stores
def test_reverse_kl_and_jsd_refused_on_sampled_stores(env):
    batch = first_batch(StoreDataset(env["stores"]["sample"]))
    assert batch["teacher_info"]["estimator"] == "sampled"
    z = torch.randn(*batch["input_ids"].shape, env["V"], dtype=torch.float64)
    for method in ("reverse_kl", "jsd"):
        with pytest.raises(ConfigMismatchError, match="sampled store"):
            distillation_loss(z, batch, method=method)
    assert torch.isfinite(distillation_loss(z, batch, method="forward_kl"))  # unbiased: allowed
    exact = first_batch(StoreDataset(env["stores"]["topk"]))
    assert exact["teacher_info"]["estimator"] == "exact"
    assert torch.isfinite(distillation_loss(z, exact, method="reverse_kl"))


# ---------------------------------------------------------------------------------- 4. vocabulary
def test_student_vocabulary_and_tokenizer_checked(env):
    store, tok, V = env["stores"]["topk"], env["tok"], env["V"]
    meta = StoreDataset(store).store.meta
    assert tokenizer_hash(tok) == meta["tokenizer"]["hash"] == tokenizer_fingerprint(tok)
    StoreDataset(store, student=(student(V), tok))  # the teacher's vocabulary and tokenizer: accepted
    StoreDataset(store, student=student(V).config)
    other = make_tokenizer(seed=5)
    with pytest.raises(ConfigMismatchError, match="tokenizer hash"):
        StoreDataset(store, student=(student(V), other))
    # a smaller head over the same tokenizer (Qwen-style): refused, and the message names the one-liner that works
    small = student(len(tok))
    with pytest.raises(ConfigMismatchError, match="id_map='shared_prefix'"):
        StoreDataset(store, student=(small, tok))
    ds = StoreDataset(store, student=(small, tok), id_map="shared_prefix")
    assert ds.vocab_size == len(tok)
    full = StoreDataset(store)
    for i in range(len(ds)):
        a, b = ds[i], full[i]
        drop = b["teacher_mask"] & (b["teacher_ids"] >= len(tok))
        np.testing.assert_array_equal(a["teacher_mask"], b["teacher_mask"] & ~drop)
        np.testing.assert_allclose(a["teacher_tail"], b["teacher_tail"] + np.where(drop, b["teacher_probs"], 0).sum(1),
                                   rtol=1e-6)
    batch = first_batch(ds)
    logits = small(input_ids=batch["input_ids"]).logits
    assert torch.isfinite(distillation_loss(logits, batch, alpha=0.5))
    # no student given: a student with another vocabulary is still refused, at the loss
    plain = first_batch(full)
    with pytest.raises(ConfigMismatchError, match="2000 entries per position"):
        distillation_loss(torch.randn(*plain["input_ids"].shape, 2000), plain)


# ---------------------------------------------------------------------------------- 5. workers
@pytest.mark.parametrize("context", ["spawn", "forkserver"])
def test_spawn_and_forkserver_workers_on_packed_zstd_and_hf(env, context):
    packed, coded = env["stores"]["topk"], env["stores"]["zstd"]
    hf_set = to_hf_dataset(coded)
    # the HF dataset's workers import transformers (slow): one start method is enough for it
    sets = [StoreDataset(packed), StoreDataset(coded)] + ([hf_set] if context == "spawn" else [])
    for ds in sets:
        ds[0]  # read in the main process first: a zstd reader then holds a decompressor
    shard_bytes = sum(p.stat().st_size for p in (coded / "shards").iterdir())
    part = hf_set.select(range(2, 7))  # a contiguous slice stays a reference too
    for hf in (hf_set, part):
        blob = pickle.dumps(hf)
        assert len(blob) < shard_bytes / 4, (len(blob), shard_bytes)  # by reference, not the store's bytes
        back = pickle.loads(blob)
        for key, val in hf[len(hf) - 1].items():
            np.testing.assert_array_equal(np.asarray(back[len(hf) - 1][key]), np.asarray(val))
    both = torch.utils.data.ConcatDataset(sets)
    collate = sets[0].collator()
    ref = [collate([both[i] for i in range(j, min(j + 5, len(both)))]) for j in range(0, len(both), 5)]
    got = list(torch.utils.data.DataLoader(both, batch_size=5, num_workers=1, collate_fn=collate,
                                           multiprocessing_context=context))
    assert len(got) == len(ref)
    for a, b in zip(ref, got):
        for key in a:
            assert torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key], key


# ---------------------------------------------------------------------------------- 6. accumulation
@pytest.mark.slow
def test_trainer_step_is_a_token_weighted_mean_over_accumulation_and_devices(env, tmp_path):
    """One batch of 4 = two accumulated micro-batches of 2 = two ranks of 2 (torchrun, gloo): same samples, SGD,
    same parameters after the step. The step's loss is the mean over all its teacher positions and labels; a mean
    of micro-batch (or device) means differs here, since the sequences have different lengths."""
    store = env["stores"]["topk"]
    ds = StoreDataset(store)
    assert len({len(ds[i]["input_ids"]) for i in range(len(ds))}) > 3  # unpacked: different token counts
    one, loss_one = train_one_step(store, tmp_path / "one", 4, 1)
    accumulated, loss_acc = train_one_step(store, tmp_path / "acc", 2, 2)
    assert loss_one == pytest.approx(loss_acc, rel=1e-5)
    torch.testing.assert_close(one, accumulated, rtol=1e-5, atol=1e-6)
    script = Path(__file__).resolve().parents[1] / "_trainer_step.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           str(store), str(tmp_path / "ranks.pt"), "2", "1"]
    p = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    torch.testing.assert_close(one, torch.load(tmp_path / "ranks.pt"), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------- also: other loops
def test_store_loader_under_accelerate_and_the_stateful_protocol(env):
    """accelerate's prepare() passes a StoreLoader through untouched (it shards by rank itself: no second split),
    and the loader satisfies torch.distributed.checkpoint's Stateful protocol with a JSON-safe state."""
    import json

    from accelerate import Accelerator
    from torch.distributed.checkpoint.stateful import Stateful

    ds = StoreDataset(env["stores"]["topk"])
    loader = StoreLoader(ds, batch_size=3, seed=1)
    assert Accelerator(cpu=True).prepare(loader) is loader
    assert isinstance(loader, Stateful)
    full = [b["sample_ids"].tolist() for b in loader]
    it = iter(loader)
    first = [next(it)["sample_ids"].tolist() for _ in range(2)]
    state = json.loads(json.dumps(loader.state_dict()))
    resumed = StoreLoader(ds, batch_size=3, seed=1)
    resumed.load_state_dict(state)
    assert first + [b["sample_ids"].tolist() for b in resumed] == full


def test_label_ce_matches_hf_loss_helper(env):
    batch = first_batch(StoreDataset(env["stores"]["topk"]))
    z = torch.randn(*batch["input_ids"].shape, env["V"])
    from transformers.loss.loss_utils import ForCausalLMLoss

    torch.testing.assert_close(label_ce(z, batch["shift_labels"]), ForCausalLMLoss(z, batch["labels"], env["V"]))
