"""Student-side loader: batches against an independent decode of the shards, ranks, resume, dense, re-tempering,
the vocabulary check, DataLoader workers, Hugging Face datasets and a 3-step transformers.Trainer run."""

import json
import math

import datasets  # the `hf` extra; the test suite needs it (and accelerate, for transformers.Trainer)
import numpy as np
import pyarrow as pa
import pytest
import torch
import transformers
from store_factory import make_meta, write_rows

from labelstore.errors import ConfigMismatchError
from labelstore.store import bitpack
from labelstore.store.writer import StoreWriter
from labelstore.student.dataset import StoreDataset, StoreIterableDataset
from labelstore.student.loader import StoreLoader
from labelstore.student.sampler import StoreSampler
from labelstore.student.targets import retemper, to_dense

V, K = 64, 6


# ------------------------------------------------------------------------------------------ store building

def shard_records(path) -> list[dict]:
    """The store's shard entries (a version-4 store lists them in index.arrow, not in manifest.json)."""
    from labelstore.store.index import shard_table
    from labelstore.store.manifest import load_manifest

    return shard_table(path, load_manifest(path)).records()

def make_rows(n, vocab=V, k=K, codec="log8", seed=0, lengths=None, full=False, hard=False):
    """Rows with unique kept ids per position (as a compile writes them) and valid, non-negative codes."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        T = int(lengths[i]) if lengths is not None else int(rng.integers(0, 13))
        counts = np.full(T, k) if (full or hard) else rng.integers(1, k + 1, size=T)
        ids = np.concatenate([rng.choice(vocab, int(c), replace=False) for c in counts]) if T else np.zeros(0)
        m = int(counts.sum())
        if hard:
            values, tail = np.zeros(0, np.uint8), np.zeros(0, np.float32)
        elif codec == "fp16":
            values = (rng.random(m) * 1024 + 1).astype("<f2").view(np.uint8)
            tail = rng.random(T).astype(np.float32) * 0.6
        else:
            top = {"log8": 200, "e4m3": 0x7E}[codec]
            values = rng.integers(0, top, size=m).astype(np.uint8)
            tail = rng.random(T).astype(np.float32) * 0.6
        rows.append({"sample_id": 500 + i, "input_ids": rng.integers(0, vocab, size=T), "counts": counts,
                     "ids": ids, "values": values, "tail": tail, "doc_starts": np.zeros(1, np.int32)})
    return rows


def build(path, rows, vocab=V, k=K, codec="log8", hard=False, shard_bytes=600, **meta_extra):
    meta = make_meta(vocab, k, codec="none" if hard else codec, label_kind="hard" if hard else "soft", **meta_extra)
    with StoreWriter(path, meta, shard_bytes=shard_bytes) as w:
        write_rows(w, rows)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build(tmp_path_factory.mktemp("s") / "store", make_rows(22, seed=1))


# ----------------------------------------------------------------------------- independent reference decode
def e4m3_value(code: int) -> float:
    s, e, m = code >> 7, (code >> 3) & 15, code & 7
    if e == 15 and m == 7:
        return 0.0  # NaN decodes to weight 0
    v = (m / 8) * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
    return -v if s else v


def decode_weights(values: bytes, codec: dict) -> np.ndarray:
    b = np.frombuffer(values, np.uint8)
    if codec["name"] == "log8":
        return np.where(b == 255, 0.0, np.exp(-b.astype(np.float64) * codec["params"]["step"]))
    if codec["name"] == "e4m3":
        return np.array([e4m3_value(int(c)) for c in b]) / 256.0
    if codec["name"] == "fp16":
        return np.frombuffer(values, "<f2").astype(np.float64) / 1024.0
    raise AssertionError(codec)


def reference(path) -> dict:
    """sample_id -> (input_ids, ids [T, K], probs [T, K], tail [T], mask [T, K], valid [T]), read from the Arrow
    shards with pyarrow and bitpack only, following the format's reconstruction rule position by position."""
    manifest = json.loads((path / "manifest.json").read_text())
    meta = manifest["meta"]
    bits, k, hard = meta["id_bits"], meta["selection"]["k"], meta["label_kind"] == "hard"
    cdt = "<u1" if meta["count_bytes"] == 1 else "<u2"
    out = {}
    for rec in shard_records(path):
        table = pa.ipc.open_file(pa.memory_map(str(path / rec["path"]))).read_all()
        for row in table.to_pylist():
            T = row["num_tokens"]
            x = bitpack.unpack(row["input_ids"], bits, T)
            counts = np.frombuffer(row["counts"], cdt).astype(int)
            flat = bitpack.unpack(row["ids"], bits, int(counts.sum()))
            w = np.ones(flat.size) if hard else decode_weights(row["values"], meta["value_codec"])
            tail = np.zeros(T) if hard else np.frombuffer(row["tail"], "<f4").astype(np.float64)
            ids, probs, mask = np.zeros((T, k), np.int64), np.zeros((T, k)), np.zeros((T, k), bool)
            valid, start = np.zeros(T, bool), 0
            for t in range(T):
                n = counts[t]
                wt = w[start:start + n]
                p = wt if hard else (wt * (1 - tail[t]) / wt.sum() if wt.sum() > 0 else np.zeros(n))
                total = p.sum() + tail[t]
                valid[t] = total > 0
                if valid[t]:
                    p, tail[t] = p / total, tail[t] / total
                ids[t, :n], probs[t, :n], mask[t, :n] = flat[start:start + n], p, True
                start += n
            out[row["sample_id"]] = (x, ids, probs, tail, mask, valid)
    return out


def check_batch(batch, ref, k=K, vocab=V):
    B = len(batch["sample_ids"])
    T = batch["input_ids"].shape[1]
    assert batch["teacher_ids"].shape == (B, T, k) and batch["teacher_ids"].dtype == torch.int64
    assert batch["teacher_probs"].dtype == torch.float32 and batch["teacher_mask"].dtype == torch.bool
    for b, sid in enumerate(batch["sample_ids"].tolist()):
        x, ids, probs, tail, mask, valid = ref[sid]
        L = len(x)
        assert batch["input_ids"][b, :L].tolist() == x.tolist() and (batch["input_ids"][b, L:] == 0).all()
        assert batch["attention_mask"][b].tolist() == [1] * L + [0] * (T - L)
        assert batch["labels"][b].tolist() == x.tolist() + [-100] * (T - L)  # Hugging Face convention: unshifted
        assert batch["shift_labels"][b].tolist() == x[1:].tolist() + [-100] * (T - max(L - 1, 0))
        np.testing.assert_array_equal(batch["teacher_ids"][b, :L].numpy(), ids)
        np.testing.assert_array_equal(batch["teacher_mask"][b, :L].numpy(), mask)
        np.testing.assert_allclose(batch["teacher_probs"][b, :L].numpy(), probs, rtol=2e-5, atol=1e-7)
        np.testing.assert_allclose(batch["teacher_tail"][b, :L].numpy(), tail, rtol=2e-5, atol=1e-7)
        np.testing.assert_array_equal(batch["position_mask"][b, :L].numpy(), valid)
        for key in ("teacher_ids", "teacher_probs", "teacher_tail", "teacher_mask", "position_mask"):
            assert not batch[key][b, L:].any(), key


# ------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("codec,full,hard", [("log8", False, False), ("log8", True, False), ("e4m3", False, False),
                                             ("fp16", False, False), ("none", True, True)])
def test_batches_equal_reference_decode(tmp_path, codec, full, hard):
    lengths = [0, 1, 7, 12, 3, 12, 9, 5, 11, 2]
    k = 1 if hard else K
    path = build(tmp_path / "s", make_rows(10, k=k, codec=codec, seed=7, lengths=lengths, full=full, hard=hard),
                 k=k, codec=codec, hard=hard)
    ref = reference(path)
    seen = []
    for batch in StoreLoader(StoreDataset(path), batch_size=3, shuffle=True, seed=3):
        check_batch(batch, ref, k=k)
        seen += batch["sample_ids"].tolist()
    assert sorted(seen) == sorted(ref)


def test_entropy_coded_store_gives_the_same_batches(tmp_path):
    """Format v2 (zstd-coded rows) reads through the same loader; the packed twin is decoded independently."""
    from labelstore.student.hf import to_hf_dataset

    rows = make_rows(9, seed=8)
    ref = reference(build(tmp_path / "packed", rows))
    coded = build(tmp_path / "zstd", rows, encoding={"name": "zstd"})
    assert json.loads((coded / "manifest.json").read_text())["meta"]["encoding"]["name"] == "zstd"
    for batch in StoreLoader(StoreDataset(coded), batch_size=4, seed=1):
        check_batch(batch, ref)
    hf, ds = to_hf_dataset(coded), StoreDataset(coded)
    for key, val in ds[4].items():
        np.testing.assert_array_equal(np.asarray(hf[4][key]), np.asarray(val))


def test_every_sample_once_per_epoch_across_two_ranks(store):
    ds = StoreDataset(store)
    n = len(ds)
    for epoch in (0, 1):
        per_rank = []
        for rank in (0, 1):
            loader = StoreLoader(ds, batch_size=4, rank=rank, world_size=2, seed=11)
            loader.set_epoch(epoch)
            per_rank.append([s for b in loader for s in b["sample_ids"].tolist()])
        assert len(per_rank[0]) == len(per_rank[1]) == n // 2
        assert sorted(per_rank[0] + per_rank[1]) == sorted(ds.store.sample_ids().tolist())
    # DistributedSampler semantics, order included; odd sizes pad with repeats or drop
    for n_items, drop in ((13, False), (13, True), (22, False)):
        for rank in (0, 1):
            ours = list(StoreSampler(n_items, num_replicas=2, rank=rank, seed=5, drop_last=drop))
            theirs = list(torch.utils.data.DistributedSampler(range(n_items), num_replicas=2, rank=rank, seed=5,
                                                              drop_last=drop))
            assert ours == theirs
    a, b = (list(StoreSampler(13, num_replicas=2, rank=r, drop_last=True)) for r in (0, 1))
    assert len(a) == len(b) == 6 and not set(a) & set(b)
    s0 = StoreSampler(13, num_replicas=1, seed=5)
    e0 = list(s0)
    s0.set_epoch(1)
    assert list(s0) != e0 and sorted(e0) == list(range(13))


def test_iterable_dataset_ranks_and_workers(store):
    sids = StoreDataset(store).store.sample_ids().tolist()
    got = []
    for rank in (0, 1):
        ds = StoreIterableDataset(store, rank=rank, world_size=2)
        got.append([it["sample_id"] for it in ds])
    assert got[0] + got[1] == sids  # contiguous blocks in store order, equal counts
    ref = reference(store)
    streams = {}
    for workers in (0, 2):
        ds = StoreIterableDataset(store, rank=1, world_size=2, batch_size=3)
        batches = list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers))
        for batch in batches:
            check_batch(batch, ref)
        streams[workers] = [b["sample_ids"].tolist() for b in batches]
    assert streams[0] == streams[2] and sum(streams[0], []) == got[1]


@pytest.mark.parametrize("steps", [0, 2, 5])
def test_resume_after_k_steps_gives_the_remaining_batches(store, steps):
    ds = StoreDataset(store)

    def loader(workers=0):
        ld = StoreLoader(ds, batch_size=2, rank=1, world_size=2, seed=4, num_workers=workers)
        ld.set_epoch(3)
        return ld

    full = [b["sample_ids"].tolist() for b in loader()]
    first = loader(workers=2)  # prefetching workers run ahead of the loop; the state must not
    it = iter(first)
    done = [next(it)["sample_ids"].tolist() for _ in range(steps)]
    state = json.loads(json.dumps(first.state_dict()))
    del it
    resumed = loader()
    resumed.load_state_dict(state)
    n_rest = len(resumed)
    rest = [b["sample_ids"].tolist() for b in resumed]
    assert done + rest == full and n_rest == len(rest)
    resumed.set_epoch(4)  # the next epoch starts from its beginning
    assert len([b for b in resumed]) == len(full)
    with pytest.raises(ConfigMismatchError, match="seed"):
        StoreLoader(ds, batch_size=2, rank=1, world_size=2, seed=5).load_state_dict(state)


def test_num_workers_two_gives_the_same_batches_as_zero(store):
    ds = StoreDataset(store)
    runs = []
    for workers in (0, 2):
        ld = StoreLoader(ds, batch_size=3, seed=9, num_workers=workers, dense=True)
        runs.append(list(ld))
    assert len(runs[0]) == len(runs[1]) == math.ceil(len(ds) / 3)
    for a, b in zip(*runs):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key], key


def dense_reference(ids, probs, tail, mask, valid, vocab):
    out = np.zeros((len(tail), vocab))
    for t in range(len(tail)):
        if not valid[t]:
            continue
        kept = ids[t][mask[t]]
        out[t] = tail[t] / (vocab - len(kept))
        out[t, kept] = probs[t][mask[t]]
    return out


def test_dense_mode_sums_to_one_and_matches_reference(store):
    ds = StoreDataset(store)
    ref = reference(store)
    batch = ds.collator(dense=True)([ds[i] for i in range(6)])
    dense = batch["teacher_dense"]
    assert dense.shape == (6, batch["input_ids"].shape[1], V) and dense.dtype == torch.float32
    sums = dense.sum(-1)
    pm = batch["position_mask"]
    assert pm.sum() > 20
    torch.testing.assert_close(sums[pm], torch.ones(int(pm.sum())), rtol=0, atol=2e-6)
    assert (dense[~pm] == 0).all()
    for b, sid in enumerate(batch["sample_ids"].tolist()):
        x, ids, probs, tail, mask, valid = ref[sid]
        np.testing.assert_allclose(dense[b, :len(x)].numpy(), dense_reference(ids, probs, tail, mask, valid, V),
                                   rtol=1e-5, atol=1e-7)
    # every token kept (n = V): no tail tokens, the kept mass is rescaled to 1
    full = to_dense(torch.tensor([[2, 0, 1]]), torch.tensor([[0.5, 0.2, 0.1]]), torch.tensor([0.2]),
                    torch.ones(1, 3, dtype=torch.bool), 3)
    torch.testing.assert_close(full, torch.tensor([[0.25, 0.125, 0.625]]))
    # refused before allocating when over the budget
    T = batch["input_ids"].shape[1]
    col = ds.collator(dense=True, dense_budget_bytes=6 * T * V * 4 - 1)
    with pytest.raises(ConfigMismatchError, match="dense budget"):
        col([ds[i] for i in range(6)])


def test_retemper_rules():
    rng = np.random.default_rng(0)
    T, k, vocab = 9, 5, 40
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(T)])
    mask = np.arange(k) < rng.integers(1, k + 1, size=(T, 1))
    w = np.where(mask, rng.random((T, k)) + 0.01, 0)
    tail = rng.random(T) * 0.5
    probs = (w / w.sum(1, keepdims=True) * (1 - tail)[:, None]).astype(np.float32)
    tail = tail.astype(np.float32)
    same_p, same_t = retemper(probs, tail, mask, 1.0, vocab)
    np.testing.assert_allclose(same_p, probs, rtol=1e-5)
    np.testing.assert_allclose(same_t, tail, rtol=1e-5)
    tids = torch.from_numpy(np.where(mask, ids, 0))
    dense = to_dense(tids, torch.from_numpy(probs), torch.from_numpy(tail), torch.from_numpy(mask), vocab).double()
    for a in (0.5, 2.0):
        p2, t2 = retemper(probs, tail, mask, a, vocab, "uniform")
        np.testing.assert_allclose(p2.sum(1) + t2, 1, rtol=1e-5)
        # uniform rule: temper-then-densify equals densify-then-temper
        d2 = to_dense(tids, torch.from_numpy(p2), torch.from_numpy(t2), torch.from_numpy(mask), vocab).double()
        expect = dense**a / (dense**a).sum(-1, keepdim=True)
        torch.testing.assert_close(d2, expect, rtol=1e-5, atol=1e-7)
        # bucket rule: the tail as one token
        pb, tb = retemper(probs, tail, mask, a, vocab, "bucket")
        z = (np.where(mask, probs, 0).astype(np.float64) ** a).sum(1) + tail.astype(np.float64) ** a
        np.testing.assert_allclose(tb, tail.astype(np.float64) ** a / z, rtol=1e-5)
        np.testing.assert_allclose(pb, np.where(mask, probs.astype(np.float64) ** a, 0) / z[:, None], rtol=1e-5)
        # the true tempered tail lies between the two rules (flattening: bucket below, uniform above)
        lo, hi = (tb, t2) if a < 1 else (t2, tb)
        assert (lo <= hi + 1e-7).all()


def test_retemper_on_read(tmp_path):
    path = build(tmp_path / "s", make_rows(4, seed=2, lengths=[5, 6, 0, 3]), temperature=1.0)
    ref = reference(path)
    ds = StoreDataset(path, temperature=2.0)
    for i in range(len(ds)):
        it = ds[i]
        x, ids, probs, tail, mask, valid = ref[it["sample_id"]]
        p, t = retemper(probs.astype(np.float32), tail.astype(np.float32), mask, 0.5, V)
        np.testing.assert_allclose(it["teacher_probs"], p, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(it["teacher_tail"], t, rtol=1e-5, atol=1e-7)
    rows = make_rows(2, seed=2)
    for r in rows:  # a sampled store: count8 values, no tail column
        r["values"] = np.ones(int(r["counts"].sum()), np.uint8)
        r["tail"] = np.zeros(0, np.float32)
    sampled = build(tmp_path / "t", rows, codec="count8", selection={"mode": "sample", "k": K, "samples": K})
    with pytest.raises(ConfigMismatchError, match="sample"):
        StoreDataset(sampled, temperature=2.0)


def test_vocabulary_mismatch_refused_unless_mapped(store):
    with pytest.raises(ConfigMismatchError, match="vocabulary size 65 differs"):
        StoreDataset(store, student_vocab_size=V + 1)
    with pytest.raises(ConfigMismatchError, match="tokenizer hash"):
        StoreDataset(store, student_vocab_size=V, student_tokenizer_hash="f" * 16)
    StoreDataset(store, student_vocab_size=V, student_tokenizer_hash="1" * 16)  # the store's own
    with pytest.raises(ConfigMismatchError, match="injective"):
        StoreDataset(store, id_map=np.zeros(V, np.int64))
    with pytest.raises(ConfigMismatchError, match="length 64"):
        StoreDataset(store, id_map=np.arange(V - 1))
    # a student with a different vocabulary: ids move, teacher ids without a student id join the tail
    id_map = torch.arange(V) + 10
    id_map[V - 8:] = -1  # the last 8 teacher tokens do not exist for the student (never as inputs below)
    ref = reference(store)
    ds = StoreDataset(store, student_vocab_size=V + 10, student_tokenizer_hash="f" * 16, id_map=id_map)
    assert ds.vocab_size == V + 10
    for i in range(len(ds)):
        sid = ds.store.sample_ids()[i]
        x, ids, probs, tail, mask, valid = ref[int(sid)]
        if (x >= V - 8).any():
            with pytest.raises(ConfigMismatchError, match="no student id"):
                ds[i]
            continue
        it = ds[i]
        drop = mask & (ids >= V - 8)
        np.testing.assert_array_equal(it["input_ids"], x + 10)
        np.testing.assert_array_equal(it["teacher_mask"], mask & ~drop)
        np.testing.assert_array_equal(it["teacher_ids"], np.where(mask & ~drop, ids + 10, 0))
        np.testing.assert_allclose(it["teacher_tail"], tail + np.where(drop, probs, 0).sum(1), rtol=2e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------ Hugging Face
def test_hf_dataset_is_zero_copy_and_decodes_like_the_torch_dataset(store):
    from labelstore.student.hf import to_hf_dataset

    shard = store / shard_records(store)[0]["path"]
    with pytest.raises(pa.ArrowInvalid):  # datasets reads the IPC stream format; shards are the file format
        datasets.Dataset.from_file(str(shard))
    before = pa.total_allocated_bytes()
    hf = to_hf_dataset(store)
    assert pa.total_allocated_bytes() - before < 1024 and len(hf) == 22
    ds = StoreDataset(store)
    assert json.loads(hf.info.description)["vocab_size"] == V
    for i in (0, 5, 21):
        a, b = hf[i], ds[i]
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))


def sparse_kl_reference(logits, batch):
    """Forward KL with the tail bucket, mean over valid positions, in float64 from dense softmax."""
    q = torch.softmax(logits.double(), -1)
    pm = batch["position_mask"]
    total = 0.0
    for b, t in pm.nonzero().tolist():
        m = batch["teacher_mask"][b, t]
        ids, p = batch["teacher_ids"][b, t][m], batch["teacher_probs"][b, t][m].double()
        tail = batch["teacher_tail"][b, t].double()
        qs = q[b, t, ids]
        kl = (p * (p.log() - qs.log())).sum()
        if tail > 0:
            kl = kl + tail * (tail.log() - (1 - qs.sum()).log())
        total += kl.item()
    return total / int(pm.sum())


@pytest.mark.parametrize("source", ["torch", "hf"])
def test_trainer_three_steps_with_loss_from_the_store(store, tmp_path, source):
    from labelstore.student.hf import DistillationTrainer, store_collator, to_hf_dataset

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg)
    train = StoreDataset(store, student_vocab_size=V) if source == "torch" else to_hf_dataset(store)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to="none", save_strategy="no", use_cpu=True, logging_steps=1, disable_tqdm=True,
        remove_unused_columns=True,  # the pitfall: it would drop the teacher columns; the trainer turns it off
    )
    record = []

    class Recording(DistillationTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, out = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
            record.append(({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in inputs.items()},
                           out.logits.detach().clone(), loss.item()))
            return (loss, out) if return_outputs else loss

    trainer = Recording(model=model, args=args, train_dataset=train)
    result = trainer.train()
    assert trainer.state.global_step == 3 and len(record) == 3 and math.isfinite(result.training_loss)
    ref = reference(store)
    for inputs, logits, loss in record:
        check_batch(inputs, ref)
        assert loss == pytest.approx(sparse_kl_reference(logits, inputs), rel=1e-4)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged == pytest.approx([r[2] for r in record], rel=1e-3)

    # a plain Trainer with remove_unused_columns=True strips the teacher targets: refused loudly, not trained on
    plain = transformers.Trainer(model=model, args=args, train_dataset=train, data_collator=store_collator(train))
    with pytest.raises(ConfigMismatchError, match="remove_unused_columns"):
        next(iter(plain.get_train_dataloader()))

    small = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**cfg.to_dict(), "vocab_size": V - 1}))
    with pytest.raises(ConfigMismatchError, match="outputs 63 logits"):
        DistillationTrainer(model=small, args=args, train_dataset=train)
