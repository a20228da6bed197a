"""Input sources: JSON arrays, compressed files, Parquet codecs, folders with unknown files, Hugging Face datasets.

Every format is checked against the same documents written as plain JSONL: the plans (tokens, document starts
and fingerprint) must be identical. Nothing here reaches a network (datasets load local files only).
"""

from __future__ import annotations

import bz2
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from _teachers import make_documents, make_tokenizer

from labelstore.errors import InputDataError
from labelstore.teacher.hf_sources import object_sources
from labelstore.teacher.inputs import InputConfig, build_plan

datasets = pytest.importorskip("datasets")  # a dev dependency (pyproject [dev])

CFG = InputConfig(max_length=40)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def docs():
    return make_documents(25, seed=5)


def plan_of(paths, tok, cfg=CFG):
    p = build_plan(paths, tok, cfg, len(tok))
    return [p.sequence(i).tolist() for i in range(len(p))], [p.doc_starts(i).tolist() for i in range(len(p))], \
        p.fingerprint


@pytest.fixture(scope="module")
def ref(tmp_path_factory, tok, docs):
    d = tmp_path_factory.mktemp("ref")
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    return plan_of([d / "docs.jsonl"], tok)


def jsonl_bytes(docs) -> bytes:
    return "".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(docs)).encode()


@pytest.mark.parametrize("name", ["d.json", "d.jsonl.gz", "d.jsonl.zst", "d.jsonl.bz2", "d.json.gz"])
def test_json_arrays_and_compressed_files(tmp_path, tok, docs, ref, name):
    raw = json.dumps([{"text": t} for t in docs]).encode() if ".json." in name or name.endswith(".json") \
        else jsonl_bytes(docs)
    comp = {"gz": gzip.compress, "zst": zstandard.ZstdCompressor().compress, "bz2": bz2.compress}
    ext = name.rsplit(".", 1)[-1]
    (tmp_path / name).write_bytes(comp[ext](raw) if ext in comp else raw)
    assert plan_of([tmp_path / name], tok) == ref


def test_compressed_text_and_misnamed_compressed_files(tmp_path, tok, docs):
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(docs[0].encode()))
    (tmp_path / "a.txt").write_text(docs[0])
    assert plan_of([tmp_path / "a.txt.gz"], tok) == plan_of([tmp_path / "a.txt"], tok)
    (tmp_path / "b.jsonl").write_bytes(gzip.compress(jsonl_bytes(docs)))
    with pytest.raises(InputDataError, match=r"b\.jsonl:1 is gzip \(\.gz\)-compressed, not text: name it"):
        build_plan([tmp_path / "b.jsonl"], tok, CFG, len(tok))
    (tmp_path / "c.jsonl.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(InputDataError, match=r"cannot read input .*c\.jsonl\.gz"):
        build_plan([tmp_path / "c.jsonl.gz"], tok, CFG, len(tok))


@pytest.mark.parametrize("codec", ["zstd", "gzip", "brotli", "snappy", "lz4"])
def test_parquet_codecs(tmp_path, tok, docs, ref, codec):
    pq.write_table(pa.table({"text": docs}), tmp_path / "d.parquet", compression=codec)
    assert plan_of([tmp_path / "d.parquet"], tok) == ref


def test_folders_refuse_unknown_files_unless_text_glob(tmp_path, tok, docs):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.txt").write_text(docs[0])
    (d / "b.py").write_text(docs[1])
    (d / "c.py").write_text(docs[2])
    (d / "LICENSE").write_text("no")
    with pytest.raises(InputDataError, match=r"holds 3 file\(s\) of unknown kind \(.py, LICENSE\): LICENSE, b.py, "
                                             r"c.py\. Pass --text-glob"):
        build_plan([d], tok, CFG, len(tok))
    (d / "LICENSE").unlink()
    cfg = InputConfig(max_length=40, text_glob=("*.py",))
    plain = tmp_path / "plain"
    plain.mkdir()
    for i in range(3):
        (plain / f"{i}.txt").write_text(docs[i])
    assert plan_of([d], tok, cfg) == plan_of([plain], tok, cfg)
    assert plan_of([d / "b.py"], tok) == plan_of([plain / "1.txt"], tok)  # a file named explicitly is text


def test_save_to_disk_folders(tmp_path, tok, docs, ref):
    ds = datasets.Dataset.from_dict({"text": docs, "n": list(range(len(docs)))})
    ds.save_to_disk(str(tmp_path / "ds"))
    assert plan_of([tmp_path / "ds"], tok) == ref  # dataset_info.json and state.json are not compiled as text
    dd = datasets.DatasetDict({"train": ds, "test": ds.select(range(3))})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InputDataError, match=r"holds the splits \['train', 'test'\]: choose one with --split"):
        build_plan([tmp_path / "dd"], tok, CFG, len(tok))
    assert plan_of([tmp_path / "dd"], tok, InputConfig(max_length=40, split="train")) == ref
    # a shuffled, selected dataset object compiles in its own (index-mapped) order
    sub = ds.select([4, 2, 0])
    got = plan_of(object_sources(sub, CFG.sources), tok)
    (tmp_path / "sub.jsonl").write_text("".join(json.dumps({"text": docs[i]}) + "\n" for i in (4, 2, 0)))
    assert got == plan_of([tmp_path / "sub.jsonl"], tok)


@pytest.mark.parametrize("streaming", [False, True])
def test_load_dataset_data_files_with_split(tmp_path, tok, docs, ref, streaming):
    d = tmp_path / "hub"
    (d / "data").mkdir(parents=True)
    (d / "data" / "train.jsonl").write_bytes(jsonl_bytes(docs))
    (d / "data" / "test.jsonl").write_bytes(jsonl_bytes(docs[:2]))
    cfg = InputConfig(max_length=40, split="train", streaming=streaming)
    assert plan_of([f"hf:{d}"], tok, cfg) == ref
    with pytest.raises(InputDataError, match="cannot load dataset"):
        build_plan([f"hf:{tmp_path / 'nothing-here'}"], tok, cfg, len(tok))


def test_python_records_and_chat_tables(tmp_path, tok, docs, ref):
    assert plan_of(object_sources([{"text": t} for t in docs], CFG.sources), tok) == ref
    with pytest.raises(InputDataError, match=r"data= takes paths.*data=\[\{'text': t\} for t in texts\]"):
        object_sources(42, CFG.sources)
    tok2 = make_tokenizer()
    tok2.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    chats = [[{"role": "user", "content": d}, {"role": "assistant", "content": docs[-1 - i]}]
             for i, d in enumerate(docs[:5])]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    pq.write_table(pa.table({"messages": chats}), tmp_path / "c.parquet")
    cfg = InputConfig(max_length=40, assistant_only=True)
    a, b = build_plan([tmp_path / "c.jsonl"], tok2, cfg, len(tok2)), build_plan([tmp_path / "c.parquet"], tok2, cfg,
                                                                                 len(tok2))
    assert a.fingerprint == b.fingerprint and (a.label_mask == b.label_mask).all() and a.label_mask.any()
