"""`labelstore export`: a store as plain Parquet columns, read back by pyarrow and `datasets`, equal to the store."""

import json

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
from store_factory import make_meta, write_rows

from labelstore.cli import main
from labelstore.errors import ConfigMismatchError
from labelstore.store.writer import StoreWriter
from labelstore.student.dataset import StoreDataset
from labelstore.student.export import export_parquet, read_export_meta

V, K = 300, 5


def make_store(path, n=17, seed=0, **meta):
    """Rows with unique kept ids and variable counts (topp-like), so that lists of lists are ragged."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        T = int(rng.integers(0, 30))
        counts = rng.integers(1, K + 1, size=T)
        rows.append({"sample_id": 10 + i, "input_ids": rng.integers(0, V, size=T), "counts": counts,
                     "ids": np.concatenate([rng.choice(V, c, replace=False) for c in counts]) if T else np.zeros(0),
                     "values": rng.integers(0, 200, size=int(counts.sum())).astype(np.uint8),
                     "tail": (rng.random(T) * 0.5).astype(np.float32), "doc_starts": np.zeros(1, np.int32)})
    with StoreWriter(path, make_meta(V, K, **meta), shard_bytes=700) as w:
        write_rows(w, rows)
    return path


def assert_export_equals_store(rows, store):
    ds = StoreDataset(store)
    assert [r["sample_id"] for r in rows] == ds.store.sample_ids().tolist()
    for i, r in enumerate(rows):
        it = ds[i]
        m = it["teacher_mask"]
        assert r["input_ids"] == it["input_ids"].tolist()
        assert [len(x) for x in r["teacher_ids"]] == m.sum(1).tolist()
        for t in range(len(m)):
            assert r["teacher_ids"][t] == it["teacher_ids"][t][m[t]].tolist()
            # float32 -> Parquet float -> float32: bit for bit
            np.testing.assert_array_equal(np.array(r["teacher_probs"][t], np.float32), it["teacher_probs"][t][m[t]])
        np.testing.assert_array_equal(np.array(r["teacher_tail"], np.float32), it["teacher_tail"])
        assert r["position_mask"] == it["position_mask"].tolist()


@pytest.mark.parametrize("encoding", ["packed", "zstd"])
def test_parquet_export_round_trips_exactly(tmp_path, encoding):
    extra = {} if encoding == "packed" else {"encoding": {"name": "zstd"}}
    store = make_store(tmp_path / "s", **extra)
    res = export_parquet(store, tmp_path / "out", row_group_tokens=40, file_tokens=200)
    files = sorted((tmp_path / "out").glob("*.parquet"))
    assert [str(f) for f in files] == res["files"] and len(files) > 1
    groups = [pq.ParquetFile(f).metadata.row_group(g) for f in files for g in range(pq.ParquetFile(f).num_row_groups)]
    assert len(groups) > len(files)  # streaming-sized row groups
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    assert sum(len(r["input_ids"]) for r in rows) == res["tokens"] and len(rows) == res["rows"]
    assert_export_equals_store(rows, store)
    assert read_export_meta(files[0]) == StoreDataset(store).store.meta
    hf = datasets.load_dataset("parquet", data_dir=str(tmp_path / "out"), split="train")
    assert hf.num_rows == len(rows)
    assert_export_equals_store(list(hf), store)


def test_export_cli_and_refusals(tmp_path, capsys):
    store = make_store(tmp_path / "s", n=4)
    assert main(["export", str(store), str(tmp_path / "out")]) == 0
    assert "exported 4 sequences" in capsys.readouterr().out
    rows = pq.read_table(tmp_path / "out").to_pylist()
    assert_export_equals_store(rows, store)
    meta = json.loads(pq.read_schema(tmp_path / "out" / "part-00000.parquet").metadata[b"labelstore.meta"])
    assert meta["selection"] == {"mode": "topk", "k": K} and meta["vocab_size"] == V
    with pytest.raises(ConfigMismatchError, match="never overwrites"):
        export_parquet(store, tmp_path / "out")
    assert main(["export", str(store), str(tmp_path / "out")]) == 1
