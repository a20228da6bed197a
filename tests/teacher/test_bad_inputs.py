"""Bad inputs and resources: each gets a clear labelstore error, a non-zero exit status and an intact store.

"Intact" means byte-identical committed shards and commit records (``committed_files``), and a rerun of the
same command, once the cause is gone, that finishes the store exactly like an uninterrupted compile.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from _teachers import (
    committed_files,
    interrupt_compile,
    make_documents,
    make_tokenizer,
    raw_rows_differences,
    raw_store_rows,
    save_teacher,
    snapshot,
    write_corpus,
)

import labelstore.teacher.compile as compile_mod
import labelstore.teacher.pipeline as pipeline_mod
import labelstore.teacher.sources as sources_mod
from labelstore.cli import main as cli_main
from labelstore.errors import ConfigMismatchError, InputDataError, InvalidLogitsError, StoreWriteError
from labelstore.store.manifest import list_commits
from labelstore.store.verify import verify_store
from labelstore.teacher.compile import CompileOptions, compile_store

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad")
    tok = make_tokenizer()
    docs = make_documents(24, seed=2)
    write_corpus(base / "corpus", docs)
    env = {"base": base, "tok": tok, "docs": docs, "teacher": save_teacher(base / "llama", "llama", tok),
           "corpus": base / "corpus"}
    compile_store(opts(env, base / "clean"))  # the uninterrupted reference
    env["clean"] = raw_store_rows(base / "clean")
    return env


KW = dict(selection="topk", k=8, max_length=48, tokens_per_batch=48, shard_mb=0.003, device="cpu", progress=False)


def opts(env, out, **kw) -> CompileOptions:
    base = {**dict(teacher=str(env["teacher"]), data=[str(env["corpus"])], out=str(out)), **KW, **kw}
    if base["selection"] in ("sample", "topk+sample") and "k" not in kw:  # --k sizes topk/topp stores only
        del base["k"]
    return CompileOptions(**base)


def cli_args(env, out, data=None) -> list[str]:
    return ["compile", "--teacher", str(env["teacher"]), "--data", *(data or [str(env["corpus"])]), "--out",
            str(out),
            "--selection", "topk", "--k", "8", "--max-length", "48", "--tokens-per-batch", "48", "--shard-mb", "0.003",
            "--device", "cpu", "--quiet"]


def assert_finishes_like_clean(env, out) -> None:
    compile_store(opts(env, out))
    assert raw_rows_differences(raw_store_rows(out), env["clean"]) == []
    assert verify_store(out)["ok"]


# ------------------------------------------------------------------------------------------ full disk
class _FullDisk:
    """A file whose writes fail with ENOSPC once the 'disk' (a shared byte budget) is full."""

    def __init__(self, path, budget):
        self.f, self.budget, self.closed = open(path, "wb"), budget, False  # noqa: SIM115

    def write(self, data):
        n = len(memoryview(data).cast("B"))
        if self.budget[0] < n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget[0] -= n
        return self.f.write(data)

    def flush(self):
        self.f.flush()

    def close(self):
        self.closed = True
        self.f.close()

    def tell(self):
        return self.f.tell()

    def writable(self):
        return True

    def seekable(self):
        return False


@pytest.mark.parametrize("where", ["shard-write", "rename"])
def test_full_disk_is_a_clear_error_and_keeps_committed_shards(env, tmp_path, monkeypatch, capsys, where):
    """ENOSPC simulated in-process: shard bytes run out (a byte budget on the shard files), or the commit's
    rename fails. The first shards commit, then the disk is 'full'."""
    out = tmp_path / "s"
    seen = {}
    if where == "shard-write":
        budget = [35000]  # about three shards (~10 kB each)
        real = pa.OSFile
        monkeypatch.setattr(pa, "OSFile", lambda path, mode="r": pa.PythonFile(_FullDisk(path, budget), mode="w")
                            if mode == "wb" and str(path).startswith(str(out)) else real(path, mode))
    else:
        real_replace = os.replace
        calls = [0]

        def replace(src, dst, *a, **k):
            if str(dst).endswith(".arrow"):
                calls[0] += 1
                if calls[0] == 4:  # the 4th shard's rename: snapshot what is committed, then fail
                    seen["committed"] = committed_files(out)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))
            return real_replace(src, dst, *a, **k)

        monkeypatch.setattr(os, "replace", replace)
    assert cli_main(cli_args(env, out)) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "rerun the same command to resume" in err, err
    committed = committed_files(out)
    assert len(list_commits(out)) >= 2
    if "committed" in seen:
        assert committed == seen["committed"]  # nothing committed before the failure changed
    assert not list((out / "shards").glob(".tmp-*"))  # the open shard was removed, not left half-written
    assert not (out / "manifest.json").exists()
    monkeypatch.undo()
    with pytest.raises(StoreWriteError):  # library API: the same error type
        monkeypatch.setattr(os, "replace", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
        compile_store(opts(env, out))
    monkeypatch.undo()
    assert committed_files(out) == committed
    assert_finishes_like_clean(env, out)  # space freed: the same command resumes and completes


# ------------------------------------------------------------------------------------------ read-only --out
def _deny_writes_under(monkeypatch, root: Path) -> None:
    """Simulate a read-only directory tree. Tests run as root here, where chmod does not stop writes, so
    every way labelstore writes (os.open with write flags, open/pa.OSFile for writing, mkdir, rename, unlink)
    raises PermissionError(EACCES) under ``root``, as the kernel would for a non-root user."""
    root = str(root)

    def denied(path):
        return str(path).startswith(root)

    def err(path):
        return PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    real_open, real_osopen, real_mkdir, real_unlink = open, os.open, Path.mkdir, Path.unlink
    real_replace, real_osfile = os.replace, pa.OSFile

    def os_open(path, flags, *a, **k):
        if denied(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise err(path)
        return real_osopen(path, flags, *a, **k)

    def b_open(path, mode="r", *a, **k):
        if denied(path) and any(c in mode for c in "wax+"):
            raise err(path)
        return real_open(path, mode, *a, **k)

    def mkdir(self, *a, **k):
        if denied(self) and not self.is_dir():
            raise err(self)
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr("builtins.open", b_open)
    monkeypatch.setattr(Path, "mkdir", mkdir)
    monkeypatch.setattr(Path, "unlink", lambda self, *a, **k: (_ for _ in ()).throw(err(self)) if denied(self)
                        else real_unlink(self, *a, **k))
    monkeypatch.setattr(os, "replace", lambda s, d, *a, **k: (_ for _ in ()).throw(err(d)) if denied(d)
                        else real_replace(s, d, *a, **k))
    monkeypatch.setattr(pa, "OSFile", lambda path, mode="r": (_ for _ in ()).throw(err(path))
                        if denied(path) and mode != "r" else real_osfile(path, mode))


def test_read_only_output_directory(env, tmp_path, monkeypatch, capsys):
    # an unfinished store (a compile stopped after some shards) in a directory that became read-only
    out = tmp_path / "s"
    real = pipeline_mod.WriterThread._write
    n = [0]

    def write_then_stop(self, *a):
        n[0] += 1
        if n[0] == 8:
            raise KeyboardInterrupt
        return real(self, *a)

    monkeypatch.setattr(pipeline_mod.WriterThread, "_write", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        compile_store(opts(env, out))
    monkeypatch.undo()
    before = snapshot(out)
    assert list_commits(out)
    _deny_writes_under(monkeypatch, out)
    assert cli_main(cli_args(env, out)) == 1
    err = capsys.readouterr().err
    assert str(out) in err and "Permission denied" in err and "writable" in err, err
    # a new store under a read-only parent
    _deny_writes_under(monkeypatch, tmp_path / "ro")
    assert cli_main(cli_args(env, tmp_path / "ro" / "new")) == 1
    assert "cannot create store directory" in capsys.readouterr().err
    monkeypatch.undo()
    assert snapshot(out) == before
    assert_finishes_like_clean(env, out)


# ------------------------------------------------------------------------------------------ teacher inf
def test_teacher_producing_inf_is_named_and_committed_shards_kept(env, tmp_path, monkeypatch, capsys):
    """A teacher whose logits overflow to +inf where it sees one token (injected by a forward hook on the
    real model, as a float16 overflow would produce); the token only occurs in the last document."""
    tok = env["tok"]
    z = tok.convert_tokens_to_ids("z")
    assert all(z not in tok(d)["input_ids"] for d in env["docs"])
    corpus = tmp_path / "corpus"
    write_corpus(corpus, env["docs"] + ["a zebra"])
    import labelstore.teacher.compile_run as compile_run  # where both plans load the teacher

    real_load = compile_run.load_teacher

    def load_teacher(*a, **k):
        model = real_load(*a, **k)

        def hook(module, args, kwargs, output):
            hit = kwargs["input_ids"] == z
            output.logits[hit, 7] = float("inf")
            return output

        model.register_forward_hook(hook, with_kwargs=True)
        return model

    monkeypatch.setattr(compile_run, "load_teacher", load_teacher)
    out = tmp_path / "s"
    assert cli_main(cli_args(env, out, data=[str(corpus)])) == 1
    err = capsys.readouterr().err
    assert "invalid logits at sample" in err and "+inf" in err and "committed shards are intact" in err, err
    committed = committed_files(out)
    assert committed and not (out / "manifest.json").exists()
    with pytest.raises(InvalidLogitsError, match=r"\+inf"):  # the rerun fails the same way, keeps the shards
        compile_store(opts(env, out, data=[str(corpus)]))
    assert committed_files(out) == committed


# ------------------------------------------------------------------------------------------ changed settings
def test_resume_with_changed_settings_exits_1_and_changes_nothing(env, tmp_path, capsys):
    out = tmp_path / "s"
    assert cli_main(cli_args(env, out)) == 0
    before = snapshot(out)
    args = cli_args(env, out)
    args[args.index("--k") + 1] = "4"
    assert cli_main(args + ["--selection", "topp"]) == 1
    err = capsys.readouterr().err
    assert "selection.mode: 'topk' in the store, 'topp' now" in err and "write to a new --out" in err, err
    # a store compiled with the old default (top-k) resumed with today's default (sample): every difference named
    old_default = {key: v for key, v in KW.items() if key not in ("selection", "k")}
    with pytest.raises(ConfigMismatchError) as exc:
        compile_store(CompileOptions(teacher=str(env["teacher"]), data=[str(env["corpus"])], out=str(out),
                                     **old_default))
    assert "selection.mode: 'topk' in the store, 'sample' now" in str(exc.value)
    assert "compile_config.seed: '<absent>' in the store, 0 now" in str(exc.value)
    assert snapshot(out) == before


# ------------------------------------------------------------------------------------------ vanishing input
def test_input_file_disappearing_while_planned_is_named(env, tmp_path, monkeypatch, capsys):
    corpus = tmp_path / "corpus"
    files = write_corpus(corpus, env["docs"])
    out = tmp_path / "s"
    assert cli_main(cli_args(env, out, data=[str(corpus)])) == 0
    before = snapshot(out)
    victim = files[5]
    real = sources_mod._open

    def open_(path):
        if Path(path) == victim:
            victim.unlink()  # deleted between listing the directory and reading the file
        return real(path)

    monkeypatch.setattr(sources_mod, "_open", open_)
    assert cli_main(cli_args(env, out, data=[str(corpus)])) == 1
    err = capsys.readouterr().err
    assert f"cannot read input {victim}: No such file or directory" in err, err
    assert snapshot(out) == before


def test_input_file_gone_after_planning_is_named_on_resume(env, tmp_path, monkeypatch):
    """Inputs are read once, while planning; the compile then runs from the plan's own copy of the tokens, so
    a file deleted after planning cannot corrupt this run. The resume of the unfinished store names it."""
    corpus = tmp_path / "corpus"
    files = write_corpus(corpus, env["docs"])
    out = tmp_path / "s"
    victim = files[3]
    real_plan = compile_mod.build_plan
    real_write = pipeline_mod.WriterThread._write
    n = [0]

    def build_plan(*a, **k):
        plan = real_plan(*a, **k)
        victim.unlink()
        return plan

    def write_then_fail(self, *a):
        n[0] += 1
        if n[0] == 6:
            raise OSError(errno.EIO, "simulated crash")
        return real_write(self, *a)

    monkeypatch.setattr(compile_mod, "build_plan", build_plan)
    monkeypatch.setattr(pipeline_mod.WriterThread, "_write", write_then_fail)
    with pytest.raises(OSError):
        compile_store(opts(env, out, data=[str(corpus)]))
    monkeypatch.undo()
    committed = committed_files(out)
    assert committed
    with pytest.raises(InputDataError, match=rf"no longer exist: {victim}\. Restore them"):
        compile_store(opts(env, out, data=[str(corpus)]))
    assert committed_files(out) == committed


# ------------------------------------------------------------------------------------------ Ctrl-C
def test_ctrl_c_stops_cleanly_keeps_committed_shards_and_says_how_to_resume(env, tmp_path):
    out = tmp_path / "s"
    args = cli_args(env, out)
    returncode, err = interrupt_compile(args, out, tmp_path, after_commits=3)
    assert returncode == 130, err
    commits = list_commits(out)
    assert f"interrupted: {len(commits)} shards committed in {out}; rerun the same command to resume:" in err, err
    assert "labelstore " + " ".join(args) in err  # the exact command (no quoting needed for these paths)
    assert "Traceback" not in err
    for c in commits:  # every committed shard is complete and matches its commit record
        assert (out / c["path"]).stat().st_size == c["bytes"]
    assert not list((out / "shards").glob(".tmp-*")) and not list((out / "shards").glob("*.arrow"))[len(commits):]
    fd = os.open(out / "locks" / "r00000.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody holds the lock
    finally:
        os.close(fd)
    before = committed_files(out)
    assert_finishes_like_clean(env, out)
    assert {k: v for k, v in committed_files(out).items() if k in before} == before


# ------------------------------------------------------------------------------------------ remote code
def test_trust_remote_code_is_never_passed_unless_asked(env, tmp_path, monkeypatch):
    import transformers

    calls = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer, transformers.AutoConfig):
        real = cls.from_pretrained.__func__

        def spy(c, *a, _real=real, _name=cls.__name__, **k):
            # labelstore's own calls, not transformers' internal ones
            if sys._getframe(1).f_globals.get("__name__") == "labelstore.teacher.model":
                calls.append((_name, dict(k)))
            return _real(c, *a, **k)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    compile_store(opts(env, tmp_path / "a"))
    assert {n for n, _ in calls} == {"AutoModelForCausalLM", "AutoTokenizer", "AutoConfig"}
    assert all("trust_remote_code" not in k for _, k in calls), calls
    calls.clear()
    compile_store(opts(env, tmp_path / "b", trust_remote_code=True))
    assert calls and all(k.get("trust_remote_code") is True for _, k in calls)
    assert json.loads((tmp_path / "b" / "config.json").read_text())  # and it still compiled
