"""DistillKit's compressed layout: `labelstore export --to distillkit` and `labelstore import`.

arcee-ai/DistillKit (``distillkit/compression/``, ``distillkit/sample_logits_vllm.py``) stores a captured dataset
as Parquet files plus ``compression_config.yaml`` (a ``DistributionQuantizationConfig``) in one directory; each row::

    input_ids            list<uint64>        [L]
    compressed_logprobs  list<list<uint8>>   [R][logprob_bits / 8]   per position, the top-k log-probabilities
    bytepacked_indices   list<list<uint8>>   [R][ceil(k * b / 8)]    their token ids, b = ceil(log2 d) bits each,
                                                                      most significant bit first

Row ``j`` is vLLM's ``prompt_logprobs[j + 1]``: the teacher's distribution of token ``j + 1`` given tokens
``0..j`` (the same alignment as a labelstore position), for ``R = L - 1`` positions. The log-probabilities are
sorted in decreasing order; a position's bytes hold, in order, ``exact_k`` values in ``exact_dtype``, then the
coefficients of a least-squares curve over the remaining ranks (``polynomial_terms``, in ``term_dtype``), then
each residual bin's scale (``scale_dtype``) and its ``element_bits``-bit quantised residuals (offset by
``-2^(bits-1)``; 1-bit elements mean -1/+1); with ``delta_encoding`` the values are differences of consecutive
log-probabilities. All multi-byte values are little-endian. There is no tail: DistillKit infers the missing mass
as ``1 - sum(exp(logprobs))``.

Export writes the lossless setting of that layout (``exact_k = k``, float32 values, no curve, no bins), so the
probabilities round-trip to float32 rounding of their logarithms and the tail is ``1 - sum`` of them. It needs a
fixed k per position: ``topk`` stores only (a ``topp`` or sampled store is refused; ``--to parquet`` keeps them).
A kept probability of 0 (below the value codec's range) is written as the smallest normal float32 (log = -87.3).
Each sequence's last position (its next token lies outside the sequence) has no DistillKit row and is dropped.

Import decodes any configuration (exact values, curve, bins, deltas; entries with a non-finite log-probability are
vLLM's "missing" and are dropped) and writes a labelstore ``topk`` store: per position the k entries, values in the
chosen codec relative to the top one, and the tail ``max(0, 1 - sum p)`` computed in float64 (DistillKit keeps no
exact tail, so this is the best available and cancels when the kept mass is near 1). Input ids are kept whole; the
last position of each sequence carries no distribution (``position_mask`` False).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from labelstore.codecs import get_codec
from labelstore.errors import ConfigMismatchError, InputDataError
from labelstore.student.dataset import TargetDecoder
from labelstore.student.export import _prepare_out

CONFIG_NAME = "compression_config.yaml"
DISTILLKIT_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.uint64())),
    ("compressed_logprobs", pa.list_(pa.list_(pa.uint8()))),
    ("bytepacked_indices", pa.list_(pa.list_(pa.uint8()))),
])
FLOAT_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
TINY_LOG = float(np.log(np.finfo(np.float32).tiny))


def index_bits(d: int) -> int:
    """DistillKit's id width: ``ceil(log2 d)`` (computed there in float32; exact for any real vocabulary)."""
    return max(1, math.ceil(math.log2(d)))


def lossless_config(d: int, k: int) -> dict:
    """The ``DistributionQuantizationConfig`` (as DistillKit dumps it) that keeps k float32 log-probabilities."""
    return {"d": int(d), "k": int(k), "exact_k": int(k), "exact_dtype": "float32", "polynomial_terms": None,
            "term_dtype": "float32", "residual_bins": [], "delta_encoding": False, "error_diffusion": False,
            "normalize_t": False}


# ------------------------------------------------------------------------------------------- bits and floats
def pack_msb(values: np.ndarray, bits: int) -> np.ndarray:
    """``[..., n]`` unsigned integers -> ``[..., ceil(n * bits / 8)]`` bytes, most significant bit first."""
    v = np.asarray(values, dtype=np.uint64)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
    b = ((v[..., None] >> shifts) & np.uint64(1)).astype(np.uint8).reshape(*v.shape[:-1], -1)
    return np.packbits(b, axis=-1)


def unpack_msb(data: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_msb` (int64 ``[..., n]``)."""
    b = np.unpackbits(np.asarray(data, dtype=np.uint8), axis=-1)[..., : n * bits].reshape(*data.shape[:-1], n, bits)
    return (b.astype(np.int64) << np.arange(bits - 1, -1, -1, dtype=np.int64)).sum(-1)


def _floats(data: np.ndarray, dtype: str) -> np.ndarray:
    """Little-endian float bytes ``[..., n * size]`` -> float64 ``[..., n]``."""
    data = np.ascontiguousarray(data)
    if dtype == "bfloat16":
        u = data.view("<u2").astype(np.uint32) << 16
        return u.view(np.float32).astype(np.float64)
    return data.view({"float16": "<f2", "float32": "<f4", "float64": "<f8"}[dtype]).astype(np.float64)


def _round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round float64 values to ``dtype`` (as DistillKit's final cast does) and back to float64."""
    return torch.from_numpy(np.ascontiguousarray(x)).to(getattr(torch, dtype)).double().numpy()


def _curve(terms: list, t: int, normalize_t: bool) -> np.ndarray:
    pts = np.linspace(0, 1, t) if normalize_t else np.arange(t, dtype=np.float64)
    cols = [pts ** int(term) if not isinstance(term, str) else getattr(np, term)(pts) for term in terms]
    return np.stack(cols, axis=-1) if cols else np.zeros((t, 0))


def decompress_logprobs(data: np.ndarray, cfg: dict) -> np.ndarray:
    """DistillKit's compressed log-probabilities ``[R, nbytes]`` (uint8) -> float64 ``[R, k]`` (see the module
    docstring), rounded through the dtypes DistillKit's own decompressor computes in."""
    k, ek = int(cfg["k"]), int(cfg["exact_k"])
    out_dtype = cfg.get("exact_dtype", "float32")
    pos = 0
    size = FLOAT_BYTES[out_dtype]
    exact = _floats(data[:, : ek * size], out_dtype)
    pos = ek * size
    terms = cfg.get("polynomial_terms") or []
    coeffs = None
    if terms:
        tdt = cfg.get("term_dtype", "float32")
        coeffs = _floats(data[:, pos: pos + len(terms) * FLOAT_BYTES[tdt]], tdt)
        pos += len(terms) * FLOAT_BYTES[tdt]
    approx = k - ek
    residual = np.zeros((data.shape[0], approx))
    at = 0
    for b in cfg.get("residual_bins") or []:
        sdt, bits, n = b["scale_dtype"], int(b["element_bits"]), int(b["num_elements"])
        scale = _floats(data[:, pos: pos + FLOAT_BYTES[sdt]], sdt)
        pos += FLOAT_BYTES[sdt]
        nbytes = (n * bits + 7) // 8
        q = unpack_msb(data[:, pos: pos + nbytes], bits, n).astype(np.float64)
        pos += nbytes
        residual[:, at: at + n] = (q * 2 - 1) * scale if bits == 1 else (q - 2 ** (bits - 1)) * scale
        at += n
    if pos != data.shape[1]:
        raise InputDataError(f"DistillKit rows hold {data.shape[1]} bytes per position, the compression config "
                             f"describes {pos}: the config does not belong to this data")
    # DistillKit's dtypes: residuals in exact_dtype, the curve in term_dtype, their sum in the promoted type; with
    # deltas, a float32 cumulative sum cast back to exact_dtype
    rest = _round_to(residual, out_dtype)
    if coeffs is not None:
        tdt = cfg.get("term_dtype", "float32")
        fit = _round_to((_curve(terms, approx, bool(cfg.get("normalize_t"))) @ coeffs.T).T, tdt)
        promoted = str(torch.promote_types(getattr(torch, tdt), getattr(torch, out_dtype))).removeprefix("torch.")
        rest = _round_to(fit + rest, promoted)
    lp = np.concatenate([exact, rest], axis=1)
    if cfg.get("delta_encoding"):
        lp = _round_to(_round_to(np.cumsum(lp, axis=1), "float32"), out_dtype)
    return lp


# ------------------------------------------------------------------------------------------------- export
def export_distillkit(store, out, *, rows_per_group: int = 256) -> dict:
    """Write a ``topk`` store in DistillKit's layout (lossless setting) into the new directory ``out``."""
    targets = TargetDecoder(store)
    meta = targets.meta
    mode = meta["selection"]["mode"]
    if meta["label_kind"] != "soft" or mode != "topk":
        raise ConfigMismatchError(
            f"DistillKit's layout keeps a fixed k of teacher log-probabilities per position; this store is "
            f"{meta['label_kind']} labels with selection {mode!r}. Export it with --to parquet (variable counts, "
            "sampled estimates and hard labels are plain columns there)"
        )
    d, k = int(meta["vocab_size"]), int(targets.k)
    cfg = lossless_config(d, k)
    bits = index_bits(d)
    out = Path(out)
    _prepare_out(out)
    import yaml  # a dependency of transformers

    tmp = out / f".tmp-{CONFIG_NAME}"
    tmp.write_text(yaml.safe_dump(cfg))
    os.replace(tmp, out / CONFIG_NAME)
    schema = DISTILLKIT_SCHEMA.with_metadata({b"labelstore.meta": json.dumps(meta, sort_keys=True).encode()})
    path, tmp = out / "data-00000.parquet", out / ".tmp-data-00000.parquet"
    rows = tokens = 0
    with pq.ParquetWriter(tmp, schema, compression="zstd", use_dictionary=False) as w:
        group: list[tuple] = []
        for i in range(len(targets.store)):
            it = targets.decode(i)
            x, ids, probs, mask = it["input_ids"], it["teacher_ids"], it["teacher_probs"], it["teacher_mask"]
            if len(x) and not mask[:-1].all():
                raise ConfigMismatchError(f"sample {it['sample_id']} keeps fewer than k={k} entries at some position; "
                                          "DistillKit needs exactly k: use --to parquet")
            R = max(len(x) - 1, 0)
            order = np.argsort(-probs[:R], axis=1, kind="stable")
            p = np.take_along_axis(probs[:R], order, 1).astype(np.float64)
            lp = np.where(p > 0, np.log(np.maximum(p, 1e-300)), TINY_LOG).astype("<f4")
            group.append((np.asarray(x, dtype=np.uint64), lp.view(np.uint8).reshape(R, -1),
                          pack_msb(np.take_along_axis(ids[:R], order, 1), bits)))
            rows += 1
            tokens += len(x)
            if len(group) >= rows_per_group:
                w.write_table(_distillkit_table(group, schema))
                group = []
        if group or rows == 0:
            w.write_table(_distillkit_table(group, schema))
    os.replace(tmp, path)
    files = [path, out / CONFIG_NAME]
    return {"files": [str(f) for f in files], "rows": rows, "tokens": tokens,
            "bytes": sum(f.stat().st_size for f in files)}


def _ragged(parts: list[np.ndarray], dtype) -> pa.Array:
    """``[n_i, width]`` numpy blocks -> ``list<list<dtype>>`` (one outer list per block) without Python lists."""
    width = [p.shape[1] if p.ndim == 2 else 0 for p in parts]
    rows = np.array([p.shape[0] for p in parts], dtype=np.int64)
    inner_sizes = np.repeat(width, rows)
    inner = pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(inner_sizes)]).astype(np.int32)),
                                     pa.array(np.concatenate([p.reshape(-1) for p in parts]) if parts
                                              else np.zeros(0, dtype), type=dtype))
    return pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(rows)]).astype(np.int32)), inner)


def _distillkit_table(group: list[tuple], schema: pa.Schema) -> pa.Table:
    xs = [g[0] for g in group]
    input_ids = pa.ListArray.from_arrays(
        pa.array(np.concatenate([[0], np.cumsum([len(x) for x in xs])]).astype(np.int32)),
        pa.array(np.concatenate(xs) if xs else np.zeros(0, np.uint64), type=pa.uint64()))
    return pa.Table.from_arrays([input_ids, _ragged([g[1] for g in group], pa.uint8()),
                                 _ragged([g[2] for g in group], pa.uint8())], schema=schema)


def _row_blocks(batch: pa.RecordBatch, name: str):
    """One ``list<list<uint8>>`` column -> per row a uint8 ``[R, width]`` array (a view; widths are fixed)."""
    col = batch.column(name)
    outer = col.offsets.to_numpy()
    inner = col.values
    ioff = inner.offsets.to_numpy()
    data = inner.values.to_numpy(zero_copy_only=False)
    for r in range(len(col)):
        a, b = outer[r], outer[r + 1]
        lo, hi = ioff[a], ioff[b]
        width = (ioff[a + 1] - lo) if b > a else 0
        if b > a and (hi - lo) != width * (b - a):
            raise InputDataError(f"column {name} row {r}: positions hold different numbers of bytes")
        yield data[lo:hi].reshape(b - a, width)


# ------------------------------------------------------------------------------------------------- import
def read_config(src: Path) -> dict:
    import yaml

    p = src / CONFIG_NAME
    if not p.is_file():
        raise InputDataError(f"{src} has no {CONFIG_NAME}: not a DistillKit capture directory")
    cfg = yaml.safe_load(p.read_text())
    for key in ("d", "k", "exact_k"):
        if not isinstance(cfg.get(key), int) or cfg[key] < (1 if key != "exact_k" else 0):
            raise InputDataError(f"{p}: {key} must be a positive integer, got {cfg.get(key)!r}")
    return cfg


def import_distillkit(src, out, *, codec: str = "log8", encoding: str = "packed", temperature: float = 1.0,
                      tokenizer=None) -> dict:
    """Read a DistillKit capture directory (``compression_config.yaml`` + Parquet files) into a new store."""
    from labelstore.store.writer import StoreWriter
    from labelstore.student.targets import tokenizer_hash

    src = Path(src)
    cfg = read_config(src)
    files = sorted(src.glob("*.parquet"))
    if not files:
        raise InputDataError(f"{src} holds no .parquet files")
    d, k = cfg["d"], cfg["k"]
    bits = index_bits(d)
    c = get_codec(codec)
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    for f in files:
        digest.update(f"{f.name}:{f.stat().st_size}".encode())
    meta = {
        "vocab_size": d, "label_kind": "soft", "selection": {"mode": "topk", "k": k}, "value_codec": c.to_json(),
        "encoding": {"name": encoding}, "temperature": float(temperature),
        "teacher": {"name": f"distillkit:{src.name}", "hash": digest.hexdigest()[:16]},
        "tokenizer": {"name": getattr(tokenizer, "name_or_path", None) or "unknown",
                      "hash": tokenizer_hash(tokenizer) if tokenizer is not None else None},
    }
    rows = tokens = 0
    with StoreWriter(out, meta) as w:
        for f in files:
            for batch in pq.ParquetFile(f).iter_batches(columns=list(DISTILLKIT_SCHEMA.names)):
                xs = batch.column("input_ids")
                for x, lp, ids in zip(_input_rows(xs), _row_blocks(batch, "compressed_logprobs"),
                                      _row_blocks(batch, "bytepacked_indices")):
                    _import_row(w, rows, x, lp, ids, cfg, bits, c, str(f))
                    rows += 1
                    tokens += len(x)
    return {"rows": rows, "tokens": tokens, "store": str(out)}


def _input_rows(col: pa.Array):
    offs = col.offsets.to_numpy()
    vals = col.values.to_numpy(zero_copy_only=False)
    for r in range(len(col)):
        yield vals[offs[r]: offs[r + 1]]


def _import_row(w, sample_id: int, x, lp_bytes: np.ndarray, id_bytes: np.ndarray, cfg: dict, bits: int, codec,
                where: str) -> None:
    d, k = cfg["d"], cfg["k"]
    x = np.asarray(x)
    if x.size and x.max() >= d:
        raise InputDataError(f"{where} row {sample_id}: an input id is outside [0, d={d})")
    x = x.astype(np.int64)
    L, R = len(x), len(lp_bytes)
    if R != len(id_bytes) or R > L:
        raise InputDataError(f"{where} row {sample_id}: {R} log-prob rows, {len(id_bytes)} index "
                             f"rows and {L} input ids (expected at most one row per input id)")
    counts = np.zeros(L, dtype=np.int64)
    tail = np.zeros(L, dtype=np.float32)
    ids_flat, values = np.zeros(0, np.int64), np.zeros(0, np.uint8)
    if R:
        lp = decompress_logprobs(lp_bytes, cfg)
        ids = unpack_msb(id_bytes, bits, k)
        keep = np.isfinite(lp)  # -inf: vLLM returned fewer than k entries; those ids are meaningless
        if (ids[keep] >= d).any():
            raise InputDataError(f"{where} row {sample_id}: a token id is >= d={d}")
        lp = np.where(keep, lp, -np.inf)
        order = np.argsort(-lp, axis=1, kind="stable")  # kept entries first, most probable first
        lp, ids, keep = (np.take_along_axis(a, order, 1) for a in (lp, ids, keep))
        srt = np.sort(np.where(keep, ids, -1 - np.arange(k)), axis=1)
        if (srt[:, 1:] == srt[:, :-1]).any():
            raise InputDataError(f"{where} row {sample_id}: a token id appears twice at one position")
        counts[:R] = keep.sum(1)
        p = np.where(keep, np.exp(lp), 0.0)
        tail[:R] = np.where(counts[:R] > 0, np.maximum(0.0, 1.0 - p.sum(1)), 0.0)
        top = np.where(counts[:R] > 0, lp[:, 0], 0.0)[:, None]
        codes = codec.encode(torch.from_numpy(np.where(keep, lp - top, -np.inf)).float()).numpy()
        codes = codes.reshape(R, k, -1)
        ids_flat = ids[keep]
        values = codes[keep].reshape(-1)
    w.add(sample_id, x, counts, ids_flat, values, tail, np.zeros(1, np.int32))


# ------------------------------------------------------------------------------------------------ CLI
def add_arguments(parser) -> None:
    parser.add_argument("src", help="a DistillKit capture directory (compression_config.yaml + *.parquet)")
    parser.add_argument("out", help="the new store directory")
    parser.add_argument("--codec", default="log8", help="value codec of the new store (default %(default)s)")
    parser.add_argument("--encoding", default="packed", choices=("packed", "zstd", "expgolomb", "grouped"))
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="the temperature the teacher's log-probabilities were captured at (default 1)")
    parser.add_argument("--tokenizer", default=None,
                        help="the teacher's tokenizer (path or hub name): its hash is recorded for student checks")


def run(args) -> int:
    tok = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(args.tokenizer)
        except (OSError, ValueError) as exc:
            raise InputDataError(f"cannot load tokenizer {args.tokenizer!r}: {exc}") from None
    res = import_distillkit(args.src, args.out, codec=args.codec, encoding=args.encoding,
                            temperature=args.temperature, tokenizer=tok)
    print(f"imported {res['rows']:,} sequences ({res['tokens']:,} tokens) into {res['store']}")
    return 0
