"""`labelstore compile`: run a teacher LM once over a corpus and stream its compressed labels into a store.

One process per rank (``torchrun`` starts several)::

    --data / objects -> documents (files, datasets, chats)           labelstore.teacher.sources, records,
                                                                      hf_sources, chat
    documents -> plan (token sequences, sample id = index)           labelstore.teacher.inputs
    plan -> deterministic batches (<= tokens_per_batch each)          labelstore.teacher.batching
    batches -> teacher forward -> extraction -> writer thread -> shards labelstore.teacher.pipeline

Resume and scale-out: rank ``r`` of ``N`` takes the ``r``-th contiguous block of the batches
(:func:`~labelstore.teacher.batching.rank_batches`). Batches are planned from the inputs
and ``--tokens-per-batch`` alone, so a rerun computes every sample in the same batch as before, with the same
numerics. Every rank writes its own shards; rank 0 writes the manifest after a barrier.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import torch

from labelstore.codecs import get_codec
from labelstore.distributed import local_rank, rank_world
from labelstore.errors import ConfigMismatchError, InputDataError, LabelStoreError
from labelstore.selection import is_sampled
from labelstore.teacher.batching import plan_batches, rank_batches
from labelstore.teacher.chat import ChatRenderer, read_template
from labelstore.teacher.hf_sources import object_sources
from labelstore.teacher.inputs import PROGRESS_EVERY, InputConfig, Plan, build_plan
from labelstore.teacher.labels import LabelPositionsWriter
from labelstore.teacher.model import (
    config_context_length,
    config_vocab_size,
    context_length,
    display_name,
    load_teacher,
    load_tokenizer,
    output_vocab_size,
    resolve_device,
    resolve_dtype,
    resolve_max_length,
    teacher_fingerprint,
    tokenizer_fingerprint,
)
from labelstore.teacher.objects import (
    Objects,
    check_local_path,
    model_device,
    model_dtype,
    model_vocab,
    name_or_object,
)
from labelstore.teacher.options import CompileOptions
from labelstore.teacher.outdir import barrier, check_out, open_writer
from labelstore.teacher.parallel import FollowerWriter, same_on_all_ranks, tp_layout, tp_mesh
from labelstore.teacher.pipeline import CompileResult, resolve_tokens_per_batch, run_batches
from labelstore.teacher.resume_checks import accept_older_config, accept_older_teacher_hash, check_inputs_still_there
from labelstore.teacher.sources import expand_sources
from labelstore.teacher.units import (
    RECORDS_PER_UNIT,
    CommittedUnits,
    UnitCounts,
    UnitTracker,
    check_id_limits,
    inputs_config,
    make_units,
    rank_units,
    read_progress,
    unit_work,
)
from labelstore_kernels.select_torch import SAMPLER_VERSION

__all__ = ["CompileOptions", "CompileResult", "add_arguments", "build_meta", "compile_store", "run"]


# --------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    CompileOptions.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if not args.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    opts = CompileOptions.from_args(args)
    try:
        opts.validate()
    except ValueError as exc:
        print(f"labelstore compile: error: {exc}", file=sys.stderr)
        return 2
    try:
        result = compile_store(opts)
    except KeyboardInterrupt:
        # compile_store has stopped the writer thread and discarded only the open shard (see _run_batches)
        print(interrupted_message(opts.out), file=sys.stderr, flush=True)
        return 130
    if result.rank == 0 and opts.progress:
        from labelstore.store.info import format_summary, summary

        print(format_summary(summary(result.out)))
        print(f"compiled        {result.samples:,} sequences, {result.tokens:,} tokens in {result.seconds:.1f}s "
              f"({result.tokens / max(result.seconds, 1e-9):,.0f} tokens/s"
              f"{'' if result.world_size == 1 else f' on rank 0 of {result.world_size}'}"
              f"{f', {result.skipped:,} already committed' if result.skipped else ''})")
    return 0


# ------------------------------------------------------------------------------------------ main
def build_meta(opts: CompileOptions, plan: Plan | None, vocab_size: int, k: int, dtype: torch.dtype,
               device: torch.device, teacher_hash: str, tokenizer_hash: str, world: int,
               units=None, renderer: ChatRenderer | None = None) -> dict:
    """Store metadata: ``compile_config`` holds every setting that changes the labels (compared on resume).

    ``--plan units`` (``plan`` None, ``units`` the work units): ``compile_config.plan`` is ``"units"`` and
    ``data`` counts and names the units (their contents are checked unit by unit, docs/FORMAT.md 7); the chat
    template's digest is recorded whenever there is one (it is not known before the units are read whether a
    conversation will be rendered). A config without ``plan`` is a ``global`` plan (every store before 0.6).
    """
    import transformers

    from labelstore import __version__

    codec = get_codec(opts.codec_name)
    selection = opts.selection_meta(vocab_size)
    sampled = is_sampled(selection["mode"])
    # only sampled labels depend on the seed and the sampler (stores of other modes written before resume as before)
    config = {"seed": int(opts.seed), "sampler_version": SAMPLER_VERSION} if sampled else {}
    labels = {}  # keys added only when used, so that stores of earlier versions still resume
    if plan is not None:
        data = {"sha256": plan.fingerprint, "samples": len(plan), "tokens": plan.num_tokens}
        if plan.label_mask is not None:  # docs/FORMAT.md 3: positions without a label hold count 0 and tail 0
            labels["label_positions"] = "assistant"
            data["labelled_positions"] = plan.labelled_positions
        if plan.chat_template_sha256 is not None:
            labels["chat_template_sha256"] = plan.chat_template_sha256
        files, input_stats = plan.files, {"input_stats": {**plan.stats, "labelled_positions": plan.labelled_positions}}
    else:
        data = inputs_config(units)
        labels["plan"] = "units"
        if opts.assistant_only:
            labels["label_positions"] = "assistant"
        if renderer is not None and renderer.template_sha256 is not None:
            labels["chat_template_sha256"] = renderer.template_sha256
        files, input_stats = [u.source.name for u in units[:1000]], {}
    return {
        "vocab_size": vocab_size,
        "label_kind": "hard" if opts.hard_labels else "soft",
        "selection": selection,
        "value_codec": codec.to_json(),
        "encoding": {"name": opts.encoding},
        "temperature": float(opts.temperature),
        "teacher": {"name": display_name(opts.teacher), "hash": teacher_hash},
        "tokenizer": {"name": display_name(opts.tokenizer or opts.teacher), "hash": tokenizer_hash},
        "compile_config": {
            "data": data,
            "max_length": opts.max_length,
            "packing": "pack" if opts.pack else "truncate",
            "text_field": opts.text_field,
            "token_field": opts.token_field,
            "max_samples": opts.max_samples,
            "dtype": str(dtype).removeprefix("torch."),
            "tail_prior": opts.uses_tail_prior,
            **opts.head_settings(),
            "add_special_tokens": True,
            "eos_between_documents": True,
            # batch composition changes the teacher's numerics (padding, matmul shapes) and the tail prior's sums
            "tokens_per_batch": opts.tokens_per_batch,
            **config,
            **labels,
        },
        "runtime": {
            "data_files": files[:1000],
            "tokens_per_batch": opts.tokens_per_batch,
            "device": str(device),
            "world_size": world,
            "labelstore": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "teacher_path": _full_name(opts.teacher),
            **input_stats,
        },
    }


def _full_name(name: str) -> str:
    """A local teacher's absolute path (recorded, not compared: a moved store or teacher still resumes)."""
    p = Path(name)
    return str(p.resolve()) if p.exists() else name


def interrupted_message(out) -> str:
    """What a Ctrl-C'd compile prints: what is kept, and the exact command that resumes it."""
    from labelstore.store.locations import commit_records

    try:
        n = len(commit_records(out))
    except (LabelStoreError, OSError):
        n = "?"
    argv = sys.argv[1:]
    cmd = "labelstore " + shlex.join(argv[argv.index("compile"):]) if "compile" in argv else None
    return (f"labelstore compile: interrupted: {n} shards committed in {out}; rerun the same command to resume"
            + (f":\n  {cmd}" if cmd else ""))


def compile_store(opts: CompileOptions | None = None, /, *, teacher=None, tokenizer=None, data=None, out=None,
                  **options) -> CompileResult:
    """Compile (or resume) a store; see the module docstring. Returns this rank's figures.

    Either ``compile_store(CompileOptions(...))`` (what the CLI calls), or keywords, taking objects as well as
    paths::

        compile_store(teacher=model_or_path, tokenizer=tokenizer_or_path, data=dataset_or_records_or_paths,
                      out="STORE", k=32, assistant_only=True, ...)   # any other CompileOptions field

    Args:
        teacher: a ``transformers`` causal LM (used as it is: its device and dtype, unless ``device`` is given;
            put in eval mode for the compile and restored after) or a local directory / hub name.
        tokenizer: a tokenizer object or name (default: the teacher's, when the teacher is a path).
        data: a path or a list of paths (as ``--data``, ``hf:NAME`` included), a ``datasets`` Dataset /
            IterableDataset / DatasetDict (``split=``), or a list of records (dicts with ``text``, ``messages``,
            ``prompt`` + ``completion`` or ``input_ids``). Strings are always paths.
        out: the store directory.

    Raises:
        ValueError: an option out of range (its message names the flag).
        LabelStoreError: bad inputs, teacher, output directory... (nothing written or damaged).
    """
    if opts is not None:
        if not isinstance(opts, CompileOptions):
            raise TypeError(f"compile_store takes a CompileOptions or keywords, not {type(opts).__name__}")
        if any(x is not None for x in (teacher, tokenizer, data, out)) or options:
            raise TypeError("compile_store takes either a CompileOptions or keywords, not both")
        return _compile(opts, Objects())
    if teacher is None or data is None or out is None:
        raise TypeError("compile_store needs teacher=, data= and out=")
    objs = Objects()
    teacher_name = name_or_object(teacher, "teacher", objs)
    tok_name = None if tokenizer is None else name_or_object(tokenizer, "tokenizer", objs)
    if objs.model is not None and tokenizer is None:
        raise TypeError("compile_store(teacher=<model object>) needs tokenizer= (an object or a path)")
    if isinstance(data, (str, os.PathLike)):
        paths = [os.fspath(data)]
    elif isinstance(data, (list, tuple)) and data and all(isinstance(d, (str, os.PathLike)) for d in data):
        paths = [os.fspath(d) for d in data]
        texts = [i for i, d in enumerate(paths) if not d.startswith("hf:") and not Path(d).exists()
                 and any(c.isspace() for c in d)]
        if texts:
            raise InputDataError(f"data[{texts[0]}] ({paths[texts[0]][:40]!r}) is not a file or folder: strings given "
                                 "as data= are paths; to compile texts pass data=[{'text': t} for t in texts]")
    else:
        paths = []
        objs.data = data
    opts = CompileOptions(teacher=teacher_name, tokenizer=tok_name, data=paths, out=os.fspath(out), **options)
    return _compile(opts, objs)


def _compile(opts: CompileOptions, objs: Objects) -> CompileResult:
    from labelstore.store.locations import finalize

    opts.validate()
    if objs.model is None:
        check_local_path(opts.teacher, "teacher")
    if opts.tokenizer is not None and objs.tokenizer is None:
        check_local_path(opts.tokenizer, "tokenizer")
    store_there = check_out(opts.out)
    rank, world = rank_world()
    device = resolve_device(opts.device, local_rank()) if objs.model is None or opts.device != "auto" else \
        model_device(objs.model)
    dtype = resolve_dtype(opts.dtype, device) if objs.model is None else model_dtype(objs.model, opts.dtype)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tp = tp_layout(rank, world, opts.tp_size)  # groups of --tp-size ranks; for the store a group is one rank
    if opts.plan == "units" and opts.max_samples is not None and tp.groups > 1:
        raise InputDataError(
            "--max-samples with --plan units keeps the first N sequences in unit order, which only one process "
            f"can know without tokenizing every unit; this run has {tp.groups} ranks: run one process, or use "
            "--plan global")
    if opts.device_map is not None and world > 1:
        raise LabelStoreError(f"--device-map {opts.device_map} places one teacher across all of this node's devices: "
                              "run one process per node, not under torchrun")
    if world > 1 and not torch.distributed.is_initialized():
        # ranks may finish far apart (a resumed store, uneven documents): wait long at the final barrier
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                             timeout=timedelta(hours=24))
    run = None
    try:
        tokenizer = objs.tokenizer or load_tokenizer(opts.tokenizer or opts.teacher, opts.trust_remote_code)
        V = model_vocab(objs.model) if objs.model is not None else \
            config_vocab_size(opts.teacher, opts.trust_remote_code)
        ctx = (config_context_length(objs.model.config) if objs.model is not None
               else context_length(opts.teacher, opts.trust_remote_code))
        opts = dataclasses.replace(opts, max_length=resolve_max_length(opts.max_length, ctx, opts.tokens_per_batch))
        if len(tokenizer) > V:
            raise ConfigMismatchError(
                f"the tokenizer has {len(tokenizer):,} tokens but the teacher's output vocabulary is {V:,}: "
                "they do not belong together; pass the teacher's own tokenizer (--tokenizer)"
            )
        codec = get_codec(opts.codec_name)
        k = 1 if opts.hard_labels else min(opts.k, V)
        if not opts.hard_labels and opts.selection in ("topk", "topp") and opts.k > V and rank == 0:
            print(f"labelstore compile: note: --k {opts.k} is more than the teacher's vocabulary ({V:,}): every "
                  f"position keeps at most {V:,} entries", file=sys.stderr)
        in_cfg = InputConfig(max_length=opts.max_length, pack=opts.pack, text_field=opts.text_field,
                             token_field=opts.token_field, max_samples=opts.max_samples,
                             assistant_only=opts.assistant_only, chat_template=read_template(opts.chat_template),
                             text_glob=tuple(opts.text_glob or ()), split=opts.split, streaming=opts.streaming)
        run = _Run(opts, objs, in_cfg, tokenizer, V, k, codec, dtype, device, tp, rank, world, store_there)
        if opts.plan == "units":
            result, stats = _compile_units(run)
        else:
            with tempfile.TemporaryDirectory(prefix="labelstore-plan-") as workdir:
                sources = object_sources(objs.data, in_cfg.sources) if objs.data is not None else opts.data
                plan = build_plan(sources, tokenizer, in_cfg, V, workdir=workdir,  # validates every input
                                  progress_every=PROGRESS_EVERY if opts.progress and rank == 0 else None)
                _report_truncation(plan.stats, plan.labelled_positions, opts, rank)
                model = run.load_model()
                opts = run.resolve_tokens_per_batch(model)
                meta = build_meta(opts, plan, V, k, dtype, device, teacher_fingerprint(model),
                                  tokenizer_fingerprint(tokenizer), tp.groups)
                check_inputs_still_there(opts.out, plan)  # a resume: what the store recorded still holds
                accept_older_config(opts.out, meta)
                accept_older_teacher_hash(opts.out, meta, model)
                batches = plan_batches(plan, opts.tokens_per_batch, opts.pack)
                mine = rank_batches(batches, tp.group, tp.groups)
                writer = open_writer(opts, meta, tp.group, tp.groups, store_there) if tp.leader else \
                    FollowerWriter(opts.out)
                if plan.label_mask is not None and tp.leader:  # --assistant-only: no entry where no target follows
                    writer = LabelPositionsWriter(writer, plan)
                result = run_batches(model, plan, mine, writer, run.extract_fn(meta), V, codec, opts, device,
                                     run.pad_id, tp.group, tp.groups,
                                     vocab_limit=len(tokenizer) if opts.mask_vocab_padding else None,
                                     notice=rank == 0, follower=not tp.leader)
                stats = dict(plan.stats)
        barrier(world)
        if world > 1 and rank == 0:
            finalize(opts.out, tp.groups)
        barrier(world)
        result.input_stats = stats
        return result
    finally:
        if run is not None and run.was_training:
            objs.model.train()
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _report_truncation(st: dict, labelled_positions: int, opts: CompileOptions, rank: int) -> None:
    if rank == 0 and opts.progress and not opts.pack and st.get("truncated_documents"):
        print(f"labelstore compile: --truncate cut {st['truncated_documents']:,} of {st['documents']:,} documents "
              f"at --max-length {opts.max_length}, dropping {st['truncated_tokens']:,} of "
              f"{st['document_tokens']:,} tokens ({st['truncated_tokens'] / max(st['document_tokens'], 1):.1%})"
              + (f" and {st['truncated_label_positions']:,} assistant label positions (keeping "
                 f"{labelled_positions:,}); a larger --max-length or --pack keeps them"
                 if st.get("truncated_label_positions") else ""),
              file=sys.stderr)


@dataclasses.dataclass
class _Run:
    """What both plan modes share once the tokenizer and the settings are known."""

    opts: CompileOptions
    objs: Objects
    in_cfg: InputConfig
    tokenizer: object
    V: int
    k: int
    codec: object
    dtype: torch.dtype
    device: torch.device
    tp: object
    rank: int
    world: int
    store_there: bool
    was_training: bool | None = None

    def load_model(self):
        opts, objs = self.opts, self.objs
        if objs.model is not None:
            model, self.was_training = objs.model, objs.model.training
            model.eval()
            if opts.device != "auto":
                model.to(self.device)
        else:
            model = load_teacher(opts.teacher, self.dtype, self.device, opts.trust_remote_code,
                                 device_map=opts.device_map,
                                 tp_mesh=tp_mesh(self.tp, self.device) if self.tp.tp_size > 1 else None)
        if output_vocab_size(model) != self.V:
            raise ConfigMismatchError(f"the teacher's output layer has {output_vocab_size(model):,} rows but "
                                      f"its config says vocab_size {self.V:,}; fix the model's config.json")
        return model

    def resolve_tokens_per_batch(self, model) -> CompileOptions:
        self.opts = dataclasses.replace(self.opts, tokens_per_batch=same_on_all_ranks(
            resolve_tokens_per_batch(self.opts, model, self.V, self.device), self.world))
        return self.opts

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def extract_fn(self, meta: dict):
        from labelstore_kernels import extract, extract_topk

        opts, k, codec = self.opts, self.k, self.codec
        if meta["selection"]["mode"] in ("topk", "argmax"):
            def fn(flat, row_ids):
                return extract_topk(flat, k, temperature=opts.temperature, codec=codec)  # k=1 "none": argmax
        else:
            def fn(flat, row_ids):
                return extract(flat, meta["selection"], temperature=opts.temperature, codec=codec,
                               seed=opts.seed, row_ids=row_ids)
        return fn


def _compile_units(ctx: _Run) -> tuple[CompileResult, dict]:
    """``--plan units`` (:mod:`labelstore.teacher.units`): this rank lists every input (reading none), then reads,
    tokenizes and compiles only its block of units, one unit at a time."""
    from labelstore.store.remote_writer import RemoteStoreWriter

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
    _report_truncation(totals["stats"], totals["labelled"], opts, ctx.rank)
    return result, dict(counts.stats)


def _whole_corpus_checks(ctx: _Run, units, counts) -> dict:
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
