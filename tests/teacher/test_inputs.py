"""Corpus inputs: formats, packing boundaries, truncation, deterministic plans and clear input errors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _teachers import make_documents, make_tokenizer, write_corpus

from labelstore.errors import InputDataError
from labelstore.teacher.inputs import InputConfig, build_plan, expand_paths


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def docs():
    return make_documents(30, seed=3)


def reference_documents(tok, docs):
    """Each document's ids as the tokenizer gives them, plus the EOS separator."""
    return [list(tok(d, add_special_tokens=True)["input_ids"]) + [tok.eos_token_id] for d in docs]


def plan_arrays(plan):
    return [plan.sequence(i).tolist() for i in range(len(plan))], [plan.doc_starts(i).tolist() for i in
                                                                   range(len(plan))]


@pytest.mark.parametrize("L", [1, 7, 64, 10_000])
def test_packing_matches_a_plain_concatenation(tmp_path, tok, docs, L):
    files = write_corpus(tmp_path / "c", docs)
    plan = build_plan(files, tok, InputConfig(max_length=L, pack=True), len(tok))
    ref_docs = reference_documents(tok, docs)
    stream = [t for d in ref_docs for t in d]
    starts = np.cumsum([0] + [len(d) for d in ref_docs[:-1]])
    want = [stream[a:a + L] for a in range(0, len(stream), L)]
    want_starts = [[int(s - a) for s in starts if a <= s < a + L] for a in range(0, len(stream), L)]
    seqs, got_starts = plan_arrays(plan)
    assert seqs == want
    assert got_starts == want_starts
    assert all(len(s) == L for s in seqs[:-1]) and 1 <= len(seqs[-1]) <= L
    assert plan.num_tokens == len(stream)


def test_truncate_gives_one_sequence_per_document(tmp_path, tok, docs):
    files = write_corpus(tmp_path / "c", docs)
    plan = build_plan(files, tok, InputConfig(max_length=20, pack=False), len(tok))
    seqs, starts = plan_arrays(plan)
    assert seqs == [d[:20] for d in reference_documents(tok, docs)]
    assert starts == [[0]] * len(docs)


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_formats_give_the_same_plan_as_text_files(tmp_path, tok, docs, kind):
    cfg = InputConfig(max_length=50, text_field="body")
    a = build_plan(write_corpus(tmp_path / "txt", docs), tok, cfg, len(tok))
    b = build_plan(write_corpus(tmp_path / kind, docs, kind=kind, text_field="body"), tok, cfg, len(tok))
    assert plan_arrays(a) == plan_arrays(b)
    assert a.fingerprint == b.fingerprint


@pytest.mark.parametrize("fmt", ["parquet", "arrow-file", "arrow-stream"])
def test_pretokenized_columns_are_used_as_is(tmp_path, tok, fmt):
    rows = [[5, 6, 7], [8, 9], [10, 11, 12, 13, tok.eos_token_id]]
    table = pa.table({"input_ids": pa.array(rows, pa.list_(pa.int32()))})
    path = tmp_path / ("t.parquet" if fmt == "parquet" else "t.arrow")
    if fmt == "parquet":
        pq.write_table(table, path)
    else:
        with pa.OSFile(str(path), "wb") as f:
            opener = pa.ipc.new_file if fmt == "arrow-file" else pa.ipc.new_stream
            with opener(f, table.schema) as w:
                w.write_table(table)
    plan = build_plan([path], tok, InputConfig(max_length=4), len(tok))
    eos = tok.eos_token_id
    stream = [5, 6, 7, eos, 8, 9, eos, 10, 11, 12, 13, eos]  # EOS appended unless already there
    assert plan_arrays(plan)[0] == [stream[0:4], stream[4:8], stream[8:12]]
    assert plan_arrays(plan)[1] == [[0], [0, 3], []]  # the third document starts inside sequence 1


def test_directories_expand_sorted_and_skip_hidden_files(tmp_path, tok):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("bee")
    (tmp_path / "d" / "a.txt").write_text("ay")
    (tmp_path / "d" / "sub" / "c.txt").write_text("sea")
    (tmp_path / "d" / ".hidden").write_text("no")
    (tmp_path / "d" / "__pycache__").mkdir()
    (tmp_path / "d" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\xff\x00")
    assert [p.name for p in expand_paths([tmp_path / "d"])] == ["a.txt", "b.txt", "c.txt"]


def test_plans_are_deterministic_and_the_scratch_file_matches_memory(tmp_path, tok, docs):
    files = write_corpus(tmp_path / "c", docs)
    cfg = InputConfig(max_length=33)
    (tmp_path / "w").mkdir()
    a = build_plan(files, tok, cfg, len(tok))
    b = build_plan(files, tok, cfg, len(tok), workdir=tmp_path / "w")
    assert isinstance(b.tokens, np.memmap)
    assert plan_arrays(a) == plan_arrays(b) and a.fingerprint == b.fingerprint
    c = build_plan(files, tok, InputConfig(max_length=34), len(tok))
    assert c.fingerprint != a.fingerprint
    d = build_plan(files, tok, InputConfig(max_length=33, max_samples=3), len(tok))
    assert len(d) == 3 and plan_arrays(d)[0] == plan_arrays(a)[0][:3]


def test_empty_documents_are_skipped(tmp_path, tok):
    files = write_corpus(tmp_path / "c", ["", "hello world", ""])
    plan = build_plan(files, tok, InputConfig(max_length=100), len(tok))
    assert plan_arrays(plan)[0] == [reference_documents(tok, ["hello world"])[0]]


# ------------------------------------------------------------------------------------------------ errors
def check_error(paths, tok, match, cfg=None, vocab=None):
    with pytest.raises(InputDataError, match=match):
        build_plan(paths, tok, cfg or InputConfig(max_length=16), vocab or len(tok))


def test_empty_corpus(tmp_path, tok):
    files = write_corpus(tmp_path / "c", ["", ""])
    (tmp_path / "e.jsonl").write_text("\n\n")
    check_error(files + [tmp_path / "e.jsonl"], tok, "corpus is empty")
    (tmp_path / "emptydir").mkdir()
    check_error([tmp_path / "emptydir"], tok, "holds no files")
    check_error([], tok, "no input")


def test_missing_text_field(tmp_path, tok):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"content": "oops"}) + "\n")
    check_error([p], tok, r"x\.jsonl:2: record has no field 'text' \(it has \['content'\]\)")
    q = tmp_path / "x.parquet"
    pq.write_table(pa.table({"content": ["a"]}), q)
    check_error([q], tok, r"neither a text column 'text' nor a token column 'input_ids'")
    r = tmp_path / "y.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), r)
    check_error([r], tok, "expected a string column")


def test_unreadable_and_non_utf8_files(tmp_path, tok):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    check_error([bad], tok, r"latin1\.txt is not valid UTF-8")
    check_error([tmp_path / "missing.txt"], tok, "does not exist")
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    check_error([corrupt], tok, r"corrupt\.parquet is not a readable parquet file")
    j = tmp_path / "broken.jsonl"
    j.write_text('{"text": "ok"}\n{"text": \n')
    check_error([j], tok, r"broken\.jsonl:2: not valid JSON")


def test_token_ids_outside_the_vocabulary(tmp_path, tok):
    p = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"input_ids": [[1, 2, 3], [4, len(tok) + 5]]}), p)
    check_error([p], tok, f"token id {len(tok) + 5}, outside the teacher's vocabulary")
    files = write_corpus(tmp_path / "c", ["a text with merges the the the"])
    check_error(files, tok, "outside the teacher's vocabulary", vocab=100)  # a tokenizer larger than the model


def test_packing_needs_an_eos(tmp_path, tok):
    files = write_corpus(tmp_path / "c", ["hello"])

    class NoEos:
        eos_token_id = None

    check_error(files, NoEos(), "packing needs an EOS", vocab=300)


def test_large_tables_stream_in_batches_and_nulls_are_refused(tmp_path, tok):
    docs = [f"row {i} " + "x" * (i % 7) for i in range(2500)]
    p = tmp_path / "many.parquet"
    pq.write_table(pa.table({"text": docs}), p, row_group_size=700)
    j = write_corpus(tmp_path / "j", docs, kind="jsonl")
    cfg = InputConfig(max_length=128)
    assert build_plan([p], tok, cfg, len(tok)).fingerprint == build_plan(j, tok, cfg, len(tok)).fingerprint
    n = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": ["fine", None]}), n)
    check_error([n], tok, "holds null rows")


def test_long_documents_are_tokenized_in_pieces_with_the_same_tokens(tmp_path, tok, monkeypatch):
    """Past LONG_DOC_CHARS a text is tokenized a piece at a time, cut after newlines: with lines that start with a
    non-space character no pre-token straddles a cut, so the ids equal a whole-text tokenization (BOS included)."""
    import labelstore.teacher.inputs as inputs_mod

    lines = [f"line{i} holds some words {i * 7} and more" for i in range(300)]
    text = "\n".join(lines) + "\n"
    (tmp_path / "long.txt").write_text(text)
    (tmp_path / "short.txt").write_text("a short one\n")
    monkeypatch.setattr(inputs_mod, "LONG_DOC_CHARS", 200)  # the long file is ~10,000 characters: ~50 pieces
    plan = build_plan([str(tmp_path / "long.txt"), str(tmp_path / "short.txt")], tok,
                      InputConfig(max_length=100_000, pack=False), len(tok), workdir=str(tmp_path))
    whole = list(tok(text, add_special_tokens=True)["input_ids"])
    eos = [tok.eos_token_id] if tok.eos_token_id is not None and whole[-1:] != [tok.eos_token_id] else []
    assert plan.sequence(0).tolist() == whole + eos
    assert len(list(inputs_mod._pieces(text, 200))) > 40
    assert "".join(inputs_mod._pieces(text, 200)) == text
    short = list(tok("a short one\n", add_special_tokens=True)["input_ids"])
    assert plan.sequence(1).tolist() == short + eos
