"""The shard table of a store: a JSON list in ``manifest.json`` (format versions 1-3), or (version 4) the Arrow
IPC file ``index.arrow`` that the manifest references, read lazily one block at a time (docs/FORMAT.md 11).

Both are served by the same small interface (:class:`ShardTable`): the number of shards, one shard's entry as a
dict, the shard holding global row ``i`` and the first row of shard ``s``. A reader never builds a Python object
per shard of a version-4 store: opening it reads the manifest, ``stat``s and memory-maps the index and reads its
Arrow footer; a block (``block_rows`` shards) is hashed against the digest the manifest records, checked and kept
as numpy views the first time a lookup needs it.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa

from labelstore.errors import StoreCorruptError, StoreFormatError
from labelstore.store.arrow_file import check_ipc_file
from labelstore.store.format import MAX_ROWS_PER_SHARD, MAX_SHARDS, MIN_ROW_BYTES
from labelstore.store.safefs import check_regular, open_regular

INDEX = "index.arrow"
INDEX_BLOCK_ROWS = 1 << 14  # shards per record batch of index.arrow, and per digest in the manifest
MAX_INDEX_BLOCK_ROWS = 1 << 20
INDEX_FIELDS = [
    pa.field("rank", pa.int32(), nullable=False),
    pa.field("seq", pa.int32(), nullable=False),
    pa.field("rows", pa.int64(), nullable=False),
    pa.field("tokens", pa.int64(), nullable=False),
    pa.field("entries", pa.int64(), nullable=False),
    pa.field("bytes", pa.int64(), nullable=False),
    pa.field("sha256", pa.binary(32), nullable=False),
    pa.field("first_sample_id", pa.int64(), nullable=False),
    pa.field("last_sample_id", pa.int64(), nullable=False),
    pa.field("row_start", pa.int64(), nullable=False),
]
INDEX_SCHEMA = pa.schema(INDEX_FIELDS)
RECORD_KEYS = ("path", "rank", "seq", "rows", "tokens", "entries", "bytes", "sha256", "first_sample_id",
               "last_sample_id")
_WIDTH = {f.name: f.type.byte_width for f in INDEX_FIELDS}


def shard_path(rank: int, seq: int) -> str:
    return f"shards/r{rank:05d}-{seq:06d}.arrow"


def block_digest(batch: pa.RecordBatch) -> str:
    """sha256 (hex) of one index record batch: each column's values, in schema order, as their little-endian
    fixed-width bytes (``rows x width`` bytes per column, no validity bitmap, no padding)."""
    h = hashlib.sha256()
    n = batch.num_rows
    for j, f in enumerate(INDEX_FIELDS):
        col = batch.column(j)
        w = _WIDTH[f.name]
        buf = col.buffers()[1]
        h.update(memoryview(buf)[col.offset * w: (col.offset + n) * w] if buf is not None else b"")
    return h.hexdigest()


def build_index(records: list[dict], block_rows: int = INDEX_BLOCK_ROWS) -> tuple[bytes, dict]:
    """``index.arrow``'s bytes and the manifest's ``index`` reference for shard entries ``records`` (in store
    order)."""
    n = len(records)
    if n > MAX_SHARDS:
        raise StoreFormatError(f"{n} shards is over the format's limit of {MAX_SHARDS}")
    rows = np.fromiter((r["rows"] for r in records), np.int64, n)
    cols = {
        "rank": np.fromiter((r["rank"] for r in records), np.int32, n),
        "seq": np.fromiter((r["seq"] for r in records), np.int32, n),
        "rows": rows,
        **{k: np.fromiter((r[k] for r in records), np.int64, n) for k in ("tokens", "entries", "bytes")},
        "sha256": np.frombuffer(b"".join(bytes.fromhex(r["sha256"]) for r in records), np.uint8),
        **{k: np.fromiter((r[k] if r["rows"] else 0 for r in records), np.int64, n)
           for k in ("first_sample_id", "last_sample_id")},
        "row_start": np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64) if n else rows,
    }
    return write_index_columns(cols, block_rows)


def write_index_columns(cols: dict, block_rows: int = INDEX_BLOCK_ROWS) -> tuple[bytes, dict]:
    """The same from numpy columns (``sha256``: ``uint8 [n * 32]``); what the scale benchmark synthesises."""
    n = len(cols["rows"])
    sink = pa.BufferOutputStream()
    blocks = []
    with pa.ipc.new_file(sink, INDEX_SCHEMA) as w:
        for a in range(0, n, block_rows):
            b = min(n, a + block_rows)
            arrays = []
            for f in INDEX_FIELDS:
                if f.name == "sha256":
                    arrays.append(pa.FixedSizeBinaryArray.from_buffers(
                        f.type, b - a, [None, pa.py_buffer(cols["sha256"][32 * a: 32 * b].tobytes())]))
                else:
                    arrays.append(pa.array(cols[f.name][a:b], f.type))
            batch = pa.RecordBatch.from_arrays(arrays, schema=INDEX_SCHEMA)
            w.write_batch(batch)
            blocks.append({"rows": int(cols["rows"][a:b].sum()), "sha256": block_digest(batch)})
    data = sink.getvalue().to_pybytes()
    return data, {"path": INDEX, "bytes": len(data), "shards": n, "block_rows": block_rows, "blocks": blocks}


def validate_index_ref(ref, totals: dict, where: str) -> dict:
    """The manifest's ``index`` reference (version 4): well formed, and its block sums equal the totals."""
    if not isinstance(ref, dict) or ref.get("path") != INDEX:
        raise StoreFormatError(f"{where}: \"index\" must be an object naming {INDEX}")
    for key, hi in (("bytes", 1 << 50), ("shards", MAX_SHARDS), ("block_rows", MAX_INDEX_BLOCK_ROWS)):
        x = ref.get(key)
        if not isinstance(x, int) or isinstance(x, bool) or not (1 if key == "block_rows" else 0) <= x <= hi:
            raise StoreFormatError(f"{where}: index {key} {x!r} is not an integer in [0, {hi}]")
    blocks = ref.get("blocks")
    nb = -(-ref["shards"] // ref["block_rows"])
    if not isinstance(blocks, list) or len(blocks) != nb:
        raise StoreFormatError(f"{where}: index blocks must be a list of {nb} entries (shards / block_rows)")
    for i, b in enumerate(blocks):
        r = b.get("rows") if isinstance(b, dict) else None
        if (not isinstance(r, int) or isinstance(r, bool) or not 0 <= r <= MAX_ROWS_PER_SHARD * ref["block_rows"]
                or not isinstance(b.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", b["sha256"])):
            raise StoreFormatError(f"{where}: index block {i} {b!r} is not {{\"rows\": int, \"sha256\": hex}}")
    if totals["samples"] * MIN_ROW_BYTES > totals["bytes"]:  # what each entry must satisfy, in sum: checked on open
        raise StoreFormatError(f"{where}: {totals['samples']} rows cannot fit in {totals['bytes']} bytes of shards; "
                               "refusing the store before allocating anything for its rows")
    if totals["shards"] != ref["shards"] or totals["samples"] != sum(b["rows"] for b in blocks):
        raise StoreFormatError(f"{where}: totals {totals} disagree with the index ({ref['shards']} shards, "
                               f"{sum(b['rows'] for b in blocks)} rows); the manifest was edited")
    return ref


class ShardTable:
    """The shard list of a version 1-3 manifest (a list of dicts, validated when the manifest was loaded)."""

    def __init__(self, shards: list[dict]):
        self._shards = shards
        self.starts = np.concatenate([[0], np.cumsum([s["rows"] for s in shards])]).astype(np.int64)

    @classmethod
    def from_starts(cls, starts) -> ShardTable:
        """A table known only by its cumulative row starts (lookups only; no entries)."""
        t = cls.__new__(cls)
        t._shards = None
        t.starts = np.asarray(starts, np.int64)
        return t

    def __len__(self) -> int:
        return len(self._shards)

    @property
    def total_rows(self) -> int:
        return int(self.starts[-1])

    def record(self, s: int) -> dict:
        return self._shards[s]

    def records(self) -> list[dict]:
        """Every entry (a version-4 index: each block checked; O(shards), for verify and tools)."""
        return list(self._shards)

    def start(self, s: int) -> int:
        return int(self.starts[s])

    def shard_of(self, i: int) -> int:
        """The shard holding global row ``i`` (binary search over cumulative row counts)."""
        return int(np.searchsorted(self.starts, i, side="right")) - 1

    def shards_of(self, rows) -> np.ndarray:
        """The shard holding each global row of ``rows`` (int64 array, rows in [0, total_rows))."""
        return np.searchsorted(self.starts, np.asarray(rows, np.int64), side="right") - 1

    def all_starts(self) -> np.ndarray:
        return self.starts


class ShardIndex(ShardTable):
    """The shard table of a version-4 store: ``index.arrow`` memory-mapped, blocks checked on first use."""

    def __init__(self, root: Path, ref: dict, where: str):
        self.path = Path(root) / INDEX
        self.ref = ref
        self.where = where
        try:
            st = check_regular(self.path, "shard index")  # a regular file (never a link): one lstat
        except StoreFormatError as exc:
            raise StoreCorruptError(f"{exc}; the store is incomplete: re-copy it") from None
        if st.st_size != ref["bytes"]:
            raise StoreCorruptError(f"{self.path}: the shard index is {st.st_size} bytes but the manifest says "
                                    f"{ref['bytes']}; it was truncated or replaced: re-copy the store")
        fd = open_regular(self.path, "shard index")
        try:
            nb = check_ipc_file(fd, ref["bytes"], str(self.path))  # reads the footer: blocks inside, uncompressed
        finally:
            os.close(fd)
        self.block_rows = ref["block_rows"]
        self.n = ref["shards"]
        if nb != len(ref["blocks"]):
            raise StoreCorruptError(f"{self.path}: {nb} record batches, the manifest records {len(ref['blocks'])}")
        try:
            self._mmap = pa.memory_map(str(self.path))
            self._reader = pa.ipc.open_file(self._mmap)
        except (pa.ArrowException, OSError) as exc:
            raise StoreCorruptError(f"{self.path} cannot be read as an Arrow IPC file ({exc}); it is damaged") from None
        if not self._reader.schema.equals(INDEX_SCHEMA, check_metadata=False):
            raise StoreCorruptError(f"{self.path}: its schema is not the shard index's ({self._reader.schema})")
        #: global row of each block's first shard, and the total row count last
        self.block_starts = np.concatenate([[0], np.cumsum([b["rows"] for b in ref["blocks"]])]).astype(np.int64)
        self._blocks: dict[int, dict] = {}

    def __getstate__(self):  # DataLoader workers map the file afresh (and check again what they read)
        state = self.__dict__.copy()
        for key in ("_mmap", "_reader"):
            state.pop(key)
        state["_blocks"] = {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._mmap = pa.memory_map(str(self.path))
        self._reader = pa.ipc.open_file(self._mmap)

    def __len__(self) -> int:
        return self.n

    @property
    def total_rows(self) -> int:
        return int(self.block_starts[-1])

    def block(self, b: int) -> dict:
        """Block ``b``'s columns as numpy views over the mapped file, checked the first time: its digest, row count,
        every entry's bounds and its cumulative row starts."""
        got = self._blocks.get(b)
        if got is not None:
            return got
        where = f"{self.path} block {b}"
        expect = min(self.block_rows, self.n - b * self.block_rows)
        try:
            batch = self._reader.get_batch(b)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise StoreCorruptError(f"{where} cannot be read ({exc}); the shard index is damaged") from None
        if batch.num_rows != expect:
            raise StoreCorruptError(f"{where} holds {batch.num_rows} shards, expected {expect}; re-copy the store")
        if any(c.null_count for c in batch.columns) or block_digest(batch) != self.ref["blocks"][b]["sha256"]:
            raise StoreCorruptError(f"{where} does not match the digest the manifest records: the shard index was "
                                    "edited or damaged after it was written; re-copy the store")
        cols = {}
        for j, f in enumerate(INDEX_FIELDS):  # views over the mapped file (to_numpy would import pandas)
            col, w = batch.column(j), _WIDTH[f.name]
            buf = col.buffers()[1]
            raw = (np.frombuffer(buf, np.uint8)[col.offset * w: (col.offset + expect) * w] if expect
                   else np.zeros(0, np.uint8))
            cols[f.name] = raw if f.name == "sha256" else raw.view("<i4" if w == 4 else "<i8")
        r, nbytes = cols["rows"], cols["bytes"]
        bad = ((cols["rank"] < 0) | (cols["rank"] > 99999) | (cols["seq"] < 0) | (cols["seq"] > 999999)
               | (r < 0) | (r > MAX_ROWS_PER_SHARD) | (nbytes < 0) | (nbytes > 1 << 50) | (cols["tokens"] < 0)
               | (cols["tokens"] > 1 << 50) | (cols["entries"] < 0) | (cols["entries"] > 1 << 56)
               | (r * MIN_ROW_BYTES > nbytes) | ((r > 0) & (cols["last_sample_id"] < cols["first_sample_id"]))
               # a shard of 0 rows holds nothing (FORMAT.md 11): no tokens, entries or sample ids. A real shard's
               # rows forged to 0 would otherwise be skipped unread, its rows silently missing
               | ((r == 0) & ((cols["tokens"] != 0) | (cols["entries"] != 0) | (cols["first_sample_id"] != 0)
                              | (cols["last_sample_id"] != 0))))
        start = int(self.block_starts[b])
        exp_starts = start + np.concatenate([[0], np.cumsum(r)[:-1]]) if expect else r
        if bad.any() or not np.array_equal(cols["row_start"], exp_starts) or start + int(r.sum()) != int(
                self.block_starts[b + 1]):
            i = int(np.argmax(bad)) if bad.any() else 0
            raise StoreCorruptError(f"{where}: entry {b * self.block_rows + i} is out of bounds, or the row starts "
                                    "disagree with the row counts; the shard index is damaged")
        ids = np.sort(cols["rank"].astype(np.int64) * 1_000_000 + cols["seq"])  # (np.unique imports numpy.ma)
        if np.any(ids[1:] == ids[:-1]):
            raise StoreCorruptError(f"{where}: a shard is listed twice; the shard index is damaged")
        firsts = cols["first_sample_id"][r > 0]
        if np.any(np.diff(firsts) < 0):
            raise StoreCorruptError(f"{where}: shards are not listed in sample-id order; the index was edited")
        self._blocks[b] = cols
        return cols

    def record(self, s: int) -> dict:
        if not 0 <= s < self.n:
            raise IndexError(f"shard {s} out of range for a store of {self.n} shards")
        b, i = divmod(int(s), self.block_rows)
        c = self.block(b)
        rows = int(c["rows"][i])
        rec = {"path": shard_path(int(c["rank"][i]), int(c["seq"][i])), "rank": int(c["rank"][i]),
               "seq": int(c["seq"][i]), "rows": rows, "tokens": int(c["tokens"][i]),
               "entries": int(c["entries"][i]), "bytes": int(c["bytes"][i]),
               "sha256": c["sha256"][32 * i: 32 * i + 32].tobytes().hex(),
               "first_sample_id": int(c["first_sample_id"][i]) if rows else None,
               "last_sample_id": int(c["last_sample_id"][i]) if rows else None}
        return rec

    def records(self) -> list[dict]:
        return [self.record(s) for s in range(self.n)]

    def start(self, s: int) -> int:
        if s == self.n:
            return self.total_rows
        b, i = divmod(int(s), self.block_rows)
        return int(self.block(b)["row_start"][i])

    def shard_of(self, i: int) -> int:
        b = int(np.searchsorted(self.block_starts, i, side="right")) - 1
        return b * self.block_rows + int(np.searchsorted(self.block(b)["row_start"], i, side="right")) - 1

    def shards_of(self, rows) -> np.ndarray:
        rows = np.asarray(rows, np.int64).reshape(-1)
        blocks = np.searchsorted(self.block_starts, rows, side="right") - 1
        out = np.empty(rows.size, np.int64)
        for b in np.unique(blocks):
            sel = blocks == b
            starts = self.block(int(b))["row_start"]
            out[sel] = int(b) * self.block_rows + np.searchsorted(starts, rows[sel], side="right") - 1
        return out

    def all_starts(self) -> np.ndarray:
        """Every shard's first row and the total last: O(shards), every block checked (verify, tools)."""
        parts = [self.block(b)["row_start"] for b in range(len(self.ref["blocks"]))]
        return np.concatenate(parts + [[self.total_rows]]).astype(np.int64)


def shard_table(root: Path, man: dict) -> ShardTable:
    """The shard table of a loaded manifest: its JSON list (versions 1-3), or its index opened lazily (4)."""
    if "index" in man:
        return ShardIndex(root, man["index"], str(Path(root) / "manifest.json"))
    return ShardTable(man["shards"])
