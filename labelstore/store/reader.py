"""LabelStore: random access to a label store's sequences, decoded to torch tensors.

Shards are memory-mapped Arrow IPC files; a row's byte columns are read in place (no copy) and decoded
with numpy. Every error is a :class:`~labelstore.errors.LabelStoreError` naming the file and what to do.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from labelstore.codecs import ZERO_CODE, get_codec
from labelstore.constants import count_dtype
from labelstore.errors import StoreCorruptError, StoreFormatError
from labelstore.reconstruction import int_position_sums, mixed_prior, pad_row, sampled_probs
from labelstore.selection import is_sampled
from labelstore.store import bitpack
from labelstore.store.arrow_file import check_ipc_file
from labelstore.store.format import (
    DEFAULT_ROW_BUDGET,
    MAX_SEQ_LEN,
    PAYLOAD_COLUMNS,
    ZSTD_FAMILY,
    check_row_crc,
    has_tail_column,
    meta_from_schema,
    row_bytes,
    row_coder,
    row_header,
    shard_identity,
)
from labelstore.store.index import ShardTable, shard_table
from labelstore.store.manifest import load_manifest, safe_shard_path
from labelstore.store.objectstore import is_url, local_path
from labelstore.store.safefs import check_regular, open_regular
from labelstore.store.shard_cache import DEFAULT_PREFETCH, RemoteShards, first_access_order


@dataclass
class RawRow:
    """One sequence decoded to flat numpy arrays (no padding to K)."""

    sample_id: int
    input_ids: np.ndarray  # int64 [T]
    counts: np.ndarray  # int64 [T]
    ids: np.ndarray  # int64 [sum(counts)]
    weights: np.ndarray | None  # float32 [sum(counts)] decoded codec weights (None for hard labels)
    tail: np.ndarray  # float32 [T] (zeros for hard labels)
    doc_starts: np.ndarray  # int64 [D]
    absolute: bool = False  # weights already hold absolute probabilities (the sampled modes): never renormalised
    sums: np.ndarray | None = None  # float64 [T]: each position's weights summed exactly (None: computed when needed)

    def padded(self, k: int, normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """``(ids [T, K] int64, probs [T, K] float32)`` by the reconstruction rule (:func:`pad_row`);
        ``normalize`` False keeps the decoded weights as they are."""
        return pad_row(self.input_ids, self.counts, self.ids, self.weights, self.tail, k,
                       normalize and not self.absolute, self.sums)


@dataclass
class Sample:
    """One sequence with its teacher targets, padded to the store's K."""

    sample_id: int
    input_ids: torch.Tensor  # int64 [T]
    ids: torch.Tensor  # int64 [T, K], 0 past counts
    probs: torch.Tensor  # float32 [T, K], absolute probabilities, 0 past counts
    tail: torch.Tensor  # float32 [T], exact teacher mass outside the kept ids
    counts: torch.Tensor  # int64 [T]
    doc_starts: torch.Tensor  # int64 [D]

    @property
    def mask(self) -> torch.Tensor:
        """bool [T, K]: True for real kept entries."""
        return torch.arange(self.ids.shape[1]) < self.counts[:, None]


class _Shard:
    """A memory-mapped shard and the numpy views of its record batches."""

    def __init__(self, root: Path, rec: dict, meta: dict, name: str | None = None):
        self.path = safe_shard_path(root, rec["path"], str(root / "manifest.json"))
        self.rec = rec
        self.where = where = name or str(self.path)  # a remote store's shards are named by their object URL
        check_shard_file(self.path, rec)
        fd = open_regular(self.path, "shard")  # regular file, no link, never blocks
        try:
            check_ipc_file(fd, rec["bytes"], where)  # no body compression, blocks inside the file: before pyarrow
        finally:
            os.close(fd)
        try:
            self.mmap = pa.memory_map(str(self.path))
            self.reader = pa.ipc.open_file(self.mmap)
            file_meta = meta_from_schema(self.reader.schema, where)
            rows = [self.reader.get_batch(i).num_rows for i in range(self.reader.num_record_batches)]
        except StoreFormatError as exc:
            raise StoreCorruptError(str(exc)) from None
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise StoreCorruptError(
                f"shard {where} cannot be read as an Arrow IPC file ({exc}); it is damaged"
            ) from None
        if file_meta != meta:
            raise StoreCorruptError(f"shard {where} was written with different metadata than the manifest records "
                                    "(another store's shard, or an edited manifest); re-copy the store")
        ident = shard_identity(self.reader.schema, where)
        if meta["format_version"] >= 3 and ident != {"rank": rec["rank"], "seq": rec["seq"]}:
            raise StoreCorruptError(f"shard {where} says it is {ident}, not rank {rec['rank']} seq {rec['seq']}: "
                                    "it was renamed, duplicated or swapped; re-copy the store")
        if sum(rows) != rec["rows"]:
            raise StoreCorruptError(f"shard {where} holds {sum(rows)} rows but the manifest says {rec['rows']}")
        self.batch_starts = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        self._views: dict[int, dict] = {}
        if rec["rows"]:
            sids = np.concatenate([self.views(b)["sample_id"] for b in range(len(rows))])
            if sids.min() != rec["first_sample_id"] or sids.max() != rec["last_sample_id"]:
                raise StoreCorruptError(f"shard {where} holds sample ids {sids.min()}..{sids.max()}, the manifest says "
                                        f"{rec['first_sample_id']}..{rec['last_sample_id']}")

    def views(self, b: int) -> dict:
        v = self._views.get(b)
        if v is None:
            try:
                batch = self.reader.get_batch(b)
                v = {
                    "sample_id": batch.column(0).to_numpy(),
                    "num_tokens": batch.column(1).to_numpy(),
                    "crc32": batch.column(8).to_numpy(),
                }
                for j, name in enumerate(PAYLOAD_COLUMNS, start=2):
                    col = batch.column(j)
                    bufs = col.buffers()
                    offs = np.frombuffer(bufs[1], dtype=np.int32)[col.offset: col.offset + len(col) + 1]
                    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
                    if len(offs) != len(col) + 1 or np.any(np.diff(offs) < 0) or (len(offs) and offs[-1] > data.size):
                        raise StoreCorruptError(f"shard {self.where} batch {b}: column {name} has invalid offsets")
                    v[name] = (offs, data)
            except pa.ArrowException as exc:
                raise StoreCorruptError(f"shard {self.where} batch {b} cannot be read ({exc}); it is damaged") from None
            self._views[b] = v
        return v


def check_shard_file(path: Path, rec: dict) -> None:
    """A shard named in the manifest exists as a regular file of the recorded size (``lstat``: never opened)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise StoreCorruptError(
            f"shard {path} listed in the manifest is missing; the store is incomplete: re-copy it from its "
            "source, or rerun the compile to rebuild it"
        ) from None
    size = (st if stat.S_ISREG(st.st_mode) else check_regular(path, "shard")).st_size  # the latter names it
    if size != rec["bytes"]:
        raise StoreCorruptError(
            f"shard {path} is {size} bytes but the manifest says {rec['bytes']}: it was truncated or modified; "
            "re-copy it, or rerun `labelstore verify` for a full report"
        )


class LabelStore:
    """Read a finalized label store.

    Opening checks the manifest (its digest from format version 3 on). A version 1-3 manifest lists every shard:
    each entry's bounds are checked and every shard is ``lstat``ed (a regular file of the recorded size), so a
    store declaring more rows than its files can hold is refused before a loader allocates an index for them. A
    version-4 store opens in constant time: its shard table ``index.arrow`` is memory-mapped, a block of it is
    checked (digest, bounds) the first time a lookup needs it, and a shard's size the first time it is opened.

    A store at a URL (``s3://bucket/prefix``, any fsspec URL) is read through a local cache of whole shards
    (:mod:`labelstore.store.shard_cache`): opening fetches the manifest only, a shard is downloaded (and its sha256
    checked) the first time one of its rows is read, and up to ``prefetch`` shards are fetched ahead in the order
    :meth:`will_read` announced (else store order).

    Args:
        path: the store directory, or its URL.
        verify_rows: check each row's CRC32 as it is decoded (cheap; catches silent corruption).
        normalize: rescale decoded weights so kept + tail sum to 1 (the format's reconstruction rule).
        max_open_shards: memory maps kept open at once.
        row_budget: most bytes one decoded row may take (:func:`labelstore.store.format.row_bytes`: the padded
            ``[T, K]`` sample included), checked against the row's declared sizes before anything is allocated.
            The default (2 GiB) holds 128k positions at K = 1024; raise it for larger rows.
        storage_options: for a URL, the fsspec filesystem's options (credentials, endpoint...); merged over
            ``$LABELSTORE_STORAGE_OPTIONS`` (JSON). Never shown in a message or ``repr``.
        cache_dir, cache_bytes, prefetch: for a URL, the cache folder (default ``$LABELSTORE_CACHE_DIR`` or
            ``~/.cache/labelstore/remote``), its size limit per store (default ``$LABELSTORE_CACHE_BYTES`` or 64 GiB)
            and how many shards to download ahead (0: none).
    """

    def __init__(self, path, *, verify_rows: bool = True, normalize: bool = True, max_open_shards: int = 64,
                 row_budget: int = DEFAULT_ROW_BUDGET, storage_options: dict | None = None, cache_dir=None,
                 cache_bytes: int | None = None, prefetch: int = DEFAULT_PREFETCH):
        self._remote = None
        if is_url(path):
            self._remote = RemoteShards(path, storage_options=storage_options, cache_dir=cache_dir,
                                        cache_bytes=cache_bytes, prefetch=prefetch)
            self.path = self._remote.url  # a URL stays a string: what messages, repr and pickling show
            self.root = self._remote.root  # the local cache folder
        else:
            self.path = self.root = Path(local_path(path))
        self.verify_rows = verify_rows
        self.normalize = normalize
        self.max_open_shards = max_open_shards
        if not isinstance(row_budget, int) or row_budget < 1:
            raise ValueError(f"row_budget must be a positive number of bytes, got {row_budget!r}")
        self.row_budget = row_budget
        if self._remote is not None:  # shards are checked (size, sha256) as they are downloaded
            self.manifest = self._remote.manifest
            self.shards: ShardTable = self._remote.shards
        else:
            self.manifest = load_manifest(self.root)
            self.shards = shard_table(self.root, self.manifest)
            if "shards" in self.manifest:  # versions 1-3: every shard, now (version 4: each when first opened)
                for rec in self.manifest["shards"]:
                    check_shard_file(self.root / rec["path"], rec)
        self.meta: dict = self.manifest["meta"]
        self.vocab_size: int = self.meta["vocab_size"]
        self.k: int = self.meta["selection"]["k"]
        self.label_kind: str = self.meta["label_kind"]
        self.codec = get_codec(self.meta["value_codec"])
        self.id_bits: int = self.meta["id_bits"]
        self._count_dtype = count_dtype(self.meta["count_bytes"])
        self._open: OrderedDict[int, _Shard] = OrderedDict()
        self._lut = self.codec.decode_lut() if self.codec.bytes_per_value == 1 else None
        self._encoding = self.meta.get("encoding", {}).get("name", "packed")
        self._zstd = self._encoding in ZSTD_FAMILY  # columns of zstd frames (expgolomb, grouped: FORMAT.md 6c, 6d)
        self._mode = self.meta["selection"]["mode"]
        self._sampled_mode = is_sampled(self._mode)
        self._has_tail = has_tail_column(self.meta)
        self._v3 = self.meta["format_version"] >= 3
        self._dec = None
        self._eg = None  # encodings "expgolomb" and "grouped": their ids/values decoder (made with _dec)
        self.count_invalid_codes = False  # verify: count value codes no writer produces (they decode to +0)
        self.invalid_codes = 0
        # exact integer weights of the codes, for the per-position sums of the reconstruction rule (FORMAT.md 5)
        self._ilut = None if self._sampled_mode or self.label_kind != "soft" else self.codec.int_lut(self.k)
        self._f64_exact = self._ilut is not None and float(self._ilut[0].max()) * self.k < 2.0**53
        self._row_iluts: dict = {}  # coarse log8 steps: integer tables by a row's largest code (_row_int_sums)

    # ------------------------------------------------------------------------------ container protocol
    def __len__(self) -> int:
        return self.shards.total_rows

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def shard_record(self, s: int) -> dict:
        """Shard ``s``'s entry: path, rank, seq, rows, tokens, entries, bytes, sha256, first/last sample id."""
        return self.shards.record(s)

    @property
    def shard_starts(self) -> np.ndarray:
        """Global index of each shard's first row (and the total row count last). O(shards) for a version-4
        store (every block of its index is read): prefer :meth:`shard_start` and :meth:`shard_of`."""
        return self.shards.all_starts()

    def shard_start(self, s: int) -> int:
        return self.shards.start(s)

    def shard_of(self, i: int) -> int:
        return self.shards.shard_of(i)

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["totals"]["tokens"])

    def __getitem__(self, i: int) -> Sample:
        return self.get(i)

    def __iter__(self):
        for i in range(len(self)):
            yield self.get(i)

    def __getstate__(self):  # picklable for DataLoader workers: each reopens its own memory maps
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        state["_dec"] = None  # the zstd decompressor does not pickle; each process makes its own
        state["_eg"] = None
        return state

    def open_options(self) -> dict:
        """The keyword arguments that reopen this store as it was opened (a URL's storage options included)."""
        opts = {"verify_rows": self.verify_rows, "normalize": self.normalize, "max_open_shards": self.max_open_shards,
                "row_budget": self.row_budget}
        r = self._remote
        if r is not None:
            opts.update(storage_options=r.storage_options, cache_dir=str(r.url_dir.parent),
                        cache_bytes=r.cache_bytes, prefetch=r.prefetch_depth)
        return opts

    def will_read(self, indices) -> None:
        """Announce the sample indices about to be read, in order (e.g. a sampler's epoch for this rank): a remote
        store downloads shards ahead in the order these reads first need them. A no-op for a local store."""
        if self._remote is not None:
            self._remote.plan_shards(first_access_order(self.shards, indices))

    @property
    def shard_plan(self):
        """A remote store's announced shard order (:meth:`will_read`), None if none (or a local store)."""
        return None if self._remote is None else self._remote._plan

    @shard_plan.setter
    def shard_plan(self, order) -> None:
        if self._remote is not None:
            self._remote.plan_shards(order)

    def shard_file(self, s: int) -> Path:
        """The local file of shard ``s`` (a remote store's is downloaded into the cache first)."""
        rec = self.shards.record(s)
        if self._remote is not None:
            self._remote.fetch(s)
        p = safe_shard_path(self.root, rec["path"], str(self.root / "manifest.json"))
        check_shard_file(p, rec)  # a version-4 store's shards are first looked at here (or when opened)
        return p

    def __repr__(self) -> str:
        return f"LabelStore({str(self.path)!r}, samples={len(self)}, tokens={self.num_tokens}, k={self.k})"

    # ------------------------------------------------------------------------------ access
    def _shard(self, s: int) -> _Shard:
        sh = self._open.get(s)
        if sh is None:
            sh = self._open_shard(s)
            self._open[s] = sh
            while len(self._open) > self.max_open_shards:
                self._open.popitem(last=False)
            if self._remote is not None:
                self._remote.pinned = set(self._open)
        else:
            self._open.move_to_end(s)
        return sh

    def _open_shard(self, s: int) -> _Shard:
        rec = self.shards.record(s)
        if self._remote is None:
            return _Shard(self.root, rec, self.meta)
        for attempt in range(3):  # another process sharing the cache may evict it between fetch and open
            p = self._remote.fetch(s)
            try:
                return _Shard(self.root, rec, self.meta, name=self._remote.obj_url(rec["path"]))
            except StoreCorruptError:
                if p.exists() or attempt == 2:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def locate(self, i: int) -> tuple[int, int, int]:
        """(shard, batch, row) of global index ``i`` (binary search over cumulative counts)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample index {i} out of range for a store of {n} samples")
        i = int(i) % n if n else i
        s = self.shards.shard_of(i)
        sh = self._shard(s)
        local = i - self.shards.start(s)
        b = int(np.searchsorted(sh.batch_starts, local, side="right")) - 1
        return s, b, local - int(sh.batch_starts[b])

    def get_raw(self, i: int) -> RawRow:
        s, b, r = self.locate(i)
        sh = self._shard(s)
        v = sh.views(b)
        where = f"shard {sh.path} row {int(sh.batch_starts[b]) + r}"
        parts = {}
        for name in PAYLOAD_COLUMNS:
            offs, data = v[name]
            parts[name] = data[offs[r]: offs[r + 1]]
        return self.decode_row(int(v["sample_id"][r]), int(v["num_tokens"][r]), parts, int(v["crc32"][r]), where)

    def decode_row(self, sample_id: int, T: int, parts: dict, crc32: int, where: str = "row") -> RawRow:
        """Check (if ``verify_rows``) and decode one row given as its stored columns, wherever they were read
        from (a memory-mapped shard, a ``datasets`` table): ``parts`` maps the six payload column names to bytes."""
        if self.verify_rows:
            check_row_crc(parts, crc32, where, row_header(sample_id, T) if self._v3 else b"")
        return self.decode_parts(sample_id, T, parts, where)

    def _check_budget(self, T: int, n: int, where: str) -> None:
        need = row_bytes(T, n, self.k)
        if need > self.row_budget:
            raise StoreFormatError(
                f"{where}: the row declares {T} positions and {n} kept entries, {need:,} bytes decoded (padded to "
                f"K={self.k}), over this reader's row budget of {self.row_budget:,}. A damaged or hostile store; if "
                "the row is genuine, open the store with LabelStore(..., row_budget=N) for a larger N"
            )

    def decode_parts(self, sample_id: int, T: int, parts: dict, where: str = "row") -> RawRow:
        """Decode one row from its six payload byte columns (``parts``: name -> bytes-like), unchecked."""
        parts = {k: (v if isinstance(v, np.ndarray) else np.frombuffer(v, dtype=np.uint8)) for k, v in parts.items()}
        bits = self.id_bits
        if not 0 <= T <= MAX_SEQ_LEN:
            raise StoreCorruptError(f"{where}: num_tokens {T} is out of range")
        self._check_budget(T, 0, where)
        if self._zstd:
            return self._decode_zstd(sample_id, T, parts, where)
        cb = self.meta["count_bytes"]
        if parts["input_ids"].size != bitpack.packed_nbytes(T, bits) or parts["counts"].size != T * cb:
            raise StoreCorruptError(f"{where}: input_ids or counts size disagrees with num_tokens={T}")
        input_ids = bitpack.unpack(parts["input_ids"], bits, T)
        counts = np.frombuffer(parts["counts"], dtype=self._count_dtype).astype(np.int64)
        n = int(counts.sum())
        if T and counts.max() > self.k:
            raise StoreCorruptError(f"{where}: a position keeps {counts.max()} entries, more than k={self.k}")
        self._check_budget(T, n, where)
        if parts["ids"].size != bitpack.packed_nbytes(n, bits):
            raise StoreCorruptError(f"{where}: ids column holds {parts['ids'].size} bytes, expected "
                                    f"{bitpack.packed_nbytes(n, bits)} for {n} entries")
        ids = bitpack.unpack(parts["ids"], bits, n)
        if (n and ids.max() >= self.vocab_size) or (T and input_ids.max() >= self.vocab_size):
            raise StoreCorruptError(f"{where}: a token id is >= vocab_size {self.vocab_size}")
        bpv = self.codec.bytes_per_value
        weights, sums, tail = None, None, np.zeros(T, dtype=np.float32)
        if self.label_kind == "soft":
            if parts["values"].size != n * bpv:
                raise StoreCorruptError(f"{where}: values size disagrees with counts")
            weights = self._weights(parts["values"], counts)
            sums = self._sums(parts["values"], weights, counts)
        if self._has_tail:
            if parts["tail"].size != 4 * T:
                raise StoreCorruptError(f"{where}: tail size disagrees with num_tokens={T}")
            tail = np.frombuffer(parts["tail"], dtype="<f4")
        doc_starts = self._doc_starts(parts, where)
        return self._sampled(RawRow(sample_id, input_ids, counts, ids, weights, tail, doc_starts, sums=sums))

    def _decode_zstd(self, sample_id: int, T: int, parts: dict, where: str) -> RawRow:
        if self._dec is None:
            from labelstore.store.entropy import RowDecompressor

            self._dec = RowDecompressor()
            self._eg = row_coder(self.meta) if self._encoding != "zstd" else None
        d, bits, cb = self._dec, self.id_bits, self.meta["count_bytes"]
        counts = np.frombuffer(d.frame(parts["counts"], T * cb, where, "counts"), dtype=self._count_dtype)
        counts = counts.astype(np.int64)
        n = int(counts.sum())
        if T and counts.max() > self.k:
            raise StoreCorruptError(f"{where}: a position keeps {counts.max()} entries, more than k={self.k}")
        self._check_budget(T, n, where)
        input_ids = d.ids(parts["input_ids"], bits, T, where, "input_ids")
        bpv = self.codec.bytes_per_value
        codes = None
        if self._encoding == "grouped":  # the values say where the tie groups are (FORMAT.md 6d): decode them first
            if self.label_kind == "soft":
                codes = self._eg.values(parts["values"], bpv, counts, n, where)
            ids = self._eg.ids(parts["ids"], bits, counts, input_ids, n, where, codes, bpv)
        elif self._eg is not None:
            ids = self._eg.ids(parts["ids"], bits, counts, input_ids, n, where)
        else:
            ids = d.ids(parts["ids"], bits, n, where, "ids")
        if (n and ids.max() >= self.vocab_size) or (T and input_ids.max() >= self.vocab_size):
            raise StoreCorruptError(f"{where}: a token id is >= vocab_size {self.vocab_size}")
        weights, sums, tail = None, None, np.zeros(T, dtype=np.float32)
        if self.label_kind == "soft":
            if codes is None:
                codes = (self._eg or d).values(parts["values"], bpv, counts, n, where)
            weights = self._weights(codes, counts)
            sums = self._sums(codes, weights, counts)
        if self._has_tail:
            tail = d.tail(parts["tail"], T, where)
        doc_starts = self._doc_starts(parts, where)
        return self._sampled(RawRow(sample_id, input_ids, counts, ids, weights, tail, doc_starts, sums=sums))

    def _doc_starts(self, parts: dict, where: str) -> np.ndarray:
        """doc_starts (never compressed), after checking that the columns this store has no use for are empty."""
        if (self.label_kind == "hard" and parts["values"].size) or (not self._has_tail and parts["tail"].size):
            raise StoreCorruptError(f"{where}: a values or tail column that this store does not have holds bytes")
        if parts["doc_starts"].size % 4:
            raise StoreCorruptError(f"{where}: doc_starts is not a whole number of int32")
        return np.frombuffer(parts["doc_starts"], dtype="<i4").astype(np.int64)

    def _sums(self, codes: np.ndarray, weights: np.ndarray, counts: np.ndarray) -> np.ndarray | None:
        """Each position's weights summed exactly, rounded once to float64, from the codec's integer table (or, for
        full rows whose sums stay below 2^53 units of the table, a float64 sum: exact in any order, and cheaper)."""
        if self._ilut is None:
            return self._row_int_sums(codes, weights, counts)
        table, q = self._ilut
        T = counts.size
        if self._f64_exact and T and weights.size == T * self.k:
            return weights.reshape(T, self.k).sum(axis=1, dtype=np.float64)
        return int_position_sums(table[codes.view("<u2") if self.codec.name == "fp16" else codes], counts, q)

    def _row_int_sums(self, codes: np.ndarray, weights: np.ndarray, counts: np.ndarray) -> np.ndarray | None:
        """:meth:`_sums` for a log8 store whose whole integer table would overflow (a step above ~1/12): a table
        for the codes up to the row's largest non-zero code (cached per largest code) sums it exactly with
        integers; None (the reader then sums with ``position_sums``) where even that table cannot."""
        if self.codec.name != "log8" or self._sampled_mode or self.label_kind != "soft" or codes.size == 0:
            return None
        nz = codes[codes != ZERO_CODE]
        mc = int(nz.max()) if nz.size else 0
        cache = self._row_iluts
        if mc not in cache:
            cache[mc] = self.codec.int_lut(self.k, max_code=mc)
        if cache[mc] is None:
            return None
        table, q = cache[mc]
        return int_position_sums(table[codes], counts, q)

    def _weights(self, codes: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Codec weights of a row's value bytes; in topk+sample the sampled entries' bytes are counts (count8)."""
        if self.count_invalid_codes:  # labelstore verify: codes no writer produces (decoded to +0 below)
            exact = codes
            if self._mode == "topk+sample":
                slot = np.arange(codes.size) - np.repeat(np.cumsum(counts) - counts, counts)
                exact = codes[slot < self.meta["selection"]["k_exact"]]
            self.invalid_codes += self.codec.invalid_codes(exact)
        if self._mode == "topk+sample":
            slot = np.arange(codes.size) - np.repeat(np.cumsum(counts) - counts, counts)
            return np.where(slot < self.meta["selection"]["k_exact"], self._lut[codes], codes.astype(np.float32))
        return self._lut[codes] if self._lut is not None else self.codec.decode_numpy(codes)

    def _sampled(self, raw: RawRow) -> RawRow:
        """Sampled modes: counts become absolute probabilities (:func:`labelstore.reconstruction.sampled_probs`)."""
        if not self._sampled_mode or raw.weights is None:
            return raw
        p, tail = sampled_probs(self._mode, self.meta["selection"].get("k_exact", 0), raw.counts, raw.weights,
                                raw.tail)
        return RawRow(raw.sample_id, raw.input_ids, raw.counts, raw.ids, p, tail, raw.doc_starts, absolute=True)

    def get(self, i: int) -> Sample:
        raw = self.get_raw(i)
        ids, probs = raw.padded(self.k, self.normalize)
        return Sample(
            sample_id=raw.sample_id,
            input_ids=torch.from_numpy(raw.input_ids),
            ids=torch.from_numpy(ids),
            probs=torch.from_numpy(np.ascontiguousarray(probs)),
            tail=torch.from_numpy(np.array(raw.tail, dtype=np.float32)),
            counts=torch.from_numpy(raw.counts),
            doc_starts=torch.from_numpy(raw.doc_starts),
        )

    def tail_prior(self) -> np.ndarray | None:
        """The teacher's mean next-token distribution (float32 [V]) if the store has one (FORMAT.md 5c), mixed
        with the uniform distribution by the manifest's ``mix``: the shape in which a position's tail is spread."""
        tp = self.manifest.get("tail_prior")
        if tp is None:
            return None
        if getattr(self, "_prior", None) is None:
            local = self.root / tp["path"]
            p = local if self._remote is None else self._remote.obj_url(tp["path"])  # what messages name
            if local.is_symlink() or not local.is_file():
                raise StoreCorruptError(f"{p}: the tail prior named in the manifest is missing; re-copy the store")
            blob = local.read_bytes()
            if len(blob) != 4 * self.vocab_size or hashlib.sha256(blob).hexdigest() != tp["sha256"]:
                if self._remote is not None:
                    local.unlink()  # a damaged download is never kept: the next open fetches it again
                raise StoreCorruptError(f"{p}: the tail prior is damaged (size or sha256 mismatch); re-copy the store")
            prior = np.frombuffer(blob, dtype="<f4").astype(np.float64)
            if not np.all(np.isfinite(prior)) or prior.min() < 0:
                raise StoreCorruptError(f"{p}: the tail prior holds negative or non-finite values")
            self._prior = mixed_prior(prior, float(tp["mix"]))
        return self._prior

    def sample_ids(self) -> np.ndarray:
        """Sample id of every row, in store order."""
        out = []
        for s in range(self.num_shards):
            sh = self._shard(s)
            for b in range(len(sh.batch_starts) - 1):
                out.append(np.asarray(sh.views(b)["sample_id"], dtype=np.int64))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def open_store(path, **kwargs) -> LabelStore:
    return LabelStore(path, **kwargs)
