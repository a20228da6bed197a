"""`labelstore info STORE`: what a store holds and what it costs, against dense storage.

On a folder that is not a finished store it says what is there instead: an unfinished compile (its committed
shards, samples and tokens, and how to resume or start over), or no store at all.
"""

from __future__ import annotations

import json
from pathlib import Path

from labelstore.errors import LabelStoreError, StoreNotFinalizedError
from labelstore.store.manifest import CONFIG, MANIFEST, list_commits, load_manifest, read_json

DENSE_BYTES = {"fp32": 4, "bf16": 2, "fp8": 1}


def summary(path) -> dict:
    """The store's totals, bytes per token and compression ratios against dense storage of its vocabulary (a URL:
    from its manifest and config only)."""
    from labelstore.store.objectstore import is_url

    if is_url(path):
        from labelstore.store.mirror import mirrored

        with mirrored(path, everything=False) as (local, show):
            try:
                s = summary(local)
            except LabelStoreError as exc:
                raise type(exc)(show(str(exc))) from None
        return dict(s, path=path)
    root = Path(path)
    man = load_manifest(root)
    meta, tot = man["meta"], man["totals"]
    tokens = tot["tokens"]
    disk = tot["bytes"] + sum(p.stat().st_size for p in (root / "manifest.json", root / CONFIG) if p.exists())
    disk += man.get("index", {}).get("bytes", 0)  # version 4: index.arrow (its size recorded in the manifest)
    v = meta["vocab_size"]
    if man.get("tail_prior"):  # tail_prior.f32: float32 [V] (docs/FORMAT.md 5c)
        disk += 4 * v
    cc, rt = meta.get("compile_config", {}), meta.get("runtime", {})
    labelled = cc.get("data", {}).get("labelled_positions", tokens) if cc.get("label_positions") else tokens
    out = {
        "path": str(root),
        "format_version": man["format_version"],
        "label_kind": meta["label_kind"],
        "selection": meta["selection"],
        "value_codec": meta["value_codec"],
        "encoding": meta.get("encoding", {"name": "packed"}),
        "temperature": meta["temperature"],
        "vocab_size": v,
        "teacher": meta.get("teacher"),
        "teacher_path": rt.get("teacher_path"),
        "tokenizer": meta.get("tokenizer"),
        "max_length": cc.get("max_length"),
        "packing": cc.get("packing"),
        "label_positions": cc.get("label_positions", "all"),
        "labelled_positions": labelled,
        "input_stats": rt.get("input_stats"),
        "shards": tot["shards"],
        "samples": tot["samples"],
        "tokens": tokens,
        "kept_entries": tot["entries"],
        "entries_per_token": (tot["entries"] / tokens) if tokens else 0.0,
        "bytes_on_disk": disk,
        "bytes_per_token": (disk / tokens) if tokens else 0.0,
        "ratio_vs_dense": {name: (b * v * tokens / disk) if disk else 0.0 for name, b in DENSE_BYTES.items()},
    }
    return out


def _selection_text(sel: dict) -> str:
    return " ".join([str(sel.get("mode"))] + [f"{k}={v}" for k, v in sel.items() if k != "mode"])


def format_summary(s: dict) -> str:
    codec = s["value_codec"]
    enc = s["encoding"]
    level = f" level {enc['level']}" if "level" in enc else ""
    teacher = (s["teacher"] or {}).get("name", "?")
    if s.get("teacher_path") and s["teacher_path"] != teacher:
        teacher = f"{teacher} ({s['teacher_path']})"
    lines = [
        f"store           {s['path']}  (format v{s['format_version']}, {s['label_kind']} labels)",
        f"teacher         {teacher}  vocab {s['vocab_size']:,}",
        f"selection       {_selection_text(s['selection'])}  codec {codec['name']}  temperature {s['temperature']}",
        f"encoding        {enc.get('name')}{level}  max length {s['max_length']}  {s['packing'] or ''}",
        f"samples         {s['samples']:,} in {s['shards']} shard(s)",
        f"tokens          {s['tokens']:,}  ({s['entries_per_token']:.2f} kept entries per token)",
    ]
    if s["label_positions"] != "all":
        share = s["labelled_positions"] / max(s["tokens"], 1)
        lines.append(f"labels          {s['labelled_positions']:,} positions ({share:.1%}): {s['label_positions']} "
                     "tokens only (the others hold no label)")
    st = s.get("input_stats") or {}
    if s["packing"] == "truncate" and st.get("truncated_documents"):
        lines.append(f"truncated       {st['truncated_documents']:,} of {st['documents']:,} documents, "
                     f"{st['truncated_tokens']:,} of {st['document_tokens']:,} tokens cut off at max length"
                     + (f", {st['truncated_label_positions']:,} label positions among them"
                        if st.get("truncated_label_positions") else ""))
    lines += [
        f"bytes on disk   {s['bytes_on_disk']:,}",
        f"bytes per token {s['bytes_per_token']:.2f}",
        "compression     " + "  ".join(f"{r:,.0f}x vs dense {n}" for n, r in s["ratio_vs_dense"].items()),
    ]
    return "\n".join(lines)


def describe_unfinished(path) -> str:
    """What an unfinished store holds (config, committed shards) and what to do with it."""
    root = Path(path)
    commits = list_commits(root) if (root / "commits").is_dir() else []
    samples = sum(int(c.get("rows", 0)) for c in commits)
    tokens = sum(int(c.get("tokens", 0)) for c in commits)
    try:
        cfg = read_json(root / CONFIG, "store config")
        teacher = (cfg.get("teacher") or {}).get("name", "?") if isinstance(cfg, dict) else "?"
    except Exception:  # noqa: BLE001 - a damaged config is reported by verify; here we only describe
        teacher = "?"
    if not commits:
        return (f"{root}: an unfinished store with no committed shard (teacher {teacher}): a compile started here "
                "and stopped before its first shard. Rerun the compile (with any settings) to start it over.")
    return (f"{root}: an unfinished store (teacher {teacher}): {len(commits)} committed shard(s), {samples:,} "
            f"samples, {tokens:,} tokens, no {MANIFEST} yet (interrupted, or still running). Rerun the same "
            "`labelstore compile` command to resume and finalize it, or add --overwrite to start over.")


def add_arguments(parser) -> None:
    parser.add_argument("store", help="path of the store directory, or its URL (s3://bucket/prefix)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args) -> int:
    from labelstore.store.objectstore import is_url

    if not is_url(args.store):
        return _run(args, args.store, str)
    from labelstore.store.mirror import mirrored

    with mirrored(args.store, everything=False) as (local, show):  # the manifest and config only
        return _run(args, local, show, args.store)


def _run(args, path, show, shown=None) -> int:
    try:
        s = summary(path)
    except StoreNotFinalizedError:
        print(show(describe_unfinished(path)))
        return 1
    except LabelStoreError as exc:
        raise type(exc)(show(str(exc))) from None
    if shown is not None:
        s["path"] = shown
    print(json.dumps(s, indent=1) if args.json else format_summary(s))
    return 0
