"""`labelstore compile`: run a teacher LM once over a corpus and stream its compressed labels into a store.

One process per rank (``torchrun`` starts several)::

    inputs -> plan (token sequences, sample id = index)              labelstore.teacher.inputs
    plan -> deterministic batches (<= tokens_per_batch each)          labelstore.teacher.batching
    batches -> teacher forward -> extraction -> writer thread -> shards labelstore.teacher.pipeline

Resume and scale-out: batch ``b`` belongs to rank ``b % world_size``. Batches are planned from the inputs
and ``--tokens-per-batch`` alone, so a rerun computes every sample in the same batch as before, with the same
numerics. Every rank writes its own shards; rank 0 writes the manifest after a barrier.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import torch

from labelstore.codecs import get_codec
from labelstore.distributed import local_rank, rank_world
from labelstore.errors import ConfigMismatchError, InputDataError, LabelStoreError, StoreWriteError
from labelstore.selection import is_sampled
from labelstore.teacher.batching import plan_batches
from labelstore.teacher.inputs import InputConfig, Plan, build_plan
from labelstore.teacher.model import (
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
from labelstore.teacher.options import CompileOptions
from labelstore.teacher.parallel import FollowerWriter, same_on_all_ranks, tp_layout, tp_mesh
from labelstore.teacher.pipeline import CompileResult, resolve_tokens_per_batch, run_batches

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


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


# ------------------------------------------------------------------------------------------ main
def build_meta(opts: CompileOptions, plan: Plan, vocab_size: int, k: int, dtype: torch.dtype,
               device: torch.device, teacher_hash: str, tokenizer_hash: str, world: int) -> dict:
    """Store metadata: ``compile_config`` holds every setting that changes the labels (compared on resume)."""
    import transformers

    from labelstore import __version__

    codec = get_codec(opts.codec_name)
    selection = opts.selection_meta(vocab_size)
    sampled = is_sampled(selection["mode"])
    config = {"seed": int(opts.seed)} if sampled else {}  # only sampled labels depend on it (older stores resume)
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
            "data": {"sha256": plan.fingerprint, "samples": len(plan), "tokens": plan.num_tokens},
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
            **config,
        },
        "runtime": {
            "data_files": plan.files[:1000],
            "tokens_per_batch": opts.tokens_per_batch,
            "device": str(device),
            "world_size": world,
            "labelstore": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }


def interrupted_message(out) -> str:
    """What a Ctrl-C'd compile prints: what is kept, and the exact command that resumes it."""
    from labelstore.store.manifest import list_commits

    try:
        n = len(list_commits(Path(out)))
    except (LabelStoreError, OSError):
        n = "?"
    argv = sys.argv[1:]
    cmd = "labelstore " + shlex.join(argv[argv.index("compile"):]) if "compile" in argv else None
    return (f"labelstore compile: interrupted: {n} shards committed in {out}; rerun the same command to resume"
            + (f":\n  {cmd}" if cmd else ""))


def compile_store(opts: CompileOptions) -> CompileResult:
    """Compile (or resume) the store ``opts.out``; see the module docstring. Returns this rank's figures."""
    from labelstore.store.writer import StoreWriter, finalize_store
    from labelstore_kernels import extract, extract_topk

    opts.validate()
    rank, world = rank_world()
    device = resolve_device(opts.device, local_rank())
    dtype = resolve_dtype(opts.dtype, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tp = tp_layout(rank, world, opts.tp_size)  # groups of --tp-size ranks; for the store a group is one rank
    if opts.device_map is not None and world > 1:
        raise LabelStoreError(f"--device-map {opts.device_map} places one teacher across all of this node's devices: "
                              "run one process per node, not under torchrun")
    if world > 1 and not torch.distributed.is_initialized():
        # ranks may finish far apart (a resumed store, uneven documents): wait long at the final barrier
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                             timeout=timedelta(hours=24))
    try:
        tokenizer = load_tokenizer(opts.tokenizer or opts.teacher, opts.trust_remote_code)
        V = config_vocab_size(opts.teacher, opts.trust_remote_code)
        opts = dataclasses.replace(opts, max_length=resolve_max_length(
            opts.max_length, context_length(opts.teacher, opts.trust_remote_code), opts.tokens_per_batch))
        if len(tokenizer) > V:
            raise ConfigMismatchError(
                f"the tokenizer has {len(tokenizer):,} tokens but the teacher's output vocabulary is {V:,}: "
                "they do not belong together; pass the teacher's own tokenizer (--tokenizer)"
            )
        codec = get_codec(opts.codec_name)
        k = 1 if opts.hard_labels else min(opts.k, V)
        in_cfg = InputConfig(max_length=opts.max_length, pack=opts.pack, text_field=opts.text_field,
                             token_field=opts.token_field, max_samples=opts.max_samples)
        with tempfile.TemporaryDirectory(prefix="labelstore-plan-") as workdir:
            plan = build_plan(opts.data, tokenizer, in_cfg, V, workdir=workdir)  # validates every input
            model = load_teacher(opts.teacher, dtype, device, opts.trust_remote_code, device_map=opts.device_map,
                                 tp_mesh=tp_mesh(tp, device) if tp.tp_size > 1 else None)
            if output_vocab_size(model) != V:
                raise ConfigMismatchError(f"the teacher's output layer has {output_vocab_size(model):,} rows but "
                                          f"its config says vocab_size {V:,}; fix the model's config.json")
            opts = dataclasses.replace(opts, tokens_per_batch=same_on_all_ranks(
                resolve_tokens_per_batch(opts, model, V, device), world))
            meta = build_meta(opts, plan, V, k, dtype, device, teacher_fingerprint(model),
                              tokenizer_fingerprint(tokenizer), tp.groups)
            _check_inputs_still_there(opts.out, plan)
            batches = plan_batches(plan, opts.tokens_per_batch, opts.pack)
            mine = batches[tp.group::tp.groups]
            try:
                writer = (StoreWriter(opts.out, meta, rank=tp.group, world_size=tp.groups,
                                      shard_bytes=max(1, int(opts.shard_mb * (1 << 20))))
                          if tp.leader else FollowerWriter(opts.out))
            except OSError as exc:  # e.g. the lock file of a read-only store (the writer wraps its other I/O)
                raise StoreWriteError(
                    f"cannot open {opts.out} for writing: {exc.strerror or exc}"
                    f"{f' ({exc.filename})' if exc.filename else ''}. Nothing was changed; make --out writable "
                    "(permissions, free space) or choose another directory, then rerun the same command."
                ) from None
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            if meta["selection"]["mode"] in ("topk", "argmax"):
                def extract_fn(flat, row_ids):
                    return extract_topk(flat, k, temperature=opts.temperature, codec=codec)  # k=1 "none": argmax
            else:
                def extract_fn(flat, row_ids):
                    return extract(flat, meta["selection"], temperature=opts.temperature, codec=codec,
                                   seed=opts.seed, row_ids=row_ids)
            result = run_batches(model, plan, mine, writer, extract_fn, V, codec, opts, device,
                                  pad_id, tp.group, tp.groups,
                                  vocab_limit=len(tokenizer) if opts.mask_vocab_padding else None,
                                  notice=rank == 0, follower=not tp.leader)
        _barrier(world)
        if world > 1 and rank == 0:
            finalize_store(opts.out, tp.groups)
        _barrier(world)
        return result
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _check_inputs_still_there(out, plan: Plan) -> None:
    """On resume: if the data changed because input files the store was compiled from vanished, name them.

    (The config check would refuse the resume anyway, but only as a changed data fingerprint.) Input files are
    read once, while planning: after that a compile runs from the plan's own copy of the tokens.
    """
    from labelstore.store.manifest import CONFIG

    cfg_path = Path(out) / CONFIG
    try:
        cfg = json.loads(cfg_path.read_text())
        old_sha, old_files = cfg["compile_config"]["data"]["sha256"], list(cfg["runtime"]["data_files"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # a new store, or a damaged config that the writer reports
    if old_sha == plan.fingerprint:
        return
    now = set(plan.files)
    gone = [f for f in old_files if f not in now and not Path(f).exists()]
    if gone:
        raise InputDataError(
            f"{out} was compiled from input file(s) that no longer exist: {', '.join(gone[:5])}"
            f"{f' and {len(gone) - 5} more' if len(gone) > 5 else ''}. Restore them and rerun the same command to "
            "resume; committed shards are intact."
        )
