"""Remote inputs (``--data s3://...``) against the same bytes read from local files.

The reference is always the plan (or store) built from local copies of the very files uploaded to a real S3
endpoint (moto's server over HTTP, tests/s3_server.py): tokens, document starts and the data fingerprint must be
identical, and the recorded input names are the objects' full URLs. The fingerprint covers tokens only, so it does
not depend on where the bytes live: a store compiled from local files resumes from a bucket holding the same files.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
import zstandard
from _teachers import make_documents, make_tokenizer, save_teacher
from s3_server import fresh_s3fs

from labelstore.errors import InputDataError, RemoteStorageError
from labelstore.store import objectstore
from labelstore.teacher.inputs import InputConfig, build_plan

pytestmark = pytest.mark.usefixtures("one_thread")
CFG = InputConfig(max_length=40)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def docs():
    return make_documents(24, seed=11)


def plan_of(paths, tok, cfg=CFG):
    p = build_plan(paths, tok, cfg, len(tok))
    return ([p.sequence(i).tolist() for i in range(len(p))], [p.doc_starts(i).tolist() for i in range(len(p))],
            p.fingerprint), p.files


def upload_tree(local_root, bucket: str, prefix: str) -> None:
    fs = fresh_s3fs()
    for f in sorted(local_root.rglob("*")):
        if f.is_file():
            fs.pipe_file(f"{bucket}/{prefix}/{f.relative_to(local_root).as_posix()}", f.read_bytes())


def jsonl(docs, start=0) -> bytes:
    return "".join(json.dumps({"text": t, "n": start + i}) + "\n" for i, t in enumerate(docs)).encode()


def write_kind(path, docs, kind: str) -> None:
    if kind == "jsonl":
        path.write_bytes(jsonl(docs))
    elif kind == "json":
        path.write_text(json.dumps([{"text": t} for t in docs]))
    elif kind == "parquet":
        pq.write_table(pa.table({"text": docs}), path, row_group_size=7)
    elif kind == "feather":
        feather.write_feather(pa.table({"text": docs}), path, chunksize=5)
    elif kind == "arrow-stream":
        t = pa.table({"text": docs})
        with pa.ipc.new_stream(str(path), t.schema) as w:
            w.write_table(t, max_chunksize=5)
    elif kind == "jsonl.zst":
        path.write_bytes(zstandard.ZstdCompressor().compress(jsonl(docs)))
    elif kind == "jsonl.gz":
        path.write_bytes(gzip.compress(jsonl(docs)))
    elif kind == "jsonl.bz2":
        path.write_bytes(bz2.compress(jsonl(docs)))
    elif kind == "md.xz":
        path.write_bytes(lzma.compress("\n\n".join(docs).encode()))
    elif kind == "text":
        path.write_text("\n\n".join(docs))
    else:
        raise ValueError(kind)


NAMES = {"jsonl": "d.jsonl", "json": "d.json", "parquet": "d.parquet", "feather": "d.feather",
         "arrow-stream": "d.arrow", "jsonl.zst": "d.jsonl.zst", "jsonl.gz": "d.jsonl.gz", "jsonl.bz2": "d.jsonl.bz2",
         "md.xz": "d.md.xz", "text": "d.md"}


@pytest.mark.parametrize("kind", list(NAMES))
def test_one_object_plans_like_the_local_file(tmp_path, s3_bucket, tok, docs, kind):
    local = tmp_path / "c"
    local.mkdir()
    write_kind(local / NAMES[kind], docs, kind)
    upload_tree(local, s3_bucket, "corpus")
    want, _ = plan_of([local / NAMES[kind]], tok)
    url = f"s3://{s3_bucket}/corpus/{NAMES[kind]}"
    got, files = plan_of([url], tok)
    assert got == want
    assert files == [url]
    assert len(want[0]) > 3  # several sequences: packing crossed document and batch boundaries


def make_tree(root, docs) -> list[str]:
    """A folder like a real corpus: nested prefixes, several formats, files that a walk skips. Returns the
    relative names of the files a walk reads, in order."""
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a").mkdir()
    (root / ".cache").mkdir()
    (root / "__pycache__").mkdir()
    write_kind(root / "a" / "x.parquet", docs[:6], "parquet")
    write_kind(root / "a" / "y.parquet", docs[6:10], "parquet")
    write_kind(root / "b" / "deep" / "z.jsonl.zst", docs[10:16], "jsonl.zst")
    write_kind(root / "b" / "w.jsonl", docs[16:20], "jsonl")
    write_kind(root / "top.parquet", docs[20:], "parquet")
    (root / "notes.txt").write_text(docs[0])
    (root / ".hidden.jsonl").write_text("not json")  # skipped: hidden
    (root / ".cache" / "junk.jsonl").write_text("not json")  # skipped: hidden folder
    (root / "__pycache__" / "m.jsonl").write_text("not json")  # skipped
    return ["a/x.parquet", "a/y.parquet", "b/deep/z.jsonl.zst", "b/w.jsonl", "notes.txt", "top.parquet"]


@pytest.mark.parametrize("slash", ["/", ""])
def test_a_prefix_is_walked_like_a_local_folder(tmp_path, s3_bucket, tok, docs, slash):
    local = tmp_path / "tree"
    read = make_tree(local, docs)
    upload_tree(local, s3_bucket, "corpus/v1")
    want, want_files = plan_of([local], tok)
    got, files = plan_of([f"s3://{s3_bucket}/corpus/v1{slash}"], tok)
    assert got == want
    assert want_files == [str(local / r) for r in read]
    assert files == [f"s3://{s3_bucket}/corpus/v1/{r}" for r in read]


def test_globs_match_sorted_objects(tmp_path, s3_bucket, tok, docs):
    local = tmp_path / "tree"
    make_tree(local, docs)
    upload_tree(local, s3_bucket, "c")
    want, _ = plan_of([local / "a" / "x.parquet", local / "a" / "y.parquet", local / "top.parquet"], tok)
    got, files = plan_of([f"s3://{s3_bucket}/c/**/*.parquet"], tok)
    assert got == want
    assert files == [f"s3://{s3_bucket}/c/{r}" for r in ("a/x.parquet", "a/y.parquet", "top.parquet")]
    got, files = plan_of([f"s3://{s3_bucket}/c/a/*.parquet"], tok)
    want, _ = plan_of([local / "a" / "x.parquet", local / "a" / "y.parquet"], tok)
    assert got == want and len(files) == 2
    # remote and local entries mix, in the order given
    got, files = plan_of([f"s3://{s3_bucket}/c/b/w.jsonl", local / "top.parquet"], tok)
    want, _ = plan_of([local / "b" / "w.jsonl", local / "top.parquet"], tok)
    assert got == want and files == [f"s3://{s3_bucket}/c/b/w.jsonl", str(local / "top.parquet")]


# -------------------------------------------------------------------------------------------- errors
def upload(bucket, key, data: bytes) -> str:
    fresh_s3fs().pipe_file(f"{bucket}/{key}", data)
    return f"s3://{bucket}/{key}"


def test_bad_remote_inputs_name_the_problem(s3_bucket, tok, docs):
    upload(s3_bucket, "c/ok.jsonl", jsonl(docs[:3]))
    cases = [
        (f"s3://no-such-bucket-{s3_bucket[-8:]}/c/d.jsonl", "bucket 'no-such-bucket-"),
        (f"s3://no-such-bucket-{s3_bucket[-8:]}/c/*.jsonl", "does not exist"),
        (f"s3://{s3_bucket}/c/*.parquet", "no object matches"),
        (f"s3://{s3_bucket}/c/missing.jsonl", "no such object or prefix"),
        (f"s3://{s3_bucket}/nothing/", "no such object or prefix"),
        (f"s3://{s3_bucket}/c/ok.jsonl/", "is an object, not a prefix"),
    ]
    for url, msg in cases:
        with pytest.raises(InputDataError, match=msg):
            build_plan([url], tok, CFG, len(tok))
    # unknown kinds in a prefix (or among a glob's matches) are refused and listed, as in a local folder
    upload(s3_bucket, "c/sub/model.bin", b"\x00\x01")
    for url in (f"s3://{s3_bucket}/c", f"s3://{s3_bucket}/c/**"):
        with pytest.raises(InputDataError, match=r"1 file\(s\) of unknown kind \(\.bin\): sub/model\.bin.*--text-glob"):
            build_plan([url], tok, CFG, len(tok))
    # bytes that are not what the name says: the same errors as for a local file, naming the URL
    bad = upload(s3_bucket, "d/bad.parquet", b"not parquet at all")
    with pytest.raises(InputDataError, match=rf"{bad} is not a readable parquet file"):
        build_plan([bad], tok, CFG, len(tok))
    zst = upload(s3_bucket, "d/doc.jsonl", zstandard.ZstdCompressor().compress(jsonl(docs[:2])))
    with pytest.raises(InputDataError, match=rf"{zst}:1 is zstd \(\.zst\)-compressed.*\.zst"):
        build_plan([zst], tok, CFG, len(tok))
    saved = upload(s3_bucket, "ds/state.json", b"{}")
    upload(s3_bucket, "ds/dataset_info.json", b"{}")
    with pytest.raises(InputDataError, match="save_to_disk folder"):
        build_plan([saved.rsplit("/", 1)[0]], tok, CFG, len(tok))


def test_an_unreachable_endpoint_fails_after_retries(monkeypatch, s3_endpoint, tok):
    import s3fs

    monkeypatch.setattr(objectstore, "BACKOFF_S", 0.01)
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    monkeypatch.setenv(objectstore.OPTIONS_ENV, json.dumps({
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}))
    with pytest.raises(RemoteStorageError, match=r"s3://b-unreachable/c/d\.jsonl failed.*after 6 attempts"):
        build_plan(["s3://b-unreachable/c/d.jsonl"], tok, CFG, len(tok))


def test_access_denied_is_reported_not_retried(monkeypatch, s3_bucket, tok, docs):
    """moto's server grants everything: a filesystem whose reads are refused stands in for a bucket policy."""
    url = upload(s3_bucket, "c/d.jsonl", jsonl(docs[:3]))
    real = objectstore.filesystem
    calls = []

    class Denied:
        def __init__(self, fs):
            self.fs = fs

        def __getattr__(self, name):
            return getattr(self.fs, name)

        def info(self, path):
            calls.append(path)
            raise PermissionError("Access Denied")

    monkeypatch.setattr(objectstore, "filesystem", lambda u, o=None: (Denied(real(u, o)[0]), real(u, o)[1]))
    with pytest.raises(RemoteStorageError, match=rf"{url} failed: access denied"):
        build_plan([url], tok, CFG, len(tok))
    assert len(calls) == 1


# -------------------------------------------------------------------------------------------- compile
def store_rows(path) -> dict[int, tuple]:
    """Every stored sample by id, as plain arrays (what two equal stores must share)."""
    from labelstore.store.reader import LabelStore

    s = LabelStore(path)
    return {x.sample_id: tuple(t.numpy().copy() for t in (x.input_ids, x.ids, x.probs, x.tail, x.counts,
                                                           x.doc_starts)) for x in (s[i] for i in range(len(s)))}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tok):
    return save_teacher(tmp_path_factory.mktemp("teacher") / "llama", "llama", tok, extra_vocab=5)


def test_compile_from_a_bucket_writes_the_local_store(tmp_path, s3_bucket, tok, docs, teacher):
    from labelstore.cli import main as cli_main
    from labelstore.store.manifest import read_config
    from labelstore.teacher.compile import CompileOptions, compile_store
    from labelstore.teacher.resume_checks import check_inputs_still_there

    local = tmp_path / "tree"
    make_tree(local, docs)
    upload_tree(local, s3_bucket, "corpus")

    def run(data, out):
        res = compile_store(CompileOptions(teacher=str(teacher), data=data, out=str(out),
                                           selection="topk", k=8, max_length=64,
                                           tokens_per_batch=256, device="cpu", progress=False))
        return store_rows(out), res

    want, _ = run([str(local)], tmp_path / "local")
    # the command line, as a user types it
    assert cli_main(["compile", "--teacher", str(teacher), "--data", f"s3://{s3_bucket}/corpus/", "--out",
                     str(tmp_path / "remote"),
                     "--selection", "topk", "--k", "8", "--max-length", "64", "--tokens-per-batch", "256",
                     "--device", "cpu", "--quiet"]) == 0
    got = store_rows(tmp_path / "remote")
    assert len(got) > 3
    assert sorted(got) == sorted(want)
    for sid in want:
        for x, y in zip(got[sid], want[sid]):
            np.testing.assert_array_equal(x, y, err_msg=f"sample {sid}")
    cfg_local, cfg_remote = read_config(tmp_path / "local"), read_config(tmp_path / "remote")
    assert cfg_remote["compile_config"]["data"] == cfg_local["compile_config"]["data"]  # same fingerprint
    assert cfg_remote["runtime"]["data_files"][0] == f"s3://{s3_bucket}/corpus/a/x.parquet"

    # the same bytes, moved: the store compiled from local files resumes from the bucket (nothing left to do)
    again, res = run([f"s3://{s3_bucket}/corpus/"], tmp_path / "local")
    assert sorted(again) == sorted(want)
    assert res.samples == 0 and res.skipped == len(want)

    # a resume after an object vanished names it (existence asked of the bucket, not of the local disk)
    fresh_s3fs().rm(f"{s3_bucket}/corpus/b/w.jsonl")
    plan = build_plan([f"s3://{s3_bucket}/corpus/"], tok, InputConfig(max_length=64), len(tok) + 5)
    with pytest.raises(InputDataError, match=rf"no longer exist: s3://{s3_bucket}/corpus/b/w\.jsonl\. Restore"):
        check_inputs_still_there(tmp_path / "remote", plan)
    # objects that are still there are not named (only the vanished one is)
    fresh_s3fs().rm(f"{s3_bucket}/corpus/a/y.parquet")
    shutil.rmtree(local / "b")
    plan = build_plan([local], tok, InputConfig(max_length=64), len(tok) + 5)
    with pytest.raises(InputDataError, match=r"no longer exist: s3://\S+/corpus/a/y\.parquet, s3://\S+/b/w\.jsonl\. "):
        check_inputs_still_there(tmp_path / "remote", plan)
