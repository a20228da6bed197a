"""``labelstore compile --plan units``: this rank lists every input (reading none), then reads, tokenizes and
compiles only its block of work units, one unit at a time (:mod:`labelstore.teacher.units`), resuming from the
progress its commit records carry (:mod:`labelstore.teacher.unit_progress`)."""

from __future__ import annotations

import torch

from labelstore.errors import InputDataError
from labelstore.teacher.chat import ChatRenderer
from labelstore.teacher.compile_run import CompileRun, report_truncation
from labelstore.teacher.hf_sources import object_sources
from labelstore.teacher.labels import LabelPositionsWriter
from labelstore.teacher.model import teacher_fingerprint, tokenizer_fingerprint
from labelstore.teacher.outdir import open_writer
from labelstore.teacher.parallel import FollowerWriter
from labelstore.teacher.pipeline import CompileResult, run_batches
from labelstore.teacher.sources import expand_sources
from labelstore.teacher.unit_progress import CommittedUnits, UnitTracker, read_progress
from labelstore.teacher.units import RECORDS_PER_UNIT, UnitCounts, check_id_limits, make_units, rank_units, unit_work


def compile_units(ctx: CompileRun) -> tuple[CompileResult, dict]:
    """``--plan units`` (:mod:`labelstore.teacher.units`): this rank lists every input (reading none), then reads,
    tokenizes and compiles only its block of units, one unit at a time."""
    from labelstore.store.remote_writer import RemoteStoreWriter
    from labelstore.teacher.compile import build_meta  # (compile imports this module)

    opts, in_cfg, tp = ctx.opts, ctx.in_cfg, ctx.tp
    if ctx.objs.data is not None:
        sources = object_sources(ctx.objs.data, in_cfg.sources, RECORDS_PER_UNIT)
    else:
        sources = expand_sources(opts.data, in_cfg.sources)
    units = make_units(sources)
    check_id_limits(len(units), opts.max_length)
    model = ctx.load_model()
    opts = ctx.resolve_tokens_per_batch(model)
    renderer = ChatRenderer(ctx.tokenizer, in_cfg.chat_template)
    meta = build_meta(opts, None, ctx.V, ctx.k, ctx.dtype, ctx.device, teacher_fingerprint(model),
                      tokenizer_fingerprint(ctx.tokenizer), tp.groups, units=units, renderer=renderer)
    writer = open_writer(opts, meta, tp.group, tp.groups, ctx.store_there) if tp.leader else \
        FollowerWriter(opts.out)
    try:
        records = None
        if isinstance(writer, (RemoteStoreWriter, FollowerWriter)):  # every rank's records (remote: already read)
            records = writer.commit_records()
        progress = read_progress(None if records is not None else writer.root, records)
        committed = CommittedUnits(progress)
        committed.check_identities(units, None if records is not None else writer.root, records)
    except BaseException:
        if tp.leader:
            writer.abort()
        raise
    if tp.leader:
        writer.unit_progress = UnitTracker(progress.get(tp.group))
        if in_cfg.assistant_only:
            writer = LabelPositionsWriter(writer, None)
    counts = UnitCounts()
    block = rank_units(len(units), tp.group, tp.groups)
    work = unit_work(units, block, committed, ctx.tokenizer, in_cfg, ctx.V, opts.tokens_per_batch, counts, renderer)
    totals = {}

    def whole_corpus_checks():
        """Run by every rank once its units are done, before its writer closes (an error leaves no done marker
        and no manifest): a rank sees only its own units."""
        totals.update(_whole_corpus_checks(ctx, units, counts))

    result = run_batches(model, None, None, writer, ctx.extract_fn(meta), ctx.V, ctx.codec, opts, ctx.device,
                         ctx.pad_id, tp.group, tp.groups,
                         vocab_limit=len(ctx.tokenizer) if opts.mask_vocab_padding else None,
                         notice=ctx.rank == 0, follower=not tp.leader, work=work, counts=counts,
                         before_close=whole_corpus_checks)
    result.units = {"units": counts.units, "skipped_units": counts.skipped_units,
                    "tokenized_units": counts.tokenized_units, "sequences": counts.sequences}
    report_truncation(totals["stats"], totals["labelled"], opts, ctx.rank)
    return result, dict(counts.stats)


def _whole_corpus_checks(ctx: CompileRun, units, counts) -> dict:
    tp, in_cfg = ctx.tp, ctx.in_cfg
    mine = (counts.sequences + counts.skipped, counts.labelled_positions, counts.skipped, counts.stats) \
        if tp.leader else (0, 0, 0, {})
    everyone = [mine]
    if ctx.world > 1:
        everyone = [None] * ctx.world
        torch.distributed.all_gather_object(everyone, mine)
    sequences = sum(e[0] for e in everyone)
    labelled = sum(e[1] for e in everyone)
    committed_before = sum(e[2] for e in everyone)
    stats: dict = {}
    for e in everyone:
        for key, v in e[3].items():
            stats[key] = stats.get(key, 0) + v
    if not sequences:
        names = [u.source.name for u in units]
        raise InputDataError(
            f"the corpus is empty: {len(names)} input(s) ({', '.join(names[:3])}"
            f"{', ...' if len(names) > 3 else ''}) hold no text; check --data and --text-field"
        )
    if in_cfg.assistant_only and not labelled and not committed_before:
        raise InputDataError(f"--assistant-only: no position of the {sequences:,} sequences is followed by an "
                             "assistant or completion token (no assistant turns?); nothing would be stored")
    return {"stats": stats, "labelled": labelled}
