"""`labelstore export STORE OUT --to parquet`: a store as plain Parquet columns that any tool reads.

A store's shards hold opaque bit-packed bytes; pandas, DuckDB, Polars, ``datasets`` and other trainers see
only ``binary``. The export decodes every row by the format's reconstruction rule (exactly what
:class:`labelstore.student.dataset.StoreDataset` yields) and writes one Parquet row per stored sequence::

    sample_id      int64
    input_ids      list<int32>               [T]
    teacher_ids    list<list<int32>>         [T][n_t]  the kept ids of each position (n_t varies in topp/sampled modes)
    teacher_probs  list<list<float32>>       [T][n_t]  absolute probabilities (sampled modes: the estimator's)
    teacher_tail   list<float32>             [T]       exact mass outside the kept ids (0 in pure sample stores)
    position_mask  list<bool>                [T]       positions that carry a teacher distribution

Position ``t`` holds the teacher's distribution of token ``t + 1`` (next-token alignment). The store's metadata
(vocabulary, selection, codec, temperature, tokenizer) is in the Parquet schema metadata under
``labelstore.meta`` (JSON). Files are ``part-NNNNN.parquet`` in ``OUT``, zstd-compressed, with row groups of about
``row_group_tokens`` positions so that a reader streams a group at a time; ``datasets.load_dataset("parquet",
data_dir=OUT)`` reads them. Files are written under temporary names and renamed when complete; an existing
``OUT`` that is not empty is refused, never overwritten.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from labelstore.errors import ConfigMismatchError
from labelstore.student.dataset import TargetDecoder

META_KEY = b"labelstore.meta"
EXPORT_SCHEMA = pa.schema([
    ("sample_id", pa.int64()),
    ("input_ids", pa.list_(pa.int32())),
    ("teacher_ids", pa.list_(pa.list_(pa.int32()))),
    ("teacher_probs", pa.list_(pa.list_(pa.float32()))),
    ("teacher_tail", pa.list_(pa.float32())),
    ("position_mask", pa.list_(pa.bool_())),
])
DEFAULT_ROW_GROUP_TOKENS = 1 << 16
DEFAULT_FILE_TOKENS = 1 << 24


def _nested(offsets_outer: np.ndarray, offsets_inner: np.ndarray, values: pa.Array) -> pa.Array:
    inner = pa.ListArray.from_arrays(pa.array(offsets_inner, pa.int32()), values)
    return pa.ListArray.from_arrays(pa.array(offsets_outer, pa.int32()), inner)


def items_to_table(items: list[dict], meta: dict) -> pa.Table:
    """Dataset items (:mod:`labelstore.student.dataset`) -> an Arrow table in the export schema."""
    lens = np.array([len(it["input_ids"]) for it in items], dtype=np.int64)
    outer = np.concatenate([[0], np.cumsum(lens)])
    masks = [np.asarray(it["teacher_mask"]) for it in items]
    counts = np.concatenate([m.sum(axis=1) for m in masks]) if items else np.zeros(0, np.int64)
    inner = np.concatenate([[0], np.cumsum(counts)])
    if inner[-1] >= 2**31 or outer[-1] >= 2**31:
        raise ConfigMismatchError("a row group holds over 2^31 entries; lower row_group_tokens")

    def cat(key, dt, masked=False):
        parts = [np.asarray(it[key], dtype=dt)[m] if masked else np.asarray(it[key], dtype=dt)
                 for it, m in zip(items, masks)]
        return np.concatenate(parts) if parts else np.zeros(0, dt)

    ids, probs = cat("teacher_ids", np.int32, True), cat("teacher_probs", np.float32, True)
    cols = [
        pa.array([it["sample_id"] for it in items], pa.int64()),
        pa.ListArray.from_arrays(pa.array(outer, pa.int32()), pa.array(cat("input_ids", np.int32))),
        _nested(outer, inner, pa.array(ids)),
        _nested(outer, inner, pa.array(probs)),
        pa.ListArray.from_arrays(pa.array(outer, pa.int32()), pa.array(cat("teacher_tail", np.float32))),
        pa.ListArray.from_arrays(pa.array(outer, pa.int32()), pa.array(cat("position_mask", np.bool_))),
    ]
    schema = EXPORT_SCHEMA.with_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
    return pa.Table.from_arrays(cols, schema=schema)


def _prepare_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigMismatchError(f"{out} exists and is not an empty directory; export never overwrites: choose a "
                                  "new OUT")
    out.mkdir(parents=True, exist_ok=True)


def export_parquet(store, out, *, row_group_tokens: int = DEFAULT_ROW_GROUP_TOKENS,
                   file_tokens: int = DEFAULT_FILE_TOKENS, compression: str = "zstd") -> dict:
    """Write a store as Parquet files in the directory ``out`` (see the module docstring); return a summary.

    Args:
        store: a store directory or an open :class:`~labelstore.store.reader.LabelStore`.
        out: a new (or empty) directory.
        row_group_tokens: positions per row group, about (a row group ends at the first row that reaches it).
        file_tokens: positions per file, about.
        compression: Parquet codec ("zstd", "snappy", "none", ...).
    """
    if row_group_tokens < 1 or file_tokens < row_group_tokens:
        raise ValueError("need 1 <= row_group_tokens <= file_tokens")
    targets = TargetDecoder(store)
    meta = targets.meta
    out = Path(out)
    _prepare_out(out)
    files, rows, tokens = [], 0, 0
    writer = tmp = None
    file_tok = 0
    group: list[dict] = []
    group_tok = 0

    def flush_group():
        nonlocal group, group_tok
        if group:
            writer.write_table(items_to_table(group, meta), row_group_size=len(group))
        group, group_tok = [], 0

    def close_file():
        nonlocal writer, tmp
        if writer is not None:
            flush_group()
            writer.close()
            final = out / f"part-{len(files):05d}.parquet"
            os.replace(tmp, final)
            files.append(final)
            writer = tmp = None

    for i in range(len(targets.store)):
        it = targets.decode(i)
        if writer is None:
            tmp = out / f".tmp-part-{len(files):05d}.parquet"
            schema = EXPORT_SCHEMA.with_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
            writer = pq.ParquetWriter(tmp, schema, compression=compression, use_dictionary=False)
            file_tok = 0
        T = len(it["input_ids"])
        group.append(it)
        group_tok += T
        file_tok += T
        rows += 1
        tokens += T
        if group_tok >= row_group_tokens:
            flush_group()
        if file_tok >= file_tokens:
            close_file()
    close_file()
    if not files:  # an empty store still exports one (empty) file, so readers find the schema
        writer = pq.ParquetWriter(out / "part-00000.parquet", items_to_table([], meta).schema, compression=compression)
        writer.close()
        files.append(out / "part-00000.parquet")
    return {"files": [str(f) for f in files], "rows": rows, "tokens": tokens,
            "bytes": sum(f.stat().st_size for f in files)}


def read_export_meta(path) -> dict:
    """The store metadata recorded in an exported Parquet file."""
    md = pq.read_schema(path).metadata or {}
    if META_KEY not in md:
        raise ConfigMismatchError(f"{path} is not a labelstore Parquet export (no {META_KEY.decode()} metadata)")
    return json.loads(md[META_KEY])


# ------------------------------------------------------------------------------------------------ CLI
def add_arguments(parser) -> None:
    parser.add_argument("store", help="the store directory to export")
    parser.add_argument("out", help="a new directory for the exported files")
    parser.add_argument("--to", choices=("parquet", "distillkit"), default="parquet",
                        help="parquet: plain list columns for any tool; distillkit: DistillKit's layout (topk only)")
    parser.add_argument("--row-group-tokens", type=int, default=DEFAULT_ROW_GROUP_TOKENS,
                        help="positions per Parquet row group, about (default %(default)s)")
    parser.add_argument("--file-tokens", type=int, default=DEFAULT_FILE_TOKENS,
                        help="positions per output file, about (default %(default)s)")


def run(args) -> int:
    if args.to == "distillkit":
        from labelstore.student.distillkit import export_distillkit

        res = export_distillkit(args.store, args.out)
    else:
        res = export_parquet(args.store, args.out, row_group_tokens=args.row_group_tokens,
                             file_tokens=args.file_tokens)
    print(f"exported {res['rows']:,} sequences ({res['tokens']:,} positions) to {len(res['files'])} file(s), "
          f"{res['bytes']:,} bytes, in {args.out}")
    return 0
