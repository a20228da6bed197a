"""First contact: what a new user's mistakes get (a one-line error, exit status 2 for arguments, 1 otherwise,
nothing written or damaged), the output directory rules (--overwrite), honest truncation accounting, progress in
a log, and the Python API taking objects as well as paths."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _teachers import (
    load_model,
    make_documents,
    make_tokenizer,
    raw_rows_differences,
    raw_store_rows,
    save_teacher,
    snapshot,
    write_corpus,
)

from labelstore.cli import main as cli_main
from labelstore.errors import ConfigMismatchError, InputDataError
from labelstore.store.info import summary
from labelstore.teacher.compile import CompileOptions, compile_store
from labelstore.teacher.progress import ProgressLog

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("first")
    tok = make_tokenizer()
    docs = make_documents(16, seed=4)
    write_corpus(base / "corpus", docs)
    return {"base": base, "tok": tok, "docs": docs, "teacher": save_teacher(base / "llama", "llama", tok),
            "corpus": base / "corpus"}


def args(env, out, *extra) -> list[str]:
    return ["compile", "--teacher", str(env["teacher"]), "--data", str(env["corpus"]), "--out", str(out),
            "--selection", "topk", "--k", "8",
            "--max-length", "48", "--tokens-per-batch", "96", "--device", "cpu", "--quiet", *extra]


def run_cli(argv, capsys) -> tuple[int, str]:
    rc = cli_main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--max-length", "0"], "--max-length must be a positive integer, got 0"),
    (["--max-length", "-4"], "--max-length must be a positive integer, got -4"),
    (["--max-samples", "0"], "--max-samples must be a positive integer, got 0"),
    (["--device", "gpu"], "--device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
    pytest.param(["--device", "cuda"],
                 "--device cuda: this torch build has no CUDA support; use --device cpu (or auto)",
                 marks=pytest.mark.skipif(torch.cuda.is_available() or torch.version.cuda is not None,
                                          reason="needs a CPU-only torch build")),
    (["--selection", "topk", "--k", "-5"], "--k must be >= 1, got -5"),
])
def test_argument_errors_exit_2_with_one_line_and_write_nothing(env, tmp_path, capsys, extra, message):
    out = tmp_path / "s"
    rc, err = run_cli(args(env, out, *extra), capsys)
    assert rc == 2
    assert err == f"labelstore compile: error: {message}\n"
    assert not out.exists()


def test_missing_local_teacher_is_named_at_once(env, tmp_path, capsys):
    out = tmp_path / "s"
    argv = args(env, out)
    argv[argv.index("--teacher") + 1] = str(tmp_path / "no-such-model")
    t0 = time.monotonic()
    rc, err = run_cli(argv, capsys)
    assert rc == 1 and time.monotonic() - t0 < 10
    assert err == (f"labelstore compile: error: --teacher {tmp_path / 'no-such-model'}: no such directory (a local "
                   "model directory, or a hub name such as org/model)\n")
    assert not out.exists()


def test_out_that_is_a_users_folder_or_a_file_is_refused(env, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    before = snapshot(mine)
    rc, err = run_cli(args(env, mine), capsys)
    assert rc == 1 and "is a non-empty directory that is not a label store (it holds notes.txt)" in err
    assert err.count("\n") == 1 and snapshot(mine) == before and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    rc, err = run_cli(args(env, mine / "notes.txt"), capsys)
    assert rc == 1 and "is a file, not a directory" in err and snapshot(mine) == before


def test_k_above_the_vocabulary_is_said_once(env, tmp_path, capsys):
    rc, err = run_cli(args(env, tmp_path / "s", "--selection", "topk", "--k", "1000"), capsys)
    V = len(env["tok"])
    assert rc == 0
    assert err.count(f"--k 1000 is more than the teacher's vocabulary ({V:,}): every position keeps at most") == 1


def test_failed_first_batch_then_corrected_command_and_overwrite(env, tmp_path, capsys):
    tok = env["tok"]
    bad = save_teacher(tmp_path / "nan", "llama", tok, nan_token=tok.eos_token_id)  # every batch has an EOS
    out = tmp_path / "s"
    argv = args(env, out)
    argv[argv.index("--teacher") + 1] = str(bad)
    rc, err = run_cli(argv, capsys)
    assert rc == 1 and "invalid logits" in err
    rc = cli_main(["info", str(out)])
    said = capsys.readouterr().out
    assert rc == 1 and "an unfinished store with no committed shard" in said
    # the corrected command replaces the empty unfinished store (nothing committed, nothing lost)
    rc, err = run_cli(args(env, out), capsys)
    assert rc == 0 and "held an unfinished store with no committed shard" in err
    ref = tmp_path / "ref"
    assert cli_main(args(env, ref)) == 0
    assert not _differs(raw_store_rows(out), raw_store_rows(ref))
    # a store with committed shards is replaced only with --overwrite
    before = snapshot(out)
    rc, err = run_cli(args(env, out, "--max-length", "40"), capsys)
    assert rc == 1 and "--overwrite to discard its" in err and snapshot(out) == before
    rc, err = run_cli(args(env, out, "--max-length", "40", "--overwrite"), capsys)
    assert rc == 0 and summary(out)["max_length"] == 40
    fresh = tmp_path / "fresh"
    assert cli_main(args(env, fresh, "--max-length", "40")) == 0
    assert not _differs(raw_store_rows(out), raw_store_rows(fresh))


def _differs(a, b) -> bool:
    return bool(raw_rows_differences(a, b))


def test_truncation_is_counted_and_reported(env, tmp_path, capsys):
    tok = env["tok"]
    out = tmp_path / "s"
    argv = [a for a in args(env, out, "--truncate", "--max-length", "20") if a != "--quiet"]
    rc, err = run_cli(argv, capsys)
    assert rc == 0
    lengths = [len(tok(d)["input_ids"]) + 1 for d in env["docs"] if d]  # + the EOS
    cut = [n - 20 for n in lengths if n > 20]
    assert (f"--truncate cut {len(cut):,} of {len(lengths):,} documents at --max-length 20, dropping "
            f"{sum(cut):,} of {sum(lengths):,} tokens") in err
    st = summary(out)["input_stats"]
    assert (st["truncated_documents"], st["truncated_tokens"]) == (len(cut), sum(cut))


def test_progress_lines_in_a_log(tmp_path):
    import io

    buf = io.StringIO()
    bar = ProgressLog(total=10, desc="compile", every=0.0, file=buf)
    bar.set_postfix_str("1,000 tokens, 500 tok/s, 9.0 B/tok")
    bar.update(4)
    bar.close()
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("compile: 4/10 sequences (40.0%), 1,000 tokens, 500 tok/s, 9.0 B/tok, ETA ")
    # a compile whose stderr is a file (a batch job's log) prints such lines (and tokenizing ones) on its own



def test_a_compile_logging_to_a_file_prints_progress_lines(env, tmp_path):
    code = ("import sys, labelstore.teacher.progress as p, labelstore.teacher.compile as c; p.LOG_EVERY = 0.0; "
            "c.PROGRESS_EVERY = 0.0; from labelstore.cli import main; sys.exit(main(sys.argv[1:]))")
    argv = [a for a in args(env, tmp_path / "s") if a != "--quiet"]
    with open(tmp_path / "log", "w") as log:  # stderr is a file, not a terminal
        r = subprocess.run([sys.executable, "-c", code, *argv], stderr=log, stdout=subprocess.PIPE, text=True,
                           cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    text = (tmp_path / "log").read_text()
    assert r.returncode == 0, text
    assert "tokenizing: " in text and " documents, " in text
    lines = [ln for ln in text.splitlines() if ln.startswith("compile: ")]
    assert lines and " tokens, " in lines[-1] and " tok/s, " in lines[-1] and " B/tok" in lines[-1]
    assert lines[-1].startswith(f"compile: {summary(tmp_path / 's')['samples']}/")


def test_verify_and_examples_on_wrong_paths(tmp_path, capsys):
    for target, said in ((tmp_path / "nope", "does not exist"), (Path(__file__), "is a file, not a store")):
        assert cli_main(["verify", str(target)]) == 1
        out = capsys.readouterr().out
        assert said in out and "Re-copy" not in out
    typo = tmp_path / "TYPO"
    spec = importlib.util.spec_from_file_location("train_student", REPO / "examples" / "train_student.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with pytest.raises(SystemExit) as exit_:
        example.main(["--store", str(typo)])
    assert exit_.value.code == 2 and "not a label store" in capsys.readouterr().err and not typo.exists()


# ------------------------------------------------------------------------------------------------ Python API
def test_python_api_takes_objects_and_paths(env, tmp_path):
    datasets = pytest.importorskip("datasets")
    ref = tmp_path / "ref"
    compile_store(CompileOptions(teacher=str(env["teacher"]), data=[str(env["corpus"])], out=str(ref),
                                 selection="topk", k=8,
                                 max_length=48, device="cpu", progress=False))
    by_path = tmp_path / "path"
    compile_store(teacher=env["teacher"], data=env["corpus"], out=by_path,
                  selection="topk", k=8, max_length=48, device="cpu",
                  progress=False)
    model = load_model(env["teacher"]).train()
    texts = list(env["docs"])
    objs = tmp_path / "objs"
    r = compile_store(teacher=model, tokenizer=env["tok"], data=datasets.Dataset.from_dict({"text": texts}),
                      out=objs, selection="topk", k=8, max_length=48, progress=False)
    assert model.training  # restored after the compile
    recs = tmp_path / "recs"
    compile_store(teacher=model, tokenizer=env["tok"], data=[{"text": t} for t in texts], out=recs,
                  selection="topk", k=8,
                  max_length=48, progress=False)
    want = raw_store_rows(ref)
    for out in (by_path, objs, recs):
        assert not _differs(raw_store_rows(out), want), out
    assert summary(objs)["teacher"]["hash"] == summary(ref)["teacher"]["hash"]
    assert r.samples == summary(ref)["samples"] and r.input_stats["documents"] == len(texts)
    with pytest.raises(TypeError, match="either a CompileOptions or keywords"):
        compile_store(CompileOptions(teacher="x", data=["y"], out="z"), out="w")
    with pytest.raises(TypeError, match="needs tokenizer="):
        compile_store(teacher=model, data=[{"text": "a"}], out=tmp_path / "t")
    with pytest.raises(InputDataError, match=r"data\[1\] \('the value of'\) is not a file or folder: strings"):
        compile_store(teacher=env["teacher"], data=[str(env["corpus"]), "the value of"], out=tmp_path / "t")
    with pytest.raises(ValueError, match="--k must be >= 1"):
        compile_store(teacher=env["teacher"], data=env["corpus"], out=tmp_path / "k", k=0)
    with pytest.raises(ConfigMismatchError):  # a resume with other settings is refused, as on the CLI
        compile_store(teacher=env["teacher"], data=env["corpus"], out=by_path, selection="topk", k=4, max_length=48,
                      device="cpu", progress=False)
    assert not (tmp_path / "t").exists() and not (tmp_path / "k").exists()
