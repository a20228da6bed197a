"""The on-disk format (version 4; 5 for encoding "expgolomb"; 6 for encoding "grouped" or selection mode "adaptive";
versions 1 to 3 still read): the Arrow schema, the metadata, the per-row encoding and the checksums (row CRC,
manifest and config digests).

Which version a store has follows from its metadata alone (docs/FORMAT.md 8): encoding "grouped" (6d) or selection
mode "adaptive" (5b) make it 6; otherwise encoding "expgolomb" (6c) makes it 5; otherwise it is 4 (or 3 when asked
for). A store never carries a newer version than its content needs, so older readers keep reading every store
they can, and a reader refuses a store whose version and content disagree (a version-6 encoding in a version-5
store, and so on).

This module is the executable half of docs/FORMAT.md; the two must agree. Writer, reader and
`verify` all encode and decode rows through the functions here.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import uuid
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from labelstore.codecs import CODEC_NAMES, get_codec
from labelstore.constants import count_bytes, count_dtype
from labelstore.errors import StoreCorruptError, StoreFormatError
from labelstore.selection import MODES, check_selection, has_tail
from labelstore.store import bitpack

FORMAT_NAME = "labelstore"
FORMAT_VERSION = 4  # what writers write: version 3's rows and checksums, the shard table in index.arrow (FORMAT.md 8)
SUPPORTED_VERSIONS = (1, 2, 3, 4, 5, 6)  # 1: packed; 2: zstd; 3: either, version-3 checksums; 4: index;
# 5: expgolomb; 6: grouped, or selection mode "adaptive"
WRITABLE_VERSIONS = (3, 4)  # a writer may be asked for version 3 (a JSON shard list, for older readers)
EXPGOLOMB_VERSION = 5  # version 4 plus encoding "expgolomb" (FORMAT.md 6c); written only by stores of that encoding
GROUPED_VERSION = 6  # version 5 plus encoding "grouped" (FORMAT.md 6d) and selection mode "adaptive" (FORMAT.md 5b)
V6_ENCODINGS = ("grouped",)
V6_MODES = ("adaptive",)  # selection modes that make a store version 6 (the mode itself: labelstore.selection)
ENCODINGS = ("packed", "zstd", "expgolomb", "grouped")
ZSTD_FAMILY = ("zstd", "expgolomb", "grouped")  # encodings whose columns are zstd frames and carry a "level"
DEFAULT_ENCODING = "packed"
META_KEY = b"labelstore"
SHARD_KEY = b"labelstore_shard"  # version 3: the shard's own {"rank", "seq"} in its schema metadata
DEFAULT_PRIOR_MIX = 0.9  # measured: docs/FORMAT.md section 5c

# Sanity limits: anything beyond these in a manifest or a schema is refused before any allocation.
MAX_VOCAB = 1 << 26
MAX_K = 4096
MAX_SEQ_LEN = 1 << 24
MAX_SHARDS = 1 << 24  # version 4 (index.arrow): 16.7 million shards
MAX_JSON_SHARDS = 1 << 20  # versions 1-3: the shard list inside manifest.json
MAX_ROWS_PER_SHARD = 1 << 31
# Every Arrow row costs at least this many bytes of its shard file (sample_id 8 + num_tokens 4 + crc32 4 + six
# int32 offsets 24): a manifest declaring more rows than its shards' bytes can hold is refused before any
# per-row allocation (a loader's index, a sampler's permutation).
MIN_ROW_BYTES = 40
DEFAULT_ROW_BUDGET = 2 << 30  # bytes one decoded row may take (LabelStore(row_budget=...)); see row_bytes()

SCHEMA_FIELDS = [
    pa.field("sample_id", pa.int64(), nullable=False),
    pa.field("num_tokens", pa.int32(), nullable=False),
    pa.field("input_ids", pa.binary(), nullable=False),  # bit-packed, id_bits each, num_tokens values
    pa.field("counts", pa.binary(), nullable=False),  # per position kept count, count_bytes each (LE)
    pa.field("ids", pa.binary(), nullable=False),  # bit-packed kept ids, sum(counts) values
    pa.field("values", pa.binary(), nullable=False),  # codec bytes, sum(counts) * bytes_per_value
    pa.field("tail", pa.binary(), nullable=False),  # float32 LE per position (empty for hard labels)
    pa.field("doc_starts", pa.binary(), nullable=False),  # int32 LE document start offsets (may be empty)
    pa.field("crc32", pa.uint32(), nullable=False),  # zlib.crc32: (v3) sample_id, num_tokens, then the payload
]
PAYLOAD_COLUMNS = ("input_ids", "counts", "ids", "values", "tail", "doc_starts")
REQUIRED_META = ("vocab_size", "label_kind", "selection", "value_codec", "temperature", "teacher", "tokenizer")


def build_schema(meta: dict, rank: int | None = None, seq: int | None = None) -> pa.Schema:
    """The Arrow schema of a shard: the store metadata, and (version 3) the shard's own rank and sequence number,
    so a shard renamed, duplicated or swapped in from elsewhere is recognised by what it says it is."""
    md = {META_KEY: json.dumps(meta, sort_keys=True).encode()}
    if rank is not None:
        md[SHARD_KEY] = json.dumps({"rank": int(rank), "seq": int(seq)}, sort_keys=True).encode()
    return pa.schema(SCHEMA_FIELDS, metadata=md)


def shard_identity(schema: pa.Schema, where: str) -> dict | None:
    """``{"rank", "seq"}`` recorded in a version-3 shard's schema (None if absent: older versions)."""
    raw = (schema.metadata or {}).get(SHARD_KEY)
    if raw is None:
        return None
    try:
        ident = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise StoreFormatError(f"{where}: the shard identity in its schema is not valid JSON") from None
    if not isinstance(ident, dict) or set(ident) != {"rank", "seq"}:
        raise StoreFormatError(f"{where}: the shard identity in its schema is malformed ({ident!r})")
    return ident


def json_digest(obj: dict) -> str:
    """sha256 (hex) of ``obj`` without its ``digest`` key, serialized canonically: ``json.dumps(sort_keys=True,
    separators=(",", ":"))`` (ASCII escapes), UTF-8. The digest that manifest.json and config.json carry."""
    body = {k: v for k, v in obj.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def with_digest(obj: dict) -> dict:
    return dict(obj, digest=json_digest(obj))


def check_digest(obj: dict, version, where: str) -> dict:
    """Verify (version >= 3: require) ``obj["digest"]`` and return ``obj`` without it."""
    if not isinstance(obj, dict):
        raise StoreFormatError(f"{where}: not a JSON object")
    d = obj.get("digest")
    if d is None and isinstance(version, int) and version < 3:
        return obj
    if d != json_digest(obj):
        raise StoreCorruptError(
            f"{where}: its content does not match its digest: the file was edited or damaged after it was written "
            "(an edited shard list, total, metadata or tail-prior mix). Re-copy it, or rerun the compile (same "
            "command) to rewrite it"
        )
    return {k: v for k, v in obj.items() if k != "digest"}


def row_bytes(T: int, n: int, k: int) -> int:
    """Bytes a decoded row takes in memory, the padded [T, K] sample included: int64 input ids and counts, float32
    tail (20 B per position), int64 id and float32 weight per kept entry (12 B), int64 id and float32 probability
    per padded slot (12 B x K per position). What :class:`LabelStore`'s ``row_budget`` bounds."""
    return 20 * T + 12 * n + 12 * k * T


def normalize_meta(meta: dict) -> dict:
    """Validate user-supplied store metadata and add the derived fields (format version, id bits...)."""
    if not isinstance(meta, dict):
        raise StoreFormatError(f"store metadata must be a dict, got {type(meta).__name__}")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise StoreFormatError(f"store metadata lacks {', '.join(missing)}")
    out = json.loads(json.dumps(meta))  # deep copy, and proves it is JSON
    out["format"] = FORMAT_NAME
    enc = out.get("encoding") or {"name": DEFAULT_ENCODING}
    if isinstance(enc, str):
        enc = {"name": enc}
    if isinstance(enc, dict) and enc.get("name") in ZSTD_FAMILY:
        enc = {"name": enc["name"], "level": int(enc.get("level", 3))}
    out["encoding"] = enc
    asked = meta.get("format_version")
    needed = required_version(out)
    if needed is not None:
        if asked not in (None, needed):
            raise StoreFormatError(f"{content_name(out)} is format version {needed}; version {asked!r} cannot hold "
                                   "it (use encoding 'zstd' or 'packed' for older readers)")
        out["format_version"] = needed
    else:
        out["format_version"] = asked if asked in WRITABLE_VERSIONS else FORMAT_VERSION
    out.setdefault("store_id", uuid.uuid4().hex)  # a writer resuming a store adopts the store's own id
    out.setdefault("tail_prior_mix", DEFAULT_PRIOR_MIX)
    v = out["vocab_size"]
    out["id_bits"] = bitpack.bits_for(v) if isinstance(v, int) and v > 0 else None
    sel = out.get("selection") or {}
    k = sel.get("k")
    out["count_bytes"] = count_bytes(k) if isinstance(k, int) else 2
    out.setdefault("compile_config", {})
    out.setdefault("runtime", {})
    validate_meta(out)
    return out


def validate_meta(meta: dict, where: str = "store metadata") -> None:
    """Refuse unknown versions and absurd sizes before anything is allocated from them."""
    if not isinstance(meta, dict):
        raise StoreFormatError(f"{where}: not a JSON object")
    ver = meta.get("format_version")
    if ver not in SUPPORTED_VERSIONS:
        raise StoreFormatError(
            f"{where}: format version {ver!r} is not supported by this labelstore (reads {SUPPORTED_VERSIONS}); "
            "upgrade labelstore to read it"
        )
    enc = meta.get("encoding", {"name": "packed"})  # version-1 stores written before encodings existed
    if not isinstance(enc, dict) or enc.get("name") not in ENCODINGS:
        raise StoreFormatError(f"{where}: encoding {enc!r} is unknown ({', '.join(ENCODINGS)})")
    if ver < 3 and (ver == 2) != (enc["name"] == "zstd"):
        raise StoreFormatError(f"{where}: encoding {enc['name']!r} does not belong to format version {ver}")
    needed = required_version(meta)
    if ver >= EXPGOLOMB_VERSION and needed != ver:
        raise StoreFormatError(f"{where}: {content_name(meta)} does not belong to format version {ver} "
                               f"(encoding 'expgolomb' is version {EXPGOLOMB_VERSION}; encoding 'grouped' and "
                               f"selection mode 'adaptive' are version {GROUPED_VERSION}; a version-{ver} store "
                               "holds one of those)")
    if ver < EXPGOLOMB_VERSION and needed is not None:
        raise StoreFormatError(f"{where}: {content_name(meta)} does not belong to format version {ver} (it needs "
                               f"version {needed})")
    if ver >= 3:
        sid = meta.get("store_id")
        if not isinstance(sid, str) or not re.fullmatch(r"[0-9a-f]{32}", sid):
            raise StoreFormatError(f"{where}: store_id {sid!r} is not 32 lowercase hex digits")
        mix = meta.get("tail_prior_mix")
        if not isinstance(mix, (int, float)) or isinstance(mix, bool) or not 0 <= mix <= 1:
            raise StoreFormatError(f"{where}: tail_prior_mix {mix!r} is not a number in [0, 1]")
    if enc["name"] in ZSTD_FAMILY and (not isinstance(enc.get("level"), int) or not -7 <= enc["level"] <= 22):
        raise StoreFormatError(f"{where}: zstd level {enc.get('level')!r} is not an integer in [-7, 22]")
    v = meta.get("vocab_size")
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_VOCAB:
        raise StoreFormatError(f"{where}: vocab_size {v!r} is not an integer in [1, {MAX_VOCAB}]")
    if meta.get("id_bits") != bitpack.bits_for(v):
        raise StoreFormatError(f"{where}: id_bits {meta.get('id_bits')!r} disagrees with vocab_size {v}")
    if meta.get("label_kind") not in ("soft", "hard"):
        raise StoreFormatError(f"{where}: label_kind must be 'soft' or 'hard', got {meta.get('label_kind')!r}")
    sel = meta.get("selection")
    if not isinstance(sel, dict) or sel.get("mode") not in MODES:
        raise StoreFormatError(f"{where}: selection {sel!r} has no known mode ({', '.join(MODES)})")
    vc = meta.get("value_codec")
    try:
        check_selection(sel, vc.get("name") if isinstance(vc, dict) else None, max_k=MAX_K)
    except ValueError as exc:
        raise StoreFormatError(f"{where}: {exc}") from None
    k = sel["k"]
    if meta.get("count_bytes") not in (1, 2) or meta["count_bytes"] < count_bytes(k):
        raise StoreFormatError(f"{where}: count_bytes {meta.get('count_bytes')!r} cannot hold k={k}")
    if not isinstance(vc, dict) or vc.get("name") not in CODEC_NAMES:
        raise StoreFormatError(f"{where}: value_codec {vc!r} is unknown ({', '.join(CODEC_NAMES)})")
    try:
        get_codec(vc)
    except (ValueError, TypeError) as exc:
        raise StoreFormatError(f"{where}: value_codec {vc!r}: {exc}") from None
    if (meta["label_kind"] == "hard") != (vc["name"] == "none"):
        raise StoreFormatError(f"{where}: label_kind {meta['label_kind']!r} and value codec {vc['name']!r} disagree "
                               "(hard labels, and only they, store no values: codec 'none')")
    t = meta.get("temperature")
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not (math.isfinite(t) and t > 0):
        raise StoreFormatError(f"{where}: temperature {t!r} is not a positive number")


def required_version(meta: dict) -> int | None:
    """The format version a store's content fixes (FORMAT.md 8): 6 for encoding "grouped" or selection mode
    "adaptive", 5 for encoding "expgolomb", None when versions 3 and 4 (or, by their own rules, 1 and 2) hold it."""
    enc = meta.get("encoding")
    name = enc.get("name") if isinstance(enc, dict) else None
    sel = meta.get("selection")
    mode = sel.get("mode") if isinstance(sel, dict) else None
    if name in V6_ENCODINGS or mode in V6_MODES:
        return GROUPED_VERSION
    if name == "expgolomb":
        return EXPGOLOMB_VERSION
    return None


def content_name(meta: dict) -> str:
    """How error messages name what fixed a store's version: its encoding, or its selection mode."""
    enc = meta.get("encoding")
    name = enc.get("name") if isinstance(enc, dict) else None
    sel = meta.get("selection")
    mode = sel.get("mode") if isinstance(sel, dict) else None
    if name not in V6_ENCODINGS and mode in V6_MODES:
        return f"selection mode {mode!r}"
    return f"encoding {name!r}"


def has_tail_column(meta: dict) -> bool:
    """Whether rows of a store with this metadata carry the ``tail`` column (:func:`labelstore.selection.has_tail`)."""
    return has_tail(meta["label_kind"], meta["selection"]["mode"])


def meta_from_schema(schema: pa.Schema, where: str) -> dict:
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise StoreFormatError(f"{where}: Arrow schema has no 'labelstore' metadata; not a labelstore shard")
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise StoreFormatError(f"{where}: schema metadata is not valid JSON") from None
    validate_meta(meta, where)
    names = [f.name for f in schema]
    expected = [f.name for f in SCHEMA_FIELDS]
    if names != expected:
        raise StoreFormatError(f"{where}: columns {names} differ from the format's {expected}")
    for f, e in zip(schema, SCHEMA_FIELDS):
        if f.type != e.type:
            raise StoreFormatError(f"{where}: column {f.name} has type {f.type}, expected {e.type}")
    return meta


# ---------------------------------------------------------------------------------------------- rows
@dataclass
class EncodedRow:
    """One sequence in its on-disk byte form (the payload of one Arrow row)."""

    sample_id: int
    num_tokens: int
    input_ids: bytes
    counts: bytes
    ids: bytes
    values: bytes
    tail: bytes
    doc_starts: bytes
    num_entries: int = 0

    @property
    def crc32(self) -> int:
        return row_crc32(row_header(self.sample_id, self.num_tokens), self.input_ids, self.counts, self.ids,
                         self.values, self.tail, self.doc_starts)

    @property
    def nbytes(self) -> int:
        return 16 + sum(len(b) for b in (self.input_ids, self.counts, self.ids, self.values, self.tail,
                                         self.doc_starts))


def row_crc32(*parts) -> int:
    c = 0
    for p in parts:
        c = zlib.crc32(p, c)
    return c & 0xFFFFFFFF


def row_header(sample_id: int, num_tokens: int) -> bytes:
    """The bytes a version-3 row CRC starts with: ``sample_id`` as int64 LE, ``num_tokens`` as int32 LE."""
    return struct.pack("<qi", int(sample_id), int(num_tokens))


def check_row_crc(parts: dict, crc: int, where: str, header: bytes = b"") -> None:
    """Refuse a row whose columns do not match its stored CRC32: ``header`` (version 3: :func:`row_header`, so
    the sample id and token count are covered too) then the six payload columns (``parts``: name -> bytes)."""
    if row_crc32(header, *(parts[n] for n in PAYLOAD_COLUMNS)) != int(crc):
        raise StoreCorruptError(
            f"{where}: CRC32 mismatch, the row's bytes changed after writing; run `labelstore verify` and "
            "re-copy or recompile the damaged shard"
        )


def encode_row(meta: dict, sample_id, input_ids, counts, ids, values, tail, doc_starts=None,
               compressor=None) -> EncodedRow:
    """Validate one sequence's arrays against ``meta`` and pack them into bytes.

    ``compressor`` (a :class:`labelstore.store.entropy.RowCompressor` for encoding "zstd", a
    :class:`labelstore.store.expgolomb.ExpGolombCoder` for "expgolomb", a
    :class:`labelstore.store.grouped.GroupedCoder` for "grouped": :func:`row_coder`) is made here when not given."""
    v = meta["vocab_size"]
    bits = meta["id_bits"]
    k = meta["selection"]["k"]
    bpv = get_codec(meta["value_codec"]).bytes_per_value
    input_ids = np.asarray(input_ids).reshape(-1)
    counts = np.asarray(counts).reshape(-1)
    ids = np.asarray(ids).reshape(-1)
    values = np.asarray(values, dtype=np.uint8).reshape(-1)
    T = input_ids.size
    if counts.size != T:
        raise ValueError(f"sample {sample_id}: {counts.size} counts for {T} tokens")
    if T and (counts.min() < 0 or counts.max() > k):
        raise ValueError(f"sample {sample_id}: counts must lie in [0, k={k}]")
    n = int(counts.sum())
    if ids.size != n:
        raise ValueError(f"sample {sample_id}: {ids.size} kept ids but counts sum to {n}")
    if values.size != n * bpv:
        raise ValueError(f"sample {sample_id}: {values.size} value bytes, expected {n * bpv}")
    for name, arr in (("input_ids", input_ids), ("ids", ids)):
        if arr.size and (arr.min() < 0 or arr.max() >= v):
            raise ValueError(
                f"sample {sample_id}: {name} outside [0, vocab_size={v}) (max {arr.max()}); "
                "does the tokenizer match the teacher?"
            )
    if has_tail_column(meta):
        tail_arr = np.asarray(tail, dtype="<f4").reshape(-1)
        if tail_arr.size != T:
            raise ValueError(f"sample {sample_id}: {tail_arr.size} tail values for {T} tokens")
        if T and not (np.all(np.isfinite(tail_arr)) and tail_arr.min() >= 0 and tail_arr.max() <= 1):
            raise ValueError(f"sample {sample_id}: tail mass must be finite and in [0, 1]")
        tail_b = tail_arr.tobytes()
    else:
        tail_b = b""
    ds = np.asarray([] if doc_starts is None else doc_starts, dtype="<i4").reshape(-1)
    count_dt = count_dtype(meta["count_bytes"])
    enc_name = meta.get("encoding", {}).get("name")
    if enc_name in ZSTD_FAMILY:
        if compressor is None:
            compressor = row_coder(meta)
        streams = compressor.encode(bits, bpv, input_ids, counts.astype(count_dt).tobytes(), counts, ids,
                                    values, tail_b)
        return EncodedRow(sample_id=int(sample_id), num_tokens=T, doc_starts=ds.tobytes(), num_entries=n,
                          **streams)
    return EncodedRow(
        sample_id=int(sample_id),
        num_tokens=T,
        input_ids=bitpack.pack(input_ids, bits),
        counts=counts.astype(count_dt).tobytes(),
        ids=bitpack.pack(ids, bits),
        values=values.tobytes(),
        tail=tail_b,
        doc_starts=ds.tobytes(),
        num_entries=n,
    )


def row_coder(meta: dict, level: int | None = None):
    """The encoder/decoder of a zstd-family store's rows (None for "packed"): one per writer or reader, since it
    holds reusable zstd contexts. ``level`` defaults to the store's own."""
    name = meta.get("encoding", {}).get("name")
    if name not in ZSTD_FAMILY:
        return None
    level = meta["encoding"].get("level", 3) if level is None else level
    if name == "zstd":
        from labelstore.store.entropy import RowCompressor

        return RowCompressor(level)
    if name == "expgolomb":
        from labelstore.store.expgolomb import ExpGolombCoder

        return ExpGolombCoder(level)
    from labelstore.store.grouped import GroupedCoder, groups_apply

    return GroupedCoder(level, groups=groups_apply(meta))


def rows_to_batch(rows: list[EncodedRow], schema: pa.Schema) -> pa.RecordBatch:
    cols = [
        pa.array([r.sample_id for r in rows], pa.int64()),
        pa.array([r.num_tokens for r in rows], pa.int32()),
        *(pa.array([getattr(r, c) for r in rows], pa.binary()) for c in PAYLOAD_COLUMNS),
        pa.array([r.crc32 for r in rows], pa.uint32()),
    ]
    return pa.RecordBatch.from_arrays(cols, schema=schema)
