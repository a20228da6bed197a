"""Reading a store from object storage (moto's S3 server): the same samples and batches as the local copy of the
same store, the shard cache (hits, sha256 at download, size limit), prefetch order, `info`/`verify` on a URL, and
the errors (no bucket, no store, unreachable endpoint)."""

import pickle
import shutil
import uuid

import numpy as np
import pytest
import torch
from store_factory import make_meta, random_rows, write_rows

from labelstore.cli import main
from labelstore.errors import RemoteStorageError, StoreCorruptError, StoreFormatError, StoreNotFinalizedError
from labelstore.store import objectstore, shard_cache
from labelstore.store.reader import LabelStore
from labelstore.store.writer import StoreWriter
from labelstore.student.dataset import StoreDataset, StoreIterableDataset
from labelstore.student.loader import StoreLoader
from labelstore.student.mixture import StoreMixture

pytestmark = pytest.mark.usefixtures("one_thread")
V, K = 300, 4


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    p = tmp_path_factory.mktemp("remote") / "store"
    with StoreWriter(p, make_meta(V, K), shard_bytes=600) as w:
        write_rows(w, random_rows(40, vocab_size=V, k=K, seed=3, max_len=20))
        w.add_teacher_mass(np.random.default_rng(0).random(V), 10)
    assert LabelStore(p).num_shards >= 6
    return p


def upload(local_dir, prefix=None, *, skip=()):
    """A fresh bucket holding a copy of ``local_dir``; returns the store's URL."""
    from s3_server import fresh_s3fs, make_bucket

    bucket = f"rd-{uuid.uuid4().hex[:12]}"
    make_bucket(bucket)
    prefix = prefix or "runs/store"
    fs = fresh_s3fs()
    for f in sorted(local_dir.rglob("*")):
        rel = f.relative_to(local_dir).as_posix()
        if f.is_file() and rel not in skip:
            fs.put_file(str(f), f"{bucket}/{prefix}/{rel}")
    return f"s3://{bucket}/{prefix}"


@pytest.fixture(scope="module")
def url(s3_endpoint, local):
    return upload(local)


def rewrite(url, rel, data):
    from s3_server import fresh_s3fs

    fresh_s3fs().pipe_file(url[len("s3://"):] + "/" + rel, data)


def same_sample(a, b):
    for f in ("input_ids", "ids", "probs", "tail", "counts", "doc_starts"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert a.sample_id == b.sample_id


def same_batch(a, b):
    assert a.keys() == b.keys()
    for key, val in a.items():
        if isinstance(val, torch.Tensor):
            assert torch.equal(val, b[key]), key
        else:
            assert val == b[key], key


def shard_paths(local):
    return [r["path"] for r in LabelStore(local).shards.records()]


# ------------------------------------------------------------------------------------------ same data
def test_remote_store_reads_the_same_samples_and_bytes(local, url, tmp_path):
    ref, rem = LabelStore(local), LabelStore(url, cache_dir=tmp_path)
    assert len(rem) == len(ref) and rem.manifest == ref.manifest
    for i in range(len(ref)):
        same_sample(ref[i], rem[i])
    np.testing.assert_array_equal(rem.tail_prior(), ref.tail_prior())
    for rel in shard_paths(local):  # the cached shard is the stored object, byte for byte
        assert (rem.root / rel).read_bytes() == (local / rel).read_bytes()
    assert repr(rem).startswith(f"LabelStore({url!r}")
    again = pickle.loads(pickle.dumps(rem))
    assert again.path == url and repr(again) == repr(rem)
    same_sample(again[len(ref) - 1], ref[len(ref) - 1])


def test_loader_batches_equal_local_with_shuffle_and_two_ranks(local, url, tmp_path):
    for rank in (0, 1):
        ref = StoreLoader(StoreDataset(local), 3, shuffle=True, seed=7, rank=rank, world_size=2)
        ds = StoreDataset(url, cache_dir=tmp_path, prefetch=2)
        rem = StoreLoader(ds, 3, shuffle=True, seed=7, rank=rank, world_size=2)
        for epoch in (0, 1):
            ref.set_epoch(epoch)
            rem.set_epoch(epoch)
            got = list(rem)
            want = list(ref)
            assert len(got) == len(want) > 3
            for a, b in zip(got, want):
                same_batch(a, b)
            # the loader announced this epoch's reads: shards in the order the rank first touches them
            order = []
            for i in rem.sampler.epoch_indices():
                s = int(np.searchsorted(ds.store.shard_starts, i, side="right")) - 1
                if s not in order:
                    order.append(s)
            assert ds.store.shard_plan.tolist() == order


def test_worker_processes_and_iterable_dataset_read_remote(local, url, tmp_path):
    ref = StoreLoader(StoreDataset(local), 4, shuffle=True, seed=1)
    rem = StoreLoader(StoreDataset(url, cache_dir=tmp_path), 4, shuffle=True, seed=1, num_workers=1)
    for a, b in zip(list(rem), list(ref), strict=True):
        same_batch(a, b)
    it_ref = StoreIterableDataset(local, rank=1, world_size=2, batch_size=5)
    it_rem = StoreIterableDataset(url, rank=1, world_size=2, batch_size=5, cache_dir=tmp_path / "b")
    for a, b in zip(list(it_rem), list(it_ref), strict=True):
        same_batch(a, b)
    mix_ref = StoreMixture([local, local], weights=[1, 2], seed=4)
    mix = StoreMixture([url, local], weights=[1, 2], seed=4, cache_dir=tmp_path / "c")
    mix.will_read(np.arange(len(mix)))
    for i in range(0, len(mix), 3):
        a, b = mix[i], mix_ref[i]
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_first_access_order_follows_the_indices():
    starts = np.array([0, 3, 5, 9])
    assert shard_cache.first_access_order(starts, [8, 0, 7, 4, 1, 3]).tolist() == [2, 0, 1]
    assert shard_cache.first_access_order(starts, []).tolist() == []


# ------------------------------------------------------------------------------------------ the cache
def count_downloads(monkeypatch):
    calls = []
    real = shard_cache.RemoteShards._copy

    def counted(self, rpath, tmp, expected):
        calls.append(rpath)
        return real(self, rpath, tmp, expected)

    monkeypatch.setattr(shard_cache.RemoteShards, "_copy", counted)
    return calls


def test_second_open_reads_from_the_cache(local, url, tmp_path, s3_endpoint, monkeypatch):
    calls = count_downloads(monkeypatch)
    first = LabelStore(url, cache_dir=tmp_path, prefetch=0)
    for i in range(len(first)):
        first[i]
    n = len(shard_paths(local))
    assert len(calls) == n  # each shard downloaded once
    before = s3_endpoint.requests
    second = LabelStore(url, cache_dir=tmp_path, prefetch=3)
    for i in range(len(second)):
        same_sample(second[i], first[i])
    assert len(calls) == n  # nothing downloaded again
    assert s3_endpoint.requests - before < n  # only the manifest was fetched
    assert second.root == first.root


def test_changed_store_at_the_same_url_gets_its_own_cache(local, tmp_path, s3_endpoint):
    url = upload(local)
    a = LabelStore(url, cache_dir=tmp_path, prefetch=0)
    a[0]
    other = tmp_path / "other"
    with StoreWriter(other, make_meta(V, K), shard_bytes=600) as w:
        write_rows(w, random_rows(12, vocab_size=V, k=K, seed=9, max_len=20))
    from s3_server import fresh_s3fs

    fs = fresh_s3fs()
    fs.rm(url[len("s3://"):], recursive=True)
    for f in other.rglob("*"):
        if f.is_file():
            fs.put_file(str(f), url[len("s3://"):] + "/" + f.relative_to(other).as_posix())
    b = LabelStore(url, cache_dir=tmp_path, prefetch=0)
    assert b.root != a.root and b.root.parent == a.root.parent
    ref = LabelStore(other)
    for i in range(len(ref)):
        same_sample(b[i], ref[i])


def test_replaced_or_truncated_object_is_refused_at_download_and_never_kept(local, tmp_path, s3_endpoint):
    url = upload(local)
    paths = shard_paths(local)
    good = (local / paths[1]).read_bytes()
    rewrite(url, paths[1], bytes([good[0] ^ 1]) + good[1:])  # same size, one bit flipped
    rewrite(url, paths[2], (local / paths[2]).read_bytes()[:-5])  # truncated
    store = LabelStore(url, cache_dir=tmp_path, prefetch=0)
    same_sample(store[0], LabelStore(local)[0])
    first = [int(store.shard_starts[s]) for s in (1, 2)]
    with pytest.raises(StoreCorruptError, match=f"{url}/{paths[1]}.*sha256"):
        store[first[0]]
    with pytest.raises(StoreCorruptError, match=f"{url}/{paths[2]} is .* bytes, the manifest says"):
        store[first[1]]
    kept = sorted(p.name for p in (store.root / "shards").iterdir())
    assert kept == [paths[0].split("/")[1]]  # nothing of the damaged objects, no temporary file
    rewrite(url, paths[1], good)  # repaired upstream: the same cache serves it now
    same_sample(store[first[0]], LabelStore(local)[first[0]])


def test_missing_object_and_prefetch_errors_surface_where_the_shard_is_read(local, tmp_path, s3_endpoint):
    url = upload(local, skip={shard_paths(local)[1]})
    store = LabelStore(url, cache_dir=tmp_path, prefetch=2)
    store[0]  # prefetches shards 1 and 2 in the background; 1 fails there, quietly
    with pytest.raises(StoreCorruptError, match=f"{url}/{shard_paths(local)[1]} listed in the manifest is missing"):
        store[int(store.shard_starts[1])]
    same_sample(store[int(store.shard_starts[2])], LabelStore(local)[int(store.shard_starts[2])])


def test_cache_size_limit_evicts_least_recently_opened(local, url, tmp_path, monkeypatch):
    calls = count_downloads(monkeypatch)
    sizes = [(local / p).stat().st_size for p in shard_paths(local)]
    limit = int(max(sizes) * 2.5)
    store = LabelStore(url, cache_dir=tmp_path, cache_bytes=limit, prefetch=0, max_open_shards=1)
    ref = LabelStore(local)
    for i in range(len(ref)):
        same_sample(store[i], ref[i])
    held = sorted((store.root / "shards").iterdir())
    assert sum(p.stat().st_size for p in held) <= limit
    assert 1 <= len(held) < len(sizes)
    assert held[-1].name == shard_paths(local)[-1].split("/")[1]  # the most recently read one stays
    n = len(calls)
    same_sample(store[0], ref[0])  # evicted: downloaded again, correctly
    assert len(calls) == n + 1


# ------------------------------------------------------------------------------------------ info / verify
def test_info_and_verify_on_a_url(local, url, capsys):
    assert main(["info", url]) == 0
    out = capsys.readouterr().out
    assert f"store           {url}" in out and "samples         40" in out
    assert main(["verify", url]) == 0
    assert "OK:" in capsys.readouterr().out


def test_verify_url_names_deleted_truncated_and_replaced_shards(local, s3_endpoint, capsys):
    paths = shard_paths(local)
    url = upload(local, skip={paths[0]})
    b1, b2 = (local / paths[1]).read_bytes(), (local / paths[2]).read_bytes()
    rewrite(url, paths[1], b1[:-7])
    rewrite(url, paths[2], b2[:100] + bytes(255 - x for x in b2[100:110]) + b2[110:])
    assert main(["verify", url]) == 1
    out = capsys.readouterr().out
    assert f"problem(s) in {url}" in out
    assert f"{paths[0]}: missing" in out
    assert f"{paths[1]}: {len(b1) - 7} bytes, manifest says {len(b1)}" in out
    assert f"{paths[2]}: sha256 mismatch" in out
    assert "/tmp" not in out and "labelstore-remote-" not in out


def test_unfinished_remote_store_says_so(local, s3_endpoint, capsys):
    url = upload(local, skip={"manifest.json"})
    for cmd in ("info", "verify"):
        assert main([cmd, url]) == 1
        out = capsys.readouterr().out
        assert f"{url}: an unfinished store" in out and "no manifest.json yet" in out, out
    with pytest.raises(StoreNotFinalizedError, match=f"{url} has committed shards but no manifest.json"):
        LabelStore(url)


# ------------------------------------------------------------------------------------------ errors
def test_missing_bucket_and_missing_prefix(url, tmp_path, capsys):
    bucket = f"no-such-{uuid.uuid4().hex[:10]}"
    with pytest.raises(RemoteStorageError, match=f"s3://{bucket}/x.*bucket does not exist"):
        LabelStore(f"s3://{bucket}/x", cache_dir=tmp_path)
    empty = url.rsplit("/", 1)[0] + "/nothing-here"
    with pytest.raises(StoreFormatError, match=f"{empty} has no manifest.json; it is not a labelstore store"):
        LabelStore(empty, cache_dir=tmp_path)
    assert main(["info", f"s3://{bucket}/x"]) == 1
    assert "bucket does not exist" in capsys.readouterr().err
    assert main(["verify", empty]) == 1
    assert f"{empty} is not a label store" in capsys.readouterr().out


def test_unreachable_endpoint_fails_after_retries_without_showing_secrets(tmp_path, monkeypatch, s3_endpoint):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(objectstore, "RETRIES", 2)
    monkeypatch.setattr(objectstore, "BACKOFF_S", 0.01)
    opts = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "AKIDUNREACHABLE", "secret": "hunter2-secret",
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}
    with pytest.raises(RemoteStorageError) as err:
        LabelStore("s3://bucket-x/store", storage_options=opts, cache_dir=tmp_path)
    msg = str(err.value)
    assert "s3://bucket-x/store/manifest.json" in msg and "after 2 attempts" in msg
    assert "hunter2-secret" not in msg and "AKIDUNREACHABLE" not in msg


def test_local_paths_keep_no_cache(local, tmp_path, monkeypatch):
    monkeypatch.setenv(shard_cache.CACHE_DIR_ENV, str(tmp_path / "cache"))
    copy = tmp_path / "copy"
    shutil.copytree(local, copy)
    store = LabelStore(f"file://{copy}")
    store.will_read(np.arange(len(store)))
    same_sample(store[3], LabelStore(local)[3])
    assert store.shard_plan is None and store.root == copy and not (tmp_path / "cache").exists()


def test_shard_shuffle_makes_each_rank_download_about_its_share(local, url, tmp_path, monkeypatch):
    """shuffle="shards": each of 2 ranks downloads its own shards (a block of the epoch's shard order, plus at most
    one shared at the edge), not every shard; the batches equal the local store's under the same order."""
    calls = count_downloads(monkeypatch)
    S = LabelStore(local).num_shards
    got = set()
    for rank in (0, 1):
        calls.clear()
        ref = StoreLoader(StoreDataset(local), 2, shuffle="shards", shard_window=1, seed=4, rank=rank, world_size=2)
        rem = StoreLoader(StoreDataset(url, cache_dir=tmp_path / f"c{rank}", prefetch=0), 2, shuffle="shards",
                          shard_window=1, seed=4, rank=rank, world_size=2)
        for a, b in zip(list(rem), list(ref), strict=True):
            same_batch(a, b)
        assert len(calls) == len(set(calls)) <= -(-S // 2) + 1
        got |= set(calls)
    assert len(got) == S  # together the ranks read every shard
