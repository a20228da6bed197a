"""Issue 20: no damaged or hostile store yields silently wrong data, hangs, or makes a writer touch files outside it.

Each test builds a small store, damages it the way a careless copy, an editor or a hostile party would, and checks
the outcome against the pristine rows: a labelstore error naming the problem, or identical data, never anything else.
"""

import json
import os
import shlex
import shutil
import signal
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from store_factory import make_meta_v3, random_rows, write_rows

from labelstore.errors import LabelStoreError, StoreCorruptError, StoreFormatError, StoreWriteError
from labelstore.store.format import row_bytes, with_digest
from labelstore.store.info import summary
from labelstore.store.reader import LabelStore
from labelstore.store.verify import verify_store
from labelstore.store.writer import StoreWriter, finalize_store

DATA = Path(__file__).parents[1] / "data"


def build(path, seed=0, n=12, **meta_extra):
    rows = random_rows(n, vocab_size=1000, k=4, seed=seed, max_len=12)
    with StoreWriter(path, make_meta_v3(1000, 4, **meta_extra), shard_bytes=600) as w:
        write_rows(w, rows)
    return rows


def manifest(path):
    return json.loads((path / "manifest.json").read_text())


def write_manifest(path, man, redigest=True):
    """Write an edited manifest; ``redigest`` recomputes its digest as a deliberate forger would."""
    (path / "manifest.json").write_text(json.dumps(with_digest(man) if redigest else man))


def rewrite_shard(path, rel, edit, compression=None):
    """Rewrite one shard's table through ``edit(pydict) -> pydict`` (same schema), fixing its manifest entry's size
    and sha256 (and the digest), as a party who edits the bytes on purpose would."""
    import hashlib

    f = path / rel
    table = pa.ipc.open_file(pa.memory_map(str(f))).read_all()
    cols = edit(table.to_pydict())
    new = pa.Table.from_pydict(cols, schema=table.schema)
    opts = pa.ipc.IpcWriteOptions(compression=compression) if compression else None
    with pa.OSFile(str(f), "wb") as sink, pa.ipc.new_file(sink, table.schema, options=opts) as w:
        w.write_table(new)
    man = manifest(path)
    data = f.read_bytes()
    for s in man["shards"]:
        if s["path"] == rel:
            man["totals"]["bytes"] += len(data) - s["bytes"]
            s["bytes"], s["sha256"] = len(data), hashlib.sha256(data).hexdigest()
            rec_path = path / "commits" / f"{Path(rel).stem}.json"
            rec = json.loads(rec_path.read_text())
            rec.update(bytes=s["bytes"], sha256=s["sha256"])
            rec_path.write_text(json.dumps(rec))
    write_manifest(path, man, redigest="digest" in man)


def read_all(path, **kw):
    return [(x.sample_id, x.ids.numpy().copy(), x.probs.numpy().copy()) for x in LabelStore(path, **kw)]


@contextmanager
def deadline(seconds=20):
    """Fail (instead of hanging the suite) if the block blocks, e.g. on a FIFO."""
    def boom(*_):
        raise TimeoutError("blocked")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------------------ 1. checksums and digests
def test_swapped_sample_ids_inside_a_shard_fail_the_row_crc(tmp_path):
    p = tmp_path / "s"
    build(p)
    rel = manifest(p)["shards"][0]["path"]

    def swap(cols):
        cols["sample_id"][0], cols["sample_id"][1] = cols["sample_id"][1], cols["sample_id"][0]
        return cols
    rewrite_shard(p, rel, swap)
    s = LabelStore(p)
    with pytest.raises(StoreCorruptError, match="CRC32"):
        s[0]
    assert not verify_store(p)["ok"]


def test_edited_manifest_caught_on_open(tmp_path):
    p = tmp_path / "s"
    build(p)
    good = manifest(p)
    # an entry removed and the totals fixed to match: the digest no longer holds
    man = json.loads(json.dumps(good))
    gone = man["shards"].pop(1)
    for k in ("samples", "tokens", "entries", "bytes"):
        man["totals"][k] -= gone["rows" if k == "samples" else k]
    man["totals"]["shards"] -= 1
    write_manifest(p, man, redigest=False)
    with pytest.raises(StoreCorruptError, match="digest"):
        LabelStore(p)
    # a forger who recomputes the digest: the reader serves the remaining shards, verify names the missing one
    write_manifest(p, man)
    assert len(LabelStore(p)) == good["totals"]["samples"] - gone["rows"]
    rep = verify_store(p)
    assert any(gone["path"] in x and "missing from the manifest" in x for x in rep["problems"]), rep


def test_edited_tail_prior_mix_and_metadata_refused(tmp_path):
    p = tmp_path / "s"
    rows = random_rows(6, vocab_size=300, k=4, seed=1)
    with StoreWriter(p, make_meta_v3(300, 4), shard_bytes=600) as w:
        write_rows(w, rows)
        w.add_teacher_mass(np.random.default_rng(0).random(300), 10)
    good = manifest(p)
    assert good["tail_prior"]["mix"] == good["meta"]["tail_prior_mix"] == 0.9
    for mix in (0.5, 0.811, 1.0):
        man = json.loads(json.dumps(good))
        man["tail_prior"]["mix"] = mix
        write_manifest(p, man, redigest=False)
        with pytest.raises(StoreCorruptError, match="digest"):
            LabelStore(p)
        write_manifest(p, man)  # digest recomputed: the mix must still equal the one every shard records
        with pytest.raises(StoreCorruptError, match="tail_prior_mix"):
            LabelStore(p)
        man["meta"]["tail_prior_mix"] = mix  # both edited: the shards' own metadata disagrees
        write_manifest(p, man)
        with pytest.raises(StoreCorruptError, match="different metadata"):
            LabelStore(p)[0]
        assert not verify_store(p)["ok"]


def test_shard_from_another_store_of_the_same_configuration_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build(a, seed=0)
    build(b, seed=5)  # same settings, different rows
    rel = manifest(a)["shards"][0]["path"]
    shutil.copy(b / rel, a / rel)
    man = manifest(a)
    src = {s["path"]: s for s in manifest(b)["shards"]}[rel]
    man["totals"]["bytes"] += src["bytes"] - man["shards"][0]["bytes"]
    man["shards"][0].update({k: src[k] for k in ("bytes", "sha256", "rows", "tokens", "entries", "first_sample_id",
                                                 "last_sample_id")})
    man["totals"]["samples"] = sum(s["rows"] for s in man["shards"])
    man["totals"]["tokens"] = sum(s["tokens"] for s in man["shards"])
    man["totals"]["entries"] = sum(s["entries"] for s in man["shards"])
    write_manifest(a, man)
    with pytest.raises(StoreCorruptError, match="different metadata"):
        LabelStore(a)[0]


def test_renamed_or_duplicated_shard_refused(tmp_path):
    p = tmp_path / "s"
    build(p)
    man = manifest(p)
    s0, s1 = man["shards"][0], man["shards"][1]
    shutil.copy(p / s0["path"], p / s1["path"])  # shard 0's bytes under shard 1's name, entry fixed to match
    s1.update({k: s0[k] for k in ("bytes", "sha256", "rows", "tokens", "entries")})
    s1["first_sample_id"], s1["last_sample_id"] = s0["first_sample_id"] + 10**6, s0["last_sample_id"] + 10**6
    man["totals"] = {"shards": len(man["shards"]), **{k: sum(s[k] for s in man["shards"])
                                                      for k in ("tokens", "entries", "bytes")},
                     "samples": sum(s["rows"] for s in man["shards"])}
    write_manifest(p, man)
    with pytest.raises(StoreCorruptError, match="renamed, duplicated or swapped"):
        LabelStore(p)[s0["rows"]]


def test_spec_crc_covers_sample_id_and_num_tokens(tmp_path):
    """FORMAT.md section 4 (v3): crc32 = zlib.crc32 chained over int64 sample_id, int32 num_tokens, the payload."""
    p = tmp_path / "s"
    build(p, n=3)
    t = pa.ipc.open_file(pa.memory_map(str(p / manifest(p)["shards"][0]["path"]))).read_all().to_pydict()
    for r in range(len(t["sample_id"])):
        c = zlib.crc32(int(t["sample_id"][r]).to_bytes(8, "little", signed=True)
                       + int(t["num_tokens"][r]).to_bytes(4, "little", signed=True))
        for col in ("input_ids", "counts", "ids", "values", "tail", "doc_starts"):
            c = zlib.crc32(t[col][r], c)
        assert c == t["crc32"][r]


# ------------------------------------------------------------------------------ 2. non-regular files, paths
@pytest.mark.parametrize("what", ["fifo", "directory"])
def test_manifest_that_is_not_a_regular_file_refused_without_blocking(tmp_path, what):
    p = tmp_path / "s"
    build(p)
    (p / "manifest.json").unlink()
    if what == "fifo":
        os.mkfifo(p / "manifest.json")
    else:
        (p / "manifest.json").mkdir()
    with deadline():
        with pytest.raises(LabelStoreError, match="not a regular file"):
            LabelStore(p)
        with pytest.raises(LabelStoreError, match="not a regular file"):
            summary(p)
        rep = verify_store(p)
    assert not rep["ok"] and "not a regular file" in rep["problems"][0]


def test_shard_and_config_fifos_refused_without_blocking(tmp_path):
    p = tmp_path / "s"
    build(p)
    rel = manifest(p)["shards"][0]["path"]
    (p / rel).unlink()
    os.mkfifo(p / rel)
    (p / "config.json").unlink()
    os.mkfifo(p / "config.json")
    with deadline():
        with pytest.raises(LabelStoreError, match="not a regular file"):
            LabelStore(p)
        rep = verify_store(p)
    assert not rep["ok"]
    assert any("config.json" in x and "not a regular file" in x for x in rep["problems"])


# ------------------------------------------------------------------------------ 3. decode budget, compression
def test_row_budget_is_checked_before_decoding(tmp_path):
    p = tmp_path / "s"
    rows = build(p)
    big = max(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    T = len(rows[big]["input_ids"])
    need = row_bytes(T, int(rows[big]["counts"].sum()), 4)
    s = LabelStore(p, row_budget=need - 1)
    with pytest.raises(StoreFormatError, match="row budget"):
        s.get(big)
    assert LabelStore(p, row_budget=need).get(big).input_ids.tolist() == rows[big]["input_ids"].tolist()


@pytest.mark.parametrize("encoding", ["packed", "zstd"])
def test_row_declaring_huge_sizes_refused_not_allocated(tmp_path, encoding):
    """T = 2^24 (within MAX_SEQ_LEN) with k = 32 would take ~6.8 GB decoded: refused from the declared size."""
    p = tmp_path / "s"
    rows = random_rows(3, vocab_size=1000, k=32, seed=2, max_len=8)
    with StoreWriter(p, make_meta_v3(1000, 32, encoding={"name": encoding})) as w:
        write_rows(w, rows)

    def huge(cols):
        cols["num_tokens"][0] = 1 << 24
        head = (cols["sample_id"][0]).to_bytes(8, "little", signed=True) + (1 << 24).to_bytes(4, "little")
        c = zlib.crc32(head)
        for col in ("input_ids", "counts", "ids", "values", "tail", "doc_starts"):
            c = zlib.crc32(cols[col][0], c)
        cols["crc32"][0] = c  # a valid CRC: only the budget stands in the way
        return cols
    rewrite_shard(p, manifest(p)["shards"][0]["path"], huge)
    with pytest.raises(StoreFormatError, match="row budget"):
        LabelStore(p)[0]
    rep = verify_store(p)
    assert any("row budget" in x for x in rep["problems"]), rep


@pytest.mark.parametrize("version", [1, 3])
def test_arrow_body_compression_refused_before_decompressing(tmp_path, version):
    p = tmp_path / "s"
    if version == 1:
        shutil.copytree(DATA / "store_v1", p)
    else:
        build(p)
    rewrite_shard(p, manifest(p)["shards"][0]["path"], lambda c: c, compression="zstd")
    with pytest.raises(StoreCorruptError, match="body compression"):
        LabelStore(p)[0]
    assert not verify_store(p)["ok"]


def test_absurd_row_counts_refused_on_open(tmp_path):
    p = tmp_path / "s"
    build(p)
    good = manifest(p)
    for rows, nbytes in ((1 << 31, None), (1 << 31, 1 << 40)):
        man = json.loads(json.dumps(good))
        s = man["shards"][0]
        man["totals"]["samples"] += rows - s["rows"]
        s["rows"] = rows
        if nbytes:
            man["totals"]["bytes"] += nbytes - s["bytes"]
            s["bytes"] = nbytes
        write_manifest(p, man)
        with pytest.raises(StoreFormatError, match="cannot fit|bytes but the manifest says"):
            LabelStore(p)


# ------------------------------------------------------------------------------ 4. writer: links, resume, records
def test_writer_refuses_symbolic_links_and_touches_nothing_outside(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("r00000-notes.txt", "r00000-999999.arrow", ".tmp-r00000-backup.arrow", "precious.txt"):
        (outside / name).write_text("user data")
    before = {f.name: f.read_text() for f in outside.iterdir()}
    meta = make_meta_v3(1000, 4)
    for link, target in (("shards", outside), ("commits", outside), ("locks/r00000.lock", outside / "precious.txt"),
                         ("config.json", outside / "precious.txt")):
        p = tmp_path / f"s-{link.replace('/', '_')}"
        (p / "locks").mkdir(parents=True)
        os.symlink(target, p / link)
        with pytest.raises(StoreWriteError, match="symbolic link"):
            StoreWriter(p, meta)
        assert {f.name: f.read_text() for f in outside.iterdir()} == before
    # manifest.json a link at finalize: refused, the link's target untouched
    p = tmp_path / "s-manifest"
    with StoreWriter(p, meta) as w:
        write_rows(w, random_rows(2, k=4, seed=1))
    (p / "manifest.json").unlink()
    os.symlink(outside / "precious.txt", p / "manifest.json")
    with pytest.raises(StoreWriteError, match="symbolic link"):
        finalize_store(p, 1)
    assert {f.name: f.read_text() for f in outside.iterdir()} == before


def test_resume_deletes_only_its_own_uncommitted_shards(tmp_path):
    rows = random_rows(12, vocab_size=1000, k=4, seed=0, max_len=12)
    p = tmp_path / "s"
    w = StoreWriter(p, make_meta_v3(1000, 4), shard_bytes=600)
    write_rows(w, rows[:8])
    w.abort()
    (p / "commits" / "r00000-000000.json").unlink()  # killed between the shard's rename and its commit record
    for name in ("r00000-notes.txt", ".tmp-r00000-backup.arrow"):
        (p / "shards" / name).write_text("user data")
    user = p / "shards" / "r00000-999999.arrow"  # a shard's name, not this store's content
    shutil.copy(DATA / "store_v1" / "shards" / "r00000-000000.arrow", user)
    before = user.read_bytes()
    with pytest.raises(StoreWriteError, match="not one this store wrote"):
        StoreWriter(p, make_meta_v3(1000, 4), shard_bytes=600)
    assert user.read_bytes() == before
    user.rename(tmp_path / "moved.arrow")
    _resume_and_finish(p, rows)  # the uncommitted shard of its own is deleted and recomputed
    assert (p / "shards" / "r00000-notes.txt").read_text() == "user data"
    assert (p / "shards" / ".tmp-r00000-backup.arrow").read_text() == "user data"
    assert sorted(x[0] for x in read_all(p)) == [r["sample_id"] for r in rows]
    rep = verify_store(p)
    assert rep["ok"] and any("r00000-notes.txt" in x for x in rep["notes"]), rep


def test_finalize_removes_stray_done_tmp_of_dead_writers(tmp_path):
    p = tmp_path / "s"
    build(p)
    stray = p / "commits" / ".tmp-r00000.done.999999999"  # a pid no process has
    stray.write_text("{}")
    finalize_store(p, 1)
    assert not stray.exists()
    assert verify_store(p)["ok"]


def test_hostile_commit_range_refused_not_expanded(tmp_path):
    p = tmp_path / "s"
    build(p)
    rec_path = sorted((p / "commits").glob("r00000-*.json"))[0]
    rec = json.loads(rec_path.read_text())
    rec["sample_ranges"] = [[0, 10**12]]
    rec_path.write_text(json.dumps(rec))
    with pytest.raises(StoreCorruptError, match=f"rm .*{rec_path.name}"):
        StoreWriter(p, make_meta_v3(1000, 4))


def _resume_and_finish(p, rows):
    with StoreWriter(p, make_meta_v3(1000, 4), shard_bytes=600) as w:
        todo = ~w.committed_mask([r["sample_id"] for r in rows])
        write_rows(w, [r for r, t in zip(rows, todo) if t])


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "record", "prior"])
def test_resume_names_damaged_own_files_then_works(tmp_path, damage):
    rows = random_rows(12, vocab_size=1000, k=4, seed=0, max_len=12)
    ref = tmp_path / "ref"
    with StoreWriter(ref, make_meta_v3(1000, 4), shard_bytes=600) as w:
        write_rows(w, rows)
    p = tmp_path / "s"
    w = StoreWriter(p, make_meta_v3(1000, 4), shard_bytes=600)
    for r in rows[:8]:
        write_rows(w, [r])
        w.add_teacher_mass(np.ones(1000), 1)
    w.abort()  # killed: committed shards stay
    seq0 = p / "shards" / "r00000-000000.arrow"
    if damage == "flip":
        data = bytearray(seq0.read_bytes())
        data[len(data) // 2] ^= 1  # same size
        seq0.write_bytes(bytes(data))
    elif damage == "truncate":
        seq0.write_bytes(seq0.read_bytes()[:-7])
    elif damage == "delete":
        seq0.unlink()
    elif damage == "record":
        (p / "commits" / "r00000-000000.json").write_text("{garbage")
    else:
        (p / "commits" / "r00000-000000.prior").write_bytes(b"\0" * 8000)
    with pytest.raises(StoreCorruptError, match="Remove exactly these files") as exc:
        StoreWriter(p, make_meta_v3(1000, 4), shard_bytes=600)
    cmd = str(exc.value).rsplit("\n", 1)[-1].strip()
    assert cmd.startswith("rm ")
    for f in shlex.split(cmd)[1:]:
        os.unlink(f)
    _resume_and_finish(p, rows)
    assert verify_store(p)["ok"]
    got = {x[0]: x for x in read_all(p)}
    want = {x[0]: x for x in read_all(ref)}
    assert sorted(got) == sorted(want)
    for sid in want:
        assert np.array_equal(got[sid][1], want[sid][1]) and np.array_equal(got[sid][2], want[sid][2])


# ------------------------------------------------------------------------------ 5. verify cross-checks
def test_verify_cross_checks_manifest_commits_and_files(tmp_path):
    p = tmp_path / "s"
    build(p)
    assert verify_store(p)["ok"]
    man = manifest(p)
    orphan = p / "shards" / "r00007-000000.arrow"
    shutil.copy(p / man["shards"][0]["path"], orphan)
    first = man["shards"][0]["path"]
    rec = json.loads((p / "commits" / f"{Path(first).stem}.json").read_text())
    rec.update(path="shards/r00000-000099.arrow", seq=99)
    (p / "commits" / "r00000-000099.json").write_text(json.dumps(rec))
    (p / "commits" / f"{Path(man['shards'][1]['path']).stem}.json").rename(p / "commits" / "moved.json.bak")
    probs = "\n".join(verify_store(p)["problems"])
    assert "shards/r00007-000000.arrow: orphan shard" in probs
    assert f"{man['shards'][1]['path']}: listed in the manifest but has no commit record" in probs
    assert "shards/r00000-000099.arrow: committed (commit record present) but missing from the manifest" in probs
    assert "shards/r00000-000099.arrow: commit record without its shard file" in probs


def test_verify_notes_what_an_old_version_cannot_check():
    rep = verify_store(DATA / "store_v1")
    assert rep["ok"] and "format version 1" in rep["notes"][0] and "sample_id" in rep["notes"][0]
    assert verify_store(DATA / "store_v2")["notes"]


@pytest.mark.parametrize("codec", ["fp16", "e4m3", "e5m2"])
def test_verify_reports_value_codes_no_writer_produces(tmp_path, codec):
    """NaN, infinite and negative codes decode to +0 (docs/FORMAT.md 5), so only verify can notice them: it counts
    them against the codec's own bit layout (an independent numpy/torch decode of the raw codes)."""
    from labelstore.codecs import get_codec

    rows = random_rows(3, codec=codec, seed=1)
    if codec == "fp16":
        v = rows[1]["values"].copy().view("<u2")
        v[2], v[4] = 0x7E00, 0xBC00  # NaN, -1.0
        bad_bytes = v.view(np.uint8)
    else:
        bad_bytes = rows[1]["values"].copy()
        bad_bytes[2], bad_bytes[4] = 0x7F, 0x80  # NaN (e4m3) / NaN (e5m2); -0
    rows[1]["values"] = bad_bytes
    w = StoreWriter(tmp_path / "s", make_meta_v3(codec=codec))
    write_rows(w, rows)
    w.close()
    rep = verify_store(tmp_path / "s")
    assert not rep["ok"] and len(rep["problems"]) == 1 and "row 1 holds 2 value code(s)" in rep["problems"][0]
    assert get_codec(codec).invalid_codes(random_rows(3, codec=codec, seed=1)[1]["values"]) == 0
