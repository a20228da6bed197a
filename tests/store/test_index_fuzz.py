"""Fuzzed version-4 stores (docs/FORMAT.md section 11): damaged or forged ``index.arrow`` files and manifest index
references only ever produce labelstore errors, and a store that reads without an error reads the original numbers.

The forger cases rewrite the index through the writer's own column writer and recompute every digest (the block
sha256s and the manifest's), so only the reader's structural checks (bounds, order, row counts against the
shards) stand between the edit and a wrong answer: exactly what must hold for a hostile store.
"""

import json
import shutil

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from store_factory import make_meta, random_rows, read_all_rows, same_rows, write_rows

from labelstore.errors import LabelStoreError
from labelstore.store.format import with_digest
from labelstore.store.index import INDEX, INDEX_FIELDS, write_index_columns
from labelstore.store.verify import verify_store
from labelstore.store.writer import StoreWriter

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A version-4 store of 12 rows in several shards (one index block)."""
    p = tmp_path_factory.mktemp("fuzz4") / "s"
    with StoreWriter(p, make_meta(1000, 4), shard_bytes=500) as w:
        write_rows(w, random_rows(12, vocab_size=1000, k=4, seed=5))
    man = json.loads((p / "manifest.json").read_text())
    assert man["format_version"] == 4 and man["totals"]["shards"] >= 4
    return p


@pytest.fixture(scope="module")
def pristine_rows(pristine):
    rows = read_all_rows(pristine)
    assert len(rows) == 12
    return rows


def _copy(pristine, tmp_path_factory):
    d = tmp_path_factory.mktemp("c")
    shutil.copytree(pristine, d / "s")
    return d / "s"


def _outcome(path, pristine_rows) -> str:
    """Read everything: a labelstore error, or exactly the original rows (anything else fails the test)."""
    try:
        rows = read_all_rows(path)
    except LabelStoreError:
        return "error"
    assert same_rows(rows, pristine_rows), "a damaged store read without an error but with other numbers"
    return "same"


def _columns(path) -> dict:
    """index.arrow's columns as numpy (sha256 as uint8 [n * 32])."""
    t = pa.ipc.open_file(pa.memory_map(str(path / INDEX))).read_all()
    cols = {}
    for f in INDEX_FIELDS:
        col = t.column(f.name).combine_chunks()
        if f.name == "sha256":
            cols[f.name] = np.frombuffer(b"".join(col.to_pylist()), np.uint8).copy()
        else:
            cols[f.name] = col.to_numpy().copy()
    return cols


@FUZZ
@given(data=st.data())
def test_fuzzed_index_bytes_only_raise_labelstore_errors(pristine, pristine_rows, tmp_path_factory, data):
    """Random bytes of index.arrow changed, cut or appended, the manifest untouched."""
    d = _copy(pristine, tmp_path_factory)
    good = (pristine / INDEX).read_bytes()
    kind = data.draw(st.sampled_from(["flip", "truncate", "append", "replace"]))
    if kind == "flip":
        body = bytearray(good)
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(body) - 1))
            body[i] ^= data.draw(st.integers(1, 255))
        body = bytes(body)
    elif kind == "truncate":
        body = good[:data.draw(st.integers(0, len(good) - 1))]
    elif kind == "append":
        body = good + data.draw(st.binary(min_size=1, max_size=64))
    else:
        body = data.draw(st.binary(max_size=len(good) + 64))
    (d / INDEX).write_bytes(body)
    if _outcome(d, pristine_rows) == "same":
        # only bytes no reader looks at changed (e.g. Arrow padding); verify must still say whether it is whole
        assert isinstance(verify_store(d)["ok"], bool)


@FUZZ
@given(data=st.data())
def test_forged_index_entries_never_read_as_other_numbers(pristine, pristine_rows, tmp_path_factory, data):
    """An index entry edited by someone who recomputes every digest: a labelstore error or the original rows."""
    d = _copy(pristine, tmp_path_factory)
    cols = _columns(pristine)
    n = len(cols["rows"])
    field = data.draw(st.sampled_from([f.name for f in INDEX_FIELDS]))
    i = data.draw(st.integers(0, n - 1))
    if field == "sha256":
        j = data.draw(st.integers(0, 31))
        cols["sha256"][32 * i + j] ^= data.draw(st.integers(1, 255))
    else:
        old = int(cols[field][i])
        new = data.draw(st.one_of(st.integers(-2, 3).map(lambda x: old + x),
                                  st.sampled_from([0, -1, 2**31 - 1, 2**40])))
        dtype = cols[field].dtype
        if not np.iinfo(dtype).min <= new <= np.iinfo(dtype).max:
            new = old + 1
        cols[field][i] = new
    if data.draw(st.booleans()):  # swap two entries as well
        a, b = data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, n - 1))
        for k, v in cols.items():
            if k == "sha256":
                x = v[32 * a: 32 * a + 32].copy()
                v[32 * a: 32 * a + 32] = v[32 * b: 32 * b + 32]
                v[32 * b: 32 * b + 32] = x
            else:
                v[[a, b]] = v[[b, a]]
    blob, ref = write_index_columns(cols)
    (d / INDEX).write_bytes(blob)
    man = json.loads((pristine / "manifest.json").read_text())
    man["index"] = ref
    if data.draw(st.booleans()):  # a thorough forger also makes the totals agree with the forged entries
        man["totals"] = dict(man["totals"], samples=int(cols["rows"].sum()), tokens=int(cols["tokens"].sum()),
                             entries=int(cols["entries"].sum()), bytes=int(cols["bytes"].sum()))
    (d / "manifest.json").write_text(json.dumps(with_digest({k: v for k, v in man.items() if k != "digest"})))
    changed = any(not np.array_equal(v, w) for v, w in zip(cols.values(), _columns(pristine).values()))
    if _outcome(d, pristine_rows) == "same" and changed:
        # the reader accepted a changed index without a wrong number; verify, which checks every shard against
        # its entry, must still call the store damaged
        assert not verify_store(d)["ok"]


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                      st.text(max_size=12))


@FUZZ
@given(data=st.data())
def test_fuzzed_index_reference_only_raises_labelstore_errors(pristine, pristine_rows, tmp_path_factory, data):
    """The manifest's ``index`` object (path, bytes, shards, block_rows, blocks) edited, digest recomputed or not."""
    d = _copy(pristine, tmp_path_factory)
    man = json.loads((pristine / "manifest.json").read_text())
    ref = man["index"]
    key = data.draw(st.sampled_from(["path", "bytes", "shards", "block_rows", "blocks", "block", "whole"]))
    if key == "block":
        field = data.draw(st.sampled_from(["rows", "sha256"]))
        ref["blocks"][0][field] = data.draw(json_leaf)
    elif key == "whole":
        man["index"] = data.draw(json_leaf)
    elif key == "blocks":
        ref["blocks"] = data.draw(st.lists(st.dictionaries(st.sampled_from(["rows", "sha256"]), json_leaf),
                                           max_size=3))
    else:
        ref[key] = data.draw(st.one_of(json_leaf, st.integers(-1, 3).map(lambda x, k=key: ref[k] + x
                                                                         if isinstance(ref[k], int) else x)))
    body = {k: v for k, v in man.items() if k != "digest"}
    (d / "manifest.json").write_text(json.dumps(with_digest(body) if data.draw(st.booleans()) else man))
    _outcome(d, pristine_rows)


def test_a_real_shard_forged_to_zero_rows_is_refused_not_skipped(pristine, tmp_path_factory):
    """Found by the fuzzer above: the last shard's ``rows`` set to 0 (totals made to agree, digests recomputed)
    used to be skipped unread, its rows silently missing. A shard of 0 rows must hold nothing (FORMAT.md 11)."""
    d = _copy(pristine, tmp_path_factory)
    cols = _columns(pristine)
    cols["rows"][-1] = 0
    blob, ref = write_index_columns(cols)
    (d / INDEX).write_bytes(blob)
    man = json.loads((pristine / "manifest.json").read_text())
    man["index"] = ref
    man["totals"] = dict(man["totals"], samples=int(cols["rows"].sum()))
    (d / "manifest.json").write_text(json.dumps(with_digest({k: v for k, v in man.items() if k != "digest"})))
    with pytest.raises(LabelStoreError, match="shard index is damaged"):
        read_all_rows(d)
