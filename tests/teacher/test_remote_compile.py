"""`labelstore compile --out s3://...` against a real S3 endpoint (moto's server, started by the ``s3_endpoint``
fixture): the store in the bucket equals the store the same compile writes to a local directory, also after a
SIGKILL of the compile and a resume, and `--out` rules hold for prefixes as for folders."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _teachers import (
    Interrupt,
    interrupt_after,
    make_documents,
    make_tokenizer,
    raw_rows_differences,
    raw_store_rows,
    save_teacher,
    write_corpus,
)
from s3_server import fresh_s3fs

from labelstore.errors import OutputDirectoryError
from labelstore.teacher.compile import CompileOptions, compile_store

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("remote-compile")
    tok = make_tokenizer()
    docs = make_documents(24, seed=4)
    write_corpus(base / "corpus", docs)
    return {"teacher": save_teacher(base / "llama", "llama", tok), "corpus": base / "corpus", "base": base}


@pytest.fixture(autouse=True)
def spool(tmp_path, monkeypatch):
    monkeypatch.setenv("LABELSTORE_SPOOL_DIR", str(tmp_path / "spool"))


def opts(env, out, **kw) -> CompileOptions:
    base = dict(teacher=str(env["teacher"]), data=[str(env["corpus"])], out=str(out), selection="topk", k=8,
                max_length=64, tokens_per_batch=64, shard_mb=0.004, device="cpu", progress=False)
    base.update(kw)
    if base["selection"] in ("sample", "topk+sample") and "k" not in kw:  # --k sizes topk/topp stores only
        del base["k"]
    return CompileOptions(**base)


def download(url: str, dest: Path) -> Path:
    fresh_s3fs().get(url[len("s3://"):] + "/", str(dest), recursive=True)
    return dest


@pytest.fixture(scope="module")
def local_store(env):
    out = env["base"] / "local"
    compile_store(opts(env, out))
    return out


def test_compile_to_s3_equals_local(env, s3_bucket, local_store, tmp_path):
    url = f"s3://{s3_bucket}/labels/run1"
    res = compile_store(opts(env, url))
    assert res.samples > 0
    got = download(url, tmp_path / "down")
    assert not raw_rows_differences(raw_store_rows(got), raw_store_rows(local_store))
    np.testing.assert_array_equal(np.fromfile(got / "tail_prior.f32", "<f4"),
                                  np.fromfile(local_store / "tail_prior.f32", "<f4"))
    again = compile_store(opts(env, url))  # a finished store: nothing recomputed
    assert again.skipped == res.samples
    # train from the bucket: the loader's batches equal those of the store compiled to a local folder
    from labelstore import StoreDataset, StoreLoader

    def batches(path, **kw):
        return list(StoreLoader(StoreDataset(path, **kw), batch_size=3, seed=5, rank=0, world_size=1))

    remote, local = batches(url, cache_dir=str(tmp_path / "cache")), batches(local_store)
    assert len(remote) == len(local) > 1
    for a, b in zip(remote, local):
        assert a.keys() == b.keys()
        for key in a:
            if hasattr(a[key], "shape"):
                assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("fault", ["shard-uploaded:2", "record-uploaded:4"])
def test_sigkilled_compile_to_s3_resumes_to_the_same_store(env, s3_bucket, local_store, tmp_path, fault):
    url = f"s3://{s3_bucket}/st"
    o = opts(env, url)
    args = ["compile", "--teacher", o.teacher, "--data", *o.data, "--out", url,
            "--selection", "topk", "--k", "8", "--max-length", "64",
            "--tokens-per-batch", "64", "--shard-mb", "0.004", "--device", "cpu", "--quiet"]
    p = subprocess.run([sys.executable, "-m", "labelstore", *args], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "LABELSTORE_FAULT": fault}, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    res = compile_store(opts(env, url))
    assert res.skipped > 0  # shards committed before the kill were kept
    got = download(url, tmp_path / "down")
    assert not raw_rows_differences(raw_store_rows(got), raw_store_rows(local_store))


def test_prefix_with_other_objects_is_refused_and_overwrite_discards_only_the_store(env, s3_bucket, tmp_path):
    fs = fresh_s3fs()
    fs.pipe_file(f"{s3_bucket}/data/notes.txt", b"a user's file")
    with pytest.raises(OutputDirectoryError, match="not a label store"):
        compile_store(opts(env, f"s3://{s3_bucket}/data"))
    assert fs.find(f"{s3_bucket}/data") == [f"{s3_bucket}/data/notes.txt"]
    url = f"s3://{s3_bucket}/st"
    compile_store(opts(env, url, k=4))
    fs.pipe_file(f"{s3_bucket}/st/README", b"kept")  # not the store's own: --overwrite leaves it
    with pytest.raises(Exception, match="overwrite"):
        compile_store(opts(env, url, k=8))
    compile_store(opts(env, url, k=8, overwrite=True))
    assert fs.cat(f"{s3_bucket}/st/README") == b"kept"
    got = download(url, tmp_path / "down")
    assert max(len(r["counts"]) and int(r["counts"].max()) for r in raw_store_rows(got).values()) == 8


def test_cli_compile_to_s3_prints_the_remote_store_summary(env, s3_bucket, capsys):
    from labelstore.cli import main

    url = f"s3://{s3_bucket}/cli"
    assert main(["compile", "--teacher", str(env["teacher"]), "--data", str(env["corpus"]), "--out", url,
                 "--selection", "topk", "--k", "4",
                 "--max-length", "64", "--device", "cpu", "--tokens-per-batch", "auto"]) == 0
    out = capsys.readouterr().out
    assert f"store           {url}" in out and "compiled" in out
    assert main(["info", url]) == 0 and f"store           {url}" in capsys.readouterr().out


def test_torchrun_two_ranks_to_s3_equal_one_local_process(env, s3_bucket, local_store, tmp_path):
    """Two ranks (torchrun, gloo) write one store in the bucket: each rank its own spool, lock and shards; rank 0
    finalizes once both done markers are there. Its rows equal the one-process local compile."""
    url = f"s3://{s3_bucket}/two"
    o = opts(env, url)
    args = ["compile", "--teacher", o.teacher, "--data", *o.data, "--out", url,
            "--selection", "topk", "--k", "8", "--max-length", "64",
            "--tokens-per-batch", "64", "--shard-mb", "0.004", "--device", "cpu", "--quiet"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "labelstore",
           *args]
    p = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    names = fresh_s3fs().find(f"{s3_bucket}/two/shards")
    assert any("/r00000-" in n for n in names) and any("/r00001-" in n for n in names)
    got = download(url, tmp_path / "down")
    assert not raw_rows_differences(raw_store_rows(got), raw_store_rows(local_store))


def test_units_plan_from_and_to_s3_resumes_to_the_local_store(env, s3_bucket, tmp_path, monkeypatch):
    """--plan units with inputs and store in a bucket: interrupted after 3 commits, resumed, it equals the same
    compile from local copies into a folder (same unit names, so the same config); then an input object whose
    labels are committed is rewritten: the next resume is refused, naming it."""
    from labelstore.errors import InputDataError

    fs = fresh_s3fs()
    fs.put(str(env["corpus"]) + "/", f"{s3_bucket}/corpus/", recursive=True)
    url, data = f"s3://{s3_bucket}/labels/units", [f"s3://{s3_bucket}/corpus/"]
    with monkeypatch.context() as m:
        interrupt_after(m, 3)
        with pytest.raises(Interrupt):
            compile_store(opts(env, url, data=data, plan="units"))
    resumed = compile_store(opts(env, url, data=data, plan="units"))
    assert resumed.skipped > 0 and resumed.units["skipped_units"] > 0
    compile_store(opts(env, tmp_path / "local", plan="units"))
    got = download(url, tmp_path / "down")
    assert not raw_rows_differences(raw_store_rows(got), raw_store_rows(tmp_path / "local"))
    fs.pipe(f"{s3_bucket}/corpus/doc0000.txt", b"a different first document")
    with pytest.raises(InputDataError, match=r"doc0000\.txt \(work unit 0\) changed after its labels were committed"):
        compile_store(opts(env, url, data=data, plan="units"))
