"""A store at an object-storage URL: the commit protocol without rename (docs/FORMAT.md section 8).

Object stores have no atomic rename, no ``flock`` and no directories. The protocol relies on three properties
every object store has: a PUT is atomic (readers see the whole object or none), keys are unique names, and a
listing shows every completed PUT. S3 conditional writes (``If-None-Match: *``, ``If-Match: ETAG``) add
create-if-absent and compare-and-swap, used for ``config.json`` and the rank locks.

* A shard is uploaded under its final, unique name ``shards/rRRRRR-SSSSSS.arrow`` (multipart when large); its
  size (and, for a single-part upload, its MD5 ETag) is checked against the local file; only then is its commit
  record ``commits/rRRRRR-SSSSSS.json`` PUT. A shard object without a commit record does not exist: the rank's
  next writer deletes it (and aborts the rank's unfinished multipart uploads).
* ``manifest.json`` is PUT last, by :meth:`RemoteStore.finalize`, after every rank's done marker.

This module holds what writers, the compile and the CLI share: names, listing and validating commit records,
finalizing, discarding. :mod:`labelstore.store.remote_writer` writes.
"""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np

from labelstore.errors import (
    StoreCorruptError,
    StoreFormatError,
    StoreNotFinalizedError,
)
from labelstore.store import objectstore as obj
from labelstore.store.format import check_digest, with_digest
from labelstore.store.index import INDEX
from labelstore.store.manifest import (
    COMMIT_RE,
    CONFIG,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    SHARD_RE,
    TAIL_PRIOR,
    build_manifest,
    done_name,
    prior_name,
    validate_commit_record,
)

MAX_RECORD_BYTES = 16 << 20
STORE_ENTRIES = (CONFIG, MANIFEST, TAIL_PRIOR, INDEX)
STORE_PREFIXES = ("shards", "commits", "locks")


class RemoteStore:
    """The objects of one store under ``url`` (``s3://bucket/prefix``)."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url.rstrip("/")
        self.storage_options = storage_options
        self.fs, self.root = obj.filesystem(self.url, storage_options)

    # ------------------------------------------------------------------ names
    def key(self, rel: str) -> str:
        return obj.join(self.root, rel)

    def where(self, rel: str = "") -> str:
        return obj.join(self.url, rel)

    # ------------------------------------------------------------------ primitives (retried, errors named)
    def get(self, rel: str, what: str, max_bytes: int = MAX_RECORD_BYTES) -> bytes | None:
        return obj.get_bytes(self.fs, self.key(rel), url=self.where(rel), max_bytes=max_bytes, what=what)

    def get_json(self, rel: str, what: str, max_bytes: int = MAX_RECORD_BYTES):
        data = self.get(rel, what, max_bytes)
        if data is None:
            return None
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise StoreFormatError(f"{what} {self.where(rel)} is not valid JSON ({exc}); the object is damaged") \
                from None

    def put(self, rel: str, data: bytes, *, exclusive: bool = False, if_match: str | None = None) -> bool:
        return obj.put_bytes(self.fs, self.key(rel), data, url=self.where(rel), exclusive=exclusive,
                             if_match=if_match, storage_options=self.storage_options)

    def put_json(self, rel: str, value, **kw) -> bool:
        return self.put(rel, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode(), **kw)

    def info(self, rel: str) -> dict | None:
        try:
            return obj.call(self.fs.info, self.key(rel), url=self.where(rel), action="examining",
                            passthrough=(FileNotFoundError,))
        except FileNotFoundError:
            return None

    def delete(self, rel: str) -> None:
        try:
            obj.call(self.fs.rm_file, self.key(rel), url=self.where(rel), action="deleting",
                     passthrough=(FileNotFoundError,))
        except FileNotFoundError:
            pass

    def listing(self, prefix: str) -> dict[str, dict]:
        """``{relative name: info}`` of the objects under ``prefix/`` (one level; fresh, never cached)."""
        self.fs.invalidate_cache(self.key(prefix))
        try:
            entries = obj.call(self.fs.ls, self.key(prefix), detail=True, url=self.where(prefix), action="listing",
                               passthrough=(FileNotFoundError,))
        except FileNotFoundError:
            return {}
        base = self.key(prefix).rstrip("/") + "/"
        return {f"{prefix}/{e['name'][len(base):]}": e for e in entries
                if e.get("type") != "directory" and e["name"].startswith(base)}

    def exists(self, rel: str) -> bool:
        return self.info(rel) is not None

    # ------------------------------------------------------------------ store-level reads
    def is_store(self) -> bool:
        return any(self.exists(n) for n in (CONFIG, MANIFEST)) or bool(self.listing("commits"))

    def is_empty(self) -> bool:
        self.fs.invalidate_cache(self.root)
        try:
            return not obj.call(self.fs.ls, self.root, url=self.url, action="listing",
                                passthrough=(FileNotFoundError,))
        except FileNotFoundError:
            return True

    def other_entries(self) -> list[str]:
        """Names under the prefix that are not the store's own (a folder of other data must not get a store)."""
        self.fs.invalidate_cache(self.root)
        try:
            names = obj.call(self.fs.ls, self.root, url=self.url, action="listing", passthrough=(FileNotFoundError,))
        except FileNotFoundError:
            return []
        own = set(STORE_ENTRIES) | set(STORE_PREFIXES)
        return sorted(n.rstrip("/").rsplit("/", 1)[-1] for n in names
                      if n.rstrip("/").rsplit("/", 1)[-1] not in own)

    def read_config(self) -> dict | None:
        cfg = self.get_json(CONFIG, "store config")
        if cfg is None:
            return None
        if not isinstance(cfg, dict):
            raise StoreFormatError(f"{self.where(CONFIG)} is not a JSON object; the store is damaged")
        return check_digest(cfg, cfg.get("format_version"), self.where(CONFIG))

    def commit_records(self, rank: int | None = None) -> list[dict]:
        """Every commit record (or one rank's), validated, sorted by (rank, seq)."""
        names = [n for n in self.listing("commits") if COMMIT_RE.fullmatch(n.rsplit("/", 1)[-1])]
        if rank is not None:
            names = [n for n in names if n.rsplit("/", 1)[-1].startswith(f"r{rank:05d}-")]
        out = []
        blobs = self._cat(names)
        for n in names:
            m = COMMIT_RE.fullmatch(n.rsplit("/", 1)[-1])
            try:
                rec = json.loads(blobs[n])
            except (ValueError, UnicodeDecodeError):
                raise StoreFormatError(f"commit record {self.where(n)} is not valid JSON; the object is damaged. "
                                       f"Delete it (its shard is then recomputed) and rerun") from None
            validate_commit_record(rec, self.where(n))
            if rec["path"] != f"shards/r{m.group(1)}-{m.group(2)}.arrow":
                raise StoreFormatError(f"{self.where(n)} names shard {rec['path']}, not the one its name says")
            out.append(rec)
        out.sort(key=lambda r: (r["rank"], r["seq"]))
        return out

    def _cat(self, names: list[str]) -> dict[str, bytes]:
        """Many small objects at once (fsspec fetches them concurrently)."""
        if not names:
            return {}
        keys = [self.key(n) for n in names]
        got = obj.call(self.fs.cat, keys, url=self.where("commits"), action="reading commit records")
        if isinstance(got, bytes):  # one path
            got = {keys[0]: got}
        for k, v in got.items():
            if isinstance(v, Exception):
                raise StoreFormatError(f"cannot read {k}: {obj.redact(str(v))}")
            if len(v) > MAX_RECORD_BYTES:
                raise StoreFormatError(f"{k} is over the {MAX_RECORD_BYTES} byte limit")
        return {n: got[k] for n, k in zip(names, keys)}

    # ------------------------------------------------------------------ finalize and discard
    def finalize(self, world_size: int) -> dict:
        """PUT ``tail_prior.f32`` then ``manifest.json`` once all ``world_size`` ranks are done (the remote twin of
        :func:`labelstore.store.resume.finalize_store`)."""
        cfg = self.read_config()
        if cfg is None:
            raise StoreFormatError(f"{self.url} has no config.json: it is not a labelstore store")
        listed = self.listing("commits")
        missing = [r for r in range(world_size) if f"commits/{done_name(r).split('/')[-1]}" not in listed]
        if missing:
            raise StoreNotFinalizedError(
                f"{self.url}: rank(s) {missing} have not finished; rerun the compile (same command) to complete them")
        commits = self.commit_records()
        shards = self.listing("shards")
        for c in commits:
            got = shards.get(c["path"])
            if got is None or got.get("size") != c["bytes"]:
                raise StoreCorruptError(
                    f"{self.url}: committed shard {c['path']} is missing or has the wrong size. Delete its objects "
                    f"({self._own(c)}) and rerun the same command to recompute it")
        runs = sorted((a, b, c["path"]) for c in commits for a, b in c["sample_ranges"])
        for (_a0, b0, p0), (a1, _b1, p1) in zip(runs, runs[1:]):
            if a1 < b0:
                raise StoreFormatError(f"{self.url}: sample id {a1} is stored twice ({p0} and {p1})")
        commits.sort(key=lambda c: (c["first_sample_id"], c["rank"], c["seq"]))
        total, positions = self._sum_priors(cfg["vocab_size"], commits, world_size)
        tail_prior = None
        if positions:
            blob = (total / positions).astype("<f4").tobytes()
            self.put(TAIL_PRIOR, blob)
            tail_prior = {"path": TAIL_PRIOR, "dtype": "float32", "positions": int(positions),
                          "sha256": hashlib.sha256(blob).hexdigest(), "mix": cfg["tail_prior_mix"]}
        manifest, index = build_manifest(cfg, commits, tail_prior)
        if index is not None:  # format version 4: the shard index before the manifest that references it
            self.put(INDEX, index)
        self.put_json(MANIFEST, with_digest(manifest))
        return manifest

    def _own(self, c: dict) -> str:
        return ", ".join(self.where(n) for n in (f"commits/r{c['rank']:05d}-{c['seq']:06d}.json", c["path"],
                                                 prior_name(c["rank"], c["seq"])))

    def _sum_priors(self, vocab: int, commits: list[dict], world_size: int):
        total = np.zeros(vocab, dtype=np.float64)
        positions = 0
        items = [(prior_name(c["rank"], c["seq"]), c) for c in commits if c.get("prior_positions")]
        for r in range(world_size):
            rec = self.get_json(done_name(r), "rank done marker")
            if isinstance(rec, dict) and rec.get("prior_positions"):
                items.append((done_name(r) + ".prior", rec))
        for rel, rec in items:
            blob = self.get(rel, "teacher-mass file", max_bytes=8 * vocab + 1) or b""
            if len(blob) != 8 * vocab or hashlib.sha256(blob).hexdigest() != rec.get("prior_sha256"):
                raise StoreCorruptError(f"{self.url}: teacher-mass object {self.where(rel)} is missing or damaged. "
                                        "Delete it with its commit record (or done marker) and rerun the same "
                                        "command to recompute it")
            total += np.frombuffer(blob, dtype="<f8")
            positions += int(rec["prior_positions"])
        return total, positions

    def discard(self) -> None:
        """Delete the store's own objects (``--overwrite``); anything else under the prefix stays."""
        for prefix in STORE_PREFIXES:
            for rel in self.listing(prefix):
                self.delete(rel)
        for name in STORE_ENTRIES:
            self.delete(name)

    def manifest(self) -> dict | None:
        return self.get_json(MANIFEST, "manifest", MAX_MANIFEST_BYTES)


def is_rank_shard(rel: str, rank: int) -> re.Match | None:
    m = SHARD_RE.fullmatch(rel)
    return m if m and int(m.group(1)) == rank else None


__all__ = ["RemoteStore", "is_rank_shard"]
