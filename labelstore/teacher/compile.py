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

``--plan units`` (:mod:`labelstore.teacher.unit_compile`): rank ``r`` takes the ``r``-th contiguous block of work
units (input files) instead, and plans, batches and compiles one unit at a time (sample id = unit * 2**26 +
sequence); its commit records carry its progress by unit (:mod:`labelstore.teacher.unit_progress`).
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

from labelstore.distributed import local_rank, rank_world
from labelstore.errors import ConfigMismatchError, InputDataError, LabelStoreError
from labelstore.selection import is_sampled
from labelstore.teacher.batching import plan_batches, rank_batches
from labelstore.teacher.chat import ChatRenderer, read_template
from labelstore.teacher.compile_run import CompileRun, report_truncation
from labelstore.teacher.hf_sources import object_sources
from labelstore.teacher.inputs import PROGRESS_EVERY, InputConfig, Plan, build_plan
from labelstore.teacher.labels import LabelPositionsWriter
from labelstore.teacher.model import (
    config_context_length,
    config_vocab_size,
    context_length,
    display_name,
    load_tokenizer,
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
from labelstore.teacher.parallel import FollowerWriter, tp_layout
from labelstore.teacher.pipeline import CompileResult, run_batches
from labelstore.teacher.resume_checks import accept_older_config, accept_older_teacher_hash, check_inputs_still_there
from labelstore.teacher.unit_compile import compile_units
from labelstore.teacher.units import inputs_config
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

    codec = opts.value_codec
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
        codec = opts.value_codec
        k = 1 if opts.hard_labels else min(opts.kept, V)
        if not opts.hard_labels and opts.selection in ("topk", "topp") and opts.kept > V and rank == 0:
            print(f"labelstore compile: note: --k {opts.kept} is more than the teacher's vocabulary ({V:,}): every "
                  f"position keeps at most {V:,} entries", file=sys.stderr)
        in_cfg = InputConfig(max_length=opts.max_length, pack=opts.pack, text_field=opts.text_field,
                             token_field=opts.token_field, max_samples=opts.max_samples,
                             assistant_only=opts.assistant_only, chat_template=read_template(opts.chat_template),
                             text_glob=tuple(opts.text_glob or ()), split=opts.split, streaming=opts.streaming)
        run = CompileRun(opts, objs, in_cfg, tokenizer, V, k, codec, dtype, device, tp, rank, world, store_there)
        if opts.plan == "units":
            result, stats = compile_units(run)
        else:
            with tempfile.TemporaryDirectory(prefix="labelstore-plan-") as workdir:
                sources = object_sources(objs.data, in_cfg.sources) if objs.data is not None else opts.data
                plan = build_plan(sources, tokenizer, in_cfg, V, workdir=workdir,  # validates every input
                                  progress_every=PROGRESS_EVERY if opts.progress and rank == 0 else None)
                report_truncation(plan.stats, plan.labelled_positions, opts, rank)
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
