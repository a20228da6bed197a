"""Writer/reader round trips, crash safety, locking, corruption detection and the CLI."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from store_factory import make_meta, random_rows, write_rows

from labelstore.cli import main as cli_main
from labelstore.codecs import get_codec
from labelstore.errors import (
    ConfigMismatchError,
    LabelStoreError,
    StoreCorruptError,
    StoreFormatError,
    StoreLockedError,
    StoreNotFinalizedError,
)
from labelstore.store import bitpack
from labelstore.store.format import with_digest
from labelstore.store.reader import LabelStore
from labelstore.store.verify import verify_store
from labelstore.store.writer import StoreWriter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def expected_probs(row, codec):
    """Independent reconstruction: per position, weights from the codec table renormalised to 1 - tail."""
    c = get_codec(codec)
    lut = c.decode_lut()
    out, start = [], 0
    for t, n in enumerate(row["counts"]):
        w = lut[row["values"][start:start + n]].astype(np.float64)
        out.append(w * (1 - float(row["tail"][t])) / w.sum() if w.sum() > 0 else np.zeros(n))
        start += n
    return out


@pytest.mark.parametrize("encoding", ["packed", "zstd", "expgolomb", "grouped"])
@pytest.mark.parametrize("vocab_size", [1000, 50257, 262144, 1 << 20])
def test_round_trip(tmp_path, vocab_size, encoding):
    k = 16
    rows = random_rows(30, vocab_size=vocab_size, k=k, seed=vocab_size)
    meta = make_meta(vocab_size, k, encoding={"name": encoding})
    with StoreWriter(tmp_path / "s", meta, shard_bytes=4000) as w:
        write_rows(w, rows)
    s = LabelStore(tmp_path / "s")
    assert len(s) == 30 and s.num_shards > 1 and (tmp_path / "s" / "index.arrow").is_file()
    assert s.meta["format_version"] == {"expgolomb": 5, "grouped": 6}.get(encoding, 4)
    assert s.meta["encoding"]["name"] == encoding
    assert s.meta["id_bits"] == max(1, (vocab_size - 1).bit_length())
    by_id = {r["sample_id"]: r for r in rows}
    for i in range(len(s)):
        x = s[i]
        r = by_id[x.sample_id]
        T = len(r["input_ids"])
        assert x.input_ids.tolist() == r["input_ids"].tolist()
        assert x.counts.tolist() == r["counts"].tolist()
        assert x.ids.shape == (T, k) and x.probs.shape == (T, k) and x.probs.dtype == torch.float32
        want = r["ids"].tolist()
        if encoding == "grouped":  # FORMAT.md 6d: ids of equal value sorted (by next-token-swapped id)
            from test_format_spec import spec_grouped_order

            want = spec_grouped_order(s.meta, r["input_ids"], r["counts"], r["ids"], r["values"])
        assert x.ids[x.mask].tolist() == want
        assert (x.ids[~x.mask] == 0).all() and (x.probs[~x.mask] == 0).all()
        np.testing.assert_array_equal(x.tail.numpy(), r["tail"])
        exp = expected_probs(r, "log8")
        for t in range(T):
            np.testing.assert_allclose(x.probs[t, : r["counts"][t]].numpy(), exp[t], rtol=1e-5, atol=1e-7)
        assert x.doc_starts.tolist() == r["doc_starts"].tolist()
    assert s.sample_ids().tolist() == [r["sample_id"] for r in rows]


@pytest.mark.parametrize("encoding", ["packed", "zstd", "expgolomb", "grouped"])
def test_empty_and_length_one_sequences(tmp_path, encoding):
    rows = random_rows(4, lengths=[0, 1, 0, 1], seed=3)
    with StoreWriter(tmp_path / "s", make_meta(encoding=encoding)) as w:
        write_rows(w, rows)
    s = LabelStore(tmp_path / "s")
    assert [len(s[i].input_ids) for i in range(4)] == [0, 1, 0, 1]
    assert s[0].ids.shape == (0, 8) and s[1].ids.shape == (1, 8)
    assert verify_store(tmp_path / "s")["ok"]


def test_empty_store(tmp_path):
    with StoreWriter(tmp_path / "s", make_meta()):
        pass
    s = LabelStore(tmp_path / "s")
    assert len(s) == 0 and list(s) == []


@pytest.mark.parametrize("codec", ["log8", "e4m3", "e5m2", "fp16"])
def test_codec_against_float64_reference(codec):
    """Relative weights decode within the codec's documented relative error, over its documented range."""
    c = get_codec(codec)
    r = torch.linspace(-12.0, 0.0, 4001, dtype=torch.float64)
    w = c.decode(c.encode(r.float()[None, :]).reshape(1, -1)).double()[0]
    ref = torch.exp(r)
    bound = {"log8": np.exp(1 / 32) - 1, "e4m3": 2**-4, "e5m2": 2**-3, "fp16": 2**-11}[codec]
    floor = {"log8": -15.8, "e4m3": np.log(2**-6 / 256), "e5m2": np.log(2**-14 / 32768), "fp16": np.log(2**-14 / 1024)}
    ok = r >= floor[codec]  # normal range of the code (below: subnormal, larger relative error)
    rel = ((w - ref).abs() / ref)[ok]
    assert rel.max().item() <= bound * 1.0001, (codec, rel.max().item())
    assert c.decode(c.encode(torch.tensor([[float("-inf")]]))).item() == 0.0
    # the top token (r = 0) is always exact
    assert c.decode(c.encode(torch.zeros(1, 1))).item() == 1.0


@pytest.mark.parametrize("encoding", ["packed", "zstd", "expgolomb", "grouped"])
def test_hard_label_store(tmp_path, encoding):
    rows = random_rows(5, k=1, codec="none", label_kind="hard", seed=5)
    with StoreWriter(tmp_path / "s", make_meta(k=1, codec="none", label_kind="hard", encoding=encoding)) as w:
        write_rows(w, rows)
    s = LabelStore(tmp_path / "s")
    for i, r in enumerate(rows):
        x = s[i]
        assert x.ids[:, 0].tolist() == r["ids"].tolist()
        assert (x.probs[:, 0] == 1).all() and (x.tail == 0).all()


def test_writer_rejects_bad_rows(tmp_path):
    with StoreWriter(tmp_path / "s", make_meta(vocab_size=100, k=4)) as w:
        with pytest.raises(ValueError, match="vocab_size"):
            w.add(0, [1, 200], [1, 1], [1, 2], [0, 0], [0.1, 0.1])
        with pytest.raises(ValueError, match="counts"):
            w.add(0, [1, 2], [5, 1], [1] * 6, [0] * 6, [0.1, 0.1])
        with pytest.raises(ValueError, match="tail"):
            w.add(0, [1], [1], [1], [0], [float("nan")])


def test_second_writer_refused_and_lock_released_after_close(tmp_path):
    w = StoreWriter(tmp_path / "s", make_meta())
    with pytest.raises(StoreLockedError, match="another live process"):
        StoreWriter(tmp_path / "s", make_meta())
    w.close()
    StoreWriter(tmp_path / "s", make_meta()).close()


def test_second_writer_in_another_process_refused(tmp_path):
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
        from store_factory import make_meta
        from labelstore.store.writer import StoreWriter
        w = StoreWriter({str(tmp_path / 's')!r}, make_meta())
        print("locked", flush=True)
        time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLockedError):
            StoreWriter(tmp_path / "s", make_meta())
        p.kill()  # a crashed writer must not leave the lock stuck
        p.wait()
        StoreWriter(tmp_path / "s", make_meta()).close()
    finally:
        p.kill()


def test_resume_with_changed_config_is_refused(tmp_path):
    StoreWriter(tmp_path / "s", make_meta(k=8)).close()
    with pytest.raises(ConfigMismatchError, match=r"selection\.k: 8 in the store, 16 now"):
        StoreWriter(tmp_path / "s", make_meta(k=16))
    # runtime settings may change freely
    StoreWriter(tmp_path / "s", make_meta(k=8, runtime={"batch": 3})).close()


KILL_SCRIPT = """
import sys, os, time
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from store_factory import make_meta, random_rows
from labelstore.store.writer import StoreWriter
rows = random_rows(200, seed=11, max_len=60)
w = StoreWriter({store!r}, make_meta(), shard_bytes=6000, batch_bytes=1500)
done = set(w.committed_sample_ids().tolist())
print("started", flush=True)
for i, r in enumerate(rows):
    if r["sample_id"] in done:
        continue
    w.add(r["sample_id"], r["input_ids"], r["counts"], r["ids"], r["values"], r["tail"], r["doc_starts"])
    if {slow}:
        time.sleep(0.004)
w.close()
print("finished", flush=True)
"""


def _run_writer(store, slow):
    script = KILL_SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"), store=str(store), slow=slow)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)


def _store_rows(path):
    s = LabelStore(path)
    return {x.sample_id: (x.input_ids.tolist(), x.ids.tolist(), x.probs.tolist(), x.tail.tolist()) for x in s}


def test_sigkill_mid_shard_then_resume_equals_uninterrupted(tmp_path):
    ref = _run_writer(tmp_path / "ref", slow=False)
    assert ref.wait(timeout=120) == 0
    rng = np.random.default_rng(0)
    killed = 0
    for attempt in range(3):
        p = _run_writer(tmp_path / "s", slow=True)
        assert p.stdout.readline().strip() == "started"
        t0 = time.time()
        while not list((tmp_path / "s" / "commits").glob("r*-*.json")) and time.time() - t0 < 60:
            time.sleep(0.01)  # kill after at least one commit, at a random moment
        time.sleep(float(rng.uniform(0.0, 0.4)))
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            killed += 1
        p.wait()
        if attempt == 0:
            assert killed == 1, "the writer finished before it could be killed; slow it down"
            with pytest.raises(StoreNotFinalizedError):
                LabelStore(tmp_path / "s")
    p = _run_writer(tmp_path / "s", slow=False)
    assert p.wait(timeout=120) == 0
    assert _store_rows(tmp_path / "s") == _store_rows(tmp_path / "ref")
    assert len(LabelStore(tmp_path / "s")) == 200
    assert verify_store(tmp_path / "s")["ok"]


def _store_with_rows(tmp_path, n=20, **meta):
    rows = random_rows(n, seed=7)
    with StoreWriter(tmp_path / "s", make_meta(**meta), shard_bytes=3000) as w:
        write_rows(w, rows)
    return tmp_path / "s"


def test_corrupted_byte_detected_by_verify_and_reader(tmp_path):
    store = _store_with_rows(tmp_path)
    shard = store / LabelStore(store).shard_record(0)["path"]
    data = bytearray(shard.read_bytes())
    # flip a byte inside the first record batch's body (past the 8-byte magic + schema message)
    s = LabelStore(store)
    raw = s.get_raw(0)
    needle = bitpack.pack(raw.ids, s.id_bits)[:8]
    pos = bytes(data).find(needle)
    assert pos > 0
    data[pos + 3] ^= 0x5A
    shard.write_bytes(bytes(data))
    rep = verify_store(store)
    assert not rep["ok"] and any("sha256" in p for p in rep["problems"])
    with pytest.raises(StoreCorruptError, match="CRC32"):
        LabelStore(store)[0]


def test_truncated_and_missing_shards(tmp_path):
    store = _store_with_rows(tmp_path)
    shards = LabelStore(store).shards.records()
    p0 = store / shards[0]["path"]
    p0.write_bytes(p0.read_bytes()[:-10])
    with pytest.raises(StoreCorruptError, match="truncated"):
        LabelStore(store)[0]
    (store / shards[-1]["path"]).unlink()
    with pytest.raises(StoreCorruptError, match="missing"):
        LabelStore(store)[len(LabelStore(store)) - 1]
    rep = verify_store(store)
    assert not rep["ok"] and len(rep["problems"]) >= 2


def test_unknown_version_and_hostile_paths_refused(tmp_path):
    store = _store_with_rows(tmp_path, format_version=3)  # shard paths are listed in a version-3 manifest
    mpath = store / "manifest.json"
    good = json.loads(mpath.read_text())
    bad = dict(good, format_version=99)
    mpath.write_text(json.dumps(bad))
    with pytest.raises(StoreFormatError, match="version 99"):
        LabelStore(store)
    # A forger who recomputes the manifest's digest (with_digest) still meets every other check.
    for evil in ["../../etc/passwd", "/etc/passwd", "shards/../../x.arrow", "shards/r00000-000000.arrow\n",
                 "shards/r\u0660\u0660\u0660\u0660\u0660-\u0660\u0660\u0660\u0660\u0660\u0660.arrow"]:
        bad = json.loads(json.dumps(good))
        bad["shards"][0]["path"] = evil
        mpath.write_text(json.dumps(with_digest(bad)))
        with pytest.raises(StoreFormatError, match="refusing"):
            LabelStore(store)
    bad = json.loads(json.dumps(good))
    bad["meta"]["vocab_size"] = 10**15
    mpath.write_text(json.dumps(with_digest(bad)))
    with pytest.raises(StoreFormatError, match="vocab_size"):
        LabelStore(store)
    mpath.write_text("{not json")
    with pytest.raises(LabelStoreError, match="not valid JSON"):
        LabelStore(store)


def test_cli_info_and_verify(tmp_path, capsys):
    store = _store_with_rows(tmp_path)
    assert cli_main(["info", str(store), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    s = LabelStore(store)
    assert info["samples"] == len(s)
    tokens = sum(len(x.input_ids) for x in s)
    assert info["tokens"] == tokens
    disk = sum(p.stat().st_size for p in store.rglob("*") if p.is_file() and p.parent.name == "shards")
    assert info["bytes_on_disk"] >= disk
    assert info["ratio_vs_dense"]["fp32"] == pytest.approx(4 * 1000 * tokens / info["bytes_on_disk"])
    assert cli_main(["verify", str(store)]) == 0
    assert "OK" in capsys.readouterr().out
    (store / s.shard_record(0)["path"]).unlink()
    assert cli_main(["verify", str(store)]) == 1
    assert "missing" in capsys.readouterr().out
    assert cli_main(["info", str(tmp_path / "nope")]) == 1


@pytest.mark.parametrize("encoding", ["packed", "zstd", "expgolomb", "grouped"])
def test_sampled_modes_reconstruction(tmp_path, encoding):
    """sample: p = c / sum(c), no tail. topk+sample: exact part scaled to 1 - t, sampled part to t (FORMAT 5b)."""
    rng = np.random.default_rng(9)
    meta = make_meta(500, 5, codec="count8", encoding=encoding)
    meta["selection"] = {"mode": "sample", "k": 5, "samples": 9}
    with StoreWriter(tmp_path / "a", meta) as w:
        c = np.array([[4, 3, 2, 0, 0], [9, 0, 0, 0, 0], [1, 1, 1, 1, 5]])
        n = (c > 0).sum(1)
        w.add(0, [1, 2, 3], n, rng.choice(500, int(n.sum()), replace=False), c[c > 0].astype(np.uint8), [])
    x = LabelStore(tmp_path / "a")[0]
    np.testing.assert_allclose(x.probs.numpy(), c / 9.0, rtol=1e-6)
    assert (x.tail == 0).all()

    meta = make_meta(500, 6, codec="log8", encoding=encoding)
    meta["selection"] = {"mode": "topk+sample", "k": 6, "k_exact": 2, "samples": 4}
    codec = get_codec("log8")
    r = torch.tensor([[0.0, -1.0], [0.0, -0.5]])
    codes = codec.encode(r).numpy()
    tail = np.array([0.3, 0.2], np.float32)
    samp = [np.array([3, 1], np.uint8), np.array([4], np.uint8)]
    values = np.concatenate([codes[0], samp[0], codes[1], samp[1]])
    with StoreWriter(tmp_path / "b", meta) as w:
        w.add(0, [7, 8], [4, 3], [10, 11, 12, 13, 20, 21, 22], values, tail)
    x = LabelStore(tmp_path / "b")[0]
    wts = codec.decode(torch.from_numpy(codes)).double().numpy()
    exp0 = np.concatenate([0.7 * wts[0] / wts[0].sum(), 0.3 * np.array([3, 1]) / 4, [0, 0]])
    exp1 = np.concatenate([0.8 * wts[1] / wts[1].sum(), [0.2], [0, 0, 0]])
    np.testing.assert_allclose(x.probs.numpy(), np.stack([exp0, exp1]), rtol=1e-6, atol=1e-7)
    assert (x.tail == 0).all() and x.ids[0, :4].tolist() == [10, 11, 12, 13]
    np.testing.assert_allclose(x.probs.sum(1).numpy(), 1.0, rtol=1e-6)


def test_invalid_selection_parameters_refused(tmp_path):
    for sel, codec in [({"mode": "sample", "k": 5}, "count8"), ({"mode": "sample", "k": 5, "samples": 9}, "log8"),
                       ({"mode": "topk+sample", "k": 5, "k_exact": 2, "samples": 4}, "log8"),
                       ({"mode": "topp", "k": 5, "p": 1.5, "min_k": 1}, "log8"),
                       ({"mode": "topk", "k": 5}, "count8"),
                       ({"mode": "adaptive", "k": 5}, "log8"),
                       ({"mode": "adaptive", "k": 5, "mean_k": 6}, "log8"),
                       ({"mode": "adaptive", "k": 5, "mean_k": 2}, "count8")]:
        meta = make_meta(500, 5, codec=codec)
        meta["selection"] = sel
        with pytest.raises(StoreFormatError):
            StoreWriter(tmp_path / "x", meta)
    meta = make_meta(500, 5)  # the same shape with a valid mean_k is a store
    meta["selection"] = {"mode": "adaptive", "k": 5, "mean_k": 2.5}
    with StoreWriter(tmp_path / "ok", meta) as w:
        w.add(0, [1, 2], [1, 3], [10, 11, 12, 13], np.zeros(4, np.uint8), np.array([0.5, 0.25], np.float32))
    assert LabelStore(tmp_path / "ok").meta["selection"] == {"mode": "adaptive", "k": 5, "mean_k": 2.5}


def test_tail_prior_is_the_mean_teacher_distribution(tmp_path):
    rng = np.random.default_rng(3)
    rows = random_rows(12, vocab_size=300, k=4, seed=3)
    masses = [rng.random(300) * 5 for _ in range(3)]
    with StoreWriter(tmp_path / "s", make_meta(300, 4), shard_bytes=800) as w:
        for j, r in enumerate(rows):
            w.add(r["sample_id"], r["input_ids"], r["counts"], r["ids"], r["values"], r["tail"], r["doc_starts"])
            if j % 4 == 3:
                w.add_teacher_mass(masses[j // 4], 10)
    s = LabelStore(tmp_path / "s")
    mean = sum(masses) / 30
    expected = 0.9 * mean / mean.sum() + 0.1 / 300
    np.testing.assert_allclose(s.tail_prior(), expected, rtol=1e-5)
    assert verify_store(tmp_path / "s")["ok"]
    prior_file = tmp_path / "s" / "tail_prior.f32"
    data = bytearray(prior_file.read_bytes())
    data[5] ^= 1
    prior_file.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match="tail prior"):
        LabelStore(tmp_path / "s").tail_prior()
    assert not verify_store(tmp_path / "s")["ok"]


def test_finalize_removes_temp_files_of_dead_writers(tmp_path):
    rows = random_rows(3, seed=4)
    w = StoreWriter(tmp_path / "s", make_meta())
    write_rows(w, rows)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stray = tmp_path / "s" / f".tmp-manifest.json.{dead.stdout.strip()}"  # the older name, without a token
    stray.write_text("{half a manifest")
    stray2 = tmp_path / "s" / "commits" / f".tmp-r00000-000000.json.{dead.stdout.strip()}-0123abcd"
    stray2.write_text("{half a record")
    live = tmp_path / "s" / f".tmp-config.json.{os.getpid()}-89abcdef"  # this (live) process's: kept
    live.write_text("{")
    elsewhere = tmp_path / "s" / f".tmp-tail_prior.f32.{os.getppid()}-0badf00d-otherhost7"  # a live pid, but of
    elsewhere.write_text("x")  # another host: the probe cannot speak for it, and every rank is done: removed
    w.close()
    assert not stray.exists() and not stray2.exists() and live.exists() and not elsewhere.exists()
    assert len(LabelStore(tmp_path / "s")) == 3


def test_temporary_names_are_unique_per_write():
    """Two writers on different hosts of a shared filesystem may have the same pid: a random token in every
    temporary name keeps them from ever writing (or cleaning) the same temporary file."""
    from labelstore.store.manifest import tmp_name

    names = {tmp_name("config.json") for _ in range(100)}
    assert len(names) == 100
    assert all(n.startswith(f".tmp-config.json.{os.getpid()}-") for n in names)
