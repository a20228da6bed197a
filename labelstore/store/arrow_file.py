"""Checks on a shard's Arrow IPC file structure, made before pyarrow decodes any record batch.

A shard is read in place from a memory map; the format (docs/FORMAT.md section 4) has no Arrow buffer
compression and no dictionaries. pyarrow would honour either if a file declared it: a 23 KB file whose record
batch declares zstd body compression decompresses to gigabytes on ``get_batch``, before any labelstore check
could run. :func:`check_ipc_file` reads the file's footer and each record batch's message header (a few hundred
bytes, by ``pread``) and refuses compression, dictionaries and blocks outside the file.

The flatbuffer tables read here (Arrow's ``File.fbs`` and ``Message.fbs``):
``Footer {version, schema, dictionaries: [Block], recordBatches: [Block], ...}``,
``Block {offset: int64, metaDataLength: int32, bodyLength: int64}`` (a 24-byte struct),
``Message {version, header_type, header, bodyLength, ...}``, ``RecordBatch {length, nodes, buffers,
compression, ...}``.
"""

from __future__ import annotations

import os
import struct

from labelstore.errors import StoreCorruptError

MAGIC = b"ARROW1"
RECORD_BATCH = 3  # MessageHeader union tag
MAX_BLOCKS = 1 << 20
MAX_META = 1 << 20  # a record batch's message header: a few hundred bytes for our 9 columns


class _Buf:
    """Bounds-checked little-endian reads from a bytes object (any overrun is a damaged file)."""

    def __init__(self, data: bytes, where: str):
        self.data, self.where = data, where

    def _get(self, fmt: str, pos: int):
        if pos < 0 or pos + struct.calcsize(fmt) > len(self.data):
            raise StoreCorruptError(f"{self.where}: the Arrow file structure points outside itself; it is damaged")
        return struct.unpack_from(fmt, self.data, pos)[0]

    def table_field(self, table: int, index: int) -> int | None:
        """Absolute position of field ``index`` of the flatbuffer table at ``table`` (None if absent)."""
        vtable = table - self._get("<i", table)
        vsize = self._get("<H", vtable)
        if 4 + 2 * index >= vsize:
            return None
        off = self._get("<H", vtable + 4 + 2 * index)
        return table + off if off else None

    def ref(self, pos: int) -> int:
        return pos + self._get("<I", pos)

    def u8(self, pos):
        return self._get("<B", pos)

    def i32(self, pos):
        return self._get("<i", pos)

    def i64(self, pos):
        return self._get("<q", pos)

    def u32(self, pos):
        return self._get("<I", pos)


def _pread(fd: int, n: int, pos: int, where: str) -> bytes:
    data = os.pread(fd, n, pos)
    if len(data) != n:
        raise StoreCorruptError(f"{where}: the Arrow file ends early; it is truncated")
    return data


def check_ipc_file(fd: int, size: int, where: str) -> int:
    """Refuse an Arrow IPC file whose record batches use body compression, or that has dictionary batches or
    blocks outside the file. ``fd``: a descriptor of the regular file, ``size`` its length. Returns the number of
    record batches."""
    if size < 8 + 10:
        raise StoreCorruptError(f"{where}: {size} bytes is too short for an Arrow IPC file; it is damaged")
    if _pread(fd, 6, 0, where) != MAGIC or _pread(fd, 6, size - 6, where) != MAGIC:
        raise StoreCorruptError(f"{where}: not an Arrow IPC file (magic bytes missing); it is damaged")
    flen = struct.unpack("<i", _pread(fd, 4, size - 10, where))[0]
    if not 0 < flen <= size - 18:
        raise StoreCorruptError(f"{where}: the Arrow footer length {flen} is impossible; it is damaged")
    foot = _Buf(_pread(fd, flen, size - 10 - flen, where), where)
    root = foot.ref(0)
    dicts = foot.table_field(root, 2)
    if dicts is not None and foot.u32(foot.ref(dicts)):
        raise StoreCorruptError(f"{where}: the Arrow file has dictionary batches, which the format never writes")
    batches = foot.table_field(root, 3)
    if batches is None:
        return 0
    vec = foot.ref(batches)
    n = foot.u32(vec)
    if n > MAX_BLOCKS:
        raise StoreCorruptError(f"{where}: the Arrow footer lists {n} record batches; it is damaged")
    for i in range(n):
        b = vec + 4 + 24 * i
        offset, meta_len, body_len = foot.i64(b), foot.i32(b + 8), foot.i64(b + 16)
        if not (8 <= offset and 8 <= meta_len <= MAX_META and 0 <= body_len and offset + meta_len + body_len <= size):
            raise StoreCorruptError(f"{where}: record batch {i} lies outside the file; it is damaged")
        head = _pread(fd, meta_len, offset, where)
        start = 8 if head[:4] == b"\xff\xff\xff\xff" else 4  # continuation marker, then int32 length
        msg = _Buf(head[start:], where)
        mroot = msg.ref(0)
        htype, hdr = msg.table_field(mroot, 1), msg.table_field(mroot, 2)
        if htype is None or msg.u8(htype) != RECORD_BATCH or hdr is None:
            raise StoreCorruptError(f"{where}: block {i} of the Arrow footer is not a record batch; it is damaged")
        if msg.table_field(msg.ref(hdr), 3) is not None:
            raise StoreCorruptError(
                f"{where}: record batch {i} uses Arrow body compression, which the format never writes (shards are "
                "read in place); refusing it before decompressing anything. Re-copy the shard from its source"
            )
    return n
