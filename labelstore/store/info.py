"""`labelstore info STORE`: what a store holds and what it costs, against dense storage."""

from __future__ import annotations

import json
from pathlib import Path

from labelstore.store.manifest import CONFIG, load_manifest

DENSE_BYTES = {"fp32": 4, "bf16": 2, "fp8": 1}


def summary(path) -> dict:
    """The store's totals, bytes per token and compression ratios against dense storage of its vocabulary."""
    root = Path(path)
    man = load_manifest(root)
    meta, tot = man["meta"], man["totals"]
    tokens = tot["tokens"]
    disk = tot["bytes"] + sum(p.stat().st_size for p in (root / "manifest.json", root / CONFIG) if p.exists())
    v = meta["vocab_size"]
    out = {
        "path": str(root),
        "format_version": man["format_version"],
        "label_kind": meta["label_kind"],
        "selection": meta["selection"],
        "value_codec": meta["value_codec"],
        "temperature": meta["temperature"],
        "vocab_size": v,
        "teacher": meta.get("teacher"),
        "tokenizer": meta.get("tokenizer"),
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


def format_summary(s: dict) -> str:
    sel = s["selection"]
    codec = s["value_codec"]
    lines = [
        f"store           {s['path']}  (format v{s['format_version']}, {s['label_kind']} labels)",
        f"teacher         {s['teacher'].get('name') if s['teacher'] else '?'}  vocab {s['vocab_size']:,}",
        f"selection       {sel.get('mode')} k={sel.get('k')}  codec {codec['name']}  temperature {s['temperature']}",
        f"samples         {s['samples']:,} in {s['shards']} shard(s)",
        f"tokens          {s['tokens']:,}  ({s['entries_per_token']:.2f} kept entries per token)",
        f"bytes on disk   {s['bytes_on_disk']:,}",
        f"bytes per token {s['bytes_per_token']:.2f}",
        "compression     " + "  ".join(f"{r:,.0f}x vs dense {n}" for n, r in s["ratio_vs_dense"].items()),
    ]
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("store", help="path of the store directory")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args) -> int:
    s = summary(args.store)
    print(json.dumps(s, indent=1) if args.json else format_summary(s))
    return 0
