"""Damaged and hostile stores: verify catches every corruption, the reader never returns wrong numbers,
and fuzzed manifests/shards only ever produce labelstore errors."""

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from store_factory import make_meta_v3, random_rows, read_all_rows, same_rows, write_rows

from labelstore.errors import LabelStoreError
from labelstore.store.format import with_digest
from labelstore.store.reader import LabelStore
from labelstore.store.writer import StoreWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import corrupt_store  # noqa: E402
import hostile_store  # noqa: E402


def test_random_corruptions_detected(tmp_path):
    """Two trials of each kind of damage (issue 20's kinds included): verify detects every one, the reader raises a
    labelstore error or returns identical data, nothing hangs."""
    n = 2 * len(corrupt_store.KINDS)
    rep = corrupt_store.run_trials(n, seed=1, workdir=tmp_path / "work")
    assert not corrupt_store.failures(rep), corrupt_store.failures(rep)
    assert rep["verify_detected"] == n and rep["hangs"] == 0 and rep["other_exceptions"] == 0


def test_hostile_store_suite_small():
    """A few cases of benchmarks/hostile_store.py, each in a forked child with a deadline: no hang, no other
    exception, nothing read wrong, nothing outside the store touched."""
    names = ["manifest is a FIFO", "shard is a directory", "row declares T = 2^24, k = 32 (zstd)",
             "v1 shard with Arrow body compression (huge doc_starts)", "manifest declares 2^31 rows, 1 TB, one shard",
             "shards/ is a link to a folder outside (user files there)", "lock file is a link to a file outside"]
    hostile_store.COMPRESSED_DOC_STARTS = 8 << 20  # the benchmark uses 256 MB
    rep = hostile_store.run_all(timeout=120, names=names)
    assert rep["cases"] == len(names)
    assert {r["outcome"] for r in rep["results"]} <= {"reader error", "writer refused"}, rep["results"]
    assert all(r.get("verify", "detected") == "detected" for r in rep["results"]), rep["results"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    p = tmp_path_factory.mktemp("fuzz") / "s"
    with StoreWriter(p, make_meta_v3(1000, 4), shard_bytes=3000) as w:
        write_rows(w, random_rows(10, vocab_size=1000, k=4, seed=2))
    return p


@pytest.fixture(scope="module")
def pristine_rows(pristine):
    return read_all_rows(pristine)


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                      st.text(max_size=20))
json_value = st.recursive(json_leaf, lambda c: st.one_of(st.lists(c, max_size=4),
                                                          st.dictionaries(st.text(max_size=10), c, max_size=4)),
                          max_leaves=20)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_manifest_only_raises_labelstore_errors(pristine, pristine_rows, tmp_path_factory, data):
    good = json.loads((pristine / "manifest.json").read_text())
    mode = data.draw(st.sampled_from(["replace_leaf", "random_json", "raw_bytes"]))
    if mode == "random_json":
        body = json.dumps(data.draw(json_value)).encode()
    elif mode == "raw_bytes":
        body = data.draw(st.binary(max_size=300))
    else:
        man = json.loads(json.dumps(good))
        keys = data.draw(st.lists(st.sampled_from(["meta", "shards", "totals", "format_version", "format"]),
                                  min_size=1, max_size=2))
        for key in keys:
            if key == "shards" and man["shards"]:
                i = data.draw(st.integers(0, len(man["shards"]) - 1))
                field = data.draw(st.sampled_from(sorted(man["shards"][i])))
                man["shards"][i][field] = data.draw(json_value)
            elif key == "meta":
                field = data.draw(st.sampled_from(sorted(man["meta"])))
                man["meta"][field] = data.draw(json_value)
            else:
                man[key] = data.draw(json_value)
        if data.draw(st.booleans()):  # a forger who also recomputes the digest: the edit itself must be caught
            man = with_digest({k: v for k, v in man.items() if k != "digest"})
        body = json.dumps(man).encode()
    d = tmp_path_factory.mktemp("m")
    shutil.copytree(pristine / "shards", d / "shards")
    (d / "manifest.json").write_bytes(body)
    try:
        rows = read_all_rows(d)
    except LabelStoreError:
        return
    # read without an error: then it must be the original data, never different numbers
    assert same_rows(rows, pristine_rows)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(min_size=0, max_size=4000), keep=st.integers(0, 3000))
def test_fuzzed_shard_bytes_only_raise_labelstore_errors(pristine, pristine_rows, tmp_path_factory, blob, keep):
    """A shard whose bytes are garbage (or a real prefix + garbage) but whose manifest entry matches its size and
    checksum, as a malicious store would: opening and reading raise labelstore errors only."""
    good = json.loads((pristine / "manifest.json").read_text())
    rec = good["shards"][0]
    data = (pristine / rec["path"]).read_bytes()[:keep] + blob
    d = tmp_path_factory.mktemp("b")
    (d / "shards").mkdir()
    (d / rec["path"]).write_bytes(data)
    rec = dict(rec, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    man = dict(good, shards=[rec])
    man["totals"] = dict(good["totals"], shards=1, samples=rec["rows"], tokens=rec["tokens"],
                         entries=rec["entries"], bytes=len(data))
    man = with_digest({k: v for k, v in man.items() if k != "digest"})  # forged consistently: the shard is parsed
    (d / "manifest.json").write_text(json.dumps(man))
    try:
        rows = read_all_rows(d)
    except LabelStoreError:
        return
    # read without an error: the rows it holds must be the original shard's rows, exactly
    first = [r for r in pristine_rows if rec["first_sample_id"] <= r[0] <= rec["last_sample_id"]][:rec["rows"]]
    assert same_rows(rows, first)


def test_symlinked_shards_refused(pristine, tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    (d / "manifest.json").write_bytes((pristine / "manifest.json").read_bytes())
    os.symlink(pristine / "shards", d / "shards")
    with pytest.raises(LabelStoreError, match="symbolic link"):
        LabelStore(d)
