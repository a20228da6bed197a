"""`labelstore compile --plan units`: each rank reads and tokenizes only its block of work units (one per input
file), sample ids are ``unit * 2**26 + sequence``, and a resume reads only the newest commit record of each rank.

References: the 1-process units store (for 2 ranks under torchrun, for a resumed compile), the tokenizer run by
hand on each input file (ids and tokens), and the sample ranges the commit records hold (for the progress).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _teachers import Interrupt, interrupt_after, make_documents, make_tokenizer, save_teacher, write_corpus

from labelstore.errors import ConfigMismatchError, InputDataError, StoreFormatError
from labelstore.store.reader import LabelStore
from labelstore.store.verify import verify_store
from labelstore.teacher.compile import CompileOptions, compile_store
from labelstore.teacher.unit_progress import RankProgress, UnitTracker, progress_from_ranges, read_progress
from labelstore.teacher.units import SEQ_BITS, WorkUnit, check_id_limits, rank_units

pytestmark = pytest.mark.usefixtures("one_thread")
L = 32


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("units")
    tok = make_tokenizer()
    docs = make_documents(24, seed=3, min_words=10, max_words=90)
    env = {"base": base, "tok": tok, "docs": docs, "llama": save_teacher(base / "llama", "llama", tok, extra_vocab=5),
           "corpus": base / "corpus"}
    write_corpus(env["corpus"], docs)
    return env


def opts(env, out, **kw) -> CompileOptions:
    # the compile default selection (16 draws per position): sampled entries are keyed by the sparse unit ids
    base = dict(teacher=str(env["llama"]), data=[str(env["corpus"])], out=str(out), max_length=L,
                tokens_per_batch=96, device="cpu", progress=False, plan="units", shard_mb=0.004)
    base.update(kw)
    return CompileOptions(**base)


def cli_args(o: CompileOptions) -> list[str]:
    args = ["compile", "--teacher", o.teacher, "--data", *o.data, "--out", o.out,
            "--selection", o.selection, *(["--k", str(o.k)] if o.k is not None else []),
            "--max-length", str(o.max_length), "--tokens-per-batch", str(o.tokens_per_batch), "--device", "cpu",
            "--shard-mb", str(o.shard_mb), "--plan", o.plan, "--quiet"]
    return args + ([] if o.pack else ["--truncate"])


def store_rows(path) -> dict[int, tuple]:
    s = LabelStore(path)
    rows = {}
    for i in range(len(s)):
        x = s[i]
        rows[x.sample_id] = tuple(t.numpy().copy() for t in (x.input_ids, x.ids, x.probs, x.tail, x.counts,
                                                              x.doc_starts))
    return rows


def assert_same_store(a, b) -> None:
    ra, rb = store_rows(a), store_rows(b)
    assert sorted(ra) == sorted(rb)
    for sid in ra:
        for x, y in zip(ra[sid], rb[sid]):
            np.testing.assert_array_equal(x, y, err_msg=f"sample {sid}")
    np.testing.assert_array_equal(LabelStore(a).sample_ids(), LabelStore(b).sample_ids())  # same row order
    pa_, pb_ = Path(a) / "tail_prior.f32", Path(b) / "tail_prior.f32"
    assert pa_.exists() == pb_.exists() == (LabelStore(a).meta["selection"]["mode"] != "sample")
    if pa_.exists():  # top-k stores: the teacher's mean distribution, a float sum in another order
        np.testing.assert_allclose(np.fromfile(pa_, "<f4"), np.fromfile(pb_, "<f4"), rtol=1e-6)


def expected_sequences(tok, docs, pack: bool) -> dict[int, list[int]]:
    """By hand: each file (one document) is one unit; packed per unit into L-token sequences, or cut to L."""
    out = {}
    for u, d in enumerate(docs):
        ids = list(tok(d)["input_ids"]) + [tok.eos_token_id]
        seqs = [ids[a:a + L] for a in range(0, len(ids), L)] if pack else [ids[:L]]
        for i, s in enumerate(seqs):
            out[(u << SEQ_BITS) + i] = s
    return out


# ------------------------------------------------------------------------------------------ ids
@pytest.mark.parametrize("pack", [True, False])
def test_sample_ids_are_unit_and_sequence_and_tokens_are_each_files_own(env, tmp_path, pack):
    r = compile_store(opts(env, tmp_path / "s", pack=pack))
    want = expected_sequences(env["tok"], env["docs"], pack)
    rows = store_rows(tmp_path / "s")
    assert sorted(rows) == sorted(want)
    for sid, seq in want.items():
        np.testing.assert_array_equal(rows[sid][0], seq, err_msg=f"sample {sid}")
    assert r.units == {"units": 24, "skipped_units": 0, "tokenized_units": 24, "sequences": len(want)}
    assert LabelStore(tmp_path / "s").sample_ids().tolist() == sorted(want)  # rows in sample id order
    assert verify_store(tmp_path / "s")["ok"]
    # a pure function of the inputs and settings: a second compile gives the same ids and labels
    compile_store(opts(env, tmp_path / "again", pack=pack, shard_mb=1.0))
    assert_same_store(tmp_path / "s", tmp_path / "again")


def test_rank_blocks_cover_every_unit_once_in_order():
    for n in (0, 1, 5, 24):
        for world in (1, 2, 3, 4, 7):
            blocks = [rank_units(n, r, world) for r in range(world)]
            assert [u for b in blocks for u in b] == list(range(n))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_id_limits_refuse_what_would_overflow_the_row_ids():
    check_id_limits(1 << 26, 2048)  # 2**26 units * 2**26 sequences * 2**11 positions = 2**63
    with pytest.raises(InputDataError, match="exceed the 67,108,864 units"):
        check_id_limits((1 << 26) + 1, 2048)
    # the largest row id of the largest allowed unit count fits an int64
    n, Lmax = (1 << 63) // ((1 << SEQ_BITS) * 4096), 4096
    assert ((n << SEQ_BITS) - 1) * Lmax + Lmax - 1 < 1 << 63


# ------------------------------------------------------------------------------------------ ranks
SPY = textwrap.dedent("""
    import json, os, sys
    import labelstore.teacher.inputs as inputs
    real = inputs.build_plan
    def spy(paths, *a, **k):  # record what this rank reads and tokenizes
        with open(os.path.join(os.environ["SPY_DIR"], f"rank{os.environ.get('RANK', '0')}.jsonl"), "a") as f:
            f.write(json.dumps({"sources": [getattr(p, "name", str(p)) for p in paths],
                                "workdir": k.get("workdir") is not None}) + "\\n")
        return real(paths, *a, **k)
    inputs.build_plan = spy
    from labelstore.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_torchrun_two_ranks_equal_one_and_each_reads_only_its_units(env, tmp_path):
    compile_store(opts(env, tmp_path / "one"))
    spy = tmp_path / "spy"
    spy.mkdir()
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", "SPY_DIR": str(spy)}
    script = tmp_path / "spy.py"
    script.write_text(SPY)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           *cli_args(opts(env, tmp_path / "two"))]
    p = subprocess.run(cmd, cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    shards = sorted(x.name for x in (tmp_path / "two" / "shards").iterdir())
    assert any(s.startswith("r00000-") for s in shards) and any(s.startswith("r00001-") for s in shards)
    assert_same_store(tmp_path / "one", tmp_path / "two")
    from labelstore import StoreDataset, StoreLoader

    def batches(path):
        return list(StoreLoader(StoreDataset(path), batch_size=3, seed=7, rank=0, world_size=1))

    for a, b in zip(batches(tmp_path / "one"), batches(tmp_path / "two"), strict=True):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)
    # each rank planned one unit at a time, only its own block, and never into a scratch copy of the corpus
    files = sorted(str(f) for f in env["corpus"].iterdir())
    read = {r: [json.loads(line) for line in (spy / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)}
    for r in (0, 1):
        assert all(len(c["sources"]) == 1 and not c["workdir"] for c in read[r])
        assert [c["sources"][0] for c in read[r]] == files[12 * r:12 * (r + 1)]


# ------------------------------------------------------------------------------------------ resume
KILLABLE = textwrap.dedent("""
    import sys, time
    import labelstore.teacher.pipeline as c
    slow = c.pad_batch
    def collate(*a, **k):  # slow the compile down so that the test can kill it half-way
        time.sleep(0.05)
        return slow(*a, **k)
    c.pad_batch = collate
    from labelstore.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_sigkill_then_rerun_equals_an_uninterrupted_compile(env, tmp_path):
    out = tmp_path / "killed"
    o = opts(env, out, tokens_per_batch=32)
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, *cli_args(o)], cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list((out / "commits").glob("r*.json"))) >= 4:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"compile ended before it could be killed: {proc.communicate()[0].decode()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    resumed = compile_store(o)
    assert resumed.skipped >= 4
    assert resumed.units["skipped_units"] >= 1  # complete units were skipped without reading them
    assert resumed.units["tokenized_units"] < 24
    compile_store(opts(env, tmp_path / "clean", tokens_per_batch=32))
    assert_same_store(out, tmp_path / "clean")


@pytest.mark.parametrize("pack", [True, False])
def test_interrupted_inside_a_unit_resumes_to_the_same_store(env, tmp_path, monkeypatch, pack):
    data = tmp_path / "data"  # large units: one spans several shards
    if pack:
        write_corpus(data, [" ".join(env["docs"][3 * i:3 * i + 3]) for i in range(3)])
    else:
        write_corpus(data, env["docs"], kind="jsonl")
    kw = dict(data=[str(data)], pack=pack, tokens_per_batch=64, shard_mb=0.002)
    if not pack:  # a top-k store too: its tail prior sums over the resumed run's positions
        kw.update(selection="topk", k=6)
    with monkeypatch.context() as m:
        interrupt_after(m, 3)
        with pytest.raises(Interrupt):
            compile_store(opts(env, tmp_path / "s", **kw))
    recs = sorted((tmp_path / "s" / "commits").glob("r*.json"))
    assert len(recs) == 3
    last = json.loads(recs[-1].read_text())["units"]
    assert last["partial"]  # the interrupt came inside a unit
    resumed = compile_store(opts(env, tmp_path / "s", **kw))
    assert resumed.skipped > 0
    compile_store(opts(env, tmp_path / "clean", **kw))
    assert_same_store(tmp_path / "s", tmp_path / "clean")


def test_progress_of_the_newest_record_equals_the_one_rebuilt_from_every_record(env, tmp_path, monkeypatch):
    kw = dict(tokens_per_batch=32)
    with monkeypatch.context() as m:
        interrupt_after(m, 5)
        with pytest.raises(Interrupt):
            compile_store(opts(env, tmp_path / "s", **kw))
    from labelstore.store.manifest import list_commits
    from labelstore.store.writer import merged_ranges

    fast = read_progress(tmp_path / "s")[0]
    slow = progress_from_ranges(merged_ranges(list_commits(tmp_path / "s")))
    # the same committed sequences, unit by unit (the fast one knows which units are complete)
    covered = {}
    for a, b, _ in fast.done:
        for u in range(a, b):
            covered[u] = None
    for u, (_, _, runs) in slow.partial.items():
        if u in covered:
            continue
        assert fast.partial[u][2] == runs
    assert set(slow.partial) == set(covered) | set(fast.partial)
    # a gap in the records (one removed): the rank's progress is rebuilt from the records that remain
    recs = sorted((tmp_path / "s" / "commits").glob("r*.json"))
    gone = json.loads(recs[1].read_text())
    recs[1].unlink()
    (tmp_path / "s" / gone["path"]).unlink()
    rebuilt = read_progress(tmp_path / "s")[0]
    assert not rebuilt.done and all(sha is None for sha, _, _ in rebuilt.partial.values())
    resumed = compile_store(opts(env, tmp_path / "s", **kw))
    assert resumed.samples >= gone["rows"]  # the removed shard's sequences were computed again
    compile_store(opts(env, tmp_path / "clean", **kw))
    assert_same_store(tmp_path / "s", tmp_path / "clean")


def test_a_changed_input_is_refused_when_committed_and_read_when_not(env, tmp_path, monkeypatch):
    data = tmp_path / "data"
    files = write_corpus(data, env["docs"][:8])
    kw = dict(data=[str(data)], tokens_per_batch=32)
    with monkeypatch.context() as m:
        interrupt_after(m, 3)
        with pytest.raises(Interrupt):
            compile_store(opts(env, tmp_path / "s", **kw))
    done = read_progress(tmp_path / "s")[0]
    first_done = done.done[0][0]
    last_unit = 7
    assert last_unit not in set(done.done_units()) and last_unit not in done.partial
    # a committed unit's file edited: refused, naming the file; nothing written
    f = files[first_done]
    keep, st0 = f.read_text(), f.stat()
    f.write_text(keep + " more words")
    with pytest.raises(InputDataError, match=rf"{f.name} \(work unit {first_done}\) changed after its labels were"):
        compile_store(opts(env, tmp_path / "s", **kw))
    f.write_text(keep)  # restored (same size, another modification time): still refused
    with pytest.raises(InputDataError, match="changed after its labels were committed"):
        compile_store(opts(env, tmp_path / "s", **kw))
    os.utime(f, ns=(st0.st_atime_ns, st0.st_mtime_ns))  # and its modification time: the same input again
    # a file not compiled yet may change: the resume reads it as it is now
    files[last_unit].write_text(env["docs"][20])
    compile_store(opts(env, tmp_path / "s", **kw))
    docs = env["docs"][:7] + [env["docs"][20]]
    clean = tmp_path / "clean-data"
    write_corpus(clean, docs)
    compile_store(opts(env, tmp_path / "clean", **dict(kw, data=[str(clean)])))
    assert_same_store(tmp_path / "s", tmp_path / "clean")


def test_a_partly_committed_unit_that_tokenizes_differently_is_refused(env, tmp_path, monkeypatch):
    data = tmp_path / "data"
    (f,) = write_corpus(data, [" ".join(env["docs"][:10])])
    kw = dict(data=[str(data)], tokens_per_batch=32, shard_mb=0.002)
    with monkeypatch.context() as m:
        interrupt_after(m, 2)
        with pytest.raises(Interrupt):
            compile_store(opts(env, tmp_path / "s", **kw))
    assert 0 in read_progress(tmp_path / "s")[0].partial
    st = f.stat()
    text = f.read_text()
    f.write_text(text[::-1][:len(text)])  # other content, same size and (below) the same modification time
    assert f.stat().st_size == st.st_size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(InputDataError, match=r"now gives other tokens than the ones its committed sequences"):
        compile_store(opts(env, tmp_path / "s", **kw))


def test_plan_mode_and_batch_settings_are_compared_on_resume(env, tmp_path):
    compile_store(opts(env, tmp_path / "u"))
    with pytest.raises(ConfigMismatchError, match=r"compile_config\.plan: 'units' in the store, '<absent>' now"):
        compile_store(opts(env, tmp_path / "u", plan="global"))
    with pytest.raises(ConfigMismatchError, match=r"compile_config\.tokens_per_batch: 96 in the store, 64 now"):
        compile_store(opts(env, tmp_path / "u", tokens_per_batch=64))
    with pytest.raises(ConfigMismatchError, match=r"compile_config\.data\.units: 24 in the store, 10 now"):
        compile_store(opts(env, tmp_path / "u", data=[str(p) for p in sorted(env["corpus"].iterdir())[:10]]))
    compile_store(opts(env, tmp_path / "g", plan="global"))  # a store of before --plan: no plan key
    assert "plan" not in json.loads((tmp_path / "g" / "config.json").read_text())["compile_config"]
    with pytest.raises(ConfigMismatchError, match=r"compile_config\.plan: '<absent>' in the store, 'units' now"):
        compile_store(opts(env, tmp_path / "g", plan="units"))


# ------------------------------------------------------------------------------------------ limits
def test_max_samples_keeps_the_first_sequences_in_unit_order(env, tmp_path, monkeypatch):
    compile_store(opts(env, tmp_path / "all"))
    compile_store(opts(env, tmp_path / "ten", max_samples=10))
    full = store_rows(tmp_path / "all")
    ten = store_rows(tmp_path / "ten")
    assert sorted(ten) == sorted(full)[:10]
    for sid in ten:
        for x, y in zip(ten[sid], full[sid]):
            np.testing.assert_array_equal(x, y)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputDataError, match="--max-samples with --plan units .* this run has 2 ranks"):
        compile_store(opts(env, tmp_path / "two", max_samples=10))


def test_records_are_cut_into_units_and_an_empty_corpus_is_refused(env, tmp_path, monkeypatch):
    import labelstore.teacher.unit_compile as unit_compile

    monkeypatch.setattr(unit_compile, "RECORDS_PER_UNIT", 5)
    recs = [{"text": d} for d in env["docs"][:12]]
    o = dict(teacher=str(env["llama"]), max_length=L, tokens_per_batch=96, device="cpu", progress=False,
             plan="units")
    r = compile_store(teacher=str(env["llama"]), data=recs, out=str(tmp_path / "r"),
                      **{k: v for k, v in o.items() if k != "teacher"})
    assert r.units["units"] == 3  # 5 + 5 + 2 records
    tok = env["tok"]
    for u, (a, b) in enumerate([(0, 5), (5, 10), (10, 12)]):
        ids = [t for d in env["docs"][a:b] for t in list(tok(d)["input_ids"]) + [tok.eos_token_id]]
        got = [x for sid, row in sorted(store_rows(tmp_path / "r").items()) if sid >> SEQ_BITS == u
               for x in row[0].tolist()]
        assert got == ids  # each unit packed on its own
    # a datasets.Dataset of the same records is cut the same way (slices of rows), into the same store
    import datasets

    d = compile_store(teacher=str(env["llama"]), data=datasets.Dataset.from_list(recs), out=str(tmp_path / "d"),
                      **{k: v for k, v in o.items() if k != "teacher"})
    assert d.units["units"] == 3
    assert_same_store(tmp_path / "r", tmp_path / "d")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    (tmp_path / "empty" / "b.txt").write_text("")
    with pytest.raises(InputDataError, match="the corpus is empty: 2 input"):
        compile_store(opts(env, tmp_path / "e", data=[str(tmp_path / "empty")]))
    assert not (tmp_path / "e" / "manifest.json").exists()


# ------------------------------------------------------------------------------------------ progress
def unit(i: int, ident: str = "ab" * 32) -> WorkUnit:
    return WorkUnit(i, None, f"f{i}", ident)


def test_tracker_turns_a_unit_done_once_every_sequence_is_added_in_any_order():
    t = UnitTracker()
    t.begin(unit(2), 5, "11" * 32)
    for i in (3, 0, 4, 1):
        t.add((2 << SEQ_BITS) + i)
    rec = t.record()
    assert rec["done"] == [] and rec["partial"] == [[2, "11" * 32, "ab" * 32, [[0, 2], [3, 5]]]]
    with pytest.raises(ValueError, match="committed already"):
        t.add((2 << SEQ_BITS) + 3)
    t.add((2 << SEQ_BITS) + 2)
    t.begin(unit(3, "cd" * 32), 1, "22" * 32)
    t.add(3 << SEQ_BITS)
    rec = t.record()
    assert rec["done"] == [[2, 4, 6]] and rec["partial"] == []
    assert rec["done_identity"] == f"{int('ab' * 32, 16) ^ int('cd' * 32, 16):064x}"
    assert rec["completed"] == [[2, "ab" * 32], [3, "cd" * 32]] and t.record()["completed"] == []
    back = RankProgress.from_json(rec, "r")
    assert back.done == [[2, 4, 6]] and list(back.done_units()) == [2, 3]
    # a resumed tracker continues the rank's own progress
    t2 = UnitTracker(RankProgress.from_json({**rec, "partial": [[7, None, None, [[0, 1]]]]}, "r"))
    t2.begin(unit(7), 2, "33" * 32)
    t2.add((7 << SEQ_BITS) + 1)
    assert t2.record()["done"] == [[2, 4, 6], [7, 8, 2]]


@pytest.mark.parametrize("bad", [{"done": [[3, 2, 1]], "done_identity": "0" * 64, "partial": []},
                                 {"done": [], "done_identity": "x", "partial": []},
                                 {"done": [[0, 2, 1], [1, 3, 1]], "done_identity": "0" * 64, "partial": []},
                                 {"done": [], "done_identity": "0" * 64, "partial": [[1, None, None, [[2, 2]]]]},
                                 ["not", "a", "dict"]])
def test_a_malformed_progress_entry_is_refused(bad):
    with pytest.raises(StoreFormatError, match="'units' progress entry"):
        RankProgress.from_json(bad, "commit record r00000-000001.json")


def test_tracker_runs_equal_the_merged_set_in_any_insertion_order():
    rng = np.random.default_rng(0)
    for n in (1, 7, 50):
        order = rng.permutation(n)
        t = UnitTracker()
        t.begin(unit(1), n + 1, "00" * 32)  # one sequence short of complete: the runs stay visible
        for k, i in enumerate(order):
            t.add((1 << SEQ_BITS) + int(i))
            got = t.record()["partial"][0][3]
            want, prev = [], None  # reference: runs of the sorted set of added indices
            for x in sorted(int(v) for v in order[:k + 1]):
                if prev is not None and x == prev + 1:
                    want[-1][1] = x + 1
                else:
                    want.append([x, x + 1])
                prev = x
            assert got == want


def test_one_process_interrupted_then_resumed_by_two_ranks_equals_one_process(env, tmp_path, monkeypatch):
    """A change of world size on resume: rank 1 of 2 continues units that the single process committed in part
    (their committed runs come from rank 0's records), and the store equals an uninterrupted 1-process one."""
    out = tmp_path / "s"
    kw = dict(tokens_per_batch=32, shard_mb=0.002)
    compile_store(opts(env, tmp_path / "clean", **kw))
    shards = len(list((tmp_path / "clean" / "commits").glob("r*.json")))
    with monkeypatch.context() as m:
        interrupt_after(m, shards * 3 // 4)  # inside rank 1's half of the 24 units (12 each under 2 ranks)
        with pytest.raises(Interrupt):
            compile_store(opts(env, out, **kw))
    progress = read_progress(out)[0]
    started = set(progress.done_units()) | set(progress.partial)
    assert any(u >= 12 for u in started) and progress.partial
    run_env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "labelstore",
           *cli_args(opts(env, out, **kw))]
    p = subprocess.run(cmd, cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert_same_store(out, tmp_path / "clean")
