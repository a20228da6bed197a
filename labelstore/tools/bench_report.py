"""`labelstore bench`'s report: the markdown tables, the cost paragraph and the plot of bytes against fidelity."""

from __future__ import annotations

from pathlib import Path


def _f(x, fmt):
    return "-" if x is None else format(x, fmt)


def _codec(r: dict) -> str:
    return r["codec"] + (f"/{r['step']:g}" if "step" in r else "")


def _size(r: dict) -> str:
    """k, or for adaptive rows the mean entries and the cap (``32 (<=128)``)."""
    return f"{r['mean_k']:g} (<={r['k']})" if r["mode"] == "adaptive" else str(r["k"])


def markdown_table(results: list[dict]) -> str:
    lines = ["| source | mode | k | codec | encoding | bytes/token | entries/token | x dense fp32 | x dense fp8 | "
             "KL uniform | KL p99 uniform | KL prior (cross-fit) | KL bucket | KL(rec||teacher) | kept mass | "
             "top-1 agree | 5T tokens (GB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        f = _f
        lines.append(
            f"| {r['source']} | {r['mode']} | {_size(r)} | {_codec(r)} | {r['encoding']} | "
            f"{r['bytes_per_token']:.1f} | "
            f"{r['entries_per_token']:.1f} | {r['ratio_vs_dense']['fp32']:,.0f} | {r['ratio_vs_dense']['fp8']:,.0f} | "
            f"{f(r['kl_mean'], '.4f')} | {f(r['kl_p99'], '.3f')} | {f(r.get('kl_mean_prior'), '.4f')} | "
            f"{f(r.get('kl_mean_bucket'), '.5f')} | {f(r.get('ce_gap_mean'), '.4f')} | "
            f"{f(r['kept_mass'], '.3f')} | "
            f"{r['top1_agreement']:.3f} | {r['projected_5T_tokens_GB']:,.0f} |")
    return "\n".join(lines)


def costs_paragraph(results: list[dict], scale_tokens: float) -> str:
    """Fixed costs, measured: the shard's fixed bytes and the prior file, per source vocabulary."""
    fixed = sorted(r["fixed_bytes_per_shard"] for r in results)
    meta = sorted(r["shard_metadata_bytes"] for r in results)
    lines = [f"Fixed cost of a shard (bytes of a one-shard store minus its marginal bytes): median "
             f"{fixed[len(fixed) // 2]:,} B (range {fixed[0]:,}-{fixed[-1]:,}), of which the store metadata "
             f"(compile-shaped, one data file listed: {meta[0]:,}-{meta[-1]:,} B) is stored twice (schema message "
             "and footer); a compile listing many data files has proportionally more.", ""]
    seen = {}
    for r in results:
        if r["prior_file_bytes"]:
            seen.setdefault(r["source"], r)
    for src, r in seen.items():
        lines.append(f"- {src}: tail prior file {r['prior_file_bytes']:,} B = "
                     f"{r['prior_bytes_per_token_at_bench_positions']:.1f} B/token over the bench's "
                     f"{r['positions']:,} positions, {r['prior_bytes_per_token_at_scale']:.2e} B/token at "
                     f"{scale_tokens:.0e} tokens (charged under the prior rule below)")
    return "\n".join(lines)


def distillkit_tables(dk_rows: list[dict], comparisons: list[dict], dk_note: str) -> str:
    lines = ["## DistillKit, run from its own source, on the same distributions", "", dk_note, "",
             "| source | DistillKit setting | bytes/token (payload) | documented bytes/token | KL uniform | "
             "KL prior (cross-fit) | KL bucket | kept mass | top-1 agree |",
             "|---|---|---|---|---|---|---|---|---|"]
    for d in dk_rows:
        lines.append(f"| {d['source']} | {d['setting']} | {d['bytes_per_token']:.1f} | "
                     f"{d['documented_bytes_per_token']:.1f} | {d['kl_mean']:.4f} | {d['kl_mean_prior']:.4f} | "
                     f"{d['kl_mean_bucket']:.5f} | {d['kept_mass']:.3f} | {d['top1_agreement']:.3f} |")
    lines += ["", "## Equal fidelity, rule by rule", "",
              "Per labelstore curve (a family: selection topk or adaptive, log8 step, encoding; the rows of one "
              "family keep the same kind of entries and differ only in how many), the smallest measured row whose "
              "mean KL under the SAME rule is at most DistillKit's; under the prior rule both sides are charged the "
              "prior file at the scale above. Interpolated: bytes at exactly DistillKit's KL between the two "
              "measured rows around it (log-linear in KL; an estimate, not a measured store). Size: k, or the mean "
              "entries per position for adaptive. The bucket rule is not compared (truncation is free there).",
              "",
              "| source | rule | DistillKit | its bytes/token | its KL | labelstore curve | size | "
              "bytes/token | KL | bytes ratio | interpolated bytes at its KL | interpolated ratio |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        lines.append(f"| {c['source']} | {c['rule']} | {c['distillkit']} | {c['distillkit_bytes']:.1f} | "
                     f"{c['distillkit_kl']:.4f} | {c.get('family', c.get('encoding', 'zstd'))} | "
                     f"{_f(c['labelstore_k'], 'g')} | {_f(c['labelstore_bytes'], '.1f')} | "
                     f"{_f(c['labelstore_kl'], '.4f')} | {_f(c['ratio'], '.2f')} | "
                     f"{_f(c.get('interpolated_bytes'), '.1f')} | {_f(c.get('interpolated_ratio'), '.2f')} |")
    best = {}
    for c in comparisons:
        r = c.get("interpolated_ratio") or c.get("ratio")
        key = (c["source"], c["rule"], c["distillkit"])
        if r is not None and (key not in best or r < best[key][0]):
            best[key] = (r, c)
    if best:
        lines += ["", "Best curve per source, rule and DistillKit setting (interpolated ratio where there is one):", "",
                  "| source | rule | DistillKit | best labelstore curve | bytes/token | ratio |",
                  "|---|---|---|---|---|---|"]
        for (src, rule, dk), (r, c) in best.items():
            b = c.get("interpolated_bytes") or c.get("labelstore_bytes")
            lines.append(f"| {src} | {rule} | {dk} | {c.get('family', c.get('encoding'))} | {b:.1f} | {r:.2f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path, dk_rows: list[dict] | None = None) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5.5))
    groups: dict[tuple, list] = {}
    for r in results:
        if r["kl_mean"] is None or r["codec"] != "log8":
            continue
        groups.setdefault((r["source"], r["mode"], _codec(r), r["encoding"]), []).append(r)
    for (src, mode, codec, enc), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["bytes_per_token"])
        ax.plot([r["bytes_per_token"] for r in rs], [max(r["kl_mean"], 1e-6) for r in rs], marker="o",
                label=f"{src} {mode} {codec} {enc}")
    for d in dk_rows or []:
        ax.plot([d["bytes_per_token"]], [d["kl_mean"]], marker="x", ms=9, ls="none",
                label=f"DistillKit {d['setting']} ({d['source']}, run here)")
    for label, x in (("Megatron k=128 (~640 B, pre-zstd)", 640), ("sampled ~12 (~37 B)", 37)):
        ax.axvline(x, color="grey", ls=":", lw=1)
        ax.text(x, 1.0, label, rotation=90, va="top", ha="right", fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bytes per token on disk")
    ax.set_ylabel("mean KL(teacher || stored), nats, uniform rule")
    ax.set_title("labelstore: storage against fidelity (log8 values; SYNTHETIC sources labelled)")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def reference_table(rows: list[dict]) -> str:
    """Bytes per token of every curve at top-k's fidelity (the seed scenario: 5T tokens at top-32's KL)."""
    if not rows:
        return ""
    lines = [f"## At top-{rows[0]['reference_k']} fidelity: bytes per token and the seed's store", "",
             f"Each curve's bytes per token at the mean KL (uniform rule) of top-{rows[0]['reference_k']} log8 "
             "expgolomb (interpolated between its measured rows; 'measured' marks an exact row), and the store of "
             "5 trillion tokens at that rate.", "",
             "| source | curve | reference KL | bytes/token | measured size at or under it | 5T tokens (TB) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['source']} | {r['family']} | {r['reference_kl']:.4f} | "
                     f"{_f(r['bytes_per_token'], '.1f')}{'' if r['interpolated'] else ' (measured)'} | "
                     f"{_f(r['measured_size'], 'g')} | {_f(r['store_TB'], ',.0f')} |")
    return "\n".join(lines)
